"""NSGA-II search over cache schedules (ECAD-style): maximise quality, minimise denoiser MACs.

Why this shape:

* the genome is :meth:`CacheSchedule.to_genome` (one bit per step ≥ 1, block, component), so DEAP's
  bit-string operators apply unchanged: k-point crossover (p = 0.9 per pair, 4 points by default, as
  ECAD), bit-flip mutation (p = 0.05 per gene), ``tools.selTournamentDCD`` for parents and
  ``tools.selNSGA2`` for survivors (µ + λ);
* offspring identical to a population member or to an earlier offspring are dropped before evaluation,
  so the population never holds duplicates and no schedule is evaluated twice (an archive keyed by
  genome also serves re-discovered schedules);
* the initial population is seeded with the heuristics (no cache, FORA every 2/3/4, attention-only,
  FF-only), then random genomes whose reuse density is itself drawn uniformly from [0, 1], so the seeds
  span the whole MAC axis rather than clustering at 50 % reuse;
* quality is pluggable: ``evaluate(schedules) -> list[float]`` is called once per generation with every
  new schedule, so an evaluator can batch them (:class:`ScheduleQuality` does, in genome order, running
  each prefix the candidates of a call share only once); MACs come from a cheap ``macs(schedule)``
  (normally :meth:`cache_search.cost.CostModel.schedule_macs`). An evaluator's integer work counters
  (``evaluate.counts``: block evaluations run and saved by prefix sharing, MACs) are summed per generation
  into the checkpoint and the front, so they survive a resume;
* deterministic and resumable: DEAP draws from the global ``random`` module, so the search keeps its own
  ``random`` state and swaps it in only around its own draws (the evaluator cannot perturb it, and the
  caller's state is left untouched); initial genomes come from a seeded numpy ``Generator``. After every
  generation a JSON checkpoint (population genomes in order, fitnesses, crowding distances, archive, both
  RNG states) is written atomically to the work dir; a killed search restarted on the same work dir
  continues from the last finished generation and ends with the same front as an unbroken run;
* multi-fidelity (``SearchConfig.proxy_generations`` = G > 0): generations 0 .. G-1 (0 = the initial
  population) are scored by ``evaluate.proxy(proxy_fraction)``, for :class:`ScheduleQuality` the first
  quarter of the prompts with the same noise and the same batches (:meth:`ScheduleQuality.proxy`). Before
  generation G the population is re-scored by the full evaluator and re-ranked (the switch; no random
  draws, so a resume on either side of it repeats it), and the search goes on at full fidelity. Proxy
  scores live in their own archive and counters in the checkpoint; the archive, the front and ``counts``
  hold full-fidelity evaluations only, and the front's ``proxy`` entry gives :func:`proxy_summary` what
  the proxy saved;
* guard selection is a separate step (:func:`cache_search.guard.guard_front`): the final front re-scored
  on other prompts (:meth:`ScheduleQuality.on_prompts`), keeping what they do not dominate, because the
  search overfits its own prompts.

The returned front is the non-dominated set of every schedule evaluated at full fidelity (not only the
last population).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from deap import base, tools

from qsched.runtime.cache_schedule import CacheSchedule, _normalise_blocks

CHECKPOINT = "checkpoint.json"
CHECKPOINT_FORMAT = "qsched-cache-search"
# Bumped whenever the evaluator's batching changes its floating-point results (2: genome-ordered batches and
# prefix sharing), so a compile never resumes an archive scored by a differently batched evaluator.
EVALUATOR_VERSION = 2


@dataclass
class SearchConfig:
    population: int = 24  # µ = λ; a multiple of 4 (selTournamentDCD)
    generations: int = 20
    crossover_prob: float = 0.9
    crossover_points: int = 4
    mutation_prob: float = 0.05  # per gene
    seed: int = 0
    fora_periods: tuple[int, ...] = (2, 3, 4)
    # multi-fidelity: generations 0 .. proxy_generations - 1 are scored by ``evaluate.proxy(proxy_fraction)``
    # (ScheduleQuality: the first ceil(fraction × P) prompts); 0 = every generation at full fidelity
    proxy_generations: int = 0
    proxy_fraction: float = 0.25

    def __post_init__(self):
        self.fora_periods = tuple(int(n) for n in self.fora_periods)
        if self.population < 4 or self.population % 4:
            raise ValueError(f"population must be a positive multiple of 4, got {self.population}")
        if not 0 <= self.proxy_generations <= self.generations:
            raise ValueError(f"proxy_generations must lie in [0, generations = {self.generations}], "
                             f"got {self.proxy_generations}")
        if not 0.0 < self.proxy_fraction <= 1.0:
            raise ValueError(f"proxy_fraction must lie in (0, 1], got {self.proxy_fraction}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fora_periods"] = list(self.fora_periods)
        return d


class _Fitness(base.Fitness):
    weights = (1.0, -1.0)  # (quality ↑, MACs ↓)


class _Individual(list):
    """A genome (list of 0/1) with a DEAP fitness; defined here rather than via deap.creator globals."""

    def __init__(self, genes=()):
        super().__init__(int(g) for g in genes)
        self.fitness = _Fitness()


def _key(genome: Sequence[int]) -> str:
    return "".join("1" if g else "0" for g in genome)


# --- results ------------------------------------------------------------------------------------------


@dataclass
class FrontPoint:
    schedule: CacheSchedule
    quality: float  # on the search prompts
    macs: float
    mac_fraction: float
    guard_quality: float | None = None  # on the guard prompts (:func:`guard_front`); None: not guarded

    @property
    def selection_quality(self) -> float:
        """The quality that picks operating points: the guard's when the front was guarded."""
        return self.quality if self.guard_quality is None else self.guard_quality

    def to_dict(self) -> dict:
        return {"quality": self.quality, "guard_quality": self.guard_quality, "macs": self.macs,
                "mac_fraction": self.mac_fraction, "speedup": (1.0 / self.mac_fraction) if self.mac_fraction else None,
                "schedule": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "FrontPoint":
        return cls(CacheSchedule.from_dict(d["schedule"]), d["quality"], d["macs"], d["mac_fraction"],
                   d.get("guard_quality"))


@dataclass
class ParetoFront:
    """Non-dominated (quality ↑, MACs ↓) schedules, sorted by MACs; ``baseline_macs`` = no cache. After
    :func:`guard_front`, the points are those non-dominated on (guard quality, MACs) and ``guard`` says
    what the guard did; ``proxy`` holds the proxy phase's counters (:func:`proxy_summary`)."""

    points: list[FrontPoint]
    baseline_macs: float
    generations: int = 0
    evaluations: int = 0
    config: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # the evaluator's work counters, summed over the search
    proxy: dict = field(default_factory=dict)
    guard: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"baseline_macs": self.baseline_macs, "generations": self.generations,
             "evaluations": self.evaluations, "config": self.config, "evaluation_counts": self.counts,
             "points": [p.to_dict() for p in self.points]}
        d.update({k: v for k, v in (("proxy", self.proxy), ("guard", self.guard)) if v})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ParetoFront":
        return cls([FrontPoint.from_dict(p) for p in d["points"]], d["baseline_macs"], d.get("generations", 0),
                   d.get("evaluations", 0), d.get("config", {}), dict(d.get("evaluation_counts", {})),
                   dict(d.get("proxy", {})), dict(d.get("guard", {})))


def non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (quality ↑, MACs ↓) points, sorted by MACs; one index per distinct
    objective pair (the first given)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    keep, best = [], -math.inf
    for i in order:
        if points[i][0] > best:
            keep.append(i)
            best = points[i][0]
    return keep


# --- RNG plumbing -------------------------------------------------------------------------------------


def _random_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


@contextmanager
def _own_random(search):
    """Run DEAP's draws on the search's own ``random`` state, leaving the caller's state untouched."""
    outer = random.getstate()
    random.setstate(search.py_state)
    try:
        yield
    finally:
        search.py_state = random.getstate()
        random.setstate(outer)


def cx_multi_point(ind1: list, ind2: list, points: int) -> tuple[list, list]:
    """k-point crossover in place (DEAP has one- and two-point only); cut points from ``random``."""
    size = min(len(ind1), len(ind2))
    k = min(points, size - 1)
    if k < 1:
        return ind1, ind2
    if k == 2:
        return tools.cxTwoPoint(ind1, ind2)
    cuts = sorted(random.sample(range(1, size), k)) + [size]
    swap, start = False, 0
    for cut in cuts:
        if swap:
            ind1[start:cut], ind2[start:cut] = ind2[start:cut], ind1[start:cut]
        swap, start = not swap, cut
    return ind1, ind2


# --- the search ---------------------------------------------------------------------------------------


class _Search:
    def __init__(self, steps, blocks, evaluate, macs, config: SearchConfig, work_dir):
        self.steps, self.blocks = int(steps), _normalise_blocks(blocks)
        self.evaluate, self.macs, self.config = evaluate, macs, config
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.length = CacheSchedule.genome_length(self.steps, self.blocks)
        if self.length < 1:
            raise ValueError("nothing to search: the schedule has one step (step 0 always computes)")
        self.archive: dict[str, tuple[float, float]] = {}  # full-fidelity (quality, MACs) by genome
        self.counts: dict[str, int] = {}  # the evaluator's integer work counters, summed over finished generations
        # the proxy phase: its own archive and counters, the full re-evaluation at the switch, and the proxy's
        # (proxy prompts, full prompts) when it says (``proxy_scale``)
        self.proxy_archive: dict[str, tuple[float, float]] = {}
        self.proxy_counts: dict[str, int] = {}
        self.switch_counts: dict[str, int] = {}
        self.proxy_scale: list[int] | None = None
        self.proxy_evaluator = None
        if config.proxy_generations and not callable(getattr(evaluate, "proxy", None)):
            raise ValueError("proxy_generations needs an evaluator with a proxy(fraction) method "
                             "(ScheduleQuality and its Ray variant have one)")
        self.population: list[_Individual] = []
        self.generation = 0
        rng = random.Random(config.seed)
        self.py_state = rng.getstate()
        self.np_rng = np.random.default_rng(config.seed)

    def schedule(self, genome) -> CacheSchedule:
        return CacheSchedule.from_genome(genome, self.steps, self.blocks)

    # evaluation -------------------------------------------------------------------------------------

    def _in_proxy(self, generation: int) -> bool:
        return generation < self.config.proxy_generations

    def _get_proxy(self):
        if self.proxy_evaluator is None:  # built on first use: a search resumed past the switch never needs it
            self.proxy_evaluator = self.evaluate.proxy(self.config.proxy_fraction)
            scale = getattr(self.proxy_evaluator, "proxy_scale", None)
            self.proxy_scale = [int(x) for x in scale] if scale else None
        return self.proxy_evaluator

    def _assign(self, individuals: list[_Individual], proxy: bool = False) -> dict[str, int]:
        """Fitness for each individual, evaluating (in one batch) only genomes not in the archive (the proxy's
        archive and evaluator when ``proxy``). Returns the evaluator's counters of this batch."""
        archive = self.proxy_archive if proxy else self.archive
        evaluate = self._get_proxy() if proxy else self.evaluate
        new, seen = [], set()
        for ind in individuals:
            k = _key(ind)
            if k not in archive and k not in seen:
                seen.add(k)
                new.append(ind)
        delta: dict[str, int] = {}
        if new:
            schedules = [self.schedule(ind) for ind in new]
            before = _evaluator_counts(evaluate)
            qualities = list(evaluate(schedules))
            delta = {k: v - before.get(k, 0) for k, v in _evaluator_counts(evaluate).items()}
            _add_counts(self.proxy_counts if proxy else self.counts, delta)
            if len(qualities) != len(schedules):
                raise ValueError(f"evaluate returned {len(qualities)} values for {len(schedules)} schedules")
            for ind, sched, q in zip(new, schedules, qualities):
                q = float(q)
                if not math.isfinite(q):
                    raise ValueError(f"non-finite quality {q} for {sched}")
                archive[_key(ind)] = (q, float(self.macs(sched)))
        for ind in individuals:
            ind.fitness.values = archive[_key(ind)]
        return delta

    def _switch_to_full(self) -> None:
        """End of the proxy phase: score the population at full fidelity and rank it by that from now on (no
        random draws, so a search resumed on either side of the switch repeats it exactly)."""
        _add_counts(self.switch_counts, self._assign(self.population))
        self._select(list(self.population))

    # initial population -----------------------------------------------------------------------------

    def _seed_population(self) -> list[_Individual]:
        s, b, cfg = self.steps, self.blocks, self.config
        seeds = [CacheSchedule.no_cache(s, b)]
        seeds += [CacheSchedule.fora(s, b, n) for n in cfg.fora_periods]
        seeds += [CacheSchedule.attention_only(s, b), CacheSchedule.ff_only(s, b)]
        pop, keys = [], set()
        for sched in seeds:
            g = sched.to_genome()
            if _key(g) not in keys and len(pop) < cfg.population:
                keys.add(_key(g))
                pop.append(_Individual(g))
        if 2 ** min(self.length, 62) < cfg.population:
            raise ValueError(f"only {2 ** self.length} distinct schedules exist; population {cfg.population} "
                             "is too large")
        while len(pop) < cfg.population:
            density = self.np_rng.random()
            g = (self.np_rng.random(self.length) < density).astype(int).tolist()
            if _key(g) not in keys:
                keys.add(_key(g))
                pop.append(_Individual(g))
        return pop

    # one generation ---------------------------------------------------------------------------------

    def _offspring(self) -> list[_Individual]:
        cfg = self.config
        with _own_random(self):
            parents = tools.selTournamentDCD(self.population, len(self.population))
            children = [_Individual(p) for p in parents]
            for a, b in zip(children[::2], children[1::2]):
                if random.random() < cfg.crossover_prob:
                    cx_multi_point(a, b, cfg.crossover_points)
            for c in children:
                tools.mutFlipBit(c, indpb=cfg.mutation_prob)
        keys = {_key(ind) for ind in self.population}
        unique = []
        for c in children:
            k = _key(c)
            if k not in keys:
                keys.add(k)
                unique.append(c)
        return unique

    def _select(self, candidates: list[_Individual]) -> None:
        self.population = tools.selNSGA2(candidates, self.config.population)

    def run(self, on_generation: Callable | None = None) -> ParetoFront:
        cfg = self.config
        if not self._load():
            pop = self._seed_population()
            self._assign(pop, proxy=self._in_proxy(0))
            self._select(pop)  # assigns the crowding distances selTournamentDCD reads
            self.generation = 0
            self._save()
            if on_generation is not None:
                on_generation(0, self)
        while self.generation < cfg.generations:
            if self.generation == cfg.proxy_generations - 1:
                self._switch_to_full()
            children = self._offspring()
            self._assign(children, proxy=self._in_proxy(self.generation + 1))
            self._select(self.population + children)
            self.generation += 1
            self._save()
            if on_generation is not None:
                on_generation(self.generation, self)
        return self.front()

    def front(self) -> ParetoFront:
        keys = list(self.archive)
        pts = [self.archive[k] for k in keys]
        baseline = float(self.macs(CacheSchedule.no_cache(self.steps, self.blocks)))
        points = []
        for i in non_dominated(pts):
            q, m = pts[i]
            sched = self.schedule([int(c) for c in keys[i]])
            points.append(FrontPoint(sched, q, m, m / baseline if baseline else float("nan")))
        proxy = {}
        if self.config.proxy_generations:
            proxy = {"candidates": len(self.proxy_archive), "prompts": self.proxy_scale,
                     "counts": dict(self.proxy_counts), "switch_counts": dict(self.switch_counts)}
        return ParetoFront(points, baseline, self.generation, len(self.archive), self.config.to_dict(),
                           dict(self.counts), proxy)

    # checkpoints ------------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {"steps": self.steps, "blocks": [{"name": n, "components": list(c)} for n, c in self.blocks]}

    def _save(self) -> None:
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "format": CHECKPOINT_FORMAT, "version": 1, "config": self.config.to_dict(), "layout": self._layout(),
            "generation": self.generation,
            "population": [{"genome": _key(ind), "fitness": list(ind.fitness.values),
                            "crowding": ind.fitness.crowding_dist} for ind in self.population],
            "archive": {k: list(v) for k, v in self.archive.items()},
            "evaluation_counts": self.counts,
            "proxy_archive": {k: list(v) for k, v in self.proxy_archive.items()},
            "proxy_counts": self.proxy_counts, "switch_counts": self.switch_counts, "proxy_scale": self.proxy_scale,
            "random_state": _random_state_to_json(self.py_state),
            "numpy_state": self.np_rng.bit_generator.state,
        }
        path = self.work_dir / CHECKPOINT
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))  # floats round-trip exactly; inf crowding as Infinity
        os.replace(tmp, path)

    def _load(self) -> bool:
        if self.work_dir is None or not (self.work_dir / CHECKPOINT).is_file():
            return False
        data = json.loads((self.work_dir / CHECKPOINT).read_text())
        if data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.work_dir / CHECKPOINT} is not a cache-search checkpoint")
        saved = dict(data["config"])
        current = self.config.to_dict()
        defaults = SearchConfig().to_dict()  # for knobs older checkpoints predate
        # generations may grow on resume; everything else must match or the run would not be the same search
        for key in set(saved) | set(current):
            if key != "generations" and saved.get(key, defaults.get(key)) != current.get(key):
                raise ValueError(f"checkpoint in {self.work_dir} was made with {key}={saved.get(key)!r}, "
                                 f"not {current.get(key)!r}")
        if data["layout"] != self._layout():
            raise ValueError(f"checkpoint in {self.work_dir} is for a different schedule layout")
        self.generation = int(data["generation"])
        self.archive = {k: (float(v[0]), float(v[1])) for k, v in data["archive"].items()}
        self.counts = {k: int(v) for k, v in data.get("evaluation_counts", {}).items()}
        self.proxy_archive = {k: (float(v[0]), float(v[1])) for k, v in data.get("proxy_archive", {}).items()}
        self.proxy_counts = {k: int(v) for k, v in data.get("proxy_counts", {}).items()}
        self.switch_counts = {k: int(v) for k, v in data.get("switch_counts", {}).items()}
        self.proxy_scale = data.get("proxy_scale")
        self.population = []
        for item in data["population"]:
            ind = _Individual(int(c) for c in item["genome"])
            ind.fitness.values = tuple(item["fitness"])
            ind.fitness.crowding_dist = item["crowding"]
            self.population.append(ind)
        self.py_state = _random_state_from_json(data["random_state"])
        self.np_rng.bit_generator.state = data["numpy_state"]
        return True


def _evaluator_counts(evaluate) -> dict[str, int]:
    """An evaluator's cumulative integer work counters (``evaluate.counts``), if it keeps any. Only integers
    that are a function of the evaluated schedules belong there: they go into the checkpoint and the front,
    which must not depend on timing or on where the evaluation ran."""
    return {k: int(v) for k, v in (getattr(evaluate, "counts", None) or {}).items()}


def nsga2_search(steps: int, blocks, evaluate: Callable[[list[CacheSchedule]], list[float]],
                 macs: Callable[[CacheSchedule], float], config: SearchConfig | None = None,
                 work_dir: str | Path | None = None,
                 on_generation: Callable[[int, object], None] | None = None) -> ParetoFront:
    """Run (or resume, when ``work_dir`` holds a checkpoint) the NSGA-II cache-schedule search.

    ``blocks``: the layout, e.g. :func:`qsched.runtime.cache_schedule.block_layout(pipe)`. ``on_generation(g, search)``
    runs after generation g's checkpoint is written (g = 0 is the evaluated initial population); raising
    from it stops the search, which the same call resumes later.
    """
    return _Search(steps, blocks, evaluate, macs, config or SearchConfig(), work_dir).run(on_generation)


# --- the quality evaluator ----------------------------------------------------------------------------


def proxy_prompt_count(prompts: int, fraction: float) -> int:
    """How many prompts the proxy scores: ceil(fraction × prompts), at least 1 (4 of 16, 2 of 8)."""
    return max(1, min(prompts, math.ceil(fraction * prompts - 1e-9)))


class _Evaluator:
    """What the in-process and Ray evaluators share: the search's call, the same evaluator on other prompts
    (:meth:`on_prompts`: the guard set) and the multi-fidelity proxy (:meth:`proxy`: a prompt subset).
    Subclasses set ``prompts``, ``seed``, ``max_batch`` and ``_variants`` and build a variant in ``_variant``."""

    def __call__(self, schedules: Sequence[CacheSchedule]) -> list[float]:
        return [m["quality"] for m in self.evaluate_metrics(schedules)]

    def on_prompts(self, prompts: Sequence[str], seed: int, max_batch: int | None = None):
        """This evaluator (same pipeline, quality function and settings) on other prompts and noise seed, with
        its own uncached reference and counters; built once per (prompts, seed, max_batch) and kept."""
        key = (tuple(prompts), int(seed), self.max_batch if max_batch is None else int(max_batch))
        if key not in self._variants:
            self._variants[key] = self._variant(*key)
        return self._variants[key]

    def proxy(self, fraction: float):
        """The cheap proxy of a multi-fidelity search: the first :func:`proxy_prompt_count` prompts with the
        same noise per row, and the same candidates per pipeline call, so its batches are the full
        evaluator's and its row counters exactly n / P of what full evaluation of the same candidates runs
        (``proxy_scale`` = (n, P))."""
        p = len(self.prompts)
        n = proxy_prompt_count(p, fraction)
        variant = self.on_prompts(self.prompts[:n], self.seed, max_batch=max(1, self.max_batch // p) * n)
        variant.proxy_scale = (n, p)
        return variant


class ScheduleQuality(_Evaluator):
    """Quality of cached generations: the scorer's content score and fidelity to the uncached images.

    ``quality = (1 - w) · score + w · fidelity`` with ``score`` the content score of the model profile's
    :class:`qsched.scoring.scorer.Scorer` (the world's judge for flux-tiny, CLIP match and CLIP-IQA for a
    real model) and ``fidelity = mean_i min(PSNR_i, cap) / cap`` (PSNR of image i against the uncached
    pipeline's image for the same prompt and noise; cap 40 dB, beyond which differences are invisible at 8
    bits). Both terms lie in [0, 1]; w = 0.5 by default. The content term keeps the search honest about
    content (a cached image may differ yet still be right); the fidelity term ranks schedules the scorer
    cannot tell apart and makes the uncached schedule the quality reference.

    Candidates are batched: up to ``max_batch // len(prompts)`` schedules run in one pipeline call with the
    prompts repeated per candidate (``enable_cache`` with a schedule per row group), and every row draws its
    initial noise from its own generator (seed + prompt index), so each candidate sees exactly the noise the
    reference saw, whatever the batch. :func:`batch_plan` sorts the candidates by genome before cutting
    them into calls, so candidates with long common prefixes share a call, and ``share_prefixes`` (on by
    default) runs each shared prefix once (see :mod:`qsched.runtime.caching`).

    ``counts`` sums what the evaluations ran (integers, a function of the schedules only, so the search
    keeps them in its checkpoint): candidates, pipeline calls, component and denoiser rows run / naive
    (each candidate on its own) / batched without sharing, and the same weighted by MACs. ``seconds`` is
    the wall time spent in evaluation. :meth:`on_prompts` gives the same evaluator on other prompts (the
    guard set), :meth:`proxy` on the first of its own (the multi-fidelity proxy).
    """

    def __init__(self, pipe, prompts: Sequence[str], settings, scorer, seed: int = 0, max_batch: int = 64,
                 fidelity_weight: float = 0.5, psnr_cap: float = 40.0, call_kwargs: dict | None = None,
                 share_prefixes: bool = True, cost=None):
        self.pipe, self.prompts, self.settings, self.seed = pipe, list(prompts), settings, int(seed)
        self.scorer = scorer
        self.max_batch, self.fidelity_weight, self.psnr_cap = int(max_batch), float(fidelity_weight), float(psnr_cap)
        self.call_kwargs = dict(call_kwargs or {})
        self.share_prefixes = bool(share_prefixes)
        self.counts: dict[str, int] = {}
        self.seconds = 0.0
        self._variants: dict = {}
        self._cost = cost if cost is not None else _cost_model(pipe, settings)  # the caller's, when it has one
        self.reference = self._generate(None, 1)[0]
        self.reference_metrics = self.metrics(self.reference)

    def _variant(self, prompts, seed, max_batch) -> "ScheduleQuality":
        other = copy.copy(self)  # the scorer (and its loaded CLIP) comes along
        other.prompts, other.seed, other.max_batch = list(prompts), seed, max_batch
        other.counts, other.seconds, other._variants = {}, 0.0, {}
        other.reference = other._generate(None, 1)[0]
        other.reference_metrics = other.metrics(other.reference)
        return other

    def _generate(self, schedules: list[CacheSchedule] | None, groups: int):
        """Images of ``groups`` row groups (one per schedule) and the counters of the call. One schedule on
        more prompts than ``max_batch`` rows runs in slices of the prompts (each row keeps its own noise)."""
        import torch

        p = len(self.prompts)
        if groups > 1 or p <= self.max_batch:
            return self._call(schedules, groups, 0, p)
        images, counts = [], {}
        for start in range(0, p, self.max_batch):
            part, part_counts = self._call(schedules, 1, start, min(start + self.max_batch, p))
            images.append(part)
            _add_counts(counts, part_counts)
        counts["candidates"] = len(schedules or ())  # the slices each counted them
        return torch.cat(images), counts

    def _call(self, schedules: list[CacheSchedule] | None, groups: int, start: int, stop: int):
        """One pipeline call: prompts ``start:stop`` for each of ``groups`` row groups."""
        import torch

        from qsched.runtime.caching import enable_cache
        from qsched.runtime.generation import call_arguments

        prompts = self.prompts[start:stop]
        p = len(prompts)
        # the same call every other stage makes (PixArt's resolution binning and caption cleaning included)
        kwargs = {**call_arguments(self.pipe, self.settings), "output_type": "pt", **self.call_kwargs}
        gens = [torch.Generator("cpu").manual_seed(self.seed + i) for _ in range(groups) for i in range(start, stop)]
        self.pipe.set_progress_bar_config(disable=True)
        handle = (enable_cache(self.pipe, schedules, rows_per_group=p, share_prefixes=self.share_prefixes)
                  if schedules else None)
        with handle or nullcontext(), torch.inference_mode():
            images = self.pipe(prompts * groups, generator=gens, **kwargs).images
        counts = {"candidates": len(schedules or ()), "calls": 1}
        if handle is not None:
            counts.update(handle.row_counts())
            if self._cost is not None:
                comp = np.array([self._cost.components[slot] for slot in handle.schedule.slots], dtype=np.int64)
                over = self._cost.overhead
                counts["macs"] = int(handle.rows_run @ comp) + handle.denoiser_rows * over
                counts["macs_naive"] = int(handle.rows_naive @ comp) + handle.denoiser_rows_naive * over
                counts["macs_batched"] = int(handle.rows_batched @ comp) + handle.denoiser_rows_naive * over
        return images.float().cpu(), counts

    def metrics(self, images) -> dict:
        """The scorer's content terms, mean PSNR to the reference, fidelity and the combined quality of P images."""
        from qsched.metrics import psnr

        content = self.scorer.content(images, self.prompts)
        return {**content, **quality_terms(content["score"], psnr(images, self.reference), self.psnr_cap,
                                           self.fidelity_weight)}

    def evaluate_metrics(self, schedules: Sequence[CacheSchedule]) -> list[dict]:
        """Metrics of each schedule, in the given order (evaluated in the calls :func:`batch_plan` makes)."""
        plan = batch_plan(schedules, len(self.prompts), self.max_batch)
        results = [self.evaluate_batch([schedules[i] for i in chunk]) for chunk in plan]
        return _in_input_order(plan, results, len(schedules))

    def evaluate_batch(self, chunk: Sequence[CacheSchedule]) -> list[dict]:
        """Metrics of a few schedules generated in one pipeline call (a batch from :func:`batches`)."""
        metrics, counts = self.evaluate_batch_counted(chunk)
        _add_counts(self.counts, counts)
        return metrics

    def evaluate_batch_counted(self, chunk: Sequence[CacheSchedule]) -> tuple[list[dict], dict]:
        """:meth:`evaluate_batch` and that call's counters, without adding them to ``counts`` (what a Ray
        worker returns: the driver's evaluator keeps the sums)."""
        import time

        start = time.perf_counter()
        p = len(self.prompts)
        images, counts = self._generate(list(chunk), len(chunk))
        metrics = [self.metrics(images[g * p:(g + 1) * p]) for g in range(len(chunk))]
        self.seconds += time.perf_counter() - start
        return metrics, counts

    def evaluate_variant_batch_counted(self, item) -> tuple[list[dict], dict]:
        """:meth:`evaluate_batch_counted` of :meth:`on_prompts`, for ``item = ((prompts, seed, max_batch),
        chunk)``: what a Ray worker runs for the proxy and the guard (it builds each variant once)."""
        variant, chunk = item
        return self.on_prompts(*variant).evaluate_batch_counted(chunk)


def quality_terms(score: float, db, psnr_cap: float = 40.0, fidelity_weight: float = 0.5) -> dict:
    """:class:`ScheduleQuality`'s formula from a content ``score`` in [0, 1] and per-image PSNRs ``db`` to the
    uncached images: mean PSNR (capped at 100 dB for the record), fidelity and the combined quality."""
    fidelity = float(np.mean(np.minimum(db, psnr_cap) / psnr_cap))
    return {"psnr": float(np.mean(np.minimum(db, 100.0))), "fidelity": fidelity,
            "quality": (1.0 - fidelity_weight) * score + fidelity_weight * fidelity}


def _cost_model(pipe, settings):
    """The pipeline's MAC table, to weight the row counters; None for a denoiser that cannot be priced."""
    from cache_search.cost import CostModel

    try:
        return CostModel.for_pipeline(pipe, settings)
    except (ValueError, TypeError):
        return None


def _add_counts(total: dict, counts: dict) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + int(value)


def _in_input_order(plan: list[list[int]], results: list[list], n: int) -> list:
    out = [None] * n
    for chunk, values in zip(plan, results):
        for i, value in zip(chunk, values):
            out[i] = value
    return out


def sharing_summary(counts: dict) -> dict:
    """What prefix sharing saved, from an evaluator's (or a front's) ``counts``: component evaluations
    (sample rows × component calls) and MACs run against evaluating each candidate on its own (``naive``)
    and against the unshared batched call (``batched``, which recomputes every row whenever any candidate
    recomputes)."""
    out = {"candidates": counts.get("candidates", 0), "calls": counts.get("calls", 0)}
    for name, run, naive, batched in (("block_evaluations", "component_rows", "component_rows_naive",
                                       "component_rows_batched"), ("macs", "macs", "macs_naive", "macs_batched")):
        if counts.get(naive):
            out[name] = {"run": counts[run], "naive": counts[naive], "batched": counts.get(batched),
                         "saved_vs_naive": round(1.0 - counts[run] / counts[naive], 4),
                         "saved_vs_batched": round(1.0 - counts[run] / counts[batched], 4) if counts.get(batched)
                         else None}
    return out


def proxy_summary(front: ParetoFront) -> dict:
    """What the proxy phase of a multi-fidelity search saved ({} when it had none), in block evaluations
    (component rows) and MACs: run by the proxy, what the same candidates cost at full fidelity (the proxy's
    rows × P / n: exact, as the proxy keeps the full evaluator's batches), the full re-evaluation of the
    population at the switch, and the whole search's work against the same search with its proxy
    candidates scored at full fidelity and no switch (an estimate: a search without the proxy would have
    taken other paths)."""
    proxy = front.proxy
    if not proxy:
        return {}
    out = {"generations": front.config.get("proxy_generations"), "candidates": proxy.get("candidates"),
           "prompts": proxy.get("prompts")}
    n, p = proxy.get("prompts") or (0, 0)
    for name, key in (("block_evaluations", "component_rows"), ("macs", "macs")):
        run = proxy.get("counts", {}).get(key)
        if run is None or not n:
            continue
        at_full = round(run * p / n)
        switch = proxy.get("switch_counts", {}).get(key, 0)
        full = front.counts.get(key, 0)
        without = full - switch + at_full
        out[name] = {"proxy_run": run, "proxy_at_full_fidelity": at_full, "switch": switch,
                     "search_run": full + run, "search_without_proxy": without,
                     "saved": round(1.0 - (full + run) / without, 4) if without else None}
    return out


def batch_plan(schedules: Sequence[CacheSchedule], prompts: int, max_batch: int) -> list[list[int]]:
    """Which candidates share one pipeline call: indices into ``schedules``, ``max_batch // prompts`` per
    call, taken in genome order (step-major, as the sampler runs) so that candidates with long common
    prefixes land in the same call and prefix sharing finds them. Batch shapes decide the floating-point
    results, so in-process and distributed evaluation use exactly this plan; it depends only on the
    schedules given (a generation's new candidates), so a resumed search repeats it."""
    per_call = max(1, max_batch // prompts)
    order = sorted(range(len(schedules)), key=lambda i: (schedules[i].table.tobytes(), i))
    return [order[i:i + per_call] for i in range(0, len(order), per_call)]


def batches(schedules: Sequence[CacheSchedule], prompts: int, max_batch: int) -> list[list[CacheSchedule]]:
    """The schedules of each call of :func:`batch_plan`."""
    return [[schedules[i] for i in chunk] for chunk in batch_plan(schedules, prompts, max_batch)]


class _ScheduleQualityBuilder:
    """Runs on a Ray worker, once: load the pipeline and the scorer (from its plain spec), and compute the
    uncached reference images."""

    def __init__(self, source, prompts, settings, scorer_spec, seed, kwargs):
        self.source, self.prompts, self.settings, self.seed, self.kwargs = source, prompts, settings, seed, kwargs
        self.scorer_spec = scorer_spec

    def __call__(self) -> ScheduleQuality:
        from qsched.scoring.scorer import scorer_from_spec

        pipe = self.source.load()
        scorer = scorer_from_spec(self.scorer_spec, device=str(getattr(pipe, "device", "cpu")))
        return ScheduleQuality(pipe, self.prompts, self.settings, scorer, self.seed, **self.kwargs)


class DistributedScheduleQuality(_Evaluator):
    """:class:`ScheduleQuality` over a :class:`qsched.distributed.WorkerPool`: each worker holds the pipeline
    and the reference images; the batches of one generation go to whichever worker is free. Same batches
    as in process, so the same qualities, the same counters and the same front. Its :meth:`on_prompts`
    variants (proxy, guard) run on the workers too, each of which builds the variant once."""

    def __init__(self, pool, prompts: Sequence[str], seed: int, max_batch: int, variant: bool = False):
        self.pool, self.prompts, self.seed, self.max_batch = pool, list(prompts), int(seed), int(max_batch)
        self.variant = variant  # whether the workers switch to these prompts (else: the ones they were built with)
        self.counts: dict[str, int] = {}
        self.seconds = 0.0
        self._variants: dict = {}

    def _variant(self, prompts, seed, max_batch) -> "DistributedScheduleQuality":
        return DistributedScheduleQuality(self.pool, prompts, seed, max_batch, variant=True)

    def evaluate_metrics(self, schedules: Sequence[CacheSchedule]) -> list[dict]:
        import time

        start = time.perf_counter()
        plan = batch_plan(schedules, len(self.prompts), self.max_batch)
        chunks = [[schedules[i] for i in chunk] for chunk in plan]
        if self.variant:
            key = (self.prompts, self.seed, self.max_batch)
            results = self.pool.map("evaluate_variant_batch_counted", [(key, chunk) for chunk in chunks])
        else:
            results = self.pool.map("evaluate_batch_counted", chunks)
        for _, counts in results:
            _add_counts(self.counts, counts)
        self.seconds += time.perf_counter() - start
        return _in_input_order(plan, [metrics for metrics, _ in results], len(schedules))


def schedule_quality(pipe, prompts: Sequence[str], settings, scorer, seed: int = 0, **kwargs) -> ScheduleQuality:
    """The evaluator for :func:`nsga2_search` (see :class:`ScheduleQuality` for the formula)."""
    return ScheduleQuality(pipe, prompts, settings, scorer, seed, **kwargs)


@contextmanager
def distributed_schedule_quality(pipe, prompts: Sequence[str], settings, scorer, seed: int = 0, *, ray,
                                 source=None, max_batch: int = 64, **kwargs):
    """:func:`schedule_quality` on Ray workers (``ray``: a :class:`qsched.distributed.RayConfig`), for the
    duration of the ``with`` block. ``source`` defaults to ``pipe`` as it is now, via the object store; each
    worker rebuilds ``scorer`` from its :meth:`~qsched.scoring.scorer.Scorer.spec`."""
    from qsched.distributed import PipelineSource, WorkerPool, connect

    connect(ray)
    source = source or PipelineSource.from_pipeline(pipe)
    builder = _ScheduleQualityBuilder(source, list(prompts), settings, scorer.spec(), int(seed),
                                      dict(max_batch=max_batch, **kwargs))
    device = str(getattr(pipe, "device", "cpu"))
    with WorkerPool(ray, builder, device=device) as pool:
        yield DistributedScheduleQuality(pool, prompts, seed, max_batch)
