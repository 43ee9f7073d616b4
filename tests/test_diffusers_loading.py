"""The loading calls diffusers users know, on a qsched artifact: ``<Model>.from_pretrained(art, subfolder=...)``
and, for a bundle, ``DiffusionPipeline.from_pretrained(art)``; what they give equals ``export.load``'s denoiser
tensor for tensor, and pipeline features (``to(dtype)``, CPU offload, progress bars) keep working.

One bundled flux-tiny artifact per module, its linear layers cycling through every packed width, FP weights,
groups, FP activations and FP token rows. Offline and seeded; the two subprocess tests are the only places a
fresh interpreter is needed (what a user without qsched sees; registration before diffusers is imported).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TEST_WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on the left", "a blue square above a green triangle"]
#: (weight bits, activation bits, group size), cycled over the denoiser's linear layers
WIDTHS = [(4, 8, None), (8, 8, None), (3, None, None), (None, 8, None), (5, 8, 32), (2, None, None), (6, 8, 64)]
TEXT_LAYER = "context_embedder"  # serves BOS row 0 in FP, as MixDQ's BOS-aware text layers do


@pytest.fixture(scope="module")
def settings():
    from qsched.runtime.generation import GenerationSettings

    return GenerationSettings(steps=2, height=32, width=32, guidance_scale=0.0, max_sequence_length=16)


def _save_bundle(pipe, attr: str, out: Path, widths, rows=None, **manifest) -> Path:
    """``pipe``'s denoiser quantized with ``widths`` cycled over its linear and conv layers (``rows``: FP token
    rows by layer), written by ``save_quantized`` with ``--bundle``, as the compile writes one."""
    from export.save import save_quantized
    from qsched.core.bitplan import BitPlan, LayerPlan
    from qsched.runtime.apply import quantize_

    den, rows = getattr(pipe, attr), rows or {}
    names = [n for n, m in den.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    layers = {}
    for i, name in enumerate(names):
        w, a, g = widths[i % len(widths)]
        layers[name] = LayerPlan(w, a, group_size=g, params=den.get_submodule(name).weight.numel(),
                                 fp_tokens=list(rows[name].positions) if name in rows else [])
    plan = BitPlan(layers, target="mixed")
    quantize_(den, plan, {n: (-4.0, 4.0) for n in names}, fp_tokens=rows)
    return save_quantized(out, pipe, attr, plan, {"bits": "mixed", "source": {"kind": "test"}, **manifest}, bundle=True)


@pytest.fixture(scope="module")
def art(tmp_path_factory, settings):
    from calibrate.fp_tokens import FPTokens
    from qsched.tinyworld.model import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    text = pipe.transformer.get_submodule(TEXT_LAYER)
    bos = torch.randn(1, text.in_features)
    rows = {TEXT_LAYER: FPTokens((0,), bos, text(bos).detach())}
    return _save_bundle(pipe, "transformer", tmp_path_factory.mktemp("dl") / "art", WIDTHS, rows,
                        generation=settings.to_dict())


@pytest.fixture(scope="module")
def loaded(art):
    import export

    return export.load(art)


def _assert_same_denoiser(ours, theirs):
    """Same module types at the same paths, and every tensor equal in value and dtype."""
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert _compute_dtypes(ours) == _compute_dtypes(theirs)


def _compute_dtypes(model) -> dict:
    return {n: m.compute_dtype for n, m in model.named_modules() if hasattr(m, "compute_dtype")}


def _denoise(denoiser, dtype=torch.float32):
    """One denoiser call on fixed inputs (what a sampler step does), in ``dtype``."""
    gen = torch.Generator().manual_seed(1)
    cfg = denoiser.config
    tokens, text_len = 16, 8
    ids = torch.zeros(tokens, 3)
    ids[:, 1], ids[:, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    text = torch.randn(2, text_len, cfg.joint_attention_dim, generator=gen)
    text[0, 0] = denoiser.get_submodule(TEXT_LAYER).fp_token_inputs[0]  # the stored BOS: its FP row comes out
    with torch.no_grad():
        return denoiser(hidden_states=torch.randn(2, tokens, cfg.in_channels, generator=gen).to(dtype),
                        encoder_hidden_states=text.to(dtype),
                        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=gen).to(dtype),
                        timestep=torch.tensor([0.5, 0.5]).to(dtype), img_ids=ids, txt_ids=torch.zeros(text_len, 3),
                        return_dict=False)[0]


def test_artifact_is_a_diffusers_layout(art):
    """The denoiser is a component folder with a quantization_config; the bundle is laid out as save_pretrained does."""
    from export.diffusers_quantizer import QUANT_METHOD
    from export.format import read_manifest

    manifest = read_manifest(art)
    assert manifest["denoiser"]["shards"] == ["transformer/diffusion_pytorch_model.safetensors"]
    config = json.loads((art / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert config["quantization_config"]["layers"] == manifest["layers"]
    index = json.loads((art / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    saved = {k for k, v in index.items() if not k.startswith("_") and v[0] is not None}  # optional ones are null
    assert set(manifest["components"]) == saved - {"transformer"}


def test_from_pretrained_equals_export_load(art, loaded):
    from diffusers import FluxTransformer2DModel

    from export.diffusers_quantizer import QschedQuantizer

    denoiser = FluxTransformer2DModel.from_pretrained(art, subfolder="transformer", local_files_only=True)
    assert isinstance(denoiser.hf_quantizer, QschedQuantizer)
    _assert_same_denoiser(loaded.transformer, denoiser)
    assert torch.equal(_denoise(loaded.transformer), _denoise(denoiser))


def test_torch_dtype_on_load_equals_a_cast_after(art):
    """``torch_dtype=bf16`` casts what an FP model would cast; scales stay fp32, compute follows."""
    from diffusers import FluxTransformer2DModel

    import export
    from qsched.runtime.qlayers import QuantLayer

    cast = export.load(art).transformer.to(torch.bfloat16)
    denoiser = FluxTransformer2DModel.from_pretrained(art, subfolder="transformer", local_files_only=True,
                                                      torch_dtype=torch.bfloat16)
    _assert_same_denoiser(cast, denoiser)
    layers = [m for m in denoiser.modules() if isinstance(m, QuantLayer)]
    assert {m.compute_dtype for m in layers} == {torch.bfloat16}
    assert {m.weight_scale.dtype for m in layers if m.weight_bits} == {torch.float32}
    assert {m.act_scale.dtype for m in layers if m.act_bits} == {torch.float32}
    out = _denoise(denoiser, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, _denoise(cast, torch.bfloat16))


def test_native_layers_follow_a_cast(art, loaded):
    """The native runtime casts the same way, and a from_pretrained denoiser turns native as export.load's does."""
    from diffusers import FluxTransformer2DModel

    import export
    from export.runtime_torch import NativeDequantLayer, NativeInt8Linear, to_native_

    native = export.load(art, runtime="native").transformer
    denoiser = FluxTransformer2DModel.from_pretrained(art, subfolder="transformer", local_files_only=True)
    to_native_(denoiser)
    _assert_same_denoiser(native, denoiser)
    reference = _denoise(native)
    scales = {n: b.clone() for n, b in native.named_buffers() if n.endswith(("weight_scale", "out_scale"))}
    native.to(torch.bfloat16)
    layers = [m for m in native.modules() if isinstance(m, (NativeInt8Linear, NativeDequantLayer))]
    assert {type(m) for m in layers} == {NativeInt8Linear, NativeDequantLayer}
    assert {m.compute_dtype for m in layers} == {torch.bfloat16}
    after = dict(native.named_buffers())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], b) for n, b in scales.items())
    out = _denoise(native, torch.bfloat16).float()
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max()  # bf16 activations, same codes


def test_bundle_loads_with_diffusion_pipeline_from_pretrained(art, loaded, settings):
    """Same images as export.load (no Q-Sched coefficients here: the bundled scheduler is the base one)."""
    from diffusers import DiffusionPipeline, FluxPipeline

    from qsched.runtime.generation import generate

    pipe = DiffusionPipeline.from_pretrained(art, local_files_only=True)
    assert type(pipe) is FluxPipeline and type(pipe.scheduler) is type(loaded.scheduler)
    _assert_same_denoiser(loaded.transformer, pipe.transformer)
    assert torch.equal(generate(pipe, PROMPTS, settings, seed=3), generate(loaded, PROMPTS, settings, seed=3))


def test_pipeline_features_work_on_both_pipelines(art, settings, capsys):
    """to(dtype) (down and back), CPU offload and progress bar settings, on export.load's and diffusers' pipeline."""
    from diffusers import DiffusionPipeline

    import export
    from qsched.runtime.generation import call_arguments, generate

    for pipe in (export.load(art), DiffusionPipeline.from_pretrained(art, local_files_only=True)):
        expected = generate(pipe, PROMPTS[:1], settings, seed=5)
        pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks; on a GPU machine the default device
        assert torch.equal(generate(pipe, PROMPTS[:1], settings, seed=5), expected)
        pipe.set_progress_bar_config(desc="qsched-progress", disable=False)
        capsys.readouterr()
        pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **call_arguments(pipe, settings))
        assert "qsched-progress" in capsys.readouterr().err
        pipe.remove_all_hooks()
        pipe.to(torch.bfloat16)
        assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
        assert generate(pipe, PROMPTS[:1], settings, seed=5).isfinite().all()


def test_lora_on_a_diffusers_loaded_pipeline(art, settings, tmp_path):
    """export.lora.prepare_lora, called once, gives a DiffusionPipeline.from_pretrained pipeline what export.load's
    has: load_lora_weights changes the images, unload_lora_weights gives them back exactly."""
    peft = pytest.importorskip("peft")
    from diffusers import DiffusionPipeline, FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from export.lora import prepare_lora
    from qsched.runtime.generation import generate
    from qsched.tinyworld.model import build_tiny_pipeline

    fp = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    fp.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_mlp"]))
    with torch.no_grad():
        for name, param in fp.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # peft starts B at zero: give the adapter an effect
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(fp.transformer))

    pipe = prepare_lora(DiffusionPipeline.from_pretrained(art, local_files_only=True), "transformer")
    plain = generate(pipe, PROMPTS, settings, seed=3)
    pipe.load_lora_weights(tmp_path, adapter_name="test")
    assert not torch.equal(generate(pipe, PROMPTS, settings, seed=3), plain)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, PROMPTS, settings, seed=3), plain)


@pytest.mark.parametrize("family", ["sdxl", "pixart-bf16"])
def test_other_families_load_with_diffusion_pipeline_from_pretrained(family, tmp_path):
    """A UNet (quantized convolutions) and a PixArt DiT (recomputed positional buffers) load the same way;
    without ``torch_dtype`` a bf16 artifact loads in bf16, as from export.load (diffusers alone would pick fp32)."""
    from diffusers import DiffusionPipeline

    import export
    from qsched.models.tiny_pipelines import build_tiny_pixart_pipeline, build_tiny_sdxl_pipeline

    if family == "sdxl":
        pipe, attr = build_tiny_sdxl_pipeline(), "unet"
    else:
        pipe, attr = build_tiny_pixart_pipeline().to(torch.bfloat16), "transformer"
    art = _save_bundle(pipe, attr, tmp_path / family, [(4, 8, None), (8, 8, None), (None, 8, None)])
    theirs = getattr(DiffusionPipeline.from_pretrained(art, local_files_only=True), attr)
    ours = getattr(export.load(art), attr)
    assert theirs.dtype == (torch.bfloat16 if family == "pixart-bf16" else torch.float32)
    _assert_same_denoiser(ours, theirs)
    assert all(torch.equal(b, dict(theirs.named_buffers())[n]) for n, b in ours.named_buffers())


def _as_schema_2(art: Path, out: Path) -> Path:
    """``art`` in the schema-2 layout: ``transformer.safetensors`` at the top, the bundle under ``components/``."""
    from export.format import read_manifest

    manifest = read_manifest(art)
    shutil.copytree(art, out)
    shard = manifest["denoiser"]["shards"][0]
    (out / "transformer.safetensors").write_bytes((out / shard).read_bytes())
    shutil.rmtree(out / "transformer")
    (out / "components").mkdir()
    for name in [*manifest["components"], "model_index.json"]:
        shutil.move(out / name, out / "components" / name)
    files = {}
    for rel, entry in manifest["files"].items():
        if rel == shard:
            files["transformer.safetensors"] = entry
        elif rel.split("/")[0] in manifest["components"] or rel == "model_index.json":
            files[f"components/{rel}"] = entry
        elif not rel.startswith("transformer/"):
            files[rel] = entry
    manifest.update(schema_version=2, files=files)
    manifest["denoiser"]["shards"] = ["transformer.safetensors"]
    del manifest["components"]
    (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return out


def test_schema_2_artifacts_still_load(art, loaded, tmp_path):
    import export

    old = export.load(_as_schema_2(art, tmp_path / "v2"))
    assert old.qsched_manifest["schema_version"] == 2
    _assert_same_denoiser(loaded.transformer, old.transformer)
    assert type(old.vae) is type(loaded.vae)
    assert all(torch.equal(a, b) for a, b in zip(old.vae.state_dict().values(), loaded.vae.state_dict().values()))


def test_bad_inputs_are_one_clear_line(art, tmp_path):
    """A newer quantization_config, and an export folder named like a pipeline component."""
    from diffusers import FluxTransformer2DModel

    from export.amend import add_folder
    from qsched.core.errors import ArtifactError

    folder = tmp_path / "transformer"
    shutil.copytree(art / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"newer qsched .*pip install -U qsched"):
        FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer", local_files_only=True)
    with pytest.raises(ArtifactError, match="folder of the artifact's pipeline"):
        add_folder(art, "vae", lambda tmp: (tmp / "x.json").write_text("{}"), "vae_export", {}, overwrite=True)


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_without_qsched_diffusers_says_what_to_do(art):
    """A user without qsched (here: qsched and export made unimportable) gets diffusers' own error, whose one
    line names the install and the import."""
    run = _fresh_python("import sys\nsys.modules['qsched'] = sys.modules['export'] = None\n"
                        "from diffusers import DiffusionPipeline\n"
                        f"DiffusionPipeline.from_pretrained({str(art)!r}, local_files_only=True)\n")
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Unknown quantization type, got qsched (pip install qsched, then import "
                           "qsched before loading) - supported types are: ["), last


def test_import_qsched_registers_without_importing_diffusers(art):
    """``import qsched`` stays cheap (no diffusers) and still registers once diffusers loads its quantizers."""
    run = _fresh_python("import sys, qsched\nassert 'diffusers' not in sys.modules\n"
                        "from diffusers import FluxTransformer2DModel\n"
                        f"model = FluxTransformer2DModel.from_pretrained({str(art)!r}, subfolder='transformer', "
                        "local_files_only=True)\n"
                        "print(type(model.hf_quantizer).__name__, type(model.transformer_blocks[0].attn.to_q).__name__)\n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["QschedQuantizer", "QuantLayer"]
