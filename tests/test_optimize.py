"""Learning Q-Sched coefficients: known optima are found, budgets are exact, the search is reference-free."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from calibrate.calibration import calibrate
from qsched.core.bits import parse_bits
from qsched.core.errors import QschedError
from qsched.runtime.generation import generate
from qsched.coefficients.optimize import QSchedResult, learn_coefficients
from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline

from conftest import TEST_WORDS
from qsched.recipe import CalibrationConfig, QuantizationConfig

TRAIN = ["a red circle on the left", "a blue square above a green triangle", "a green circle",
         "a red triangle below a blue circle"]
HELDOUT = ["a blue triangle on the right", "a green square", "a red square and a blue circle",
           "a blue circle above a red square"]
S2 = replace(TINY_SETTINGS, steps=2)
S3 = replace(TINY_SETTINGS, steps=3)


@pytest.fixture(scope="module")
def qpipe():
    """A random flux-tiny pipeline quantized in place with uniform RTN W4A8."""
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    pipe.set_progress_bar_config(disable=True)
    calibrate(pipe, parse_bits("w4a8"), TRAIN, S2, QuantizationConfig(method="uniform", rounding="rtn"),
              calibration=CalibrationConfig(batch_size=4), progress=False)
    return pipe


def target_objective(pipe, settings, coeffs, seed=0):
    """−MSE to images the same pipeline makes with ``coeffs``: its optimum is ``coeffs`` (score 0)."""
    base = pipe.scheduler
    pipe.scheduler = QSchedScheduler.wrap(base, coeffs)
    try:
        targets = {tuple(p): generate(pipe, p, settings, seed=seed, batch_size=len(p)) for p in (TRAIN, HELDOUT)}
    finally:
        pipe.scheduler = base

    def objective(images, prompts):
        return -float(((images - targets[tuple(prompts)]) ** 2).mean())

    return objective


def test_cma_approaches_a_known_optimum_within_an_exact_budget(qpipe):
    sched = qpipe.scheduler
    target = SchedulerCoefficients.linear_ramp(2, 1.1, 0.95)
    objective = target_objective(qpipe, S2, target)
    result = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="cma", budget=60, seed=0,
                                progress=False)
    assert qpipe.scheduler is sched  # restored
    assert result.method == "cma"
    assert result.runs == 60 and result.sampler_calls == 60 * len(TRAIN)
    assert result.identity_train_jaq < -1e-6  # the identity is clearly off the target
    assert result.train_jaq > result.identity_train_jaq
    assert result.train_jaq > 0.1 * result.identity_train_jaq  # closes ≥ 90% of the gap to the optimum (0)
    assert result.heldout_jaq > 0.25 * result.identity_heldout_jaq  # and it carries over to held-out prompts
    # held-out is measured once per new best (identity first); the curve then runs on to the last run
    history = result.history
    assert history[0] == {"runs": 1, "train_best": result.identity_train_jaq,
                          "heldout_best": result.identity_heldout_jaq, "selected": result.identity_heldout_jaq}
    assert history[-1]["runs"] == result.runs
    improvements = {h["train_best"] for h in history}  # the closing point repeats the last best
    assert result.heldout_runs == len(improvements) and len(improvements) >= 2
    assert all(a["runs"] < b["runs"] and a["train_best"] <= b["train_best"] for a, b in zip(history, history[1:]))
    assert all(0.7 <= v <= 1.3 for v in result.coefficients.cx + result.coefficients.ce)
    # the learned coefficients reproduce the reported train score when applied
    qpipe.scheduler = QSchedScheduler.wrap(sched, result.coefficients)
    try:
        again = objective(generate(qpipe, TRAIN, S2, seed=0, batch_size=4), TRAIN)
    finally:
        qpipe.scheduler = sched
    assert again == pytest.approx(result.train_jaq, abs=1e-9)


def test_guard_selection_and_patience(qpipe):
    """Train and held-out prompts want different coefficients: the guard picks by held-out, not train."""
    train_target = SchedulerCoefficients.linear_ramp(2, 1.15, 0.9)
    train_objective = target_objective(qpipe, S2, train_target, seed=1)
    guard_objective = target_objective(qpipe, S2, SchedulerCoefficients.ones(2), seed=1)  # identity is best

    def objective(images, prompts):
        return (train_objective if list(prompts) == TRAIN else guard_objective)(images, prompts)

    by_train = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="cma", budget=30, seed=1,
                                  select="train", progress=False)
    by_guard = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="cma", budget=30, seed=1,
                                  progress=False)
    assert by_guard.history == by_train.history  # same search, different pick
    assert by_guard.best_train_coefficients == by_train.coefficients == by_train.best_train_coefficients
    assert by_train.train_jaq == by_train.best_train_jaq > by_train.identity_train_jaq
    assert by_guard.select == "guard" and by_guard.coefficients == SchedulerCoefficients.ones(2)
    assert by_guard.heldout_jaq == by_guard.identity_heldout_jaq == max(h["heldout_best"] for h in by_guard.history)
    assert by_guard.heldout_jaq > by_train.heldout_jaq and by_guard.selected_at == 1
    assert [h["selected"] for h in by_guard.history] == [by_guard.heldout_jaq] * len(by_guard.history)
    # patience: stop once the guard has not improved for 7 train runs
    early = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="cma", budget=30, seed=1,
                               patience=7, progress=False)
    assert early.stopped_early and early.runs == 1 + 7 and early.coefficients == by_guard.coefficients
    assert not by_guard.stopped_early and by_guard.runs == 30


def test_grid_finds_a_grid_point_exactly_and_counts_every_configuration(qpipe):
    target = SchedulerCoefficients.linear_ramp(3, 1.1, 0.95)
    objective = target_objective(qpipe, S3, target)
    # 5×5 over [0.9, 1.1] holds 0.9, 0.95, 1.0, 1.05, 1.1 — and the identity, which is not sampled twice
    result = learn_coefficients(qpipe, TRAIN, HELDOUT, S3, objective, method="grid", grid_size=5,
                                grid_range=(0.9, 1.1), progress=False)
    assert result.runs == 25 and result.sampler_calls == 100
    assert result.coefficients.cx[0] == pytest.approx(1.1) and result.coefficients.ce[0] == pytest.approx(0.95)
    assert result.coefficients.cx[-1] == 1.0 and result.coefficients.ce[-1] == 1.0
    assert np.allclose(result.coefficients.cx, target.cx) and np.allclose(result.coefficients.ce, target.ce)
    assert result.train_jaq > -1e-10 and result.heldout_jaq > -1e-10
    assert result.identity_train_jaq < result.train_jaq
    # the result records the σ grid it was sampled on, so it carries to finer schedules as a velocity field
    probe = QSchedScheduler.wrap(qpipe.scheduler, SchedulerCoefficients.ones(3))
    probe.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3))  # as FluxPipeline calls it (no dynamic shift here)
    assert result.coefficients.sigmas == pytest.approx([float(v) for v in probe.sigmas])
    assert result.coefficients.sigmas[-1] == 0.0 and len(result.coefficients.sigmas) == 4
    # a budget caps the grid exactly (the grid goes cx-major, so 1.1 is never reached here)
    capped = learn_coefficients(qpipe, TRAIN, HELDOUT, S3, objective, method="grid", grid_size=5,
                                grid_range=(0.9, 1.1), budget=7, progress=False)
    assert capped.runs == 7 and capped.train_jaq < result.train_jaq


def test_identity_first_json_round_trip_and_restored_scheduler(qpipe):
    sched = qpipe.scheduler
    identity_images = generate(qpipe, TRAIN, S2, seed=3, batch_size=4)
    seen = []

    def objective(images, prompts):
        if list(prompts) == TRAIN:
            seen.append(images)
        return float(images.mean())

    result = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="nelder-mead", budget=9, seed=3,
                                progress=False)
    assert qpipe.scheduler is sched
    assert len(seen) == 9 == result.runs
    assert torch.equal(seen[0], identity_images)  # the unmodified scheduler, same seed, evaluated first
    assert result.train_jaq >= result.identity_train_jaq
    data = json.loads(json.dumps(result.to_dict()))
    assert data == result.to_dict()
    back = QSchedResult.from_dict(data)
    assert back.coefficients == result.coefficients and back.history == result.history
    # a pipeline that already carries a Q-Sched scheduler is searched from its base and left as it was
    wrapped = QSchedScheduler.wrap(sched, SchedulerCoefficients.linear_ramp(2, 0.9, 0.9))
    qpipe.scheduler = wrapped
    try:
        again = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="cma", budget=3, seed=3,
                                   progress=False)
        assert qpipe.scheduler is wrapped
        assert again.identity_train_jaq == pytest.approx(result.identity_train_jaq)
    finally:
        qpipe.scheduler = sched


def test_cma_is_seeded_and_leaves_numpy_global_rng_alone(qpipe):
    objective = target_objective(qpipe, S2, SchedulerCoefficients.linear_ramp(2, 1.05, 1.05))
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    a = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="cma", budget=12, seed=5, progress=False)
    assert np.random.random() == expected_next
    b = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, objective, method="cma", budget=12, seed=5, progress=False)
    assert a.coefficients == b.coefficients and a.train_jaq == b.train_jaq


def test_bad_arguments_are_clear_errors(qpipe):
    with pytest.raises(QschedError, match="unknown Q-Sched search method"):
        learn_coefficients(qpipe, TRAIN, HELDOUT, S2, lambda i, p: 0.0, method="random")
    with pytest.raises(QschedError, match="held-out prompt"):
        learn_coefficients(qpipe, TRAIN, [], S2, lambda i, p: 0.0)
    with pytest.raises(QschedError, match="contain 1"):
        learn_coefficients(qpipe, TRAIN, HELDOUT, S2, lambda i, p: 0.0, bounds=(1.1, 1.3))
    with pytest.raises(QschedError, match="unknown Q-Sched selection"):
        learn_coefficients(qpipe, TRAIN, HELDOUT, S2, lambda i, p: 0.0, select="best")
    with pytest.raises(QschedError, match="patience"):
        learn_coefficients(qpipe, TRAIN, HELDOUT, S2, lambda i, p: 0.0, patience=0)


def test_reference_free_with_world_jaq(qpipe, monkeypatch):
    """Once quantized, the search never touches full-precision weights: every loader is made to fail."""
    import diffusers

    import qsched.models.registry
    import qsched.tinyworld.model
    from qsched.coefficients.jaq import jaq, scorer_terms
    from qsched.scoring.scorer import WorldJudgeScorer

    def no_fp_weights(*args, **kwargs):
        raise AssertionError("the Q-Sched search tried to load full-precision weights")

    for cls in (diffusers.DiffusionPipeline, diffusers.FluxPipeline):
        monkeypatch.setattr(cls, "from_pretrained", no_fp_weights)
    monkeypatch.setattr(qsched.models.registry, "load_pipeline", no_fp_weights)
    monkeypatch.setattr(qsched.tinyworld.model, "load_embedded", no_fp_weights)
    terms = scorer_terms(WorldJudgeScorer())
    result = learn_coefficients(qpipe, TRAIN, HELDOUT, S2, lambda im, p: jaq(im, p, *terms, k=2.0),
                                method="cma", budget=8, seed=0, progress=False)
    assert result.runs == 8
    assert result.train_jaq >= result.identity_train_jaq
    assert np.isfinite(result.heldout_jaq) and np.isfinite(result.identity_heldout_jaq)
