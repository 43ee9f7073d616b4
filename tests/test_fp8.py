"""FP8 (e4m3) W8A8: the quantizers, the ``fp8`` bits form, the simulated layer, the artifact, the native runtime
(its CPU emulation checked against ``torch._scaled_mm``'s own formula) and the exports that refuse it."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import export
import qsched
from qsched.core.bitplan import BitPlan, LayerPlan
from qsched.core.bits import VALID_FORMS, parse_bits
from qsched.core.errors import ArtifactError, BitSpecError, QschedError
from qsched.runtime.qlayers import QuantLayer
from qsched.runtime.quantizers import (FP8_DTYPE, FP8_MAX, dequantize_weight, fake_quantize_activation_fp8,
                                       fp8_act_scale, quantize_activation_fp8, quantize_weight_fp8)
from export.runtime_torch import NativeFP8Linear, fp8_matmul, native_layer, to_native_

pytestmark = pytest.mark.usefixtures("one_thread")

ACT_RANGE = (-3.0, 5.0)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical tensors (``torch.equal`` has no float8 kernel: e4m3 codes are compared as bytes)."""
    if a.dtype != b.dtype:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == FP8_DTYPE else torch.equal(a, b)


def _linear(k=64, n=48, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def _fp8_layer(k=64, n=48, seed=0, act_range=ACT_RANGE):
    return QuantLayer.from_module(_linear(k, n, seed), 8, 8, act_range, format="fp8")


# ------------------------------------------------------------------------------------------- quantizers

def test_weight_codes_are_e4m3_per_channel_and_round_trip():
    w = torch.randn(32, 80) * torch.logspace(-3, 1, 32).unsqueeze(1)  # rows of very different magnitude
    codes, scale = quantize_weight_fp8(w)
    assert codes.dtype == FP8_DTYPE and codes.shape == w.shape and scale.shape == (32, 1)
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((32,), FP8_MAX))  # each row's max is 448
    back = dequantize_weight(codes, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, half a subnormal step below them
    assert ((back - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all()
    again, scale2 = quantize_weight_fp8(back)  # the grid is a fixed point
    assert _same(again, codes) and torch.allclose(scale2, scale, rtol=1e-6)


def test_activation_fake_quantization_is_symmetric_static_and_saturates():
    assert fp8_act_scale(-3.0, 5.0) == pytest.approx(5.0 / 448) == fp8_act_scale(-5.0, 1.0)
    scale = fp8_act_scale(*ACT_RANGE)
    x = torch.linspace(-8, 8, 1001)
    q = quantize_activation_fp8(x, scale)
    assert q.dtype == FP8_DTYPE and not q.float().isnan().any()  # e4m3fn has no inf: out of range saturates
    y = fake_quantize_activation_fp8(x, scale)
    inside = x.abs() <= 5.0
    assert ((y - x)[inside].abs() <= x[inside].abs() * 2**-4 + scale * 2**-10).all()
    assert torch.allclose(y[~inside].abs(), torch.tensor(FP8_MAX * scale))
    assert torch.equal(y, q.float() * scale)
    assert fake_quantize_activation_fp8(x.bfloat16(), scale).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- the grammar

def test_fp8_is_a_bits_form_and_the_others_are_unchanged():
    spec = parse_bits("fp8")
    assert (spec.weight_bits, spec.act_bits, spec.format, str(spec)) == (8, 8, "fp8", "fp8")
    assert not spec.is_fractional and spec.uniform_weight_bits == 8 and spec.quantize_activations
    assert spec.to_dict()["format"] == "fp8" and parse_bits(" FP8 ").format == "fp8"
    for text in ("w4a8", "w8a8", "w3.5a8", "w4a16"):
        other = parse_bits(text)
        assert other.format == "int" and str(other) == text and "format" not in other.to_dict()
    assert "fp8" in VALID_FORMS
    with pytest.raises(BitSpecError, match="fp8"):
        parse_bits("fp16")


def test_the_plan_records_the_format_only_when_it_is_fp8():
    plan = BitPlan(layers={"a": LayerPlan(8, 8, params=10, format="fp8"), "b": LayerPlan(8, 8, params=10)})
    data = plan.to_dict()
    assert data["layers"]["a"]["format"] == "fp8" and "format" not in data["layers"]["b"]
    assert BitPlan.from_dict(json.loads(json.dumps(data))).layers["a"].format == "fp8"


# ------------------------------------------------------------------------------------------- the layer

def test_simulated_forward_is_the_fake_quant_formula():
    lin = _linear()
    layer = QuantLayer.from_module(lin, 8, 8, ACT_RANGE, format="fp8")
    assert layer.qweight.dtype == FP8_DTYPE and layer.weight_scale.shape == (48, 1)
    assert int(layer.act_zero_point) == 0 and float(layer.act_scale) == pytest.approx(fp8_act_scale(*ACT_RANGE))
    assert "w=fp8, a=fp8" in repr(layer)
    x = torch.randn(3, 5, 64) * 2
    codes, scale = quantize_weight_fp8(lin.weight)
    expected = F.linear(fake_quantize_activation_fp8(x, float(layer.act_scale)), codes.float() * scale, lin.bias)
    assert torch.equal(layer(x), expected)
    assert (layer(x) - lin(x)).abs().max() < 0.1 * lin(x).abs().max()


@pytest.mark.parametrize("kind, bits, group", [("conv2d", (8, 8), None), ("linear", (4, 8), None),
                                               ("linear", (8, None), None), ("linear", (8, 8), 16)])
def test_fp8_is_refused_where_it_does_not_apply(kind, bits, group):
    shape = (16, 32) if kind == "linear" else (16, 8, 3, 3)
    with pytest.raises(ValueError, match="fp8 format is for linear layers"):
        QuantLayer(kind, shape, *bits, group_size=group, format="fp8")
    with pytest.raises(ValueError, match="unknown layer format"):
        QuantLayer("linear", (16, 32), 8, 8, format="fp4")


# ------------------------------------------------------------------------------------------- native runtime

def test_emulation_equals_torch_scaled_mm_formula_on_cpu():
    """``torch._scaled_mm`` runs on this CPU (torch 2.13): the kernel path of ``fp8_matmul`` against its fp32
    emulation, at FLUX-like widths. Products of e4m3 values are exact in fp32; only the summation order may
    differ, so the difference is fp32 accumulation rounding."""
    gen = torch.Generator().manual_seed(1)
    x = quantize_activation_fp8(torch.randn(37, 512, generator=gen) * 100, 1.0)
    w, w_scale = quantize_weight_fp8(torch.randn(256, 512, generator=gen))
    act_scale = torch.tensor(0.013)
    kernel = fp8_matmul(x, w, act_scale, w_scale, kernel=True)
    emulated = fp8_matmul(x, w, act_scale, w_scale, kernel=False)
    bound = 512 * 2**-23 * (x.float().abs() @ w.float().abs().t()) * act_scale * w_scale.t()
    assert ((kernel - emulated).abs() <= bound + 1e-30).all()
    assert (kernel - emulated).abs().max() <= 1e-5 * kernel.abs().max()
    direct = torch._scaled_mm(x, w.t(), scale_a=act_scale, scale_b=torch.tensor(1.0), out_dtype=torch.float32)
    assert torch.equal(direct * w_scale.t(), kernel)


@pytest.mark.parametrize("bias", [True, False])
def test_native_fp8_matches_simulated(bias):
    lin = nn.Linear(64, 48, bias=bias)
    layer = QuantLayer.from_module(lin, 8, 8, ACT_RANGE, format="fp8")
    native = native_layer(layer)
    assert isinstance(native, NativeFP8Linear) and native.qweight.dtype == FP8_DTYPE
    assert _same(native.qweight, layer.qweight)
    for x in (torch.randn(2, 9, 64) * 2, torch.randn(1, 64)):
        sim, nat = layer(x), native(x)
        assert (nat - sim).abs().max() <= 1e-5 * sim.abs().max()
    reference = native_layer(layer, int_matmul=False)  # the dequantize path: the simulation, bit for bit
    assert reference.path == "dequant-fp8" and torch.equal(reference(x), layer(x))


def test_a_dtype_move_keeps_the_e4m3_codes():
    layer = _fp8_layer()
    codes = layer.qweight.clone()
    for module in (layer, native_layer(_fp8_layer())):
        module.to(torch.bfloat16)
        assert module.qweight.dtype == FP8_DTYPE and _same(module.qweight, codes)


def test_bf16_native_fp8_is_within_bf16_rounding():
    layer = QuantLayer.from_module(_linear().bfloat16(), 8, 8, ACT_RANGE, format="fp8")
    x = (torch.randn(4, 64) * 2).bfloat16()
    sim, nat = layer(x).float(), native_layer(layer)(x).float()
    assert nat.dtype == torch.float32 and (nat - sim).abs().max() <= 2**-7 * sim.abs().max()


# ------------------------------------------------------------------------------------------- compile, artifact

@pytest.fixture(scope="module")
def fp8_artifact(tmp_path_factory):
    from qsched.recipe import parse_recipe

    recipe = parse_recipe({"calibration": {"prompts": 4, "batch_size": 4}, "quantization": {"method": "uniform"},
                           "coefficients": {"enabled": False}, "cache_search": {"enabled": False},
                           "report": {"samples": 0}})
    out = tmp_path_factory.mktemp("fp8-art") / "flux-tiny-fp8"
    return qsched.compile("flux-tiny", "fp8", out=out, recipe=recipe, uniform=True, eval_prompts=0, progress=False)


def test_uniform_fp8_compile_writes_e4m3_codes_and_loads_bit_identical(fp8_artifact):
    from export.format import load_shard

    manifest = fp8_artifact.manifest
    assert manifest["bits"] == "fp8" and manifest["bit_plan"]["method"] == "uniform-rtn"
    assert all(spec["format"] == "fp8" and spec["kind"] == "linear" for spec in manifest["layers"].values())
    assert all(lp["format"] == "fp8" for lp in manifest["bit_plan"]["layers"].values())
    shard = load_shard(fp8_artifact.path, manifest["denoiser"]["shards"][0])
    name = next(iter(manifest["layers"]))
    assert shard[f"{name}.qweight"].dtype == FP8_DTYPE  # stored as they are (F8_E4M3), one byte per weight
    memory = fp8_artifact.compiled_pipeline.transformer.state_dict()
    loaded = export.load(fp8_artifact.path)
    state = loaded.transformer.state_dict()
    assert state.keys() == memory.keys()
    assert all(_same(value, memory[key]) for key, value in state.items())


def test_diffusers_from_pretrained_loads_the_fp8_denoiser(fp8_artifact):
    """diffusers' own call (export.diffusers_quantizer) gives export.load's fp8 denoiser, codes and all."""
    from diffusers import FluxTransformer2DModel

    theirs = FluxTransformer2DModel.from_pretrained(fp8_artifact.path, subfolder="transformer",
                                                    local_files_only=True).state_dict()
    ours = export.load(fp8_artifact.path).transformer.state_dict()
    assert theirs.keys() == ours.keys() and all(_same(theirs[k], v) for k, v in ours.items())


def test_native_load_of_the_fp8_artifact_agrees_with_simulated(fp8_artifact):
    from qsched.runtime.generation import GenerationSettings, generate

    settings = GenerationSettings(**fp8_artifact.manifest["generation"])
    simulated = export.load(fp8_artifact.path)
    native = export.load(fp8_artifact.path, runtime="native")
    kinds = {type(m).__name__ for m in native.transformer.modules()}
    assert "NativeFP8Linear" in kinds and "QuantLayer" not in kinds
    prompts = ["a red circle on the left", "a blue square"]
    a = generate(simulated, prompts, settings, seed=3, batch_size=2, progress=False)
    b = generate(native, prompts, settings, seed=3, batch_size=2, progress=False)
    # fp32 rounding differences flip a few e4m3 activation codes, which the sampler carries on (as int8's
    # tests allow for the integer matmul): images agree to PSNR > 40 dB, far above FP8's own error
    mse = float(((a - b) ** 2).mean())
    assert a.std() > 0.01 and 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20))) > 40
    streamed = native.transformer
    rebuilt = export.load(fp8_artifact.path).transformer
    to_native_(rebuilt)
    others = rebuilt.state_dict()  # the streamed load == to_native_ of the simulated model, buffer for buffer
    assert all(_same(value, others[key]) for key, value in streamed.state_dict().items())


def test_an_unknown_or_mismatched_format_in_the_manifest_is_one_artifact_error(fp8_artifact, tmp_path):
    import shutil

    from export.loader import build_denoiser, layer_format

    with pytest.raises(ArtifactError, match="format 'fp4'.*does not know"):
        layer_format("x", {"format": "fp4"})
    copy = tmp_path / "copy"
    shutil.copytree(fp8_artifact.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name = next(iter(manifest["layers"]))
    manifest["layers"][name]["format"] = "fp4"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format 'fp4'") as err:
        export.load(copy)
    assert "\n" not in str(err.value)
    del manifest["layers"][name]["format"]  # codes stored as e4m3, spec says int8: refused, not misread
    from export.format import load_shard
    tensors = load_shard(fp8_artifact.path, manifest["denoiser"]["shards"][0])
    with pytest.raises(ArtifactError, match="int8"):
        build_denoiser(manifest, tensors)


def test_exports_without_an_fp8_form_refuse_before_writing(fp8_artifact):
    from export.runtime_bnb import to_bnb_
    from qsched.runtime.qlayers import refuse_fp8

    with pytest.raises(QschedError, match="--export gguf cannot express FP8.*runtime='native'"):
        refuse_fp8(["int", "fp8"], "--export gguf")
    refuse_fp8(["int", None], "--export gguf")  # integer artifacts pass
    from export.gguf_export import export_gguf

    pytest.importorskip("gguf")
    with pytest.raises(QschedError, match="--export gguf cannot express FP8"):
        export_gguf(fp8_artifact.path)
    assert not (fp8_artifact.path / "gguf").exists()
    pipe = export.load(fp8_artifact.path)
    with pytest.raises(QschedError, match="bitsandbytes runtime cannot express FP8"):
        to_bnb_(pipe.transformer)


def test_cli_refuses_fp8_with_gguf_before_any_work_and_takes_onnx(tmp_path, capsys):
    from qsched.cli import main

    out = tmp_path / "never"
    for bits in (["--uniform"], []):  # uniform FP8, and MixDQ's FP8-or-FP
        assert main(["--model", "flux-tiny", "--bits", "fp8", *bits, "--export", "gguf", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qcompile: error: --export gguf cannot express FP8")
    assert not out.exists()
    assert main(["--model", "flux-tiny", "--bits", "fp8", "--export", "onnx", "--plan", "--out", str(out)]) == 0
    assert "cannot express" not in capsys.readouterr().err


def test_onnx_export_carries_e4m3_codes_and_onnxruntime_computes_the_simulation(fp8_artifact, tmp_path):
    """The ONNX form of an FP8 layer: e4m3 Q/DQ on the activation (saturating) and the artifact's e4m3 codes
    through DequantizeLinear; onnxruntime's CPU kernels give the simulated denoiser's output."""
    import shutil

    pytest.importorskip("onnxruntime")
    import onnx

    from export.runtime_onnx import OnnxDenoiser, capture_call, export_onnx

    path = tmp_path / "art"
    shutil.copytree(fp8_artifact.path, path)  # the module's artifact stays without an export
    record = export_onnx(path, dynamic=False)
    forms = list(record["layers"].values())
    assert len(forms) == len(fp8_artifact.manifest["layers"])
    assert all(f == {"act": "qdq-e4m3", "op": "MatMul", "weight": "dq-e4m3"} for f in forms)
    graph = onnx.load(str(path / record["graph"]), load_external_data=False)
    e4m3 = onnx.TensorProto.FLOAT8E4M3FN
    codes = [t for t in graph.graph.initializer if t.name.endswith(".codes")]
    assert len(codes) == len(forms) and all(t.data_type == e4m3 for t in codes)
    quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert 0 < len(quantize) <= len(forms)  # layers reading one input at one scale (q, k, v) share theirs
    assert all(a.i == 1 for n in quantize for a in n.attribute if a.name == "saturate")
    sim = export.load(path)
    onx = export.load(path, runtime="onnx")
    assert isinstance(onx.transformer, OnnxDenoiser)
    call = capture_call(sim, sim.qsched_manifest)
    with torch.no_grad():
        expected = sim.transformer(**call)[0]
    got = onx.transformer(**call)[0]
    assert expected.abs().max() > 0.1
    # each layer is exact (next test); through 60 layers, fp32 ops that differ in their last bit (summation
    # order, onnxruntime's attention) move a few activations across an e4m3 rounding boundary, where one step
    # is up to 12.5 % of the value: the native runtime differs from the simulation by as much (2.1 % of the
    # output's range, benchmarks/onnx_fp8_fidelity.py)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 0.05


class _TwoFP8Layers(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList()
        for out, scale in ((24, 1.0), (40, 0.6)):  # the second saturates: inputs past its range clamp to ±448
            linear = nn.Linear(96, out)
            with torch.no_grad():
                linear.weight.normal_(0, 0.05, generator=gen)
                linear.bias.normal_(0, 0.1, generator=gen)
            self.layers.append(QuantLayer.from_module(linear, 8, 8, (-2.5 * scale, 9.0 * scale), None, format="fp8"))

    def forward(self, hidden_states, return_dict=True):
        return (torch.cat([layer(hidden_states) for layer in self.layers], dim=-1),)


def test_onnx_fp8_layers_equal_the_simulation_exactly_in_onnxruntime(tmp_path):
    """Layer by layer the ONNX form is exact: onnxruntime's e4m3 QuantizeLinear rounds and saturates as
    the simulation does, and DequantizeLinear of the e4m3 codes gives the same weights, at two shapes."""
    ort = pytest.importorskip("onnxruntime")
    import onnx_ir as ir

    from export.onnx_graph import export_graph

    model = _TwoFP8Layers().eval()
    gen = torch.Generator().manual_seed(1)
    example = torch.randn(2, 7, 96, generator=gen) * 2 + 1
    graph, info = export_graph(model, {"hidden_states": example}, dynamic=True)
    assert {form["weight"] for form in info["layers"].values()} == {"dq-e4m3"}
    ir.save(graph, tmp_path / "fp8.onnx")
    session = ort.InferenceSession(str(tmp_path / "fp8.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((2, 7), (3, 19)):
        x = torch.randn(*shape, 96, generator=gen) * 2 + 1
        x.view(-1)[::97] *= 6.0  # some inputs beyond the calibrated range
        with torch.no_grad():
            expected = model(x)[0]
        got = torch.from_numpy(session.run(None, {"hidden_states": x.numpy()})[0])
        assert torch.equal(got, expected), shape


# ------------------------------------------------------------------------------------------- modelopt

def test_modelopt_bridge_expresses_fp8_next_to_int_layers_code_for_code():
    """modelopt's e4m3 quantizer (num_bits=(4, 3), amax = s * 448) is our formula: same codes on weights and on
    activations, in fp32 and bf16; only an input exactly on a midpoint between two e4m3 values may round the
    other way (modelopt scales by 448/amax, we divide by s), and the check says so."""
    pytest.importorskip("modelopt")
    import copy

    from calibrate import modelopt_bridge as mb
    from qsched.runtime.apply import quantize_

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 16))
    plan = BitPlan(layers={"0": LayerPlan(8, 8, format="fp8"), "1": LayerPlan(4, 8), "2": LayerPlan(8, 8, format="fp8")})
    ranges = {"0": ACT_RANGE, "1": (-0.5, 2.0), "2": (-1.0, 1.0)}
    config = {e["quantizer_name"]: e.get("cfg") for e in mb.modelopt_config(mb.planned_layers(fp, plan, ranges))["quant_cfg"]}
    assert config["0.weight_quantizer"] == {"num_bits": (4, 3), "axis": 0}
    assert config["0.input_quantizer"] == {"num_bits": (4, 3), "axis": None}  # symmetric, no affine bias
    for reference in (fp, quantize_(copy.deepcopy(fp), plan, ranges)):  # FP weights, then our QuantLayers
        table = mb.check_against_reference(reference, plan=plan, act_ranges=ranges, activations="affine")
        assert all(r["match"] for r in table.values()), {k: r["reason"] for k, r in table.items()}
        assert [r["format"] for r in table.values()] == ["fp8", "int", "fp8"]
        for row in (table["0"], table["2"]):
            assert row["weight_codes_differ"] == 0 and row["act_levels_differ"] == 0.0 and row["act_mode"] == "fp8"
            assert row["weight_max_abs_diff"] < 1e-7 and row["output_rel_diff"] < 1e-6
        assert mb.summarize(table)["fp8_layers"] == 2
    layer = QuantLayer.from_module(fp[0], 8, 8, ACT_RANGE, format="fp8")
    modelopt_layer = mb.to_modelopt(nn.Sequential(layer), activations="symmetric")[0]
    scale = float(layer.act_scale)
    for dtype in (torch.float32, torch.bfloat16):  # a dense random sweep: identical values, not just codes
        x = (torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
        assert torch.equal(modelopt_layer.input_quantizer(x), fake_quantize_activation_fp8(x, scale))
    grid = torch.arange(0, 126, dtype=torch.uint8).view(FP8_DTYPE).float()  # 0 ... 448: every positive code
    midpoints = (grid[:-1] + grid[1:]) / 2 * scale
    row = mb.check_layer("0", QuantLayer.from_module(fp[0], 8, 8, ACT_RANGE, format="fp8"), modelopt_layer,
                         mb.planned_layers(nn.Sequential(layer))["0"], "symmetric", sample=midpoints)
    assert 0 < row["act_levels_differ"] < 0.25 and row["act_differ_only_at_ties"] and "e4m3 midpoints" in row["reason"]


@pytest.mark.filterwarnings("ignore:Could not identify the device")
def test_export_modelopt_expresses_the_fp8_artifact(fp8_artifact, tmp_path):
    """``--export modelopt`` of a uniform fp8 artifact: every layer an FP8 quantizer pair whose codes equal the
    artifact's; the checkpoint restores (mto.restore and restore_modelopt) to what modelopt_denoiser computes,
    which is the artifact's simulated denoiser to fp32 rounding."""
    pytest.importorskip("modelopt")
    import shutil

    import modelopt.torch.opt as mto
    from diffusers import FluxTransformer2DModel

    from export.format import read_manifest
    from export.runtime_modelopt import export_modelopt, modelopt_denoiser, restore_modelopt

    path = tmp_path / "art"
    shutil.copytree(fp8_artifact.path, path)
    record = export_modelopt(path)
    manifest = read_manifest(path, verify=True)
    summary, n = record["summary"], len(manifest["layers"])
    assert manifest["modelopt"] == record and summary["fp8_layers"] == summary["match"] == summary["layers"] == n
    assert summary["weight_codes_differ"] == 0 and summary["act_levels_differ_max"] == 0.0
    assert summary["output_rel_diff_max"] < 1e-5
    check = json.loads((path / record["check"]).read_text())
    assert all(r["format"] == "fp8" and r["act_mode"] == "fp8" for r in check.values())

    config = manifest["denoiser"]["config"]
    gen = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 16, config["in_channels"], generator=gen),
                  encoder_hidden_states=torch.randn(1, 8, config["joint_attention_dim"], generator=gen),
                  pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=gen),
                  timestep=torch.full((1,), 0.5), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                  return_dict=False)
    saved, _, _ = modelopt_denoiser(path, check=False)
    restored = mto.restore(FluxTransformer2DModel.from_config(config), str(path / record["checkpoint"])).eval()
    quantizer = restored.get_submodule(next(iter(manifest["layers"]))).input_quantizer
    assert quantizer.num_bits == (4, 3) and quantizer.is_enabled and quantizer.amax is not None
    with torch.no_grad():
        expected = saved(**inputs)[0]
        assert torch.equal(restored(**inputs)[0], expected)
        assert torch.equal(restore_modelopt(path)(**inputs)[0], expected)
        ours = export.load(path).transformer(**inputs)[0]
    assert ((expected - ours).abs().max() / ours.abs().max()).item() < 1e-5


def test_modelopt_refuses_a_format_it_cannot_express_in_one_line(fp8_artifact, tmp_path):
    pytest.importorskip("modelopt")
    import shutil

    from calibrate.modelopt_bridge import layer_format
    from export.runtime_modelopt import export_modelopt

    assert layer_format("a", "fp8") == "fp8" and layer_format("a", None) == "int"
    with pytest.raises(ValueError, match="has format 'fp8', the plan 'int'"):
        layer_format("a", "int", "fp8")
    path = tmp_path / "fp4"
    shutil.copytree(fp8_artifact.path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["layers"][next(iter(manifest["layers"]))]["format"] = "fp4"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QschedError, match="modelopt bridge cannot express layer format 'fp4'") as err:
        export_modelopt(path, verify=False)
    assert "\n" not in str(err.value) and not (path / "modelopt").exists()


def test_cli_fp8_with_export_modelopt_passes_validation(fp8_artifact, tmp_path, monkeypatch, capsys):
    """``--bits fp8 --uniform --export modelopt`` is no longer refused: the compile runs, then the export."""
    pytest.importorskip("modelopt")
    import shutil

    from qsched.artifact import Artifact
    from qsched.cli import main

    target = tmp_path / "cli"
    shutil.copytree(fp8_artifact.path, target)
    monkeypatch.setattr("qsched.compiler.compile",
                        lambda **kw: Artifact(target, json.loads((target / "manifest.json").read_text())))
    assert main(["--model", "flux-tiny", "--bits", "fp8", "--uniform", "--export", "modelopt", "--out", str(target),
                 "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exports"]["modelopt"]["summary"]["fp8_layers"] > 0
