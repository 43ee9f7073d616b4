"""JAQ arithmetic with stub terms."""
import numpy as np
import pytest
import torch

from qsched.core.errors import QschedError
from qsched.coefficients.jaq import jaq, scorer_terms
from qsched.scoring.scorer import ClipScorer


def test_jaq_is_mean_tc_plus_k_mean_iq():
    images = torch.zeros(3, 3, 8, 8)
    prompts = ["a", "b", "c"]
    seen = {}

    def tc(imgs, ps):
        seen["prompts"] = ps
        return np.array([0.2, 0.4, 0.9])

    def iq(imgs):
        return torch.tensor([0.5, 0.1, 0.3])

    assert jaq(images, prompts, tc, iq) == pytest.approx(0.5 + 2.0 * 0.3)
    assert jaq(images, prompts, tc, iq, k=0.5) == pytest.approx(0.5 + 0.5 * 0.3)
    assert seen["prompts"] == prompts
    assert jaq(images, prompts, lambda i, p: 0.25, lambda i: 1.0) == pytest.approx(2.25)  # scalar terms


def test_jaq_rejects_bad_inputs():
    images = torch.zeros(2, 3, 8, 8)
    ok = lambda *a: np.ones(2)  # noqa: E731
    with pytest.raises(QschedError, match="one prompt per image"):
        jaq(images, ["a"], ok, ok)
    with pytest.raises(QschedError, match="3 scores for 2"):
        jaq(images, ["a", "b"], lambda i, p: np.ones(3), ok)
    with pytest.raises(QschedError, match="not finite"):
        jaq(images, ["a", "b"], ok, lambda i: np.array([np.nan, 1.0]))


def test_clip_terms_scale(monkeypatch):
    from qsched.scoring import clip as clip_mod

    monkeypatch.setattr(clip_mod, "clip_score", lambda b, imgs, ps: np.array([30.0, 20.0]))
    monkeypatch.setattr(clip_mod, "clip_iqa", lambda b, imgs: np.array([0.6, 0.8]))
    tc, iq = scorer_terms(ClipScorer(object()))
    assert jaq(torch.zeros(2, 3, 4, 4), ["a", "b"], tc, iq) == pytest.approx(0.25 + 2 * 0.7)
