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

from qsched.core.errors import QschedError
from qsched.runtime.qlayers import QuantLayer
from export.runtime_torch import (NativeDequantLayer, NativeInt8Linear, native_layer, to_native_,
                                  unpack_nibbles)
from export.packing import pack_int

from conftest import random_quant_layer

ACT_RANGE = (-2.5, 9.0)  # post-GELU-like: skewed, so the zero point is far from 0 and 128
random_layer = random_quant_layer


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
                          uniform=True, coefficients=False, cache_search=False,
                          recipe=qsched.recipe.Recipe(calibration=qsched.recipe.CalibrationConfig(prompts=2, batch_size=2),
                                              report=qsched.recipe.ReportConfig(samples=0)))


@pytest.fixture(scope="module", params=["w8a8", "w4a8"])
def artifact(request, tiny_pipeline_dir, tmp_path_factory):
    return compile_tiny(tiny_pipeline_dir, tmp_path_factory, request.param)


def test_native_artifact_generates_like_simulated(artifact):
    """W8A8 runs the int8 matmul (PSNR > 40 dB vs simulation); W4A8 dequantizes packed nibbles (bit exact)."""
    import export
    from qsched.runtime.generation import GenerationSettings, generate

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


def test_native_load_of_a_compiled_artifact_streams_the_same_model(artifact):
    """export.load(runtime="native") on a qcompile artifact (one shard) builds what to_native_ built from the
    simulated model, buffer for buffer, and none of its tensors views the memory-mapped shard."""
    import export

    native = export.load(artifact.path, runtime="native")
    expected, _ = legacy_native(artifact.path)  # its FP tensors (norms) still view the mapped shard
    assert tensors_in_mappings(expected, artifact.path) != []
    assert tensors_in_mappings(native.transformer, artifact.path) == []
    assert_same_native_model(native.transformer, expected)


def test_unknown_runtime_is_refused(tmp_path):
    import export
    from qsched.core.errors import QschedError
    with pytest.raises(QschedError, match="runtime"):
        export.load(tmp_path, runtime="tensorrt")


# ------------------------------------------------------------------ streaming native load from an artifact

# (weight_bits, act_bits, group_size, fp_token_positions) cycled over a model's layers: every native path
LAYER_CONFIGS = [(8, 8, None, ()), (4, 8, None, ()), (8, 8, 16, ()), (4, 8, 32, ()), (8, None, None, ()),
                 (4, None, None, ()), (None, 8, None, ()), (3, 8, 16, ()), (6, 8, None, ()), (2, None, None, ()),
                 (8, 8, None, (0,)), (4, 8, None, (0, 2))]


def quantize_all(model: nn.Module, seed: int = 0, fp_layers: tuple[str, ...] = ()) -> dict[str, str]:
    """Replace every Linear/Conv2d of ``model`` by a QuantLayer, cycling LAYER_CONFIGS (a config a layer cannot
    take, e.g. a group size its width does not divide, or FP rows on a conv, moves on to the next); the layers
    in ``fp_layers`` get an FP row at position 0 whatever their config."""
    from qsched.runtime.apply import set_submodule
    from calibrate.fp_tokens import FPTokens

    gen = torch.Generator().manual_seed(seed)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    kinds, i = {}, 0
    for name, module in targets:
        while True:
            bits, act, group, rows = LAYER_CONFIGS[i % len(LAYER_CONFIGS)]
            i += 1
            fan_in = math.prod(module.weight.shape[1:])
            if (group is None or fan_in % group == 0) and not (rows and isinstance(module, nn.Conv2d)):
                break
        if name in fp_layers:
            rows = rows or (0,)
        fp = None
        if rows:
            n_out, n_in = module.weight.shape
            fp = FPTokens(rows, (torch.randn(len(rows), n_in, generator=gen) * 2).to(module.weight.dtype),
                          torch.randn(len(rows), n_out, generator=gen).to(module.weight.dtype))
        layer = QuantLayer.from_module(module, bits, act, ACT_RANGE if act else None, group, fp_tokens=fp)
        set_submodule(model, name, layer)
        kinds[name] = f"w{bits}a{act}g{group}" + ("+fp" if rows else "")
    return kinds


def write_test_artifact(model: nn.Module, path, n_shards: int = 3):
    """``model`` (already quantized) as an artifact with ``n_shards`` shards; one layer's bias is put in another
    shard than its codes, which a streaming loader must handle too."""
    import json

    from export.format import write_artifact
    from export.save import denoiser_tensors, layer_specs

    tensors = denoiser_tensors(model)
    shards = [{} for _ in range(n_shards)]
    for j, key in enumerate(sorted(tensors)):
        top = key.split(".")[0] + (key.split(".")[1] if key.split(".")[1].isdigit() else "")
        shards[sum(map(ord, top)) % n_shards][key] = tensors[key]
    split = next(k for k in sorted(tensors) if k.endswith(".qweight") and k.replace("qweight", "bias") in tensors)
    bias = split.replace("qweight", "bias")
    for s in shards:
        s.pop(bias, None)
    owner = next(i for i, s in enumerate(shards) if split in s)
    shards[(owner + 1) % n_shards][bias] = tensors[bias]
    names = {f"transformer-{i:05d}.safetensors": s for i, s in enumerate(shards) if s}
    manifest = {"denoiser": {"attr": "transformer", "class": type(model).__name__,
                             "config": json.loads(model.to_json_string()), "shards": sorted(names)},
                "layers": layer_specs(model)}
    return write_artifact(path, manifest, names)


def legacy_native(path):
    """What runtime="native" built before streaming: every shard loaded, the simulated model, then to_native_."""
    from export.format import load_shard, read_manifest
    from export.loader import build_denoiser

    manifest = read_manifest(path)
    tensors = {}
    for shard in manifest["denoiser"]["shards"]:
        tensors.update(load_shard(path, shard))
    denoiser = build_denoiser(manifest, tensors)
    counts = to_native_(denoiser)
    return denoiser, counts


def assert_same_native_model(got: nn.Module, expected: nn.Module):
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in expected.named_modules()]
    for (n, a), (_, b) in zip(got.named_modules(), expected.named_modules()):
        if isinstance(a, (NativeDequantLayer, NativeInt8Linear)):
            assert a.extra_repr() == b.extra_repr(), n
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert list(got_state) == list(expected_state)
    for key, value in expected_state.items():
        assert got_state[key].dtype == value.dtype and torch.equal(got_state[key], value), key


def shard_mappings(path) -> list[str]:
    """Lines of /proc/self/maps that map one of the artifact's files."""
    return [line for line in open("/proc/self/maps") if str(path) in line]


def tensors_in_mappings(model: nn.Module, path) -> list[str]:
    """Names of ``model``'s tensors whose memory lies in a mapping of one of the artifact's files."""
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in shard_mappings(path)]
    return [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_native_flux_is_identical_to_to_native_of_build_denoiser(tmp_path, dtype):
    """Tiny FLUX with every native path (W8A8 int8_mm, grouped int8_mm, W4A8 / W3 / W2 packed, grouped packed,
    int8 dequant, FP weights with int8 activations, FP token rows): same modules, same buffers bit for bit,
    same outputs bit for bit as the old load; the shard files are not mapped once it returns."""
    from diffusers import FluxTransformer2DModel

    from export.loader import build_native_denoiser
    from export.format import read_manifest
    from qsched.tinyworld.model import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG).to(dtype)
    quantize_all(model, fp_layers=("context_embedder",))
    path = write_test_artifact(model, tmp_path / "flux")
    got = build_native_denoiser(read_manifest(path), path)
    assert shard_mappings(path) == []  # checked first: the old load keeps the shards mapped (its FP tensors view them)
    assert not any(isinstance(m, QuantLayer) for m in got.modules())
    expected, counts = legacy_native(path)
    assert shard_mappings(path) != []
    assert {"int8_mm", "dequant-packed4", "dequant-packed3", "dequant-packed2", "dequant-int8", "fp"} <= set(counts)
    assert sum(1 for m in expected.modules() if m.__class__.__name__ == "FPTokenRows") >= 2
    assert any(isinstance(m, NativeInt8Linear) and m.groups > 1 for m in expected.modules())
    assert_same_native_model(got, expected)

    gen = torch.Generator().manual_seed(1)
    text = torch.randn(2, 6, TRANSFORMER_CONFIG["joint_attention_dim"], generator=gen)
    text[0, 0] = got.context_embedder.fp_token_inputs[0].float()  # the first sequence's row 0 is served in FP
    inputs = dict(hidden_states=torch.randn(2, 16, TRANSFORMER_CONFIG["in_channels"], generator=gen).to(dtype),
                  encoder_hidden_states=text.to(dtype),
                  pooled_projections=torch.randn(2, TRANSFORMER_CONFIG["pooled_projection_dim"], generator=gen).to(dtype),
                  timestep=torch.full((2,), 0.5, dtype=dtype), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(6, 3),
                  return_dict=False)
    with torch.no_grad():
        rows = got.context_embedder(inputs["encoder_hidden_states"])
        assert torch.equal(rows[0, 0], got.context_embedder.fp_token_outputs[0])
        assert not torch.equal(rows[1, 0], got.context_embedder.fp_token_outputs[0])
        y_got, y_expected = got(**inputs)[0], expected(**inputs)[0]
    assert torch.isfinite(y_expected.float()).all() and torch.equal(y_got, y_expected)


def test_streamed_native_conv_unet_is_identical(tmp_path):
    """Conv layers (W8A8, W4A8, W4A16, FP weights with int8 activations, ...) of a small UNet load the same way."""
    from diffusers import UNet2DModel

    from export.loader import build_native_denoiser
    from export.format import read_manifest

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=8)
    kinds = quantize_all(model, seed=2)
    convs = [n for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.kind == "conv2d"]
    assert len({kinds[n] for n in convs}) >= 4
    path = write_test_artifact(model, tmp_path / "unet", n_shards=2)
    got = build_native_denoiser(read_manifest(path), path)
    assert shard_mappings(path) == []
    expected, counts = legacy_native(path)
    assert {"dequant-packed4", "dequant-int8", "fp"} <= set(counts)
    assert_same_native_model(got, expected)
    x = activations((2, 3, 8, 8), seed=4)
    with torch.no_grad():
        assert torch.equal(got(x, 10).sample, expected(x, 10).sample)


def test_streamed_native_load_refuses_corrupt_tensors(tmp_path):
    """Codes out of their bit range, a tensor of the wrong shape or a missing tensor are refused (ArtifactError)."""
    from export.format import read_manifest
    from export.loader import build_native_denoiser
    from export.runtime_torch import native_from_stored
    from export.save import denoiser_tensors
    from qsched.core.errors import ArtifactError

    sim = random_layer(weight_bits=4, shape=(16, 32))
    stored = {k: v for k, v in denoiser_tensors(nn.Sequential(sim)).items()}
    stored = {k.partition(".")[2]: v for k, v in stored.items()}

    def template(bits):
        return QuantLayer("linear", (16, 32), bits, 8, None, None, True, torch.float32, device="meta")

    assert torch.equal(native_from_stored(template(4), dict(stored)).packed, stored["qweight"])
    with pytest.raises(ArtifactError, match="outside the int2 range"):  # int4 codes read as int2
        native_from_stored(template(2), dict(stored))
    with pytest.raises(ArtifactError, match="shape"):
        native_from_stored(template(4), {**stored, "bias": torch.zeros(15)})
    with pytest.raises(ArtifactError, match="missing"):
        native_from_stored(template(4), {k: v for k, v in stored.items() if k != "act_scale"})

    from diffusers import FluxTransformer2DModel
    from qsched.tinyworld.model import TRANSFORMER_CONFIG
    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    quantize_all(model)
    path = write_test_artifact(model, tmp_path / "flux", n_shards=1)
    manifest = read_manifest(path)
    manifest["layers"]["proj_out"]["has_bias"] = False  # the shard's proj_out.bias is now unexpected
    with pytest.raises(ArtifactError, match="do not match its manifest"):
        build_native_denoiser(manifest, path)


def test_float_activations_keeps_the_weights_and_drops_the_activation_quantizer():
    from qsched.runtime.qlayers import float_activations_

    model = nn.Sequential(random_layer(seed=1), nn.GELU(), random_layer(shape=(96, 64), seed=2))
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0)) * 3
    quantized = model(x)
    layers = [m for m in model if isinstance(m, QuantLayer)]
    codes = [layer.qweight.clone() for layer in layers]
    assert float_activations_(model) == 2
    assert all(layer.act_bits is None for layer in layers)
    assert all(torch.equal(c, layer.qweight) for c, layer in zip(codes, layers))
    assert not torch.allclose(model(x), quantized)  # the 8-bit activation rounding is gone


def test_int_mm_fp32_gives_int_mm_integers_exactly():
    """The fp32 path sums slices of at most 2^10 products, each at most 2^14: exact even at the extremes."""
    from export.runtime_torch import EXACT_FP32_TERMS, int_mm_fp32

    worst = torch.full((3, 3 * EXACT_FP32_TERMS + 5), -128, dtype=torch.int8)
    assert torch.equal(int_mm_fp32(worst, worst.t().contiguous()), torch._int_mm(worst, worst.t().contiguous()))
    gen = torch.Generator().manual_seed(3)
    for m, k, n in ((1, 8, 8), (37, 3000, 24), (5, EXACT_FP32_TERMS, 16)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
        assert torch.equal(int_mm_fp32(a, b), torch._int_mm(a, b))


@pytest.mark.parametrize("group_size", [None, 32])
def test_cpu_int8_backends_give_identical_layers(monkeypatch, group_size):
    import export.runtime_torch as rt

    sim = random_layer(group_size=group_size)
    native = native_layer(sim)
    assert isinstance(native, NativeInt8Linear)
    x = activations((33, 96))
    outputs = []
    for backend in rt.CPU_INT8_BACKENDS:
        monkeypatch.setattr(rt, "_cpu_int8_backend", backend)
        with torch.no_grad():
            outputs.append(native(x))
    assert torch.equal(*outputs)


def test_cpu_int8_backend_override_is_checked(monkeypatch):
    import export.runtime_torch as rt

    monkeypatch.setattr(rt, "_cpu_int8_backend", None)
    monkeypatch.setenv("QSCHED_CPU_INT8", "int_mm")
    assert rt.cpu_int8_backend() == "int_mm"
    monkeypatch.setattr(rt, "_cpu_int8_backend", None)
    monkeypatch.setenv("QSCHED_CPU_INT8", "vnni")
    with pytest.raises(QschedError, match="QSCHED_CPU_INT8='vnni' is not a CPU int8 backend"):
        rt.cpu_int8_backend()
