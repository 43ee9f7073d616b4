"""GGUF export: the artifact's FLUX denoiser as one GGUF file, for ComfyUI-GGUF and diffusers' single-file loader.

:func:`export_gguf` adds ``gguf/`` to an artifact (in place, atomically: :func:`export.amend.add_folder`)::

    gguf/denoiser.gguf   # the denoiser's weights, Black Forest Labs key layout, general.architecture = "flux"
    gguf/config.json     # the denoiser's diffusers config, so from_single_file(config=<artifact>/gguf) works offline

Both files are listed in ``manifest.json`` with their sha256; ``manifest["gguf"]`` is the record
:func:`export_gguf` returns (tensor types, fused groups, substitutions). ``export.load`` never reads them.

What the file holds:

* **Weights follow the bit plan.** Each quantized layer's weight is written in the GGML type of its width
  (8 → Q8_0, 6 → Q6_K, 5 → Q5_K, 4 → Q4_K, 3 → Q3_K, 2 → Q2_K), FP layers as BF16, 1-D tensors (biases,
  RMSNorm scales) as F32 (ComfyUI-GGUF's convention: they are tiny and skip dequantization). The values
  encoded are the artifact's own ``code × step`` (what the simulated runtime computes with), encoded on
  that grid (:mod:`export.gguf_quants`), so the GGML codes equal the artifact's wherever one step covers
  a GGML sub-block; the remaining difference is the format's rounding of its sub-block scales.
* **Black Forest Labs layout.** Both readers take FLUX in the original key layout, where q, k and v are
  one tensor (``double_blocks.N.img_attn.qkv``; single blocks' ``linear1`` is q|k|v|mlp) and the final
  modulation has shift and scale swapped. :func:`flux_layout` is the inverse of diffusers'
  ``convert_flux_transformer_checkpoint_to_diffusers``. A fused tensor has one GGML type, so its members
  are written at the **widest** member's type (an FP member makes it BF16); ``record["fused"]`` lists each
  group's members with their planned widths and the type written.
* **Row lengths.** K-quants work on rows in blocks of 256 values, Q8_0/Q5_0/Q4_0 in blocks of 32. A
  layer whose input width is not a multiple of 256 gets the narrowest 32-block type at least as wide
  (Q6_K → Q8_0, Q5_K → Q5_0, Q4_K/Q3_K/Q2_K → Q4_0: their codes fit exactly); not a multiple of 32 → F16.
  Each such change is in ``record["substitutions"]`` and in the file's ``qsched.substitutions`` key.
  FLUX.1 itself has one: ``img_in`` (64 inputs).
* **Not carried** (GGUF has no place for them): activation quantization (GGUF runs W*A16: activations
  stay floating point), MixDQ's FP token rows, the Q-Sched scheduler coefficients and the cache
  schedule (pipeline-level; ``export.load`` keeps them). ``record["not_carried"]`` says which applied.

Only FLUX denoisers (``FluxTransformer2DModel``) have a layout both readers take; any other family is one
:class:`QschedError` line before anything is written (:func:`check_family`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qsched.core.errors import ArtifactError, QschedError

FOLDER = "gguf"
KEY = "gguf"
FILE = "denoiser.gguf"
CONFIG = "config.json"
#: denoiser class → GGUF ``general.architecture`` (what ComfyUI-GGUF picks the model type by)
ARCHITECTURES = {"FluxTransformer2DModel": "flux"}
#: planned weight width → GGML type name (None: an FP layer)
TYPE_FOR_BITS = {8: "Q8_0", 6: "Q6_K", 5: "Q5_K", 4: "Q4_K", 3: "Q3_K", 2: "Q2_K", None: "BF16"}
#: a 256-block type whose row length does not fit → the narrowest 32-block type whose codes hold it
_FALLBACK_32 = {"Q6_K": "Q8_0", "Q5_K": "Q5_0", "Q4_K": "Q4_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K", "Q5_K": "MOSTLY_Q5_K_M", "Q4_K": "MOSTLY_Q4_K_M",
               "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K", "Q5_0": "MOSTLY_Q5_0", "Q4_0": "MOSTLY_Q4_0",
               "BF16": "MOSTLY_BF16", "F16": "MOSTLY_F16", "F32": "ALL_F32"}

__all__ = ["export_gguf", "load_gguf_denoiser", "check_family", "check_model_family", "flux_layout", "require_gguf", "FOLDER",
           "FILE"]


def require_gguf(loading: bool = False) -> None:
    """Import gguf (and, for diffusers' GGUF loader, accelerate), or raise a QschedError saying how to install it."""
    missing = []
    for module in ("gguf", "accelerate") if loading else ("gguf",):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise QschedError(f"GGUF {'loading' if loading else 'export'} needs {' and '.join(missing)}, not installed; "
                          "install with `pip install 'qsched[gguf]'`")


def _unsupported(what: str, cls: str) -> QschedError:
    return QschedError(f"--export gguf cannot express {what}'s {cls}: GGUF files are only written for FLUX "
                       f"denoisers ({', '.join(ARCHITECTURES)}, in the Black Forest Labs layout that ComfyUI-GGUF "
                       "and diffusers read); drop --export gguf, or use --export onnx or --export modelopt for it")


def check_family(denoiser_class: str, what: str = "this artifact") -> str:
    """The GGUF architecture of ``denoiser_class``, or the one-line QschedError naming what to do instead."""
    if denoiser_class not in ARCHITECTURES:
        raise _unsupported(what, denoiser_class)
    return ARCHITECTURES[denoiser_class]


def check_model_family(model: str) -> None:
    """The CLI's check of ``--export gguf`` before any work: the denoiser class of a registry model, the
    embedded flux-tiny or a local pipeline directory (its ``model_index.json``). A hub id is not read
    (that would need the network); :func:`export_gguf` checks it after the compile, before writing."""
    from qsched.models.registry import REGISTRY

    if model in REGISTRY and REGISTRY[model].embedded:
        return  # the embedded flux-tiny is a FLUX pipeline
    if model in REGISTRY:
        from qsched.models.shipped_configs import load_component_config
        index = load_component_config(model, "model_index")
    else:
        path = Path(model).expanduser() / "model_index.json"
        if not path.is_file():
            return
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # the model loader reports an unreadable pipeline with its own message
    for component in ("transformer", "unet"):
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2:
            check_family(str(entry[1]), model)
            return


# ------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Entry:
    """One GGUF tensor group: BFL name prefix → the diffusers modules (or single tensors) it is made of."""

    name: str                 # BFL key without ".weight"/".bias" (linear) or the full key (plain tensor)
    members: tuple[str, ...]  # diffusers module paths (linear) or one diffusers tensor key (plain)
    linear: bool = True
    swap_halves: bool = False  # final_layer.adaLN_modulation: BFL stores (shift, scale), diffusers (scale, shift)


def flux_layout(config: dict) -> list[Entry]:
    """The BFL layout of a diffusers ``FluxTransformer2DModel`` with ``config``: the inverse of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers``."""
    entries = [Entry("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
               Entry("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
               Entry("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
               Entry("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",))]
    if config.get("guidance_embeds"):
        entries += [Entry("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
                    Entry("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",))]
    entries += [Entry("txt_in", ("context_embedder",)), Entry("img_in", ("x_embedder",))]
    for i in range(int(config.get("num_layers", 0))):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        entries += [
            Entry(b + "img_mod.lin", (d + "norm1.linear",)),
            Entry(b + "txt_mod.lin", (d + "norm1_context.linear",)),
            Entry(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
            Entry(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
            Entry(b + "img_attn.norm.query_norm.scale", (d + "attn.norm_q.weight",), linear=False),
            Entry(b + "img_attn.norm.key_norm.scale", (d + "attn.norm_k.weight",), linear=False),
            Entry(b + "txt_attn.norm.query_norm.scale", (d + "attn.norm_added_q.weight",), linear=False),
            Entry(b + "txt_attn.norm.key_norm.scale", (d + "attn.norm_added_k.weight",), linear=False),
            Entry(b + "img_mlp.0", (d + "ff.net.0.proj",)),
            Entry(b + "img_mlp.2", (d + "ff.net.2",)),
            Entry(b + "txt_mlp.0", (d + "ff_context.net.0.proj",)),
            Entry(b + "txt_mlp.2", (d + "ff_context.net.2",)),
            Entry(b + "img_attn.proj", (d + "attn.to_out.0",)),
            Entry(b + "txt_attn.proj", (d + "attn.to_add_out",)),
        ]
    for i in range(int(config.get("num_single_layers", 0))):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        entries += [
            Entry(b + "modulation.lin", (d + "norm.linear",)),
            Entry(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")),
            Entry(b + "norm.query_norm.scale", (d + "attn.norm_q.weight",), linear=False),
            Entry(b + "norm.key_norm.scale", (d + "attn.norm_k.weight",), linear=False),
            Entry(b + "linear2", (d + "proj_out",)),
        ]
    entries += [Entry("final_layer.linear", ("proj_out",)),
                Entry("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True)]
    return entries


# ---------------------------------------------------------------------------------------- weights


#: tensors of a QuantLayer that describe its weight or its activation quantizer (carried as the weight
#: itself, or not at all)
_QUANT_LEAVES = ("qweight", "weight_scale", "act_scale", "act_zero_point", "fp_token_inputs", "fp_token_outputs")


class _Source:
    """The artifact's denoiser tensors, read as each GGUF tensor needs them."""

    def __init__(self, tensors: dict[str, torch.Tensor], layers: dict):
        self.tensors, self.layers = tensors, layers

    def bits(self, module: str) -> int | None:
        spec = self.layers.get(module)
        return None if spec is None else spec["weight_bits"]

    def weight(self, module: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(values, step)`` [out, in] float32: the dequantized weight (``code × step``, what the simulated
        runtime computes with) and each value's grid step; FP weights with step None."""
        from export.packing import unpack_int

        spec = self.layers.get(module)
        if spec is None or spec["weight_bits"] is None:
            return self.tensors[f"{module}.weight"].float().reshape(self.tensors[f"{module}.weight"].shape[0], -1).numpy(), None
        shape = tuple(spec["weight_shape"])
        codes = unpack_int(self.tensors[f"{module}.qweight"], spec["weight_bits"], shape).reshape(shape[0], -1)
        scale = self.tensors[f"{module}.weight_scale"].float()  # [out, groups]
        step = scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
        return (codes.float() * step).numpy(), step.numpy()

    def bias(self, module: str) -> np.ndarray | None:
        t = self.tensors.get(f"{module}.bias")
        return None if t is None else t.float().numpy()

    def plain(self, key: str) -> np.ndarray:
        return self.tensors[key].float().numpy()

    def width(self, module: str) -> tuple[int, int]:
        spec = self.layers.get(module)
        shape = tuple(spec["weight_shape"]) if spec is not None else tuple(self.tensors[f"{module}.weight"].shape)
        return shape[0], int(np.prod(shape[1:]))


def _consumed(layout: list[Entry], source: _Source) -> set[str]:
    keys = set()
    for e in layout:
        if not e.linear:
            keys.add(e.members[0])
            continue
        for m in e.members:
            leaves = ["weight", "bias"] + (list(_QUANT_LEAVES) if m in source.layers else [])
            keys |= {f"{m}.{leaf}" for leaf in leaves}
    return keys


def _check_covered(layout: list[Entry], source: _Source, cls: str) -> None:
    """Every stored denoiser tensor has a place in the layout and every layout tensor is stored, else the
    one-line error: a FLUX variant with other modules has no BFL layout this export knows."""
    stored = set(source.tensors)
    needed = {f"{m}.weight" if m not in source.layers or source.layers[m]["weight_bits"] is None else f"{m}.qweight"
              for e in layout if e.linear for m in e.members} | {e.members[0] for e in layout if not e.linear}
    missing, extra = sorted(needed - stored), sorted(stored - _consumed(layout, source))
    if missing or extra:
        detail = (f"tensors without a place in it: {extra[:3]}" if extra else f"missing tensors {missing[:3]}")
        raise QschedError(f"--export gguf cannot express this {cls}: it does not match the FLUX.1 layout ComfyUI-GGUF "
                          f"and diffusers read ({detail}); only the FLUX.1 architecture can be written as GGUF")


# ------------------------------------------------------------------------------------------- planning


@dataclass
class _Planned:
    name: str
    qtype: str
    shape: tuple[int, ...]  # numpy (row-major) shape
    entry: Entry
    part: str               # "weight" | "bias" | "plain"


def _block(qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]


def _weight_type(bits: list[int | None], cols: int) -> tuple[str, str, str | None]:
    """``(wanted, written, why)`` for a group of members with planned ``bits`` and rows of ``cols`` values."""
    widest = None if any(b is None for b in bits) else max(bits)
    wanted = TYPE_FOR_BITS[widest]
    written, why = wanted, None
    if cols % _block(written):
        written = _FALLBACK_32.get(wanted, wanted)
        why = f"rows of {cols} values are not a multiple of {_block(wanted)} ({wanted}'s block)"
        if cols % _block(written):
            written = "F16"
            why = f"rows of {cols} values are not a multiple of 32 (the smallest GGML block)"
    return wanted, written, why


def _plan(layout: list[Entry], source: _Source):
    planned, fused, substitutions = [], {}, []
    for e in layout:
        if not e.linear:
            planned.append(_Planned(e.name, "F32", source.plain(e.members[0]).shape, e, "plain"))
            continue
        bits = [source.bits(m) for m in e.members]
        widths = [source.width(m) for m in e.members]
        cols = {c for _, c in widths}
        if len(cols) != 1:
            raise QschedError(f"--export gguf: {e.name} fuses layers of different input widths {sorted(cols)}; "
                              "the FLUX layout needs them equal")
        cols_n = cols.pop()
        wanted, written, why = _weight_type(bits, cols_n)
        rows = sum(r for r, _ in widths)
        planned.append(_Planned(f"{e.name}.weight", written, (rows, cols_n), e, "weight"))
        if len(e.members) > 1:
            fused[f"{e.name}.weight"] = {"members": {m: b for m, b in zip(e.members, bits)}, "type": written,
                                         "widest_bits": None if None in bits else max(bits)}
        if why:
            substitutions.append({"tensor": f"{e.name}.weight", "wanted": wanted, "written": written, "why": why})
        if all(source.bias(m) is not None for m in e.members):
            planned.append(_Planned(f"{e.name}.bias", "F32", (rows,), e, "bias"))
        elif any(source.bias(m) is not None for m in e.members):
            raise QschedError(f"--export gguf: {e.name} fuses layers with and without bias; the FLUX layout has "
                              "one bias for all of them")
    return planned, fused, substitutions


def _swap(a: np.ndarray) -> np.ndarray:
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]], axis=0)


def _encode(p: _Planned, source: _Source) -> np.ndarray:
    from gguf import GGMLQuantizationType

    from export.gguf_quants import encode_rows

    qtype = GGMLQuantizationType[p.qtype]
    if p.part == "plain":
        return np.ascontiguousarray(source.plain(p.entry.members[0]), dtype=np.float32)
    if p.part == "bias":
        out = np.concatenate([source.bias(m) for m in p.entry.members]).astype(np.float32)
        return _swap(out) if p.entry.swap_halves else out
    parts = []
    for m in p.entry.members:
        values, step = source.weight(m)
        parts.append(encode_rows(values, qtype, step))
    out = np.concatenate(parts, axis=0)
    return _swap(out) if p.entry.swap_halves else out


def _nbytes(p: _Planned) -> int:
    if p.qtype == "F32":
        return 4 * int(np.prod(p.shape))
    from gguf import GGMLQuantizationType

    from export.gguf_quants import row_bytes
    return p.shape[0] * row_bytes(GGMLQuantizationType[p.qtype], p.shape[1])


# ------------------------------------------------------------------------------------------- export


def export_gguf(path, overwrite: bool = False, verify: bool = True) -> dict:
    """Add ``gguf/`` (the denoiser as ``denoiser.gguf`` plus its ``config.json``) to the artifact at ``path``;
    returns the manifest record (see the module docstring). Raises :class:`QschedError` without gguf or for
    a denoiser GGUF cannot express (before anything is written), :class:`ArtifactError` for a corrupt
    artifact or an existing export without ``overwrite``."""
    require_gguf()
    import gguf

    from export.amend import add_folder
    from export.format import MANIFEST_NAME, load_shard, read_manifest
    from qsched.runtime.qlayers import refuse_fp8

    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    if (KEY in manifest or (path / FOLDER).exists()) and not overwrite:
        raise ArtifactError(f"{path} already has a GGUF export; pass overwrite=True (--overwrite) to replace it")
    info = manifest["denoiser"]
    arch = check_family(info["class"], str(path))
    refuse_fp8((spec.get("format") for spec in manifest["layers"].values()), "--export gguf")
    tensors = {}
    for shard in info["shards"]:
        tensors.update(load_shard(path, shard))
    source = _Source(tensors, manifest["layers"])
    layout = flux_layout(info["config"])
    _check_covered(layout, source, info["class"])
    planned, fused, substitutions = _plan(layout, source)

    counts: dict[str, int] = {}
    params: dict[str, int] = {}
    for p in planned:
        counts[p.qtype] = counts.get(p.qtype, 0) + 1
        if p.part == "weight":
            params[p.qtype] = params.get(p.qtype, 0) + int(np.prod(p.shape))
    main = max(params, key=params.get) if params else "F32"
    file_type = _FILE_TYPES.get(main, "GUESSED")
    not_carried = []
    if any(spec.get("act_bits") is not None for spec in manifest["layers"].values()):
        not_carried.append("activation quantization (GGUF has none: the file runs W*A16)")
    if any(spec.get("fp_tokens") for spec in manifest["layers"].values()):
        not_carried.append("MixDQ's FP token rows")
    if manifest.get("scheduler") or (manifest.get("cache") or {}).get("schedule"):
        not_carried.append("the Q-Sched scheduler and the cache schedule (pipeline-level; export.load keeps them)")
    manifest_sha = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
    record = {
        "schema": 1, "file": f"{FOLDER}/{FILE}", "config": f"{FOLDER}/{CONFIG}", "architecture": arch,
        "layout": "Black Forest Labs (original FLUX keys)", "file_type": file_type,
        "tensors": {p.name: {"type": p.qtype, "shape": list(p.shape),
                             "from": list(p.entry.members) if p.part != "plain" else [p.entry.members[0]],
                             **({"bits": [source.bits(m) for m in p.entry.members]} if p.part == "weight" else {})}
                    for p in planned},
        "fused": fused, "substitutions": substitutions, "counts": counts, "not_carried": not_carried,
        "source_manifest_sha256": manifest_sha,
        "versions": {"gguf": _gguf_version(), "torch": torch.__version__},
        "load": f"FluxTransformer2DModel.from_single_file('<artifact>/{FOLDER}/{FILE}', "
                f"config='<artifact>/{FOLDER}', quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))",
    }

    def write(folder: Path) -> None:
        writer = gguf.GGUFWriter(None, arch)
        writer.add_name(f"{manifest.get('source', {}).get('model', 'model')} qsched {manifest.get('bits', '')}".strip())
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(int(gguf.LlamaFileType[file_type]))
        writer.add_string("qsched.bits", str(manifest.get("bits", "")))
        writer.add_string("qsched.bit_plan_method", str((manifest.get("bit_plan") or {}).get("method", "")))
        writer.add_string("qsched.source_manifest_sha256", manifest_sha)
        writer.add_string("qsched.denoiser_class", info["class"])
        writer.add_string("qsched.fused", json.dumps(fused, sort_keys=True))
        writer.add_string("qsched.substitutions", json.dumps(substitutions, sort_keys=True))
        writer.add_string("qsched.not_carried", json.dumps(not_carried))
        for p in planned:
            if p.qtype == "F32":
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p))
            else:
                byte_shape = (p.shape[0], _nbytes(p) // p.shape[0])
                writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), _nbytes(p),
                                       raw_dtype=gguf.GGMLQuantizationType[p.qtype])
        writer.write_header_to_file(folder / FILE)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for p in planned:  # one tensor in memory at a time
                data = _encode(p, source)
                if p.qtype == "F16":
                    data = data.view(np.uint8)
                writer.write_tensor_data(data)
        finally:
            writer.close()
        config = {"_class_name": info["class"], **{k: v for k, v in info["config"].items() if not k.startswith("_")}}
        (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    new = add_folder(path, FOLDER, write, KEY, record, overwrite=overwrite, verify=False)
    record = dict(record, bytes=new["files"][f"{FOLDER}/{FILE}"]["bytes"])
    return record


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------- loading


#: diffusers' FLUX converter splits single blocks' linear1 at FLUX.1's width, written as constants
_FLUX1_WIDTH = 3072


def load_gguf_denoiser(path, compute_dtype: torch.dtype = torch.bfloat16):
    """The artifact's GGUF export loaded by diffusers' own single-file loader, as a user would load it::

        FluxTransformer2DModel.from_single_file("<artifact>/gguf/denoiser.gguf", config="<artifact>/gguf",
            quantization_config=GGUFQuantizationConfig(compute_dtype=...), local_files_only=True)

    ``path``: the artifact directory. diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
    hard-codes FLUX.1's width (3072) where it splits single blocks' ``linear1`` into q, k, v and mlp; for a
    denoiser of another width (flux-tiny, test models) that one split is scaled to the denoiser's width while
    the call runs (diffusers' module-level ``torch`` is wrapped; not thread-safe). FLUX.1 needs no change.
    Needs gguf and accelerate (``pip install 'qsched[gguf]'``)."""
    require_gguf(loading=True)
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    from export.format import read_manifest

    path = Path(path)
    record = read_manifest(path, verify=False).get(KEY)
    if not record:
        raise ArtifactError(f"{path} has no GGUF export; add one with `qcompile ... --export gguf` or "
                            f"export.gguf_export.export_gguf({str(path)!r})")
    config = json.loads((path / record["config"]).read_text(encoding="utf-8"))
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    with _flux_width(width):
        return FluxTransformer2DModel.from_single_file(
            str(path / record["file"]), config=str(path / FOLDER), local_files_only=True, torch_dtype=compute_dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype)).eval()


class _ScaledSplit:
    """diffusers' ``torch`` with ``split`` at FLUX.1's q|k|v|mlp sizes scaled to ``width``."""

    def __init__(self, real, width: int):
        self._real, self._width = real, width

    def __getattr__(self, name):
        return getattr(self._real, name)

    def split(self, tensor, sizes, dim=0):
        if isinstance(sizes, (tuple, list)) and tuple(sizes) == (_FLUX1_WIDTH,) * 3 + (4 * _FLUX1_WIDTH,):
            sizes = (self._width,) * 3 + (4 * self._width,)
        return self._real.split(tensor, sizes, dim=dim)


class _flux_width:
    def __init__(self, width: int):
        self.width = width

    def __enter__(self):
        import diffusers.loaders.single_file_utils as sfu

        self.module, self.real = sfu, sfu.torch
        if self.width != _FLUX1_WIDTH:
            sfu.torch = _ScaledSplit(self.real, self.width)
        return self

    def __exit__(self, *exc):
        self.module.torch = self.real
