"""Artifact directory → one plain, JSON-serialisable dict: everything ``report.html`` shows.

Why one dict: the page is rendered from it alone (it is embedded in the HTML as JSON), and the tests
check it without a browser. Everything is read from the artifact: ``manifest.json`` (bit plan, Pareto
front, scheduler, metrics, timings, versions) and, when the compile measured them, ``report/data.json``
and its PNG samples (see :mod:`qsched.report.measure`). Those report files are listed in the manifest,
and their sha256 is checked here (cheap: they are small), so a tampered sample is reported, not shown.
Artifacts written before the report existed still get a report: the front, bit plan, schedule and
coefficients, without baselines, latency or images.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from qsched.core.errors import ArtifactError

from qsched.report.images import data_uri
from qsched.report.measure import DATA_FILE, FORMAT

OUTSIDE_BLOCKS = "(outside blocks)"
_BLOCK = re.compile(r"^(.*?\.\d+)\.(.+)$")  # "transformer_blocks.3" + "attn.to_q"


def collect(path) -> dict:
    """The report of the artifact at ``path`` as a plain dict (raises :class:`ArtifactError`)."""
    from export.format import read_manifest

    path = Path(path)
    manifest = read_manifest(path, verify=False)  # sizes of every file; the report's own files are hashed below
    measured = _read_json(path, manifest, DATA_FILE)
    notes = []
    if measured is None:
        notes.append("This artifact has no report/data.json (compiled before reports were measured): baselines, "
                     "latency and sample images are missing; quality is the cache search's own.")
        points = _points_from_front(manifest)
    elif measured.get("format") != FORMAT:
        raise ArtifactError(f"corrupt artifact {path}: {DATA_FILE} is not qsched report data; re-export it")
    else:
        points = measured["points"]
    metrics = manifest.get("metrics", {})
    size = metrics.get("size", {})
    for point in points:
        _complete_point(path, manifest, point, size)
    chosen = next((p["id"] for p in points if p.get("chosen")), points[0]["id"] if points else None)
    fp = next((p for p in points if p["id"] == "fp"), None)
    data = {
        "format": "qsched-report", "version": 1,
        "title": f"{manifest.get('source', {}).get('model', 'artifact')} · {manifest.get('bits', '?')}",
        "created": manifest.get("created"),
        "summary": summary_rows(manifest, points, chosen),
        "quality": _quality_axis(measured),
        "axes": [{"key": "macs", "label": "MACs per image (whole sampling run)", "format": "macs"},
                 {"key": "latency_s", "label": _latency_label(measured), "format": "seconds"},
                 {"key": "size_bytes", "label": "denoiser size (FP as BF16)", "format": "bytes"}],
        "points": points,
        "chosen": chosen,
        "samples": {"prompts": list((measured or {}).get("sample_prompts", [])),
                    "source": (measured or {}).get("sample_source", ""),
                    "fp_images": list(fp.get("images", [])) if fp else []},
        "bit_plan": bit_plan_grid(manifest.get("bit_plan", {}), (measured or {}).get("layer_order")),
        "cache_layout": _cache_layout(points),
        "coefficients": coefficients(manifest),
        "notes": notes,
    }
    return data


# --- reading ----------------------------------------------------------------------------------------


def _read_listed(path: Path, manifest: dict, rel: str) -> bytes | None:
    """A file listed in the manifest, checked against its sha256; None when it is not listed."""
    entry = manifest.get("files", {}).get(rel)
    if entry is None:
        return None
    try:
        raw = (path / rel).read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read {path / rel}: {err.strerror or err}") from err
    if hashlib.sha256(raw).hexdigest() != entry["sha256"].lower():
        raise ArtifactError(f"corrupt or truncated: {rel} sha256 mismatch; re-export or re-download the artifact {path}")
    return raw


def _read_json(path: Path, manifest: dict, rel: str) -> dict | None:
    raw = _read_listed(path, manifest, rel)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"corrupt artifact {path}: {rel} is not valid JSON ({err}); re-export it") from err


def _images(path: Path, manifest: dict, rels: list[str]) -> list[str]:
    out = []
    for rel in rels:
        raw = _read_listed(path, manifest, rel)
        if raw is None:
            raise ArtifactError(f"corrupt artifact {path}: {DATA_FILE} names {rel}, which the manifest does not "
                                "list; re-export it")
        out.append(data_uri(raw))
    return out


# --- points -----------------------------------------------------------------------------------------


def _points_from_front(manifest: dict) -> list[dict]:
    """Points of an artifact without report data: the front as the search scored it, or the artifact."""
    front = (manifest.get("cache") or {}).get("pareto_front") or {}
    chosen = (manifest.get("stages", {}).get("cache_search") or {}).get("chosen")
    points = [{"id": f"front-{i}", "label": f"front point {i} ({p['mac_fraction']:.0%} MACs)", "kind": "front",
               "variant": "compiled", "chosen": i == chosen, "measured": True, "reason": "",
               "schedule": p.get("schedule"), "quality": p["quality"], "search_quality": p["quality"],
               "macs": p["macs"], "mac_fraction": p["mac_fraction"]} for i, p in enumerate(front.get("points", []))]
    return points or [{"id": "compiled", "label": "compiled artifact", "kind": "compiled", "variant": "compiled",
                       "chosen": True, "measured": False, "reason": "no report data in this artifact",
                       "schedule": (manifest.get("cache") or {}).get("schedule")}]


def _complete_point(path: Path, manifest: dict, point: dict, size: dict) -> None:
    """Sizes from the manifest, images as data URIs, the schedule as a steps × blocks grid."""
    if point.get("size_bytes") is None:
        key = {"fp": "denoiser_bf16_bytes", "compiled": "artifact_denoiser_bytes"}.get(point.get("variant"))
        point["size_bytes"] = size.get(key) if key else None
    point["images"] = _images(path, manifest, point.get("images") or [])
    schedule = point.get("schedule")
    point["schedule"] = schedule_grid(schedule) if schedule else None


def schedule_grid(schedule: dict) -> dict:
    """A cache schedule (``CacheSchedule.to_dict()``) as ``reused[step][block]`` = the reused components."""
    blocks = [b["name"] for b in schedule["blocks"]]
    reused = [[[] for _ in blocks] for _ in range(schedule["steps"])]
    for b, name in enumerate(blocks):
        for component, steps in schedule.get("reuse", {}).get(name, {}).items():
            for step in steps:
                reused[step][b].append(component)
    return {"steps": schedule["steps"], "blocks": blocks,
            "components": [list(b["components"]) for b in schedule["blocks"]], "reused": reused}


def _cache_layout(points: list[dict]) -> dict | None:
    grid = next((p["schedule"] for p in points if p.get("schedule")), None)
    return {k: grid[k] for k in ("steps", "blocks", "components")} if grid else None


# --- bit plan, coefficients -------------------------------------------------------------------------


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def split_layer(name: str) -> tuple[str, str]:
    """A layer's module path as (block, layer within the block); layers outside numbered blocks share a row."""
    match = _BLOCK.match(name)
    return (match.group(1), match.group(2)) if match else (OUTSIDE_BLOCKS, name)


def bit_plan_grid(plan: dict, order: list[str] | None = None) -> dict:
    """The BitPlan as a blocks × layers grid of cells ``{name, w, a, reason, group, params}`` (None: no layer).

    Rows and columns follow ``order`` (module order, recorded at compile time) where it names a layer,
    else the natural order of the names; layers outside numbered blocks share the last row."""
    layers = plan.get("layers", {})
    rank = {name: i for i, name in enumerate(order or [])}
    names = sorted(layers, key=lambda n: (split_layer(n)[0] == OUTSIDE_BLOCKS, rank.get(n, len(rank)), _natural(n)))
    blocks, columns = [], []
    for name in names:
        block, layer = split_layer(name)
        if block not in blocks:
            blocks.append(block)
        if layer not in columns:
            columns.append(layer)
    cells = [[None] * len(columns) for _ in blocks]
    for name in names:
        block, layer = split_layer(name)
        lp = layers[name]
        cells[blocks.index(block)][columns.index(layer)] = {
            "name": name, "w": lp.get("weight_bits"), "a": lp.get("act_bits"), "reason": lp.get("reason", ""),
            "group": lp.get("group", ""), "params": lp.get("params", 0)}
    return {"method": plan.get("method", ""), "target": plan.get("target", ""), "blocks": blocks, "layers": columns,
            "cells": cells, "fp_weights": sum(lp.get("weight_bits") is None for lp in layers.values()),
            "fp_acts": sum(lp.get("act_bits") is None for lp in layers.values()), "count": len(layers)}


def coefficients(manifest: dict) -> dict | None:
    """Q-Sched's per-step c^x and c^ε: applied ones from the scheduler, else the learned-but-kept-identity ones."""
    stage = manifest.get("stages", {}).get("coefficients") or {}
    applied = (manifest.get("scheduler") or {}).get("coefficients")
    coeffs = applied or stage.get("coefficients")
    base = {"status": stage.get("status", "unknown"), "reason": stage.get("reason", ""), "applied": bool(applied),
            "heldout_jaq": stage.get("heldout_jaq"), "identity_heldout_jaq": stage.get("identity_heldout_jaq")}
    if not coeffs:
        return {**base, "steps": 0, "cx": [], "ce": []}
    return {**base, "steps": coeffs["steps"], "cx": list(coeffs["cx"]), "ce": list(coeffs["ce"])}


# --- summary ----------------------------------------------------------------------------------------


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def fmt_macs(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("TMAC", 1e12), ("GMAC", 1e9), ("MMAC", 1e6), ("kMAC", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} MAC"


def summary_rows(manifest: dict, points: list[dict], chosen_id: str | None) -> list[dict]:
    """The summary table as (label, text) rows: size, compression, MACs saved, quality vs FP, timings, versions."""
    size = manifest.get("metrics", {}).get("size", {})
    fidelity = manifest.get("metrics", {}).get("fidelity", {})
    chosen = next((p for p in points if p["id"] == chosen_id), {})
    fp = next((p for p in points if p["id"] == "fp"), {})
    files = manifest.get("files", {})
    rows = [("Model", f"{manifest.get('source', {}).get('model', '?')} ({manifest.get('source', {}).get('kind', '?')})"),
            ("Bits", f"{manifest.get('bits', '?')}, {manifest.get('bit_plan', {}).get('method', '?')}"),
            ("Artifact size", f"{fmt_bytes(size.get('artifact_denoiser_bytes'))} denoiser, "
                              f"{fmt_bytes(sum(f['bytes'] for f in files.values()))} on disk"),
            ("Compression ratio", f"{size['compression_vs_bf16']:.2f}× vs BF16 ({fmt_bytes(size.get('denoiser_bf16_bytes'))})"
             if "compression_vs_bf16" in size else "n/a")]
    fraction = chosen.get("mac_fraction")
    rows.append(("MACs saved", f"{1 - fraction:.1%} ({fmt_macs(chosen.get('macs'))} per image)"
                 if fraction is not None else "n/a (no MAC count for this denoiser)"))
    quality = []
    if chosen.get("quality") is not None and fp.get("quality"):
        quality.append(f"quality {chosen['quality']:.3f} vs FP {fp['quality']:.3f} ({chosen['quality'] / fp['quality']:.1%})")
    if "psnr_vs_fp" in fidelity:
        quality.append(f"PSNR {fidelity['psnr_vs_fp']:.1f} dB, SSIM {fidelity['ssim_vs_fp']:.3f} on "
                       f"{len(manifest.get('eval_prompts', []))} eval prompts")
    if "accuracy" in fidelity:
        quality.append(f"judged accuracy {fidelity['accuracy']:.0%} vs FP {fidelity['fp_accuracy']:.0%}")
    rows.append(("Quality vs FP", "; ".join(quality) or "not measured"))
    if chosen.get("latency_s") is not None and fp.get("latency_s"):
        rows.append(("Latency", f"{chosen['latency_s'] * 1e3:.1f} ms vs FP {fp['latency_s'] * 1e3:.1f} ms "
                                f"(FP time / chosen point's time: {fp['latency_s'] / chosen['latency_s']:.2f}×)"))
    timings = manifest.get("timings_s", {})
    if timings:
        rows.append(("Compile time", f"{sum(timings.values()):.1f} s (" +
                     ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ")"))
    stages = manifest.get("stages", {})
    rows.append(("Stages", "; ".join(f"{k}: {v.get('status', '?')}" + (f" ({v['reason']})" if v.get("reason") else "")
                                     for k, v in stages.items())))
    rows.append(("Versions", ", ".join(f"{k} {v}" for k, v in manifest.get("tools", {}).items())))
    rows.append(("Created", str(manifest.get("created", "?"))))
    return [{"label": k, "value": v} for k, v in rows]


def _quality_axis(measured: dict | None) -> dict:
    note = (measured or {}).get("quality") or {}
    if note.get("measured"):
        return {"measured": True, "label": f"quality ({note.get('scorer', 'scorer')} + fidelity to FP)",
                "description": f"{note['formula']}; w = {note['fidelity_weight']}, cap = {note['psnr_cap']} dB, "
                               f"{note['prompts']} prompts"}
    if measured is None:
        return {"measured": True, "label": "quality (cache search)",
                "description": "the cache search's own quality: the scorer's content score + fidelity to the uncached compiled model"}
    return {"measured": False, "label": "quality", "description": note.get("reason", "not measured")}


def _latency_label(measured: dict | None) -> str:
    lat = (measured or {}).get("latency") or {}
    if not lat:
        return "latency (s)"
    return f"latency (s): {lat['batch']} sample images, median of {lat['repeats']} on {lat['device']}"
