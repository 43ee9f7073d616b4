"""LoRA adapters on a compressed pipeline, through diffusers' own calls.

``pipe.load_lora_weights``, ``set_adapters``, ``disable_lora``/``enable_lora`` and ``unload_lora_weights``
work on a pipeline from :func:`export.load` (simulated and native runtimes). diffusers hands the adapter
to peft, which wraps each targeted layer in a LoRA layer that calls the wrapped layer and adds
``scale * B(A(x))``. peft knows only torch's own layer types, so :func:`prepare_lora` registers qsched's
quantized layers with peft's custom-module mapping for the denoiser's ``load_lora_adapter`` calls: the base
layer keeps computing with the artifact's integer codes (which are never touched, so unloading the LoRA
gives back the exact pipeline) and the adapter runs beside it in floating point, in the layer's compute
dtype. The Q-Sched scheduler and the cache schedule work on the denoiser's outputs and are unaffected.

``fuse_lora`` is refused with one line: the weights exist only as integer codes chosen by calibration for
the base model, and folding ``B·A`` into them would re-round every targeted layer without that
calibration. Fuse into the floating-point model and compile that instead.
"""
from __future__ import annotations

import contextlib
import functools
import types
import warnings

import torch
from torch import nn

from qsched.core.errors import QschedError
from qsched.runtime.qlayers import FPTokenRows, QuantLayer
from qsched.runtime.schedulers import QSchedScheduler

from export.runtime_torch import NativeDequantLayer, NativeFP8Linear, NativeInt8Linear

__all__ = ["LoraError", "QUANTIZED_LAYER_TYPES", "prepare_lora", "quantized_lora_layers"]

#: The layers qsched puts in place of ``nn.Linear``: what a LoRA may target in a compressed denoiser.
QUANTIZED_LAYER_TYPES = (QuantLayer, NativeInt8Linear, NativeFP8Linear, NativeDequantLayer, FPTokenRows)


class LoraError(QschedError, ValueError):
    """A LoRA that cannot apply to this compressed model (wrong model, a conv target, DoRA, fusing)."""


FUSE_REFUSED = ("fuse_lora is not supported on a qsched-compressed model: its weights are integer codes calibrated "
                "for the base model, and fusing would re-round them without that calibration; keep the LoRA unfused "
                "(it runs in floating point beside the quantized layers; scale it with set_adapters), or fuse it "
                "into the floating-point model and compile that with qcompile")


@functools.cache
def _lora_linear_class():
    """peft's LoRA ``Linear`` specialised for a quantized base layer (built once, on first use: peft is optional)."""
    from peft.tuners.lora.layer import Linear

    class QuantizedLoraLinear(Linear):
        """peft's LoRA linear around a qsched quantized layer: the base output is the quantized layer's, the
        adapter adds its floating-point low-rank term; merging into the integer weights is refused."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs):
            inner = base_layer.inner if isinstance(base_layer, FPTokenRows) else base_layer
            if getattr(inner, "kind", "linear") != "linear":
                raise LoraError(f"this LoRA targets a quantized {inner.kind} layer ({inner.extra_repr()}); LoRA on a "
                                "compressed model supports linear layers only: use a LoRA without conv targets, or "
                                "apply it to the floating-point model and compile that")
            with warnings.catch_warnings():  # peft warns that it does not know the base type: this class is why
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                super().__init__(base_layer, adapter_name, **kwargs)

        def update_layer(self, adapter_name, *args, **kwargs):
            """Every adapter (the first, from ``__init__``, and any added later) is refused if it is DoRA."""
            if kwargs.get("use_dora") or getattr(kwargs.get("config"), "use_dora", False):
                raise LoraError("DoRA adapters rescale the base weight, which a compressed model holds as integer codes; "
                                "use a plain LoRA, or apply the DoRA to the floating-point model and compile that")
            return super().update_layer(adapter_name, *args, **kwargs)

        def _get_base_layer_device_and_dtype(self, base_layer):
            """Where and in what dtype the adapter lives: the base layer's buffers' device and its compute dtype
            (its weights are integer codes, or packed bytes peft would not find)."""
            tensor = next(base_layer.buffers(), None)
            return (tensor.device if tensor is not None else None), _compute_dtype(base_layer)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise LoraError(FUSE_REFUSED)

    return QuantizedLoraLinear


def _compute_dtype(layer: nn.Module) -> torch.dtype | None:
    inner = layer.inner if isinstance(layer, FPTokenRows) else layer
    return getattr(inner, "compute_dtype", None)


def quantized_lora_layers() -> dict[type, type]:
    """peft's custom-module mapping: every quantized layer type -> the LoRA layer that wraps it."""
    cls = _lora_linear_class()
    return {layer_type: cls for layer_type in QUANTIZED_LAYER_TYPES}


@contextlib.contextmanager
def _registered_with_peft():
    """Every LoRA config handed to peft inside maps qsched's layer types to :func:`quantized_lora_layers`
    (peft's custom-module route; diffusers builds the config itself, so peft's entry point is where it can be
    added)."""
    import peft
    from peft import LoraConfig

    original = peft.inject_adapter_in_model
    mapping = quantized_lora_layers()

    def inject(peft_config, model, *args, **kwargs):
        if isinstance(peft_config, LoraConfig):
            peft_config._register_custom_module(mapping)
        return original(peft_config, model, *args, **kwargs)

    peft.inject_adapter_in_model = inject
    try:
        yield
    finally:
        peft.inject_adapter_in_model = original


def _needs_stand_in(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZED_LAYER_TYPES) and not hasattr(module, "weight")


@contextlib.contextmanager
def _weight_stand_ins(denoiser: nn.Module):
    """diffusers' LoRA loaders read each target's ``weight`` (shape, device) from ``module.weight`` and from the
    denoiser's ``state_dict()``: ``nn.Linear``'s contract, which bitsandbytes and GGUF layers meet with tensor
    subclasses. A quantized layer holds codes instead, so while a LoRA loads it gets a stand-in: a zero-stride
    tensor of the FP weight's shape on the layer's device (no memory), also listed by ``state_dict()``. Removed
    afterwards, so the artifact's tensors and what ``save`` writes never change."""
    handles, patched = [], []
    for module in denoiser.modules():
        if not _needs_stand_in(module):
            continue
        anchor = next(module.buffers(), None)
        device = anchor.device if anchor is not None else torch.device("cpu")
        stand_in = torch.zeros((), device=device, dtype=_compute_dtype(module) or torch.float32)
        module.weight = stand_in.expand(module.out_features, module.in_features)
        patched.append(module)
        handles.append(module.register_state_dict_post_hook(_list_stand_in))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.weight


def _list_stand_in(module, state_dict, prefix, local_metadata) -> None:
    state_dict[f"{prefix}weight"] = module.weight


@contextlib.contextmanager
def lora_loading(denoiser: nn.Module):
    """What a LoRA load needs on a compressed denoiser: weight stand-ins and qsched's layers registered with
    peft. Re-entrant (the pipeline's ``load_lora_weights`` calls the denoiser's ``load_lora_adapter``)."""
    if getattr(denoiser, "_qsched_lora_loading", False):
        yield
        return
    denoiser._qsched_lora_loading = True
    try:
        with _weight_stand_ins(denoiser), _registered_with_peft():
            yield
    finally:
        denoiser._qsched_lora_loading = False


def _load_lora_adapter(self, *args, **kwargs):
    """The denoiser's ``load_lora_adapter`` inside :func:`lora_loading`, with a LoRA made for another model
    refused with one line instead of peft's error."""
    with lora_loading(self):
        try:
            return type(self).load_lora_adapter(self, *args, **kwargs)
        except ValueError as e:
            if isinstance(e, LoraError) or "not found in the base model" not in str(e):
                raise
            raise LoraError(f"this LoRA targets modules that {type(self).__name__} does not have "
                            f"({str(e).splitlines()[0][:160]}); it was made for another model: use a LoRA trained for "
                            f"this architecture") from e


QSCHED_NOTE = ("the pipeline's Q-Sched scheduler coefficients were learned for the base model; a LoRA that changes "
               "the images a lot moves them away from what the coefficients correct (docs/results.md); if its "
               "images drift, sample with the base scheduler: pipe.scheduler = pipe.scheduler.unwrap()")


def _load_lora_weights(self, *args, **kwargs):
    """The pipeline's ``load_lora_weights`` inside :func:`lora_loading` of its compressed denoiser; says once
    that Q-Sched's coefficients belong to the base model."""
    with lora_loading(getattr(self, self.qsched_lora_denoiser)):
        result = type(self).load_lora_weights(self, *args, **kwargs)
    if isinstance(self.scheduler, QSchedScheduler) and not getattr(self, "_qsched_lora_noted", False):
        warnings.warn(QSCHED_NOTE, UserWarning, stacklevel=2)
        self._qsched_lora_noted = True
    return result


def prepare_lora(pipe, denoiser_attr: str):
    """Let diffusers' LoRA calls apply to the compressed denoiser ``getattr(pipe, denoiser_attr)``: the pipeline's
    ``load_lora_weights`` and the denoiser's ``load_lora_adapter`` run inside :func:`lora_loading`. A no-op for
    a pipeline without LoRA support or a denoiser without quantized layers."""
    denoiser = getattr(pipe, denoiser_attr)
    if not hasattr(type(denoiser), "load_lora_adapter"):
        return pipe
    if not any(isinstance(m, QUANTIZED_LAYER_TYPES) for m in denoiser.modules()):
        return pipe
    denoiser.load_lora_adapter = types.MethodType(_load_lora_adapter, denoiser)
    if hasattr(type(pipe), "load_lora_weights"):
        pipe.qsched_lora_denoiser = denoiser_attr
        pipe.load_lora_weights = types.MethodType(_load_lora_weights, pipe)
    return pipe
