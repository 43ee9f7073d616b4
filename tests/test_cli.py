"""Bad input to ``qcompile``: one-line error, non-zero exit, no traceback, no partial output."""
import json
import os
import subprocess
import sys

import pytest

from qsched.cli import build_parser, main


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qsched.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("qcompile: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_flux_schnell_w4a8_is_accepted_exactly_as_written():
    args = build_parser().parse_args(["--model", "flux-schnell", "--bits", "w4a8"])
    assert (args.model, args.bits) == ("flux-schnell", "w4a8")


def test_bad_bits(tmp_path):
    result = run_cli("--model", "flux-tiny", "--bits", "w7a8", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "w7a8", "w{2,3,4,5,6,8}a{4,8,16}")
    assert not (tmp_path / "a").exists()


def test_unknown_model(tmp_path):
    result = run_cli("--model", "no_such_model", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "unknown model", "flux-schnell")
    assert not (tmp_path / "a").exists()


def test_hub_unreachable_names_the_alternatives(tmp_path):
    result = run_cli("--model", "some-org/some-model", "--no-qsched", "--no-cache-search", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "hub", "local diffusers directory", "flux-tiny", "--init random")
    assert not (tmp_path / "a").exists()


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("--model", "flux-tiny", "--out", str(blocker / "art"))
    assert_one_line_error(result, "cannot write")
    assert not list(tmp_path.glob(".*tmp*"))


def test_existing_out_is_not_clobbered(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    result = run_cli("--model", "flux-tiny", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "already exists", "--overwrite")
    assert (tmp_path / "a" / "keep.txt").read_text() == "mine"


def test_missing_local_directory_is_not_a_pipeline(tmp_path):
    result = run_cli("--model", str(tmp_path), "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "model_index.json")


def test_bad_device():
    result = run_cli("--device", "cuda:0")
    assert_one_line_error(result, "cuda")


def test_bad_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration:\n  prompt: 3\n")
    result = run_cli("--recipe", str(recipe), "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "'prompt'", "valid keys")


def test_fractional_bits_with_uniform_is_a_clear_error(tiny_pipeline_dir, tmp_path):
    result = run_cli("--model", str(tiny_pipeline_dir), "--bits", "w3.5a8", "--uniform", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, "fractional", "mixed precision")
    assert not (tmp_path / "a").exists()


def test_main_compiles_a_local_pipeline(tiny_pipeline_dir, tmp_path, capsys):
    code = main(["--model", str(tiny_pipeline_dir), "--bits", "w8a8", "--out", str(tmp_path / "art"),
                 "--recipe", str(_small_recipe(tmp_path)), "--eval-prompts", "0", "--quiet", "--uniform", "--no-qsched",
                 "--no-cache-search"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits"] == "w8a8" and (tmp_path / "art" / "manifest.json").is_file()
    assert summary["stages"]["calibrate"] == "done (uniform-rtn)" or summary["stages"]["calibrate"].startswith("done (")
    assert summary["stages"]["coefficients"].startswith("skipped: switched off (--no-qsched")


def test_corrupt_artifact_fails_to_load_with_a_clear_error(tiny_pipeline_dir, tmp_path):
    assert main(["--model", str(tiny_pipeline_dir), "--bits", "w4a8", "--out", str(tmp_path / "art"),
                 "--eval-prompts", "0", "--quiet", "--recipe", str(_small_recipe(tmp_path)),
                 "--uniform", "--no-qsched", "--no-cache-search"]) == 0
    shard = tmp_path / "art" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    import export
    from qsched.core.errors import ArtifactError
    with pytest.raises(ArtifactError, match="transformer/diffusion_pytorch_model.safetensors"):
        export.load(tmp_path / "art")


def _small_recipe(tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text("calibration: {prompts: 2, batch_size: 2}\nquantization: {rounding: rtn}\n"
                      "report: {samples: 0, fp_copy_max_gb: 0}\n")  # the cheapest compile that reaches export
    return recipe


def test_cluster_summary_without_ray_started_starts_nothing(monkeypatch):
    """--ray with no stage that needs it (e.g. --uniform --no-cache-search) used to crash at export."""
    ray = pytest.importorskip("ray")
    from qsched.distributed import cluster_summary
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("cluster_summary must not start Ray"))
    assert cluster_summary() == {"connected": False, "nodes": 0, "cpus": 0, "gpus": 0}


def test_ray_flag_with_no_distributed_stage_compiles(tmp_path, capsys):
    pytest.importorskip("ray")
    code = main(["--model", "flux-tiny", "--bits", "w4a8", "--uniform", "--no-qsched", "--no-cache-search",
                 "--ray", "local", "--recipe", str(_small_recipe(tmp_path)), "--eval-prompts", "0", "--quiet",
                 "--out", str(tmp_path / "art")])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["ray"]["address"] == "local" and "connected" in manifest["ray"]
