"""Compile-time measurements behind ``report.html``: every operating point and its baselines, measured
the same way, in the same process, on the same prompts and noise.

Why during the compile: the viewer only reads the artifact, but the FP weights, a uniform-RTN copy and
the machine the model runs on exist only while compiling. What is measured is stored in the artifact as
``report/data.json`` plus PNG sample images (covered by the manifest's checksums, never pickled).

The points:

* ``fp``: the source model: no quantization, no cache, its own scheduler;
* ``rtn``: plain per-channel round-to-nearest at the same bits, its own scheduler, no cache; only where
  a second copy of the denoiser is cheap (the recipe's ``report.fp_copy_max_gb``), otherwise recorded
  as not measured, with the reason;
* ``fora-2``, ``fora-3``: FORA every N steps on the compiled model (quantized + Q-Sched);
* ``front-<i>``: every Pareto-front point of the cache search (the compiled model with that schedule),
  the chosen one marked; without a front, one ``compiled`` point: the artifact as written.

Quality (where the model profile has a scorer and the FP copy is kept; otherwise recorded as not measured,
with the reason): the cache search's own evaluator (:class:`cache_search.search.ScheduleQuality`, the
scorer's content score and PSNR fidelity, same prompts and seeds), but with FP's images as the fidelity
reference, so all points share one scale on which FP is the reference. The search's own number (fidelity to the uncached compiled model) is kept as
``search_quality``. MACs come from :class:`cache_search.cost.CostModel` (per image, whole sampling run).

Latency: the generation of the sample prompts (one batch), timed ``repeats`` times per point in
interleaved rounds, so a drift in machine load hits every point alike; the median is reported. With the
FP copy the FP point runs side by side with the others; without it (a large model), FP is timed on the
same prompts at load time. The quantized points are timed, and their sample images drawn, on the runtime a
user deploys (the recipe's ``report.runtime``: ``native`` by default, a twin of the compiled denoiser built
by :func:`export.runtime_torch.to_native_`), compiled as ``report.compile`` says, FP with the same compile;
quality is scored on the simulated layers, which the native ones match to fp32 rounding.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from qsched.report.images import png_bytes

DATA_FILE = "report/data.json"
IMAGE_DIR = "report/images"
FORMAT = "qsched-report-data"
VERSION = 1
FORA_PERIODS = (2, 3)


@dataclass
class _Variant:
    """How to set the pipeline up for a point: which denoiser, which scheduler, which cache schedule."""

    denoiser: object
    scheduler: object
    schedule: object = None


@dataclass
class _Point:
    id: str
    label: str
    kind: str  # "baseline" | "front" | "compiled"
    variant: str  # "fp" | "rtn" | "compiled": which model (the collector takes sizes from it)
    variant_setup: _Variant | None = None  # None: not measured (see reason)
    schedule: object = None
    chosen: bool = False
    reason: str = ""
    record: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """Run in this compile (FP of a real model was run at load time, before quantization)."""
        return self.variant_setup is not None or "latency_s" in self.record

    def to_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "kind": self.kind, "variant": self.variant,
                "chosen": self.chosen, "measured": self.measured, "reason": self.reason, "schedule": self.schedule.to_dict() if self.schedule is not None else None,
                **self.record}


@contextmanager
def configured(pipe, attr: str, variant: _Variant):
    """``pipe`` running ``variant`` for the duration of the block; restored afterwards, whatever happens."""
    from qsched.runtime.caching import enable_cache

    saved = getattr(pipe, attr), pipe.scheduler
    setattr(pipe, attr, variant.denoiser)
    pipe.scheduler = variant.scheduler
    handle = None
    try:
        if variant.schedule is not None:
            handle = enable_cache(pipe, variant.schedule)
        yield pipe
    finally:
        if handle is not None:
            handle.disable()
        setattr(pipe, attr, saved[0])
        pipe.scheduler = saved[1]


def _timed_samples(pipe, prompts, settings, seed: int):
    from qsched.runtime.generation import generate

    start = time.perf_counter()
    images = generate(pipe, prompts, settings, seed=seed, batch_size=max(1, len(prompts)))
    return images, time.perf_counter() - start


class ReportProbe:
    """Collects the report's measurements across a compile: :meth:`begin` at the load stage (FP is still
    in memory), :meth:`finish` at the export stage; ``finish`` returns the files to store."""

    def __init__(self, attr: str, settings, samples: list[str], repeats: int, seed: int, runtime: str = "simulated",
                 compile: str = "off"):
        self.attr, self.settings, self.samples, self.repeats = attr, settings, list(samples), int(repeats)
        self.seed, self.runtime, self.compile = int(seed), runtime, compile
        self.fp: _Variant | None = None  # a copy of the FP model, where it is cheap
        self.fp_record: dict = {}  # FP measured at load (without the copy)
        self.seconds = 0.0

    @classmethod
    def begin(cls, pipe, attr: str, settings, samples: list[str], config, fp_copy: bool, seed: int) -> "ReportProbe":
        """Keep a copy of the FP model (``fp_copy``: it is cheap), or time FP's sample generation now."""
        start = time.perf_counter()
        probe = cls(attr, settings, samples[:config.samples], config.repeats, seed, config.runtime, config.compile)
        if fp_copy:
            probe.fp = _Variant(copy.deepcopy(getattr(pipe, attr)), copy.deepcopy(pipe.scheduler))
        elif probe.samples:
            runs, images = [], None
            for _ in range(probe.repeats):
                images, seconds = _timed_samples(pipe, probe.samples, settings, probe.seed)
                runs.append(seconds)
            probe.fp_record = {"latency_s": statistics.median(runs), "latency_runs": runs,
                               "latency_note": "timed at load, before quantization", "_images": images}
        probe.seconds += time.perf_counter() - start
        return probe

    def finish(self, pipe, spec, act_ranges: dict, cache_record: dict | None, chosen: int | None,
               cache_handle=None, scorer=None, quality_prompts: list[str] | None = None) -> dict[str, bytes]:
        """Measure every point on the compiled ``pipe`` and return ``{artifact path: bytes}`` to store.

        ``cache_record``: the manifest's ``cache`` entry (its ``pareto_front``), ``chosen`` the chosen
        front index, ``cache_handle`` the chosen schedule's live cache (disabled while measuring and
        enabled again afterwards), ``scorer`` the model profile's scorer (None: quality is not measured) and
        ``quality_prompts`` the cache search's prompts.
        """
        from qsched.runtime.caching import enable_cache

        start = time.perf_counter()
        schedule = cache_handle.schedule if cache_handle is not None and cache_handle.active else None
        if schedule is not None:
            cache_handle.disable()
        try:
            data, files = self._measure(pipe, spec, act_ranges, (cache_record or {}).get("pareto_front"), chosen,
                                        scorer, quality_prompts)
        finally:
            if schedule is not None:
                enable_cache(pipe, schedule)
        self.seconds += time.perf_counter() - start
        data["seconds"] = round(self.seconds, 3)
        files[DATA_FILE] = (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
        return files

    # --- the points -------------------------------------------------------------------------------

    def _points(self, pipe, spec, act_ranges, front: dict | None, chosen: int | None) -> list[_Point]:
        from qsched.runtime.cache_schedule import CacheSchedule, block_layout

        compiled = _Variant(getattr(pipe, self.attr), pipe.scheduler)
        points = [_Point("fp", "FP (no quantization, no cache)", "baseline", "fp", self.fp, record=dict(self.fp_record),
                         reason="" if self.fp or self.fp_record else "report.samples is 0: FP was not run again")]
        rtn = self._rtn_variant(spec, act_ranges)
        points.append(_Point("rtn", f"uniform RTN {spec}", "baseline", "rtn", rtn[0], reason=rtn[1]))
        blocks = _layout_or_none(block_layout, pipe)
        for n in FORA_PERIODS:
            sched = CacheSchedule.fora(self.settings.steps, blocks, n) if blocks else None
            reason = "" if sched is not None else "this denoiser has no cacheable block"
            setup = _Variant(compiled.denoiser, compiled.scheduler, sched) if sched is not None else None
            points.append(_Point(f"fora-{n}", f"FORA every {n} (compiled model)", "baseline", "compiled", setup,
                                 sched, reason=reason))
        if front and front.get("points"):
            for i, p in enumerate(front["points"]):
                sched = CacheSchedule.from_dict(p["schedule"])
                live = None if sched.num_reused == 0 else sched
                points.append(_Point(f"front-{i}", f"front point {i} ({p['mac_fraction']:.0%} MACs)", "front",
                                     "compiled", _Variant(compiled.denoiser, compiled.scheduler, live), sched,
                                     chosen=i == chosen, record={"search_quality": p["quality"],
                                                                 "macs": p["macs"], "mac_fraction": p["mac_fraction"]}))
        else:
            points.append(_Point("compiled", "compiled artifact", "compiled", "compiled", compiled, chosen=True))
        return points

    def _rtn_variant(self, spec, act_ranges) -> tuple[_Variant | None, str]:
        if self.fp is None:
            return None, "not measured: the FP denoiser is too large to keep a second copy (the recipe's report.fp_copy_max_gb)"
        if spec.is_fractional:
            return None, f"{spec} is a fractional budget: there is no uniform width to round to"
        from qsched.runtime.apply import quantize_
        from calibrate.uniform import uniform_plan
        from qsched.models.adapters import adapter_for

        denoiser = copy.deepcopy(self.fp.denoiser)
        quantize_(denoiser, uniform_plan(denoiser, adapter_for(denoiser), spec), act_ranges)
        return _Variant(denoiser, self.fp.scheduler), ""

    # --- measuring --------------------------------------------------------------------------------

    def _measure(self, pipe, spec, act_ranges, front, chosen, scorer, quality_prompts) -> tuple[dict, dict]:
        points = self._points(pipe, spec, act_ranges, front, chosen)
        live = [p for p in points if p.variant_setup is not None]
        self._macs(pipe, points)
        quality_note = self._quality(pipe, live, scorer, quality_prompts)
        for p in live:
            if p.variant == "rtn":
                from export.save import denoiser_tensors
                p.record["size_bytes"] = sum(t.numel() * t.element_size()
                                             for t in denoiser_tensors(p.variant_setup.denoiser).values())
        files = self._time_and_image(pipe, points)
        for p in points:
            if "quality" not in p.record and p.measured:
                p.record.setdefault("quality_reason", quality_note.get("reason", "not measured"))
        data = {"format": FORMAT, "version": VERSION, "sample_prompts": self.samples,
                "sample_source": f"the first {len(self.samples)} calibration prompts",
                "seed": self.seed, "settings": self.settings.to_dict(),
                "latency": {"repeats": self.repeats, "statistic": "median", "batch": len(self.samples),
                            "device": str(getattr(pipe, "device", "cpu")), "runtime": self.runtime,
                            "compile": self.compile,
                            "fp": "side by side" if self.fp is not None else "at load, before quantization (eager)"},
                "quality": quality_note, "points": [p.to_dict() for p in points],
                "layer_order": _layer_order(getattr(pipe, self.attr))}
        return data, files

    def _macs(self, pipe, points: list[_Point]) -> None:
        from cache_search.cost import CostModel

        s = self.settings
        try:
            cost = CostModel.for_pipeline(pipe, s)
        except (ValueError, KeyError, TypeError) as err:
            for p in points:
                p.record.setdefault("macs_reason", f"no analytic MAC count for this denoiser ({err})")
            return
        full = cost.no_cache_macs(s.steps)
        for p in points:
            if "macs" not in p.record and p.measured:
                macs = cost.schedule_macs(p.schedule) if p.schedule is not None else full
                p.record.update(macs=macs, mac_fraction=macs / full)

    def _quality(self, pipe, live: list[_Point], scorer, prompts: list[str] | None) -> dict:
        if scorer is None or not prompts:
            return {"measured": False, "reason": "no image scorer for this model (--scorer or the recipe's scorer)"}
        if self.fp is None:
            return {"measured": False, "reason": "the FP denoiser is too large to keep a second copy as the reference"}
        from qsched.runtime.cache_schedule import CacheSchedule, block_layout
        from cache_search.search import schedule_quality

        with configured(pipe, self.attr, self.fp):
            evaluator = schedule_quality(pipe, prompts, self.settings, scorer, seed=self.seed)
        no_cache = CacheSchedule.no_cache(self.settings.steps, block_layout(pipe))
        for p in live:
            if p.variant == "fp":
                metrics = evaluator.reference_metrics
            else:  # one point per call: a point's quality must not depend on which others share its batch
                with configured(pipe, self.attr, _Variant(p.variant_setup.denoiser, p.variant_setup.scheduler)):
                    metrics = evaluator.evaluate_metrics([p.schedule or no_cache])[0]
            p.record.update(quality=metrics["quality"], content_score=metrics["score"], psnr_vs_fp=metrics["psnr"],
                            fidelity=metrics["fidelity"])
        return {"measured": True, "prompts": len(prompts), "fidelity_weight": evaluator.fidelity_weight,
                "psnr_cap": evaluator.psnr_cap, "scorer": scorer.kind,
                "formula": f"(1 - w) * {scorer.kind} content score + w * mean(min(PSNR vs FP, cap) / cap), "
                           "the cache search's evaluator with FP as the reference"}

    def _time_and_image(self, pipe, points: list[_Point]) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        if not self.samples:
            return files
        live = [p for p in points if p.variant_setup is not None]
        deployed = self._deployed({p.id: p.variant_setup for p in live})
        runs: dict[str, list[float]] = {p.id: [] for p in live}
        images: dict[str, object] = {}
        if self.compile != "off":  # the first call of each point pays its compile: not timed
            for p in live:
                with configured(pipe, self.attr, deployed[p.id]):
                    _timed_samples(pipe, self.samples, self.settings, self.seed)
        for _ in range(self.repeats):
            for p in live:
                with configured(pipe, self.attr, deployed[p.id]):
                    imgs, seconds = _timed_samples(pipe, self.samples, self.settings, self.seed)
                runs[p.id].append(seconds)
                images.setdefault(p.id, imgs)
        for p in live:
            p.record.update(latency_s=statistics.median(runs[p.id]), latency_runs=runs[p.id])
            p.record.setdefault("latency_note", self._latency_note(p.variant != "fp"))
        fp = next(p for p in points if p.id == "fp")
        if "_images" in fp.record:
            images["fp"] = fp.record.pop("_images")
        reference = images.get("fp")
        for p in points:
            if p.id not in images:
                continue
            paths = []
            for k, image in enumerate(images[p.id]):
                path = f"{IMAGE_DIR}/{p.id}-{k}.png"
                files[path] = png_bytes(image)
                paths.append(path)
            p.record["images"] = paths
            if reference is not None:
                from qsched.metrics import psnr
                p.record["sample_psnr_vs_fp"] = [float(v) for v in psnr(images[p.id], reference)]
        return files


    def _deployed(self, setups: dict[str, _Variant]) -> dict[str, _Variant]:
        """Each point's variant with the denoiser a user deploys: the native twin of a quantized denoiser (one
        per distinct denoiser, so the points of one model share it), compiled as configured; FP keeps its
        layers and gets the same compile."""
        from export.loader import compile_denoiser
        from export.runtime_torch import native_layer
        from qsched.runtime.qlayers import QuantLayer, with_fp_tokens

        twins: dict[int, object] = {}
        out = {}
        for pid, setup in setups.items():
            den = setup.denoiser
            if id(den) not in twins:
                layers = [m for m in den.modules() if isinstance(m, QuantLayer)]
                twin = den
                if layers and self.runtime == "native":  # the copy takes each quantized layer's native twin instead
                    twin = copy.deepcopy(den, {id(m): with_fp_tokens(native_layer(m), m) for m in layers})
                if self.compile != "off":
                    twin = copy.deepcopy(twin) if twin is den else twin  # the measured model stays eager
                    compile_denoiser(twin, self.compile)
                twins[id(den)] = twin
            out[pid] = _Variant(twins[id(den)], setup.scheduler, setup.schedule)
        return out

    def _latency_note(self, quantized: bool) -> str:
        compiled = "eager" if self.compile == "off" else f"torch.compile ({self.compile})"
        return f"{self.runtime} runtime, {compiled}" if quantized else f"FP, {compiled}"


def _layer_order(denoiser) -> list[str]:
    """Quantizable layers in execution (module) order: the manifest's JSON is sorted by name."""
    from qsched.models.adapters import adapter_for

    return list(adapter_for(denoiser).quantizable_layers(denoiser))


def _layout_or_none(block_layout, pipe):
    try:
        return block_layout(pipe)
    except ValueError:
        return None
