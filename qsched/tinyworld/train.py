"""Train flux-tiny v1 (the previous generation, at the compact shape; the shipped v2 comes from
``train_v2.py``) on the shape world, on the CPU, reproducibly from a seed. v1 plateaued at about 33 %
judged accuracy (issue #19); its weights are in the git history before the v2 switch.

Three phases, each checkpointed in ``--work`` so a killed run resumes:

1. **VAE**: an ``AutoencoderKL`` trained on world images (L1 + MSE reconstruction, a small KL); the
   latent mean and spread then set the VAE's ``shift_factor``/``scaling_factor`` as FLUX's does.
2. **Rectified flow**: the FLUX transformer learns the velocity ``noise − x0`` on ``x_t = (1−σ)x0 + σ·noise``
   with logit-normal σ (FLUX's training recipe); the CLIP and T5 encoders stay frozen at random init.
3. **Reflow** (few-step distillation): the flow's own 20-step ODE samples pair noise with images; training
   on those straight pairs makes 4-step sampling nearly as good as 20 (Liu et al., rectified flow).

``python -m qsched.tinyworld.train --out out/flux-tiny-weights`` trains with the shipped budgets;
``qsched.tinyworld.model.export_weights(out)`` then writes them into the package as fp16.

Provenance of the v1 weights (seed 0, CPU): the run was resumed from its checkpoints three times
with changed budgets to fit the sessions (VAE: steps 0-1000 on a 2000-step cosine schedule, 1000-1500 on a
1500-step one; flow: steps 0-2000 on a 4000-step schedule, 2000-3000 on a 3000-step one, 3000-9000 on a
9000-step one, then 9000-15000 on a 15000-step one, each resume with a fresh optimiser state and
``--threads 1``; no reflow), so a single run with ``--flow-steps 15000`` gives a comparable, not
bit-identical, model. The model is still undertrained (its loss was falling when training stopped): see
``benchmarks/tiny_model_report.py`` for its judged accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline
from qsched.tinyworld.world import sample_batch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n,H,W,3] → float [n,3,H,W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _save_ckpt(path: Path, state: dict) -> None:
    from safetensors.torch import save_file
    tmp = path.with_suffix(".tmp")
    flat = {k: v.contiguous() for k, v in state["tensors"].items()}
    save_file(flat, str(tmp), metadata={"meta": json.dumps(state["meta"])})
    tmp.replace(path)


def _load_ckpt(path: Path):
    from safetensors import safe_open
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {"meta": meta, "tensors": tensors}


def _module_state(prefix: str, module: torch.nn.Module) -> dict:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def _restore(module: torch.nn.Module, prefix: str, tensors: dict) -> None:
    module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def train_vae(vae, steps: int, batch: int, lr: float, seed: int, work: Path, log) -> None:
    ckpt_path = work / "vae.safetensors"
    ckpt = _load_ckpt(ckpt_path)
    start = 0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    if ckpt:
        _restore(vae, "vae", ckpt["tensors"])
        start = ckpt["meta"]["step"]
        log(f"vae: resumed at step {start}")
    vae.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    for _ in range(start):
        sched.step()
    for step in tqdm(range(start, steps), desc="vae", initial=start, total=steps, mininterval=10):
        images, _ = sample_batch(seed=seed * 1_000_003 + step, n=batch, split="train")
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log(f"vae step {step + 1}: loss {loss.item():.4f} kl {kl.item():.4f}")
            _save_ckpt(ckpt_path, {"meta": {"step": step + 1}, "tensors": _module_state("vae", vae)})
    vae.eval()


@torch.no_grad()
def set_latent_normalisation(pipe, seed: int) -> None:
    """Shift and scale latents to zero mean, unit variance (what the pipeline undoes before decoding)."""
    images, _ = sample_batch(seed=seed + 77, n=1024, split="train")
    z = pipe.vae.encode(to_tensor(images)).latent_dist.mean
    pipe.vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


@torch.no_grad()
def encode(pipe, images: np.ndarray, captions: list[str]):
    """World batch → packed normalised latents, T5 states, CLIP pooled, ids: exactly what FluxPipeline feeds."""
    z = pipe.vae.encode(to_tensor(images)).latent_dist.mean
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    n, c, h, w = z.shape
    packed = pipe._pack_latents(z, n, c, h, w)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, device="cpu",
                                                         max_sequence_length=TINY_SETTINGS.max_sequence_length)
    img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", z.dtype)
    return packed, prompt_embeds, pooled, text_ids, img_ids


def velocity(transformer, x, sigma, prompt_embeds, pooled, text_ids, img_ids):
    return transformer(hidden_states=x, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                       txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]


@torch.no_grad()
def ode_sample(transformer, noise, cond, steps: int) -> torch.Tensor:
    """Euler integration of the flow from σ=1 to 0 with the sampler's own σ grid."""
    x = noise
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * velocity(transformer, x, torch.full((x.shape[0],), s), *cond)
    return x


def train_flow(pipe, steps: int, batch: int, lr: float, seed: int, work: Path, log, phase: str,
               teacher=None, teacher_steps: int = 20, ema_decay: float = 0.999) -> torch.nn.Module:
    """Rectified-flow training (``teacher=None``) or reflow on the teacher's ODE pairs; returns EMA weights."""
    transformer = pipe.transformer
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ckpt_path = work / f"{phase}.safetensors"
    ckpt = _load_ckpt(ckpt_path)
    start = 0
    if ckpt:
        _restore(transformer, "model", ckpt["tensors"])
        _restore(ema, "ema", ckpt["tensors"])
        start = ckpt["meta"]["step"]
        log(f"{phase}: resumed at step {start}")
    warm = 300
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    for _ in range(start):
        sched.step()
    transformer.train()
    gen = torch.Generator().manual_seed(seed)
    running = None
    for step in tqdm(range(start, steps), desc=phase, initial=start, total=steps, mininterval=10):
        gen.manual_seed(seed * 7919 + step)
        images, captions = sample_batch(seed=seed * 1_000_003 + 500_000 + step, n=batch, split="train")
        x0, *cond = encode(pipe, images, captions)
        noise = torch.randn(x0.shape, generator=gen)
        if teacher is not None:
            x0 = ode_sample(teacher, noise, cond, teacher_steps)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal(0, 1)
        if teacher is not None:  # reflow: emphasise the few-step grid's σ values
            grid = torch.tensor([1.0, 0.75, 0.5, 0.25])
            pick = torch.rand(batch, generator=gen) < 0.5
            sigma = torch.where(pick, grid[torch.randint(0, 4, (batch,), generator=gen)], sigma)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = velocity(transformer, xt, sigma, *cond)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (step + 1) / (step + 10))
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log(f"{phase} step {step + 1}: loss {running:.4f} lr {sched.get_last_lr()[0]:.2e}")
            _save_ckpt(ckpt_path, {"meta": {"step": step + 1},
                                   "tensors": {**_module_state("model", transformer), **_module_state("ema", ema)}})
    transformer.load_state_dict(ema.state_dict())
    transformer.eval()
    return transformer


def evaluate(pipe, n: int, steps_list=(1, 2, 4, 8, 20), seed: int = 123, batch: int = 64) -> dict:
    """Judged accuracy on held-out prompts and seeds at each step count."""
    import dataclasses

    from qsched.runtime.generation import generate
    from qsched.tinyworld.judge import confidence_interval, judge

    _, prompts = sample_batch(seed=seed, n=n, split="test")
    results = {}
    for steps in steps_list:
        settings = dataclasses.replace(TINY_SETTINGS, steps=steps)
        t = time.perf_counter()
        images = generate(pipe, prompts, settings, seed=seed, batch_size=batch)
        verdict = judge(images, prompts)
        results[steps] = {"accuracy": float(verdict.accuracy), "ci95": float(confidence_interval(verdict.accuracy, n)),
                          "score": float(verdict.score), "per_attribute": verdict.to_dict().get("per_attribute"),
                          "seconds": round(time.perf_counter() - t, 2)}
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    p.add_argument("--work", default="out/train-flux-tiny", help="checkpoints (resume from here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--flow-steps", type=int, default=15000)
    p.add_argument("--reflow-steps", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=8, help="Euler steps of the teacher's ODE in reflow")
    p.add_argument("--eval", type=int, default=1024, help="held-out prompts for the final evaluation (0 skips)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    t0 = time.perf_counter()
    pipe = build_tiny_pipeline(seed=args.seed)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)
    train_vae(pipe.vae, args.vae_steps, args.vae_batch, 1e-3, args.seed, work, log)
    pipe.vae.requires_grad_(False)
    set_latent_normalisation(pipe, args.seed)
    log(f"latent shift {pipe.vae.config.shift_factor:.4f} scale {pipe.vae.config.scaling_factor:.4f}")
    train_flow(pipe, args.flow_steps, args.batch, 1e-3, args.seed, work, log, "flow")
    if args.reflow_steps:
        teacher = copy.deepcopy(pipe.transformer).eval().requires_grad_(False)
        train_flow(pipe, args.reflow_steps, args.batch, 3e-4, args.seed + 1, work, log, "reflow", teacher=teacher,
                   teacher_steps=args.teacher_steps)
    train_seconds = time.perf_counter() - t0
    pipe.save_pretrained(args.out, safe_serialization=True)
    report = {"train_seconds": round(train_seconds, 1), "args": vars(args)}
    if args.eval:
        report["eval"] = evaluate(pipe, args.eval)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    log(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
