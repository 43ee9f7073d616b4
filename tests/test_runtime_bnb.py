"""bitsandbytes runtime: layers built from artifact codes agree with the simulation as far as bnb allows.

Tolerances (max |bnb - simulated| / max |simulated|, fp32, weight-only reference):
* int8, training mode (bnb dequantizes + FP matmul): the artifact's codes are reused, so < 1e-5.
* int8, eval mode (LLM.int8(): activations quantized per row at run time): < 5e-2.
* nf4 / fp4: a second quantization onto a grid that cannot hold int4's levels: < 0.3, and still far closer
  than a zero output (the layer computes the right function, coarsely).
"""
import math

import pytest
import torch
from torch import nn

from qsched.runtime.qlayers import QuantLayer
from qsched.runtime.quantizers import quantize_weight
from export.runtime_torch import NativeDequantLayer
from qsched.core.errors import QschedError

bnb_runtime = pytest.importorskip("export.runtime_bnb")
try:
    bnb = bnb_runtime.require_bitsandbytes("cpu")
except QschedError as exc:  # not installed, or its kernels do not run here
    pytest.skip(f"bitsandbytes runtime unavailable: {exc}", allow_module_level=True)


def quant_layer(shape=(64, 128), weight_bits=8, act_bits=None, group_size=None, seed=0):
    """A QuantLayer quantized from random FP weights (so each row's absmax sits on the top code, as in real use)."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLayer("linear", shape, weight_bits, act_bits, group_size)
    with torch.no_grad():
        codes, scale = quantize_weight(torch.randn(shape, generator=gen) * 0.05, weight_bits, group_size)
        layer.qweight.copy_(codes)
        layer.weight_scale.copy_(scale)
        layer.bias.copy_(torch.randn(shape[0], generator=gen) * 0.1)
        if act_bits is not None:
            layer.act_scale.fill_(0.05)
            layer.act_zero_point.fill_(40)
    return layer


def weight_only_reference(layer, x):
    return torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_int8_layer_reuses_artifact_codes_exactly():
    sim = quant_layer()
    layer = bnb_runtime.bnb_layer(sim)
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight.data, sim.qweight)
    x = torch.randn(3, 20, 128)
    with torch.no_grad():
        assert rel_err(layer.train()(x), sim(x)) < 1e-5  # bnb's CPU train path: dequantize + FP matmul
        assert rel_err(layer.eval()(x), sim(x)) < 5e-2  # LLM.int8(): dynamic per-row activation quantization


def test_grouped_int8_is_requantized_per_row():
    sim = quant_layer(group_size=32)
    layer = bnb_runtime.bnb_layer(sim).eval()
    x = torch.randn(20, 128)
    with torch.no_grad():
        assert rel_err(layer(x), sim(x)) < 5e-2


@pytest.mark.parametrize("four_bit", ["nf4", "fp4"])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_four_bit_layer_requantizes_coarsely(four_bit, act_bits):
    sim = quant_layer(weight_bits=4, act_bits=act_bits)
    layer = bnb_runtime.bnb_layer(sim, four_bit=four_bit).eval()
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == math.ceil(sim.qweight.numel() / 2)
    x = torch.randn(20, 128)
    with torch.no_grad():
        got, expected = layer(x), weight_only_reference(sim, x)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 0.3
    assert (got - expected).norm() < 0.5 * expected.norm()


def test_four_bit_with_ragged_rows_falls_back_on_cpu():
    """bnb 0.50.2's CPU 4-bit dequantize is wrong when in_features % blocksize != 0: we do not use it there."""
    sim = quant_layer(shape=(64, 96), weight_bits=4)
    layer = bnb_runtime.bnb_layer(sim)
    assert isinstance(layer, NativeDequantLayer)
    x = torch.randn(5, 96)
    with torch.no_grad():
        assert torch.equal(layer(x), sim(x))


def test_conv_and_fp_layers_use_the_native_dequant_layer():
    conv = QuantLayer("conv2d", (8, 4, 3, 3), 8, None, conv_args={"padding": (1, 1)})
    with torch.no_grad():
        conv.qweight.copy_(torch.randint(-127, 128, conv.qweight.shape, dtype=torch.int8))
        conv.weight_scale.fill_(0.001)
        conv.bias.zero_()
    assert isinstance(bnb_runtime.bnb_layer(conv), NativeDequantLayer)


def test_to_bnb_replaces_every_quantlayer():
    model = nn.Sequential(quant_layer(shape=(128, 128)), nn.GELU(), quant_layer(shape=(32, 128), weight_bits=4, seed=1))
    model.eval()
    x = torch.randn(6, 128)
    with torch.no_grad():
        expected = model(x)
        counts = bnb_runtime.to_bnb_(model)
        got = model(x)
    assert counts == {"Linear8bitLt": 1, "Linear4bit": 1}
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    assert all(not m.training for m in model.modules())
    assert (got - expected).norm() < 0.3 * expected.norm()


def test_unknown_four_bit_type_is_refused():
    with pytest.raises(QschedError, match="4-bit type"):
        bnb_runtime.bnb_layer(quant_layer(weight_bits=4), four_bit="int4")


def test_tiny_artifact_runs_on_bnb(tiny_pipeline_dir, tmp_path):
    """A whole compiled W8A8 artifact generates with bnb int8 layers, close to the simulated images."""
    import qsched
    import export
    from qsched.runtime.generation import GenerationSettings, generate

    art = qsched.compile(str(tiny_pipeline_dir), "w8a8", out=tmp_path / "art", eval_prompts=0, progress=False,
                         uniform=True, coefficients=False, cache_search=False,
                         recipe=qsched.recipe.Recipe(calibration=qsched.recipe.CalibrationConfig(prompts=2, batch_size=2),
                                              report=qsched.recipe.ReportConfig(samples=0)))
    settings = GenerationSettings(**art.manifest["generation"])
    prompts = ["a red circle on the left", "a green square"]
    expected = generate(export.load(art.path), prompts, settings, seed=2, batch_size=2)
    pipe = export.load(art.path)
    counts = bnb_runtime.to_bnb_(pipe.transformer)
    assert counts.get("Linear8bitLt", 0) > 0
    got = generate(pipe, prompts, settings, seed=2, batch_size=2)
    assert torch.isfinite(got).all()
    mse = ((got - expected) ** 2).mean().item()
    assert 10 * math.log10(1.0 / max(mse, 1e-12)) > 25  # weight-only + dynamic int8, not the calibrated static A8


def test_four_bit_with_out_features_not_multiple_of_32_runs_in_eval():
    """bnb's fused AVX512-BF16 CPU kernel asserts N % 32 == 0; such layers use bnb's dequantize path instead."""
    sim = quant_layer(shape=(48, 128), weight_bits=4)
    layer = bnb_runtime.bnb_layer(sim).eval()
    assert isinstance(layer, bnb.nn.Linear4bit)
    x = torch.randn(7, 128)
    with torch.no_grad():
        assert rel_err(layer(x), weight_only_reference(sim, x)) < 0.3
