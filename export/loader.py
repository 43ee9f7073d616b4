"""Artifact directory → diffusers pipeline that generates with the quantized denoiser.

Loading reads only JSON and safetensors (never pickle), verifies checksums and the schema version, and
rebuilds the denoiser on the meta device so its FP weights are never materialised twice. The native
runtime is streamed from the shards layer by layer (:func:`build_native_denoiser`).

Never pickle, in depth: :func:`export.format.read_manifest` refuses any file the manifest does not list and
any symlink; bundled components may not hold a pickle-capable file even when listed (:data:`UNSAFE_SUFFIXES`),
their safetensors are parsed before diffusers sees them, and diffusers is told ``use_safetensors=True``, so
it fails instead of falling back to a ``.bin``. Whatever still goes wrong is one :class:`ArtifactError` line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import LAYER_FORMATS, QuantLayer
from qsched.core.errors import ArtifactError

from export.format import SHARD_SUFFIX, load_shard, open_shard, read_manifest
from export.packing import check_fp8_codes, unpack_int

#: Files a bundled component may not hold, listed or not: formats diffusers or transformers would unpickle
#: (``.bin``, ``.pt``, ``.ckpt``, sharded ``.bin`` indexes, ...) or import (``.py``), or read in place of
#: safetensors. ``save_pretrained(safe_serialization=True)``, which writes the bundle, never writes them.
UNSAFE_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill",
                   ".npy", ".npz", ".msgpack", ".h5", ".gguf", ".flashpack", ".py", ".pyc", ".so")
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _diffusers_class(name: str, base: str | None = None):
    """The diffusers class the manifest names; with ``base``, it must subclass ``diffusers.<base>`` (a
    manifest naming any other attribute of the module is refused, not called)."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise ArtifactError(f"artifact needs diffusers class {name!r}, which this diffusers ({diffusers.__version__}) lacks; upgrade diffusers")
    if base is not None and not (isinstance(cls, type) and issubclass(cls, getattr(diffusers, base))):
        raise ArtifactError(f"corrupt artifact: its manifest names {name!r} where a diffusers {base} belongs; re-export it")
    return cls


def empty_quant_layers_(denoiser: torch.nn.Module, specs: dict[str, dict]) -> None:
    """Put an empty :class:`QuantLayer` (meta device) in place of each layer ``specs`` names (the manifest's
    ``layers``), for the stored tensors to fill: what :func:`export.load` and diffusers' ``from_pretrained``
    (:mod:`export.diffusers_quantizer`) both do before loading weights."""
    with torch.device("meta"):
        for name, spec in specs.items():
            layer = QuantLayer(spec["kind"], tuple(spec["weight_shape"]), spec["weight_bits"], spec["act_bits"],
                               spec["group_size"], {k: tuple(v) if isinstance(v, list) else v for k, v in spec["conv_args"].items()},
                               spec["has_bias"], getattr(torch, spec["dtype"]),
                               fp_token_positions=tuple(spec.get("fp_tokens", ())), format=layer_format(name, spec))
            set_submodule(denoiser, name, layer)


def _meta_denoiser(manifest: dict):
    """The denoiser on the meta device with an empty :class:`QuantLayer` per manifest layer: (model, class, config)."""
    info = manifest["denoiser"]
    cls = _diffusers_class(info["class"], "ModelMixin")
    config = {k: v for k, v in info["config"].items() if not k.startswith("_")}
    with torch.device("meta"):
        denoiser = cls.from_config(config)
    empty_quant_layers_(denoiser, manifest["layers"])
    return denoiser, cls, config


def layer_format(name: str, spec: dict) -> str:
    """A manifest layer's number format (``"int"`` when the spec names none, as every artifact before FP8 did)."""
    fmt = spec.get("format", "int")
    if not isinstance(fmt, str) or fmt not in LAYER_FORMATS:
        raise ArtifactError(f"artifact layer {name} has format {fmt!r}, which this qsched does not know (known: "
                            f"{', '.join(LAYER_FORMATS)}); the artifact is corrupt or from a newer qsched")
    return fmt


def _check_tensor_names(denoiser, names) -> None:
    expected = set(denoiser.state_dict())
    missing, unexpected = expected - set(names), set(names) - expected
    if missing or unexpected:
        raise ArtifactError(f"artifact denoiser tensors do not match its manifest (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}); the artifact is corrupt or from an incompatible qsched")


def build_denoiser(manifest: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the quantized denoiser from its config, layer specs and stored tensors."""
    denoiser, cls, config = _meta_denoiser(manifest)
    state = dict(tensors)
    for name, spec in manifest["layers"].items():
        if spec["weight_bits"] is not None:
            key, shape = f"{name}.qweight", tuple(spec["weight_shape"])
            state[key] = check_fp8_codes(state[key], shape) if layer_format(name, spec) == "fp8" else \
                unpack_int(state[key], spec["weight_bits"], shape)
    _check_tensor_names(denoiser, state)
    denoiser.load_state_dict(state, assign=True, strict=True)
    _materialise_leftover_buffers(denoiser, cls, config)
    return denoiser.eval()


def build_native_denoiser(manifest: dict, path, int_matmul: bool = True) -> torch.nn.Module:
    """The denoiser with native runtime layers, streamed from the artifact's shards layer by layer.

    Gives the same modules, buffers and outputs as ``to_native_(build_denoiser(...))`` without what that
    holds at its peak (every shard loaded, the whole model's codes unpacked to int8, then packed again):
    each layer's tensors are read from its shard into memory of their own (:func:`export.format.open_shard`;
    nothing stays memory-mapped, and each shard is closed once read), turned into its native layer (2-4 bit
    codes kept as the stored packed bytes) and released, so the peak is the native model plus one layer.
    """
    from export.runtime_torch import native_from_stored

    denoiser, cls, config = _meta_denoiser(manifest)
    shards = manifest["denoiser"]["shards"]
    names = []
    for shard in shards:  # headers only: the whole name check happens before any tensor is read
        with open_shard(path, shard, manifest) as reader:
            names += reader.keys()
    _check_tensor_names(denoiser, names)
    templates = {name: denoiser.get_submodule(name) for name in manifest["layers"]}
    owner = {f"{name}.{leaf}": (name, leaf) for name, layer in templates.items() for leaf in layer.state_dict()}
    needed = {name: len(layer.state_dict()) for name, layer in templates.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for shard in shards:
        with open_shard(path, shard, manifest) as reader:
            for key in reader.keys():
                tensor = reader.get(key)
                if key not in owner:  # FP tensors outside the quantized layers (norms, embeddings, ...)
                    others[key] = tensor
                    continue
                name, leaf = owner[key]
                parts = pending.setdefault(name, {})
                parts[leaf] = tensor
                del tensor
                if len(parts) == needed[name]:  # complete: build the native layer, which keeps only what it needs
                    set_submodule(denoiser, name, native_from_stored(templates[name], pending.pop(name), int_matmul, name))
    if pending:  # cannot happen after the name check, unless a shard lists a tensor twice
        raise ArtifactError(f"artifact layers {sorted(pending)[:3]} are incomplete; the artifact is corrupt")
    denoiser.load_state_dict(others, assign=True, strict=False)  # names checked above; shapes checked here
    _materialise_leftover_buffers(denoiser, cls, config)
    return denoiser.eval()


def _materialise_leftover_buffers(denoiser, cls, config) -> None:
    """Non-persistent buffers (e.g. fixed positional tables) are not in the state dict: recompute them."""
    leftovers = [n for n, b in denoiser.named_buffers() if b.is_meta]
    if not leftovers:
        return
    reference = cls.from_config(config)  # small models only have such buffers in practice (e.g. PixArt pos_embed)
    reference_buffers = dict(reference.named_buffers())
    for name in leftovers:
        owner, _, leaf = name.rpartition(".")
        module = denoiser.get_submodule(owner) if owner else denoiser
        module.register_buffer(leaf, reference_buffers[name].clone(), persistent=False)


def _bundle_root(path: Path, manifest: dict) -> Path:
    """Where a bundle's ``model_index.json`` is: the artifact itself from schema 3, ``components/`` before."""
    return path if manifest["schema_version"] >= 3 else path / "components"


def pipeline_files(path: Path, manifest: dict) -> list[str]:
    """The listed files diffusers may open when it loads the artifact: the denoiser's folder and every
    component folder (those ``model_index.json`` names, which is what diffusers reads, and those the manifest
    records), or ``components/`` before schema 3."""
    files = manifest["files"]
    if manifest["schema_version"] < 3:
        return [rel for rel in files if rel.startswith("components/")]
    denoiser, components = manifest.get("denoiser"), manifest.get("components")
    folders = {c for c in components if isinstance(c, str)} if isinstance(components, list) else set()
    if isinstance(denoiser, dict):
        folders.add(denoiser.get("attr"))
    if "model_index.json" in files:
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            folders.update(k for k in index if not k.startswith("_"))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ArtifactError(f"corrupt artifact {path}: model_index.json is not a JSON object "
                                f"({_first_line(e)}); re-export it") from e
    return [rel for rel in files if rel == "model_index.json" or rel.split("/")[0] in folders]


def check_bundle(path: Path, manifest: dict) -> None:
    """Refuse a pipeline folder holding a pickle-capable file (listed or not) and parse every safetensors header
    there, so a bad component is one clear error naming the file, before diffusers opens anything."""
    listed = pipeline_files(path, manifest)
    for rel in listed:
        if rel.lower().endswith(UNSAFE_SUFFIXES):
            raise ArtifactError(f"refusing artifact {path}: {rel!r} is a format that loads with pickle or runs code; "
                                "bundled weights must be safetensors; re-export the artifact")
    for rel in listed:
        if rel.endswith(SHARD_SUFFIX):
            with open_shard(path, rel, manifest):
                pass


def _other_components(manifest: dict, path: Path, denoiser):
    """The pipeline around the denoiser: bundled in the artifact, or loaded from the recorded source."""
    attr = manifest["denoiser"]["attr"]
    if manifest.get("bundle"):
        pipeline_cls = _diffusers_class(manifest["pipeline_class"], "DiffusionPipeline")
        try:  # use_safetensors: a missing .safetensors is an error, never a fallback to a .bin pickle
            return pipeline_cls.from_pretrained(str(_bundle_root(path, manifest)), local_files_only=True,
                                                use_safetensors=True, **{attr: denoiser})
        except torch.OutOfMemoryError:
            raise
        except _LOAD_ERRORS as e:
            raise ArtifactError(f"cannot load the bundled components of {path} ({_first_line(e)}); the artifact is "
                                "corrupt or from an incompatible qsched; re-export it") from e
    source = manifest["source"]
    from qsched.models.registry import load_source_pipeline
    check_source_matches(manifest, path)
    return load_source_pipeline(source, manifest["pipeline_class"], **{attr: denoiser})


def check_source_matches(manifest: dict, path: Path) -> None:
    """Refuse, in one line, to put the artifact's denoiser into a source pipeline that has changed since the
    compile: an embedded model whose weights were retrained (checked by digest), or a source whose denoiser
    changed shape (an edited local directory). Its other components (VAE, text encoders) would no longer match,
    and the pipeline would fail deep inside a call or draw nonsense."""
    from qsched.models.registry import source_denoiser_config

    source = manifest["source"]
    if source.get("kind") == "embedded" and source.get("denoiser_sha256"):
        from qsched.models.registry import embedded_denoiser_digests
        if source["denoiser_sha256"] not in embedded_denoiser_digests():
            raise ArtifactError(f"{path} was compiled from an earlier {source['model']}: the embedded model's weights "
                                "have changed since (its text encoders and VAE would no longer match the compressed "
                                "denoiser); recompile it, or compile with --bundle so the artifact carries every "
                                "component")
    recorded = manifest["denoiser"].get("config") or {}
    current = source_denoiser_config(source, manifest["denoiser"]["attr"])
    if not recorded or current is None:
        return
    changed = sorted(k for k in set(recorded) | set(current)
                     if not k.startswith("_") and recorded.get(k) != current.get(k))
    if changed:
        shown = ", ".join(f"{k} {recorded.get(k)!r} → {current.get(k)!r}" for k in changed[:3])
        raise ArtifactError(f"{path} was compiled from a {manifest['source']['model']} whose denoiser differs from "
                            f"the one there now ({shown}{', ...' if len(changed) > 3 else ''}); recompile it, or compile "
                            "with --bundle so the artifact carries every component")


def build_scheduler(record: dict):
    """The artifact's scheduler: its diffusers base, wrapped with Q-Sched coefficients when it has them."""
    base = _diffusers_class(record["class"], "SchedulerMixin").from_config(record["config"])
    if record.get("coefficients"):
        from qsched.runtime.schedulers import QSchedScheduler
        return QSchedScheduler.wrap(base, record["coefficients"], interpolate=bool(record.get("interpolate")))
    return base


def _denoiser(manifest: dict, path: Path, runtime: str, device: str):
    if runtime == "onnx":  # the torch denoiser is never built: the graph carries the weights
        from export.runtime_onnx import KEY, onnx_denoiser
        record = manifest.get(KEY) or {}
        switched = (record.get("switched") or {}).get("graph")
        for graph in [record.get("graph"), switched, *(record.get("steps") or [])]:  # only verified files
            if graph is not None and graph not in manifest["files"]:
                raise ArtifactError(f"corrupt artifact {path}: its ONNX record names {graph!r}, which "
                                    f"manifest.json does not list; re-export it")
        return onnx_denoiser(path, manifest, device=device)
    if runtime == "native":  # streamed layer by layer; the W4 codes stay packed throughout
        return build_native_denoiser(manifest, path)
    tensors = {}
    for shard in manifest["denoiser"]["shards"]:  # large denoisers are written one block group per shard
        tensors.update(load_shard(path, shard))
    return build_denoiser(manifest, tensors)


def load(path, device: str = "cpu", verify: bool = True, runtime: str = "simulated", compile: str | bool = False):
    """Load an artifact written by ``qcompile`` and return a ready diffusers pipeline.

    ``runtime="native"`` swaps the simulated layers for integer/packed ones (:mod:`export.runtime_torch`);
    ``runtime="onnx"`` runs the artifact's ONNX export with onnxruntime (:mod:`export.runtime_onnx`).
    ``compile`` (see :func:`compile_denoiser`): ``False``/``"off"`` (eager, the default), ``True``/``"full"``
    or ``"regional"``; what was compiled is ``pipe.qsched_compile``. The first call of each distinct cache
    step pattern pays the compile. The pipeline's call defaults are the artifact's generation settings
    (``pipe.call_defaults``).
    """
    if runtime not in ("simulated", "native", "onnx"):
        raise ArtifactError(f"unknown runtime {runtime!r}; use 'simulated', 'native' or 'onnx'")
    mode = compile_mode(compile)
    if mode != "off" and runtime == "onnx":
        raise ArtifactError(f"compile={compile!r} needs a torch denoiser; the ONNX runtime has its own graph optimizer")
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    check_bundle(path, manifest)
    try:
        pipe = _assemble(manifest, path, runtime, device)
    except torch.OutOfMemoryError:
        raise
    except _LOAD_ERRORS as e:  # the manifest is not checksummed: an edited value (a layer's bits) lands here
        raise ArtifactError(f"corrupt artifact {path}: its manifest does not describe a loadable pipeline "
                            f"({_first_line(e)}); re-export it") from e
    pipe.set_progress_bar_config(disable=True)
    pipe.qsched_manifest = manifest
    if runtime != "onnx":  # diffusers' LoRA calls (load_lora_weights, set_adapters, ...) on the quantized layers
        from export.lora import prepare_lora
        prepare_lora(pipe, manifest["denoiser"]["attr"])
    pipe.qsched_compile = compile_denoiser(getattr(pipe, manifest["denoiser"]["attr"]), mode)
    if manifest.get("generation"):  # pipe(prompt) draws at the settings the artifact was compiled and measured at
        from qsched.runtime.generation import GenerationSettings, with_call_defaults
        with_call_defaults(pipe, GenerationSettings(**manifest["generation"]))
    return pipe.to(device)


#: ``load(compile=...)`` values: eager, ``torch.compile`` of the whole denoiser, or of each repeated block.
COMPILE_MODES = ("off", "full", "regional")


def compile_mode(value: str | bool | None) -> str:
    """``load``'s ``compile`` argument as one of :data:`COMPILE_MODES` (booleans mean off / full)."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "full"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ArtifactError(f"unknown compile mode {value!r}; use 'off', 'full' or 'regional' (or False / True)")


def compile_denoiser(denoiser: torch.nn.Module, mode: str, **options) -> str:
    """Compile ``denoiser`` in place (``nn.Module.compile``: the module keeps its class, so pipelines see the
    denoiser they expect) and return ``mode``. ``"regional"`` compiles only the repeated transformer blocks
    (diffusers' ``compile_repeated_blocks`` where the model names them, else every entry of the denoiser's
    ``nn.ModuleList`` attributes): same-class blocks share one compiled graph, so compile time does not grow
    with depth. ``options`` go to ``torch.compile`` (tests pass ``backend="eager"``)."""
    mode = compile_mode(mode)
    if mode == "full":
        denoiser.compile(**options)
    elif mode == "regional" and getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(**options)
    elif mode == "regional":
        blocks = [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]
        if not blocks:
            raise ArtifactError(f"{type(denoiser).__name__} has no repeated blocks to compile regionally; "
                                "use compile='full'")
        for block in blocks:
            block.compile(**options)
    return mode


def _assemble(manifest: dict, path: Path, runtime: str, device: str):
    denoiser = _denoiser(manifest, path, runtime, device)
    if runtime == "onnx":  # diffusers warns that the denoiser is not its usual class; that is the point
        from export.runtime_onnx import quiet_component_type_check
        with quiet_component_type_check():
            pipe = _other_components(manifest, path, denoiser)
    else:
        pipe = _other_components(manifest, path, denoiser)
    scheduler = manifest.get("scheduler")
    if scheduler:
        pipe.scheduler = build_scheduler(scheduler)
    cache = (manifest.get("cache") or {}).get("schedule")
    if cache:  # the chosen cache schedule, applied through the pipeline's own __call__
        from qsched.runtime.caching import enable_cache
        from qsched.runtime.cache_schedule import CacheSchedule
        if runtime == "onnx":
            from export.runtime_onnx import enable_onnx_cache as enable_cache  # noqa: F811
        pipe.qsched_cache = enable_cache(pipe, CacheSchedule.from_dict(cache))
    return pipe
