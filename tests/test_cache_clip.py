"""Cache search on a model without a judge: CLIP text-image match + CLIP-IQA + fidelity to no-cache."""
from dataclasses import replace

import pytest

from qsched.runtime.cache_schedule import CacheSchedule, block_layout
from cache_search.search import schedule_quality
from cache_search.stage import search_cache
from qsched.recipe import CacheSearchConfig
from qsched.scoring.clip import clip_iqa, clip_score, load_clip
from qsched.scoring.scorer import ClipScorer

from conftest import TEST_WORDS
from test_clip_scoring import _tiny_clip, _tokenizer

PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_clip")
    _tiny_clip().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return load_clip(str(d))


@pytest.fixture(scope="module")
def pipe():
    from qsched.tinyworld.model import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, words=TEST_WORDS)


def test_clip_quality_scores_and_fidelity(pipe, bundle):
    from qsched.tinyworld.model import TINY_SETTINGS

    settings = replace(TINY_SETTINGS, steps=3)
    blocks = block_layout(pipe)
    evaluator = schedule_quality(pipe, PROMPTS, settings, ClipScorer(bundle, k=2.0), seed=0, max_batch=4)
    ref = evaluator.reference
    expected = (clip_score(bundle, ref, PROMPTS).mean() / 100.0 + 2.0 * clip_iqa(bundle, ref).mean()) / 3.0
    assert evaluator.reference_metrics["score"] == pytest.approx(expected, rel=1e-6)
    none, fora = evaluator.evaluate_metrics([CacheSchedule.no_cache(3, blocks), CacheSchedule.fora(3, blocks, 2)])
    assert none["fidelity"] == 1.0 and none["score"] == pytest.approx(expected, rel=1e-5)
    assert none["quality"] == pytest.approx(0.5 * expected + 0.5, rel=1e-5)
    assert fora["psnr"] < none["psnr"] == 100.0 and 0.0 <= fora["clip_iqa"] <= 1.0  # cached images differ
    assert set(fora) >= {"score", "clip_score", "clip_iqa", "psnr", "fidelity", "quality"}


def test_search_cache_with_clip_gives_a_front(pipe, bundle, tmp_path):
    from qsched.tinyworld.model import TINY_SETTINGS

    settings = replace(TINY_SETTINGS, steps=3)
    config = CacheSearchConfig(population=4, generations=1, prompts=2, budget=0.8, proxy_generations=1)
    result, schedule = search_cache(pipe, PROMPTS, settings, config, seed=0, work=tmp_path, progress=False,
                                    scorer=ClipScorer(bundle),
                                    guard_prompts=["a green triangle"])
    front, record = result["front"], result["record"]
    assert record["status"] == "done" and front["points"]
    # the guard and the proxy are the CLIP scorer's own quality on other prompts (on a prompt subset)
    assert record["guard"]["prompts"] == 1 and all(p["guard_quality"] is not None for p in front["points"])
    assert record["proxy"]["prompts"] == [1, 2]
    points = [(p["guard_quality"], p["mac_fraction"]) for p in front["points"]]
    for q, m in points:  # a front: no point is beaten on both objectives by another
        assert not any(q2 >= q and m2 <= m and (q2, m2) != (q, m) for q2, m2 in points)
    if schedule is not None:
        assert result["record"]["mac_fraction"] <= 0.8 + 1e-9
