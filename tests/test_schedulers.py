"""Q-Sched scheduler wrappers: exact identity at all-ones, the paper's formulas otherwise, pipelines, save/load."""
import inspect
import json
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, LCMScheduler, TCDScheduler)

from qsched.core.errors import QschedError
from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients

# Configs as the target models ship them (SDXL-Turbo: trailing spacing; FLUX: shift; LCM/TCD: SD defaults).
SCHEDULERS = {
    "flow": (FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
    "flow-stochastic": (FlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True)),
    "euler-a": (EulerAncestralDiscreteScheduler, dict(beta_schedule="scaled_linear", timestep_spacing="trailing")),
    "lcm": (LCMScheduler, dict(beta_schedule="scaled_linear")),
    "tcd": (TCDScheduler, dict(beta_schedule="scaled_linear")),
    # PixArt-Σ's shipped config (qsched/configs/pixart-sigma/scheduler.json): DPM-Solver++ 2M
    "dpm++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2, beta_schedule="linear",
                                                lower_order_final=True)),
}
SHAPE = (2, 4, 8, 8)


def fake_model(x, t):
    """A fixed, deterministic stand-in for a denoiser: a nonlinear function of the input and t."""
    t = float(t) / 1000.0
    return torch.tanh(0.7 * x + t) - 0.3 * x + 0.1 * t


def sample(sched, steps, seed=0, eta=None, record=None):
    """A full sampling loop as a pipeline runs it (scale_model_input, step with a generator)."""
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * float(getattr(sched, "init_noise_sigma", 1.0))
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        kwargs = {"eta": eta} if eta is not None else {}
        x = sched.step(fake_model(inp, t), t, x, generator=g, return_dict=False, **kwargs)[0]
        if record is not None:
            record.append(x)
    return x


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_all_ones_is_bit_identical(name, steps):
    cls, cfg = SCHEDULERS[name]
    base = sample(cls(**cfg), steps)
    wrapped_sched = QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients.ones(steps))
    wrapped = sample(wrapped_sched, steps)
    assert isinstance(wrapped_sched, cls) and isinstance(wrapped_sched, QSchedScheduler)
    assert torch.equal(base, wrapped)
    # ... and non-trivial coefficients do change the trajectory.
    other = sample(QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients.linear_ramp(steps, 0.9, 1.1)), steps)
    assert not torch.equal(base, other)


def test_tcd_eta_and_interpolated_ones_are_identical():
    cls, cfg = SCHEDULERS["tcd"]
    base = sample(cls(**cfg), 4, eta=0.7)
    wrapped = sample(QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients.ones(2), interpolate=True), 4, eta=0.7)
    assert torch.equal(base, wrapped)


def test_signatures_match_base():
    """Pipelines inspect these: retrieve_timesteps looks for sigmas, prepare_extra_step_kwargs for generator/eta."""
    for cls, cfg in SCHEDULERS.values():
        w = QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients.ones(4))
        base = cls(**cfg)
        assert inspect.signature(w.set_timesteps) == inspect.signature(base.set_timesteps)
        assert inspect.signature(w.step) == inspect.signature(base.step)


def _first_step(cls, cfg, cx, ce, seed=3, **step_kwargs):
    """One step of a 2-step schedule with (cx, ce) at step 0; returns the scheduler, inputs and output."""
    sched = QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients(2, [cx, 1.0], [ce, 1.0]))
    sched.set_timesteps(2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    t = sched.timesteps[0]
    out = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7), return_dict=False, **step_kwargs)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))  # what the base step draws
    return sched, x, eps, t, out, z


def test_flow_euler_formula():
    cx, ce = 0.9, 1.15
    sched, x, v, _, out, _ = _first_step(*SCHEDULERS["flow"], cx, ce)
    s0, s1 = sched.sigmas[0].item(), sched.sigmas[1].item()
    expected = cx * x + (s1 - s0) * ce * v
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)


def test_euler_ancestral_formula():
    cx, ce = 1.1, 0.85
    sched, x, eps, _, out, z = _first_step(*SCHEDULERS["euler-a"], cx, ce)
    s, s_to = sched.sigmas[0].item(), sched.sigmas[1].item()
    s_up = math.sqrt(s_to ** 2 * (s ** 2 - s_to ** 2) / s ** 2)
    s_down = math.sqrt(s_to ** 2 - s_up ** 2)
    x0 = cx * x - s * ce * eps
    expected = cx * x + (s_down - s) * ce * eps + s_up * z
    torch.testing.assert_close(out[1], x0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-4)


def test_tcd_formula():
    cx, ce = 0.95, 1.1
    sched, x, eps, t, out, _ = _first_step(*SCHEDULERS["tcd"], cx, ce, eta=0.0)
    a = sched.alphas_cumprod
    a_t, a_s = a[int(t)].item(), a[int(sched.timesteps[1])].item()  # eta=0: s = the next timestep
    x0 = (cx * x - math.sqrt(1 - a_t) * ce * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * ce * eps
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_dpm_solver_pp_first_step_formula():
    """First-order DPM-Solver++ on the scaled inputs: x̂0 = (c^x·x − σ_s·c^ε·ε̂)/α_s and
    x' = (σ_t/σ_s)·c^x·x − α_t·(e^{−h} − 1)·x̂0 with λ = log α − log σ, h = λ_t − λ_s."""
    cx, ce = 0.92, 1.08
    sched, x, eps, _, out, _ = _first_step(*SCHEDULERS["dpm++"], cx, ce)
    a_s, s_s = (v.item() for v in sched._sigma_to_alpha_sigma_t(sched.sigmas[0]))
    a_t, s_t = (v.item() for v in sched._sigma_to_alpha_sigma_t(sched.sigmas[1]))
    h = (math.log(a_t) - math.log(s_t)) - (math.log(a_s) - math.log(s_s))
    x0 = (cx * x - s_s * ce * eps) / a_s
    expected = (s_t / s_s) * cx * x - a_t * (math.exp(-h) - 1.0) * x0
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_lcm_formula_scales_only_the_x0_estimate():
    cx, ce = 0.9, 1.2
    sched, x, eps, t, out, z = _first_step(*SCHEDULERS["lcm"], cx, ce)
    a = sched.alphas_cumprod
    a_t, a_prev = a[int(t)].item(), a[int(sched.timesteps[1])].item()
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
    x0 = (cx * x - math.sqrt(1 - a_t) * ce * eps) / math.sqrt(a_t)
    denoised = float(c_out) * x0 + float(c_skip) * x
    torch.testing.assert_close(out[1], denoised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * z, rtol=1e-5, atol=1e-5)


def test_linear_ramp_and_validation():
    c = SchedulerCoefficients.linear_ramp(5, 0.8, 1.2)
    assert c.cx[0] == 0.8 and c.ce[0] == 1.2 and c.cx[-1] == 1.0 and c.ce[-1] == 1.0
    assert c.cx == pytest.approx([0.8, 0.85, 0.9, 0.95, 1.0])
    assert SchedulerCoefficients.linear_ramp(1, 0.8, 1.2).to_dict() == {"steps": 1, "cx": [0.8], "ce": [1.2]}
    assert SchedulerCoefficients.ones(3).is_identity and not c.is_identity
    for bad in (dict(steps=0, cx=[], ce=[]), dict(steps=2, cx=[1.0], ce=[1.0, 1.0]),
                dict(steps=1, cx=[float("nan")], ce=[1.0])):
        with pytest.raises(QschedError):
            SchedulerCoefficients(**bad)
    with pytest.raises(QschedError):
        SchedulerCoefficients.from_dict({"steps": 1, "cx": [1.0]})


def test_wrong_step_count_raises_and_interpolation():
    cls, cfg = SCHEDULERS["flow"]
    coeffs = SchedulerCoefficients.linear_ramp(4, 0.8, 1.2)
    strict = QSchedScheduler.wrap(cls(**cfg), coeffs)
    with pytest.raises(QschedError, match="compiled for 4 sampling step"):
        strict.set_timesteps(8)
    strict.set_timesteps(4)  # the compiled count is fine

    loose = QSchedScheduler.wrap(cls(**cfg), coeffs, interpolate=True)
    loose.set_timesteps(7)
    got = loose.coefficients_for(7)
    want = SchedulerCoefficients.linear_ramp(7, 0.8, 1.2)  # interpolating a linear ramp gives the ramp
    assert got.cx == pytest.approx(want.cx) and got.ce == pytest.approx(want.ce)
    assert loose.coefficients_for(1).cx == [0.8]
    assert SchedulerCoefficients.ones(4).resampled(9).is_identity
    x8 = sample(QSchedScheduler.wrap(cls(**cfg), coeffs, interpolate=True), 8)
    assert torch.isfinite(x8).all() and not torch.equal(x8, sample(cls(**cfg), 8))


def test_wrap_leaves_base_untouched_and_rejects_unsupported():
    cls, cfg = SCHEDULERS["euler-a"]
    base = cls(**cfg)
    base.set_timesteps(4)
    w = QSchedScheduler.wrap(base, SchedulerCoefficients.ones(4))
    w.set_timesteps(2 * 2)
    sample(w, 4)
    assert base.step_index is None and type(base) is cls
    assert type(w.unwrap()) is cls
    with pytest.raises(QschedError, match="supports the schedulers"):
        QSchedScheduler.wrap(DDIMScheduler(), SchedulerCoefficients.ones(4))
    with pytest.raises(QschedError):
        QSchedScheduler.from_dict({"base_class": "DDIMScheduler", "base_config": {}, "coefficients": None})


@pytest.mark.parametrize("name", ["flow", "euler-a", "lcm", "tcd"])
def test_to_dict_from_dict_json_round_trip(name):
    cls, cfg = SCHEDULERS[name]
    w = QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients.linear_ramp(4, 0.93, 1.07), interpolate=True)
    record = json.loads(json.dumps(w.to_dict()))
    assert record["base_class"] == cls.__name__ and record["base_config"]["_class_name"] == cls.__name__
    w2 = QSchedScheduler.from_dict(record)
    assert type(w2) is type(w) and w2.interpolate and w2.coefficients == w.coefficients
    assert {k: v for k, v in w2.config.items() if not k.startswith("_")} == \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in w.config.items() if not k.startswith("_")}
    assert torch.equal(sample(w, 4), sample(w2, 4))


# --------------------------------------------------------------------------- inside a real pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    from qsched.tinyworld.model import build_tiny_pipeline

    from conftest import TEST_WORDS

    pipe = build_tiny_pipeline(0, TEST_WORDS)
    for module in pipe.components.values():  # freshly built modules are in train mode: T5 dropout is on
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux_pipeline(tiny_pipe):
    from qsched.runtime.generation import generate
    from qsched.tinyworld.model import TINY_SETTINGS

    prompts = ["a red circle on the left", "a blue square above a green triangle"]
    base_sched = tiny_pipe.scheduler
    try:
        base = generate(tiny_pipe, prompts, TINY_SETTINGS, seed=0, batch_size=2)
        tiny_pipe.scheduler = QSchedScheduler.wrap(base_sched, SchedulerCoefficients.ones(TINY_SETTINGS.steps))
        same = generate(tiny_pipe, prompts, TINY_SETTINGS, seed=0, batch_size=2)
        tiny_pipe.scheduler = QSchedScheduler.wrap(base_sched,
                                                   SchedulerCoefficients.linear_ramp(TINY_SETTINGS.steps, 0.85, 1.15))
        other = generate(tiny_pipe, prompts, TINY_SETTINGS, seed=0, batch_size=2)
        with pytest.raises(QschedError, match="compiled for 4"):
            generate(tiny_pipe, prompts[:1], TINY_SETTINGS.__class__(**{**TINY_SETTINGS.to_dict(), "steps": 2}))
    finally:
        tiny_pipe.scheduler = base_sched
    assert base.shape == (2, 3, 32, 32)
    assert torch.equal(base, same)
    assert not torch.equal(base, other)


def test_copy_and_pickle():
    import copy
    import pickle

    cls, cfg = SCHEDULERS["tcd"]
    w = QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients.linear_ramp(4, 0.9, 1.1))
    for clone in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert type(clone) is type(w) and clone.coefficients == w.coefficients
        assert torch.equal(sample(clone, 4), sample(w, 4))


def _flow_grid(steps):
    cls, cfg = SCHEDULERS["flow"]
    sched = cls(**cfg)
    sched.set_timesteps(steps)
    return [float(v) for v in sched.sigmas]


def test_field_resampling_reads_the_coefficients_as_a_velocity_field():
    """On their own grid the field reading gives the coefficients back; on a grid that halves every interval,
    each half-step takes its interval's c^ε and half of its (c^x − 1), so two half-steps of the linear part
    agree with one full step to first order."""
    grid4 = _flow_grid(4)
    coeffs = SchedulerCoefficients(4, [0.7, 0.85, 0.9, 1.0], [0.95, 0.8, 1.1, 0.9], sigmas=grid4)
    same = coeffs.field_resampled(grid4)
    assert same.cx == pytest.approx(coeffs.cx) and same.ce == coeffs.ce and same.sigmas == grid4
    halves = [v for a, b in zip(grid4, grid4[1:]) for v in (a, (a + b) / 2)] + [0.0]
    fine = coeffs.field_resampled(halves)
    assert fine.steps == 8 and fine.ce == [c for c in coeffs.ce for _ in range(2)]
    assert fine.cx == pytest.approx([1 + (c - 1) / 2 for c in coeffs.cx for _ in range(2)])
    assert fine.cx[6:] == [1.0, 1.0]  # c^x exactly 1 stays exactly 1
    with pytest.raises(QschedError, match="do not record the σ grid"):
        SchedulerCoefficients(4, coeffs.cx, coeffs.ce).field_resampled(halves)


def test_sigmas_are_validated_and_round_trip():
    grid = _flow_grid(2)
    c = SchedulerCoefficients(2, [0.9, 1.0], [1.1, 1.0], sigmas=grid)
    assert SchedulerCoefficients.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert "sigmas" not in SchedulerCoefficients(2, [0.9, 1.0], [1.1, 1.0]).to_dict()  # older records unchanged
    for bad in ([1.0, 0.5], [1.0, 0.5, 0.6], [1.0, float("nan"), 0.0], "abc"):
        with pytest.raises(QschedError, match="sigmas"):
            SchedulerCoefficients(2, [0.9, 1.0], [1.1, 1.0], sigmas=bad)
    with pytest.raises(QschedError, match="optionally sigmas"):
        SchedulerCoefficients.from_dict({**c.to_dict(), "extra": 1})


def test_interpolating_scheduler_integrates_the_field_on_finer_grids_only():
    """A flow-matching wrapper with recorded σ: at 8 steps its trajectory is Euler on v* = c^ε·v + k·x (computed
    here by hand from the fake model); at 2 steps, or without a recorded grid, or on another base, the linear
    stretch as before."""
    cls, cfg = SCHEDULERS["flow"]
    coeffs = SchedulerCoefficients(4, [0.7, 0.85, 0.9, 1.0], [0.95, 0.8, 1.1, 0.9], sigmas=_flow_grid(4))
    wrapped = QSchedScheduler.wrap(cls(**cfg), coeffs, interpolate=True)
    got = sample(wrapped, 8)
    plain = cls(**cfg)
    plain.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    own = coeffs.sigmas
    for t, s, s2 in zip(plain.timesteps, plain.sigmas[:-1].tolist(), plain.sigmas[1:].tolist()):
        i = next(j for j in range(4) if s > own[j + 1] + 1e-6)  # shared nodes start the interval below
        k = (coeffs.cx[i] - 1) / (own[i + 1] - own[i])
        x = x + (s2 - s) * (coeffs.ce[i] * fake_model(x, t) + k * x)
    assert torch.allclose(got, x, atol=1e-5)
    assert wrapped.coefficients_for(8).sigmas == pytest.approx([float(v) for v in plain.sigmas], abs=1e-6)
    assert wrapped.coefficients_for(2) == coeffs.resampled(2)  # coarser: the linear stretch
    unrecorded = QSchedScheduler.wrap(cls(**cfg), SchedulerCoefficients(4, coeffs.cx, coeffs.ce), interpolate=True)
    unrecorded.set_timesteps(8)
    assert unrecorded.coefficients_for(8) == SchedulerCoefficients(4, coeffs.cx, coeffs.ce).resampled(8)
    ea_cls, ea_cfg = SCHEDULERS["euler-a"]
    other_base = QSchedScheduler.wrap(ea_cls(**ea_cfg), coeffs, interpolate=True)
    other_base.set_timesteps(8)
    assert other_base.coefficients_for(8) == coeffs.resampled(8)
