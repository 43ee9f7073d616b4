"""A modelopt checkpoint of an artifact's quantized denoiser: the TensorRT path.

:func:`export_modelopt` rebuilds the artifact's denoiser, expresses its bit plan as an nvidia-modelopt
quantization (:func:`calibrate.modelopt_bridge.to_modelopt`: explicit per-layer config, amax set from the
artifact's scales), checks it layer by layer against the artifact's own quantizers, and adds to the
artifact::

    modelopt/<denoiser>.pth   # mto.save(): modelopt state + state dict (weights dequantized, FP-sized)
    modelopt/check.json       # the per-layer check table (plain JSON)

Both files are listed in ``manifest.json`` with their sha256, and ``manifest["modelopt"]`` records how to
restore it, the activation mode and the check's summary. The folder is added in place, atomically
(:func:`export.amend.add_folder`), so ``export.load(path, verify=True)`` still passes.

Pickle: modelopt's checkpoint format is ``torch.save``. It is an optional export that the user restores
explicitly with modelopt's own API (``modelopt.torch.opt.restore``, which loads with
``torch.load(weights_only=True)``); ``export.load`` never reads it, so loading an artifact still never
unpickles anything.

Activations default to ``"symmetric"`` here: what TensorRT's INT8 Q/DQ can run, and modelopt's ONNX export
drops the affine bias that would reproduce our zero points (see :mod:`calibrate.modelopt_bridge`); the
difference to the artifact's asymmetric activations is measured per layer in ``check.json``, not hidden.
``activations="affine"`` gives a checkpoint that reproduces the artifact in modelopt's simulation.

FP8 (e4m3) layers (``--bits fp8``, alone or next to integer layers) become modelopt's FP8 quantizers
(``num_bits=(4, 3)``; weights per output channel, activations per tensor, ``amax = scale * 448`` from the
artifact): the same formula as ours, so they match code for code except where an activation sits on an e4m3
midpoint (``check.json`` counts those). ``activations`` concerns the integer layers only; FP8 is symmetric.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch

from qsched.core.bitplan import BitPlan
from calibrate.modelopt_bridge import (ACTIVATION_MODES, check_against_reference, layer_format, require_modelopt,
                                       summarize, to_modelopt)
from qsched.core.errors import ArtifactError

from export.amend import add_folder
from export.format import load_shard, read_manifest
from export.loader import _diffusers_class, _materialise_leftover_buffers, build_denoiser

FOLDER = "modelopt"
KEY = "modelopt"
CHECK_FILE = f"{FOLDER}/check.json"

__all__ = ["export_modelopt", "modelopt_denoiser", "restore_modelopt", "FOLDER"]


def _denoiser_tensors(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in manifest["denoiser"]["shards"]:
        tensors.update(load_shard(path, shard))
    return tensors


def modelopt_denoiser(path, activations: str = "symmetric", verify: bool = True, check: bool = True):
    """The artifact's denoiser quantized with modelopt; returns ``(model, manifest, check table or None)``.

    The reference for the check is the artifact's own simulated denoiser; both are built from the same
    loaded tensors (shared storage for the FP tensors, so memory grows by the dequantized weights only).
    """
    require_modelopt()
    if activations not in ACTIVATION_MODES:
        raise ArtifactError(f"unknown activations mode {activations!r}; use one of {ACTIVATION_MODES}")
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    tensors = _denoiser_tensors(path, manifest)
    plan = BitPlan.from_dict(manifest["bit_plan"])
    model = to_modelopt(build_denoiser(manifest, tensors), plan, activations=activations)
    table = None
    if check:
        table = check_against_reference(build_denoiser(manifest, tensors), model, plan, activations=activations)
    return model.eval(), manifest, table


def export_modelopt(path, activations: str = "symmetric", overwrite: bool = False, verify: bool = True) -> dict:
    """Add ``modelopt/`` (checkpoint and per-layer check) to the artifact at ``path``; returns the manifest
    record. Raises :class:`calibrate.modelopt_bridge.ModeloptMissingError` without nvidia-modelopt."""
    require_modelopt()  # fails early, with the install hint
    import modelopt
    import modelopt.torch.opt as mto

    path = Path(path)
    layers = read_manifest(path, verify=False)["layers"]  # checked before any work; verified just below
    for name, spec in layers.items():  # a format modelopt cannot express: one line, before any work
        layer_format(name, spec.get("format"))
    model, manifest, table = modelopt_denoiser(path, activations, verify=verify)
    attr = manifest["denoiser"]["attr"]
    checkpoint = f"{FOLDER}/{attr}.pth"

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mto.save(model, tmp / f"{attr}.pth")
        (tmp / "check.json").write_text(json.dumps(table, indent=1, sort_keys=True, allow_nan=False) + "\n")

    record = {
        "checkpoint": checkpoint, "check": CHECK_FILE, "activations": activations,
        "class": manifest["denoiser"]["class"], "modelopt_version": modelopt.__version__,
        "torch_version": torch.__version__, "summary": summarize(table),
        "format": "mto.save: torch.save (pickle) of the modelopt state and the state dict with dequantized "
                  "weights; restore with modelopt.torch.opt.restore (weights_only load). export.load never reads it.",
        "restore": "model = <class>.from_config(manifest['denoiser']['config']); "
                   "modelopt.torch.opt.restore(model, '<artifact>/" + checkpoint + "')",
    }
    add_folder(path, FOLDER, write, KEY, record, overwrite=overwrite, verify=False)
    return record


def restore_modelopt(path, verify: bool = True) -> torch.nn.Module:
    """The artifact's modelopt checkpoint restored with modelopt's API, without materialising a random
    FP model first: the denoiser is built on the meta device, modelopt's state is restored onto it
    (``mto.restore_from_modelopt_state``), then the checkpoint's tensors are assigned (what ``mto.restore``
    does, minus the full-size random init that a FLUX-size model could not afford)."""
    require_modelopt()
    import modelopt.torch.opt as mto
    from modelopt.torch.utils import safe_load

    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    record = manifest.get(KEY)
    if not record:
        raise ArtifactError(f"{path} has no modelopt checkpoint; add one with `qcompile ... --export modelopt` "
                            f"or export.runtime_modelopt.export_modelopt({str(path)!r})")
    cls = _diffusers_class(manifest["denoiser"]["class"])
    config = {k: v for k, v in manifest["denoiser"]["config"].items() if not k.startswith("_")}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        checkpoint = safe_load(path / record["checkpoint"], map_location="cpu")
        with torch.device("meta"):
            model = cls.from_config(config)
        model = mto.restore_from_modelopt_state(model, checkpoint["modelopt_state"])
        model.load_state_dict(checkpoint["model_state_dict"], assign=True, strict=True)
    _materialise_leftover_buffers(model, cls, config)
    return model.eval()
