"""NSGA-II cache search: non-dominated fronts, deterministic, resumable, and the tinyworld evaluator."""
import json
import random

import numpy as np
import pytest

from cache_search.schedule import CacheSchedule, block_layout
from cache_search.search import (CHECKPOINT, ParetoFront, SearchConfig, cx_multi_point, non_dominated, nsga2_search,
                                 world_quality)

BLOCKS = (("transformer_blocks.0", ("attn", "ff", "ff_context")),
          ("transformer_blocks.1", ("attn", "ff", "ff_context")),
          ("single_transformer_blocks.0", ("attn", "proj_mlp", "proj_out")))
STEPS = 5
_W = np.random.default_rng(7).random((STEPS, 9))
_COST = np.random.default_rng(8).random(9) + 0.5


class Synthetic:
    """Cheap objective: quality falls with (weighted) reuse, plus a ripple so the front is not trivial.
    The no-cache schedule is the unique best. Counts what it is asked to evaluate."""

    def __init__(self):
        self.calls, self.evaluated = 0, []
        self.counts = {"candidates": 0}  # summed into the checkpoint and the front by the search

    def __call__(self, schedules):
        self.calls += 1
        self.evaluated += [s.to_genome() for s in schedules]
        self.counts["candidates"] += len(schedules)
        return [1.0 - float((s.table * _W).sum()) / _W.sum() - 0.05 * np.sin(3.0 * s.num_reused) ** 2
                * (s.num_reused > 0) for s in schedules]


def synthetic_macs(s: CacheSchedule) -> float:
    return 1000.0 + float(((~s.table) * _COST).sum())


CONFIG = SearchConfig(population=12, generations=6, seed=11)


def _dominates(a, b):
    return a.quality >= b.quality and a.macs <= b.macs and (a.quality > b.quality or a.macs < b.macs)


def test_non_dominated():
    pts = [(0.5, 10.0), (0.6, 12.0), (0.4, 11.0), (0.6, 12.0), (0.9, 20.0), (0.2, 5.0), (0.9, 25.0)]
    assert non_dominated(pts) == [5, 0, 1, 4]


def test_cx_multi_point_swaps_alternate_segments():
    random.seed(0)
    a, b = [0] * 20, [1] * 20
    cx_multi_point(a, b, 4)
    assert [x + y for x, y in zip(a, b)] == [1] * 20
    changes = sum(a[i] != a[i + 1] for i in range(19))
    assert changes == 4 and a[0] == 0 and a[-1] == 0  # 4 distinct interior cuts: swapped 2nd and 4th segments


def test_front_is_non_dominated_and_contains_no_cache(tmp_path):
    outer = random.getstate()
    evaluator = Synthetic()
    front = nsga2_search(STEPS, BLOCKS, evaluator, synthetic_macs, CONFIG, work_dir=tmp_path)
    assert random.getstate() == outer  # the caller's random state is untouched
    pts = front.points
    assert len(pts) >= 3
    assert all(not _dominates(p, q) for p in pts for q in pts)
    assert [p.macs for p in pts] == sorted(p.macs for p in pts)
    none = CacheSchedule.no_cache(STEPS, BLOCKS)
    assert pts[-1].schedule == none and pts[-1].quality == 1.0 and pts[-1].mac_fraction == 1.0
    assert front.baseline_macs == synthetic_macs(none)
    for p in pts:
        assert p.mac_fraction == p.macs / front.baseline_macs
    # every evaluated schedule is distinct: duplicates are never evaluated
    keys = [tuple(g) for g in evaluator.evaluated]
    assert len(keys) == len(set(keys)) == front.evaluations
    assert evaluator.calls == CONFIG.generations + 1  # one batched call per generation (+ the initial one)
    # the heuristic seeds were evaluated
    for seed in (none, CacheSchedule.fora(STEPS, BLOCKS, 2), CacheSchedule.fora(STEPS, BLOCKS, 3),
                 CacheSchedule.fora(STEPS, BLOCKS, 4), CacheSchedule.attention_only(STEPS, BLOCKS),
                 CacheSchedule.ff_only(STEPS, BLOCKS)):
        assert tuple(seed.to_genome()) in keys
    # JSON round trip of the result
    back = ParetoFront.from_dict(json.loads(json.dumps(front.to_dict())))
    assert back.to_dict() == front.to_dict()


class _Kill(Exception):
    pass


def test_killed_search_resumes_to_the_same_front(tmp_path):
    unbroken = nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, CONFIG, work_dir=tmp_path / "a")

    def kill_after_3(gen, search):
        if gen == 3:
            raise _Kill

    first = Synthetic()
    with pytest.raises(_Kill):
        nsga2_search(STEPS, BLOCKS, first, synthetic_macs, CONFIG, work_dir=tmp_path / "b",
                     on_generation=kill_after_3)
    random.seed(12345)  # a different global state between the runs must not matter
    second = Synthetic()
    resumed = nsga2_search(STEPS, BLOCKS, second, synthetic_macs, CONFIG, work_dir=tmp_path / "b")
    assert resumed.to_dict() == unbroken.to_dict()
    a = json.loads((tmp_path / "a" / CHECKPOINT).read_text())
    b = json.loads((tmp_path / "b" / CHECKPOINT).read_text())
    assert a == b  # population, fitnesses, crowding, archive, counters and RNG states
    assert resumed.counts == {"candidates": resumed.evaluations}  # counted across the kill, nothing twice
    assert not {tuple(g) for g in first.evaluated} & {tuple(g) for g in second.evaluated}
    # no-op resume of a finished search; and extending it is allowed
    again = Synthetic()
    assert nsga2_search(STEPS, BLOCKS, again, synthetic_macs, CONFIG, work_dir=tmp_path / "b").to_dict() == \
        unbroken.to_dict() and again.calls == 0


def test_same_seed_same_front_and_checkpoint_guards(tmp_path):
    f1 = nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, CONFIG)
    f2 = nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, CONFIG)
    assert f1.to_dict() == f2.to_dict()
    nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, SearchConfig(population=8, generations=1, seed=1),
                 work_dir=tmp_path)
    with pytest.raises(ValueError, match="seed"):
        nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, SearchConfig(population=8, generations=1, seed=2),
                     work_dir=tmp_path)
    with pytest.raises(ValueError, match="layout"):
        nsga2_search(STEPS + 1, BLOCKS, Synthetic(), synthetic_macs,
                     SearchConfig(population=8, generations=1, seed=1), work_dir=tmp_path)
    with pytest.raises(ValueError, match="multiple of 4"):
        SearchConfig(population=10)


def test_world_quality_evaluator_and_a_tiny_search(tmp_path):
    from conftest import TEST_WORDS
    from cache_search.cost import CostModel
    from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    blocks = block_layout(pipe)
    prompts = ["a red circle", "a blue square on the left"]
    wq = world_quality(pipe, prompts, TINY_SETTINGS, seed=0, max_batch=6)  # 3 candidates per call
    ref = wq.reference_metrics
    assert ref["fidelity"] == 1.0 and ref["quality"] == pytest.approx(0.5 * ref["score"] + 0.5)
    scheds = [CacheSchedule.no_cache(4, blocks), CacheSchedule.fora(4, blocks, 2),
              CacheSchedule.fora(4, blocks, 3), CacheSchedule.ff_only(4, blocks)]
    batched = wq.evaluate_metrics(scheds)  # calls of 3 + 1 candidates
    wq.max_batch = len(prompts)
    single = wq.evaluate_metrics(scheds)  # one candidate per call
    for m_b, m_s in zip(batched, single):
        assert m_b["quality"] == pytest.approx(m_s["quality"], abs=1e-6)
        assert np.isfinite(m_b["quality"]) and 0.0 <= m_b["quality"] <= 1.0
    assert batched[0]["quality"] == pytest.approx(ref["quality"], abs=1e-9)
    assert batched[1]["psnr"] < 100.0  # FORA-2 changes the images

    cost = CostModel.from_pipeline(pipe, 32, 32, 16)
    front = nsga2_search(4, blocks, wq, cost.schedule_macs, SearchConfig(population=8, generations=1, seed=0),
                         work_dir=tmp_path)
    assert front.points and all(0 < p.mac_fraction <= 1 for p in front.points)
    assert all(not _dominates(p, q) for p in front.points for q in front.points)


def test_compile_resumes_a_cache_checkpoint_only_for_the_same_search():
    """The work-dir key covers what the evaluations depend on (a different Q-Sched result or prompt set must
    not resume another search's archive), but not the knobs that only extend it or pick from its front."""
    from dataclasses import replace
    from types import SimpleNamespace

    from calibrate.bitplan import BitPlan
    from qsched.compiler import cache_search_key
    from qsched.recipe import CacheSearchConfig
    from qsched.tinyworld.model import TINY_SETTINGS

    cal = SimpleNamespace(plan=BitPlan(), act_ranges={"a": (0.0, 1.0)})
    done = {"status": "done", "coefficients": {"x": [1.1, 1.0]}}
    config = CacheSearchConfig()

    def key(**over):
        args = dict(fp_digest="f", calibration=cal, qsched_record=done, prompts=["p"], settings=TINY_SETTINGS,
                    config=config, seed=0)
        args.update(over)
        return cache_search_key(**args)

    base = key()
    assert key(config=replace(config, generations=config.generations + 5)) == base
    assert key(config=replace(config, budget=0.5, quality_floor=0.9)) == base
    assert key(qsched_record={"status": "skipped"}) != base
    assert key(qsched_record={"status": "done", "coefficients": {"x": [1.2, 1.0]}}) != base
    assert key(prompts=["q"]) != base
    assert key(config=replace(config, population=config.population + 2)) != base
    assert key(calibration=SimpleNamespace(plan=BitPlan(), act_ranges={"a": (0.0, 2.0)})) != base


def test_prefix_sharing_search_ends_with_the_same_front():
    """The same search with and without prefix sharing: same front (schedules, MACs; qualities equal up to
    the rounding that running modules on fewer rows causes), same per-candidate work, less work run. The
    batch plan puts candidates in genome order, so one call holds the candidates with common prefixes."""
    from dataclasses import replace

    from conftest import TEST_WORDS
    from cache_search.cost import CostModel
    from cache_search.search import batch_plan
    from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    settings = replace(TINY_SETTINGS, steps=3)
    blocks = block_layout(pipe)
    scheds = [CacheSchedule.fora(3, blocks, 2), CacheSchedule.no_cache(3, blocks), CacheSchedule.ff_only(3, blocks)]
    assert batch_plan(scheds, 2, 4) == [[1, 2], [0]]  # no-cache < FF-only < FORA-2 in genome order
    cost = CostModel.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
    prompts = ["a red circle", "a blue square on the left"]
    config = SearchConfig(population=8, generations=2, seed=5)
    fronts = {share: nsga2_search(3, blocks, world_quality(pipe, prompts, settings, max_batch=16, share_prefixes=share),
                                  cost.schedule_macs, config) for share in (True, False)}
    shared, plain = fronts[True], fronts[False]
    assert [p.schedule for p in shared.points] == [p.schedule for p in plain.points]
    assert [p.macs for p in shared.points] == [p.macs for p in plain.points]
    assert [p.quality for p in shared.points] == pytest.approx([p.quality for p in plain.points], abs=1e-6)
    a, b = shared.counts, plain.counts
    assert a["candidates"] == b["candidates"] == shared.evaluations > config.population
    assert a["component_rows_naive"] == b["component_rows_naive"] and a["macs_naive"] == b["macs_naive"]
    assert b["component_rows"] == b["component_rows_batched"] >= b["component_rows_naive"]  # unshared overshoots
    assert a["component_rows"] < a["component_rows_naive"] and a["macs"] < a["macs_naive"]
    assert a["denoiser_rows"] < b["denoiser_rows"] == b["denoiser_rows_naive"]
