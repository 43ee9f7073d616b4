"""Measurements recorded in every artifact: size against the source, and fidelity against full precision."""
from __future__ import annotations

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def size_metrics(fp_params: int, artifact_denoiser_bytes: int) -> dict:
    """Denoiser size in BF16 (the deployment baseline) against the packed artifact shard."""
    bf16 = fp_params * 2
    return {"denoiser_params": fp_params, "denoiser_bf16_bytes": bf16,
            "artifact_denoiser_bytes": artifact_denoiser_bytes,
            "compression_vs_bf16": round(bf16 / max(artifact_denoiser_bytes, 1), 4)}


def fidelity_metrics(reference: torch.Tensor, images: torch.Tensor, prompts: list[str] | None = None,
                     scorer=None) -> dict:
    """PSNR/SSIM of ``images`` against the FP ``reference`` on the same prompts and noise, and what ``scorer``
    (a :class:`qsched.scoring.scorer.Scorer`) says of both: judged accuracy where it judges (the tiny
    world), its content score otherwise."""
    from qsched.metrics import psnr, ssim

    out = {"psnr_vs_fp": float(psnr(reference, images).mean()), "ssim_vs_fp": float(ssim(reference, images).mean())}
    if scorer is None or not prompts:
        return out
    fp, q = scorer.judged(reference, prompts), scorer.judged(images, prompts)
    if fp is not None:
        return {**out, "fp_accuracy": fp["accuracy"], "accuracy": q["accuracy"], "fp_score": fp["score"],
                "score": q["score"]}
    return {**out, "fp_score": scorer.content(reference, prompts)["score"],
            "score": scorer.content(images, prompts)["score"]}
