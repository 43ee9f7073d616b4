"""ONNX runtime (export.runtime_onnx, export.onnx_graph): graph content, numerics against the simulated
model, the pipeline driver with the Q-Sched scheduler and the cache schedule, loading, checksums, errors.

Dynamo exports take seconds each on one thread, so there are three, shared by module fixtures: a one-double
+ one-single-block FLUX artifact (mixed bit plan covering every layer form, Q-Sched coefficients, a cache
schedule), a one-block PixArt artifact (classifier-free guidance, a conv layer, int64 inputs), and a "zoo"
module with one layer of every form side by side. The pipeline exports use static shapes (half the export
time); the zoo is exported with dynamic batch and token axes and run at two sizes.

Tolerances: every form computes the simulation's arithmetic, so a layer alone matches to fp32 rounding
(relative 1e-5), and so do whole denoiser calls and generations here. That holds because the plan keeps FP
activations on the layer right after the sinusoidal timestep embedding: onnxruntime's Sin/Cos differ from
torch's by ~1e-5 at large arguments, which flips a few 8-bit activation codes there and moves every later
number by up to one quantization step (measured: 0.4% relative per call). That is rounding of the
quantizer's input, not an export error, and the torch runtimes share it with each other only because they
share torch's Sin.
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

import export  # noqa: E402
from qsched.runtime.cache_schedule import CacheSchedule, block_layout  # noqa: E402
from conftest import TEST_WORDS, random_quant_layer  # noqa: E402
from export.onnx_graph import (OUTPUT, export_graph, int4_initializers, layer_form, reuse_variant,  # noqa: E402
                               swap_layers, switched_graph)
from export.runtime_onnx import OnnxDenoiser, capture_call, export_onnx, require_onnx  # noqa: E402
from qsched.core.errors import ArtifactError, QschedError  # noqa: E402
from qsched.runtime.generation import GenerationSettings, generate  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square above a green triangle"]
FLUX_SETTINGS = GenerationSettings(steps=4, height=32, width=32, guidance_scale=0.0, max_sequence_length=16)
PIXART_SETTINGS = GenerationSettings(steps=3, height=32, width=32, guidance_scale=4.5, max_sequence_length=16)
# (weight bits, act bits, group): cycled over a denoiser's layers, so every form appears
PLAN_CYCLE = [(8, 8, None), (4, 8, None), (4, None, None), (8, None, None), (None, 8, None), (4, 8, 16),
              (8, 8, 32), (3, 4, None), (4, 8, 8), (8, 8, 8), (6, 8, None)]


# ------------------------------------------------------------------------------------------ builders


def _act_ranges(pipe, settings):
    from calibrate.statistics import observe_inputs

    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    with observe_inputs(layers, momentum=None) as observers:
        generate(pipe, PROMPTS[:1], settings, seed=0)
    return {n: o.range for n, o in observers.items() if o.calls}


def build_artifact(pipe, out, settings, schedule=None, coefficients=None):
    """Quantize ``pipe``'s transformer with a plan cycling through every form (FP activations right after
    the sinusoidal timestep embedding, see the module docstring) and save a bundled artifact."""
    from qsched.runtime.apply import quantize_
    from qsched.core.bitplan import BitPlan, LayerPlan
    from export.save import save_quantized
    from qsched.runtime.schedulers import QSchedScheduler

    denoiser = pipe.transformer
    ranges = _act_ranges(pipe, settings)
    layers = {}
    names = [n for n, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for i, name in enumerate(names):
        weight = denoiser.get_submodule(name).weight
        wbits, abits, group = PLAN_CYCLE[i % len(PLAN_CYCLE)]
        if group and weight[0].numel() % group:
            group = None
        if name.endswith("timestep_embedder.linear_1"):
            abits = None
        layers[name] = LayerPlan(wbits, abits, group_size=group, params=weight.numel())
    plan = BitPlan(layers=layers, method="test-every-form", target="mixed")
    quantize_(denoiser, plan, ranges)
    if coefficients is not None:
        pipe.scheduler = QSchedScheduler.wrap(pipe.scheduler, coefficients)
    manifest = {"source": {"kind": "test", "model": "tiny"}, "bits": "mixed", "generation": settings.to_dict(),
                "calibration_prompts": PROMPTS,
                "cache": {"schedule": schedule.to_dict() if schedule is not None else None, "pareto_front": None}}
    return save_quantized(out, pipe, "transformer", plan, manifest, bundle=True)


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    from qsched.tinyworld.model import TRANSFORMER_CONFIG, build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    torch.manual_seed(1)
    pipe.transformer = FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, num_layers=1, num_single_layers=1)).eval()
    return pipe


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    from qsched.models.tiny_pixart import PIXART_TRANSFORMER_CONFIG, build_tiny_pixart_pipeline

    pipe = build_tiny_pixart_pipeline(seed=0, words=TEST_WORDS)
    torch.manual_seed(1)
    pipe.transformer = PixArtTransformer2DModel(**dict(PIXART_TRANSFORMER_CONFIG, num_layers=1)).eval()
    return pipe


def flux_schedule(pipe):
    """Steps 1 and 3 reuse the double block's attn and ff, step 2 the single block's attn and proj_out."""
    blocks = block_layout(pipe.transformer)
    sched = CacheSchedule(FLUX_SETTINGS.steps, blocks)
    table = np.zeros((sched.steps, len(sched.slots)), dtype=bool)
    for step, slots in ((1, [("transformer_blocks.0", "attn"), ("transformer_blocks.0", "ff")]),
                        (2, [("single_transformer_blocks.0", "attn"), ("single_transformer_blocks.0", "proj_out")]),
                        (3, [("transformer_blocks.0", "attn"), ("transformer_blocks.0", "ff")])):
        table[step, [sched.slot(*s) for s in slots]] = True
    return CacheSchedule(sched.steps, blocks, table)


COEFFICIENTS = {"steps": 4, "cx": [1.0, 0.98, 1.01, 1.0], "ce": [1.02, 1.0, 0.97, 1.0]}


@pytest.fixture(scope="module")
def flux_art(tmp_path_factory):
    pipe = tiny_flux()
    path = build_artifact(pipe, tmp_path_factory.mktemp("onnx-flux") / "art", FLUX_SETTINGS, flux_schedule(pipe),
                          COEFFICIENTS)
    record = export_onnx(path, dynamic=False)
    return path, record


@pytest.fixture(scope="module")
def flux_art_cut(flux_art, tmp_path_factory):
    """The same artifact exported in the earlier layout: one cut graph per distinct step."""
    path = tmp_path_factory.mktemp("onnx-flux-cut") / "art"
    shutil.copytree(flux_art[0], path)
    return path, export_onnx(path, dynamic=False, overwrite=True, switched=False)


@pytest.fixture(scope="module")
def pixart_art(tmp_path_factory):
    pipe = tiny_pixart()
    blocks = block_layout(pipe.transformer)
    table = np.zeros((PIXART_SETTINGS.steps, 3), dtype=bool)
    table[1, [0, 2]] = True  # attn1 and ff at step 1, attn2 at step 2
    table[2, 1] = True
    path = build_artifact(pipe, tmp_path_factory.mktemp("onnx-pixart") / "art", PIXART_SETTINGS,
                          CacheSchedule(PIXART_SETTINGS.steps, blocks, table))
    record = export_onnx(path, dynamic=False)
    return path, record


# ----------------------------------------------------------------------------------- the zoo


ZOO = [  # name, kind, weight bits, act bits, group, extra
    ("w8a8", "linear", 8, 8, None, None), ("w6a8", "linear", 6, 8, None, None),
    ("w8a16", "linear", 8, None, None, None), ("w8a8_g32", "linear", 8, 8, 32, None),
    ("w8a8_g8", "linear", 8, 8, 8, None), ("w4a8", "linear", 4, 8, None, None),
    ("w4a16", "linear", 4, None, None, None), ("w4a8_g32", "linear", 4, 8, 32, None),
    ("w4a8_g8", "linear", 4, 8, 8, None), ("w3a16_g16", "linear", 3, None, 16, None),
    ("w2a8", "linear", 2, 8, None, None), ("w4a4", "linear", 4, 4, None, None),
    ("w8a4", "linear", 8, 4, None, None), ("fpa8", "linear", None, 8, None, None),
    ("w4a8_k40", "linear", 4, 8, None, 40), ("w8a8_fp_tokens", "linear", 8, 8, None, "fp_tokens"),
    ("conv_w8a8", "conv2d", 8, 8, None, None), ("conv_w4a16_g8", "conv2d", 4, None, 8, None),
    ("conv_fpa8", "conv2d", None, 8, None, None),
]
ACT_RANGE = (-2.5, 9.0)


def random_layer(kind, wbits, abits, group, extra, seed):
    k = extra if isinstance(extra, int) else 96
    shape = (24, k) if kind == "linear" else (16, 8, 3, 3)
    conv_args = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1} if kind == "conv2d" else None
    return random_quant_layer(kind, shape, wbits, abits, group, conv_args=conv_args, seed=seed,
                              fp_token_positions=(0, 3) if extra == "fp_tokens" else (), act_range=ACT_RANGE)


class Zoo(nn.Module):
    """Every layer form on its own input (so no two share a quantizer); outputs flattened side by side."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({name: random_layer(*spec, seed=i) for i, (name, *spec) in enumerate(ZOO)})
        self.widths = {name: (m.qweight if m.weight_bits is not None else m.weight).shape[1]
                       for name, m in self.layers.items()}
        self.convs = {name for name, kind, *_ in ZOO if kind == "conv2d"}
        token = self.layers["w8a8_fp_tokens"]
        with torch.no_grad():
            token.fp_token_inputs.copy_(zoo_inputs(2, 7)["hidden_states"][0, list(token.fp_token_positions)])
            token.fp_token_outputs.normal_(generator=torch.Generator().manual_seed(9))

    def parts(self, hidden_states, sample):
        outs = []
        for i, (name, layer) in enumerate(self.layers.items()):
            if name in self.convs:
                x = sample * (1.1 + 0.1 * i)
            elif name == "w8a8_fp_tokens":
                x = hidden_states  # rows 0 and 3 of sample 0 are the stored FP-token rows
            else:
                x = hidden_states[..., :self.widths[name]] * (1.1 + 0.1 * i)
            outs.append(layer(x).flatten(1))
        return outs

    def forward(self, hidden_states, sample, return_dict=True):
        return (torch.cat(self.parts(hidden_states, sample), dim=1),)


def zoo_inputs(batch, tokens, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 96, generator=gen) * 2.0 + 1.0
    x.view(-1)[::97] *= 4.0  # a few values beyond the calibrated range: exercises clamping
    return {"hidden_states": x, "sample": torch.randn(batch, 8, 12, 12, generator=gen) * 2.0}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    import onnx_ir as ir

    torch.manual_seed(0)
    model = Zoo().eval()
    graph, info = export_graph(model, zoo_inputs(2, 7), dynamic=True)
    path = tmp_path_factory.mktemp("onnx-zoo") / "zoo.onnx"
    ir.save(graph, path)
    return model, path, info


def _session(path, layers, optimized=None):
    """A session set up as OnnxDenoiser's are (export.runtime_onnx.session_settings), one thread;
    ``optimized``: where onnxruntime writes the graph it actually runs."""
    import onnxruntime as ort

    from export.runtime_onnx import session_settings

    settings = session_settings(layers, 0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for key, value in settings["config"].items():
        options.add_session_config_entry(key, value)
    if optimized:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=settings["disabled_optimizers"] or None)


def rel_err(a, b):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------- tests


def test_layer_form_rules():
    spec = lambda wb, ab, g=None, k=3072, kind="linear": {  # noqa: E731
        "kind": kind, "weight_bits": wb, "act_bits": ab, "group_size": g,
        "weight_shape": [12288, k] if kind == "linear" else [16, 8, 3, 3]}
    assert layer_form(spec(8, 8)) == {"act": "qdq-u8", "op": "MatMul", "weight": "dq-int8"}
    assert layer_form(spec(4, 8)) == {"act": "qdq-u8", "op": "MatMulNBits", "weight": "matmulnbits", "bits": 4,
                                      "block_size": 128}
    assert layer_form(spec(4, None, 64))["block_size"] == 64
    assert layer_form(spec(3, 4, 48))["block_size"] == 16  # a block inside each group, scale repeated
    assert layer_form(spec(4, 8, k=40))["block_size"] == 16  # per channel: row padded with zero codes
    assert layer_form(spec(4, 8, 8, k=40))["weight"] == "dq-int4"  # a group no block fits in
    assert layer_form(spec(8, 8, 32)) == {"act": "qdq-u8", "op": "MatMulNBits", "weight": "matmulnbits", "bits": 8,
                                          "block_size": 32}
    assert layer_form(spec(8, 8, 8))["weight"] == "int8-cast-mul"
    assert layer_form(spec(None, 4))["act"] == "clip-qdq-u8"
    assert layer_form(spec(4, 8, kind="conv2d"))["weight"] == "dq-int4"
    assert layer_form({**spec(8, 8), "format": "fp8"}) == {"act": "qdq-e4m3", "op": "MatMul", "weight": "dq-e4m3"}


def test_every_form_matches_torch_in_onnxruntime(zoo):
    """One layer of each form: onnxruntime equals the simulated QuantLayer to fp32 rounding, at the traced
    shape and at another batch and token count (dynamic axes)."""
    model, path, info = zoo
    session = _session(path, info["layers"])
    assert {name.split(".", 1)[1]: form["weight"] for name, form in info["layers"].items()} == {
        "w8a8": "dq-int8", "w6a8": "dq-int8", "w8a16": "dq-int8", "w8a8_g32": "matmulnbits", "w8a8_g8": "int8-cast-mul",
        "w4a8": "matmulnbits", "w4a16": "matmulnbits", "w4a8_g32": "matmulnbits", "w4a8_g8": "dq-int4",
        "w3a16_g16": "matmulnbits", "w2a8": "matmulnbits", "w4a4": "matmulnbits", "w8a4": "dq-int8", "fpa8": "fp",
        "w4a8_k40": "matmulnbits", "w8a8_fp_tokens": "dq-int8", "conv_w8a8": "dq-int8", "conv_w4a16_g8": "dq-int4",
        "conv_fpa8": "fp"}
    for batch, tokens in ((2, 7), (3, 19)):
        inputs = zoo_inputs(batch, tokens, seed=1 if batch == 2 else 5)
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
        with torch.no_grad():
            parts = model.parts(**inputs)
        assert got.shape == (batch, sum(p.shape[1] for p in parts))
        for (name, _), part in zip(model.layers.items(), parts):  # per layer, so a failure names its form
            assert rel_err(got[:, :part.shape[1]], part) < 1e-5, (name, batch, tokens)
            got = got[:, part.shape[1]:]


def test_onnxruntime_runs_integer_kernels(zoo, tmp_path):
    """After onnxruntime's graph optimizations, every int8 QDQ matmul is a MatMulIntegerToFloat (the
    integer kernel) and every MatMulNBits stays one; MatMulAddFusion must be off for the former."""
    model, path, info = zoo
    _session(path, info["layers"], optimized=tmp_path / "optimized.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    forms = info["layers"].values()
    assert ops.count("MatMulIntegerToFloat") == sum(f["weight"] == "dq-int8" and f["act"] is not None
                                                    and f["op"] == "MatMul" for f in forms) == 4
    assert ops.count("MatMulNBits") >= sum(f["weight"] == "matmulnbits" for f in forms)


def test_zoo_graph_content(zoo):
    """Each form's nodes are in the graph, one per layer, and the initializers are the artifact's integers."""
    model, path, info = zoo
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    forms = list(info["layers"].values())
    assert ops.count("MatMulNBits") == sum(f["weight"] == "matmulnbits" for f in forms) == 8
    nbits = {n.input[1]: {a.name: a.i for a in n.attribute} for n in proto.graph.node if n.op_type == "MatMulNBits"}
    assert nbits["layers.w8a8_g32.packed"]["bits"] == 8 and nbits["layers.w4a8.packed"]["bits"] == 4
    assert ops.count("QuantizeLinear") == sum(f["act"] is not None for f in forms)
    assert ops.count("Clip") == sum(f["act"] == "clip-qdq-u8" for f in forms) == 2
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".codes")]
    assert len(weight_dq) == sum(f["weight"] in ("dq-int8", "dq-int4") for f in forms)
    assert sorted(int4_initializers(proto)) == ["layers.conv_w4a16_g8.codes", "layers.w4a8_g8.codes"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    w8 = model.layers["w8a8"]
    assert np.array_equal(inits["layers.w8a8.codes"], w8.qweight.numpy().T)  # the codes themselves, [K, N]
    w4 = model.layers["w4a8"]
    packed = inits["layers.w4a8.packed"].reshape(24, -1)
    low = (packed & 0x0F).astype(np.int16) - 8
    assert np.array_equal(low, w4.qweight.numpy()[:, 0::2])  # uint4 code = code + 8, low nibble first


def test_onnx_layers_in_torch_equal_the_simulation(flux_art):
    """The export layers' torch references (the custom ops' eager bodies) compute the simulation bit for bit,
    so the layouts the graph reads are right before onnxruntime is involved."""
    path, _ = flux_art
    pipe = export.load(path)
    pipe.qsched_cache.disable()
    call = capture_call(pipe, pipe.qsched_manifest)
    with torch.no_grad():
        expected = pipe.transformer(**call)[0]
        with swap_layers(pipe.transformer):
            got = pipe.transformer(**call)[0]
    assert torch.equal(got, expected)


def test_flux_graph_has_every_planned_layer(flux_art):
    path, record = flux_art
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(record["layers"]) == set(manifest["layers"])  # nothing skipped
    proto = onnx.load(str(path / "onnx" / "denoiser.onnx"), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    forms = record["layers"]
    nbits_layers = {n for n, f in forms.items() if f["weight"] == "matmulnbits"}
    assert ops.count("MatMulNBits") == len(nbits_layers) > 0
    assert {n.input[1].removesuffix(".packed") for n in proto.graph.node if n.op_type == "MatMulNBits"} == nbits_layers
    dq = {n.input[0].removesuffix(".codes") for n in proto.graph.node
          if n.op_type == "DequantizeLinear" and n.input[0].endswith(".codes")}
    assert dq == {n for n, f in forms.items() if f["weight"] in ("dq-int8", "dq-int4")}
    assert sorted(int4_initializers(proto)) == sorted(f"{n}.codes" for n, f in forms.items() if f["weight"] == "dq-int4")
    # activations: one QuantizeLinear per act-quantized layer, except where the exporter merged identical
    # quantizers of one input (q, k and v share their input and their calibrated range)
    act_layers = sum(f["act"] is not None for f in forms.values())
    assert 0 < ops.count("QuantizeLinear") <= act_layers
    assert set(record["counts"]) >= {"dq-int8", "dq-int4", "matmulnbits4", "matmulnbits8", "int8-cast-mul", "fp"}


def test_flux_call_matches_simulated(flux_art):
    path, _ = flux_art
    sim = export.load(path)
    onx = export.load(path, runtime="onnx")
    sim.qsched_cache.disable()
    onx.qsched_cache.disable()
    assert isinstance(onx.transformer, OnnxDenoiser)
    call = capture_call(sim, sim.qsched_manifest)
    with torch.no_grad():
        expected = sim.transformer(**call)[0]
    got = onx.transformer(**call)[0]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert rel_err(got, expected) < 1e-5
    assert torch.equal(onx.transformer(**{**call, "return_dict": True}).sample, got)
    with pytest.raises(ValueError, match="traced with"):  # a call the graph was not traced for
        onx.transformer(**{**call, "guidance": torch.ones(call["hidden_states"].shape[0])})


def test_flux_generation_with_qsched_and_cache_matches_torch(flux_art):
    """The pipeline's own __call__ with the ONNX denoiser, the artifact's Q-Sched scheduler and its cache
    schedule: the images equal the torch cached pipeline's, the same components are reused, and each step
    runs its own graph."""
    from qsched.runtime.schedulers import QSchedScheduler

    path, record = flux_art
    sim = export.load(path)
    onx = export.load(path, runtime="onnx")
    assert isinstance(onx.scheduler, QSchedScheduler) and onx.scheduler.coefficients is not None
    expected = generate(sim, PROMPTS, FLUX_SETTINGS, seed=3, batch_size=2)
    got = generate(onx, PROMPTS, FLUX_SETTINGS, seed=3, batch_size=2)
    assert expected.std() > 0.01
    assert rel_err(got, expected) < 1e-4
    assert onx.qsched_cache.counts() == sim.qsched_cache.counts() == {"computed": 18, "reused": 6}
    switched = record["switched"]
    assert record["steps"] == [] and switched["reuse"] == [[], [0, 1], [3, 5], [0, 1]]
    assert set(onx.transformer._sessions) == {switched["graph"]}  # one session (one weight copy) for every step
    # the cache matters: without it the images differ, and still match torch's uncached pipeline
    onx.qsched_cache.disable()
    sim.qsched_cache.disable()
    plain = generate(onx, PROMPTS, FLUX_SETTINGS, seed=3, batch_size=2)
    assert rel_err(plain, generate(sim, PROMPTS, FLUX_SETTINGS, seed=3, batch_size=2)) < 1e-4
    assert not torch.allclose(plain, got, atol=1e-3)
    assert set(onx.transformer._sessions) == {switched["graph"]}  # the uncached call runs the same session


def test_cut_graph_layout_still_loads_and_generates_the_same(flux_art, flux_art_cut):
    """Exports in the earlier layout (one cut graph, so one session, per distinct step) load and generate
    the switched export's images exactly."""
    path, record = flux_art_cut
    assert "switched" not in record and len(set(record["steps"])) == 3 and record["steps"][1] == record["steps"][3]
    cut = export.load(path, runtime="onnx")
    one = export.load(flux_art[0], runtime="onnx")
    images = [generate(p, PROMPTS, FLUX_SETTINGS, seed=3, batch_size=2) for p in (cut, one)]
    assert torch.equal(*images)
    assert set(cut.transformer._sessions) == set(record["steps"])
    assert cut.qsched_cache.counts() == one.qsched_cache.counts() == {"computed": 18, "reused": 6}


def test_switched_graph_computes_what_each_cut_graph_computes(flux_art, tmp_path):
    """Per reuse pattern (the schedule's, and one reusing every cached component, whose runs feed each
    other), the switched graph's output equals the cut graph's bit for bit, and the nodes it skips (inside If
    nodes switched off) are the ones the cut graph removed, weights included."""
    from export.runtime_onnx import make_session, switch_feed

    path, record = flux_art
    stored = onnx.load(str(path / record["switched"]["graph"]), load_external_data=False)
    onnx.checker.check_model(str(path / record["switched"]["graph"]))  # a valid ONNX model
    shutil.copy(path / "onnx" / "denoiser.onnx.data", tmp_path)  # graphs saved here read the same weights
    full_graph = onnx.load(str(path / record["graph"]), load_external_data=False)
    patterns = [set(p) for p in dict.fromkeys(map(tuple, record["switched"]["reuse"]))] + [{0, 1, 3, 5}]
    graph, conditions = switched_graph(full_graph, patterns)
    assert [n.op_type for n in switched_graph(full_graph, patterns[:-1])[0].graph.node] == \
        [n.op_type for n in stored.graph.node]  # the export's graph is this function's
    onnx.save(graph, str(tmp_path / "switched.onnx"))
    switches = [n for n in graph.graph.node if n.op_type == "If"]
    compute = {s.name: next(a.g for a in s.attribute if a.name == "then_branch") for s in switches}
    assert switches and not any(n.op_type == "If" for g in compute.values() for n in g.node)
    typed = {v.name for v in graph.graph.value_info}
    assert not any(o in typed for s in switches for o in s.output if not o.startswith("cache."))

    full_session = make_session(path / record["graph"], record, threads=1)
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal(i.shape).astype(np.float32) if "float" in i.type else
            np.zeros(i.shape, np.int64) for i in full_session.get_inputs()}
    names = [o.name for o in full_session.get_outputs()]
    full = dict(zip(names, full_session.run(names, feed)))
    session = make_session(tmp_path / "switched.onnx", record, threads=1)
    nbits = lambda nodes: sum(n.op_type == "MatMulNBits" for n in nodes)  # noqa: E731

    def skipped(flags):
        return [n for s in switches if not flags[int(s.input[0].split(".")[1])] for n in compute[s.name].node]

    for pattern, flags in zip(patterns, conditions):
        given = {i.name: full["cache." + i.name.removeprefix("stored.")] for i in session.get_inputs()
                 if i.name.startswith("stored.") and int(i.name.split(".")[1]) in pattern}
        got = session.run([OUTPUT], switch_feed(session, feed, flags, given))[0]
        cut_graph = reuse_variant(full_graph, pattern) if pattern else full_graph
        onnx.save(cut_graph, str(tmp_path / "cut.onnx"))
        cut = make_session(tmp_path / "cut.onnx", record, threads=1)
        reused = {i.name: full[i.name] for i in cut.get_inputs() if i.name.startswith("cache.")}
        assert np.array_equal(got, cut.run([OUTPUT], {**feed, **reused})[0])
        assert nbits(full_graph.graph.node) - nbits(skipped(flags)) == nbits(cut_graph.graph.node)
        assert bool(pattern) == bool(skipped(flags))
    with pytest.raises(ValueError, match="no cached outputs"):
        switched_graph(full_graph, [{4}])  # proj_mlp is never reused, so never exported as a cache output


def test_reuse_variant_cuts_the_reused_components(flux_art_cut):
    path, record = flux_art_cut
    full = onnx.load(str(path / "onnx" / "denoiser.onnx"), load_external_data=False)
    variant = onnx.load(str(path / record["steps"][1]), load_external_data=False)
    ins = {i.name for i in variant.graph.input}
    assert {"cache.0.0.0", "cache.0.0.1", "cache.1.0.0"} <= ins  # double block attn (two streams) and ff
    assert not any(o.name.startswith(("cache.0.", "cache.1.")) for o in variant.graph.output)
    nbits = lambda m: sum(n.op_type == "MatMulNBits" for n in m.graph.node)  # noqa: E731
    assert nbits(variant) < nbits(full)
    # cut by hand: the same as the stored variant
    assert [n.op_type for n in reuse_variant(full, {0, 1}).graph.node] == [n.op_type for n in variant.graph.node]
    with pytest.raises(ValueError, match="no cached outputs"):
        reuse_variant(full, {4})  # proj_mlp is never reused, so never exported as a cache output


def test_pixart_cfg_generation_with_cache_matches_torch(pixart_art):
    path, record = pixart_art
    assert record["input_dtypes"]["timestep"] == "int64"
    assert any(f["op"] == "Conv" for f in record["layers"].values())  # the patch embedding
    sim = export.load(path)
    onx = export.load(path, runtime="onnx")
    expected = generate(sim, PROMPTS, PIXART_SETTINGS, seed=5, batch_size=2)
    got = generate(onx, PROMPTS, PIXART_SETTINGS, seed=5, batch_size=2)
    assert expected.std() > 0.01
    assert rel_err(got, expected) < 1e-4
    assert onx.qsched_cache.counts() == sim.qsched_cache.counts()
    assert onx.qsched_cache.counts()["reused"] > 0


def test_manifest_lists_onnx_files_with_checksums(flux_art, tmp_path):
    path, record = flux_art
    manifest = export.loader.read_manifest(path, verify=True)
    listed = {rel for rel in manifest["files"] if rel.startswith("onnx/")}
    on_disk = {f"onnx/{p.name}" for p in (path / "onnx").iterdir()}
    assert listed == on_disk and {"onnx/denoiser.onnx", "onnx/denoiser.onnx.data"} <= listed
    for rel in listed:
        assert manifest["files"][rel]["sha256"] == hashlib.sha256((path / rel).read_bytes()).hexdigest()
    assert manifest["onnx"] == record
    assert not list(path.glob(".onnx*"))  # no temporary folder left behind
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    data = bytearray((broken / "onnx" / "denoiser.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "onnx" / "denoiser.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="denoiser.onnx.data"):
        export.load(broken, runtime="onnx")


def test_existing_export_is_not_replaced_without_overwrite(flux_art):
    path, _ = flux_art
    with pytest.raises(ArtifactError, match="already has an ONNX export"):
        export_onnx(path)


def test_artifact_without_onnx_export_is_refused(flux_art, tmp_path):
    path, _ = flux_art
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest.pop("onnx")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("onnx/")}
    (plain / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(plain / "onnx")
    with pytest.raises(ArtifactError, match="no ONNX export.*--export onnx"):
        export.load(plain, runtime="onnx")
    export.load(plain)  # the other runtimes are unaffected


def test_missing_packages_say_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(QschedError, match=r"onnxruntime.*pip install 'qsched\[onnx\]'"):
        require_onnx()


def test_cli_reports_missing_onnx_before_compiling(monkeypatch, tmp_path, capsys):
    import export.runtime_onnx as runtime_onnx
    from qsched import cli

    def missing(runtime_only=False):
        raise QschedError("the ONNX runtime needs onnxruntime, which is not installed; install them with "
                          "`pip install 'qsched[onnx]'`")

    monkeypatch.setattr(runtime_onnx, "require_onnx", missing)
    code = cli.main(["--model", "flux-tiny", "--out", str(tmp_path / "a"), "--export", "onnx", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qcompile: error:") and "qsched[onnx]" in err
    assert not (tmp_path / "a").exists()


def test_switched_graph_gives_each_group_its_own_shared_quantizer(tmp_path):
    """Two layers in different cached components read one activation quantizer (the exporter merges equal
    ones): each If gets its own Q/DQ copy, so onnxruntime can fuse it with the layer's MatMul, and every
    pattern still computes what its cut graph computes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.runtime_onnx import switch_feed

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dequant"),
             helper.make_node("MatMul", ["d", "w1"], ["cache.0.0.0"], name="layer0"),
             helper.make_node("MatMul", ["d", "w2"], ["cache.1.0.0"], name="layer1"),
             helper.make_node("Add", ["cache.0.0.0", "cache.1.0.0"], [OUTPUT], name="sum")]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3])  # noqa: E731
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [value(OUTPUT), value("cache.0.0.0"), value("cache.1.0.0")], initializer=inits,
                              value_info=[helper.make_tensor_value_info("q", TensorProto.UINT8, [2, 4]),
                                          helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 4])])
    full = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    patterns = [set(), {0}, {1}]
    switched, conditions = switched_graph(full, patterns)
    assert [n.name for n in full.graph.node] == ["quant", "dequant", "layer0", "layer1", "sum"]  # not modified
    assert [n.op_type for n in switched.graph.node] == ["If", "If", "Add"]  # the quantizer went into both
    for node in switched.graph.node[:2]:
        compute = next(a.g for a in node.attribute if a.name == "then_branch")
        assert [n.op_type for n in compute.node] == ["QuantizeLinear", "DequantizeLinear", "MatMul"]
    session = ort.InferenceSession(switched.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    whole = dict(zip(["y", "c0", "c1"], ort.InferenceSession(full.SerializeToString(), providers=[
        "CPUExecutionProvider"]).run([OUTPUT, "cache.0.0.0", "cache.1.0.0"], {"x": x})))
    for pattern, flags in zip(patterns, conditions):
        stored = {f"stored.{slot}.0.0": whole[f"c{slot}"] for slot in pattern}
        got = session.run([OUTPUT], switch_feed(session, {"x": x}, flags, stored))[0]
        assert np.array_equal(got, whole["y"])
