"""GGUF export (export.gguf_export, export.gguf_quants): types follow the bit plan, fused groups take the widest
type, the file loads with diffusers' own ``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``
and generates what our W*A16 runtime generates, and layouts GGUF cannot express are refused before any write.

The FLUX test model is 256 wide (4 heads of 64) with one double and one single block, so its rows fit the
K-quants' 256-value blocks, except the three embedders whose inputs are 32 or 64 wide: those exercise the
32-block substitutions. Its bit plan cycles through every width and FP, with FP activations (W*A16: the
runtime a GGUF file is compared against, since GGUF has no activation quantization).

PSNR threshold: the GGUF pipeline differs from ours only by the GGML rounding of sub-block scales (fp16 times
a 4-8-bit integer; ~1e-3 relative on a weight at most) and by BF16 for the FP layers (fp32 here, 2^-9
relative). Measured: 83 dB (both prompts). Our own W*A16 quantization moves the same images by far more
against the FP model (~30-40 dB), so the test asks for GGUF-vs-ours above 60 dB and at least 20 dB above
ours-vs-FP: a wrong layout, a wrong type or a transposed member would show as noise.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import export  # noqa: E402
from conftest import TEST_WORDS  # noqa: E402
from export.gguf_export import (TYPE_FOR_BITS, check_family, check_model_family, export_gguf,  # noqa: E402
                                flux_layout, load_gguf_denoiser)
from export.gguf_quants import decode_rows, encode_rows  # noqa: E402
from qsched.core.errors import ArtifactError, QschedError  # noqa: E402
from qsched.runtime.generation import GenerationSettings, generate  # noqa: E402

T = gguf.GGMLQuantizationType
PROMPTS = ["a red circle on the left", "a blue square above a green triangle"]
SETTINGS = GenerationSettings(steps=4, height=32, width=32, guidance_scale=0.0, max_sequence_length=16)
BITS_CYCLE = [4, 8, 6, 5, 3, 2, None, 4, 5]  # every width and FP; q/k/v of a block get different widths
FLUX_256 = dict(num_layers=1, num_single_layers=1, attention_head_dim=64, axes_dims_rope=[16, 24, 24])


def _save(pipe, out, bits_for):
    from export.save import save_quantized
    from qsched.core.bitplan import BitPlan, LayerPlan
    from qsched.runtime.apply import quantize_

    den = pipe.transformer
    names = [n for n, m in den.named_modules() if isinstance(m, nn.Linear)]
    layers = {n: LayerPlan(bits_for(i), None, params=den.get_submodule(n).weight.numel()) for i, n in enumerate(names)}
    plan = BitPlan(layers=layers, method="test-gguf", target="mixed")
    quantize_(den, plan, {})
    manifest = {"source": {"kind": "test", "model": "tiny"}, "bits": "mixed", "generation": SETTINGS.to_dict(),
                "calibration_prompts": PROMPTS, "cache": {"schedule": None, "pareto_front": None}}
    return save_quantized(out, pipe, "transformer", plan, manifest, bundle=True)


@pytest.fixture(scope="module")
def flux_art(tmp_path_factory):
    """(artifact path, export record, FP images): the 256-wide FLUX test model at W*A16, GGUF exported."""
    from diffusers import FluxTransformer2DModel

    from qsched.tinyworld.model import TRANSFORMER_CONFIG, build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    torch.manual_seed(1)
    pipe.transformer = FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, **FLUX_256)).eval()
    fp_images = generate(pipe, PROMPTS, SETTINGS, seed=0)
    path = _save(pipe, tmp_path_factory.mktemp("gguf-flux") / "art", lambda i: BITS_CYCLE[i % len(BITS_CYCLE)])
    return path, export_gguf(path), fp_images


def _reader(path):
    return gguf.GGUFReader(str(path / "gguf" / "denoiser.gguf"))


def _field(reader, key):
    field = reader.get_field(key)
    value = field.parts[field.data[-1]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0]


# ----------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("qtype,bits", [(T.Q2_K, 2), (T.Q3_K, 3), (T.Q4_K, 4), (T.Q5_K, 5), (T.Q6_K, 6), (T.Q8_0, 8),
                                        (T.Q4_0, 4), (T.Q4_0, 2), (T.Q5_0, 5), (T.Q4_K, 3)])
def test_encoders_keep_the_grid(qtype, bits):
    """Values on a per-row grid come back on it (gguf-py's decoder and diffusers' torch decoder agree), and
    values off any grid are quantized as well as plain round-to-nearest would."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    rng = np.random.default_rng(bits)
    qmax = 2 ** (bits - 1) - 1
    step = ((rng.random((8, 1)) + 0.5) * 0.08 / qmax).astype(np.float32)
    values = rng.integers(-qmax, qmax + 1, size=(8, 512)) * step
    data = encode_rows(values, qtype, np.broadcast_to(step, values.shape))
    decoded = decode_rows(data, qtype, 512)
    assert np.abs(decoded - values).max() <= 0.1 * step.min()  # Q8_0 worst: code 127 × fp16 rounding of the step
    torch_decoded = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(data.copy()), quant_type=int(qtype)))
    np.testing.assert_allclose(torch_decoded.float().numpy().reshape(8, 512), decoded, atol=2e-4)
    noise = rng.standard_normal((8, 512)).astype(np.float32)
    off = decode_rows(encode_rows(noise, qtype), qtype, 512)
    sqnr = 10 * np.log10((noise ** 2).sum() / ((off - noise) ** 2).sum())
    assert sqnr > 6.02 * bits - 8  # about what b-bit round-to-nearest of a Gaussian reaches (e.g. 4 bits: 22 dB)


# ------------------------------------------------------------------------------------------- the file


def test_types_follow_the_plan(flux_art):
    path, record, _ = flux_art
    manifest = json.loads((path / "manifest.json").read_text())
    layers = manifest["layers"]
    tensors = {t.name: t for t in _reader(path).tensors}
    assert set(tensors) == set(record["tensors"])
    subs = {s["tensor"]: s for s in record["substitutions"]}
    for name, rec in record["tensors"].items():
        assert tensors[name].tensor_type.name == rec["type"], name
        if not name.endswith(".weight") or len(tensors[name].shape) == 1:
            assert rec["type"] == "F32", name  # biases and norm scales
            continue
        bits = [layers.get(m, {}).get("weight_bits") for m in rec["from"]]  # FP layers are not listed
        widest = None if None in bits else max(bits)
        assert rec["bits"] == bits
        if name in subs:  # only rows no K-quant block fits: the embedders' 32/64-wide inputs
            assert subs[name]["wanted"] == TYPE_FOR_BITS[widest] and int(tensors[name].shape[0]) in (32, 64)
            assert rec["type"] in ("Q8_0", "Q5_0", "Q4_0")
        else:
            assert rec["type"] == TYPE_FOR_BITS[widest], name
    assert set(subs) == {"img_in.weight", "txt_in.weight", "vector_in.in_layer.weight"}
    # fused groups: one type, the widest member's, recorded
    assert set(record["fused"]) == {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
                                    "single_blocks.0.linear1.weight"}
    for name, group in record["fused"].items():
        bits = list(group["members"].values())
        assert len(set(bits)) > 1  # the plan gave the members different widths
        assert group["type"] == TYPE_FOR_BITS[None if None in bits else max(bits)] == record["tensors"][name]["type"]


def test_metadata_comfyui_reads(flux_art):
    path, record, _ = flux_art
    reader = _reader(path)
    assert _field(reader, "general.architecture") == "flux"  # ComfyUI-GGUF picks the model type by it
    assert _field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert gguf.LlamaFileType(_field(reader, "general.file_type")).name == record["file_type"]
    assert json.loads(_field(reader, "qsched.fused")) == record["fused"]
    assert json.loads(_field(reader, "qsched.substitutions")) == record["substitutions"]
    assert _field(reader, "qsched.source_manifest_sha256") == record["source_manifest_sha256"]
    assert any(name.startswith("double_blocks.0.img_attn.qkv") for name in record["tensors"])  # BFL keys


def test_weights_are_the_artifacts(flux_art):
    """Every GGUF tensor decodes (gguf-py) to the artifact's own dequantized weights, mapped back through the
    layout: grid-encoded types to 1e-3 of the row's largest weight, BF16 to its rounding."""
    from export.loader import build_denoiser
    from export.format import load_shard, read_manifest

    path, record, _ = flux_art
    manifest = read_manifest(path)
    denoiser = build_denoiser(manifest, load_shard(path, manifest["denoiser"]["shards"][0]))
    state = {}
    for name, module in denoiser.named_modules():
        if hasattr(module, "dequantized_weight"):
            state[f"{name}.weight"] = module.dequantized_weight().detach().numpy()
    state.update({k: v.numpy() for k, v in denoiser.state_dict().items() if k not in state and v.is_floating_point()})
    for t in _reader(path).tensors:
        cols = int(t.shape[0])
        decoded = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, cols) if len(t.shape) > 1 \
            else np.asarray(t.data, dtype=np.float32)
        rec = record["tensors"][t.name]
        leaf = "weight" if t.name.endswith(".weight") and len(t.shape) > 1 else "bias"
        parts = [state[f"{m}.{leaf}"] for m in rec["from"]] if rec["from"][0] + "." + leaf in state \
            else [state[rec["from"][0]]]
        expected = np.concatenate(parts, axis=0).reshape(decoded.shape)
        if t.name.startswith("final_layer.adaLN_modulation"):
            expected = np.concatenate(np.split(expected, 2, axis=0)[::-1], axis=0)
        scale = np.abs(expected).max(axis=-1, keepdims=True) + 1e-12
        tol = {"F32": 1e-7, "BF16": 4e-3}.get(rec["type"], 1e-3)
        assert (np.abs(decoded - expected) / scale).max() <= tol, (t.name, rec["type"])


def test_diffusers_single_file_loads_and_generates(flux_art):
    """diffusers' from_single_file with GGUFQuantizationConfig: every layer in place (GGUFLinear for the
    quantized ones), and images at the PSNR the module docstring justifies against our W*A16 runtime."""
    from diffusers import FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from qsched.metrics import psnr

    path, record, fp_images = flux_art
    gguf_denoiser = load_gguf_denoiser(path, compute_dtype=torch.float32)
    config = json.loads((path / "gguf" / "config.json").read_text())
    with torch.device("meta"):
        reference = FluxTransformer2DModel.from_config(config)
    assert set(gguf_denoiser.state_dict()) == set(reference.state_dict())  # no missing or unexpected keys
    assert not any(p.is_meta for p in gguf_denoiser.parameters())
    assert isinstance(gguf_denoiser.transformer_blocks[0].attn.to_q, GGUFLinear)

    pipe = export.load(path)
    ours = generate(pipe, PROMPTS, SETTINGS, seed=0)
    pipe.transformer = gguf_denoiser
    theirs = generate(pipe, PROMPTS, SETTINGS, seed=0)
    gguf_vs_ours, ours_vs_fp = psnr(theirs, ours), psnr(ours, fp_images)
    assert gguf_vs_ours.min() > 60.0, gguf_vs_ours
    assert gguf_vs_ours.min() > ours_vs_fp.max() + 20.0, (gguf_vs_ours, ours_vs_fp)


def test_listed_checked_and_not_replaced_silently(flux_art):
    path, record, _ = flux_art
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"gguf/denoiser.gguf", "gguf/config.json"} <= set(manifest["files"])
    assert manifest["gguf"]["tensors"] == record["tensors"]
    assert record["bytes"] == manifest["files"]["gguf/denoiser.gguf"]["bytes"] == (path / "gguf/denoiser.gguf").stat().st_size
    export.load(path, verify=True)  # checksums pass with the export added
    with pytest.raises(ArtifactError, match="already has a GGUF export"):
        export_gguf(path)


# --------------------------------------------------------------------------------------- bad input


def test_non_flux_artifact_refused_before_writing(tmp_path):
    from diffusers import PixArtTransformer2DModel

    from qsched.models.tiny_pixart import PIXART_TRANSFORMER_CONFIG, build_tiny_pixart_pipeline

    pipe = build_tiny_pixart_pipeline(seed=0, words=TEST_WORDS)
    pipe.transformer = PixArtTransformer2DModel(**dict(PIXART_TRANSFORMER_CONFIG, num_layers=1)).eval()
    path = _save(pipe, tmp_path / "pixart", lambda i: 8)
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(QschedError) as err:
        export_gguf(path)
    message = str(err.value)
    assert "\n" not in message and "PixArtTransformer2DModel" in message and "FluxTransformer2DModel" in message
    assert "--export onnx" in message
    assert (path / "manifest.json").read_bytes() == before and not (path / "gguf").exists()
    assert not list(tmp_path.glob(".*gguf*"))  # no temporary folder left beside it


def test_cli_refuses_non_flux_before_any_work(tmp_path, capsys):
    from qsched.cli import main

    with pytest.raises(QschedError, match="UNet2DConditionModel"):
        check_model_family("sdxl-turbo")
    check_model_family("flux-tiny")
    check_model_family("flux-schnell")
    with pytest.raises(QschedError, match="PixArtTransformer2DModel"):
        check_family("PixArtTransformer2DModel")
    out = tmp_path / "never"
    assert main(["--model", "sdxl-turbo", "--bits", "w4a8", "--export", "gguf", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qcompile: error: --export gguf cannot express") and "\n" not in err
    assert not out.exists()


def test_layout_covers_flux_dev_and_schnell():
    """The layout names every tensor of the real FLUX.1 configs exactly once (guidance_in only for dev)."""
    from diffusers import FluxTransformer2DModel

    from qsched.models.shipped_configs import load_component_config

    for name, guidance in (("flux-schnell", False), ("flux-dev", True)):
        config = {k: v for k, v in load_component_config(name, "transformer").items() if not k.startswith("_")}
        with torch.device("meta"):
            keys = set(FluxTransformer2DModel.from_config(config).state_dict())
        layout = flux_layout(config)
        mapped = [m + leaf if e.linear else m for e in layout for m in e.members
                  for leaf in ((".weight", ".bias") if e.linear else ("",))]
        assert sorted(mapped) == sorted(keys), name
        assert any(e.name.startswith("guidance_in") for e in layout) == guidance
