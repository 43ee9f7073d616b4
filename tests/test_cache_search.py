"""NSGA-II cache search: non-dominated fronts, deterministic, resumable, and the tinyworld evaluator."""
import json
import random

import numpy as np
import pytest

from cache_search.guard import guard_front
from qsched.runtime.cache_schedule import CacheSchedule, block_layout
from cache_search.search import (CHECKPOINT, FrontPoint, ParetoFront, SearchConfig, cx_multi_point, non_dominated,
                                 nsga2_search, proxy_summary, schedule_quality)
from qsched.scoring.scorer import WorldJudgeScorer
from cache_search.stage import choose_point

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
    wq = schedule_quality(pipe, prompts, TINY_SETTINGS, WorldJudgeScorer(), seed=0, max_batch=6)  # 3 candidates per call
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
    wq.max_batch, calls = 1, wq.counts.get("calls", 0)  # fewer rows than prompts: each call takes one prompt
    sliced = wq.evaluate_metrics(scheds)
    assert wq.counts["calls"] - calls == len(scheds) * len(prompts)
    for m_b, m_s in zip(batched, sliced):
        assert m_b["quality"] == pytest.approx(m_s["quality"], abs=1e-6)

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

    from qsched.core.bitplan import BitPlan
    from qsched.stages import cache_search_key
    from qsched.recipe import CacheSearchConfig
    from qsched.tinyworld.model import TINY_SETTINGS

    cal = SimpleNamespace(plan=BitPlan(), act_ranges={"a": (0.0, 1.0)})
    done = {"status": "done", "coefficients": {"x": [1.1, 1.0]}}
    config = CacheSearchConfig()

    def key(**over):
        args = dict(fp_digest="f", calibration=cal, coefficients_record=done, prompts=["p"], settings=TINY_SETTINGS,
                    config=config, seed=0)
        args.update(over)
        return cache_search_key(**args)

    base = key()
    assert key(config=replace(config, generations=config.generations + 5)) == base
    assert key(config=replace(config, budget=0.5, quality_floor=0.9)) == base
    assert key(coefficients_record={"status": "skipped"}) != base
    assert key(coefficients_record={"status": "done", "coefficients": {"x": [1.2, 1.0]}}) != base
    assert key(prompts=["q"]) != base
    assert key(config=replace(config, population=config.population + 4)) != base
    assert key(guard_prompts=["g"]) != base and key(guard_prompts=[]) == base
    assert key(config=replace(config, proxy_generations=1)) != base
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
    fronts = {share: nsga2_search(3, blocks, schedule_quality(pipe, prompts, settings, WorldJudgeScorer(), max_batch=16, share_prefixes=share),
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


# --- multi-fidelity proxy and guard selection ------------------------------------------------------------


class SyntheticMF(Synthetic):
    """Synthetic with the multi-fidelity protocol: a component row per recomputed slot and prompt (4
    prompts), and ``proxy()``: one prompt, which sees the objective with a deterministic error."""

    def __init__(self, prompts=4, error=0.0):
        super().__init__()
        self.prompts, self.error, self.proxy_evaluator = prompts, error, None

    def __call__(self, schedules):
        quality = super().__call__(schedules)
        rows = self.prompts * sum(int((~s.table).sum()) for s in schedules)
        self.counts["component_rows"] = self.counts.get("component_rows", 0) + rows
        return [q + self.error * np.cos(5.0 * s.num_reused + 3.0 * s.table[1].sum())
                for q, s in zip(quality, schedules)]

    def proxy(self, fraction):
        assert fraction == 0.25
        if self.proxy_evaluator is None:
            self.proxy_evaluator = SyntheticMF(prompts=1, error=0.05)
            self.proxy_evaluator.proxy_scale = (1, 4)
        return self.proxy_evaluator


PROXY = SearchConfig(population=12, generations=6, seed=11, proxy_generations=3)


def test_proxy_phase_then_full_fidelity_and_resume_across_the_switch(tmp_path):
    full, populations = SyntheticMF(), {}

    def record(gen, search):
        populations[gen] = {tuple(ind) for ind in search.population}

    unbroken = nsga2_search(STEPS, BLOCKS, full, synthetic_macs, PROXY, work_dir=tmp_path / "a", on_generation=record)
    proxy = full.proxy_evaluator
    # generations 0, 1, 2 on the proxy; then the population re-scored in full (the switch) and 3 .. 6 in full
    assert proxy.calls == 3 and full.calls == 1 + 4 and len(full.evaluated) == unbroken.evaluations
    assert {tuple(g) for g in full.evaluated[:PROXY.population]} == populations[PROXY.proxy_generations - 1]
    ckpt = json.loads((tmp_path / "a" / CHECKPOINT).read_text())
    assert set(ckpt["archive"]) == {"".join(map(str, g)) for g in full.evaluated}
    assert set(ckpt["proxy_archive"]) == {"".join(map(str, g)) for g in proxy.evaluated}
    exact = Synthetic()
    for p in unbroken.points:  # the front holds full-fidelity qualities only
        assert p.quality == exact([p.schedule])[0] and p.guard_quality is None
    assert all(not _dominates(p, q) for p in unbroken.points for q in unbroken.points)
    # what the proxy saved: its rows are a quarter of the same candidates' at full fidelity
    summary = proxy_summary(unbroken)["block_evaluations"]
    assert summary["proxy_run"] == proxy.counts["component_rows"] > 0
    assert summary["proxy_at_full_fidelity"] == 4 * summary["proxy_run"]
    assert summary["search_run"] == full.counts["component_rows"] + proxy.counts["component_rows"]
    assert 0.0 < summary["saved"] < 1.0 and unbroken.proxy["candidates"] == len(proxy.evaluated)
    assert unbroken.proxy["switch_counts"]["candidates"] == PROXY.population
    assert ParetoFront.from_dict(json.loads(json.dumps(unbroken.to_dict()))).to_dict() == unbroken.to_dict()

    # killed in the proxy phase, at its last generation (the switch runs after the resume), and after the switch
    for kill_at in (1, PROXY.proxy_generations - 1, PROXY.proxy_generations):
        def kill(gen, search):
            if gen == kill_at:
                raise _Kill

        work = tmp_path / f"kill{kill_at}"
        with pytest.raises(_Kill):
            nsga2_search(STEPS, BLOCKS, SyntheticMF(), synthetic_macs, PROXY, work_dir=work, on_generation=kill)
        random.seed(kill_at)
        second = SyntheticMF()
        assert nsga2_search(STEPS, BLOCKS, second, synthetic_macs, PROXY, work_dir=work).to_dict() == unbroken.to_dict()
        assert json.loads((work / CHECKPOINT).read_text()) == ckpt
        assert (second.proxy_evaluator is None) == (kill_at >= PROXY.proxy_generations - 1)  # built only if used

    with pytest.raises(ValueError, match="proxy_generations"):
        SearchConfig(generations=2, proxy_generations=3)
    with pytest.raises(ValueError, match="proxy"):
        nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, PROXY)


_W_GUARD = np.random.default_rng(9).random((STEPS, 9))


class GuardSynthetic(Synthetic):
    """Another objective on the same schedules (other weights): the guard prompts disagree with the search's."""

    def __call__(self, schedules):
        super().__call__(schedules)
        return [1.0 - float((s.table * _W_GUARD).sum()) / _W_GUARD.sum() for s in schedules]


def test_guard_front_is_a_subset_non_dominated_on_guard_quality():
    front = nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, CONFIG)
    guard = GuardSynthetic()
    guarded = guard_front(front, guard)
    assert guard.calls == 1 and len(guard.evaluated) == len(front.points)  # one batch: the whole train front
    train = {tuple(p.schedule.to_genome()): p for p in front.points}
    for p in guarded.points:  # a subset of the train front, both qualities kept
        t = train[tuple(p.schedule.to_genome())]
        assert (p.quality, p.macs, p.mac_fraction) == (t.quality, t.macs, t.mac_fraction)
        assert p.guard_quality == guard([p.schedule])[-1]
    assert [p.macs for p in guarded.points] == sorted(p.macs for p in guarded.points)

    def dominates_on_guard(a, b):
        return (a.guard_quality >= b.guard_quality and a.macs <= b.macs
                and (a.guard_quality, a.macs) != (b.guard_quality, b.macs))

    assert not any(dominates_on_guard(a, b) for a in guarded.points for b in guarded.points)
    removed = [FrontPoint.from_dict(d) for d in guarded.guard["removed_points"]]
    assert guarded.guard["removed"] == len(removed) == len(front.points) - len(guarded.points) > 0
    assert all(any(dominates_on_guard(a, r) for a in guarded.points) for r in removed)
    assert guarded.guard["counts"] == {"candidates": len(front.points)}
    assert ParetoFront.from_dict(json.loads(json.dumps(guarded.to_dict()))).to_dict() == guarded.to_dict()


def _front(points):
    none = CacheSchedule.no_cache(STEPS, BLOCKS)
    return ParetoFront([FrontPoint(CacheSchedule.fora(STEPS, BLOCKS, 2) if f < 1 else none, q, 100 * f, f, g)
                        for f, q, g in points], 100.0)


def test_choose_point_uses_the_guard_quality():
    # (MAC fraction, train quality, guard quality): train prefers 0.6 within budget, the guard 0.5
    guarded = _front([(0.5, 0.80, 0.70), (0.6, 0.85, 0.69), (1.0, 1.0, 0.72)])
    train = _front([(0.5, 0.80, None), (0.6, 0.85, None), (1.0, 1.0, None)])
    assert choose_point(guarded, 0.6, 0.98) == 0 and choose_point(train, 0.6, 0.98) == 1
    # the floor is relative to the no-cache point's guard quality: 0.97 × 0.72 < 0.70
    assert choose_point(guarded, None, 0.97) == 0 and choose_point(train, None, 0.97) == 2


def test_old_front_json_and_checkpoint_still_load(tmp_path):
    old = _front([(0.5, 0.9, None), (1.0, 1.0, None)]).to_dict()  # as an older version wrote it
    for point in old["points"]:
        del point["guard_quality"]
    front = ParetoFront.from_dict(old)
    assert [p.guard_quality for p in front.points] == [None, None] and not front.guard and not front.proxy
    assert choose_point(front, None, 0.9) == 0 and choose_point(front, None, 0.95) == 1
    # a checkpoint written before the proxy knobs existed resumes (as a search without a proxy)
    config = SearchConfig(population=8, generations=1, seed=1)
    first = nsga2_search(STEPS, BLOCKS, Synthetic(), synthetic_macs, config, work_dir=tmp_path)
    path = tmp_path / CHECKPOINT
    data = json.loads(path.read_text())
    for key in ("proxy_archive", "proxy_counts", "switch_counts", "proxy_scale"):
        del data[key]
    for key in ("proxy_generations", "proxy_fraction"):
        del data["config"][key]
    path.write_text(json.dumps(data))
    again = Synthetic()
    assert nsga2_search(STEPS, BLOCKS, again, synthetic_macs, config, work_dir=tmp_path).to_dict() == first.to_dict()
    assert again.calls == 0


def test_world_quality_proxy_and_guard_in_the_stage(tmp_path):
    """The prompt-subset proxy keeps the full evaluator's batches (its row counters are exactly n / P of the
    full ones), and the stage guards the front and picks by guard quality."""
    from dataclasses import replace

    from conftest import TEST_WORDS
    from qsched.recipe import CacheSearchConfig
    from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline

    from cache_search.stage import search_cache

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    settings = replace(TINY_SETTINGS, steps=3)
    blocks = block_layout(pipe)
    prompts = ["a red circle", "a blue square on the left", "a green triangle", "a red square above a blue circle"]
    wq = schedule_quality(pipe, prompts, settings, WorldJudgeScorer(), max_batch=8)  # 2 candidates per call
    proxy = wq.proxy(0.25)
    assert proxy.prompts == prompts[:1] and proxy.proxy_scale == (1, 4) and wq.proxy(0.25) is proxy
    scheds = [CacheSchedule.no_cache(3, blocks), CacheSchedule.fora(3, blocks, 2), CacheSchedule.ff_only(3, blocks)]
    full_m, proxy_m = wq.evaluate_metrics(scheds), proxy.evaluate_metrics(scheds)
    assert proxy_m[0]["fidelity"] == 1.0 and proxy_m[0]["quality"] == pytest.approx(proxy.reference_metrics["quality"])
    assert proxy_m[1]["psnr"] < 100.0 and full_m[1]["quality"] != proxy_m[1]["quality"]
    assert proxy.counts["calls"] == wq.counts["calls"] == 2
    for key in ("component_rows", "component_rows_naive", "denoiser_rows", "macs", "macs_naive"):
        assert wq.counts[key] == 4 * proxy.counts[key] > 0, key
    guard = wq.on_prompts(["a green circle", "a blue triangle"], seed=7)
    assert guard.seed == 7 and guard.counts == {} and wq.on_prompts(["a green circle", "a blue triangle"], 7) is guard

    config = CacheSearchConfig(population=8, generations=2, prompts=4, guard_prompts=2, proxy_generations=1,
                               budget=0.9)
    result, schedule = search_cache(pipe, prompts, settings, config, seed=0, work=tmp_path, progress=False,
                                    scorer=WorldJudgeScorer(), guard_prompts=["a green circle", "a blue triangle"])
    record, front = result["record"], ParetoFront.from_dict(result["front"])
    assert record["guard"] == {"prompts": 2, "points_before": len(front.points) + record["guard"]["removed"],
                               "removed": record["guard"]["removed"]}
    assert all(p.guard_quality is not None for p in front.points)
    assert record["chosen"] == choose_point(front, 0.9, config.quality_floor)
    assert record["guard_quality"] == front.points[record["chosen"]].guard_quality
    blocks_saved = record["proxy"]["block_evaluations"]
    assert blocks_saved["proxy_at_full_fidelity"] == 4 * blocks_saved["proxy_run"] > 0


def test_profile_guard_prompts_are_disjoint_from_the_search_prompts():
    from qsched.models.profiles import ModelProfile
    from qsched.tinyworld.model import TINY_SETTINGS
    from qsched.tinyworld.world import is_held_out

    world = ModelProfile("flux-tiny", TINY_SETTINGS, "world-judge")
    search, guard = world.prompts("cache_train", 8, seed=0), world.prompts("cache_guard", 16, seed=0)
    assert len(guard) == 16 and all(is_held_out(p) for p in guard) and not any(is_held_out(p) for p in search)
    real = ModelProfile("flux-schnell", TINY_SETTINGS, "some/clip")
    for train, held in (("cache_train", "cache_guard"), ("qsched_train", "qsched_guard"), ("calibration", "evaluation")):
        a, b = real.prompts(train, 8, seed=0), real.prompts(held, 16, seed=0)
        assert len(a) == 8 and len(b) == 16 and not set(a) & set(b)
    assert real.prompts("cache_train", 8, seed=0) != real.prompts("qsched_train", 8, seed=0)  # own seed offsets
    assert world.prompts("cache_guard", 0, seed=0) == []
