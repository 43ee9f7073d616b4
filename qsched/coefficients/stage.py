"""The coefficients stage: Q-Sched on the quantized pipeline, applied only when it beats the unmodified
scheduler on held-out prompts."""
from __future__ import annotations

from qsched.coefficients.jaq import jaq, scorer_terms
from qsched.coefficients.optimize import learn_coefficients
from qsched.models.profiles import ModelProfile
from qsched.recipe import CoefficientsConfig
from qsched.runtime.generation import GenerationSettings
from qsched.runtime.schedulers import SUPPORTED_SCHEDULERS, QSchedScheduler


def learn_schedule(pipe, profile: ModelProfile, settings: GenerationSettings, config: CoefficientsConfig, seed: int,
                   progress: bool) -> dict:
    """Learn coefficients on the quantized pipeline (never the FP one) with JAQ from the profile's scorer,
    and wrap ``pipe.scheduler`` with them when they beat the unmodified scheduler on the guard prompts.
    Returns the stage record (``status``: done, kept identity or skipped, with the reason)."""
    if type(pipe.scheduler).__name__ not in SUPPORTED_SCHEDULERS:
        return {"status": "skipped", "reason": f"scheduler {type(pipe.scheduler).__name__} is not supported by Q-Sched"}
    terms = scorer_terms(profile.scorer())
    train = profile.prompts("qsched_train", config.prompts, seed)
    heldout = profile.prompts("qsched_guard", config.heldout_prompts, seed)
    result = learn_coefficients(pipe, train, heldout, settings, lambda im, p: jaq(im, p, *terms, k=config.k),
                                method=config.method, budget=config.budget, seed=seed, sigma0=config.sigma0,
                                select=config.select, patience=config.patience, progress=progress)
    applied = result.heldout_jaq > result.identity_heldout_jaq
    if applied:
        pipe.scheduler = QSchedScheduler.wrap(pipe.scheduler, result.coefficients)
    record = result.to_dict()
    record.pop("history", None)
    return {"status": "done" if applied else "kept identity",
            "reason": "" if applied else "learned coefficients did not beat the unmodified scheduler on held-out prompts",
            **record}
