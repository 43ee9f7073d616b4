"""Model profiles and scorers: every method on every model, no special case for the embedded one."""
import json

import pytest

import qsched
from qsched.core.errors import QschedError
from qsched.models.profiles import PROMPT_SETS, ModelProfile
from qsched.recipe import Recipe, parse_recipe
from qsched.tinyworld.model import TINY_SETTINGS

SMALL = {"calibration": {"prompts": 2, "batch_size": 2}, "quantization": {"method": "uniform"},
         "coefficients": {"budget": 2, "prompts": 2, "heldout_prompts": 2},
         "cache_search": {"population": 4, "generations": 0, "prompts": 2, "guard_prompts": 2},
         "report": {"samples": 2, "repeats": 1}}


class _Stop(Exception):
    pass


def test_integer_bits_run_mixdq_by_default_and_uniform_opts_out(monkeypatch, tmp_path):
    import calibrate.calibration

    seen = []

    def record(pipe, spec, prompts, settings, config, **kwargs):
        seen.append(config.method)
        raise _Stop

    monkeypatch.setattr(calibrate.calibration, "calibrate", record)
    assert Recipe().quantization.method == "mixdq"
    for uniform in (False, True):
        with pytest.raises(_Stop):
            qsched.compile("flux-tiny", "w4a8", out=tmp_path / f"a{uniform}", recipe=Recipe(), uniform=uniform,
                           eval_prompts=0, progress=False, coefficients=False, cache_search=False)
    assert seen == ["mixdq", "uniform"]


def test_a_model_without_scorer_stops_before_any_work(tiny_pipeline_dir, tmp_path, monkeypatch):
    import qsched.stages

    monkeypatch.setattr(qsched.stages, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(QschedError) as err:
        qsched.compile(str(tiny_pipeline_dir), "w8a8", out=tmp_path / "a", progress=False)
    message = str(err.value)
    assert "--scorer" in message and "--no-qsched --no-cache-search" in message and "flux-tiny" in message
    assert not (tmp_path / "a").exists()


def test_a_hub_clip_offline_stops_before_the_model_loads(tmp_path, monkeypatch):
    import qsched.stages

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(qsched.stages, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(QschedError) as err:  # the registry's default scorer for flux-schnell is a hub CLIP
        qsched.compile("flux-schnell", "w4a8", out=tmp_path / "a", init="random", progress=False)
    message = str(err.value)
    assert "openai/clip-vit-large-patch14" in message and "--no-qsched --no-cache-search" in message
    assert "flux-tiny" in message and not (tmp_path / "a").exists()


def test_every_purpose_draws_its_own_prompts():
    for source in ("world-judge", "some/clip"):
        profile = ModelProfile("m", TINY_SETTINGS, source)
        drawn = {purpose: profile.prompts(purpose, 6, seed=0) for purpose in PROMPT_SETS}
        assert all(len(p) == 6 for p in drawn.values())
        assert drawn == {purpose: profile.prompts(purpose, 6, seed=0) for purpose in PROMPT_SETS}  # seeded
        train = {p for k, v in drawn.items() if PROMPT_SETS[k].pool == "train" for p in v}
        held = {p for k, v in drawn.items() if PROMPT_SETS[k].pool == "held-out" for p in v}
        assert not train & held
    with pytest.raises(QschedError, match="unknown prompt purpose"):
        profile.prompts("training", 2)


def test_a_local_model_with_a_local_clip_runs_every_stage(tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    """The real-model path: a CLIP scorer drives Q-Sched's JAQ, the cache search and the report's quality."""
    from qsched.report import collect

    recipe = parse_recipe(SMALL)
    art = qsched.compile(str(tiny_pipeline_dir), "w8a8", out=tmp_path / "art", recipe=recipe, eval_prompts=2,
                         progress=False, scorer=str(tiny_clip_dir))
    stages = art.manifest["stages"]
    assert stages["load"]["scorer"] == {"kind": "clip", "source": str(tiny_clip_dir), "k": 2.0}
    assert stages["coefficients"]["status"] in ("done", "kept identity") and stages["coefficients"]["runs"] == 2
    assert stages["cache_search"]["status"] == "done" and stages["cache_search"]["guard"]["prompts"] == 2
    assert art.manifest["profile"]["scorer"] == str(tiny_clip_dir)
    assert {"fp_score", "score", "psnr_vs_fp"} <= set(art.metrics["fidelity"])
    data = collect(art.path)
    assert data["quality"]["measured"] and "clip" in data["quality"]["label"]
    by_id = {p["id"]: p for p in data["points"]}
    assert by_id["rtn"]["measured"] and all(0 <= by_id[k]["quality"] <= 1 for k in ("fp", "rtn", "fora-2"))
    assert json.loads((art.path / "manifest.json").read_text())["profile"]["prompt_sets"]["cache_guard"]["pool"] == "held-out"
