"""GPTQ rounding: exact RTN without input information, smaller output error with it, same code layout, and
its way through calibration, the plan and the quantized layer."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from calibrate.calibration import calibrate
from calibrate.gptq import SharedInputs, collect_hessians, gptq_quantize, hessian_chunks
from qsched.runtime.qlayers import QuantLayer
from qsched.runtime.generation import generate
from qsched.runtime.quantizers import dequantize_weight, quantize_weight, weight_qmax
from qsched.core.bits import parse_bits
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline

from conftest import TEST_WORDS
from qsched.recipe import QuantizationConfig
from qsched.core.errors import RecipeError


def _inputs(rows=512, features=48, seed=0):
    """Correlated inputs with unequal scales, as a layer's activations are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features ** 0.5
    return (torch.randn(rows, features, generator=gen) * torch.linspace(0.2, 3.0, features)) @ mix


@pytest.mark.parametrize("group_size", [None, 16])
def test_zero_information_is_round_to_nearest(group_size):
    weight = torch.randn(12, 48, generator=torch.Generator().manual_seed(1))
    codes, scale = gptq_quantize(weight, torch.eye(48) * 0.0, 3, group_size)
    ref_codes, ref_scale = quantize_weight(weight, 3, group_size)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_output_error_shrinks_against_round_to_nearest(bits):
    x = _inputs()
    weight = torch.randn(16, 48, generator=torch.Generator().manual_seed(2)) * 0.1
    h = x.T @ x / x.shape[0]
    codes, scale = gptq_quantize(weight, h, bits)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= weight_qmax(bits)
    rtn = dequantize_weight(*quantize_weight(weight, bits), torch.float32)
    gptq = dequantize_weight(codes, scale, torch.float32)
    err = lambda w: float(((x @ (w - weight).T) ** 2).mean())  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn)


def test_hessians_are_the_mean_input_outer_product_and_chunk_by_memory():
    layers = {"a": nn.Linear(8, 4), "b": nn.Linear(16, 4), "c": nn.Conv2d(2, 2, 1)}
    x = torch.randn(3, 5, 8)
    with SharedInputs(layers) as obs:
        layers["a"](x)
        layers["a"](x[:1])
    hessians = obs.hessians()
    assert set(hessians) == {"a"}  # b never ran, c is a convolution
    flat = torch.cat([x.reshape(-1, 8), x[:1].reshape(-1, 8)])
    torch.testing.assert_close(hessians["a"], flat.T @ flat / flat.shape[0])
    assert [list(c) for c in hessian_chunks(layers, 4 * 16 * 16)] == [["a"], ["b"]]
    assert [list(c) for c in hessian_chunks(layers, 1 << 20)] == [["a", "b"]]


def _attention_like(layers, batch):
    y = layers["q"](batch)
    layers["k"](batch)
    layers["v"](batch)
    layers["o"](y)


def test_layers_fed_one_tensor_share_one_hessian_equal_to_their_own():
    torch.manual_seed(0)
    layers = {"q": nn.Linear(8, 4), "k": nn.Linear(8, 4), "v": nn.Linear(8, 4), "o": nn.Linear(4, 8)}
    batches = [torch.randn(2, 5, 8), torch.randn(3, 5, 8)]
    with SharedInputs(layers) as shared, torch.no_grad():
        for b in batches:
            _attention_like(layers, b)
    with SharedInputs(layers, share=False) as plain, torch.no_grad():
        for b in batches:
            _attention_like(layers, b)
    assert shared.consistent and shared.groups() == {"q": ["q", "k", "v"]} and plain.groups() == {}
    got, want = shared.hessians(), plain.hessians()
    assert got["q"] is got["k"] is got["v"] and got["o"] is not got["q"]
    for name in layers:
        torch.testing.assert_close(got[name], want[name])
    # a member that later reads another tensor breaks the sharing, and says so
    with SharedInputs(layers) as broken, torch.no_grad():
        x = torch.randn(2, 5, 8)
        layers["q"](x), layers["k"](x)
        layers["q"](x), layers["k"](x.clone())
    assert not broken.consistent


def test_collected_hessians_of_a_flux_model_share_the_qkv_inputs():
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(0, TEST_WORDS)
    pipe.transformer.eval()
    settings = replace(TINY_SETTINGS, steps=1)
    prompts = ["a red circle on the left"]
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)}
    got = collect_hessians(pipe, layers, prompts, settings)
    with SharedInputs(layers, share=False) as plain:
        generate(pipe, prompts, settings)
    want = plain.hessians()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    block = "transformer_blocks.0.attn"
    assert got[f"{block}.to_q"] is got[f"{block}.to_k"] is got[f"{block}.to_v"]
    assert got[f"{block}.add_q_proj"] is got[f"{block}.add_v_proj"] is not got[f"{block}.to_q"]
    single = "single_transformer_blocks.0"
    assert got[f"{single}.proj_mlp"] is got[f"{single}.attn.to_q"]
    assert len({id(h) for h in got.values()}) < len(got)


def test_calibrate_with_gptq_marks_the_plan_and_uses_its_codes():
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(0, TEST_WORDS)
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    settings = replace(TINY_SETTINGS, steps=2)
    prompts = ["a red circle on the left", "a blue square above the green triangle"]
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)}
    name = "single_transformer_blocks.0.proj_out"
    weight = pipe.transformer.get_submodule(name).weight.detach().clone()
    hessian = collect_hessians(pipe, {name: layers[name]}, prompts, settings, batch_size=8)[name]
    # the Hessians ride on the statistics pass: GPTQ makes no denoiser call more than round-to-nearest
    rtn_pipe, calls = build_tiny_pipeline(0, TEST_WORDS), {"rtn": 0, "gptq": 0}
    hooks = [p.transformer.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
             for p, k in ((rtn_pipe, "rtn"), (pipe, "gptq"))]
    try:
        calibrate(rtn_pipe, parse_bits("w3a8"), prompts, settings, QuantizationConfig(method="uniform", rounding="rtn"),
                  progress=False)
        result = calibrate(pipe, parse_bits("w3a8"), prompts, settings,
                           QuantizationConfig(method="uniform", rounding="gptq"), progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["gptq"] == calls["rtn"] > 0
    plan = result.plan.layers[name]
    assert plan.rounding == "gptq" and "GPTQ" in plan.reason
    assert result.plan.to_dict()["layers"][name]["rounding"] == "gptq"
    layer = pipe.transformer.get_submodule(name)
    assert isinstance(layer, QuantLayer)
    expected, _ = gptq_quantize(weight, hessian, 3)
    assert torch.equal(layer.qweight, expected)
    assert not torch.equal(layer.qweight, quantize_weight(weight, 3)[0])
    with pytest.raises(RecipeError, match="quantization.rounding must be rtn or gptq"):
        QuantizationConfig(rounding="awq")


def test_eight_bit_weights_keep_round_to_nearest():
    from qsched.core.bitplan import BitPlan, LayerPlan
    from calibrate.calibration import gptq_weights

    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    plan = BitPlan(layers={"0": LayerPlan(8, None, params=128), "1": LayerPlan(4, None, params=32)})
    x = _inputs(64, 16)
    hessians = {"0": x.T @ x / 64, "1": torch.eye(8)}
    weights = gptq_weights(model, plan, hessians)
    assert set(weights) == {"1"}
    assert plan.layers["0"].rounding == "rtn" and plan.layers["1"].rounding == "gptq"


def test_width_floor_is_automatic_by_rounding():
    from calibrate.mixdq import width_floor

    assert width_floor(None, "rtn") == 3 and width_floor(None, "gptq") is None
    assert width_floor(4, "gptq") == 4 and width_floor(2, "rtn") == 2


def test_only_layers_that_may_be_quantized_get_a_hessian():
    from calibrate.calibration import _rounded_layers

    layers = {"a.to_q": nn.Linear(4, 4), "a.to_k": nn.Linear(4, 4), "b.proj": nn.Linear(4, 4)}
    assert set(_rounded_layers(layers, None, None)) == set(layers)
    assert set(_rounded_layers(layers, ["*.to_k"], None)) == {"a.to_q", "b.proj"}
    assert set(_rounded_layers(layers, ["*.to_k"], ["a.*"])) == {"a.to_q"}
