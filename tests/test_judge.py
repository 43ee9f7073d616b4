"""The tinyworld judge: ground truth passes, wrong images fail, degradations lower the scores."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from qsched.tinyworld import judge as J
from qsched import metrics
from qsched.tinyworld import world as w


def _scenes(seed, n, split):
    return w.sample_scenes(np.random.default_rng(seed), n, split)


def _render_all(scenes, size=32):
    return np.stack([w.render(s, size) for s in scenes]), [w.caption(s) for s in scenes]


@pytest.fixture(scope="module")
def truth():
    scenes = _scenes(0, 300, "train") + _scenes(1, 220, "test")
    imgs, caps = _render_all(scenes)
    return scenes, imgs, caps, J.judge(imgs, caps)


def _noisy(imgs, sigma, seed=0):
    f = imgs.astype(float) / 255.0
    return np.clip(f + np.random.default_rng(seed).normal(0.0, sigma, f.shape), 0.0, 1.0)


def _blurred(imgs, sigma):
    return ndimage.gaussian_filter(imgs.astype(float) / 255.0, sigma=(0, sigma, sigma, 0), mode="nearest")


def _with_objects(scene, fn):
    return dataclasses.replace(scene, objects=tuple(fn(o) for o in scene.objects))


def test_ground_truth_is_judged_correct(truth):
    _, _, caps, res = truth
    assert len(caps) >= 500
    assert res.accuracy >= 0.99
    assert all(v >= 0.99 for v in res.per_attribute.values())
    assert res.score > 0.95 and res.scores.min() > 0.85 and res.scores.max() <= 1.0


def test_ground_truth_at_64_pixels():
    imgs, caps = _render_all(_scenes(2, 80, "all"), size=64)
    res = J.judge(imgs, caps)
    assert res.accuracy >= 0.99 and res.score > 0.95


def test_mismatched_prompts_score_far_lower(truth):
    _, imgs, caps, res = truth
    shuffled = J.judge(imgs[:200], caps[1:201])
    assert shuffled.accuracy < 0.15
    assert shuffled.score < 0.5 * res.score


def test_detections_recover_the_scene(truth):
    scenes, imgs, _, _ = truth
    for s, img in zip(scenes[:60], imgs[:60]):
        dets = J.detect(img)
        assert len(dets) == len(s.objects)
        for o in s.objects:
            d = min(dets, key=lambda d: (d.cx - o.cx) ** 2 + (d.cy - o.cy) ** 2)
            assert (d.color, d.shape, d.size) == (o.color, o.shape, o.size)
            assert abs(d.cx - o.cx) < 0.02 and abs(d.cy - o.cy) < 0.02 and abs(d.half / o.half - 1) < 0.05


def test_noise_lowers_score_and_quality_monotonically(truth):
    _, imgs, caps, res = truth
    imgs, caps = imgs[:60], caps[:60]
    sigmas = (0.01, 0.03, 0.06, 0.1)
    runs = [J.judge(_noisy(imgs, s), caps) for s in sigmas]
    scores = [res.scores[:60].mean()] + [r.score for r in runs]
    quality = [res.quality[:60].mean()] + [r.quality.mean() for r in runs]
    assert np.all(np.diff(scores) < 0) and np.all(np.diff(quality) < 0)
    # slight noise: still judged correct, but every image scores lower than its clean render
    slight = runs[0]
    assert slight.accuracy >= 0.98
    assert np.all(slight.scores[slight.correct] < res.scores[:60][slight.correct])


def test_blur_lowers_score_and_quality_monotonically(truth):
    _, imgs, caps, res = truth
    imgs, caps = imgs[:60], caps[:60]
    runs = [J.judge(_blurred(imgs, s), caps) for s in (0.5, 1.0, 1.5, 2.5)]
    scores = [res.scores[:60].mean()] + [r.score for r in runs]
    quality = [res.quality[:60].mean()] + [r.quality.mean() for r in runs]
    assert np.all(np.diff(scores) < 0) and np.all(np.diff(quality) < 0)
    assert runs[0].accuracy >= 0.95 and runs[-1].accuracy < 0.5


def test_wrong_colour_fails_the_colour_check(truth):
    # groups of distinct colours (else the other group still shows the colour; binding catches that)
    scenes = [s for s in truth[0][:120] if len({g.color for g in s.spec.groups}) == len(s.spec.groups)]
    assert len(scenes) > 60
    swapped = []
    for s in scenes:
        used = {g.color for g in s.spec.groups}
        new = next(c for c in w.COLOR_NAMES if c not in used)
        swapped.append(_with_objects(s, lambda o: dataclasses.replace(o, color=new) if o.group == 0 else o))
    res = J.judge(np.stack([w.render(s) for s in swapped]), [w.caption(s) for s in scenes])
    assert not res.correct.any()
    assert np.all(res.attributes["color"] < 1.0)
    assert np.all(res.attributes["shape"] < 1.0)


def test_moved_object_fails_position_and_relation(truth):
    scenes = [s for s in truth[0] if (s.spec.position or "center") != "center" or s.spec.relation][:150]
    assert len(scenes) == 150
    # point reflection through the image centre: every side and every relation flips
    mirrored = [_with_objects(s, lambda o: dataclasses.replace(o, cx=1 - o.cx, cy=1 - o.cy)) for s in scenes]
    caps = [w.caption(s) for s in scenes]
    res = J.judge(np.stack([w.render(s) for s in mirrored]), caps)
    has_pos = np.array([s.spec.position is not None for s in scenes])
    assert np.all(res.attributes["position"][has_pos] == 0.0)
    assert np.all(res.attributes["relation"][~has_pos] == 0.0)
    assert not res.correct.any()
    assert np.all(res.attributes["shape"] == 1.0)  # the objects themselves are still right


def test_wrong_size_fails_the_size_check():
    scenes = [s for s in _scenes(4, 400, "all") if s.spec.kind in ("single", "position") and s.spec.groups[0].size]
    assert len(scenes) > 30

    def flip(o):
        half = w.HALF_EXTENT["small" if o.size == "large" else "large"]
        clamp = lambda v: min(max(v, w.MARGIN + half), 1 - w.MARGIN - half)  # noqa: E731
        return dataclasses.replace(o, half=half, cx=clamp(o.cx), cy=clamp(o.cy))

    res = J.judge(np.stack([w.render(_with_objects(s, flip)) for s in scenes]), [w.caption(s) for s in scenes])
    assert np.all(res.attributes["size"] == 0.0) and np.all(res.attributes["shape"] == 1.0)


def test_input_layouts_agree(truth):
    _, imgs, caps, res = truth
    imgs, caps = imgs[:20], caps[:20]
    chw = imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    assert np.array_equal(J.to_uint8_hwc(chw), imgs)
    assert np.array_equal(J.to_uint8_hwc(torch.from_numpy(chw)), imgs)
    assert np.array_equal(J.to_uint8_hwc(imgs[0]), imgs[:1])
    via_torch = J.judge(torch.from_numpy(chw), caps)
    assert np.array_equal(via_torch.correct, res.correct[:20])
    assert np.allclose(via_torch.scores, res.scores[:20])


def test_result_serialises_and_rejects_bad_input(truth):
    _, imgs, caps, res = truth
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n"] == len(caps) and d["accuracy"] == pytest.approx(res.accuracy)
    assert set(d["per_attribute"]) == set(J.ATTRIBUTES) and 0 < d["accuracy_ci95"] < 0.02
    assert J.judge(imgs[:2], "a red circle").prompts == ["a red circle"] * 2
    with pytest.raises(ValueError, match="grammar"):
        J.judge(imgs[:1], ["a photo of a dog"])
    with pytest.raises(ValueError, match="prompts"):
        J.judge(imgs[:2], caps[:3])


def test_quality_of_special_images(truth):
    _, imgs, _, res = truth
    assert res.quality.min() > 0.9
    blank = np.zeros((1, 32, 32, 3), np.uint8) + 40
    assert J.quality_score(blank)[0] == 0.0  # no object at all


def test_psnr_known_values():
    a = np.full((2, 3, 16, 16), 0.5)
    assert np.all(J.psnr(a, a) == J.MAX_PSNR)
    for d in (0.1, 0.02):
        assert J.psnr(a, a + d) == pytest.approx(-20 * np.log10(d), abs=1e-9)
    u8 = np.full((1, 16, 16, 3), 100, np.uint8)
    assert J.psnr(u8, u8 + 10)[0] == pytest.approx(20 * np.log10(255 / 10))


def test_ssim_known_values(truth):
    _, imgs, _, _ = truth
    x = imgs[:30]
    assert np.allclose(J.ssim(x, x), 1.0)
    vals = [J.ssim(x, _noisy(x, s)).mean() for s in (0.01, 0.03, 0.1)]
    assert 1.0 > vals[0] > vals[1] > vals[2] > 0.0
    y = _noisy(x, 0.05)
    assert np.allclose(J.ssim(x, y), J.ssim(y, x))
    # constant images: no variance, SSIM reduces to the luminance term
    mx, my = 0.4, 0.6
    c1 = (metrics.SSIM_K1) ** 2
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    assert J.ssim(np.full((1, 32, 32, 3), mx), np.full((1, 32, 32, 3), my))[0] == pytest.approx(expected)


def test_ssim_matches_a_brute_force_window_computation(truth):
    x = truth[1][0].astype(float) / 255.0
    y = _noisy(truth[1][:1], 0.05)[0]
    r = np.arange(-5, 6)
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(5, 27):  # the window fits inside the image: padding plays no part
        for j in range(5, 27):
            for c in range(3):
                px, py = x[i - 5 : i + 6, j - 5 : j + 6, c], y[i - 5 : i + 6, j - 5 : j + 6, c]
                mx, my = (g * px).sum(), (g * py).sum()
                vx, vy = (g * (px - mx) ** 2).sum(), (g * (py - my) ** 2).sum()
                cxy = (g * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    assert J.ssim(x, y)[0] == pytest.approx(np.mean(vals), abs=1e-9)


def test_confidence_interval():
    assert J.confidence_interval(0.5, 100, method="normal") == pytest.approx(1.96 * 0.05)
    z = 1.96
    wilson = z / (1 + z * z / 100) * np.sqrt(0.25 / 100 + z * z / 40000)
    assert J.confidence_interval(0.5, 100) == pytest.approx(wilson)
    assert J.confidence_interval(1.0, 500, method="normal") == 0.0 and J.confidence_interval(1.0, 500) > 0.0
    assert J.confidence_interval(0.9, 1000) < J.confidence_interval(0.9, 100)


def test_paired_difference_is_tighter_than_unpaired_when_outcomes_agree():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.6
    b = a.copy()
    b[np.flatnonzero(~a)[:20]] = True  # b fixes 20 of a's failures and breaks none
    mean, half = metrics.paired_difference(a, b)
    assert mean == pytest.approx(20 / 400)
    d = b.astype(float) - a.astype(float)
    assert half == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(400))
    assert half < metrics.confidence_interval(a.mean(), 400)  # the paired interval excludes 0 here
    assert metrics.paired_difference(a, a) == (0.0, 0.0)
    assert np.isnan(metrics.paired_difference([1.0], [0.0])[1])


def test_paired_row_reports_accuracy_interval_and_the_paired_difference():
    import numpy as np

    from qsched.metrics import paired_difference
    from qsched.tinyworld.judge import JudgeResult, confidence_interval
    prompts = ["a red circle"] * 4
    attrs = {"color": np.array([1.0, 1.0, 0.0, 1.0]), "size": np.full(4, np.nan)}
    base = JudgeResult(prompts, np.array([True, False, False, True]), np.zeros(4), np.zeros(4), attrs)
    new = JudgeResult(prompts, np.array([True, True, False, True]), np.zeros(4), np.zeros(4), attrs)
    row = new.paired_row(base, "paired_vs_plain")
    d, ci = paired_difference(base.correct, new.correct)
    assert row["accuracy"] == 0.75 and row["ci95"] == round(confidence_interval(0.75, 4), 4)
    assert row["paired_vs_plain"] == [round(d, 4), round(ci, 4)] and d == 0.25
    assert row["per_attribute"]["color"] == 0.75 and np.isnan(row["per_attribute"]["size"])
    assert base.paired_row(None)["paired"] == [0.0, 0.0]
