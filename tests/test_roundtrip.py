"""Compile → artifact on disk → load in a fresh process → the same images, bit for bit."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import qsched
from qsched.runtime.qlayers import QuantLayer
from export.format import SCHEMA_VERSION
from export.packing import packed_nbytes
from qsched.runtime.generation import GenerationSettings, generate

PROMPTS = ["a red circle on the left", "a blue square above a green triangle", "a green circle", "a red square"]
LOAD_AND_GENERATE = """
import sys, export
from safetensors.torch import save_file
from qsched.runtime.generation import GenerationSettings, generate
pipe = export.load(sys.argv[1])
s = GenerationSettings(**pipe.qsched_manifest["generation"])
save_file({"images": generate(pipe, sys.argv[3:], s, seed=7, batch_size=2).contiguous()}, sys.argv[2])
"""


@pytest.fixture(scope="module", params=["w4a8", "w8a8"])
def compiled(request, tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / f"tiny-{request.param}"
    return qsched.compile(str(tiny_pipeline_dir), request.param, out=out, eval_prompts=0, progress=False,
                          uniform=True, coefficients=False, cache_search=False,
                          recipe=qsched.recipe.Recipe(calibration=qsched.recipe.CalibrationConfig(prompts=8),
                                              report=qsched.recipe.ReportConfig(samples=0)))


def test_fresh_process_load_matches_in_memory_bit_for_bit(compiled, tmp_path):
    pipe = compiled.compiled_pipeline
    settings = GenerationSettings(**compiled.manifest["generation"])
    expected = generate(pipe, PROMPTS, settings, seed=7, batch_size=2)
    out = tmp_path / "loaded.safetensors"
    run = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(compiled.path), str(out), *PROMPTS],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = load_file(out)["images"]
    assert torch.equal(expected, loaded)
    assert expected.std() > 0.01  # real images, not a constant


def test_a_bare_call_draws_at_the_compiled_settings(compiled):
    """``pipe(prompt)`` on a loaded artifact uses its generation settings (not diffusers' 28 steps and
    512-token text); arguments the caller passes still win."""
    import export
    from qsched.runtime.generation import call_arguments

    pipe = export.load(compiled.path)
    settings = GenerationSettings(**compiled.manifest["generation"])
    assert type(pipe).__name__ == "FluxPipeline" and pipe.call_defaults["num_inference_steps"] == settings.steps
    assert pipe.call_defaults.get("max_sequence_length") == settings.max_sequence_length

    def draw(**kwargs):
        return pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(3), output_type="pt", **kwargs).images

    bare = draw()
    assert bare.shape[-2:] == (settings.height, settings.width)
    assert torch.equal(bare, draw(**call_arguments(pipe, settings)))
    assert not torch.equal(bare, draw(num_inference_steps=1))


def test_artifact_holds_packed_weights_of_every_quantized_layer(compiled):
    manifest = compiled.manifest
    bits = int(manifest["bits"][1])
    from export.format import load_shard
    tensors = load_shard(compiled.path, manifest["denoiser"]["shards"][0])
    layers = manifest["layers"]
    assert len(layers) == sum(isinstance(m, QuantLayer) for m in compiled.compiled_pipeline.transformer.modules())
    for name, spec in layers.items():
        packed = tensors[f"{name}.qweight"]
        assert packed.numel() == packed_nbytes(int(np.prod(spec["weight_shape"])), bits)
        assert packed.dtype == (torch.uint8 if bits <= 4 else torch.int8)
        assert spec["weight_bits"] == bits and spec["act_bits"] == 8


def test_manifest_records_plan_sources_versions_and_checksums(compiled):
    m = json.loads((compiled.path / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION
    assert set(m["files"]) >= {"transformer/diffusion_pytorch_model.safetensors", "transformer/config.json"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["source"]["kind"] == "local" and len(m["source"]["denoiser_sha256"]) == 64
    gptq = any(lp.get("rounding") == "gptq" for lp in m["bit_plan"]["layers"].values())
    assert m["bit_plan"]["method"] == ("uniform-gptq" if gptq else "uniform-rtn") and m["bit_plan"]["layers"]
    assert gptq == (m["bits"] != "w8a8")  # the recipe's GPTQ rounding; 8-bit weights keep round-to-nearest
    assert set(m["tools"]) >= {"qsched", "torch", "diffusers", "transformers"}
    assert m["stages"]["coefficients"]["status"] == "skipped" and m["stages"]["cache_search"]["status"] == "skipped"
    # every planned layer with quantized activations has a calibrated range
    for name, plan in m["bit_plan"]["layers"].items():
        assert plan["act_bits"] is None or name in m["activation_ranges"]


def test_w4_is_about_four_times_smaller_than_bf16(compiled):
    size = compiled.metrics["size"]
    ratio = size["compression_vs_bf16"]
    # tiny models carry relatively more FP biases and norms than FLUX; the full-size check is a benchmark
    assert ratio > (3.0 if compiled.manifest["bits"] == "w4a8" else 1.6)


def test_bundled_artifact_loads_without_the_source(tiny_pipeline_dir, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(tiny_pipeline_dir, src)
    art = qsched.compile(str(src), "w8a8", out=tmp_path / "bundled", bundle=True, eval_prompts=0, progress=False,
                         uniform=True, coefficients=False, cache_search=False,
                         recipe=qsched.recipe.Recipe(calibration=qsched.recipe.CalibrationConfig(prompts=2),
                                              report=qsched.recipe.ReportConfig(samples=0)))
    settings = GenerationSettings(**art.manifest["generation"])
    expected = generate(art.compiled_pipeline, PROMPTS[:2], settings, seed=1)
    shutil.rmtree(src)
    import export
    assert torch.equal(generate(export.load(art.path), PROMPTS[:2], settings, seed=1), expected)


def test_fractional_budget_compiles_mixed_precision_and_round_trips(tiny_pipeline_dir, tmp_path):
    """w3.5a8 goes through MixDQ: mixed widths are packed per layer and load back bit for bit."""
    recipe = qsched.recipe.parse_recipe({
        "calibration": {"prompts": 4, "batch_size": 4}, "generation": {"steps": 2},
        "quantization": {"weight_widths": [2, 4, 8], "act_widths": [8], "sensitivity_prompts": 2}})
    art = qsched.compile(str(tiny_pipeline_dir), "w3.5a8", out=tmp_path / "mixed", recipe=recipe,
                         eval_prompts=0, progress=False, coefficients=False, cache_search=False)
    plan = art.bit_plan
    widths = {p.weight_bits for p in plan.layers.values()}
    assert plan.method == "mixdq" and len(widths) > 1 and widths <= {2, 4, 8}
    assert abs(plan.average_weight_bits() - 3.5) <= 0.02 + 1e-9
    assert art.manifest["stages"]["calibrate"]["allocation"]["status"] == "Optimal"
    assert "sensitivity.json" in art.manifest["files"]
    settings = GenerationSettings(**art.manifest["generation"])
    expected = generate(art.compiled_pipeline, PROMPTS[:2], settings, seed=5)
    import export
    assert torch.equal(generate(export.load(art.path), PROMPTS[:2], settings, seed=5), expected)
    # a rerun reuses the cached sensitivity table (work folder keyed by the inputs)
    assert any((tmp_path / ".qsched-work").rglob("*.json"))


def test_qsched_coefficients_are_saved_and_applied_on_load(compiled, tmp_path):
    """A pipeline sampling with Q-Sched coefficients round-trips: the loaded scheduler is wrapped the same."""
    from export.save import save_quantized
    from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients
    import export
    from qsched.core.bitplan import BitPlan

    pipe = compiled.compiled_pipeline
    base = pipe.scheduler
    probe = QSchedScheduler.wrap(base, None)
    probe.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))  # the grid the search records, as FluxPipeline sets it
    ramp = SchedulerCoefficients.linear_ramp(4, 1.08, 0.95)
    coeffs = SchedulerCoefficients(4, ramp.cx, ramp.ce, sigmas=[float(v) for v in probe.sigmas])
    pipe.scheduler = QSchedScheduler.wrap(base, coeffs)
    try:
        settings = GenerationSettings(**compiled.manifest["generation"])
        expected = generate(pipe, PROMPTS[:2], settings, seed=3)
        manifest = {k: v for k, v in compiled.manifest.items() if k not in ("files", "schema_version")}
        path = save_quantized(tmp_path / "qs", pipe, "transformer", BitPlan.from_dict(manifest["bit_plan"]), manifest)
    finally:
        pipe.scheduler = base
    assert not torch.equal(expected, generate(pipe, PROMPTS[:2], settings, seed=3))  # coefficients matter
    loaded = export.load(path)
    assert isinstance(loaded.scheduler, QSchedScheduler) and loaded.scheduler.coefficients == coeffs
    assert torch.equal(generate(loaded, PROMPTS[:2], settings, seed=3), expected)
    # the recorded grid travels with the artifact: rewrapped with interpolate=True, 8 steps read the field
    loaded.scheduler = QSchedScheduler.wrap(loaded.scheduler.unwrap(), loaded.scheduler.coefficients, interpolate=True)
    loaded.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8))
    got, want = loaded.scheduler.coefficients_for(8), coeffs.field_resampled([float(v) for v in loaded.scheduler.sigmas])
    assert got.steps == 8 and got.cx == pytest.approx(want.cx) and got.ce == want.ce
