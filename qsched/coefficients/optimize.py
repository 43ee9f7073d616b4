"""Learn Q-Sched scheduler coefficients for a quantized pipeline, without the full-precision model.

The search only ever samples the pipeline it is given (the quantized one) and scores the images with a
reference-free objective (JAQ: text-image compatibility + k · no-reference quality), so calibrating the
scheduler never needs the FP weights.

Two optimisers over the same evaluation loop, so their costs are directly comparable:

* ``method="grid"`` — Q-Sched's own search: only the first-step ``c^x``/``c^ε`` are free, each ramping
  linearly to 1 at the last step; an n×n grid over ``grid_range`` (their setting: 50×50 over [0.8, 1.2]).
* ``method="cma"`` — ours: all ``2·steps`` per-step coefficients free, CMA-ES (DEAP) from the identity,
  clipped to ``bounds``, stopped at exactly ``budget`` train evaluations.
* ``method="nelder-mead"`` — scipy's simplex over the same free coefficients, same budget accounting.

Every candidate is sampled on the same prompts with the same seed (common random numbers): two
candidates then differ only by their coefficients, not by the noise, so small objective differences
are real. The identity (all ones) is evaluated first, so the result is never worse than the unmodified
scheduler on the train prompts.

A held-out *guard* prompt set keeps the search from overfitting its few train prompts: whenever the best
train candidate changes, its guard objective is measured (``heldout_runs``). With ``select="guard"`` (the
default) the result is the guarded candidate with the best guard objective, not the best train one: with
16–24 prompts a per-step search keeps raising its train objective long after the held-out one has peaked
(measured on flux-tiny, see docs/results.md), so the train maximum is the wrong pick. ``patience`` stops
the search early once the guard has not improved for that many train runs. Because the guard objective
selects the result, it is optimistically biased; report quality on a third prompt set (the benchmark
``benchmarks/qsched_curves.py`` does).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qsched.core.errors import QschedError
from qsched.runtime.generation import GenerationSettings, generate
from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients

Objective = Callable[[torch.Tensor, Sequence[str]], float]

__all__ = ["QSchedResult", "learn_coefficients", "METHODS"]

METHODS = ("grid", "cma", "nelder-mead")
SELECTIONS = ("guard", "train")
DEFAULT_BUDGET = 250
_OUT_OF_BOUNDS_PENALTY = 10.0  # per squared unit outside the bounds; keeps CMA's mean from drifting out


@dataclass
class QSchedResult:
    """What a search found and what it cost (plain values; :meth:`to_dict` is JSON)."""

    coefficients: SchedulerCoefficients  # the selected candidate
    method: str
    train_jaq: float  # of the selected candidate
    heldout_jaq: float  # guard objective of the selected candidate
    identity_train_jaq: float
    identity_heldout_jaq: float
    runs: int  # configurations sampled on the train prompts (identity included)
    sampler_calls: int  # runs × train prompts (images generated for the search itself)
    heldout_runs: int  # configurations sampled on the held-out prompts
    seconds: float
    # [{runs, train_best, heldout_best, selected}] at each new train best: heldout_best is the guard
    # objective of the train best, selected the best guard objective so far (the curve of the result)
    history: list[dict] = field(default_factory=list)
    select: str = "guard"
    selected_at: int = 1  # train runs when the selected candidate was found
    best_train_jaq: float | None = None  # the highest train objective seen (≥ train_jaq)
    stopped_early: bool = False  # patience ran out before the budget
    best_train_coefficients: SchedulerCoefficients | None = None  # the train maximum (what select="train" picks)

    def to_dict(self) -> dict:
        return {"coefficients": self.coefficients.to_dict(), "method": self.method,
                "train_jaq": float(self.train_jaq), "heldout_jaq": float(self.heldout_jaq),
                "identity_train_jaq": float(self.identity_train_jaq),
                "identity_heldout_jaq": float(self.identity_heldout_jaq),
                "runs": int(self.runs), "sampler_calls": int(self.sampler_calls),
                "heldout_runs": int(self.heldout_runs), "seconds": float(self.seconds),
                "history": [{k: (int(v) if k == "runs" else float(v)) for k, v in h.items()} for h in self.history],
                "select": self.select, "selected_at": int(self.selected_at),
                "best_train_jaq": None if self.best_train_jaq is None else float(self.best_train_jaq),
                "stopped_early": bool(self.stopped_early),
                "best_train_coefficients": (None if self.best_train_coefficients is None
                                            else self.best_train_coefficients.to_dict())}

    @classmethod
    def from_dict(cls, data: dict) -> "QSchedResult":
        data = dict(data)
        data["coefficients"] = SchedulerCoefficients.from_dict(data["coefficients"])
        data["history"] = [dict(h) for h in data.get("history", [])]
        if data.get("best_train_coefficients") is not None:
            data["best_train_coefficients"] = SchedulerCoefficients.from_dict(data["best_train_coefficients"])
        return cls(**data)


class _BudgetExhausted(Exception):
    """Raised inside an optimiser's callback to stop it at exactly the budget (or when patience runs out)."""


class _Search:
    """The shared evaluation loop: sampling with common random numbers, budget, best-so-far, held-out curve."""

    def __init__(self, pipe, base_scheduler, train_prompts, heldout_prompts, settings, objective, seed,
                 batch_size, budget, bar, patience=None):
        self.pipe, self.base = pipe, base_scheduler
        self.train, self.heldout = list(train_prompts), list(heldout_prompts)
        self.settings, self.objective, self.seed = settings, objective, seed
        self.batch_size, self.budget, self.bar, self.patience = batch_size, budget, bar, patience
        self.cache: dict[tuple, float] = {}
        self.runs = self.heldout_runs = 0
        self.best: SchedulerCoefficients | None = None
        self.best_train = self.best_heldout = -math.inf
        # the guard's pick: the guarded candidate with the best held-out objective
        self.selected: SchedulerCoefficients | None = None
        self.selected_train = self.selected_heldout = -math.inf
        self.selected_at = 0
        self.stopped_early = False
        self.history: list[dict] = []
        self.grid: list[float] | None = None  # the σ grid sampled on (flow matching), recorded with the result

    def score(self, coeffs: SchedulerCoefficients, prompts: list[str]) -> float:
        self.pipe.scheduler = QSchedScheduler.wrap(self.base, coeffs)
        images = generate(self.pipe, prompts, self.settings, seed=self.seed,
                          batch_size=self.batch_size or len(prompts))
        self.grid = self.grid or self.pipe.scheduler.flow_sigmas(coeffs.steps)
        value = float(self.objective(images, prompts))
        return value if math.isfinite(value) else -math.inf  # a diverged candidate simply loses

    def evaluate(self, coeffs: SchedulerCoefficients) -> float:
        """Train objective of ``coeffs`` (cached: a repeated configuration costs no sampler run)."""
        key = tuple(coeffs.cx) + tuple(coeffs.ce)
        if key in self.cache:
            return self.cache[key]
        if self.runs >= self.budget:
            raise _BudgetExhausted
        if self.patience and self.runs - self.selected_at >= self.patience:
            self.stopped_early = True
            raise _BudgetExhausted
        value = self.score(coeffs, self.train)
        self.runs += 1
        self.cache[key] = value
        self.bar.update(1)
        if self.best is None or value > self.best_train:
            self.best, self.best_train = coeffs, value
            self.best_heldout = self.score(coeffs, self.heldout)
            self.heldout_runs += 1
            if self.selected is None or self.best_heldout > self.selected_heldout:
                self.selected, self.selected_train, self.selected_heldout = coeffs, value, self.best_heldout
                self.selected_at = self.runs
            self.history.append({"runs": self.runs, "train_best": value, "heldout_best": self.best_heldout,
                                 "selected": self.selected_heldout})
            self.bar.set_postfix(train=f"{value:.4f}", heldout=f"{self.best_heldout:.4f}",
                                 guard_best=f"{self.selected_heldout:.4f}")
        return value


def _with_grid(coeffs: SchedulerCoefficients | None, grid: list[float] | None) -> SchedulerCoefficients | None:
    """``coeffs`` recording the σ grid they were learned on, so they carry to finer schedules as a field
    (the identity needs none: it is the identity at any step count)."""
    if coeffs is None or grid is None or coeffs.is_identity:
        return coeffs
    return replace(coeffs, sigmas=grid)


def _vector_to_coeffs(x: np.ndarray, steps: int, bounds: tuple[float, float]) -> SchedulerCoefficients:
    x = np.clip(np.asarray(x, dtype=float), bounds[0], bounds[1])
    return SchedulerCoefficients(steps, x[:steps].tolist(), x[steps:].tolist())


def _grid_candidates(steps: int, grid_size: int, grid_range: tuple[float, float]):
    values = np.linspace(grid_range[0], grid_range[1], grid_size)
    for cx0 in values:
        for ce0 in values:
            yield SchedulerCoefficients.linear_ramp(steps, float(cx0), float(ce0))


def _run_cma(search: _Search, steps: int, sigma0: float, bounds, seed: int, lambda_: int | None) -> None:
    from deap import base, cma

    class Fitness(base.Fitness):
        weights = (1.0,)

    class Individual(list):
        def __init__(self, values):
            super().__init__(values)
            self.fitness = Fitness()

    dim = 2 * steps
    params = {"lambda_": int(lambda_)} if lambda_ else {}
    strategy = cma.Strategy(centroid=[1.0] * dim, sigma=sigma0, **params)
    rng = np.random.RandomState(seed)
    lo, hi = bounds
    for _ in range(10 * search.budget):  # guard: only cached (repeated) candidates would never end the loop
        if strategy.sigma < 1e-10:
            return  # collapsed onto one point: further samples would all be cache hits
        # DEAP samples from numpy's global RNG: run it on our own seeded state and put the caller's back.
        saved = np.random.get_state()
        np.random.set_state(rng.get_state())
        try:
            population = strategy.generate(Individual)
        finally:
            rng.set_state(np.random.get_state())
            np.random.set_state(saved)
        for ind in population:
            x = np.asarray(ind, dtype=float)
            outside = float(np.sum((x - np.clip(x, lo, hi)) ** 2))
            value = search.evaluate(_vector_to_coeffs(x, steps, bounds))  # raises at the budget
            ind.fitness.values = (value - _OUT_OF_BOUNDS_PENALTY * outside,)
        strategy.update(population)


def _run_nelder_mead(search: _Search, steps: int, sigma0: float, bounds) -> None:
    from scipy.optimize import minimize

    dim = 2 * steps
    x0 = np.ones(dim)
    simplex = np.vstack([x0] + [x0 + sigma0 * np.eye(dim)[i] for i in range(dim)])
    lo, hi = bounds

    def loss(x):
        outside = float(np.sum((x - np.clip(x, lo, hi)) ** 2))
        value = search.evaluate(_vector_to_coeffs(x, steps, bounds))
        return -(value if math.isfinite(value) else -1e30) + _OUT_OF_BOUNDS_PENALTY * outside

    # Restart from the best point while budget remains: one simplex run may converge early.
    for _ in range(50):
        minimize(loss, x0, method="Nelder-Mead",
                 options={"initial_simplex": simplex, "maxfev": 10 * search.budget, "xatol": 1e-4,
                          "fatol": 1e-7})
        best = np.array(search.best.cx + search.best.ce)
        if np.array_equal(best, x0):
            return  # converged at the same point twice: nothing left to find
        x0 = best
        simplex = np.vstack([x0] + [x0 + 0.5 * sigma0 * np.eye(dim)[i] for i in range(dim)])


def learn_coefficients(pipe, train_prompts: Sequence[str], heldout_prompts: Sequence[str],
                       settings: GenerationSettings, objective: Objective, method: str = "cma",
                       budget: int | None = None, seed: int = 0, sigma0: float = 0.05,
                       bounds: tuple[float, float] = (0.7, 1.3), batch_size: int | None = None,
                       progress: bool = True, grid_size: int = 50,
                       grid_range: tuple[float, float] = (0.8, 1.2), lambda_: int | None = None,
                       select: str = "guard", patience: int | None = None) -> QSchedResult:
    """Search Q-Sched coefficients for ``pipe`` (already quantized) that maximise ``objective``.

    ``objective(images, prompts) -> float`` is maximised, e.g.
    ``lambda im, p: jaq(im, p, *scorer_terms(profile_scorer), k=2.0)``. ``budget`` caps the configurations sampled
    on the train prompts, identity included (default: 250 for cma / nelder-mead, the whole grid plus
    the identity for grid). ``batch_size=None`` samples all prompts in one batch. ``seed`` is both the
    sampling seed shared by every candidate and the optimiser's seed. ``select="guard"`` returns the
    candidate with the best held-out (guard) objective, ``"train"`` the best train one; ``patience`` (train
    runs without a guard improvement) stops the search early. ``pipe.scheduler`` is restored afterwards;
    apply the result with ``QSchedScheduler.wrap(base, result.coefficients)``.
    """
    if method not in METHODS:
        raise QschedError(f"unknown Q-Sched search method {method!r}: expected one of {', '.join(METHODS)}")
    if select not in SELECTIONS:
        raise QschedError(f"unknown Q-Sched selection {select!r}: expected one of {', '.join(SELECTIONS)}")
    if patience is not None and patience < 1:
        raise QschedError(f"Q-Sched patience must be at least 1 train run (or None to use the whole budget), "
                          f"got {patience}")
    train_prompts, heldout_prompts = list(train_prompts), list(heldout_prompts)
    if not train_prompts or not heldout_prompts:
        raise QschedError("learning Q-Sched coefficients needs at least one train and one held-out prompt")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo <= 1.0 <= hi:
        raise QschedError(f"Q-Sched bounds must contain 1 (the identity), got {bounds}")
    if method == "grid" and grid_size < 1:
        raise QschedError(f"grid_size must be at least 1, got {grid_size}")
    if budget is None:
        budget = grid_size * grid_size + 1 if method == "grid" else DEFAULT_BUDGET
    if budget < 1:
        raise QschedError(f"the Q-Sched search budget must be at least 1 configuration, got {budget}")
    steps = int(settings.steps)

    original = pipe.scheduler
    base_scheduler = original.unwrap() if isinstance(original, QSchedScheduler) else original
    start = time.perf_counter()
    bar = tqdm(total=budget, desc=f"Q-Sched {method}", unit="config", disable=not progress, leave=False)
    search = _Search(pipe, base_scheduler, train_prompts, heldout_prompts, settings, objective, seed,
                     batch_size, budget, bar, patience)
    try:
        identity = SchedulerCoefficients.ones(steps)
        identity_train = search.evaluate(identity)  # first, so the result never loses to the identity
        identity_heldout = search.best_heldout
        try:
            if method == "grid":
                for coeffs in _grid_candidates(steps, grid_size, grid_range):
                    search.evaluate(coeffs)
            elif method == "cma":
                _run_cma(search, steps, sigma0, (lo, hi), seed, lambda_)
            else:
                _run_nelder_mead(search, steps, sigma0, (lo, hi))
        except _BudgetExhausted:
            pass
    finally:
        bar.close()
        pipe.scheduler = original
    history = list(search.history)
    if history and history[-1]["runs"] != search.runs:  # extend the curve to the end of the search
        history.append({"runs": search.runs, "train_best": search.best_train, "heldout_best": search.best_heldout,
                        "selected": search.selected_heldout})
    if select == "guard":
        chosen, train_jaq, heldout_jaq, chosen_at = (search.selected, search.selected_train,
                                                     search.selected_heldout, search.selected_at)
    else:
        chosen, train_jaq, heldout_jaq = search.best, search.best_train, search.best_heldout
        chosen_at = max(h["runs"] for h in history if h["train_best"] == search.best_train)
    chosen = _with_grid(chosen, search.grid)
    return QSchedResult(
        coefficients=chosen, method=method, train_jaq=train_jaq, heldout_jaq=heldout_jaq,
        identity_train_jaq=identity_train, identity_heldout_jaq=identity_heldout, runs=search.runs,
        sampler_calls=search.runs * len(train_prompts), heldout_runs=search.heldout_runs,
        seconds=time.perf_counter() - start, history=history, select=select, selected_at=chosen_at,
        best_train_jaq=search.best_train, stopped_early=search.stopped_early,
        best_train_coefficients=_with_grid(search.best, search.grid))
