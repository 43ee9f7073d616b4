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
                     judge_prompts: bool = False) -> dict:
    """PSNR/SSIM of ``images`` against the FP ``reference``; judged accuracy too for the embedded world."""
    from .tinyworld.judge import judge, psnr, ssim

    out = {"psnr_vs_fp": float(psnr(reference, images).mean()), "ssim_vs_fp": float(ssim(reference, images).mean())}
    if judge_prompts and prompts:
        fp, q = judge(reference, prompts), judge(images, prompts)
        out.update({"fp_accuracy": float(fp.accuracy), "accuracy": float(q.accuracy),
                    "fp_score": float(fp.score), "score": float(q.score)})
    return out
