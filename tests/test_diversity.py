"""The diversity measure: how much one prompt's images vary with the noise, against the world's own scenes."""
import numpy as np
import pytest

from qsched.tinyworld import judge as J
from qsched.tinyworld import world as w
from qsched.tinyworld.diversity import diversity, layout_distance, reference_draws


@pytest.fixture(scope="module")
def prompts():
    return w.sample_batch(seed=11, n=48, split="test")[1]


def test_scene_for_draws_the_prompt_with_fresh_layouts(prompts):
    """Every reference render is a correct image of its prompt, and two draws of one prompt differ."""
    draws = reference_draws(prompts, draws=2, seed=3)
    assert draws.shape == (len(prompts), 2, 32, 32, 3) and draws.dtype == np.uint8
    for d in range(2):
        assert J.judge(draws[:, d], prompts).accuracy == 1.0
    assert all((draws[i, 0] != draws[i, 1]).any() for i in range(len(prompts)))
    assert (reference_draws(prompts, draws=2, seed=3) == draws).all()  # deterministic from the seed


def test_layout_distance_counts_disagreeing_object_pixels():
    a = np.full((4, 4), -1)
    b = a.copy()
    assert layout_distance(a, b) == 0.0  # no objects at all
    a[0, :2] = 2
    assert layout_distance(a, a) == 0.0
    b[0, 1:3] = 2  # overlaps a on one of three union pixels
    assert layout_distance(a, b) == pytest.approx(2 / 3)
    b[0, 1] = 5  # same place, another colour: disagrees too
    assert layout_distance(a, b) == 1.0


def test_identical_draws_have_no_diversity_and_the_world_has_much(prompts):
    world_draws = reference_draws(prompts, draws=3, seed=5)
    ref = diversity(world_draws)
    assert ref.layout.shape == (len(prompts),) and ref.layout.mean() > 0.6 and ref.background.mean() > 10
    frozen = diversity(np.repeat(world_draws[:, :1], 3, axis=1))
    assert frozen.layout.max() == 0.0 and frozen.background.max() == 0.0
    row = frozen.summary(ref, base=ref)
    assert row["layout"]["ratio"] == 0.0 and row["layout"]["paired"][0] == pytest.approx(-ref.layout.mean(), abs=1e-4)
    half = diversity(np.stack([world_draws[:, 0], world_draws[:, 0], world_draws[:, 1]], axis=1))
    assert 0.0 < half.layout.mean() < ref.layout.mean()  # one of three pairs differs


def test_diversity_accepts_float_chw_images_and_refuses_one_draw(prompts):
    draws = reference_draws(prompts[:4], draws=2, seed=1)
    as_float = draws.transpose(0, 1, 4, 2, 3).astype(np.float32) / 255.0
    assert np.allclose(diversity(as_float).layout, diversity(draws).layout)
    with pytest.raises(ValueError, match="draws >= 2"):
        diversity(draws[:, :1])
