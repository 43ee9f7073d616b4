"""Metric-decoupled layer sensitivity (MixDQ): quantize one layer at a time and measure the damage.

Every candidate width is tried on one layer while the rest of the model stays in floating point, for
weights and activations separately. The metric depends on the layer's role (its adapter group):

- content layers (text/cross-attention, feed-forward) change *what* is drawn, so they are scored by the
  SSIM of the final images against the FP images (a full sampler run per evaluation);
- quality layers change *how cleanly* it is drawn, so they are scored by the SQNR (dB) of the denoiser
  output against the FP output, averaged over the sampler steps.

Savings over a plain implementation of MixDQ:

- all calibration prompts go through the pipeline as one batch (``batch_size=None``);
- quality layers never run the sampler: the FP run records the denoiser's inputs and outputs at every
  step, and the perturbed denoiser is replayed on those inputs alone (no text encoders, no VAE, and each
  step starts from the FP trajectory, so it measures this layer's own error rather than compounded drift);
- a quality probe skips the blocks that finish before the probed layer first runs: they compute exactly
  what they computed without the perturbation, so their recorded outputs stand in for them
  (:class:`_BlockPrefix`; on FLUX's 57 blocks about half the denoiser per probe);
- one FP run yields the trajectory, the reference images, the activation ranges (when none are given)
  and each layer's MACs;
- the table is cached in a work folder under a hash of everything that determines it, written after
  every layer, so a rerun is free and a killed run resumes where it stopped.

Beyond MixDQ, ``context`` measures each layer *around the operating point* instead of around FP: the other
layers sit at given widths (normally uniform round-to-nearest at the budget) while one layer is probed, and
scores are still taken against FP. One layer's damage measured with the rest in FP under-predicts what it
does in a quantized model (on flux-tiny, 2-bit layers that looked almost free alone cost 5 points
together); around the operating point the table's differences are what a change of one layer's width does
to the model that will actually run.

With ``format="fp8"`` a layer has one candidate, FP8 e4m3 on both sides (W8A8, as
``QuantLayer.from_module(..., 8, 8, range, format="fp8")`` builds it): MixDQ then chooses between FP8 and
floating point per layer (:func:`calibrate.mixdq.mixdq_plan`). The probe quantizes weights and activations
together, since an FP8 layer is FP8 on both sides, and its score is stored as the layer's ``weight[8]``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import time
import contextlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qsched.models.adapters import adapter_for
from qsched.core.errors import QschedError
from qsched.runtime.generation import GenerationSettings, generate

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import QuantLayer
from calibrate.statistics import observe_inputs
from calibrate.uniform import group_size_for

CACHE_VERSION = 1
MAX_SQNR_DB = 150.0  # a bit-exact output would be +inf dB; capped so tables stay plain JSON
GROUP_METRIC = {"content": "ssim"}  # every other group is scored by SQNR


def metric_for_group(group: str) -> str:
    return GROUP_METRIC.get(group, "sqnr")


@dataclass
class LayerSensitivity:
    """One layer's scores (higher is better) per candidate width, weights and activations separately."""

    group: str
    params: int
    metric: str                                   # "ssim" (content) or "sqnr" (quality, dB)
    weight: dict[int, float] = field(default_factory=dict)
    act: dict[int, float] = field(default_factory=dict)
    macs: float = 0.0                             # multiply-accumulates per image per denoiser call

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weight"] = {str(k): v for k, v in sorted(self.weight.items())}
        data["act"] = {str(k): v for k, v in sorted(self.act.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerSensitivity":
        data = dict(data)
        data["weight"] = {int(k): float(v) for k, v in data.get("weight", {}).items()}
        data["act"] = {int(k): float(v) for k, v in data.get("act", {}).items()}
        return cls(**data)


@dataclass
class SensitivityTable:
    """Per-layer sensitivities by module path, the widths tried, and what the analysis cost."""

    layers: dict[str, LayerSensitivity] = field(default_factory=dict)
    weight_widths: list[int] = field(default_factory=list)
    act_widths: list[int] = field(default_factory=list)
    key: str = ""
    stats: dict = field(default_factory=dict)
    #: "int", or "fp8": each layer's ``weight[8]`` is its FP8 W8A8 score (weights and activations together)
    format: str = "int"

    def to_dict(self) -> dict:
        data = {"key": self.key, "weight_widths": list(self.weight_widths), "act_widths": list(self.act_widths),
                "layers": {n: l.to_dict() for n, l in sorted(self.layers.items())}, "stats": dict(self.stats)}
        if self.format != "int":  # omitted when unused, as in LayerPlan.to_dict
            data["format"] = self.format
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityTable":
        return cls(layers={n: LayerSensitivity.from_dict(l) for n, l in data.get("layers", {}).items()},
                   weight_widths=[int(w) for w in data.get("weight_widths", [])],
                   act_widths=[int(a) for a in data.get("act_widths", [])],
                   key=data.get("key", ""), stats=dict(data.get("stats", {})), format=data.get("format", "int"))

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary sibling, then rename): a killed run never leaves half a table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------- keys

def model_state_digest(pipe) -> str:
    """A hash of every module's weights and the scheduler config: what sampling depends on.

    Linear in model size (tens of seconds for FLUX), negligible next to the analysis it keys; callers
    that already know a content hash (the artifact's weight hashes) pass ``model_digest`` instead.
    """
    h = hashlib.blake2b(digest_size=16)
    components = getattr(pipe, "components", None) or {"denoiser": adapter_for(pipe).denoiser(pipe)}
    for cname in sorted(components):
        comp = components[cname]
        h.update(cname.encode())
        if isinstance(comp, nn.Module):
            for pname, tensor in sorted(comp.state_dict().items()):
                h.update(f"{pname}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                h.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
        elif cname == "scheduler" and comp is not None:
            h.update(json.dumps(dict(comp.config), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(model_digest, prompts, weight_widths, act_widths, settings, seed, batch_size, group_size,
               groups, act_ranges, momentum, image_metric, fp_tokens=None, weight_scale="max", context=None,
               rounding_key=None, format="int") -> str:
    ranges = ({k: [float(v) for v in r] for k, r in sorted(act_ranges.items())} if act_ranges is not None
              else f"observed(momentum={momentum})")
    inputs = {"version": CACHE_VERSION, "model": model_digest, "prompts": list(prompts),
              "weight_widths": sorted(weight_widths), "act_widths": sorted(act_widths),
              "settings": settings.to_dict(), "seed": seed, "batch_size": batch_size, "group_size": group_size,
              "groups": dict(sorted((groups or {}).items())), "act_ranges": ranges,
              "image_metric": "judge.ssim" if image_metric is None else
              f"{getattr(image_metric, '__module__', '')}.{getattr(image_metric, '__qualname__', repr(image_metric))}"}
    if fp_tokens:  # only when used, so keys of tables measured without FP rows stay what they were
        inputs["fp_tokens"] = {n: list(t.positions) for n, t in sorted(fp_tokens.items())}
    if weight_scale != "max":  # likewise
        inputs["weight_scale"] = weight_scale
    if context:  # likewise
        inputs["context"] = {n: list(w) for n, w in sorted(context.items())}
    if rounding_key:  # likewise
        inputs["rounding"] = rounding_key
    if format != "int":  # likewise
        inputs["format"] = format
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------- FP record

def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _output_tensor(output) -> torch.Tensor:
    """The prediction in a denoiser's output (a tensor, a ``(tensor, ...)`` tuple, or ``.sample``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _output_tensor(output[0])
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"cannot find the prediction in a denoiser output of type {type(output).__name__}")


def _batch_of(args, kwargs) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


@dataclass
class _Reference:
    """What the FP run leaves behind for the perturbed runs to be compared with."""

    calls: list = field(default_factory=list)        # (args, kwargs, output) per denoiser call
    images: torch.Tensor | None = None
    ranges: dict = field(default_factory=dict)
    macs: dict = field(default_factory=dict)
    seconds: float = 0.0


def _layer_macs(module: nn.Module, inputs, output) -> int:
    x = inputs[0]
    if isinstance(module, nn.Linear):
        return (x.numel() // module.in_features) * module.weight.numel()
    return (output.numel() // output.shape[1]) * module.weight.numel()  # conv: output positions x kernel MACs


def _fp_reference(pipe, denoiser, prompts, settings, seed, batch_size, layers, observe_ranges, momentum,
                  exclude_rows=None) -> _Reference:
    """One FP sampler run that records every denoiser call, the images, and the layers' ranges and MACs."""
    ref = _Reference()
    macs = {name: 0 for name in layers}
    batch_total = [0]

    def pre(_module, args, kwargs):
        clone = lambda t: t.detach().clone()  # noqa: E731
        ref.calls.append([_map_tensors(args, clone), _map_tensors(kwargs, clone), None])
        batch_total[0] += _batch_of(args, kwargs)

    def post(_module, _args, _kwargs, output):
        ref.calls[-1][2] = _output_tensor(output).detach().clone()

    handles = [denoiser.register_forward_pre_hook(pre, with_kwargs=True),
               denoiser.register_forward_hook(post, with_kwargs=True)]
    for name, module in layers.items():
        handles.append(module.register_forward_hook(
            lambda m, i, o, n=name: macs.__setitem__(n, macs[n] + _layer_macs(m, i, o))))
    t0 = time.perf_counter()
    try:
        with observe_inputs(layers if observe_ranges else {}, momentum, exclude_rows) as observers:
            ref.images = generate(pipe, prompts, settings, seed=seed, batch_size=batch_size)
        ref.ranges = {n: o.range for n, o in observers.items() if o.calls}
    finally:
        for h in handles:
            h.remove()
    ref.seconds = time.perf_counter() - t0
    ref.macs = {n: m / max(batch_total[0], 1) for n, m in macs.items()}
    return ref


# -------------------------------------------------------------------------------------------- scores

def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10·log10(Σ ref² / Σ (ref − test)²), in fp32, capped at :data:`MAX_SQNR_DB`."""
    ref, test = reference.float(), test.float()
    noise = float((ref - test).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise <= 0.0:
        return MAX_SQNR_DB
    return min(MAX_SQNR_DB, 10.0 * math.log10(max(signal, 1e-30) / noise))


def _default_image_metric() -> Callable:
    from qsched.metrics import ssim
    return ssim


@contextmanager
def _eval_mode(pipe):
    """Sample with dropout off (a freshly constructed pipeline is in training mode; T5 has dropout), then
    restore each module's flag: scores must compare deterministic runs."""
    modules = [c for c in (getattr(pipe, "components", None) or {}).values() if isinstance(c, nn.Module)]
    modes = [{m: m.training for m in comp.modules()} for comp in modules]
    try:
        for comp in modules:
            comp.eval()
        yield
    finally:
        for flags in modes:
            for m, flag in flags.items():
                m.training = flag


@contextmanager
def _swapped(denoiser: nn.Module, name: str, original: nn.Module, replacement: nn.Module):
    """Put ``replacement`` at ``name`` for the block; the original module object always comes back."""
    set_submodule(denoiser, name, replacement)
    try:
        yield
    finally:
        set_submodule(denoiser, name, original)


@contextmanager
def _swapped_all(denoiser: nn.Module, replacements: dict[str, nn.Module]):
    """Put every replacement in place for the block; the original modules always come back."""
    originals = {name: denoiser.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            set_submodule(denoiser, name, module)
        yield
    finally:
        for name, module in originals.items():
            set_submodule(denoiser, name, module)


def _select(all_layers: dict[str, nn.Module], patterns: Iterable[str] | None) -> dict[str, nn.Module]:
    if patterns is None:
        return dict(all_layers)
    patterns = list(patterns)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_layers)]
    if unmatched:
        raise QschedError(f"layer filter matched no quantizable layer: {unmatched[:5]}")
    return {n: m for n, m in all_layers.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


# ------------------------------------------------------------------------------------ block prefix

def repeated_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The denoiser's repeated blocks: every entry of its top-level ``nn.ModuleList`` attributes (FLUX's double
    and single blocks, PixArt's blocks, a UNet's down and up blocks)."""
    return [block for child in denoiser.children() if isinstance(child, nn.ModuleList) for block in child]


class _BlockPrefix:
    """Recorded block outputs that stand in for the blocks a probe cannot change.

    A block that finishes before the probed layer's first call in a denoiser call cannot depend on that
    layer: its inputs were computed before the layer ran. With the same call inputs and the same other layers
    it computes bit for bit what it computed in the recording run, so a probe may return the recorded output
    instead (a copy: later code may work in place). The record waits in host memory, like the GPTQ Hessians
    (FLUX.1 at 1024², 8 prompts × 4 steps: about 50 GB), and each stand-in copies its output back to the
    device it was made on. The recording replays every call once with the model as
    the probes will see it (the context layers in place); per call it keeps each block's output and, per
    layer, how many blocks had finished at that layer's first call. A block called twice in one denoiser call,
    or a block whose output holds no tensor, disables the prefix (every probe then runs the whole denoiser).
    ``max_bytes`` bounds the record: blocks are recorded in the order they finish while every call's outputs
    of them fit (sized on the first call), and a probe skips at most those.
    """

    def __init__(self, denoiser: nn.Module, layers: dict[str, nn.Module], calls: list, max_bytes: int | None = None):
        self.denoiser, self.blocks, self.max_bytes = denoiser, repeated_blocks(denoiser), max_bytes
        self.depth = 0  # how many blocks (in the order they finish) are recorded: at most this many are skipped
        self.outputs: list[list] = []          # per call: block outputs in the order they finished
        self.finished_before: list[dict] = []  # per call: layer -> blocks finished at its first call
        self.order: list[list[int]] = []       # per call: block indices in the order they finished
        self.valid, self.device = bool(self.blocks), None
        if self.valid:
            self._record(layers, calls)
        self.call = 0

    def _record(self, layers, calls) -> None:
        outputs, finished, order = [], {}, []

        def block_done(index):
            def hook(_module, _inputs, output):
                if index in order:
                    self.valid = False
                order.append(index)
                if self.device is None:
                    self.device = next((t.device for t in _tensor_leaves(output)), None)
                if len(order) <= self.depth:
                    outputs.append(_map_tensors(output, lambda t: t.detach().to("cpu", copy=True)))
            return hook

        def layer_start(name):
            def hook(_module, _inputs):
                finished.setdefault(name, len(order))
            return hook

        handles = [b.register_forward_hook(block_done(i)) for i, b in enumerate(self.blocks)]
        handles += [m.register_forward_pre_hook(layer_start(n)) for n, m in layers.items()]
        try:
            with torch.inference_mode():
                self.depth = len(self.blocks)
                for i, (args, kwargs, _) in enumerate(calls):
                    outputs, finished, order = [], {}, []
                    self.denoiser(*args, **kwargs)
                    if i == 0:  # the first call sizes every block's output: keep the prefix that fits
                        outputs = outputs[:self._depth_within(outputs, len(calls))]
                        self.depth = len(outputs)
                    self.outputs.append(outputs)
                    self.finished_before.append(finished)
                    self.order.append(order)
        finally:
            for h in handles:
                h.remove()
        if any(not _has_tensor(o) for per_call in self.outputs for o in per_call):
            self.valid = False
        if not self.valid:
            self.outputs = []

    def _depth_within(self, outputs: list, calls: int) -> int:
        if self.max_bytes is None:
            return len(outputs)
        used = 0
        for depth, output in enumerate(outputs):
            used += calls * sum(t.numel() * t.element_size() for t in _tensor_leaves(output))
            if used > self.max_bytes:
                return depth
        return len(outputs)

    def _skips(self, name: str, call: int) -> int:
        return min(self.finished_before[call].get(name, 0), self.depth)

    def skipped(self, name: str) -> float:
        """The fraction of block calls a probe of ``name`` skips (over all recorded calls)."""
        if not self.valid:
            return 0.0
        total = sum(len(o) for o in self.order)
        return sum(self._skips(name, i) for i in range(len(self.order))) / max(total, 1)

    @contextmanager
    def skipping(self, name: str):
        """While active, the blocks that finish before ``name``'s first call return their recorded outputs for
        call :attr:`call` (set it before each denoiser call)."""
        if not self.valid or not any(self._skips(name, i) for i in range(len(self.order))):
            yield
            return
        patched = []

        def stand_in(index):
            def forward(*_args, **_kwargs):
                position = self.order[self.call].index(index)
                return _map_tensors(self.outputs[self.call][position], lambda t: t.to(self.device, copy=True))
            return forward

        try:
            for index, block in enumerate(self.blocks):
                if all(index in o[:self._skips(name, i)] for i, o in enumerate(self.order)):
                    block.forward = stand_in(index)
                    patched.append(block)
            yield
        finally:
            for block in patched:
                del block.forward


def _tensor_leaves(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensor_leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensor_leaves(o)


def _has_tensor(obj) -> bool:
    return next(_tensor_leaves(obj), None) is not None


# ---------------------------------------------------------------------------------------------- main

def _zero_stats() -> dict:
    return {"evaluations": 0, "content_evaluations": 0, "quality_evaluations": 0, "seconds": 0.0,
            "content_seconds": 0.0, "quality_seconds": 0.0}


class _Probe:
    """Scores one-layer perturbations against the FP reference and counts what that costs."""

    def __init__(self, pipe, denoiser, prompts, settings, seed, batch_size, ref: _Reference, metric_fn):
        self.pipe, self.denoiser, self.prompts, self.settings = pipe, denoiser, prompts, settings
        self.seed, self.batch_size, self.ref, self.metric_fn = seed, batch_size, ref, metric_fn
        self.stats = _zero_stats()
        self.prefix: _BlockPrefix | None = None  # set once the model the probes see is in place

    def _prefix_of(self, name: str):
        return self.prefix.skipping(name) if self.prefix is not None else contextlib.nullcontext()

    def score(self, name: str, original: nn.Module, replacement: nn.Module, metric: str) -> float:
        t0 = time.perf_counter()
        with _swapped(self.denoiser, name, original, replacement):
            if metric == "ssim":  # the whole sampler: content errors show in the final image
                images = generate(self.pipe, self.prompts, self.settings, seed=self.seed, batch_size=self.batch_size)
                value = float(torch.as_tensor(self.metric_fn(images, self.ref.images)).float().mean())
            else:  # the denoiser alone, replayed on the FP trajectory's inputs, from the probed layer's block on
                with torch.inference_mode(), self._prefix_of(name):
                    value = 0.0
                    for i, (args, kwargs, out) in enumerate(self.ref.calls):
                        if self.prefix is not None:
                            self.prefix.call = i
                        value += sqnr_db(out, _output_tensor(self.denoiser(*args, **kwargs)))
                    value /= len(self.ref.calls)
        kind = "content" if metric == "ssim" else "quality"
        elapsed = time.perf_counter() - t0
        for key in ("evaluations", f"{kind}_evaluations"):
            self.stats[key] += 1
        for key in ("seconds", f"{kind}_seconds"):
            self.stats[key] += elapsed
        return value


def analyze_sensitivity(pipe, prompts: list[str], settings: GenerationSettings, *,
                        weight_widths: Iterable[int] = (2, 3, 4, 5, 6, 8), act_widths: Iterable[int] = (4, 8),
                        act_ranges: dict[str, tuple[float, float]] | None = None,
                        layers: Iterable[str] | None = None, groups: dict[str, str] | None = None,
                        group_size: int | None = None, seed: int = 0, batch_size: int | None = None,
                        momentum: float = 0.95, work_dir: str | Path | None = None, model_digest: str | None = None,
                        image_metric: Callable | None = None, progress: bool = True, ray=None,
                        pipeline_source=None, fp_tokens: dict | None = None,
                        weight_scale: str = "max", context: dict | None = None, hessians: dict | None = None,
                        hessian_key: str | None = None, record_bytes: int | None = None,
                        format: str = "int") -> SensitivityTable:
    """Score every selected layer at every candidate width, one layer at a time.

    ``layers``: module paths or glob patterns (default: every quantizable layer). ``act_ranges``: static
    activation ranges (as the final model will use); when ``None`` they are observed during the FP run.
    ``batch_size=None`` sends all prompts in one batch. ``image_metric(images, reference)`` returns
    per-image similarities (default: the judge's SSIM). With ``work_dir`` the table is cached there,
    keyed by a hash of the model state (or ``model_digest``), prompts, widths, settings and ranges.
    ``ray`` (a :class:`qsched.distributed.RayConfig`) spreads the layers over Ray workers, each holding the
    model from ``pipeline_source`` (default: this ``pipe`` through the object store); the table is the same.
    ``fp_tokens`` (layer -> :class:`calibrate.fp_tokens.FPTokens`): BOS rows served in FP, as the final
    model will; observed ranges then leave those rows out. ``weight_scale``: the weight quantizer's scale
    (``"max"`` or ``"mse"``, :func:`qsched.runtime.quantizers.weight_scale`), as the final model will use it.
    ``context`` (layer -> (weight bits, act bits), ``None`` = FP): the widths every *other* layer has while a
    layer is probed (default: all FP, MixDQ's setting); a probed layer keeps its context width on the side
    not being probed. Activation widths in the context need ``act_ranges``. ``hessians`` (layer -> input
    ``X^T X``, :func:`calibrate.gptq.collect_hessians`): those layers' weights are probed GPTQ-rounded, as
    the final model will have them; ``hessian_key`` names where the Hessians came from (for the cache key).
    ``record_bytes``: host memory for the block outputs quality probes return instead of recomputing the blocks
    before the probed layer (:class:`_BlockPrefix`; ``None``: no limit, ``0``: none). The scores are identical
    either way, so it is not part of the cache key. ``format="fp8"``: each (linear) layer is probed once at
    FP8 e4m3 W8A8, weights and activations together, and scored as ``weight[8]`` (``weight_widths`` must be
    ``(8,)``, ``act_widths`` empty, no ``context``: with every other layer at FP8, a layer probed at FP8 is
    the operating point itself, so every layer would score the same). The ranges are observed in the FP run
    when ``act_ranges`` is ``None``.
    """
    if format == "fp8" and (sorted(set(weight_widths)) != [8] or list(act_widths) or context):
        raise QschedError("an fp8 sensitivity analysis probes FP8 W8A8 only, around FP: weight_widths (8,), "
                          "no act_widths, no context")
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    all_layers = adapter.quantizable_layers(denoiser)
    quantized = [n for n, m in all_layers.items() if isinstance(m, QuantLayer)]
    if quantized:
        raise QschedError(f"sensitivity analysis needs the full-precision model; {len(quantized)} layer(s) are "
                          f"already quantized, e.g. {quantized[0]}")
    selected = _select(all_layers, layers)
    weight_widths, act_widths = sorted(set(weight_widths)), sorted(set(act_widths))
    prompts = list(prompts)
    batch_size = batch_size or len(prompts)

    table = SensitivityTable(weight_widths=weight_widths, act_widths=act_widths, format=format)
    cache_path = None
    if work_dir is not None:
        table.key = _cache_key(model_digest or model_state_digest(pipe), prompts, weight_widths, act_widths, settings,
                               seed, batch_size, group_size, groups, act_ranges, momentum, image_metric, fp_tokens,
                               weight_scale, context,
                               _gptq_key(hessians, hessian_key), format)
        cache_path = Path(work_dir) / f"sensitivity-{table.key[:16]}.json"
        if cache_path.is_file():
            cached = SensitivityTable.load(cache_path)
            if cached.key == table.key:
                table.layers.update(cached.layers)
    todo = [n for n in selected if n not in table.layers]
    stats = {"layers": len(selected), "layers_cached": len(selected) - len(todo), "layers_computed": len(todo),
             "fp_run_seconds": 0.0}
    probe_stats = _zero_stats()  # stays zero when everything came from the cache
    if todo:
        options = dict(prompts=prompts, settings=settings, layers=todo, groups=groups, weight_widths=weight_widths,
                       act_widths=act_widths, act_ranges=act_ranges, group_size=group_size, seed=seed,
                       batch_size=batch_size, momentum=momentum, image_metric=image_metric, fp_tokens=fp_tokens,
                       weight_scale=weight_scale, context=context, hessians=hessians, record_bytes=record_bytes,
                       format=format)
        bar = tqdm(total=len(todo), desc="sensitivity", unit="layer", disable=not progress, leave=False)
        if ray is None:
            with _eval_mode(pipe):
                run = LayerAnalysis(pipe, **options)
                stats["fp_run_seconds"] = run.ref.seconds
                results = ((name, run.analyze(name)) for name in todo)
                probe_stats = _record(results, table, cache_path, bar)
        else:
            from qsched.distributed import PipelineSource, WorkerPool, connect
            connect(ray)
            source = pipeline_source or PipelineSource.from_pipeline(pipe)
            with WorkerPool(ray, _LayerAnalysisBuilder(source, options), device=str(denoiser.device)) as pool:
                stats["workers"] = len(pool)
                results = ((todo[i], r) for i, r in pool.imap("analyze", todo))
                probe_stats = _record(results, table, cache_path, bar)
        bar.close()
    stats.update(probe_stats)
    for kind in ("", "content_", "quality_"):
        secs = stats[f"{kind}seconds"]
        stats[f"{kind}evaluations_per_second"] = stats[f"{kind}evaluations"] / secs if secs else None
    return SensitivityTable({n: table.layers[n] for n in selected}, weight_widths, act_widths, table.key, stats,
                            format)


def _record(results, table: SensitivityTable, cache_path, bar) -> dict:
    """Store each finished layer (saving the cache after every one: a killed run resumes) and sum the costs."""
    total = _zero_stats()
    for name, (entry, cost) in results:
        table.layers[name] = LayerSensitivity.from_dict(entry)
        for key, value in cost.items():
            total[key] += value
        if cache_path is not None:
            table.save(cache_path)
        bar.update(1)
    return total


class LayerAnalysis:
    """One FP reference run, then any layer's sensitivity on demand: what each worker (or the in-process
    loop) holds. Observed activation ranges depend only on the pipeline, prompts and ``layers``, so every
    worker observes the same ones."""

    def __init__(self, pipe, prompts, settings, layers, groups, weight_widths, act_widths, act_ranges, group_size,
                 seed, batch_size, momentum, image_metric, fp_tokens=None, weight_scale="max", context=None,
                 hessians=None, record_bytes=None, format="int"):
        self.adapter = adapter_for(pipe)
        denoiser = self.adapter.denoiser(pipe)
        all_layers = self.adapter.quantizable_layers(denoiser)
        self.layers = {n: all_layers[n] for n in layers}
        self.groups, self.weight_widths, self.act_widths = groups, weight_widths, act_widths
        self.group_size, self.fp_tokens, self.weight_scale = group_size, dict(fp_tokens or {}), weight_scale
        self.format = format
        need_ranges = (bool(act_widths) or format == "fp8") and act_ranges is None
        self.ref = _fp_reference(pipe, denoiser, prompts, settings, seed, batch_size, self.layers, need_ranges,
                                 momentum, {n: t.positions for n, t in self.fp_tokens.items()})
        self.ranges = self.ref.ranges if need_ranges else (act_ranges or {})
        self.probe = _Probe(pipe, denoiser, prompts, settings, seed, batch_size, self.ref,
                            image_metric or _default_image_metric())
        self.denoiser, self.context, self.hessians = denoiser, dict(context or {}), dict(hessians or {})
        self.base = self._context_layers(all_layers)
        quality = [n for n in self.layers if metric_for_group(self.adapter.layer_group(n, groups)) != "ssim"]
        if quality and record_bytes != 0:
            with _swapped_all(denoiser, self.base):  # recorded as the probes will see the model
                self.probe.prefix = _BlockPrefix(denoiser, {n: denoiser.get_submodule(n) for n in quality},
                                                 self.ref.calls, record_bytes)

    def _context_layers(self, all_layers) -> dict[str, nn.Module]:
        """The operating point's quantized layers (built once; swapped in around each analysis)."""
        base = {}
        for name, (w, a) in sorted(self.context.items()):
            if name not in all_layers:
                raise QschedError(f"sensitivity context names {name!r}, which is not a quantizable layer")
            if w is None and a is None:
                continue
            if a is not None and name not in self.ranges:
                raise QschedError(f"the sensitivity context quantizes {name}'s activations but it has no range")
            module = all_layers[name]
            width = group_size_for(module, self.group_size)
            base[name] = QuantLayer.from_module(module, w, a, self.ranges.get(name) if a is not None else None,
                                                width, self.fp_tokens.get(name), self.weight_scale,
                                                _rounded(module, w, width, self.hessians.get(name), self.weight_scale))
        return base

    def analyze(self, name: str) -> tuple[dict, dict]:
        """``(LayerSensitivity.to_dict(), cost)`` for one layer: plain data, cheap to send back."""
        before = dict(self.probe.stats)
        with _swapped_all(self.denoiser, self.base):
            entry = _analyze_layer(self.probe, name, self.layers[name], self.adapter.layer_group(name, self.groups),
                                   self.weight_widths, self.act_widths, self.ranges, self.group_size,
                                   self.fp_tokens.get(name), self.weight_scale, self.context.get(name, (None, None)),
                                   self.hessians.get(name), self.format)
        return entry.to_dict(), {k: self.probe.stats[k] - before[k] for k in before}


class _LayerAnalysisBuilder:
    """Runs on a Ray worker, once: load the pipeline from ``source`` and make its :class:`LayerAnalysis`."""

    def __init__(self, source, options: dict):
        self.source, self.options = source, options

    def __call__(self) -> LayerAnalysis:
        pipe = self.source.load()
        for comp in (getattr(pipe, "components", None) or {}).values():
            if isinstance(comp, nn.Module):
                comp.eval()
        return LayerAnalysis(pipe, **self.options)


def _analyze_layer(probe: _Probe, name: str, module: nn.Module, group: str, weight_widths, act_widths, ranges,
                   group_size, fp_tokens=None, weight_scale="max", own_context=(None, None),
                   hessian=None, format="int") -> LayerSensitivity:
    """Weights and activations separately, each at every candidate width, the rest of the model as it is
    (FP, or the context's widths); the side not probed stays at ``own_context`` (a BOS-aware layer keeps
    its FP rows, as it will in the final model). ``format="fp8"``: one probe, the layer at FP8 W8A8 (both
    sides at once: an FP8 layer is never FP8 on one side only), scored as ``weight[8]``."""
    metric = metric_for_group(group)
    entry = LayerSensitivity(group=group, params=module.weight.numel(), metric=metric,
                             macs=float(probe.ref.macs[name]))
    if (act_widths or format == "fp8") and name not in ranges:
        raise QschedError(f"no activation range for layer {name}: the calibration runs never reached it")
    here = probe.denoiser.get_submodule(name)  # the context's layer (or the FP module) goes back after each probe
    if format == "fp8":
        if not isinstance(module, nn.Linear):
            raise QschedError(f"{name} is not a linear layer: FP8 covers linear layers only")
        entry.weight[8] = probe.score(name, here, QuantLayer.from_module(
            module, 8, 8, ranges[name], None, fp_tokens, format="fp8"), metric)
        return entry
    width = group_size_for(module, group_size)
    w_ctx, a_ctx = own_context
    a_range = ranges.get(name) if a_ctx is not None else None
    for bits in weight_widths:
        entry.weight[bits] = probe.score(name, here, QuantLayer.from_module(
            module, bits, a_ctx, a_range, width, fp_tokens, weight_scale, _rounded(module, bits, width, hessian, weight_scale)), metric)
    for bits in act_widths:
        entry.act[bits] = probe.score(name, here, QuantLayer.from_module(
            module, w_ctx, bits, ranges[name], width if w_ctx is not None else None, fp_tokens, weight_scale,
            _rounded(module, w_ctx, width, hessian, weight_scale)), metric)
    return entry


def _rounded(module: nn.Module, bits: int | None, group_size: int | None, hessian,
             weight_scale: str = "max") -> tuple | None:
    """GPTQ ``(codes, scales)`` when the layer has a Hessian and quantized weights, else ``None`` (RTN)."""
    from calibrate.gptq import gptq_quantize, uses_gptq

    if hessian is None or not uses_gptq(bits):
        return None
    return gptq_quantize(module.weight, hessian, bits, group_size, scale_method=weight_scale)


def _gptq_key(hessians: dict | None, hessian_key: str | None) -> str | None:
    """What GPTQ probes depend on: where the Hessians came from, which layers have one, the widest GPTQ width."""
    if not hessians:
        return None
    from calibrate.gptq import GPTQ_MAX_BITS

    return f"gptq<={GPTQ_MAX_BITS}:{hessian_key}:{sorted(hessians)}"
