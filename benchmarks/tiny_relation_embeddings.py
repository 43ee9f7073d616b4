"""Do flux-tiny's text encoders tell "X above Y" from "Y above X"? A diagnostic for issue 19's relations.

    python benchmarks/tiny_relation_embeddings.py [MODEL] [--accuracy N] [--relation N] [--probe STEPS] [--threads T]

MODEL: flux-tiny (default, the shipped weights), a diffusers pipeline folder, or a train_v2 work folder (its
exported ``pipeline/``). ``--accuracy N`` also judges the curve's N held-out prompts at 4 steps (what
``curve.jsonl`` logs as acc@4 and per attribute: seed 123, ``train_v2.judged_accuracy``); ``--relation N``
judges N held-out relation captions only (seed 7, 4 steps), a tighter interval on the relation rate.
``--probe STEPS`` trains a fresh ``train_v2.SceneHead`` on the model's *frozen* T5 sequence (train relation
captions) and reports how often it reads the canonical scene of held-out relation captions exactly: whether
the sequence the transformer receives carries which object is where at all, whatever the cosines say.

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
    ap.add_argument("--relation", type=int, default=0, metavar="N", help="also judge N held-out relation captions")
    ap.add_argument("--probe", type=int, default=0, metavar="STEPS", help="also probe the frozen T5 sequence")
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
    if args.relation:
        from qsched.tinyworld import world
        from qsched.tinyworld.train_v2 import judged_accuracy
        prompts = world.sample_batch(seed=7, n=args.relation, split="test", kind_probs=_relations_only())[1]
        print(json.dumps({"model": model, "relation_prompts": len(prompts), **judged_accuracy(pipe, prompts)}))
    if args.probe:
        print(json.dumps({"model": model, **probe(pipe, args.probe)}))
    return 0


def _relations_only():
    """The world's caption-kind probabilities with every kind but relations at zero."""
    from qsched.tinyworld import world
    return world.reweighted_kinds({k: float(k == "relation") for k in world.KIND_PROBS})


def probe(pipe, steps: int, batch: int = 128, n_test: int = 1024) -> dict:
    """Held-out exact-match accuracy of a SceneHead trained for ``steps`` on frozen T5 states (seeded)."""
    import numpy as np

    from qsched.tinyworld import world
    from qsched.tinyworld.train_v2 import SceneHead, _t5_mask, encode_text, scene_targets

    only = _relations_only()

    def states(captions):
        with torch.no_grad():
            return encode_text(pipe, captions, "cpu")[0], _t5_mask(pipe, captions, "cpu")

    torch.manual_seed(0)
    head = SceneHead(pipe.text_encoder_2.config.d_model)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for step in range(steps):
        rng = np.random.default_rng(10_000 + step)
        captions = [world.caption(sc) for sc in world.sample_scenes(rng, batch, "train", only)]
        y = scene_targets(captions)
        loss = sum(torch.nn.functional.cross_entropy(lg, y[:, j]) for j, lg in enumerate(head(*states(captions))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    captions = [world.caption(sc) for sc in world.sample_scenes(np.random.default_rng(7), n_test, "test", only)]
    y = scene_targets(captions)
    with torch.no_grad():
        pred = torch.stack([lg.argmax(-1) for lg in head(*states(captions))], 1)
    return {"probe_steps": steps, "probe_test_captions": n_test, "probe_scene_exact": (pred == y).all(1).float().mean().item(),
            "probe_first_object": (pred[:, :2] == y[:, :2]).all(1).float().mean().item(),
            "probe_axis": (pred[:, 4] == y[:, 4]).float().mean().item()}


if __name__ == "__main__":
    raise SystemExit(main())
