"""Quantization-aware few-step schedulers (Q-Sched).

Q-Sched leaves the quantized weights alone and instead bends the sampler so that it absorbs the
quantized model's error: at step ``i`` the current sample is multiplied by ``c^x_i`` and the model
output by ``c^ε_i`` before the scheduler's own update. All-ones coefficients reproduce the original
scheduler bit for bit (the wrapper then hands the untouched tensors to the base ``step``).

Supported bases and the update each one computes (σ, ᾱ, σ_up/σ_down as in diffusers):

* ``FlowMatchEulerDiscreteScheduler`` (FLUX, velocity v̂):
  ``x' = c^x·x + (σ_{i+1} − σ_i)·c^ε·v̂``  (base step on ``(c^ε·v̂, c^x·x)``).
* ``EulerAncestralDiscreteScheduler`` (SDXL-Turbo, ε̂; ``x`` is the unscaled latent, the model input
  from ``scale_model_input`` is unchanged): ``x̂0 = c^x·x − σ·c^ε·ε̂``,
  ``x' = c^x·x + (σ_down − σ)·c^ε·ε̂ + σ_up·z``  (base step on ``(c^ε·ε̂, c^x·x)``).
* ``TCDScheduler`` (PCM, ε̂): ``x̂0 = (c^x·x − √(1−ᾱ_t)·c^ε·ε̂)/√ᾱ_t``,
  ``x_s = √ᾱ_s·x̂0 + √(1−ᾱ_s)·c^ε·ε̂``, then the usual stochastic TCD step
  (base step on ``(c^ε·ε̂, c^x·x)``).
* ``LCMScheduler`` (ε̂): the scalars act only inside the x0 estimate,
  ``x̂0 = (c^x·x − √(1−ᾱ_t)·c^ε·ε̂)/√ᾱ_t``; the boundary-condition skip term ``c_skip·x`` keeps the
  raw sample. Done by feeding the base step ``ε' = c^ε·ε̂ + (1 − c^x)·x/√(1−ᾱ_t)`` with ``x``
  unchanged, which makes the base's own x0 line compute exactly that.

* ``DPMSolverMultistepScheduler`` (PixArt-Σ, DPM-Solver++, ε̂): the x0 estimate becomes
  ``x̂0 = (c^x·x − σ_t·c^ε·ε̂)/α_t`` and the update uses ``c^x·x``; the first (first-order) step is
  ``x' = (σ_s/σ_t)·c^x·x − α_s·(e^{−h} − 1)·x̂0``; later steps combine this step's x̂0 with the previous
  ones as the base does (base step on ``(c^ε·ε̂, c^x·x)``; it upcasts the sample to fp32 first).

For the other prediction types the same "scale sample, scale model output" transform is applied
(LCM: adjusted so it stays inside x0); the paper only defines the ε / velocity cases.

The wrapper is a dynamically created subclass of the base class (``QSchedFlowMatchEulerDiscreteScheduler``
…), so pipelines' ``isinstance`` checks, ``scale_model_input``, ``init_noise_sigma``, ``order``, ``config``,
``step_index``, ``set_begin_index`` … are the base's own. ``set_timesteps`` and ``step`` keep the base
signatures, because pipelines inspect them (``retrieve_timesteps`` looks for ``sigmas``/``timesteps``;
SD/SDXL ``prepare_extra_step_kwargs`` only passes ``generator``/``eta`` if ``step`` names them).

Step counts: coefficients belong to the step index of the compiled schedule (``len(timesteps)`` after
``set_timesteps``). Another count raises :class:`~qsched.core.errors.QschedError`, unless the wrapper was
built with ``interpolate=True``: then, for a flow-matching Euler base whose coefficients record the σ grid
they were learned on (the Q-Sched search records it) and a finer schedule (``N > S``), the coefficients are
read as the velocity field they define on that grid and integrated on the new one
(:meth:`SchedulerCoefficients.field_resampled`); otherwise the compiled values, placed at normalised positions
``i/(S−1)``, are linearly interpolated at ``j/(N−1)`` (a 1-step schedule uses the first-step values). All-ones
stays exactly all-ones either way.
"""
from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qsched.core.errors import QschedError

__all__ = ["SchedulerCoefficients", "QSchedScheduler", "SUPPORTED_SCHEDULERS"]

_SAME_SIGMA = 1e-6  # σ values closer than this are one grid node (fp32 schedules of different step counts)


# --------------------------------------------------------------------------- coefficients


@dataclass
class SchedulerCoefficients:
    """Per-step Q-Sched scalars: ``cx[i]`` multiplies the sample, ``ce[i]`` the model output at step ``i``.

    ``sigmas`` (optional, ``steps + 1`` descending values) is the flow-matching σ grid they were learned on; with
    it, :meth:`field_resampled` carries them to a finer grid exactly (see ``QSchedScheduler.coefficients_for``)."""

    steps: int
    cx: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    sigmas: list[float] | None = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise QschedError(f"scheduler coefficients need a positive integer step count, got {self.steps!r}")
        self.steps = int(self.steps)
        for name in ("cx", "ce"):
            values = getattr(self, name)
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError):
                raise QschedError(f"scheduler coefficients {name} must be a list of numbers, got {values!r}") from None
            if len(values) != self.steps:
                raise QschedError(f"scheduler coefficients {name} has {len(values)} values for {self.steps} steps")
            if not all(math.isfinite(v) for v in values):
                raise QschedError(f"scheduler coefficients {name} must be finite, got {values}")
            setattr(self, name, values)
        if self.sigmas is not None:
            try:
                grid = [float(v) for v in self.sigmas]
            except (TypeError, ValueError):
                raise QschedError(f"scheduler coefficients sigmas must be a list of numbers, got {self.sigmas!r}") from None
            if (len(grid) != self.steps + 1 or not all(math.isfinite(v) for v in grid)
                    or any(b >= a for a, b in zip(grid, grid[1:]))):
                raise QschedError(f"scheduler coefficients sigmas must be {self.steps + 1} finite, strictly "
                                  f"descending values (the σ grid of {self.steps} steps), got {grid}")
            self.sigmas = grid

    @classmethod
    def ones(cls, steps: int) -> "SchedulerCoefficients":
        """The identity: the wrapped scheduler behaves exactly like its base."""
        return cls(steps, [1.0] * steps, [1.0] * steps)

    @classmethod
    def linear_ramp(cls, steps: int, cx0: float, ce0: float) -> "SchedulerCoefficients":
        """Q-Sched's own two-parameter family: first-step values ``cx0``/``ce0`` ramping linearly to
        exactly 1 at the last step (a 1-step schedule is just ``[cx0]``/``[ce0]``)."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise QschedError(f"scheduler coefficients need a positive integer step count, got {steps!r}")

        def ramp(v0: float) -> list[float]:
            if steps == 1:
                return [float(v0)]
            # 1 + (v0-1)·w keeps the last value exactly 1.0; the first is set exactly.
            vals = [1.0 + (float(v0) - 1.0) * (steps - 1 - i) / (steps - 1) for i in range(steps)]
            vals[0] = float(v0)
            return vals

        return cls(int(steps), ramp(cx0), ramp(ce0))

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.cx) and all(v == 1.0 for v in self.ce)

    def resampled(self, steps: int) -> "SchedulerCoefficients":
        """The same curve for another step count: linear interpolation over normalised step position."""
        if steps == self.steps:
            return SchedulerCoefficients(self.steps, list(self.cx), list(self.ce))
        if self.steps == 1 or steps == 1:
            return SchedulerCoefficients(steps, [self.cx[0]] * steps, [self.ce[0]] * steps)
        src = np.linspace(0.0, 1.0, self.steps)
        dst = np.linspace(0.0, 1.0, steps)
        return SchedulerCoefficients(steps, np.interp(dst, src, self.cx).tolist(),
                                     np.interp(dst, src, self.ce).tolist())

    def field_resampled(self, sigmas) -> "SchedulerCoefficients":
        """Flow-matching Euler only: coefficients for the descending σ grid ``sigmas`` (N steps, N + 1 values)
        that take, from each of its σ, one Euler step of the velocity field these coefficients define on their
        own grid: on the interval (σ_{i+1}, σ_i] that holds σ, v* = c^ε_i·v + k_i·x with k_i = (c^x_i − 1)/(σ_{i+1}
        − σ_i), so a step of length Δ' gets c^x' = 1 + k_i·Δ' and c^ε' = c^ε_i. On their own grid this is the
        identity map; on a finer one it integrates the same field (docs/results.md: 4-step coefficients at 20
        steps +5.5 points where the linear stretch of :meth:`resampled` lost 28)."""
        if self.sigmas is None:
            raise QschedError("these coefficients do not record the σ grid they were learned on; only the linear "
                              "resampling (resampled) applies")
        target = [float(v) for v in sigmas]
        own = self.sigmas
        cx, ce = [], []
        for s, s2 in zip(target[:-1], target[1:]):
            # own[i+1] < s <= own[i]; a node both grids share (up to float rounding) starts the interval below it
            i = next((j for j in range(self.steps) if s > own[j + 1] + _SAME_SIGMA), self.steps - 1)
            k = (self.cx[i] - 1.0) / (own[i + 1] - own[i])
            cx.append(1.0 + k * (s2 - s))  # exactly 1 where c^x_i is
            ce.append(self.ce[i])
        return SchedulerCoefficients(len(cx), cx, ce, sigmas=target)

    def to_dict(self) -> dict:
        out = {"steps": self.steps, "cx": list(self.cx), "ce": list(self.ce)}
        if self.sigmas is not None:
            out["sigmas"] = list(self.sigmas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerCoefficients":
        if not isinstance(data, dict) or not {"steps", "cx", "ce"} <= set(data) <= {"steps", "cx", "ce", "sigmas"}:
            raise QschedError(f"scheduler coefficients must be a mapping with keys steps, cx, ce (and optionally "
                              f"sigmas); got {data!r}")
        return cls(data["steps"], data["cx"], data["ce"], data.get("sigmas"))


# --------------------------------------------------------------------------- per-scheduler input transforms
#
# Each returns (model_output, sample) to hand to the base step so that it computes the Q-Sched update.
# Only called when (cx, ce) != (1, 1); a factor that is exactly 1 leaves its tensor untouched.


def _scale_inputs_fp32(sched, model_output, timestep, sample, cx, ce):
    """Flow Euler / Euler ancestral / DPM-Solver multistep: the base upcasts the sample to fp32 first, so scale it there
    (scaling a bf16 sample before the upcast would round c^x·x to bf16)."""
    if cx != 1.0:
        sample = sample.float() * cx
    if ce != 1.0:
        model_output = model_output * ce
    return model_output, sample


def _scale_inputs(sched, model_output, timestep, sample, cx, ce):
    """TCD: every use of the sample and the model output in the step is scaled."""
    if cx != 1.0:
        sample = sample * cx
    if ce != 1.0:
        model_output = model_output * ce
    return model_output, sample


def _lcm_inputs(sched, model_output, timestep, sample, cx, ce):
    """LCM: fold c^x into the model output so only the x0 estimate sees it (c_skip·x stays raw)."""
    pred = sched.config.prediction_type
    if pred == "sample":
        if cx != 1.0:
            raise QschedError("Q-Sched c^x has no meaning for an LCM that predicts x0 (prediction_type='sample'); "
                              "use c^x = 1 for this model")
        return (model_output * ce if ce != 1.0 else model_output), sample
    alpha = float(sched.alphas_cumprod[timestep])
    beta = 1.0 - alpha
    out = model_output * ce if ce != 1.0 else model_output
    if cx != 1.0:
        if pred == "epsilon":  # x0 = (x − √β·m)/√α  ⇒  m' = c^ε·ε + (1−c^x)·x/√β
            out = out + sample * ((1.0 - cx) / math.sqrt(beta))
        elif pred == "v_prediction":  # x0 = √α·x − √β·m  ⇒  m' = c^ε·v + √α(1−c^x)·x/√β
            out = out + sample * (math.sqrt(alpha) * (1.0 - cx) / math.sqrt(beta))
        else:
            raise QschedError(f"Q-Sched does not support LCM prediction_type {pred!r}")
    return out, sample


# base class name -> input transform
_TRANSFORMS = {
    "FlowMatchEulerDiscreteScheduler": _scale_inputs_fp32,
    "EulerAncestralDiscreteScheduler": _scale_inputs_fp32,
    "TCDScheduler": _scale_inputs,
    "LCMScheduler": _lcm_inputs,
    "DPMSolverMultistepScheduler": _scale_inputs_fp32,
}
SUPPORTED_SCHEDULERS = tuple(_TRANSFORMS)
_CLASS_CACHE: dict[type, type] = {}


def _base_class_by_name(name: str) -> type:
    if name not in _TRANSFORMS:
        raise QschedError(f"Q-Sched supports the schedulers {', '.join(SUPPORTED_SCHEDULERS)}; got {name!r}")
    import diffusers

    return getattr(diffusers, name)


def _supported_base_of(cls: type) -> type:
    """The supported diffusers class a scheduler (or an already wrapped one) derives from."""
    for klass in cls.__mro__:
        if klass.__name__ in _TRANSFORMS and klass.__module__.startswith("diffusers."):
            return klass
    raise QschedError(f"Q-Sched supports the schedulers {', '.join(SUPPORTED_SCHEDULERS)}; "
                      f"got {cls.__name__}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- the wrapper


class QSchedScheduler:
    """Mixin of the quantization-aware scheduler classes; use :meth:`wrap` / :meth:`from_dict`.

    ``isinstance(s, QSchedScheduler)`` tells a wrapped scheduler; ``isinstance(s, <base class>)`` holds too.
    """

    # Class-level defaults so that an instance made by ``from_config`` (no coefficients) is the identity.
    _qs_coefficients: SchedulerCoefficients | None = None
    _qs_interpolate: bool = False
    _qs_base_class: type | None = None

    # ---- construction

    @staticmethod
    def wrap(base_scheduler, coefficients: SchedulerCoefficients | dict | None, interpolate: bool = False):
        """A quantization-aware copy of ``base_scheduler`` (its config and current state); the base is
        left untouched, so ``pipe.scheduler = QSchedScheduler.wrap(pipe.scheduler, coeffs)`` is safe.
        ``None`` coefficients mean the identity at any step count."""
        if isinstance(coefficients, dict):
            coefficients = SchedulerCoefficients.from_dict(coefficients)
        if coefficients is not None and not isinstance(coefficients, SchedulerCoefficients):
            raise QschedError(f"coefficients must be SchedulerCoefficients, got {type(coefficients).__name__}")
        base_cls = _supported_base_of(type(base_scheduler))
        cls = QSchedScheduler.class_for(base_cls)
        obj = cls.__new__(cls)
        state = {k: v for k, v in base_scheduler.__dict__.items() if not k.startswith("_qs_")}
        obj.__dict__.update(copy.deepcopy(state))
        obj._qs_coefficients = coefficients
        obj._qs_interpolate = bool(interpolate)
        obj._qs_active = {}  # step count -> resolved SchedulerCoefficients
        return obj

    @staticmethod
    def class_for(base_cls: type) -> type:
        """The (cached) quantization-aware subclass of a supported diffusers scheduler class."""
        base_cls = _supported_base_of(base_cls)
        if base_cls in _CLASS_CACHE:
            return _CLASS_CACHE[base_cls]

        # Same signatures as the base (via __wrapped__), because pipelines inspect them.
        def set_timesteps(self, *args, **kwargs):
            result = base_cls.set_timesteps(self, *args, **kwargs)
            self.coefficients_for(len(self.timesteps))  # fail at set-up, not mid-sampling
            return result

        def step(self, model_output, timestep, sample, *args, **kwargs):
            return self._qs_step(base_cls.step, model_output, timestep, sample, *args, **kwargs)

        functools.update_wrapper(set_timesteps, base_cls.set_timesteps)
        functools.update_wrapper(step, base_cls.step)
        name = f"QSched{base_cls.__name__}"
        cls = type(name, (QSchedScheduler, base_cls), {
            "set_timesteps": set_timesteps, "step": step, "_qs_base_class": base_cls,
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"{base_cls.__name__} with Q-Sched per-step sample / model-output scalars."})
        _CLASS_CACHE[base_cls] = cls
        return cls

    def unwrap(self):
        """A plain base-class scheduler with this one's config and current state."""
        obj = self._qs_base_class.__new__(self._qs_base_class)
        obj.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if not k.startswith("_qs_")}))
        return obj

    # ---- state

    @property
    def coefficients(self) -> SchedulerCoefficients | None:
        return self._qs_coefficients

    @property
    def interpolate(self) -> bool:
        return self._qs_interpolate

    def coefficients_for(self, steps: int) -> SchedulerCoefficients | None:
        """Coefficients used for a ``steps``-step schedule: the compiled ones, interpolated ones (with
        ``interpolate=True``), or a :class:`QschedError` naming the supported count."""
        coeffs = self._qs_coefficients
        if coeffs is None or steps == coeffs.steps:
            return coeffs
        if not self._qs_interpolate:
            raise QschedError(
                f"these Q-Sched scheduler coefficients were compiled for {coeffs.steps} sampling step(s) only; "
                f"the pipeline asked for {steps}. Sample with {coeffs.steps} steps, or wrap the scheduler with "
                "interpolate=True to stretch the coefficients over the new step count")
        grid = self._qs_field_grid(coeffs, steps)
        key = (steps, None if grid is None else tuple(grid))
        cache = self.__dict__.setdefault("_qs_active", {})
        if key not in cache:
            cache[key] = coeffs.resampled(steps) if grid is None else coeffs.field_resampled(grid)
        return cache[key]

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """The σ grid (``steps + 1`` values) of the current ``steps``-step schedule when the base is flow-matching
        Euler, the grid Q-Sched coefficients read as a field on; None for other bases or no such schedule."""
        sigmas = getattr(self, "sigmas", None)
        if self._qs_base_class.__name__ != "FlowMatchEulerDiscreteScheduler" or sigmas is None \
                or len(sigmas) != steps + 1:
            return None
        return [float(v) for v in sigmas]

    def _qs_field_grid(self, coeffs: SchedulerCoefficients, steps: int) -> list[float] | None:
        """The current σ grid when the field reading applies: coefficients that record their own grid, a finer
        schedule (on a coarser one the field overshoots: 1 and 2 steps lost 7-9 points where the linear stretch
        lost at most 1; docs/results.md) and a flow-matching Euler base. None: stretch linearly."""
        return None if coeffs.sigmas is None or steps < coeffs.steps else self.flow_sigmas(steps)

    def _qs_step(self, base_step, model_output, timestep, sample, *args, **kwargs):
        # Let the base raise its own errors when it has no schedule yet.
        if self._qs_coefficients is None or getattr(self, "timesteps", None) is None:
            return base_step(self, model_output, timestep, sample, *args, **kwargs)
        if self.step_index is None:
            self._init_step_index(timestep)  # exactly what the base step does first
        coeffs = self.coefficients_for(len(self.timesteps))
        i = self.step_index
        if not 0 <= i < coeffs.steps:
            raise QschedError(f"scheduler step index {i} is outside the {coeffs.steps}-step schedule")
        cx, ce = coeffs.cx[i], coeffs.ce[i]
        if cx != 1.0 or ce != 1.0:
            model_output, sample = _TRANSFORMS[self._qs_base_class.__name__](
                self, model_output, timestep, sample, cx, ce)
        return base_step(self, model_output, timestep, sample, *args, **kwargs)

    # ---- save / load (plain JSON)

    def to_dict(self) -> dict:
        """``{"base_class", "base_config", "coefficients", "interpolate"}``, JSON-serialisable."""
        # Not ConfigMixin.to_json_string: it writes our subclass name into the live config.
        base_config = {k: _jsonable(v) for k, v in dict(self.config).items()
                       if k not in ("_ignore_files", "_use_default_values", "_pre_quantization_dtype")}
        base_config["_class_name"] = self._qs_base_class.__name__
        json.dumps(base_config)  # fail here, not in the caller's writer
        coeffs = self._qs_coefficients
        return {"base_class": self._qs_base_class.__name__, "base_config": base_config,
                "coefficients": None if coeffs is None else coeffs.to_dict(),
                "interpolate": self._qs_interpolate}

    @staticmethod
    def from_dict(data: dict):
        """Rebuild a wrapped scheduler from :meth:`to_dict` output (fresh state, as after construction)."""
        if not isinstance(data, dict) or not {"base_class", "base_config", "coefficients"} <= set(data):
            raise QschedError("a Q-Sched scheduler record needs base_class, base_config and coefficients")
        base_cls = _base_class_by_name(data["base_class"])
        config = dict(data["base_config"])
        base = base_cls.from_config(config)
        coeffs = data["coefficients"]
        return QSchedScheduler.wrap(base, None if coeffs is None else SchedulerCoefficients.from_dict(coeffs),
                                    interpolate=bool(data.get("interpolate", False)))


def __getattr__(name: str):
    """``qsched.runtime.schedulers.QSched<Base>`` resolves to the generated class, so pickling works."""
    if name.startswith("QSched") and name[len("QSched"):] in _TRANSFORMS:
        return QSchedScheduler.class_for(_base_class_by_name(name[len("QSched"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
