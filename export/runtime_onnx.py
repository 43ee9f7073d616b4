"""ONNX runtime: the artifact's quantized denoiser as an ONNX graph, run by onnxruntime inside the pipeline.

:func:`export_onnx` adds ``onnx/`` to an artifact (in place, atomically: :func:`export.amend.add_folder`)::

    onnx/denoiser.onnx              # the graph (see export.onnx_graph for how each layer is carried)
    onnx/denoiser.onnx.data         # its initializers: the artifact's codes and scales, re-laid out
    onnx/denoiser.switched.onnx     # with a cache schedule: every step in one graph (same data file)

Every file is listed in ``manifest.json`` with its sha256, and ``manifest["onnx"]`` records the inputs, the
per-layer forms, which graph runs at which step, and the tool versions. ``export.load(path,
runtime="onnx")`` then returns the artifact's diffusers pipeline with :class:`OnnxDenoiser` as its denoiser:
the pipeline's own ``__call__`` runs, with the artifact's (Q-Sched) scheduler, and the cache schedule is
honoured by :class:`OnnxCacheDriver`.

Why the cache schedule works without hooks inside the graph: the export returns every cached component's
output as an extra graph output (``cache.<slot>.<call>.<part>``), and for each step's set of reused
components a variant graph takes those tensors as *inputs* instead, with everything that only fed them cut
away. The driver tracks steps through the scheduler (as :mod:`qsched.runtime.caching` does), feeds the stored
outputs into the step's graph and stores what later steps reuse. So the reused components really are not
computed, and the numbers equal the torch cached pipeline's.

One graph for all steps (``switched``, the default): the variants are folded into one graph in which
whatever some step skips sits in ``If`` nodes switched by boolean inputs (:func:`export.onnx_graph.switched_graph`),
so a single session serves every step and the uncached call. onnxruntime pre-packs each session's quantized
weights into its own copy and shares pre-packed weights across sessions only through its C API, so one
session per step graph (``switched=False``, the earlier layout, still loaded) adds about 0.6x the weights
per further distinct step. The switched session costs 1.3-1.6x a plain one (weights inside ``If`` branches
seem to stay resident beside their packed copies), so it wins from three distinct steps on
(``benchmarks/onnx_memory.py`` measures both).

Sessions: CPU EP by default; the CUDA EP when the denoiser is placed on a CUDA device and onnxruntime-gpu is
installed (inputs and outputs then go through host memory).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qsched.core.errors import ArtifactError, QschedError

from export.onnx_graph import OUTPUT

FOLDER = "onnx"
KEY = "onnx"
GRAPH = "denoiser.onnx"
SWITCHED = "denoiser.switched.onnx"
DATA = "denoiser.onnx.data"

__all__ = ["export_onnx", "OnnxDenoiser", "OnnxCacheDriver", "require_onnx", "onnx_denoiser", "enable_onnx_cache",
           "make_session", "session_settings", "FOLDER"]


def require_onnx(runtime_only: bool = False) -> None:
    """Import onnx, onnxscript (for export) and onnxruntime, or raise a QschedError saying how to install them."""
    missing = []
    for module in (("onnxruntime",) if runtime_only else ("onnx", "onnxscript", "onnxruntime")):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise QschedError(f"the ONNX runtime needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          "not installed; install them with `pip install 'qsched[onnx]'` (onnxruntime-gpu for the "
                          "CUDA execution provider)")


# -------------------------------------------------------------------------------------------- export


class _Captured(Exception):
    """Raised by the capture hook: the first denoiser call's arguments are all the export needs."""


def capture_call(pipe, manifest: dict, prompts: int = 2) -> dict:
    """The keyword arguments of the pipeline's first denoiser call, with the artifact's generation settings.

    Nothing past the text encoders runs. ``prompts`` > 1 so the batch axis is traced as dynamic.
    """
    from qsched.runtime.cache_schedule import _denoiser
    from qsched.runtime.generation import GenerationSettings, generate

    settings = GenerationSettings(**manifest["generation"])
    texts = list(manifest.get("calibration_prompts") or []) + ["a red circle on the left", "a blue square"]
    denoiser = _denoiser(pipe)
    names = list(inspect.signature(denoiser.forward).parameters)
    captured = {}

    def hook(_module, args, kwargs):
        captured.update(zip(names, args))
        captured.update(kwargs)
        raise _Captured

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(pipe, texts[:prompts], settings, batch_size=prompts)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ArtifactError("the pipeline never called its denoiser; cannot trace it for ONNX")
    # clones made outside inference mode: the tracer cannot use inference tensors
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in captured.items()}


def _graph_name(reuse_slots: tuple[int, ...]) -> str:
    if not reuse_slots:
        return GRAPH
    digest = hashlib.sha256(",".join(map(str, reuse_slots)).encode()).hexdigest()[:10]
    return f"denoiser.reuse-{digest}.onnx"


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_onnx(path, overwrite: bool = False, verify: bool = True, dynamic: bool = True, accuracy_level: int = 0,
                optimize: bool = True, switched: bool = True) -> dict:
    """Add ``onnx/`` to the artifact at ``path`` (see the module docstring); returns the manifest record.

    ``dynamic``: batch and token axes are dynamic where the model allows (else the traced shapes are fixed).
    ``accuracy_level``: MatMulNBits' compute type; 0 computes in fp32 like the simulation, 4 quantizes the
    activations to int8 per block (faster on CPU, not equal to the simulation). ``overwrite`` replaces an
    existing ONNX export. ``switched``: a cache schedule's steps as one graph (one session, one copy of the
    weights); False writes one cut graph per distinct step instead. Raises QschedError without
    onnx/onnxscript/onnxruntime, ArtifactError for a corrupt artifact or an existing export.
    """
    require_onnx()
    import onnx_ir as ir

    from qsched.runtime.cache_schedule import CacheSchedule, _denoiser

    from export.amend import add_folder
    from export.format import read_manifest
    from export.loader import load
    from export.onnx_graph import OPSET, export_graph, reuse_variant, switched_graph

    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    if (KEY in manifest or (path / FOLDER).exists()) and not overwrite:
        raise ArtifactError(f"{path} already has an ONNX export; pass overwrite=True to replace it")
    pipe = load(path, verify=False)
    if getattr(pipe, "qsched_cache", None) is not None:
        pipe.qsched_cache.disable()  # the graph is traced uncached; the schedule is applied by graph variants
    denoiser = _denoiser(pipe)
    call = capture_call(pipe, manifest)

    schedule_record = (manifest.get("cache") or {}).get("schedule")
    schedule = CacheSchedule.from_dict(schedule_record) if schedule_record else None
    slots, cached = [], set()
    if schedule is not None:
        slots = [(i, block, comp) for i, (block, comp) in enumerate(schedule.slots)]
        cached = {int(i) for i in np.flatnonzero(schedule.table.any(axis=0))}
    model, info = export_graph(denoiser, call, slots, cached, dynamic=dynamic, accuracy_level=accuracy_level,
                               optimize=optimize)

    rows = [tuple(int(i) for i in np.flatnonzero(r)) for r in schedule.table] if schedule is not None else []
    patterns = list(dict.fromkeys(rows))
    steps = []
    if rows and not switched:
        steps = [f"{FOLDER}/{_graph_name(row)}" for row in rows]

    def write(folder: Path) -> None:  # add_folder stores ``record`` after this: the switch table goes in here
        ir.save(model, folder / GRAPH, external_data=DATA)
        if not rows:
            return
        import onnx
        full = onnx.load(str(folder / GRAPH), load_external_data=False)  # weights stay in the shared data file
        if switched:
            graph, conditions = switched_graph(full, [set(p) for p in patterns])
            onnx.save(graph, str(folder / SWITCHED))
            record["switched"] = {"graph": f"{FOLDER}/{SWITCHED}", "reuse": [list(r) for r in rows],
                                  "conditions": [conditions[patterns.index(r)] for r in rows]}
            return
        for row in patterns:
            if row:
                onnx.save(reuse_variant(full, set(row)), str(folder / _graph_name(row)))

    attributes = _module_attributes(denoiser)
    record = {"schema": 1, "graph": f"{FOLDER}/{GRAPH}", "opset": OPSET, "dynamic": bool(dynamic),
              "accuracy_level": int(accuracy_level), "inputs": info["inputs"], "constants": info["constants"],
              "input_dtypes": info["input_dtypes"], "outputs": info["outputs"], "slot_calls": info["slot_calls"],
              "steps": steps, "layers": info["layers"],
              "counts": _form_counts(info["layers"]), "session": session_settings(info["layers"], accuracy_level),
              "module_attributes": attributes, "versions": _versions()}
    add_folder(path, FOLDER, write, KEY, record, overwrite=overwrite, verify=False)
    return record


def _form_counts(layers: dict) -> dict:
    counts: dict[str, int] = {}
    for form in layers.values():
        key = form["weight"] + (f"{form['bits']}" if form["weight"] == "matmulnbits" else "")
        counts[key] = counts.get(key, 0) + 1
        if form["act"]:
            counts["act-" + form["act"]] = counts.get("act-" + form["act"], 0) + 1
    return counts


# Module attributes some pipelines read off their denoiser besides ``config`` (SDXL checks its added
# conditioning width against ``unet.add_embedding.linear_1.in_features``).
_ATTRIBUTE_PATHS = ("add_embedding.linear_1.in_features",)


def _module_attributes(denoiser: nn.Module) -> dict:
    from qsched.runtime.qlayers import QuantLayer

    out = {}
    for dotted in _ATTRIBUTE_PATHS:
        owner, _, leaf = dotted.rpartition(".")
        try:
            module = denoiser.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module, QuantLayer) and leaf in ("in_features", "out_features"):
            shape = (module.qweight if module.weight_bits is not None else module.weight).shape
            out[dotted] = int(shape[1] if leaf == "in_features" else shape[0])
        elif isinstance(getattr(module, leaf, None), (int, float, str, bool)):
            out[dotted] = getattr(module, leaf)
    return out


# ------------------------------------------------------------------------------------------- runtime


@dataclass
class _Output:
    sample: torch.Tensor

    def __getitem__(self, i):
        return (self.sample,)[i]


_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


def _diffusers_bases():
    from diffusers import ConfigMixin, ModelMixin
    return ModelMixin, ConfigMixin


class OnnxDenoiser(*_diffusers_bases()):
    """A diffusers denoiser whose forward runs the artifact's ONNX graph with onnxruntime.

    Same call signature and outputs as the class it replaces (``config`` too), so pipelines use it as is; a
    ``ModelMixin`` because pipelines' ``from_pretrained`` only accepts those as denoiser components.
    Sessions are made on first use, one per graph file. Inputs are validated against the traced call: the
    same tensor arguments, and the same non-tensor values (a call the graph was not traced for is refused
    rather than silently computed differently).
    """

    def load_lora_adapter(self, *args, **kwargs):
        """Refused with one line (what ``pipe.load_lora_weights`` calls): the graph's weights are fixed."""
        from export.lora import LoraError
        raise LoraError("a LoRA cannot be loaded into the ONNX runtime, whose graph holds fixed weights; load the "
                        "artifact with runtime='simulated' or 'native' to use LoRAs")

    def __init__(self, root: Path, record: dict, denoiser_info: dict, device: str | torch.device = "cpu",
                 providers: list | None = None, threads: int | None = None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        from export.loader import _diffusers_class

        self.root = Path(root)
        self.record = record
        self._internal_dict = FrozenDict(dict(denoiser_info["config"]))  # what ``.config`` returns
        cls = _diffusers_class(denoiser_info["class"])
        self._signature = inspect.signature(cls.forward)
        self.denoiser_class = denoiser_info["class"]
        self._device = torch.device(device)
        self._explicit_providers = providers is not None
        self.providers = providers if providers is not None else _providers_for(self._device)
        self.threads = threads
        self._sessions: dict[str, object] = {}
        self.cache: OnnxCacheDriver | None = None
        for dotted, value in record.get("module_attributes", {}).items():
            _set_dotted(self, dotted, value)

    # --- what pipelines read off a denoiser -----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' per-branch cache context (FLUX pipelines enter it): nothing to do here."""
        yield

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(()))  # .to(device) / .cuda(): sessions follow the pipeline's device
        if probe.device != self._device:
            if not self._explicit_providers:
                self.providers = _providers_for(probe.device)
            self._sessions.clear()
            self._device = probe.device
        return super()._apply(fn, recurse)

    # --- sessions -----------------------------------------------------------------------------------

    def session(self, graph: str):
        """The onnxruntime session of ``graph`` (a path relative to the artifact, e.g. ``onnx/denoiser.onnx``)."""
        sess = self._sessions.get(graph)
        if sess is None:
            path = self.root / graph
            if not path.is_file():
                raise ArtifactError(f"the ONNX export lacks {graph}; re-export it with export_onnx(overwrite=True)")
            sess = make_session(path, self.record, self.providers, self.threads)
            self._sessions[graph] = sess
        return sess

    # --- forward ------------------------------------------------------------------------------------

    def _feed(self, args, kwargs) -> tuple[dict, torch.Tensor, bool]:
        from export.onnx_graph import canonical_kwargs, flatten_call

        bound = self._signature.bind(None, *args, **kwargs)  # None stands for self
        arguments = dict(bound.arguments)
        arguments.pop("self", None)
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        return_dict = arguments.get("return_dict", True)
        names, tensors, constants, _ = flatten_call(canonical_kwargs(arguments))
        expected = self.record["inputs"]
        if set(names) != set(expected):
            raise ValueError(f"the ONNX denoiser was traced with tensor inputs {expected}, but this call passes "
                             f"{names}; re-export for this kind of call")
        if constants != self.record["constants"]:
            raise ValueError(f"the ONNX denoiser was traced with {self.record['constants'] or 'no non-tensor arguments'},"
                             f" this call passes {constants}; re-export for this kind of call")
        dtypes = self.record["input_dtypes"]
        feed = {}
        for name, t in zip(names, tensors):
            feed[name] = t.detach().to("cpu", getattr(torch, dtypes[name])).numpy()
        return feed, tensors[0], return_dict

    def forward(self, *args, **kwargs):
        feed, first, return_dict = self._feed(args, kwargs)
        if self.cache is not None and self.cache.active:
            sample = self.cache.run(self, feed)
        elif self.record.get("switched"):  # every switch on: the one session the cached steps use too
            session = self.session(self.record["switched"]["graph"])
            sample = _run(session, [OUTPUT], switch_feed(session, feed, None, {}))[0]
        else:
            sample = _run(self.session(self.record["graph"]), [OUTPUT], feed)[0]
        out = torch.from_numpy(sample).to(device=first.device, dtype=first.dtype if first.is_floating_point()
                                          else torch.float32)
        return _Output(out) if return_dict else (out,)

    def extra_repr(self) -> str:
        return f"{self.denoiser_class} as ONNX ({self.record['graph']}), providers={self.providers}"


def _providers_for(device: torch.device) -> list:
    """CPU EP, or the CUDA EP (with CPU for what it lacks) for a CUDA device."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise QschedError("the ONNX denoiser was placed on CUDA but this onnxruntime has no CUDA execution provider; "
                          "install onnxruntime-gpu (pip install onnxruntime-gpu) or use device='cpu'")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def switch_feed(session, feed: dict, conditions: list[bool] | None, stored: dict) -> dict:
    """``feed`` completed for a switched graph: ``run.<g>`` from ``conditions`` (None: compute everything) and
    each ``stored.<slot>.<call>.<part>`` from ``stored`` (keyed by that name), or an empty array where the step
    computes the component."""
    feed = dict(feed)
    for node in session.get_inputs():
        if node.name.startswith("run."):
            group = int(node.name.split(".")[1])
            feed[node.name] = np.array(True if conditions is None else bool(conditions[group]))
        elif node.name.startswith("stored."):
            value = stored.get(node.name)
            feed[node.name] = value if value is not None else np.zeros((0,) * len(node.shape), np.float32)
    return feed


def _run(session, names: list[str], feed: dict) -> list:
    """``session.run`` with onnxruntime's shape complaint turned into advice (static exports take one shape)."""
    try:
        return session.run(names, feed)
    except Exception as err:  # onnxruntime's InvalidArgument has no importable base class across versions
        if "invalid dimensions" not in str(err).lower():
            raise
        raise ValueError(f"the ONNX denoiser was exported with fixed shapes and this call's differ "
                         f"({str(err).strip().splitlines()[-1]}); re-export with export_onnx(path, dynamic=True, "
                         "overwrite=True)") from None


def session_settings(layers: dict, accuracy_level: int) -> dict:
    """How sessions must be set up for a graph with these layer forms (stored in the record, so other
    onnxruntime users can do the same):

    * ``MatMulAddFusion`` off when int8 QDQ matmuls are present: onnxruntime otherwise fuses each MatMul and
      its bias Add into a float Gemm before its QDQ pass runs, so the ``MatMulIntegerToFloat`` fusion never
      sees the pattern and the int8 weights are dequantized on every call;
    * onnxruntime's own DequantizeLinear+MatMul → MatMulNBits rewrite at the export's accuracy level (its
      default, 4, would quantize activations to int8 where the simulation does not);
    * ``session.x64quantprecision`` on: on x86 CPUs without VNNI (AVX2, AVX-512F) onnxruntime's uint8 x int8
      kernel (``vpmaddubsw``) sums pairs of products in int16 with saturation, so an 8-bit weight code next to
      an 8-bit activation (255 * 127 * 2 > 32767) silently clips some dot products (measured: 12% of the
      output scale on a few elements, any onnxruntime version). With the option onnxruntime stores such
      weights as uint8 + 128 and runs its exact uint8 x uint8 kernel; where the fast kernel cannot overflow
      (VNNI, or codes within 7 bits) it changes nothing. The graph's int8 weight DequantizeLinear nodes carry
      explicit zero points for it (export.onnx_graph.OnnxLayer).
    """
    qdq = any(f["weight"] == "dq-int8" and f["act"] and f["op"] == "MatMul" for f in layers.values())
    return {"disabled_optimizers": ["MatMulAddFusion"] if qdq else [],
            "config": {"session.qdq_matmulnbits_accuracy_level": str(int(accuracy_level)),
                       "session.x64quantprecision": "1"}}


def make_session(path, record: dict, providers: list | None = None, threads: int | None = None):
    """An onnxruntime session of one graph of an export, set up as its record says."""
    import onnxruntime as ort

    settings = record.get("session") or session_settings(record.get("layers", {}), record.get("accuracy_level", 0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    for key, value in settings["config"].items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=settings["disabled_optimizers"] or None)


def _set_dotted(root, dotted: str, value) -> None:
    from types import SimpleNamespace

    parts = dotted.split(".")
    obj = root
    for part in parts[:-1]:
        nxt = getattr(obj, part, None)
        if nxt is None:
            nxt = SimpleNamespace()
            object.__setattr__(obj, part, nxt) if isinstance(obj, nn.Module) else setattr(obj, part, nxt)
        obj = nxt
    setattr(obj, parts[-1], value)


# ---------------------------------------------------------------------------------------- the cache


class OnnxCacheDriver:
    """Applies the artifact's cache schedule to an :class:`OnnxDenoiser` inside a pipeline call.

    Step tracking is :mod:`qsched.runtime.caching`'s: ``scheduler.set_timesteps`` starts a run (step 0,
    nothing stored) and ``scheduler.step`` advances it; every denoiser call in between belongs to the step.
    At step ``t`` the graph of that step's reuse set runs, fed the stored outputs of the reused components;
    the outputs of computed components that a later step reuses are stored. ``disable()`` restores the
    scheduler and the denoiser (which then runs the full graph).
    """

    def __init__(self, pipe, denoiser: OnnxDenoiser, schedule, steps: list[str], strict_steps: bool = True):
        self.switch = denoiser.record.get("switched")
        if self.switch is not None:
            rows = [[int(i) for i in np.flatnonzero(row)] for row in schedule.table]
            if self.switch["reuse"] != rows:
                raise ArtifactError("the ONNX export's switched graph was cut for another cache schedule; re-export it")
            steps = [self.switch["graph"]] * len(rows)
        if len(steps) != schedule.steps:
            raise ArtifactError(f"the ONNX export has graphs for {len(steps)} steps, the cache schedule has "
                                f"{schedule.steps}; re-export it")
        self.schedule, self.graphs, self.denoiser = schedule, list(steps), denoiser
        self.scheduler = getattr(pipe, "scheduler", None)
        self._pipe = pipe
        self.strict_steps = strict_steps
        table = schedule.table
        self._table = table
        self._last_reuse = np.array([np.flatnonzero(table[:, j]).max() if table[:, j].any() else -1
                                     for j in range(table.shape[1])])
        self._slot_calls = {int(k): int(v) for k, v in denoiser.record.get("slot_calls", {}).items()}
        self.step = 0
        self._ready = self.scheduler is None
        self._calls: dict[int, int] = {}
        self._store: dict[tuple[int, int, int], np.ndarray] = {}
        self.computed = np.zeros(len(schedule.slots), dtype=np.int64)
        self.reused = np.zeros(len(schedule.slots), dtype=np.int64)
        self._patched: list[tuple[object, str, bool, object]] = []
        self.active = False

    def reset(self) -> None:
        self.step, self._ready = 0, True
        self._calls.clear()
        self._store.clear()

    def advance(self) -> None:
        self.step += 1
        self._calls.clear()
        for key in [k for k in self._store if self._last_reuse[k[0]] < self.step]:
            del self._store[key]

    def counts(self) -> dict[str, int]:
        return {"computed": int(self.computed.sum()), "reused": int(self.reused.sum())}

    def run(self, denoiser: OnnxDenoiser, feed: dict) -> np.ndarray:
        """One denoiser call at the current step: the step's graph, stored outputs in, new ones out."""
        if self.scheduler is not None and getattr(self._pipe, "scheduler", None) is not self.scheduler:
            raise RuntimeError("the pipeline's scheduler was replaced after the cache was enabled; disable and re-enable")
        if not self._ready:
            raise RuntimeError("denoiser called before scheduler.set_timesteps(); call reset() when driving it by hand")
        if self.step >= self.schedule.steps:
            raise RuntimeError(f"denoiser step {self.step} is beyond the cache schedule's {self.schedule.steps} steps")
        session = denoiser.session(self.graphs[self.step])
        reuse = self._table[self.step]
        stored = {}
        for node in session.get_inputs():  # cut graphs: cache.*; the switched graph: stored.* of reused slots
            kind, _, rest = node.name.partition(".")
            if kind not in ("cache", "stored"):
                continue
            slot, call, part = (int(x) for x in rest.split("."))
            if kind == "stored" and not reuse[slot]:
                continue
            key = (slot, self._calls.get(slot, 0) + call, part)
            if key not in self._store:
                block, comp = self.schedule.slots[slot]
                raise RuntimeError(f"step {self.step} reuses {block}.{comp} (call {key[1]}) but nothing is "
                                   "stored; was the denoiser called outside a pipeline call?")
            stored[node.name] = self._store[key]
        if self.switch is not None:
            feed = switch_feed(session, feed, self.switch["conditions"][self.step], stored)
        else:
            feed = {**feed, **stored}
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, _run(session, names, feed)))
        for name, value in values.items():
            if name.startswith("cache."):
                slot, call, part = (int(x) for x in name.split(".")[1:])
                if not reuse[slot] and self._last_reuse[slot] > self.step:
                    self._store[(slot, self._calls.get(slot, 0) + call, part)] = value
        for slot in range(len(self.schedule.slots)):
            calls = self._slot_calls.get(slot, 1)
            (self.reused if reuse[slot] else self.computed)[slot] += calls
            self._calls[slot] = self._calls.get(slot, 0) + calls
        return values[OUTPUT]

    # --- install / remove (scheduler hooks, as qsched.runtime.caching) ---------------------------------

    def _patch(self, obj, attr: str, new) -> None:
        self._patched.append((obj, attr, attr in vars(obj), vars(obj).get(attr)))
        setattr(obj, attr, new)

    def install(self) -> "OnnxCacheDriver":
        if self.denoiser.cache is not None and self.denoiser.cache.active:
            raise RuntimeError("a cache schedule is already enabled on this ONNX denoiser; disable it first")
        sched = self.scheduler
        if sched is not None:
            from qsched.runtime.caching import hook_scheduler_steps
            hook_scheduler_steps(self, sched)
        self.denoiser.cache = self
        self.active = True
        return self

    def disable(self) -> None:
        """Remove the scheduler hooks; the denoiser runs its full graph again."""
        if not self.active:
            return
        from qsched.runtime.caching import restore_patches
        restore_patches(self._patched)
        self._store.clear()
        self.active = False
        if self.denoiser.cache is self:
            self.denoiser.cache = None

    def __enter__(self) -> "OnnxCacheDriver":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()


def enable_onnx_cache(pipe, schedule, strict_steps: bool = True) -> OnnxCacheDriver:
    """Install ``schedule`` (the artifact's) on a pipeline whose denoiser is an :class:`OnnxDenoiser`."""
    from qsched.runtime.cache_schedule import _denoiser

    denoiser = _denoiser(pipe)
    if not isinstance(denoiser, OnnxDenoiser):
        raise TypeError("enable_onnx_cache needs a pipeline loaded with runtime='onnx'")
    steps = denoiser.record.get("steps") or []
    return OnnxCacheDriver(pipe, denoiser, schedule, steps, strict_steps=strict_steps).install()


# ------------------------------------------------------------------------------------------- loading


def onnx_denoiser(path, manifest: dict, device: str = "cpu", providers: list | None = None,
                  threads: int | None = None) -> OnnxDenoiser:
    """The :class:`OnnxDenoiser` of an artifact (checksums are the caller's :func:`read_manifest`'s job)."""
    require_onnx(runtime_only=True)
    record = manifest.get(KEY)
    if not record:
        raise ArtifactError(f"{path} has no ONNX export; add one with `qcompile ... --export onnx` or "
                            "export.runtime_onnx.export_onnx(path)")
    if record.get("schema", 1) != 1:
        raise ArtifactError(f"{path} has an ONNX export this qsched cannot read; upgrade qsched")
    return OnnxDenoiser(Path(path), record, manifest["denoiser"], device=device, providers=providers,
                        threads=threads)


@contextlib.contextmanager
def quiet_component_type_check():
    """Silence diffusers' "Expected types for transformer" warning while a pipeline is built around an
    :class:`OnnxDenoiser` (expected: it stands in for the diffusers class)."""
    import logging
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


