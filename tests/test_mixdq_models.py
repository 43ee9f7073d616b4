"""MixDQ end to end beyond FLUX: a tiny random SDXL-architecture UNet (convolutions, two causal CLIP encoders
whose sequences start with BOS) and a tiny random PixArt transformer (T5: no BOS), plus the BOS-aware
cross-attention mechanism on its own. Sensitivity (SSIM and SQNR), allocation, BitPlan, ``quantize_``,
generation and the artifact round trip all run; 2 sampler steps, one thread."""
from dataclasses import replace

import pytest
import torch

from calibrate.calibration import calibrate, collect_statistics
from calibrate.fp_tokens import FPTokens
from qsched.runtime.qlayers import QuantLayer
from qsched.models.adapters import adapter_for
from qsched.core.bits import parse_bits
from qsched.runtime.generation import generate
from qsched.models.tiny_pipelines import (TINY_PIXART_SETTINGS, TINY_SDXL_SETTINGS, build_tiny_pixart_pipeline,
                                   build_tiny_sdxl_pipeline)
from qsched.metrics import ssim

from conftest import TEST_WORDS
from qsched.recipe import CalibrationConfig, QuantizationConfig
from calibrate.mixdq_run import MixDQRun

PROMPTS = ["a red circle on the left", "a blue square above the green triangle", "a green triangle below",
           "a red square on the right"]
MIXDQ = QuantizationConfig(sensitivity_prompts=2, weight_widths=(2, 4, 8), act_widths=(8,), rounding="gptq")
MIXDQ_RUN = MixDQRun(image_metric=ssim)
UNIFORM = QuantizationConfig(method="uniform", rounding="rtn")
BATCH_4 = CalibrationConfig(batch_size=4)
# The UNet's sensitivity is measured on part of the model (the budget then applies to that part): the
# stem and head convolutions and a whole cross-attention down block (resnet convs, attn1, attn2, ff).
UNET_SCOPE = ["conv_in", "conv_out", "down_blocks.1.*"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _bos_layers(denoiser):
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, QuantLayer) and m.fp_token_positions}


def _round_trip(pipe, attr, plan, settings, tmp_path):
    """Save the quantized pipeline (bundled), load it back, and check it samples the very same images."""
    import export
    from export.save import save_quantized

    path = save_quantized(tmp_path / "art", pipe, attr, plan, {"source": {"kind": "test"}}, bundle=True)
    loaded = export.load(path)
    assert torch.equal(generate(loaded, PROMPTS[:2], settings, seed=3), generate(pipe, PROMPTS[:2], settings, seed=3))
    return loaded


def test_clip_bos_row_is_the_same_for_every_prompt():
    """Why BOS rows can be precomputed: causal CLIP's position 0 sees only itself. T5 is bidirectional,
    so even with a BOS token its first row depends on the prompt, and calibration refuses it."""
    sdxl = build_tiny_sdxl_pipeline(0, TEST_WORDS)
    embeds = sdxl.encode_prompt(PROMPTS + ["blue"], do_classifier_free_guidance=False)[0]  # [5, T, 64]
    assert torch.equal(embeds[:, 0], embeds[:1, 0].expand_as(embeds[:, 0]))
    assert not torch.allclose(embeds[0, 1:], embeds[1, 1:])

    from qsched.tinyworld.model import build_tokenizer
    pixart = build_tiny_pixart_pipeline(0, TEST_WORDS)
    assert adapter_for(pixart).bos_layers(pixart) == {}  # T5 tokenizer: no BOS, no candidates
    pixart.tokenizer = build_tokenizer(TEST_WORDS, with_bos=True)
    candidates = adapter_for(pixart).bos_layers(pixart)
    assert "caption_projection.linear_1" in candidates and "transformer_blocks.0.attn2.to_k" in candidates
    _, fp_tokens, report = collect_statistics(pixart, PROMPTS, TINY_PIXART_SETTINGS, progress=False,
                                              fp_token_candidates=candidates)
    assert fp_tokens == {} and set(report.rejected) == set(candidates)
    assert all("varies across prompts" in why for why in report.rejected.values())


def test_fp_rows_replace_only_rows_that_match_the_stored_bos():
    """SDXL zeroes the unconditional embedding under guidance: such a row keeps the quantized result."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    bos = torch.randn(1, 8) * 50
    rows = FPTokens((0,), bos, linear(bos).detach())
    layer = QuantLayer.from_module(linear, 4, 8, (-3.0, 3.0), None, rows)
    x = torch.randn(2, 5, 8)
    x[0, 0] = 0.0
    x[1, 0] = bos[0]
    plain = QuantLayer.from_module(linear, 4, 8, (-3.0, 3.0))
    out, reference = layer(x), plain(x)
    assert torch.equal(out[1, 0], rows.outputs[0])              # the BOS row comes out in FP
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1, 1:], reference[1, 1:])


def test_bos_outlier_is_left_out_of_the_range_and_served_in_fp():
    """A BOS outlier (as trained CLIP has; made here by scaling position 0's embedding) sets a naive
    per-tensor range; BOS-aware calibration leaves it out, so every other token is quantized far more
    finely and the BOS row itself comes out exact."""
    import copy

    from calibrate.sensitivity import sqnr_db

    pipe = build_tiny_sdxl_pipeline(0, TEST_WORDS)
    with torch.no_grad():
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            position = next(m for n, m in encoder.named_modules() if n.endswith("position_embedding"))
            position.weight[0] *= 200
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    embeds = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[0]
    fp_unet = pipe.unet
    with torch.no_grad():
        keys = fp_unet.get_submodule(name)(embeds)
    reference = generate(pipe, PROMPTS, TINY_SDXL_SETTINGS)
    width, key_sqnr, errors = {}, {}, {}
    for aware in (False, True):
        pipe.unet = copy.deepcopy(fp_unet)
        result = calibrate(pipe, parse_bits("w8a8"), PROMPTS, TINY_SDXL_SETTINGS, replace(UNIFORM, bos_aware=aware),
                           calibration=BATCH_4, progress=False)
        layers = _bos_layers(pipe.unet)
        assert len(layers) == (8 if aware else 0)  # attn2.to_k/to_v of the 4 cross-attention blocks
        if aware:
            assert set(result.fp_tokens.applied) == set(layers) and not result.fp_tokens.rejected
        lo, hi = result.act_ranges[name]
        width[aware] = hi - lo
        with torch.no_grad():
            quantized = pipe.unet.get_submodule(name)(embeds)
        key_sqnr[aware] = sqnr_db(keys[:, 1:], quantized[:, 1:])
        if aware:
            assert torch.equal(quantized[:, 0], layers[name].fp_token_outputs.expand(len(PROMPTS), -1))
        errors[aware] = float((generate(pipe, PROMPTS, TINY_SDXL_SETTINGS) - reference).pow(2).mean())
    assert width[True] < width[False] / 4
    assert key_sqnr[True] > key_sqnr[False] + 10           # ~20·log10 of the range ratio
    assert errors[True] <= errors[False]


def test_sdxl_unet_mixdq_end_to_end(tmp_path):
    pipe = build_tiny_sdxl_pipeline(0, TEST_WORDS)
    spec = parse_bits("w4.5a8")
    result = calibrate(pipe, spec, PROMPTS, TINY_SDXL_SETTINGS, replace(MIXDQ, layers=tuple(UNET_SCOPE)),
                       calibration=BATCH_4, run=MIXDQ_RUN, progress=False)
    plan, table = result.plan, result.sensitivity
    assert {entry["metric"] for entry in table["layers"].values()} == {"ssim", "sqnr"}
    assert result.allocation["status"] == "Optimal"
    assert abs(plan.average_weight_bits() - 4.5) <= 0.02 + 1e-9
    assert set(plan.layers) == set(table["layers"])

    convs = [n for n, m in pipe.unet.named_modules() if isinstance(m, QuantLayer) and m.kind == "conv2d"]
    assert {"conv_in", "conv_out", "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut"} <= set(convs)
    assert all(plan.layers[n].weight_bits in (2, 4, 8) for n in convs)
    # GPTQ rounds the linear layers of at most 6 bits; convolutions and 8-bit weights keep round-to-nearest
    for n, m in pipe.unet.named_modules():
        if isinstance(m, QuantLayer) and m.weight_bits is not None:
            gptq = m.kind == "linear" and m.weight_bits <= 6
            assert plan.layers[n].rounding == ("gptq" if gptq else "rtn"), n
    assert any(p.rounding == "gptq" for p in plan.layers.values())

    bos = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
           "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"}
    assert set(_bos_layers(pipe.unet)) == bos
    assert all(plan.layers[n].fp_tokens == [0] and "BOS" in plan.layers[n].reason for n in bos)
    images = generate(pipe, PROMPTS, TINY_SDXL_SETTINGS)
    assert torch.isfinite(images).all()

    loaded = _round_trip(pipe, "unet", plan, TINY_SDXL_SETTINGS, tmp_path)
    specs = loaded.qsched_manifest["layers"]
    assert all(specs[n]["fp_tokens"] == [0] for n in bos)
    for n in bos:
        assert torch.equal(loaded.unet.get_submodule(n).fp_token_outputs, pipe.unet.get_submodule(n).fp_token_outputs)
    # the deployment runtime serves the same FP rows around its integer layers
    from qsched.runtime.qlayers import FPTokenRows
    from export.runtime_torch import to_native_
    to_native_(loaded.unet)
    assert {n for n, m in loaded.unet.named_modules() if isinstance(m, FPTokenRows)} == bos
    native = generate(loaded, PROMPTS[:2], TINY_SDXL_SETTINGS, seed=3)
    assert (native - generate(pipe, PROMPTS[:2], TINY_SDXL_SETTINGS, seed=3)).abs().max() < 0.02


def test_pixart_mixdq_end_to_end(tmp_path):
    pipe = build_tiny_pixart_pipeline(0, TEST_WORDS)
    settings = TINY_PIXART_SETTINGS
    result = calibrate(pipe, parse_bits("w4.5a8"), PROMPTS, settings, MIXDQ, calibration=BATCH_4, run=MIXDQ_RUN,
                       progress=False)
    plan = result.plan
    metrics = {entry["metric"] for entry in result.sensitivity["layers"].values()}
    assert metrics == {"ssim", "sqnr"} and result.allocation["status"] == "Optimal"
    assert abs(plan.average_weight_bits() - 4.5) <= 0.02 + 1e-9
    assert set(plan.layers) == set(adapter_for(pipe).quantizable_layers(pipe.transformer))
    patch = pipe.transformer.get_submodule("pos_embed.proj")  # the patch embedding is PixArt's one conv
    assert isinstance(patch, QuantLayer) and patch.kind == "conv2d" and plan.layers["pos_embed.proj"].weight_bits
    assert plan.layers["pos_embed.proj"].rounding == "rtn" and any(p.rounding == "gptq" for p in plan.layers.values())
    # T5 puts no BOS first: nothing is served in FP, and the calibration says why
    assert _bos_layers(pipe.transformer) == {} and not any(p.fp_tokens for p in plan.layers.values())
    assert "no BOS" in result.fp_tokens.note
    assert torch.isfinite(generate(pipe, PROMPTS, settings)).all()
    _round_trip(pipe, "transformer", plan, settings, tmp_path)
