"""Do a few text tokens dominate the activation range of the text-stream layers? Measured, per layer.

MixDQ found that in CLIP-conditioned UNets the BOS token is a huge outlier; qsched serves such rows in FP
(:mod:`calibrate.fp_tokens`). This script checks the same question for every family's text stream: it
records the inputs of the text-stream layers over FP generations and reports, per layer,

- per token position: max |x| over prompts, steps and channels, and its ratio to the median token
  (a token's magnitude is its max |x| over channels);
- the same per token kind (bos / word / eos / pad), since T5 outliers sit on EOS or padding, whose
  position depends on the prompt's length;
- the damage: per-tensor asymmetric activation SQNR (a8 and a4) of the ordinary tokens when the range
  covers every token, against the range without the outlier tokens (ratio above ``--ratio``); the gain
  in dB is what serving those tokens in FP would buy. The same for the single loudest position, outlier
  or not (what an FP-row mechanism at a fixed position could buy at best).

Layers: FLUX's ``context_embedder`` (reads T5), the double blocks' text projections (``attn.add_k_proj``;
add_q/add_v read the same input), ``attn.to_add_out``, ``ff_context``, and the single blocks'
``attn.to_q``/``proj_out`` at the text positions of the joint sequence; SDXL's and PixArt's
cross-attention ``attn2.to_k`` (to_v reads the same input) and PixArt's caption projection.

Outliers are a property of *trained* text encoders (and trained denoisers). flux-tiny's denoiser is
trained but its text encoders are frozen at random init; the tiny SDXL and PixArt are random throughout,
so their numbers say little about the real models.

    python benchmarks/text_outliers.py --models flux-tiny sdxl-tiny --prompts 64 --out bench-out/text-outliers.json
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

from qsched.runtime.quantizers import activation_qparams, fake_quantize_activation
from qsched.models.adapters import adapter_for
from qsched.runtime.generation import generate
from qsched.tinyworld.world import sample_batch

TEXT_LAYERS = {
    "flux": (r"^context_embedder$", r"^transformer_blocks\.\d+\.attn\.add_k_proj$",
             r"^transformer_blocks\.\d+\.attn\.to_add_out$", r"^transformer_blocks\.\d+\.ff_context\.net\.(0\.proj|2)$",
             r"^single_transformer_blocks\.\d+\.(attn\.to_q|proj_out)$"),
    "unet": (r"\.attn2\.to_k$",),
    "pixart": (r"^caption_projection\.linear_[12]$", r"\.attn2\.to_k$"),
}


def load(model: str):
    """(pipeline, settings, tokenizer of the text stream) for a model name of this script."""
    if model == "flux-tiny":
        from qsched.tinyworld.model import TINY_SETTINGS, load_embedded
        pipe = load_embedded()
        return pipe, TINY_SETTINGS, pipe.tokenizer_2
    if model == "sdxl-tiny":
        from qsched.models.tiny_pipelines import TINY_SDXL_SETTINGS, build_tiny_sdxl_pipeline
        pipe = build_tiny_sdxl_pipeline(0)
        return pipe, TINY_SDXL_SETTINGS, pipe.tokenizer
    if model == "pixart-tiny":
        from qsched.models.tiny_pipelines import TINY_PIXART_SETTINGS, build_tiny_pixart_pipeline
        pipe = build_tiny_pixart_pipeline(0)
        return pipe, TINY_PIXART_SETTINGS, pipe.tokenizer
    raise SystemExit(f"unknown model {model!r}: flux-tiny, sdxl-tiny or pixart-tiny")


def token_kinds(tokenizer, prompts: list[str], length: int) -> list[list[str]]:
    """bos / word / eos / pad for each position of each prompt, tokenized as the pipelines do."""
    special = {tokenizer.bos_token_id: "bos", tokenizer.eos_token_id: "eos", tokenizer.pad_token_id: "pad"}
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    return [[special.get(i, "word") for i in row] for row in ids]


def record(pipe, settings, prompts, kinds_of, layers, text_len, batch_size):
    """Per layer: list of (x [B, N, D] fp32 on CPU, kinds [B][text_len]) over every denoiser call."""
    seen = {name: [] for name in layers}
    current = {}

    def hook(_m, args, name):
        x = args[0].detach().float().cpu()
        if x.dim() == 3 and x.shape[1] >= text_len:
            b, kinds = x.shape[0], current["kinds"]
            if b == 2 * len(kinds):  # classifier-free guidance: the unconditional half comes first
                kinds = current["uncond"] * len(kinds) + kinds
            seen[name].append((x, kinds))

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in layers.items()]
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            current["kinds"], current["uncond"] = kinds_of(batch), kinds_of([""])
            generate(pipe, batch, settings, seed=start, batch_size=len(batch))
    finally:
        for h in handles:
            h.remove()
    return seen


def _sqnr(x: torch.Tensor, keep: torch.Tensor, lo: float, hi: float, bits: int) -> tuple[float, float]:
    """Signal and noise energy of the kept tokens of ``x`` quantized per tensor over [lo, hi]."""
    scale, zp = activation_qparams(lo, hi, bits)
    rows = x[keep]
    q = fake_quantize_activation(rows, scale, zp, bits)
    return float(rows.pow(2).sum()), float((rows - q).pow(2).sum())


def analyse(calls, text_len: int, ratio: float) -> dict:
    """Per-position / per-kind magnitudes and the SQNR gain of leaving the outlier tokens out of the range."""
    mags, kinds = [], []
    for x, k in calls:
        mags.append(x[:, :text_len].abs().amax(-1))  # [B, T] token magnitudes
        kinds += k
    mags = torch.cat(mags)
    median = float(mags.median())
    per_position = mags.amax(0)
    result = {"median_token_max_abs": round(median, 4),
              "positions": [{"pos": i, "max_abs": round(float(v), 4), "ratio": round(float(v) / max(median, 1e-12), 2)}
                            for i, v in enumerate(per_position)]}
    by_kind = {}
    for kind in ("bos", "word", "eos", "pad"):
        mask = torch.tensor([[kk == kind for kk in row[:text_len]] for row in kinds])
        if mask.any():
            vals = mags[mask]
            by_kind[kind] = {"max_abs": round(float(vals.max()), 4), "median_abs": round(float(vals.median()), 4),
                             "ratio": round(float(vals.max()) / max(median, 1e-12), 2), "tokens": int(mask.sum())}
    result["kinds"] = by_kind
    threshold = ratio * median
    top_position = int(per_position.argmax())
    result.update({"outlier_threshold": round(threshold, 4),
                   "outlier_positions": sorted(p["pos"] for p in result["positions"] if p["ratio"] > ratio),
                   "top_position": top_position})

    def outliers_above(tok):        # the tokens an outlier-aware quantizer would serve in FP
        mask = torch.zeros_like(tok, dtype=torch.bool)
        mask[:, :text_len] = tok[:, :text_len] > threshold
        return mask

    def at_top_position(tok):       # the one position an FP-row mechanism would take, outlier or not
        mask = torch.zeros_like(tok, dtype=torch.bool)
        mask[:, top_position] = True
        return mask

    for label, rule in (("outliers", outliers_above), ("top_position", at_top_position)):
        energy = {(bits, which): [0.0, 0.0] for bits in (8, 4) for which in ("all", "excluded")}
        excluded = range_all = range_excl = 0.0
        for x, _ in calls:
            tok = x.abs().amax(-1)                          # [B, N] (image tokens too, in joint sequences)
            keep = ~rule(tok)
            excluded += int((~keep).sum())
            lo, hi = float(x.min()), float(x.max())
            kept = x[keep]
            klo, khi = (float(kept.min()), float(kept.max())) if kept.numel() else (lo, hi)
            range_all, range_excl = max(range_all, hi - lo), max(range_excl, khi - klo)
            for bits in (8, 4):
                for which, (a, b) in (("all", (lo, hi)), ("excluded", (klo, khi))):
                    sig, noise = _sqnr(x, keep, a, b, bits)
                    energy[bits, which][0] += sig
                    energy[bits, which][1] += noise
        db = {f"a{bits}_{which}": round(10 * math.log10(max(sig, 1e-30) / max(noise, 1e-30)), 2)
              for (bits, which), (sig, noise) in energy.items()}
        for bits in (8, 4):
            db[f"a{bits}_gain_db"] = round(db[f"a{bits}_excluded"] - db[f"a{bits}_all"], 2)
        result[label] = {"tokens_excluded": int(excluded), "range_all": round(range_all, 4),
                         "range_without": round(range_excl, 4), "sqnr_db": db}
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["flux-tiny", "sdxl-tiny"])
    p.add_argument("--prompts", type=int, default=64, help="held-out world prompts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ratio", type=float, default=6.0, help="a token is an outlier above this many times the median")
    p.add_argument("--out", default="bench-out/text-outliers.json")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    _, prompts = sample_batch(seed=2024, n=args.prompts, split="test")
    report = {"prompts": args.prompts, "ratio": args.ratio, "models": {}}
    for model in args.models:
        pipe, settings, tokenizer = load(model)
        adapter = adapter_for(pipe)
        text_len = settings.max_sequence_length or tokenizer.model_max_length
        layers = {n: m for n, m in adapter.quantizable_layers(adapter.denoiser(pipe)).items()
                  if any(re.search(pat, n) for pat in TEXT_LAYERS[adapter.family])}
        calls = record(pipe, settings, prompts, lambda ps: token_kinds(tokenizer, ps, text_len), layers, text_len,
                       args.batch_size)
        rows = {name: analyse(c, text_len, args.ratio) for name, c in calls.items() if c}
        report["models"][model] = {"text_length": text_len, "bos": adapter.text_encoder_emits_bos(pipe), "layers": rows}
        print(f"\n{model}: {len(rows)} text-stream layers, {text_len} text tokens, BOS first: "
              f"{adapter.text_encoder_emits_bos(pipe)}")
        print(f"{'layer':58s} {'top pos (ratio)':16s} {'max/median by kind':32s} {'outliers':8s} "
              f"{'a8 dB':6s} {'gain':5s} | {'a8 gain, a4 gain w/o top pos':s}")
        for name, r in rows.items():
            top = sorted(r["positions"], key=lambda q: -q["ratio"])[:2]
            kinds = " ".join(f"{k}:{v['ratio']:.1f}" for k, v in r["kinds"].items())
            tops = ", ".join(f"{q['pos']}({q['ratio']:.1f})" for q in top)
            out, pos = r["outliers"], r["top_position"]
            print(f"{name:58s} {tops:16s} {kinds:32s} {out['tokens_excluded']:8d} {out['sqnr_db']['a8_all']:6.2f} "
                  f"{out['sqnr_db']['a8_gain_db']:+5.2f} | {pos['sqnr_db']['a8_gain_db']:+.2f}, "
                  f"{pos['sqnr_db']['a4_gain_db']:+.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
