"""Do flux-tiny's text encoders tell "X above Y" from "Y above X"? A diagnostic for issue 19's relations.

    python benchmarks/tiny_relation_embeddings.py [MODEL] [--accuracy N] [--threads T]

MODEL: flux-tiny (default, the shipped weights), a diffusers pipeline folder, or a train_v2 work folder (its
exported ``pipeline/``). ``--accuracy N`` also judges the curve's N held-out prompts at 4 steps (what
``curve.jsonl`` logs as acc@4 and per attribute: seed 123, ``train_v2.judged_accuracy``).

For relation captions built from the world's vocabulary, compares the shipped encoders' outputs (T5's token
sequence, flattened, and CLIP's pooled vector) by cosine similarity across three pairs: the same scene said the
other way round ("X above Y" / "Y below X"), the objects swapped ("X above Y" / "Y above X": a different
scene), and other objects in the same relation. An encoder that carries the relation puts the first pair
closer than the second.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

OBJECTS = [("a red circle", "a blue square"), ("a green triangle", "a yellow diamond"),
           ("a cyan square", "a purple circle"), ("a white diamond", "a red triangle")]
RELATIONS = [("above", "below"), ("to the left of", "to the right of")]


def main(argv=None) -> int:
    from qsched.models.registry import load_pipeline
    from qsched.tinyworld.model import TINY_SETTINGS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="flux-tiny")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N", help="also judge the curve's N prompts at 4 steps")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if (Path(model) / "pipeline" / "model_index.json").is_file():  # a train_v2 work folder
        model = str(Path(model) / "pipeline")
    pipe = load_pipeline(model)[0]
    pipe.set_progress_bar_config(disable=True)

    def encode(caption: str):
        with torch.no_grad():
            sequence, pooled, _ = pipe.encode_prompt([caption], prompt_2=None, device="cpu",
                                                     max_sequence_length=TINY_SETTINGS.max_sequence_length or 16)
        return sequence.flatten(1), pooled

    def cos(a, b) -> float:
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).item()

    pairs = {"same scene said the other way (X above Y / Y below X)": [],
             "objects swapped (X above Y / Y above X)": [],
             "other objects, same relation (X above Y / Z above W)": []}
    for i, ((a, b), (rel, inverse)) in enumerate(itertools.product(OBJECTS, RELATIONS)):
        c, d = OBJECTS[(i // len(RELATIONS) + 1) % len(OBJECTS)]
        base = encode(f"{a} {rel} {b}")
        for key, caption in zip(pairs, (f"{b} {inverse} {a}", f"{b} {rel} {a}", f"{c} {rel} {d}")):
            other = encode(caption)
            pairs[key].append((cos(base[0], other[0]), cos(base[1], other[1])))
    print("| pair | T5 sequence cosine | CLIP pooled cosine |\n|---|---|---|")
    for key, values in pairs.items():
        t5 = sum(v[0] for v in values) / len(values)
        clip = sum(v[1] for v in values) / len(values)
        print(f"| {key} | {t5:.3f} | {clip:.3f} |")
    if args.accuracy:
        from qsched.tinyworld import world
        from qsched.tinyworld.train_v2 import judged_accuracy
        prompts = world.sample_batch(seed=123, n=args.accuracy, split="test")[1]
        print(json.dumps({"model": model, "n": len(prompts), **judged_accuracy(pipe, prompts)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
