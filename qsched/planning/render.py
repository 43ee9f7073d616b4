"""The human-readable table of a :class:`qsched.planning.CompilePlan` (``qcompile --plan`` without ``--json``)."""
from __future__ import annotations


def _gb(n) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _n(n) -> str:
    return f"{n:,}"


def _macs(n) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,}"


def render_text(plan) -> str:
    """The plan as a few aligned tables with its warnings and assumptions; plain text, one line per fact."""
    d = plan.to_dict()
    s, a, m, t = d["settings"], d["architecture"], d["memory"], d["time"]
    out = [f"qcompile --plan: {d['model']} {d['bits']}" + (f" (recipe {_shown(d['recipe'])})" if d["recipe"] else
                                                             " (recipe defaults)") + f", --init {d['init']}"
             + (f" --width-scale {d['width_scale']:g}" if d.get("width_scale") else ""),
           f"  architecture  {a['denoiser']} from {a['source']}",
           (f"                {a['denoiser_parameters'] / 1e9:,.3f} B parameters; {a['quantizable_layers']} quantizable "
           f"layers ({a['linear_layers']} linear, {a['conv_layers']} conv), {a['gptq_rounded_layers']} GPTQ-rounded; "
           f"{a['cacheable_blocks']} cacheable blocks ({a['cacheable_components']} components)"),
           f"  settings      {s['steps']} steps, {s['width']}×{s['height']}, guidance {s['guidance_scale']:g}, "
           f"{a['tokens'].get('image', '?')} image + {a['tokens'].get('text', '?')} text tokens; "
           + ("CFG: 2 denoiser passes per step" if s['cfg_passes'] == 2 else "no CFG batch") + f"; {s['denoiser_dtype']}",
           (f"  methods       quantization {d['methods']['quantization']} ({d['methods']['rounding']} rounding), "
           f"Q-Sched {d['methods']['coefficients']}, cache search {d['methods']['cache_search']}"),
           "",
           "denoiser evaluations (sample rows: one image through one denoiser call)"]
    rows = [("stage", "what", "sample rows", "bound", f"time on {t['device']}", "how")]
    for e in d["evaluations"]:
        secs = "" if e["seconds"] is None else _dur(e["seconds"])
        what = e["what"] + (" [denoiser only]" if e["mode"] == "replay" else "")
        rows.append((e["stage"], what, _n(e["sample_rows"]), e["bound"], secs, e["formula"]))
    tot = d["totals"]
    rows.append(("total", "", _n(tot["sample_rows"]), tot["bound"], t["human"], ""))
    out += _table(rows, right=(2, 4))
    cs = d["cache_search"]
    if cs and "candidates" in cs:
        be, dr = cs["block_evaluations"], cs["denoiser_rows"]
        out += ["", "cache search",
                f"  candidates            ≤ {_n(cs['candidates']['full'])} at full fidelity"
                + (f", ≤ {_n(cs['candidates']['proxy'])} on the proxy" if cs["candidates"]["proxy"] else "")
                + f" ({cs['candidates_per_call']} per pipeline call); upper bound: duplicates are not evaluated again",
                (f"  denoiser rows         ≤ {_n(dr['without_sharing'])} without sharing, "
                f"≤ {_n(dr['with_step0_sharing'])} with step 0 shared (counted above)"),
                (f"  block evaluations     ≤ {_n(be['without_sharing'])} without sharing, "
                f"≤ {_n(be['with_step0_sharing'])} with step 0 shared ({cs['cacheable_components']} components per "
                "row); deeper prefix sharing and reuse depend on the genomes")]
    dev = "device" if t["device"] != "cpu" else "host"
    out += ["", f"memory ({m['dtype']})",
            "  components            " + ", ".join(f"{k} {_gb(v)}" for k, v in
                                                  sorted(m["components"].items(), key=lambda kv: -kv[1])),
            (f"  denoiser              {_gb(m['denoiser_bytes'])} FP; {_gb(m['quantized_denoiser_bytes'])} quantized in "
            f"memory; ~{_gb(m['packed_denoiser_bytes'])} packed in the artifact"),
            *([f"  dequantized weights   {_gb(m['dequantized_cache']['bytes'])} of {_gb(m['dequantized_cache']['all_bytes'])} "
               f"kept between calls after calibration (quantization.dequantized_cache_gb "
               f"{m['dequantized_cache']['budget_gb']:g}); the rest dequantize on every call"]
              if m.get("dequantized_cache") else []),
            (f"  GPTQ Hessians         {m['hessians']['groups']} group{'' if m['hessians']['groups'] == 1 else 's'}, largest {_gb(m['hessians']['largest_group_bytes'])}, "
            f"all {_gb(m['hessians']['total_bytes'])}, kept in {m['hessians']['held_in']} "
            f"({m['hessians']['shared_inputs']} layers share their input's); "
            f"GPTQ workspace {_gb(m['hessians']['gptq_workspace_bytes'])}"),
            *([f"  sensitivity record    {_gb(m['sensitivity_prefix_bytes'])} of block outputs, kept in "
               f"{m['sensitivity_prefix_in']} (the probes' skipped blocks return them)"]
              if m.get("sensitivity_prefix_bytes") else []),
            *([f"  text embeddings       {m['text_embeddings']['prompts']} prompts encoded once at load, "
               f"{_gb(m['text_embeddings']['bytes'])}; the text encoders ({_gb(m['text_encoder_bytes'])}) then wait in "
               f"{m['text_embeddings']['text_encoders']}"] if m.get("text_embeddings") else []),
            f"  report FP copy        {m['fp_copy']}",
            f"  per sample row        activations ~{_gb(m['activation_bytes_per_row'])}, cache store "
            f"≤ {_gb(m['cache_store_bytes_per_row'])}; rows per call: "
            + ", ".join(f"{k} {v}" for k, v in m["batch_rows"].items() if v)]
    out.append(f"  working set by phase on the {dev}:")
    width = max(map(len, m["phases"]))
    out += [f"    {phase:<{width}}  {_gb(value):>10}" for phase, value in m["phases"].items()]
    out += [f"  peak {dev} memory    {_gb(m['device_peak_bytes'] if dev == 'device' else m['host_peak_bytes'])}",
            *( [f"  peak host memory      {_gb(m['host_peak_bytes'])}"] if dev == "device" else []),
            f"  ({m['where']})"]
    mac = t["macs_per_evaluation"]
    out += ["", f"time on {t['label']}",
            (f"  throughput            {t['tflops']:.3g} TFLOPS effective {t['dtype']}  ({t['source']})"
             if t.get("measured") else
             f"  throughput            {t['tflops']:g} TFLOPS dense {t['dtype']} × {t['achieved_fraction']:g} achieved"
             f"  ({t['source']})")]
    if mac:
        out.append(f"  MACs per evaluation   {_macs(mac['total'])} ({_macs(mac['linear'])} linear + "
                   f"{_macs(mac['attention'])} attention)")
        out += [f"  {stage:<22}{_dur(sec)}" for stage, sec in t["seconds_by_stage"].items()]
    out.append(f"  total                 {t['human']}")
    if d["warnings"]:
        out += ["", "warnings"] + [f"  - {w}" for w in d["warnings"]]
    out += ["", "assumptions"] + [f"  - {x}" for x in d["assumptions"]]
    return "\n".join(out)


def _shown(path: str) -> str:
    """A path relative to the working directory when it lies below it (the shipped recipes usually do)."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _dur(seconds: float) -> str:
    from qsched.planning.plan import _duration

    return _duration(seconds)


def _table(rows, right=()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines
