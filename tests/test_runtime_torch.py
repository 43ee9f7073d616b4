"""Native runtime layers agree with the simulated QuantLayer; W4 stays packed; whole artifacts generate the same.

Tolerances: the dequantize-on-the-fly path runs the simulation's own arithmetic, so it must match bit for
bit. The int8 matmul path computes the integer product exactly and differs only by fp32 rounding of the
rescale, so it must satisfy max|native - simulated| / max|simulated| < 1e-4 in fp32 (bf16: < 2e-2, the
simulation rounds its dequantized activations to bf16, the native path does not).
"""
import math

import pytest
import torch
from torch import nn

from calibrate.qlayers import QuantLayer
from calibrate.quantizers import activation_qparams, weight_qmax
from export.runtime_torch import (NativeDequantLayer, NativeInt8Linear, native_layer, to_native_,
                                  unpack_nibbles)
from export.packing import pack_int

ACT_RANGE = (-2.5, 9.0)  # post-GELU-like: skewed, so the zero point is far from 0 and 128


def random_layer(kind="linear", shape=(64, 96), weight_bits=8, act_bits=8, group_size=None, dtype=torch.float32,
                 conv_args=None, bias=True, seed=0):
    """A QuantLayer with random codes and scales (no source weights needed)."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLayer(kind, shape, weight_bits, act_bits, group_size, conv_args, bias, dtype)
    with torch.no_grad():
        if weight_bits is None:
            layer.weight.copy_(torch.randn(shape, generator=gen) * 0.05)
        else:
            qmax = weight_qmax(weight_bits)
            layer.qweight.copy_(torch.randint(-qmax, qmax + 1, shape, generator=gen, dtype=torch.int8))
            layer.weight_scale.copy_((torch.rand(layer.weight_scale.shape, generator=gen) + 0.5) * 0.08 / qmax)
        if bias:
            layer.bias.copy_(torch.randn(shape[0], generator=gen) * 0.1)
        if act_bits is not None:
            scale, zp = activation_qparams(*ACT_RANGE, act_bits)
            layer.act_scale.fill_(scale)
            layer.act_zero_point.fill_(zp)
    return layer


def activations(shape, dtype=torch.float32, seed=1):
    """Mostly inside the calibrated range, a few outliers beyond it (exercises clamping)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2.0 + 1.0
    x.view(-1)[::97] *= 4.0
    return x.to(dtype)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("weight_bits,act_bits,group_size,path", [
    (8, 8, None, "int8_mm"),        # W8A8
    (8, 8, 32, "int8_mm"),          # W8A8, grouped scales: one integer matmul per group
    (6, 8, None, "int8_mm"),        # 5-7 bit codes still fit int8
    (8, None, None, "dequant-int8"),  # W8A16
    (4, 8, None, "dequant-packed4"),  # W4A8
    (4, None, None, "dequant-packed4"),  # W4A16
    (4, 8, 32, "dequant-packed4"),
    (2, 8, None, "dequant-packed2"),
    (3, None, 16, "dequant-packed3"),
])
def test_linear_native_matches_simulated(weight_bits, act_bits, group_size, path):
    sim = random_layer(weight_bits=weight_bits, act_bits=act_bits, group_size=group_size)
    if act_bits is not None:
        assert int(sim.act_zero_point) not in (0, 128)  # the offset correction is really exercised
    native = native_layer(sim)
    assert native.path == path
    x = activations((3, 40, 96))
    with torch.no_grad():
        expected, got = sim(x), native(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if path == "int8_mm":
        assert rel_err(got, expected) < 1e-4
    else:
        assert torch.equal(got, expected)


def test_int8_codes_equal_simulation_codes():
    sim = random_layer()
    native = NativeInt8Linear(sim)
    x = activations((50, 96))
    scale, zp = float(sim.act_scale), int(sim.act_zero_point)
    expected = torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp
    got = native.quantize_input(x).int() + 128 - zp
    assert torch.equal(got.float(), expected)


def test_int8_path_single_row_and_unbiased_layer():
    sim = random_layer(shape=(24, 40), bias=False)
    native = native_layer(sim)
    assert isinstance(native, NativeInt8Linear)
    x = activations((1, 40))
    with torch.no_grad():
        assert rel_err(native(x), sim(x)) < 1e-4


def test_int8_path_bf16_within_bf16_rounding():
    sim = random_layer(dtype=torch.bfloat16)
    native = native_layer(sim)
    assert native.path == "int8_mm"
    x = activations((64, 96), dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = native(x), sim(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, expected) < 2e-2


def test_widths_not_multiple_of_8_take_the_dequant_path():
    sim = random_layer(shape=(20, 30))
    native = native_layer(sim)
    assert isinstance(native, NativeDequantLayer)
    x = activations((5, 30))
    with torch.no_grad():
        assert torch.equal(native(x), sim(x))


def test_int_mm_failure_falls_back_to_exact_integer_product(monkeypatch):
    sim = random_layer()
    native = native_layer(sim)
    x = activations((33, 96))
    with torch.no_grad():
        direct = native(x)

        def refuse(a, b):
            raise RuntimeError("no int8 matmul here")
        monkeypatch.setattr(torch, "_int_mm", refuse)
        assert torch.equal(native(x), direct)


@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, 8), (4, None), (8, None), (None, 8)])
def test_conv_native_matches_simulated(weight_bits, act_bits):
    conv_args = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    sim = random_layer("conv2d", (16, 8, 3, 3), weight_bits, act_bits, conv_args=conv_args)
    native = native_layer(sim)
    assert isinstance(native, NativeDequantLayer)
    x = activations((2, 8, 12, 12))
    with torch.no_grad():
        assert torch.equal(native(x), sim(x))


def test_w4_layer_keeps_weights_packed_in_memory():
    shape = (64, 97)  # odd element count: the last byte holds one padding nibble
    sim = random_layer(shape=shape, weight_bits=4, act_bits=8)
    native = native_layer(sim)
    numel = math.prod(shape)
    assert native.packed.dtype == torch.uint8
    assert native.packed.numel() == math.ceil(numel / 2)
    names = dict(native.named_buffers())
    assert "qweight" not in names and "weight" not in names
    big = [n for n, b in names.items() if b.numel() >= numel]
    assert big == []  # nothing of weight size besides the packed bytes (which are half of it)
    assert torch.equal(unpack_nibbles(native.packed, numel).reshape(shape), sim.qweight)
    assert torch.equal(native.packed, pack_int(sim.qweight, 4))  # the artifact's own layout
    state_bytes = sum(t.numel() * t.element_size() for t in native.state_dict().values())
    assert state_bytes < numel * 0.6


def test_to_native_replaces_every_quantlayer_and_reports_paths():
    model = nn.Sequential(random_layer(weight_bits=8, act_bits=8, shape=(96, 96)),
                          nn.GELU(),
                          random_layer(weight_bits=4, act_bits=None, shape=(32, 96), seed=3))
    x = activations((10, 96))
    with torch.no_grad():
        expected = model(x)
        counts = to_native_(model)
        got = model(x)
    assert counts == {"int8_mm": 1, "dequant-packed4": 1}
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    assert rel_err(got, expected) < 1e-4


def test_to_native_int_matmul_off_is_bit_exact():
    sim = random_layer()
    model = nn.Sequential(sim)
    x = activations((7, 96))
    with torch.no_grad():
        expected = model(x)
        assert to_native_(model, int_matmul=False) == {"dequant-int8": 1}
        assert torch.equal(model(x), expected)


def psnr(a, b):
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def compile_tiny(tiny_pipeline_dir, tmp_path_factory, bits):
    import qsched
    out = tmp_path_factory.mktemp("native-art") / f"tiny-{bits}"
    return qsched.compile(str(tiny_pipeline_dir), bits, out=out, eval_prompts=0, progress=False,
                          recipe=qsched.recipe.Recipe(calibration=qsched.recipe.CalibrationConfig(prompts=2, batch_size=2)))


@pytest.fixture(scope="module", params=["w8a8", "w4a8"])
def artifact(request, tiny_pipeline_dir, tmp_path_factory):
    return compile_tiny(tiny_pipeline_dir, tmp_path_factory, request.param)


def test_native_artifact_generates_like_simulated(artifact):
    """W8A8 runs the int8 matmul (PSNR > 40 dB vs simulation); W4A8 dequantizes packed nibbles (bit exact)."""
    import export
    from qsched.generation import GenerationSettings, generate

    prompts = ["a red circle on the left", "a blue square above a green triangle"]
    settings = GenerationSettings(**artifact.manifest["generation"])
    simulated = export.load(artifact.path)
    native = export.load(artifact.path, runtime="native")
    modules = list(native.transformer.modules())
    assert not any(isinstance(m, QuantLayer) for m in modules)
    expected = generate(simulated, prompts, settings, seed=3, batch_size=2)
    got = generate(native, prompts, settings, seed=3, batch_size=2)
    assert expected.std() > 0.01
    if artifact.manifest["bits"] == "w8a8":
        assert any(isinstance(m, NativeInt8Linear) for m in modules)
        assert psnr(got, expected) > 40
    else:
        packed = [m for m in modules if isinstance(m, NativeDequantLayer) and m.path == "dequant-packed4"]
        assert len(packed) == len(artifact.manifest["layers"])
        assert torch.equal(got, expected)


def test_unknown_runtime_is_refused(tmp_path):
    import export
    from qsched.errors import QschedError
    with pytest.raises(QschedError, match="runtime"):
        export.load(tmp_path, runtime="tensorrt")
