"""MixDQ's per-layer choice between FP8 (e4m3 W8A8) and floating point, ``--bits fp8`` without ``--uniform``:
the one-probe-per-layer sensitivity table, the integer program under ``quantization.fp8_budget_bits`` and
the compiled artifact (a tiny random FLUX pipeline, 2 prompts, 2 steps)."""
import json
from dataclasses import replace

import pytest
import torch

import export
import qsched
from calibrate.allocation import allocate, allocation_plan, follow_weights
from calibrate.sensitivity import SensitivityTable, _cache_key, analyze_sensitivity
from qsched.core.errors import QschedError, RecipeError
from qsched.metrics import ssim as SSIM
from qsched.recipe import QuantizationConfig, parse_recipe
from qsched.runtime.generation import GenerationSettings, generate
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline

from conftest import TEST_WORDS

PROMPTS = ["a red circle on the left", "a blue square above the green triangle"]
SETTINGS = replace(TINY_SETTINGS, steps=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table():
    return analyze_sensitivity(build_tiny_pipeline(0, TEST_WORDS), PROMPTS, SETTINGS, weight_widths=(8,), act_widths=(),
                               format="fp8", image_metric=SSIM, progress=False)


def test_the_fp8_table_has_one_w8a8_probe_per_layer(table):
    assert table.format == "fp8" and len(table.layers) == 60 and table.stats["evaluations"] == 60
    assert all(set(l.weight) == {8} and not l.act for l in table.layers.values())
    assert {l.metric for l in table.layers.values()} == {"ssim", "sqnr"}
    assert all(0 < l.weight[8] <= 1 for l in table.layers.values() if l.metric == "ssim")
    assert all(10 < l.weight[8] < 150 for l in table.layers.values() if l.metric == "sqnr")  # lossy, not broken
    back = SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert back.format == "fp8" and back.layers == table.layers
    with pytest.raises(QschedError, match="FP8 W8A8 only"):
        analyze_sensitivity(None, PROMPTS, SETTINGS, weight_widths=(4, 8), format="fp8")


def test_the_format_is_in_the_cache_key_only_when_fp8():
    args = ("digest", PROMPTS, [8], [], GenerationSettings(), 0, 2, None, {}, None, 0.95, None)
    assert _cache_key(*args) == _cache_key(*args, format="int") != _cache_key(*args, format="fp8")


@pytest.mark.parametrize("budget", [9.0, 11.0])
def test_a_budget_above_8_keeps_the_most_sensitive_layers_fp(table, budget):
    result = follow_weights(allocate(table, budget, None, weight_widths=[8, None]), table)
    assert result.status == "Optimal" and result.average_weight_bits <= budget + 1e-9
    fp = {n for n, w in result.weight_bits.items() if w is None}
    assert fp and len(fp) < len(table.layers) and set(result.weight_bits.values()) == {8, None}
    assert result.act_bits == result.weight_bits and result.average_act_bits == 8.0  # activations follow
    plan = allocation_plan(result, table, target="fp8", method="mixdq-fp8")
    for name, lp in plan.layers.items():
        expected = ((None, None, "int") if name in fp else (8, 8, "fp8"))
        assert (lp.weight_bits, lp.act_bits, lp.format) == expected and lp.reason.startswith("ILP: fp")
    # the worst-scoring quality layer stays FP: FP is lossless, so the program spends bits on the worst first
    quality = {n: l.weight[8] for n, l in table.layers.items() if l.metric == "sqnr"}
    assert min(quality, key=quality.get) in fp


def test_a_budget_of_8_puts_every_layer_at_fp8(table):
    result = allocate(table, 8.0, None, weight_widths=[8, None])
    assert result.status == "Optimal" and set(result.weight_bits.values()) == {8}


def test_the_budget_is_a_validated_recipe_key():
    assert QuantizationConfig().fp8_budget_bits == 9.0
    assert QuantizationConfig(fp8_budget_bits=12).fp8_budget_bits == 12.0
    for bad in (7.5, 16.5, float("nan")):
        with pytest.raises(RecipeError, match="fp8_budget_bits must lie in"):
            QuantizationConfig(fp8_budget_bits=bad)


@pytest.fixture(scope="module")
def fp8_mixdq_artifact(tmp_path_factory):
    recipe = parse_recipe({"calibration": {"prompts": 2, "batch_size": 2},
                           "quantization": {"sensitivity_prompts": 2, "fp8_budget_bits": 10.0},
                           "generation": {"steps": 2},
                           "coefficients": {"enabled": False}, "cache_search": {"enabled": False},
                           "report": {"samples": 0}})
    out = tmp_path_factory.mktemp("fp8-mixdq") / "flux-tiny-fp8"
    return qsched.compile("flux-tiny", "fp8", out=out, recipe=recipe, eval_prompts=0, progress=False)


def test_compile_fp8_without_uniform_mixes_fp8_and_fp_layers_and_loads(fp8_mixdq_artifact):
    manifest = fp8_mixdq_artifact.manifest
    plan = manifest["bit_plan"]
    assert manifest["bits"] == "fp8" and plan["method"] == "mixdq-fp8"
    formats = {n: (lp.get("weight_bits"), lp.get("act_bits"), lp.get("format", "int"))
               for n, lp in plan["layers"].items()}
    assert set(formats.values()) == {(8, 8, "fp8"), (None, None, "int")}
    assert not any(lp.get("rounding") == "gptq" for lp in plan["layers"].values())  # e4m3 is cast, never GPTQ
    params = {n: lp["params"] for n, lp in plan["layers"].items()}
    average = sum(params[n] * (16 if f[0] is None else 8) for n, f in formats.items()) / sum(params.values())
    assert 8 < average <= 10.0 + 1e-9
    pipe = export.load(fp8_mixdq_artifact.path)
    layers = {n: m for n, m in pipe.transformer.named_modules() if n in formats}
    assert {n for n, m in layers.items() if getattr(m, "format", "int") == "fp8"} == \
        {n for n, f in formats.items() if f[2] == "fp8"}
    settings = GenerationSettings(**manifest["generation"])
    images = generate(pipe, PROMPTS, settings, seed=3, batch_size=2)
    assert torch.isfinite(images).all() and images.std() > 0.01
    kinds = {type(m).__name__ for m in export.load(fp8_mixdq_artifact.path, runtime="native").transformer.modules()}
    assert "NativeFP8Linear" in kinds  # the FP8 layers take the native runtime's FP8 path


def test_unet_convolutions_stay_fp_outside_the_budget_and_no_hessians_are_collected():
    """A tiny SDXL UNet (convolutions; CLIP text layers served BOS-aware): only its linear layers are probed and
    decided, its convolutions stay FP, and ``rounding: gptq`` collects nothing for an fp8 compile."""
    from calibrate.calibration import calibrate
    from calibrate.mixdq_run import MixDQRun
    from calibrate.uniform import FP8_CONV_REASON
    from qsched.core.bits import parse_bits
    from qsched.models.tiny_pipelines import TINY_SDXL_SETTINGS, build_tiny_sdxl_pipeline
    from qsched.recipe import CalibrationConfig

    pipe = build_tiny_sdxl_pipeline(0, TEST_WORDS)
    config = QuantizationConfig(sensitivity_prompts=2, layers=("conv_in", "conv_out", "down_blocks.1.*"),
                                rounding="gptq", fp8_budget_bits=10.0)
    result = calibrate(pipe, parse_bits("fp8"), PROMPTS * 2, TINY_SDXL_SETTINGS, config,
                       calibration=CalibrationConfig(batch_size=4), run=MixDQRun(image_metric=SSIM), progress=False)
    plan, modules = result.plan, dict(pipe.unet.named_modules())
    convs = {n for n in plan.layers if isinstance(modules[n], torch.nn.Conv2d) or
             getattr(modules[n], "kind", None) == "conv2d"}
    assert {"conv_in", "conv_out"} <= convs and not convs & set(result.sensitivity["layers"])
    assert all(plan.layers[n].weight_bits is None and plan.layers[n].reason == FP8_CONV_REASON for n in convs)
    decided = {n: lp for n, lp in plan.layers.items() if n not in convs}
    assert set(decided) == set(result.sensitivity["layers"]) and result.allocation["status"] == "Optimal"
    assert {(lp.weight_bits, lp.act_bits, lp.format) for lp in decided.values()} == {(8, 8, "fp8"),
                                                                                    (None, None, "int")}
    average = sum(lp.params * (lp.weight_bits or 16) for lp in decided.values()) / sum(
        lp.params for lp in decided.values())
    assert 8 < average <= 10.0 + 1e-9 and plan.method == "mixdq-fp8"
    assert result.passes["gptq_hessians"] == 0 and all(lp.rounding == "rtn" for lp in plan.layers.values())
    assert generate(pipe, PROMPTS, TINY_SDXL_SETTINGS).std() > 0.01


def test_combinations_without_an_fp8_meaning_are_one_line_refusals(tmp_path):
    from qsched.compiler import plan_job
    from qsched.core.bits import parse_bits
    from qsched.core.errors import BitSpecError

    recipe = parse_recipe({"quantization": {"sensitivity_context": "uniform"}})
    with pytest.raises(QschedError, match="sensitivity_context: uniform has no FP8 form"):
        plan_job("flux-tiny", "fp8", tmp_path / "never", recipe)
    plan_job("flux-tiny", "fp8", tmp_path / "fine", recipe, uniform=True)  # uniform probes nothing
    with pytest.raises(QschedError, match="around FP"):
        analyze_sensitivity(None, PROMPTS, SETTINGS, weight_widths=(8,), act_widths=(), format="fp8",
                            context={"proj_out": (8, 8)})
    for text in ("fp8.5", "fp4", "w8a8fp8"):
        with pytest.raises(BitSpecError):
            parse_bits(text)


def test_the_planner_counts_one_probe_per_linear_layer_and_no_hessians():
    from qsched.planning import plan_compile

    plan = plan_compile("flux-schnell", "fp8", init="random", plan_device="h100")
    assert plan.methods["quantization"] == "mixdq" and plan.architecture["gptq_rounded_layers"] == 0
    assert plan.memory["hessians"]["groups"] == 0
    lines = {e.what: e for e in plan.evaluations if e.stage == "calibrate"}
    assert not any("Hessian" in what for what in lines)
    probes = [e for what, e in lines.items() if "probes" in what]
    layers = [int(e.formula.split(" layers")[0]) for e in probes]
    assert sum(layers) == 502 and all("× 1 probe (FP8 W8A8" in e.formula for e in probes)
    assert all(e.sample_rows == n * 8 * 4 for e, n in zip(probes, layers) if e.what.endswith("(content layers, SSIM)"))
