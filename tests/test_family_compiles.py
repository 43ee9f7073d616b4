"""The whole default compile, through ``qcompile``, on a local pipeline of each family: FLUX, an SDXL UNet and
PixArt-Σ, all tiny and random. Nothing is switched off (MixDQ, Q-Sched, the cache search, the report with its
baselines), only shrunk by a small recipe; a tiny random CLIP directory is the scorer, as a user without the
hub passes one. The artifact then loads with ``export.load`` and draws an image."""
import json

import pytest
import torch

from qsched.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# every budget at its smallest: each method runs, on as few prompts and evaluations as it takes
SMALL_RECIPE = """\
calibration: {prompts: 4, batch_size: 4}
quantization: {sensitivity_prompts: 2, weight_widths: [4, 8]}
generation: {steps: 2, height: 32, width: 32}
coefficients: {budget: 2, prompts: 2, heldout_prompts: 2}
cache_search: {population: 4, generations: 1, prompts: 2, guard_prompts: 2}
report: {samples: 1, repeats: 1}
"""
BASELINES = {"fp", "rtn", "fora-2", "fora-3"}
# Q-Sched runs on every family's own scheduler (FLUX: flow Euler; SDXL: Euler ancestral; PixArt-Σ: DPM-Solver++)
COEFFICIENTS = ("done", "kept identity")
FAMILIES = ["flux", "sdxl", "pixart-sigma"]


@pytest.fixture(scope="module")
def local_pipeline(tmp_path_factory, request):
    """``family -> directory``: each tiny pipeline saved with ``save_pretrained``, built on first use."""
    from conftest import TEST_WORDS

    from qsched.models.tiny_pipelines import (
        build_tiny_pixart_sigma_pipeline,
        build_tiny_sdxl_pipeline,
    )

    builders = {"sdxl": build_tiny_sdxl_pipeline, "pixart-sigma": build_tiny_pixart_sigma_pipeline}
    built = {}

    def get(family):
        if family == "flux":
            return request.getfixturevalue("tiny_pipeline_dir")
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"tiny-{family}")
            builders[family](seed=0, words=TEST_WORDS).save_pretrained(built[family])
        return built[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_compile_runs_every_method_on_a_local_pipeline(family, local_pipeline, tiny_clip_dir, tmp_path,
                                                                   capsys):
    import export

    recipe = tmp_path / "small.yaml"
    recipe.write_text(SMALL_RECIPE)
    out = tmp_path / "art"
    code = main(["--model", str(local_pipeline(family)), "--bits", "w4a8", "--out", str(out), "--recipe", str(recipe),
                 "--scorer", str(tiny_clip_dir), "--eval-prompts", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err

    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    assert stages["calibrate"]["status"] == "done" and stages["calibrate"]["method"] == "mixdq"
    assert stages["coefficients"]["status"] in COEFFICIENTS, stages["coefficients"]
    assert stages["coefficients"]["runs"] >= 2  # identity and at least one learned candidate were sampled
    assert stages["cache_search"]["status"] == "done", stages["cache_search"]
    assert manifest["profile"]["scorer"] == str(tiny_clip_dir)

    data = json.loads((out / "report" / "data.json").read_text())
    baselines = {p["id"]: p for p in data["points"] if p["kind"] == "baseline"}
    assert set(baselines) == BASELINES and all(p["measured"] for p in baselines.values()), baselines
    assert data["quality"]["measured"]

    pipe = export.load(out)
    images = pipe(["a red circle on the left"], output_type="pt").images  # at the artifact's settings: 2 steps
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_a_local_pipeline_without_a_scorer_is_one_line_naming_the_ways_out(tiny_pipeline_dir, tmp_path, capsys):
    """No ``--scorer`` and no ``scorer:`` in the recipe: exit 2 before the model loads, nothing written.
    (``test_profiles`` checks the same through the API; this is the command line's one line.)"""
    recipe = tmp_path / "no-scorer.yaml"
    recipe.write_text(SMALL_RECIPE)
    code = main(["--model", str(tiny_pipeline_dir), "--bits", "w4a8", "--out", str(tmp_path / "art"),
                 "--recipe", str(recipe), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), err
    assert "--scorer" in lines[0] and "CLIP directory" in lines[0]
    assert "--no-qsched --no-cache-search" in lines[0] and "flux-tiny" in lines[0]
    assert not (tmp_path / "art").exists()


def test_a_one_step_compile_records_the_cache_search_as_skipped(local_pipeline, tiny_clip_dir, tmp_path):
    """SDXL-Turbo samples in one step: nothing to reuse, so the stage is skipped with the reason (it used to
    end the compile with a traceback after calibrate and Q-Sched)."""
    recipe = tmp_path / "one-step.yaml"
    recipe.write_text(SMALL_RECIPE.replace("steps: 2", "steps: 1"))
    out = tmp_path / "art"
    code = main(["--model", str(local_pipeline("sdxl")), "--bits", "w8a8", "--uniform", "--no-qsched",
                 "--recipe", str(recipe), "--scorer", str(tiny_clip_dir), "--out", str(out), "--eval-prompts", "0",
                 "--quiet"])
    assert code == 0
    stage = json.loads((out / "manifest.json").read_text())["stages"]["cache_search"]
    assert stage["status"] == "skipped" and "1-step sampler" in stage["reason"]
