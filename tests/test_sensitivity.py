"""Decoupled layer sensitivity and the MixDQ plan on a tiny random FLUX pipeline (2 prompts, 2 steps)."""
import json
from dataclasses import replace

import pytest
import torch

from qsched.runtime.apply import quantize_
from calibrate.mixdq import mixdq_plan
from qsched.runtime.qlayers import QuantLayer
from calibrate.sensitivity import SensitivityTable, analyze_sensitivity
from qsched.core.bits import parse_bits
from qsched.core.errors import QschedError
from qsched.runtime.generation import generate
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline

from conftest import TEST_WORDS

PROMPTS = ["a red circle on the left", "a blue square above the green triangle"]
SETTINGS = replace(TINY_SETTINGS, steps=2)
BLOCK = ["single_transformer_blocks.0.*"]  # quality layers (attention, norm, proj_out) and a content one (proj_mlp)


from qsched.metrics import ssim as SSIM  # noqa: E402
from qsched.recipe import QuantizationConfig
from calibrate.mixdq_run import MixDQRun


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0, TEST_WORDS)  # components in eval mode, as sampling needs


@pytest.fixture(scope="module")
def table(pipe):
    return analyze_sensitivity(pipe, PROMPTS, SETTINGS, weight_widths=(2, 4, 8), act_widths=(4, 8), layers=BLOCK,
                               image_metric=SSIM, progress=False)


def test_narrower_widths_never_score_better_on_average(table):
    assert {l.metric for l in table.layers.values()} == {"ssim", "sqnr"}
    for metric in ("ssim", "sqnr"):
        layers = [l for l in table.layers.values() if l.metric == metric]
        mean = lambda side, b: sum(getattr(l, side)[b] for l in layers) / len(layers)  # noqa: E731
        assert mean("weight", 2) <= mean("weight", 4) <= mean("weight", 8)
        assert mean("act", 4) <= mean("act", 8)
    sqnr = [l for l in table.layers.values() if l.metric == "sqnr"]
    assert all(l.weight[2] < l.weight[8] and l.act[4] < l.act[8] for l in sqnr)
    assert all(l.macs > 0 and l.params > 0 for l in table.layers.values())
    assert table.stats["evaluations"] == len(table.layers) * 5 and table.stats["evaluations_per_second"] > 0


def test_table_round_trips_through_json(table):
    back = SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert back.layers == table.layers
    assert (back.weight_widths, back.act_widths) == ([2, 4, 8], [4, 8])


def test_model_is_restored_exactly(pipe):
    modules = dict(pipe.transformer.named_modules())
    before = generate(pipe, PROMPTS, SETTINGS)
    analyze_sensitivity(pipe, PROMPTS, SETTINGS, weight_widths=(2,), act_widths=(4,),
                        layers=["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"],
                        image_metric=SSIM, progress=False)
    assert dict(pipe.transformer.named_modules()) == modules  # the very same module objects, no QuantLayer left
    assert torch.equal(generate(pipe, PROMPTS, SETTINGS), before)


def test_rerun_is_served_from_the_work_folder(pipe, tmp_path):
    kwargs = dict(weight_widths=(2, 8), act_widths=(8,), image_metric=SSIM, progress=False, work_dir=tmp_path)
    first = analyze_sensitivity(pipe, PROMPTS, SETTINGS, layers=["transformer_blocks.1.attn.to_*"], **kwargs)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        again = analyze_sensitivity(pipe, PROMPTS, SETTINGS, layers=["transformer_blocks.1.attn.to_*"], **kwargs)
        assert not calls and again.layers == first.layers and again.stats["layers_cached"] == len(first.layers)
        # a wider selection computes only the new layers
        wider = analyze_sensitivity(pipe, PROMPTS, SETTINGS, layers=["transformer_blocks.1.attn.*"], **kwargs)
        assert calls and wider.stats["layers_cached"] == len(first.layers)
        assert wider.stats["layers_computed"] == len(wider.layers) - len(first.layers)
        # other prompts are another key
        calls.clear()
        analyze_sensitivity(pipe, PROMPTS[:1], SETTINGS, layers=["transformer_blocks.1.attn.to_q"], **kwargs)
        assert calls
    finally:
        hook.remove()
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 2


def test_quantized_model_and_unknown_layers_are_refused(pipe):
    with pytest.raises(QschedError, match="matched no quantizable layer"):
        analyze_sensitivity(pipe, PROMPTS, SETTINGS, layers=["no_such_block.*"], image_metric=SSIM, progress=False)
    other = build_tiny_pipeline(1, TEST_WORDS)
    name = "transformer_blocks.0.attn.to_q"
    other.transformer.transformer_blocks[0].attn.to_q = QuantLayer.from_module(
        other.transformer.get_submodule(name), 4, None)
    with pytest.raises(QschedError, match="full-precision model"):
        analyze_sensitivity(other, PROMPTS, SETTINGS, layers=[name], image_metric=SSIM, progress=False)


def test_mixdq_plan_meets_the_budget(pipe):
    spec = parse_bits("w3.5a8")
    scope = ["single_transformer_blocks.1.*", "transformer_blocks.1.ff.*"]
    config = QuantizationConfig(weight_widths=(2, 4, 8), layers=tuple(scope),
                                keep_fp=("single_transformer_blocks.1.attn.to_k",))
    plan, table, result = mixdq_plan(pipe, spec, PROMPTS, SETTINGS, None, config,
                                     MixDQRun(image_metric=SSIM, progress=False))
    assert result.status == "Optimal"
    # nine layers at {2, 4, 8} bits cannot always land within 0.02 of the budget; never above it
    assert 3.4 <= plan.average_weight_bits() <= 3.5 + 1e-9
    assert plan.average_weight_bits() == pytest.approx(result.average_weight_bits)
    assert plan.layers["single_transformer_blocks.1.attn.to_k"].weight_bits is None
    assert "single_transformer_blocks.1.attn.to_k" not in table.layers
    acts = [p.act_bits for p in plan.layers.values() if p.weight_bits is not None]
    assert acts.count(None) == 1 and set(acts) <= {None, 4, 8}
    assert all(p.reason.startswith("ILP: ") for n, p in plan.layers.items() if n in table.layers)
    # the plan applies through the ordinary path and the model still samples
    from calibrate.calibration import collect_activation_ranges

    ranges = collect_activation_ranges(pipe, PROMPTS, SETTINGS, progress=False)
    original = {n: pipe.transformer.get_submodule(n) for n in plan.layers}
    try:
        quantize_(pipe.transformer, plan, ranges)
        assert torch.isfinite(generate(pipe, PROMPTS, SETTINGS)).all()
    finally:
        from qsched.runtime.apply import set_submodule

        for n, m in original.items():
            set_submodule(pipe.transformer, n, m)


def test_mixdq_width_floor_is_capped_at_the_budget(pipe, tmp_path):
    """``min_weight_bits`` keeps narrower widths out, except where the budget itself needs them (w2.5 with
    candidates 2/3/4/8: the floor drops to 2, the widest candidate within 2.5)."""
    scope = ["single_transformer_blocks.1.*"]
    config = QuantizationConfig(weight_widths=(2, 3, 4, 8), layers=tuple(scope), min_weight_bits=3)
    run = MixDQRun(image_metric=SSIM, progress=False, work_dir=tmp_path)
    plan, _, _ = mixdq_plan(pipe, parse_bits("w3.5a16"), PROMPTS, SETTINGS, None, config, run)
    assert {p.weight_bits for p in plan.layers.values()} <= {3, 4, 8}
    low, _, result = mixdq_plan(pipe, parse_bits("w2.5a16"), PROMPTS, SETTINGS, None, config, run)
    assert result.average_weight_bits <= 2.5 + 1e-9 and 2 in {p.weight_bits for p in low.layers.values()}
    # a floor above every candidate within the budget drops to the widest of them
    top, _, _ = mixdq_plan(pipe, parse_bits("w8a16"), PROMPTS, SETTINGS, None,
                           replace(config, weight_widths=(2, 3, 4), min_weight_bits=8), run)
    assert {p.weight_bits for p in top.layers.values()} == {4}


def test_in_context_sensitivity_probes_around_the_operating_point(pipe):
    """With every layer of the scope at 4-bit weights and 8-bit activations, probing any layer at its own
    context widths leaves the operating point unchanged: every layer must report the same score there,
    the score of the uniform model itself. The model comes back with its FP modules."""
    from calibrate.calibration import collect_activation_ranges

    scope = ["single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
             "transformer_blocks.0.attn.to_q"]
    names = sorted(scope)
    ranges = collect_activation_ranges(pipe, PROMPTS, SETTINGS, progress=False)
    modules = dict(pipe.transformer.named_modules())
    context = {n: (4, 8) for n in names}
    table = analyze_sensitivity(pipe, PROMPTS, SETTINGS, weight_widths=(2, 4), act_widths=(8,), act_ranges=ranges,
                                layers=names, groups={"*": "quality"}, context=context, progress=False)
    assert dict(pipe.transformer.named_modules()) == modules
    at_context = {table.layers[n].weight[4] for n in names} | {table.layers[n].act[8] for n in names}
    assert len({round(v, 9) for v in at_context}) == 1
    fp_context = analyze_sensitivity(pipe, PROMPTS, SETTINGS, weight_widths=(2, 4), act_widths=(8,),
                                     act_ranges=ranges, layers=names, groups={"*": "quality"}, progress=False)
    # around FP each layer's 4-bit score is its own, and better than the whole uniform model's
    assert all(fp_context.layers[n].weight[4] > table.layers[n].weight[4] for n in names)
    assert table.layers[names[0]].weight[2] < table.layers[names[0]].weight[4]
    with pytest.raises(QschedError, match="no range"):
        analyze_sensitivity(pipe, PROMPTS, SETTINGS, weight_widths=(4,), act_widths=(), layers=names[:1],
                            context={names[1]: (4, 8)}, progress=False, image_metric=SSIM)


def test_block_prefix_skips_earlier_blocks_and_changes_no_score(pipe):
    """A quality probe skips the blocks that finish before its layer first runs (none for an embedder, all for
    proj_out); every score equals replaying the whole denoiser bit for bit, with FP around the probed layer and
    with a quantized context (whose blocks are recorded as the probes see them), and the model comes back
    with its own modules and forwards."""
    from calibrate.calibration import collect_activation_ranges
    from calibrate.sensitivity import LayerAnalysis

    names = ["x_embedder", "transformer_blocks.1.attn.to_q", "single_transformer_blocks.2.proj_out", "proj_out"]
    groups = {"*": "quality"}
    ranges = collect_activation_ranges(pipe, PROMPTS, SETTINGS, progress=False)
    modules = dict(pipe.transformer.named_modules())
    for context in (None, {"transformer_blocks.0.attn.to_k": (4, 8), "single_transformer_blocks.1.proj_mlp": (4, 8)}):
        kwargs = dict(weight_widths=(2, 4), act_widths=(8,), act_ranges=ranges, layers=names, groups=groups,
                      context=context, progress=False)
        fast = analyze_sensitivity(pipe, PROMPTS, SETTINGS, **kwargs)
        whole = analyze_sensitivity(pipe, PROMPTS, SETTINGS, record_bytes=0, **kwargs)
        assert fast.to_dict()["layers"] == whole.to_dict()["layers"]
    assert dict(pipe.transformer.named_modules()) == modules
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())

    run = LayerAnalysis(pipe, PROMPTS, SETTINGS, names, groups, (4,), (), ranges, None, 0, len(PROMPTS), 0.95, SSIM)
    prefix = run.probe.prefix
    blocks = len(prefix.blocks)  # 2 double + 4 single blocks
    assert prefix.skipped("x_embedder") == 0.0 and prefix.skipped("proj_out") == 1.0
    assert prefix.skipped("transformer_blocks.1.attn.to_q") == pytest.approx(1 / blocks)
    assert prefix.skipped("single_transformer_blocks.2.proj_out") == pytest.approx(4 / blocks)

    # a record budget keeps the blocks that finish first: here two, so no probe skips more than two
    two = len(run.ref.calls) * sum(t.numel() * t.element_size() for out in prefix.outputs[0][:2]
                                    for t in (out if isinstance(out, tuple) else (out,)))
    bounded = LayerAnalysis(pipe, PROMPTS, SETTINGS, names, groups, (4,), (), ranges, None, 0, len(PROMPTS), 0.95,
                            SSIM, record_bytes=two).probe.prefix
    assert bounded.depth == 2 and all(len(o) == 2 for o in bounded.outputs)
    assert bounded.skipped("proj_out") == pytest.approx(2 / blocks)
    assert bounded.skipped("transformer_blocks.1.attn.to_q") == pytest.approx(1 / blocks)
    limited = analyze_sensitivity(pipe, PROMPTS, SETTINGS, record_bytes=two, **kwargs)
    assert limited.to_dict()["layers"] == whole.to_dict()["layers"]
