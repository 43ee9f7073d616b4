"""How much of the guidance term a guide-phase student has learned, at noised data and along the sampler's path.

Why: a guidance-distilled flux-tiny (``train_v2 --phases guide``) should draw what true classifier-free guidance
draws at half the calls. This checks the two places where it can fall short: the fit at noised held-out images
(the phase's own objective) and the states the 4-step sampler visits (the teacher's guided path against the
student's own).
For each σ it prints the size of the guidance term |v_guided − v_cond|² and the student's error against
v_guided, both as means over latent elements.

    python benchmarks/tiny_guide_fit.py --teacher out/rel-R3/pipeline --student out/guide-15/pipeline --scale 1.5
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qsched.tinyworld import train_v2, world
from qsched.tinyworld.model import load_embedded


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the pipeline folder the guide phase started from")
    p.add_argument("--student", required=True, help="the guide phase's exported pipeline folder")
    p.add_argument("--scale", type=float, default=1.5, help="the --guide-scale it was distilled at")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--out", default="bench-out/tiny-guide-fit.json")
    args = p.parse_args(argv)
    for flag in ("teacher", "student"):
        if not (Path(getattr(args, flag)) / "model_index.json").is_file():
            p.error(f"--{flag} {getattr(args, flag)}: no model_index.json there; pass a flux-tiny pipeline folder")
    if args.scale < 1 or args.prompts < 2:
        p.error("--scale must be at least 1 and --prompts at least 2")
    torch.manual_seed(args.seed)
    teacher, student = load_embedded(Path(args.teacher)), load_embedded(Path(args.student))
    grid = train_v2.sampler_grid(student.scheduler, 4)  # the grid the student ships with
    images, captions = world.sample_batch(seed=args.seed, n=args.prompts, split="test")
    x0, ids = train_v2.encode_images(teacher, images, "cpu")
    cond = (*train_v2.encode_text(teacher, captions, "cpu"), ids)
    empty = (*train_v2.encode_text(teacher, [""] * args.prompts, "cpu"), ids)
    noise = torch.randn(x0.shape)

    def measure(x, s):
        sig = torch.full((x.shape[0],), s)
        v_c = train_v2._velocity(teacher.transformer, x, sig, *cond)
        target = train_v2._guided_velocity(teacher.transformer, x, sig, cond, empty, args.scale)
        v_s = train_v2._velocity(student.transformer, x, sig, *cond)
        return target, v_s, round(((target - v_c) ** 2).mean().item(), 5), round(((v_s - target) ** 2).mean().item(), 5)

    report = {"teacher": args.teacher, "student": args.student, "scale": args.scale, "prompts": args.prompts,
              "noised_data": [], "sampler_path": []}
    for s in (1.0, 0.9, 0.75, 0.5, 0.25):
        *_, term, err = measure((1 - s) * x0 + s * noise, s)
        report["noised_data"].append({"sigma": s, "guidance_term": term, "student_error": err})
        print(f"noised data, σ {s:.2f}: guidance term {term:.4f}, student error {err:.4f}", flush=True)
    x_t, x_s = noise.clone(), noise.clone()  # the teacher's guided path and the student's own
    for s, s2 in zip(grid[:-1], grid[1:]):
        target, _, term, err = measure(x_t, s)
        _, v_s, _, err_own = measure(x_s, s)
        gap = round(((x_s - x_t) ** 2).mean().item(), 5)
        report["sampler_path"].append({"sigma": s, "guidance_term": term, "student_error_on_teacher_path": err,
                                       "student_error_on_own_path": err_own, "path_gap": gap})
        print(f"sampler path, σ {s:.2f}: guidance term {term:.4f}, student error {err:.4f} (own path {err_own:.4f}), "
              f"path gap {gap:.4f}", flush=True)
        x_t, x_s = x_t + (s2 - s) * target, x_s + (s2 - s) * v_s
    report["final_gap"] = round(((x_s - x_t) ** 2).mean().item(), 5)
    print(f"final latents: mean squared gap {report['final_gap']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
