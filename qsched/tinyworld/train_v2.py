"""flux-tiny v2: a 2×-downsampling VAE, trained text encoders and a 64-token flow model (issue #19).

Why v2: the shipped VAE (4× down, 16 tokens of 8×8 px) caps judged accuracy at ~88% and the frozen
random text encoders cannot carry relations, sizes or counts. v2 keeps every class FLUX uses
(``AutoencoderKL``, ``CLIPTextModel``, ``T5EncoderModel``, ``FluxTransformer2DModel``, word-level
tokenizers) and changes the configs and the training:

1. ``vae``: 2× downsampling, 4 latent channels → 16×16 latents, packed 2×2 → 64 tokens of 16 dims;
2. ``text``: CLIP and T5 pre-trained on the world's captions to predict the parsed caption (kind, each
   group's colour/shape/size/count, position, relation) from pooled states, so conditioning carries the
   caption from the first flow step;
3. ``flow``: rectified flow (logit-normal σ) with the text encoders trained jointly (lower LR), EMA of
   all trained modules, constant LR after warm-up (so a run can be extended) and a periodic judged
   evaluation at 4 steps logged to ``curve.jsonl``;
4. ``reflow`` (optional): few-step distillation on the flow's own ODE pairs (the teacher's ODE and the few-step
   σ mix on the pipeline's own σ grid since 2026-12-05; the unshipped out/reflow-R3 used even grids);
5. ``guide`` (optional): classifier-free guidance distilled into one call a step (or, with ``--guide-skip``,
   skip-layer guidance: the negative branch is the model itself with some blocks skipped);
6. ``coef`` (optional): Q-Sched's per-step scheduler coefficients distilled as a velocity field;
7. ``temp`` (optional): sampling from τ·noise distilled, so the plain sampler draws at temperature τ.

Relation ablation (docs/tiny-v2.md): ``--init-from shipped`` (or a saved pipeline folder) fine-tunes the flow
phase from the shipped weights (or that folder's);
``--text-scene-weight W`` adds a head on the T5 sequence predicting the caption's canonical scene
(``scene_targets``) to the flow loss.
``--text-role-weight W`` adds a linear head on each T5 token predicting where the object it describes goes
(``role_targets``): the relation put where the transformer's attention reads it.
``--text-group-weight W`` does the same for the count and size of each word's object (``group_targets``).

Every phase checkpoints model, EMA and optimiser state (safetensors, never pickle) in ``--work`` and
resumes bit-for-bit: data and noise are seeded per step. Same script on a GPU with ``--device cuda``::

    python -m qsched.tinyworld.train_v2 --work out/tiny-v2 --phases vaedec --vaedec-steps 2000 --threads 1
    python -m qsched.tinyworld.train_v2 --work out/tiny-v2 --phases flow --threads 1   # runs until killed
    python -m qsched.tinyworld.train_v2 --work out/tiny-v2 --phases export,eval --flow-steps 0  # snapshot

``vaedec`` (phase 1b) is a decoder-only fine-tune: the encoder, hence the flow's latent space, is fixed
after phase 1, so it can run alongside the flow. Rerunning any command resumes; passing ``--flow-steps 0``
loads the latest flow checkpoint without training. Budgets of a finished phase must be passed again
(defaults match the first run, seed 0) or the phase trains on to the new budget.

Provenance of out/tiny-v2 (seed 0, CPU, one thread, 2026-12-03): VAE steps 0-500 were run under
``--vae-steps 3000/1500`` and 500-1000 under ``--vae-steps 1000``; the LR is constant until the
cool-down (last third), and resumes are exact, so this equals one ``--vae-steps 1000`` run. ``vaedec``
ran 0-750 under ``--vaedec-steps 750`` then 750-2000 under 2000 (a warm restart of its LR); ``text`` 600
steps; ``flow`` from defaults (constant LR) to step 16,500, extended by rerunning, then
``--flow-steps 18000 --flow-cooldown 1500`` (the cool-down starts at 16,500, so this equals one run with
those flags). Step 18,000 was shipped on 2026-12-03 (``model.export_weights``).

Continued in a copy, out/tiny-v2-rel (2026-12-04, tenth session): from step 18,000 with
``--flow-lr 5e-4 --kind-weight relation=2`` (relation captions 25 % -> 40 %), first under
``--flow-steps 26000 --flow-cooldown 7000`` to step 19,500, then under ``--flow-steps 22000 --flow-cooldown
3000`` to step 22,000 (the cool-down starts at 19,000 under both; the LR over 19,000-19,500 follows the first
budget). Step 22,000 was shipped on 2026-12-04 (tenth session) until the fine-tune below replaced it.

Relation fine-tune (twelfth to fourteenth sessions, 2026-12-04; docs/tiny-v2.md): from step 22,000 (the
package's weights at commit a3bf550, then read by ``--init-from shipped``; pass that folder as ``--init-from DIR``
to reproduce it now) with ``--text-role-weight 0.5 --seed 0 --kind-weight relation=2 --flow-lr 2e-4
--flow-text-lr 1e-4 --flow-warmup 100 --eval-every 500``: out/rel-R under ``--flow-steps 2500 --flow-cooldown
1000``; copied to out/rel-R2 and resumed under ``--flow-steps 6500 --flow-cooldown 1500`` (the LR restarts at
2e-4 at step 2,500); copied to out/rel-R3 and resumed under ``--flow-steps 12500 --flow-cooldown 3000`` (the LR
restarts at 6,500 and cools from 9,500). Fine-tune step 12,500 is the shipped flux-tiny since 2026-12-04
(fourteenth session). Since 2026-12-05 it samples with time shift 3.0 (``model.SHIPPED_SCHEDULER_CONFIG``, which
export writes; chosen with benchmarks/tiny_sampler.py): same weights, and the curves of runs from then
on are judged at that shift (earlier curves at 1.0).

Guidance distillation (sixteenth session, 2026-12-05; docs/tiny-v2.md): from that fine-tune (the fp32 folder
out/rel-R3/pipeline, the package's weights at commit d243b6f) with ``--phases guide,export --flow-steps 0
--guide-steps 2000 --guide-lr 2e-4 --guide-scale 1.5 --flow-warmup 100 --flow-cooldown 500 --kind-weight
relation=2 --seed 0`` (work folder out/guide-15): the model learns its own classifier-free-guided velocity (the
empty caption as the unconditional branch) at one call per step. Guide step 2,000 was the shipped flux-tiny on
2026-12-05 (sixteenth session) until the temperature distillation below replaced it.

Temperature distillation (seventeenth session, 2026-12-05; docs/tiny-v2.md): from the guide step 2,000 (the fp32
folder out/guide-15/pipeline, the package's weights at commit 834cf9e) with ``--phases temp,export --flow-steps 0
--temp-steps 1500 --temp-lr 2e-4 --temp-tau 0.7 --temp-on-path 0.5 --flow-warmup 100 --flow-cooldown 500
--kind-weight relation=2 --seed 0`` (work folder out/temp-07): the model learns to sample from noise what its
frozen copy samples from 0.7·noise. Temp step 1,500 was the shipped flux-tiny on 2026-12-05 (seventeenth session)
until the skip-layer guidance distillation below replaced it.

Skip-layer guidance distillation (nineteenth session, 2026-12-05; docs/tiny-v2.md): from the temp step 1,500 (the
fp32 folder out/temp-07/pipeline, the package's weights at commit 2506ebb) with ``--phases guide,export
--flow-steps 0 --guide-steps 1000 --guide-lr 2e-4 --guide-scale 1.5 --guide-skip
single_transformer_blocks.1,single_transformer_blocks.2 --guide-on-policy 0.5 --flow-warmup 100 --flow-cooldown
400 --kind-weight relation=2 --seed 0`` (work folder out/slg-12h): the model learns v + 0.5·(v − v_skip) of its frozen
copy, v_skip being that copy with single blocks 1 and 2 skipped, half of each batch at the states its own 4-step
sampler visits (``--guide-scale 2.0``, work folder out/slg-12, drew 0.6–1.0 points more and much less
background variety; not shipped). Guide step 1,000 is the shipped flux-tiny since 2026-12-05 (nineteenth session).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qsched.runtime.generation import generate
from qsched.tinyworld import world
from qsched.tinyworld.judge import confidence_interval, judge
from qsched.tinyworld.model import (
    TINY_SETTINGS,
    SHIPPED_TRANSFORMER_CONFIG,
    build_tiny_pipeline,
)
from qsched.tinyworld.train import _load_ckpt, _save_ckpt, to_tensor

SETTINGS_V2 = TINY_SETTINGS  # same 32×32, 4 steps, 16 text tokens: only the weights change


def build_pipeline_v2(seed: int = 0, transformer_config: dict | None = None):
    """A randomly initialised v2 pipeline (deterministic in ``seed``; the shipped flux-tiny's configs,
    ``transformer_config`` for an ablation); components in eval mode."""
    pipe = build_tiny_pipeline(seed, shipped=True, transformer_config=transformer_config)
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).eval().requires_grad_(False)
    return pipe


# --- checkpoints: modules + optimiser state in one safetensors file ----------------------------------

def _pack(modules: dict, opt=None, meta: dict | None = None) -> dict:
    tensors = {f"{p}.{k}": v.detach().cpu().clone() for p, m in modules.items() for k, v in m.state_dict().items()}
    meta = dict(meta or {})
    if opt is not None:
        sd = opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().clone() if torch.is_tensor(v) else torch.tensor(v)
        meta["param_groups"] = sd["param_groups"]
    return {"meta": meta, "tensors": tensors}


def _resume(path: Path, modules: dict, opt, label: str, log) -> tuple[int, float]:
    """(step, training seconds) of the checkpoint at ``path``, loaded into ``modules`` and ``opt``; (0, 0.0)
    when there is none yet."""
    if (ck := _load_ckpt(path)) is None:
        return 0, 0.0
    meta = _unpack(ck, modules, opt)
    log(f"{label}: resumed at step {meta['step']}")
    return meta["step"], meta.get("seconds", 0.0)


def _unpack(ckpt: dict, modules: dict, opt=None) -> dict:
    t = ckpt["tensors"]
    for p, m in modules.items():
        m.load_state_dict({k[len(p) + 1:]: v for k, v in t.items() if k.startswith(p + ".")})
    if opt is not None and "param_groups" in ckpt["meta"]:
        state: dict = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": ckpt["meta"]["param_groups"]})
    return ckpt["meta"]


def _kind_weights(items: list[str]) -> dict[str, float]:
    """``["relation=2", ...]`` → ``{"relation": 2.0}``; bad items raise ValueError naming the form."""
    out = {}
    for item in items:
        kind, sep, weight = item.partition("=")
        try:
            out[kind.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--kind-weight wants KIND=W (e.g. relation=2), got {item!r}") from None
        if not sep:
            raise ValueError(f"--kind-weight wants KIND=W (e.g. relation=2), got {item!r}")
    return out


def _lr_factor(step: int, warmup: int, total: int, cooldown: int) -> float:
    """Linear warm-up, constant, then (optionally) a linear cool-down to 10% over the last ``cooldown``
    steps: constant LR lets a run be extended by raising its step budget."""
    f = min(1.0, (step + 1) / max(warmup, 1))
    if cooldown and step >= total - cooldown:
        f *= 1.0 - 0.9 * (step - (total - cooldown)) / cooldown
    return f


def _set_lr(opt, base: list[float], factor: float) -> None:
    for g, lr in zip(opt.param_groups, base):
        g["lr"] = lr * factor


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (step + 1) / (step + 10))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - d)


# --- phase 1: autoencoder ----------------------------------------------------------------------------

def train_vae(pipe, args, work: Path, log) -> None:
    """L1 + MSE reconstruction with a tiny KL; then FLUX-style latent shift/scale from train images."""
    vae, dev = pipe.vae, args.device
    path = work / "vae.safetensors"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start, seconds = _resume(path, {"vae": vae}, opt, "vae", log)
    vae.to(dev).train().requires_grad_(True)
    _opt_to(opt, dev)
    gen = torch.Generator(dev)
    t0 = time.perf_counter()
    for step in range(start, args.vae_steps):
        lr_f = _lr_factor(step, 100, args.vae_steps, args.vae_steps // 3)
        _set_lr(opt, [args.vae_lr], lr_f)
        images, _ = world.sample_batch(seed=args.seed * 1_000_003 + step, n=args.vae_batch, split="train")
        x = to_tensor(images).to(dev)
        post = vae.encode(x).latent_dist
        gen.manual_seed(args.seed * 7919 + step)
        rec = vae.decode(post.sample(generator=gen)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        last = step + 1 == args.vae_steps
        if (step + 1) % args.ckpt_every == 0 or last:
            s = seconds + time.perf_counter() - t0
            vae.cpu()
            _save_ckpt(path, _pack({"vae": vae}, opt, {"step": step + 1, "seconds": s}))
            vae.to(dev)
            log(f"vae step {step + 1}: loss {loss.item():.4f} kl {kl.item():.3f} ({s:.0f}s)")  # after saving
    vae.cpu().eval().requires_grad_(False)
    set_latent_normalisation(vae, args.seed, args.norm_images)
    rt_path = work / "vae_round_trip.json"
    if args.vae_eval and not rt_path.is_file():
        rt = vae_round_trip(vae, args.vae_eval)
        rt_path.write_text(json.dumps(rt, indent=2))
        log(f"vae round trip: {json.dumps(rt)}")


def train_vaedec(pipe, args, work: Path, log) -> None:
    """Decoder-only fine-tune with an extra image-gradient L1 term: sharpens the corners of small
    diamonds (read as circles after phase 1). The encoder, hence the latent space the flow learns, is
    frozen, so this can run while (or after) the flow trains and be swapped in at export."""
    vae, dev = pipe.vae, args.device
    dec = torch.nn.ModuleDict({"decoder": vae.decoder})
    path = work / "vaedec.safetensors"
    opt = torch.optim.AdamW(dec.parameters(), lr=args.vaedec_lr, weight_decay=0.0)
    start, seconds = _resume(path, {"dec": dec}, opt, "vaedec", log)
    if start >= args.vaedec_steps:
        return
    vae.to(dev)
    dec.train().requires_grad_(True)
    _opt_to(opt, dev)
    gen = torch.Generator(dev)
    t0 = time.perf_counter()
    for step in range(start, args.vaedec_steps):
        _set_lr(opt, [args.vaedec_lr], _lr_factor(step, 50, args.vaedec_steps, args.vaedec_steps // 2))
        images, _ = world.sample_batch(seed=args.seed * 1_000_003 + 300_000 + step, n=args.vae_batch, split="train")
        x = to_tensor(images).to(dev)
        gen.manual_seed(args.seed * 7919 + 300_000 + step)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        rec = vae.decode(z).sample
        grad = sum(F.l1_loss(torch.diff(rec, dim=d), torch.diff(x, dim=d)) for d in (2, 3))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + grad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.vaedec_steps:
            s = seconds + time.perf_counter() - t0
            vae.cpu()
            _save_ckpt(path, _pack({"dec": dec}, opt, {"step": step + 1, "seconds": s}))
            vae.to(dev)
            log(f"vaedec step {step + 1}: loss {loss.item():.4f} ({s:.0f}s)")
    vae.cpu().eval().requires_grad_(False)
    if args.vae_eval:
        rt = vae_round_trip(vae, args.vae_eval)
        (work / f"vae_round_trip_dec{args.vaedec_steps}.json").write_text(json.dumps(rt, indent=2))
        log(f"vae round trip after decoder fine-tune: {json.dumps(rt)}")


def _opt_to(opt, dev) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(dev)


@torch.no_grad()
def set_latent_normalisation(vae, seed: int, n: int = 512) -> None:
    """Shift/scale latents to zero mean, unit spread (FLUX's shift_factor/scaling_factor)."""
    images, _ = world.sample_batch(seed=seed + 77, n=n, split="train")
    z = vae.encode(to_tensor(images)).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


@torch.no_grad()
def vae_round_trip(vae, n: int = 512, seed: int = 2024, batch: int = 64) -> dict:
    """Judged accuracy of ground-truth held-out renders after encode → decode (the VAE's ceiling)."""
    images, prompts = world.sample_batch(seed=seed, n=n, split="test")
    recs = []
    for i in range(0, n, batch):
        z = vae.encode(to_tensor(images[i:i + batch])).latent_dist.mean
        recs.append(vae.decode(z).sample.clamp(-1, 1).add(1).div(2))
    v = judge(torch.cat(recs), prompts)
    return {"n": n, "accuracy": v.accuracy, "ci95": confidence_interval(v.accuracy, n),
            "per_attribute": v.per_attribute}


# --- driver ------------------------------------------------------------------------------------------

def _logger(work: Path):
    logf = open(work / "log.txt", "a")  # noqa: SIM115 -- open for the whole run

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()
    return log


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="out/tiny-v2", help="checkpoints and logs (a rerun resumes from here)")
    p.add_argument("--phases", default="vae,text,flow", help="comma list of vae,vaedec,text,flow,reflow,guide,coef,temp,export,eval")
    p.add_argument("--out", default=None, help="export dir for the final pipeline (default WORK/pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vaedec-steps", type=int, default=0, help="decoder-only fine-tune (0: load one if present)")
    p.add_argument("--vaedec-lr", type=float, default=3e-4)
    p.add_argument("--norm-images", type=int, default=512, help="train images that set the latent shift/scale")
    p.add_argument("--vae-eval", type=int, default=512, help="held-out round trips judged after the vae phase")
    p.add_argument("--text-steps", type=int, default=600)
    p.add_argument("--text-batch", type=int, default=128)
    p.add_argument("--text-lr", type=float, default=1e-3)
    p.add_argument("--flow-steps", type=int, default=100000, help="raise it later to extend a run (constant LR)")
    p.add_argument("--flow-batch", type=int, default=32)
    p.add_argument("--flow-lr", type=float, default=1e-3)
    p.add_argument("--flow-text-lr", type=float, default=3e-4, help="LR of the jointly trained text encoders")
    p.add_argument("--flow-cooldown", type=int, default=0, help="linear LR cool-down over the last N steps")
    p.add_argument("--flow-warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--freeze-text", action="store_true", help="ablation: keep the text encoders frozen")
    p.add_argument("--init-from", default="scratch", metavar="scratch|shipped|DIR",
                   help="shipped (or DIR, a saved flux-tiny pipeline folder): take the VAE, text encoders and "
                        "transformer from the shipped flux-tiny (or DIR; the vae, vaedec and text phases are skipped) "
                        "and fine-tune from there; the flow checkpoint, once written, overrides them as usual")
    p.add_argument("--grow", action="store_true",
                   help="with --init-from and a deeper --depth: keep the source transformer's blocks and append new "
                        "ones that start as the identity (zero residual gates), so training starts from the "
                        "source's images and adds capacity")
    p.add_argument("--fresh-transformer", action="store_true",
                   help="with --init-from: take only the VAE and text encoders and train a new transformer (for "
                        "example a wider --width) on them")
    p.add_argument("--text-scene-weight", type=float, default=0.0,
                   help="flow: weight of the auxiliary canonical-scene loss on the T5 sequence (0: off)")
    p.add_argument("--text-role-weight", type=float, default=0.0,
                   help="flow: weight of the auxiliary per-token role loss (where each word's object goes) on the "
                        "T5 states (0: off)")
    p.add_argument("--text-group-weight", type=float, default=0.0,
                   help="flow: weight of the auxiliary per-token group loss (the count and size of each word's "
                        "object) on the T5 states (0: off)")
    p.add_argument("--kind-weight", action="append", default=[], metavar="KIND=W",
                   help="flow/reflow batches: multiply a caption kind's share by W (repeatable; e.g. relation=2)")
    p.add_argument("--width", type=int, default=4, help="attention heads (×32 dims) of the transformer")
    p.add_argument("--depth", default="2,4", help="double,single stream blocks")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--final-eval", type=int, default=1024, help="held-out prompts of the eval phase")
    p.add_argument("--reflow-steps", type=int, default=0)
    p.add_argument("--reflow-lr", type=float, default=3e-4)
    p.add_argument("--teacher-steps", type=int, default=8,
                   help="reflow: Euler steps of the teacher's ODE on the pipeline's own σ grid")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="flow/reflow/guide: share of captions replaced by the empty one (the unconditional branch "
                        "of classifier-free guidance; in the guide phase it keeps the teacher's)")
    p.add_argument("--guide-steps", type=int, default=0, help="guidance distillation (the guide phase)")
    p.add_argument("--guide-lr", type=float, default=2e-4)
    p.add_argument("--guide-on-policy", type=float, default=0.0,
                   help="guide: share of each batch taken at the states the model's own few-step sampler visits")
    p.add_argument("--guide-scale", type=float, default=1.5,
                   help="the teacher's classifier-free guidance scale the guide phase distils")
    p.add_argument("--guide-skip", default=None, metavar="BLOCK[,BLOCK]",
                   help="guide: skip-layer guidance instead of classifier-free: the negative branch is the teacher on "
                        "the same caption with these blocks skipped (module paths, e.g. single_transformer_blocks.1), "
                        "so the target is v_skip + scale·(v − v_skip)")
    p.add_argument("--coef-steps", type=int, default=0,
                   help="sampler-coefficient distillation (the coef phase): steps of training")
    p.add_argument("--coef-lr", type=float, default=2e-4)
    p.add_argument("--coef-cx", type=_floats, default=None, metavar="C1,C2,...",
                   help="coef: Q-Sched's per-step sample coefficients c^x on the shipped grid of len(C) steps")
    p.add_argument("--coef-ce", type=_floats, default=None, metavar="C1,C2,...",
                   help="coef: Q-Sched's per-step model-output coefficients c^ε (as many as --coef-cx)")
    p.add_argument("--coef-on-path", type=float, default=0.5,
                   help="coef: share of batches taken on the coefficient sampler's own path (the rest at noised "
                        "training images)")
    p.add_argument("--temp-steps", type=int, default=0,
                   help="noise-temperature distillation (the temp phase): steps of training")
    p.add_argument("--temp-lr", type=float, default=2e-4)
    p.add_argument("--temp-tau", type=float, default=0.7,
                   help="temp: the model learns to sample from noise what its frozen copy samples from tau·noise")
    p.add_argument("--temp-on-path", type=float, default=0.5,
                   help="temp: share of batches taken on the tempered sampler's own path (the rest at noised "
                        "training images)")
    args = p.parse_args(argv)
    try:  # bad input: one line, status 2, before any work
        world.reweighted_kinds(_kind_weights(args.kind_weight))
    except ValueError as e:
        p.error(str(e))
    if args.init_from not in ("scratch", "shipped") and not (Path(args.init_from) / "model_index.json").is_file():
        p.error(f"--init-from wants scratch, shipped or a saved flux-tiny pipeline folder: {args.init_from} has no "
                "model_index.json")
    if args.init_from != "scratch" and {"vae", "vaedec", "text"} & set(args.phases.split(",")):
        p.error("--init-from shipped or DIR starts at the flow phase: drop vae, vaedec and text from --phases")
    if not 0 <= args.guide_on_policy <= 1:
        p.error(f"--guide-on-policy {args.guide_on_policy}: a share of the batch, from 0 to 1")
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption-dropout {args.caption_dropout}: a share of the batch, at least 0 and below 1")
    if args.guide_scale < 1:
        p.error(f"--guide-scale {args.guide_scale}: classifier-free guidance wants a scale of at least 1 (1 is none)")
    if args.guide_skip is not None:
        bad = _bad_skip_blocks(args.guide_skip, args.depth)
        if bad:
            p.error(f"--guide-skip {bad}: not a block of a --depth {args.depth} transformer; name blocks by module "
                    "path, e.g. transformer_blocks.0 or single_transformer_blocks.1, comma-separated")
    if args.coef_steps > 0 or "coef" in args.phases.split(","):
        try:
            _coefficients(args)
        except ValueError as e:
            p.error(str(e))
    for flag in ("coef_on_path", "temp_on_path"):
        if not 0 <= getattr(args, flag) <= 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: a share of the batches, from 0 to 1")
    if not 0 < args.temp_tau <= 1:
        p.error(f"--temp-tau {args.temp_tau}: a noise temperature above 0 and at most 1 (1 changes nothing)")
    if args.grow and (args.init_from == "scratch" or args.fresh_transformer):
        p.error("--grow deepens the transformer of --init-from: pass --init-from shipped or DIR, "
                "without --fresh-transformer")
    if args.grow:
        source = _source_transformer_config(args.init_from)
        double, single = (int(v) for v in args.depth.split(","))
        if args.width != source["num_attention_heads"] or double < source["num_layers"] \
                or single < source["num_single_layers"]:
            p.error(f"--grow adds blocks only: --init-from has --width {source['num_attention_heads']} --depth "
                    f"{source['num_layers']},{source['num_single_layers']}; pass that width and at least that depth")
    if args.fresh_transformer and args.init_from == "scratch":
        p.error("--fresh-transformer keeps the VAE and text encoders of --init-from: pass --init-from shipped or DIR")
    for flag in (f"text_{name}_weight" for name in AUX_HEADS):
        w = getattr(args, flag)
        if w < 0 or (w and args.freeze_text):
            p.error(f"--{flag.replace('_', '-')} wants W >= 0 and trainable text encoders (not with --freeze-text)")
    return args


def _bad_skip_blocks(blocks: str, depth: str) -> str | None:
    """The first name in ``blocks`` that is not a block of a ``depth`` (double,single) transformer, else None."""
    from qsched.tinyworld.skip_guidance import block_paths

    known = block_paths(*(int(v) for v in depth.split(",")))
    return next((b for b in blocks.split(",") if b not in known), None)


def _source_transformer_config(source: str) -> dict:
    from qsched.tinyworld.model import WEIGHTS_DIR

    folder = WEIGHTS_DIR if source == "shipped" else Path(source)
    return json.loads((folder / "transformer" / "config.json").read_text())


def _floats(text: str) -> list[float]:
    """``"0.7,0.85"`` → ``[0.7, 0.85]`` (argparse reports the ValueError as a usage error)."""
    return [float(v) for v in text.split(",")]


def _coefficients(args):
    """The coef phase's teacher coefficients from ``--coef-cx``/``--coef-ce``; ValueError names what is wrong."""
    from qsched.core.errors import QschedError
    from qsched.runtime.schedulers import SchedulerCoefficients

    if args.coef_cx is None or args.coef_ce is None:
        raise ValueError("--coef-steps/--phases coef distil Q-Sched coefficients: pass --coef-cx and --coef-ce "
                         "(one value a step, e.g. from benchmarks/qsched_curves.py --models fp)")
    try:
        coefs = SchedulerCoefficients(len(args.coef_cx), args.coef_cx, args.coef_ce)
    except QschedError as e:
        raise ValueError(f"--coef-cx/--coef-ce: {e}") from None
    if not all(v > 0 for v in coefs.cx + coefs.ce):
        raise ValueError(f"--coef-cx/--coef-ce must be positive, got {coefs.cx} and {coefs.ce}")
    return coefs


def transformer_config(args) -> dict:
    double, single = (int(v) for v in args.depth.split(","))
    return {**SHIPPED_TRANSFORMER_CONFIG, "num_attention_heads": args.width, "num_layers": double,
            "num_single_layers": single}


# --- phase 2: text encoders --------------------------------------------------------------------------

_NONE = ("none",)
CAPTION_FIELDS: dict[str, tuple] = {  # what a caption says, as classes the text encoders must predict
    "kind": tuple(world.TEMPLATES), "color0": world.COLOR_NAMES, "shape0": world.SHAPES,
    "size0": _NONE + world.SIZES, "count0": (1, 2, 3), "color1": _NONE + world.COLOR_NAMES,
    "shape1": _NONE + world.SHAPES, "size1": _NONE + world.SIZES,
    "position": _NONE + tuple(world.POSITION_PHRASES), "relation": _NONE + tuple(world.RELATION_PHRASES)}


def caption_targets(captions: list[str]) -> torch.Tensor:
    """[n, fields] class indices of each caption's parsed content (see ``CAPTION_FIELDS``)."""
    rows = []
    for c in captions:
        spec = world.parse_prompt(c)
        g0, g1 = spec.groups[0], spec.groups[1] if len(spec.groups) > 1 else None
        vals = {"kind": spec.kind, "color0": g0.color, "shape0": g0.shape, "size0": g0.size or "none",
                "count0": g0.count, "color1": g1.color if g1 else "none", "shape1": g1.shape if g1 else "none",
                "size1": (g1.size or "none") if g1 else "none", "position": spec.position or "none",
                "relation": spec.relation or "none"}
        rows.append([CAPTION_FIELDS[k].index(v) for k, v in vals.items()])
    return torch.tensor(rows)


SCENE_FIELDS: dict[str, tuple] = {  # a relation caption's scene, the same whichever object is named first
    "first_color": _NONE + world.COLOR_NAMES, "first_shape": _NONE + world.SHAPES,
    "second_color": _NONE + world.COLOR_NAMES, "second_shape": _NONE + world.SHAPES,
    "axis": _NONE + ("vertical", "horizontal")}


def scene_targets(captions: list[str]) -> torch.Tensor:
    """[n, 5] class indices (see ``SCENE_FIELDS``) of each caption's canonical scene: for a relation caption
    the object above (or left of) the other, that other object, and the axis; "X above Y" and "Y below X"
    get the same row, "Y above X" another. Other captions: all "none"."""
    rows = []
    for c in captions:
        spec = world.parse_prompt(c)
        vals = ("none",) * 5
        if spec.relation:
            a, b = spec.groups  # the caption reads "a <relation> b"
            first, second = (a, b) if spec.relation in ("above", "left of") else (b, a)
            axis = "vertical" if spec.relation in ("above", "below") else "horizontal"
            vals = (first.color, first.shape, second.color, second.shape, axis)
        rows.append([f.index(v) for f, v in zip(SCENE_FIELDS.values(), vals)])
    return torch.tensor(rows)


class SceneHead(torch.nn.Module):
    """Attention pooling of T5 token states (learned queries, padding masked) → ``SCENE_FIELDS`` logits:
    the auxiliary target that asks the sequence the transformer reads which object is where."""

    def __init__(self, dim: int, queries: int = 4):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(queries, dim) / dim ** 0.5)
        self.key = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(queries * dim, sum(len(v) for v in SCENE_FIELDS.values()))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        att = torch.einsum("qd,ntd->nqt", self.query, self.key(states)) / states.shape[-1] ** 0.5
        att = att.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        pooled = torch.einsum("nqt,ntd->nqd", att, states).flatten(1)
        return list(self.out(pooled).split([len(v) for v in SCENE_FIELDS.values()], dim=-1))

    def loss(self, pipe, states: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Summed cross-entropies against ``scene_targets``, one row per caption."""
        y = scene_targets(captions).to(states.device)
        logits = self(states, _t5_mask(pipe, captions, states.device))
        return sum(F.cross_entropy(lg, y[:, j]) for j, lg in enumerate(logits))


ROLE_FIELDS: dict[str, tuple] = {"vertical": ("none", "upper", "lower"), "horizontal": ("none", "left", "right")}
_OPPOSITE = {"none": "none", "upper": "lower", "lower": "upper", "left": "right", "right": "left"}


def _place_roles(place: str) -> tuple[str, str]:
    """(vertical, horizontal) role a position or relation gives the first group, read from its words as
    ``world.satisfies_position`` reads them ("top left" → upper, left; "right of" → none, right)."""
    words = set(place.split())
    vertical = "upper" if words & {"top", "above"} else "lower" if words & {"bottom", "below"} else "none"
    horizontal = "left" if "left" in words else "right" if "right" in words else "none"
    return vertical, horizontal


def _token_targets(tokenizer, captions: list[str], length: int, fields: dict[str, tuple], group_labels) -> torch.Tensor:
    """[n, length, len(fields)] class indices per T5 token: each object group's words take the labels
    ``group_labels(spec)`` gives that group (one tuple per group, in caption order; fewer tuples leave the
    later groups "none"); every other token is "none" (index 0); padding is -100. The tokenizer must be
    word-level (one token per word, then eos), which is checked."""
    out = torch.full((len(captions), length, len(fields)), -100, dtype=torch.long)
    for i, c in enumerate(captions):
        spec, words = world.parse_prompt(c), c.split()
        ids = tokenizer(c, truncation=True, max_length=length).input_ids
        if len(ids) != min(len(words) + 1, length):
            raise ValueError(f"per-token targets need a word-level tokenizer: {c!r} gave {len(ids)} tokens")
        out[i, :len(ids)] = 0
        for (start, stop), labels in zip(world.group_word_spans(spec), group_labels(spec)):
            for j, (field, label) in enumerate(zip(fields.values(), labels)):
                out[i, start:min(stop, length), j] = field.index(label)
    return out


def _role_labels(spec) -> list[tuple[str, str]]:
    place = spec.relation or spec.position
    if place is None:
        return []
    first = _place_roles(place)
    return [first, tuple(_OPPOSITE[r] for r in first)]


def role_targets(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """[n, length, 2] (see ``ROLE_FIELDS``): where the object a word describes goes. In "a red circle above a
    blue square" the first group's four tokens are "upper", the second's "lower"; a position caption's group
    takes its position's roles; every other token is "none"; padding is -100."""
    return _token_targets(tokenizer, captions, length, ROLE_FIELDS, _role_labels)


GROUP_FIELDS: dict[str, tuple] = {"count": ("none", 1, 2, 3), "size": ("none", "unsaid", "small", "large")}


def group_targets(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """[n, length, 2] (see ``GROUP_FIELDS``): how many objects the group a word belongs to has, and the size
    it is given. In "two small red circles and a blue square" all four words of the first group say (2,
    small), the last three (1, unsaid): count and size carried to the colour and shape tokens the
    transformer's attention finds the object by."""
    return _token_targets(tokenizer, captions, length, GROUP_FIELDS,
                          lambda spec: [(g.count, g.size or "unsaid") for g in spec.groups])


class TokenHead(torch.nn.Module):
    """One linear layer per T5 token state → logits of ``fields``, trained against ``targets`` (a
    ``_token_targets`` function): asks each token to carry what the caption says about its object, in the form
    the transformer's attention reads (a linear function of one token's state)."""

    def __init__(self, dim: int, fields: dict[str, tuple], targets):
        super().__init__()
        self.sizes, self.targets = [len(v) for v in fields.values()], targets
        self.out = torch.nn.Linear(dim, sum(self.sizes))

    def forward(self, states: torch.Tensor) -> list[torch.Tensor]:
        return list(self.out(states).split(self.sizes, dim=-1))

    def loss(self, pipe, states: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Summed cross-entropies against the targets, per token, padding ignored."""
        y = self.targets(pipe.tokenizer_2, captions, states.shape[1]).to(states.device)
        return sum(F.cross_entropy(lg.flatten(0, 1), y[..., j].flatten(), ignore_index=-100)
                   for j, lg in enumerate(self(states)))


AUX_HEADS = {  # flag name -> (seed offset, constructor on the T5 width); the seeds keep earlier runs reproducible
    "scene": (4242, SceneHead),
    "role": (4343, lambda dim: TokenHead(dim, ROLE_FIELDS, role_targets)),
    "group": (4444, lambda dim: TokenHead(dim, GROUP_FIELDS, group_targets)),
}


def _t5_mask(pipe, captions: list[str], device) -> torch.Tensor:
    """[n, tokens] True at T5's real tokens (eos included), False at padding."""
    ids = pipe.tokenizer_2(captions, padding="max_length", max_length=SETTINGS_V2.max_sequence_length,
                           truncation=True, return_tensors="pt").input_ids
    return (ids != pipe.tokenizer_2.pad_token_id).to(device)


def encode_text(pipe, captions: list[str], device):
    """T5 sequence states, CLIP pooled and text ids exactly as ``FluxPipeline`` computes them (with grads)."""
    return pipe.encode_prompt(captions, prompt_2=None, device=device,
                              max_sequence_length=SETTINGS_V2.max_sequence_length)


def train_text(pipe, args, work: Path, log) -> None:
    """Pre-train CLIP (pooled) and T5 (mean of its states) to predict the parsed caption with linear
    heads, so the flow starts from conditioning that already separates subject/object, sizes, counts."""
    if args.text_steps <= 0 or args.freeze_text:
        return
    dev = args.device
    te1, te2 = pipe.text_encoder, pipe.text_encoder_2
    n_cls = sum(len(v) for v in CAPTION_FIELDS.values())
    heads = torch.nn.ModuleDict({"clip": torch.nn.Linear(te1.config.hidden_size, n_cls),
                                 "t5": torch.nn.Linear(te2.config.d_model, n_cls)})
    mods = {"te1": te1, "te2": te2, "heads": heads}
    params = [p for m in mods.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.text_lr, weight_decay=0.01)
    path = work / "text.safetensors"
    start, seconds = _resume(path, mods, opt, "text", log)
    for m in mods.values():
        m.to(dev).train().requires_grad_(True)
    _opt_to(opt, dev)
    sizes = [len(v) for v in CAPTION_FIELDS.values()]
    t0 = time.perf_counter()
    for step in range(start, args.text_steps):
        _set_lr(opt, [args.text_lr], _lr_factor(step, 100, args.text_steps, args.text_steps // 3))
        rng = np.random.default_rng(args.seed * 1_000_003 + 900_000 + step)
        captions = [world.caption(sc) for sc in world.sample_scenes(rng, args.text_batch, "train")]
        y = caption_targets(captions).to(dev)
        t5, pooled, _ = encode_text(pipe, captions, dev)
        mask = _t5_mask(pipe, captions, dev).float()[..., None]
        t5_mean = (t5 * mask).sum(1) / mask.sum(1)
        loss, acc = 0.0, []
        for name, feat in (("clip", pooled), ("t5", t5_mean)):
            for j, logits in enumerate(heads[name](feat).split(sizes, dim=-1)):
                loss = loss + F.cross_entropy(logits, y[:, j])
                acc.append((logits.argmax(-1) == y[:, j]).float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.text_steps:
            s = seconds + time.perf_counter() - t0
            for m in mods.values():
                m.cpu()
            _save_ckpt(path, _pack(mods, opt, {"step": step + 1, "seconds": s, "field_accuracy": float(np.mean(acc))}))
            for m in mods.values():
                m.to(dev)
            log(f"text step {step + 1}: loss {loss.item():.4f} field accuracy {np.mean(acc):.4f} ({s:.0f}s)")
    for m in (te1, te2):
        m.cpu().eval().requires_grad_(False)


# --- phase 3: rectified flow (text encoders trained jointly) -----------------------------------------

@torch.no_grad()
def encode_images(pipe, images: np.ndarray, device):
    """World batch → packed normalised latents and image ids, as FluxPipeline lays them out."""
    z = pipe.vae.encode(to_tensor(images).to(device)).latent_dist.mean
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    n, c, h, w = z.shape
    return pipe._pack_latents(z, n, c, h, w), pipe._prepare_latent_image_ids(n, h // 2, w // 2, device, z.dtype)


def _velocity(transformer, x, sigma, t5, pooled, text_ids, img_ids):
    return transformer(hidden_states=x, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=t5,
                       txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]


def _eval_pipe(pipe, transformer, te1, te2):
    from diffusers import FluxPipeline
    ep = FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=te1, tokenizer=pipe.tokenizer,
                      text_encoder_2=te2, tokenizer_2=pipe.tokenizer_2, transformer=transformer)
    ep.set_progress_bar_config(disable=True)
    return ep


def judged_accuracy(pipe, prompts: list[str], steps: int = 4, seed: int = 123, batch: int = 64) -> dict:
    """Judged accuracy (95% Wilson half-width) of ``pipe`` on ``prompts`` at ``steps`` Euler steps, and each
    prompt's verdict packed as hex (``correct_bits``), so two runs' curves can be compared prompt by prompt."""
    settings = dataclasses.replace(SETTINGS_V2, steps=steps)
    images = generate(pipe, prompts, settings, seed=seed, batch_size=batch)
    v = judge(images, prompts)
    return {"accuracy": v.accuracy, "ci95": confidence_interval(v.accuracy, len(prompts)),
            "per_attribute": {k: round(x, 4) for k, x in v.per_attribute.items()},
            "correct_bits": np.packbits(np.asarray(v.correct, dtype=bool)).tobytes().hex()}


def unpack_correct(correct_bits: str, n: int) -> np.ndarray:
    """The ``n`` per-prompt verdicts packed in ``judged_accuracy``'s ``correct_bits``, as booleans."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(correct_bits), dtype=np.uint8))[:n].astype(bool)


def _sigmas(gen, n, device, few_step_mix: float = 0.0, grid: list[float] | None = None):
    """Logit-normal(0, 1) σ (FLUX's recipe); reflow mixes in the σ values the shipped few-step sampler
    steps from (``grid``, without its final 0)."""
    sigma = torch.sigmoid(torch.randn(n, generator=gen))
    if few_step_mix:
        starts = torch.tensor(grid[:-1], dtype=sigma.dtype)
        pick = torch.rand(n, generator=gen) < few_step_mix
        sigma = torch.where(pick, starts[torch.randint(0, len(starts), (n,), generator=gen)], sigma)
    return sigma.to(device)


_PHASE_SEED = {"flow": 0, "reflow": 10**8, "guide": 2 * 10**8, "coef": 5 * 10**8,
               "temp": 6 * 10**8}  # each phase draws its own noise


def _kept_captions(args, phase: str, step: int, n: int) -> torch.Tensor:
    """[n] bools: False where ``--caption-dropout`` replaces the caption by the empty one, so the model also
    learns the unconditional velocity that classifier-free guidance needs (its own generator: runs without
    dropout draw exactly as before)."""
    if not args.caption_dropout:
        return torch.ones(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(args.seed * 7919 + step + _PHASE_SEED[phase] + 3 * 10**8)
    return torch.rand(n, generator=gen) >= args.caption_dropout


@torch.no_grad()
def _euler(velocity, x, sigmas: list[float]):
    """Euler steps of ``velocity(x, σ)`` from ``x`` at ``sigmas[0]`` through each later σ in turn."""
    for s, s2 in itertools.pairwise(sigmas):
        x = x + (s2 - s) * velocity(x, torch.full((x.shape[0],), s, device=x.device))
    return x


def _ode(transformer, noise, cond, sigmas: list[float]):
    """The reflow teacher's sample: Euler steps on ``sigmas`` (the pipeline's own grid at ``--teacher-steps``)
    from pure noise to σ 0."""
    return _euler(lambda x, s: _velocity(transformer, x, s, *cond), noise, sigmas)


def train_flow(pipe, args, work: Path, log, phase: str = "flow", teacher=None) -> None:
    """Rectified flow on x_t = (1−σ)x0 + σ·noise, target noise − x0. With a frozen ``teacher`` (text frozen
    too): ``reflow`` trains on the teacher's ODE pairs, ``guide`` on the teacher's classifier-free-guided
    velocity at x_t, ``coef`` on the teacher's Q-Sched coefficient field, ``temp`` on the teacher's sampler
    from τ·noise. EMA of every trained module is what gets evaluated and exported."""
    import copy

    dev = args.device
    steps, lr = getattr(args, f"{phase}_steps"), getattr(args, f"{phase}_lr")
    train_text_too = phase == "flow" and not args.freeze_text
    mods = {"model": pipe.transformer}
    if train_text_too:
        mods.update(te1=pipe.text_encoder, te2=pipe.text_encoder_2)
    emas = {f"ema_{k}": copy.deepcopy(m) for k, m in mods.items()}
    groups = [{"params": list(pipe.transformer.parameters()), "lr": lr}]
    if train_text_too:
        groups.append({"params": [p for k in ("te1", "te2") for p in mods[k].parameters()], "lr": args.flow_text_lr})
    extra = {}  # auxiliary heads on the T5 states: trained but neither EMA-averaged nor exported
    weights = {name: getattr(args, f"text_{name}_weight") for name in AUX_HEADS} if train_text_too else {}
    for name, (seed, head) in AUX_HEADS.items():
        if weights.get(name):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed + seed)
                extra[name] = head(pipe.text_encoder_2.config.d_model)
            groups.append({"params": list(extra[name].parameters()), "lr": args.text_lr})  # as the text heads
    base = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.99))
    path = work / f"{phase}.safetensors"
    start, seconds = _resume(path, {**mods, **emas, **extra}, opt, phase, log)
    for m in (*mods.values(), *extra.values()):
        m.to(dev).train().requires_grad_(True)
    for m in emas.values():
        m.to(dev).eval().requires_grad_(False)
    if not train_text_too:
        pipe.text_encoder.to(dev)
        pipe.text_encoder_2.to(dev)
    pipe.vae.to(dev)
    _opt_to(opt, dev)
    eval_prompts = world.sample_batch(seed=123, n=args.eval_prompts, split="test")[1] if args.eval_every else []
    kind_probs = world.reweighted_kinds(_kind_weights(args.kind_weight)) if args.kind_weight else None
    curve = work / "curve.jsonl"
    grid = sampler_grid(pipe.scheduler, SETTINGS_V2.steps)  # where the shipped few-step sampler steps (shift 3.0)
    if phase == "guide":  # the empty caption is the unconditional branch, as the pipeline's negative_prompt=""
        empty = encode_text(pipe, [""] * args.flow_batch, dev)
    if phase == "coef":
        coefs = _coefficients(args)
        grid = sampler_grid(pipe.scheduler, coefs.steps)
    if phase == "reflow":  # the teacher samples on the pipeline's own grid too
        teacher_grid = sampler_grid(pipe.scheduler, args.teacher_steps)
    gen = torch.Generator()
    t0, running, aux_running = time.perf_counter(), None, {}
    for step in range(start, steps):
        _set_lr(opt, base, _lr_factor(step, args.flow_warmup, steps, args.flow_cooldown))
        gen.manual_seed(args.seed * 7919 + step + _PHASE_SEED[phase])
        images, captions = world.sample_batch(seed=args.seed * 1_000_003 + 500_000 + step, n=args.flow_batch,
                                              split="train", kind_probs=kind_probs)
        x0, img_ids = encode_images(pipe, images, dev)
        keep = _kept_captions(args, phase, step, len(captions))
        with torch.set_grad_enabled(train_text_too):
            cond = (*encode_text(pipe, [c if k else "" for c, k in zip(captions, keep)], dev), img_ids)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        if phase == "reflow":
            x0 = _ode(teacher, noise, cond, teacher_grid)
        sigma = _sigmas(gen, x0.shape[0], dev, 0.5 if phase == "reflow" else 0.0, grid)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        target = noise - x0
        if phase == "guide" and args.guide_on_policy:
            xt, sigma = _on_policy(pipe.transformer, xt, sigma, noise, cond, grid, args, step)
        if phase == "guide" and args.guide_skip:
            target = _skip_guided_velocity(teacher, xt, sigma, cond, args.guide_skip.split(","), args.guide_scale)
        elif phase == "guide":
            target = _guided_velocity(teacher, xt, sigma, cond, (*empty, img_ids), args.guide_scale)
        if phase == "coef":
            xt, sigma = _on_coefficient_path(teacher, xt, sigma, noise, cond, coefs, grid, args, step)
            target = _coefficient_velocity(teacher, xt, sigma, cond, coefs, grid)
        if phase == "temp":
            xt, target, sigma = _temp_rows(teacher, x0, sigma, noise, cond, grid, args, step)
        loss = F.mse_loss(_velocity(pipe.transformer, xt, sigma, *cond), target)
        total = loss
        for name, head in extra.items():  # auxiliary targets on the T5 states the transformer just read
            if not keep.any():
                continue
            aux = head.loss(pipe, cond[0][keep.to(dev)], [c for c, k in zip(captions, keep) if k])
            total = total + weights[name] * aux
            aux_running[name] = 0.98 * aux_running.get(name, aux.item()) + 0.02 * aux.item()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups[:len(groups) - len(extra)] for p in g["params"]], 1.0)
        for m in extra.values():  # the fresh head's large gradients do not shrink the model's through the clip
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        for k, m in mods.items():
            _ema_update(emas[f"ema_{k}"], m, step, args.ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = step + 1 == steps
        if (step + 1) % args.ckpt_every == 0 or done:
            s = seconds + time.perf_counter() - t0
            meta = {"step": step + 1, "seconds": s, "loss": running}
            meta.update({f"{name}_loss": v for name, v in aux_running.items()})
            _save_ckpt(path, _pack({**mods, **emas, **extra}, opt, meta))
            log(f"{phase} step {step + 1}: loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e} ({s:.0f}s)"
                + "".join(f" {name} loss {v:.4f}" for name, v in aux_running.items()))
            if args.eval_every and ((step + 1) % args.eval_every == 0 or done):
                te1 = emas.get("ema_te1", pipe.text_encoder)
                te2 = emas.get("ema_te2", pipe.text_encoder_2)
                te = time.perf_counter()
                row = {"phase": phase, "step": step + 1, "train_seconds": round(s), "loss": round(running, 4),
                       "samples": (step + 1) * args.flow_batch, "n": len(eval_prompts),
                       **judged_accuracy(_eval_pipe(pipe, emas["ema_model"], te1, te2), eval_prompts)}
                t0 -= time.perf_counter() - te  # evaluation time is not training time
                with open(curve, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"eval {json.dumps({k: v for k, v in row.items() if k != 'correct_bits'})}")
    pipe._v2_steps = {**getattr(pipe, "_v2_steps", {}), phase: max(start, steps)}  # for final_eval
    for k, m in mods.items():  # the EMA weights are the model
        m.load_state_dict(emas[f"ema_{k}"].state_dict())
        m.cpu().eval().requires_grad_(False)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.cpu()
    for m in extra.values():
        m.cpu().eval().requires_grad_(False)


def train_reflow(pipe, args, work: Path, log) -> None:
    """Few-step distillation: the flow's own ``--teacher-steps`` ODE maps noise to images; training on
    those straight pairs lets 4 steps approach the teacher's many-step quality (Liu et al.)."""
    import copy

    if args.reflow_steps <= 0:
        return
    teacher = copy.deepcopy(pipe.transformer).to(args.device).eval().requires_grad_(False)
    train_flow(pipe, args, work, log, phase="reflow", teacher=teacher)


def sampler_grid(scheduler, steps: int) -> list[float]:
    """The σ values (ending in 0) the pipeline's scheduler steps through at ``steps`` (FluxPipeline's call)."""
    import copy

    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    return scheduler.sigmas.tolist()


@torch.no_grad()
def _on_policy(model, xt, sigma, noise, cond, grid: list[float], args, step: int):
    """Replace a ``--guide-on-policy`` share of the rows by where the model's own sampler is after its first k
    Euler steps on ``grid`` (one k per batch, uniform), so it learns the guided velocity at the states it
    visits when it samples, not only at noised data (its own generator: the other draws are unchanged)."""
    gen = torch.Generator().manual_seed(args.seed * 7919 + step + _PHASE_SEED["guide"] + 4 * 10**8)
    k = int(torch.randint(0, len(grid) - 1, (1,), generator=gen))
    rows = (torch.rand(xt.shape[0], generator=gen) < args.guide_on_policy).to(xt.device)
    x = _euler(lambda x, s: _velocity(model, x, s, *cond), noise, grid[:k + 1])
    return torch.where(rows[:, None, None], x, xt), torch.where(rows, torch.full_like(sigma, grid[k]), sigma)


@torch.no_grad()
def _guided_velocity(teacher, xt, sigma, cond, uncond, scale: float) -> torch.Tensor:
    """Classifier-free guidance of the teacher (FluxPipeline's ``true_cfg_scale``): v_u + scale·(v_c − v_u)."""
    v_u = _velocity(teacher, xt, sigma, *uncond)
    return v_u + scale * (_velocity(teacher, xt, sigma, *cond) - v_u)


@torch.no_grad()
def _skip_guided_velocity(teacher, xt, sigma, cond, blocks: list[str], scale: float) -> torch.Tensor:
    """Skip-layer guidance of the teacher (:mod:`qsched.tinyworld.skip_guidance`): v_skip + scale·(v − v_skip),
    where v_skip is the teacher's velocity on the same caption with ``blocks`` skipped."""
    from qsched.tinyworld.skip_guidance import skipped

    with skipped(teacher, blocks):
        v_skip = _velocity(teacher, xt, sigma, *cond)
    return v_skip + scale * (_velocity(teacher, xt, sigma, *cond) - v_skip)


def _path_steps(args, phase: str, step: int, share: float, grid: list[float]) -> int | None:
    """For a batch of ``phase`` at ``step``: after how many sampler steps on ``grid`` it is taken (k uniform), or
    None (probability 1 − ``share``) for noised training images; its own generator, so other draws are unchanged."""
    gen = torch.Generator().manual_seed(args.seed * 7919 + step + _PHASE_SEED[phase] + 4 * 10**8)
    k = int(torch.randint(0, len(grid) - 1, (1,), generator=gen))
    return k if float(torch.rand(1, generator=gen)) < share else None


@torch.no_grad()
def _coefficient_velocity(teacher, xt, sigma, cond, coefs, grid: list[float]) -> torch.Tensor:
    """Q-Sched's coefficient sampler read as a velocity field: on the grid interval (σ_{i+1}, σ_i] that holds σ,
    v* = c^ε_i·v + (c^x_i − 1)/(σ_{i+1} − σ_i)·x, so one plain Euler step from σ_i on ``grid`` is exactly the
    coefficient step c^x_i·x + (σ_{i+1} − σ_i)·c^ε_i·v, and other step counts integrate the same field."""
    edges = torch.tensor(grid[1:-1], device=sigma.device)
    i = torch.bucketize(-sigma, -edges, right=True)  # grid descends: interval i holds grid[i+1] < σ <= grid[i]
    d = torch.tensor(grid, device=sigma.device).diff()[i]
    cx = torch.tensor(coefs.cx, device=sigma.device)[i]
    ce = torch.tensor(coefs.ce, device=sigma.device)[i]
    return ce[:, None, None] * _velocity(teacher, xt, sigma, *cond) + ((cx - 1) / d)[:, None, None] * xt


def _on_coefficient_path(teacher, xt, sigma, noise, cond, coefs, grid: list[float], args, step: int):
    """With probability ``--coef-on-path``, the whole batch moves to where the teacher's coefficient sampler
    is after its first k steps (k uniform), at σ = grid[k]: the states that sampler visits are off the noised
    data (c^x < 1 shrinks them), so the field must be learned there too (its own generator)."""
    k = _path_steps(args, "coef", step, args.coef_on_path, grid)
    if k is None:
        return xt, sigma
    x = _euler(lambda x, s: _coefficient_velocity(teacher, x, s, cond, coefs, grid), noise, grid[:k + 1])
    return x, torch.full_like(sigma, grid[k])


def train_coef(pipe, args, work: Path, log) -> None:
    """Sampler-coefficient distillation: the model learns, as its own velocity, the field of Q-Sched's per-step
    coefficients applied to its frozen copy (``--coef-cx/--coef-ce`` on the shipped grid of that many steps), so
    the plain scheduler samples what the coefficient sampler samples, with no wrapper and at any step count."""
    import copy

    if args.coef_steps <= 0:
        return
    teacher = copy.deepcopy(pipe.transformer).to(args.device).eval().requires_grad_(False)
    train_flow(pipe, args, work, log, phase="coef", teacher=teacher)


@torch.no_grad()
def _tempered(teacher, x, sigma, noise, cond, tau: float):
    """Where the student is, and the velocity it learns, when its frozen copy is at ``x`` after starting from
    τ·noise: y = x + σ(1 − τ)·noise and v = v_teacher(x, σ) + (1 − τ)·noise. The offset is linear in σ, so an
    Euler step of v from y lands on the offset of the teacher's Euler step from x on every σ grid: the student
    samples from noise what the teacher samples from τ·noise, at any step count."""
    s = sigma[:, None, None]
    return x + s * (1 - tau) * noise, _velocity(teacher, x, sigma, *cond) + (1 - tau) * noise


def _temp_rows(teacher, x0, sigma, noise, cond, grid: list[float], args, step: int):
    """The temp phase's batch: with probability ``--temp-on-path`` the teacher's own sampler from τ·noise after
    its first k steps on ``grid`` (k uniform, σ = grid[k]); otherwise noised training images, read as the teacher
    at (1 − σ)·x0 + σ·τ·noise (its own generator)."""
    tau = args.temp_tau
    k = _path_steps(args, "temp", step, args.temp_on_path, grid)
    if k is not None:
        x = _euler(lambda x, s: _velocity(teacher, x, s, *cond), tau * noise, grid[:k + 1])
        sigma = torch.full_like(sigma, grid[k])
    else:
        x = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * tau * noise
    return (*_tempered(teacher, x, sigma, noise, cond, tau), sigma)


def train_temp(pipe, args, work: Path, log) -> None:
    """Noise-temperature distillation: sampling from τ·noise (τ < 1) draws what the prompt says more often than
    from noise (benchmarks/tiny_temperature.py); the model learns the velocity field that takes plain noise where
    its frozen copy takes τ·noise, so the plain pipeline samples at temperature τ, at any step count."""
    import copy

    if args.temp_steps <= 0:
        return
    teacher = copy.deepcopy(pipe.transformer).to(args.device).eval().requires_grad_(False)
    train_flow(pipe, args, work, log, phase="temp", teacher=teacher)


def train_guide(pipe, args, work: Path, log) -> None:
    """Guidance distillation (Meng et al. 2023, stage 1): the model learns, at one call per step, the velocity
    its frozen copy gives under classifier-free guidance at ``--guide-scale`` with the empty caption as the
    unconditional branch, so the pipeline draws guided images at the same steps and cost, with no new input.
    With ``--guide-skip`` the negative branch is the teacher itself with those blocks skipped (skip-layer guidance)."""
    import copy

    if args.guide_steps <= 0:
        return
    teacher = copy.deepcopy(pipe.transformer).to(args.device).eval().requires_grad_(False)
    train_flow(pipe, args, work, log, phase="guide", teacher=teacher)


def init_from_pipeline(pipe, source: str, transformer: bool = True, grow: bool = False) -> None:
    """Load a saved flux-tiny's weights (``shipped``: the package's fp16 ones, as fp32) into ``pipe``'s VAE, text
    encoders and (``transformer``) transformer, with the VAE's latent shift/scale. A loaded transformer must have
    the same ``--width``/``--depth``, or with ``grow`` at least its depth (see ``grow_transformer``); without it a
    fresh one (another width, say) trains on the trained VAE and text encoders. A folder pins the start of a
    fine-tune that ``shipped`` would not once the shipped weights change."""
    from qsched.tinyworld.model import WEIGHTS_DIR, load_embedded

    start = load_embedded(WEIGHTS_DIR if source == "shipped" else Path(source))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).load_state_dict(getattr(start, name).state_dict())
    if transformer and grow:
        grow_transformer(pipe.transformer, start.transformer)
    elif transformer:
        pipe.transformer.load_state_dict(start.transformer.state_dict())
    pipe.vae.register_to_config(shift_factor=start.vae.config.shift_factor,
                                scaling_factor=start.vae.config.scaling_factor)


# Where each block's residual gates sit among its adaLN-Zero modulation chunks: dual-stream blocks modulate each
# stream with six chunks (shift, scale, gate for attention, then for the MLP), single-stream blocks with three.
GROWN_GATES = {"transformer_blocks": {"norm1": (2, 5), "norm1_context": (2, 5)},
               "single_transformer_blocks": {"norm": (2,)}}


def grow_transformer(target, source) -> None:
    """Function-preserving depth growth: ``target`` takes every weight of the shallower ``source`` (same width;
    ``parse_args`` checks it), whose blocks become its first ones, and its extra blocks at the end of each stack
    keep their seeded init except the residual gates (the gate rows of their adaLN-Zero modulation), which are
    zeroed. A zero-gated block adds nothing to either stream, so the grown model draws exactly what the source
    draws, and training opens the gates where the new capacity helps."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    new_blocks = {f"{stack}.{i}" for stack in GROWN_GATES
                  for i in range(len(getattr(source, stack)), len(getattr(target, stack)))}
    assert not unexpected and all(".".join(k.split(".")[:2]) in new_blocks for k in missing)
    dim = target.inner_dim
    with torch.no_grad():
        for stack, norms in GROWN_GATES.items():
            for block in list(getattr(target, stack))[len(getattr(source, stack)):]:
                for name, gates in norms.items():
                    linear = getattr(block, name).linear
                    for gate in gates:
                        linear.weight[gate * dim:(gate + 1) * dim] = 0
                        linear.bias[gate * dim:(gate + 1) * dim] = 0


def final_eval(pipe, args, work: Path, log) -> dict:
    """The issue's acceptance numbers: judged accuracy at 4 and 20 steps on ``--final-eval`` held-out
    prompts (seed 2024, 95% Wilson intervals), 4-step batch-of-16 latency and fp16 weight size."""
    prompts = world.sample_batch(seed=2024, n=args.final_eval, split="test")[1]
    res = {"n": len(prompts), "threads": torch.get_num_threads(),
           "params": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                      for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}}
    res["fp16_megabytes"] = round(2 * sum(res["params"].values()) / 1e6, 2)
    generate(pipe, prompts[:16], SETTINGS_V2, batch_size=16)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        generate(pipe, prompts[:16], SETTINGS_V2, batch_size=16)
        times.append(time.perf_counter() - t)
    res["seconds_4step_batch16"] = round(min(times), 3)
    for steps in (4, 20):
        res[f"steps_{steps}"] = judged_accuracy(pipe, prompts, steps, seed=2024)
    res.update({f"{k}_step": v for k, v in getattr(pipe, "_v2_steps", {}).items()})
    res.setdefault("flow_step", 0)
    (work / f"eval-flow{res['flow_step']}.json").write_text(json.dumps(res, indent=2))
    log(f"final eval: {json.dumps(res)}")
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = _logger(work)
    log(f"args: {json.dumps(vars(args))}")
    phases = args.phases.split(",")
    order = ["vae", "vaedec", "text", "flow", "reflow", "guide", "coef", "temp"]
    wanted = [order.index(p) for p in phases if p in order]
    if {"export", "eval"} & set(phases):  # also load every phase that has a checkpoint
        wanted += [i for i, p in enumerate(order) if (work / f"{p}.safetensors").is_file()]
    last = max(wanted, default=-1)
    pipe = build_pipeline_v2(args.seed, transformer_config(args))
    if args.init_from != "scratch":
        init_from_pipeline(pipe, args.init_from, transformer=not args.fresh_transformer, grow=args.grow)
        source = "the shipped flux-tiny" if args.init_from == "shipped" else args.init_from
        parts = ("VAE and text encoders" if args.fresh_transformer else
                 "VAE, text encoders and transformer" + (f" (grown to --depth {args.depth})" if args.grow else ""))
        log(f"init: {parts} from {source} (vae, vaedec, text skipped)")
    for name in order[:last + 1]:  # earlier phases are prerequisites: finished ones just load
        if args.init_from != "scratch" and name in ("vae", "vaedec", "text"):
            continue
        globals()[f"train_{name}"](pipe, args, work, log)
    if "export" in phases:
        out = Path(args.out or work / "pipeline")
        pipe.save_pretrained(str(out), safe_serialization=True)
        log(f"exported to {out}")
    if "eval" in phases:
        final_eval(pipe, args, work, log)
    return pipe


if __name__ == "__main__":
    main()
