"""diffusers' own ``from_pretrained`` on a qsched artifact: a quantizer in diffusers' quantizer mapping.

An artifact's denoiser folder (``<attr>/config.json`` and ``<attr>/diffusion_pytorch_model.safetensors``)
carries a ``quantization_config`` whose ``quant_method`` is :data:`QUANT_METHOD`, the way Nunchaku Lite and
SDNQ checkpoints name theirs. Once this module is imported (``import qsched`` and ``import export`` see to
it), ``FluxTransformer2DModel.from_pretrained(art, subfolder="transformer")``, and for a bundle
``DiffusionPipeline.from_pretrained(art)``, build the denoiser :func:`export.load` builds, tensor for
tensor: the listed layers become empty :class:`QuantLayer` s before the weights load (the code
:func:`export.loader.empty_quant_layers_` shares with the loader), packed codes are unpacked as they load,
and the scales stay fp32 whatever ``torch_dtype`` is asked for.

What only ``export.load`` adds: checksums and the never-unpickle checks, the Q-Sched scheduler, the cache
schedule, the call defaults and the native and ONNX runtimes (``export.runtime_torch.to_native_`` turns a
denoiser loaded here into the native one).

Why the method name reads like an instruction: without qsched imported, diffusers stops with
``Unknown quantization type, got <quant_method> - supported types are: [...]``, and the name is the only
part of that line an artifact controls.
"""
from __future__ import annotations

import enum
import importlib
import json

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from qsched.runtime.qlayers import FP32_BUFFERS, QuantLayer

from export.loader import empty_quant_layers_
from export.packing import check_fp8_codes, unpack_int

__all__ = ["QUANT_METHOD", "QschedConfig", "QschedQuantizer", "component_config", "register"]

QUANT_METHOD = "qsched (pip install qsched, then import qsched before loading)"
#: Version of the ``quantization_config`` record; a reader refuses a newer one (it may not know its keys).
CONFIG_FORMAT = 1


class _Method(str, enum.Enum):
    """diffusers reads ``quant_method.value`` (its own methods are a ``str`` enum)."""

    QSCHED = QUANT_METHOD

    def __str__(self) -> str:
        return self.value


class QschedConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qsched denoiser folder: the layer specs of the manifest's ``layers``,
    the dtype the denoiser was stored in, and who wrote it. Written by ``qcompile``; not for quantizing."""

    def __init__(self, layers: dict, compute_dtype: str = "float32", format: int = CONFIG_FORMAT,
                 qsched_version: str | None = None, quant_method: str = QUANT_METHOD):
        if not isinstance(format, int) or format > CONFIG_FORMAT:
            raise ValueError(f"this qsched denoiser was written by a newer qsched ({qsched_version}, quantization_config "
                             f"format {format}); upgrade qsched: pip install -U qsched")
        if not isinstance(layers, dict):
            raise ValueError("qsched quantization_config has no layer specs; the artifact is corrupt, re-export it")
        if not isinstance(getattr(torch, str(compute_dtype), None), torch.dtype):
            raise ValueError(f"qsched quantization_config names compute_dtype {compute_dtype!r}, not a torch dtype; "
                             "the artifact is corrupt, re-export it")
        self.quant_method = _Method.QSCHED
        self.layers, self.compute_dtype = layers, str(compute_dtype)
        self.format, self.qsched_version = format, qsched_version

    def to_diff_dict(self) -> dict:
        """Every field (diffusers' ``to_json_string`` asks for the difference from defaults; none is a default)."""
        return self.to_dict()

    def __repr__(self) -> str:  # diffusers logs configs; a FLUX denoiser's layer specs are about 100 kB
        return (f"QschedConfig(layers={len(self.layers)}, compute_dtype={self.compute_dtype}, format={self.format}, "
                f"qsched_version={self.qsched_version})")


class QschedQuantizer(DiffusersQuantizer):
    """Loads a qsched denoiser folder into its model class with qsched's quantized layers in place."""

    requires_calibration = True  # qcompile quantizes; from_pretrained only loads what it wrote
    use_keep_in_fp32_modules = True  # modules diffusers keeps in fp32 stay fp32, as in an FP load

    def __init__(self, quantization_config: QschedConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.layers = quantization_config.layers
        self.cast_to: torch.dtype | None = None

    def update_torch_dtype(self, torch_dtype):
        """Without ``torch_dtype`` the stored dtype, as ``export.load`` gives (diffusers would pick fp32)."""
        self.cast_to = torch_dtype
        return torch_dtype if torch_dtype is not None else getattr(torch, self.quantization_config.compute_dtype)

    def _process_model_before_weight_loading(self, model, **kwargs):
        empty_quant_layers_(model, self.layers)

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        return param_name.rpartition(".")[0] in self.layers

    def check_quantized_param_shape(self, param_name: str, current_param, loaded_param) -> bool:
        """Only ``qweight`` is stored in another shape (packed; :func:`unpack_int` checks its size)."""
        if not param_name.endswith(".qweight") and tuple(current_param.shape) != tuple(loaded_param.shape):
            raise ValueError(f"{param_name} is stored with shape {list(loaded_param.shape)}, its quantization_config "
                             f"needs {list(current_param.shape)}; the artifact is corrupt, re-export it")
        return True

    def create_quantized_param(self, model, param_value, param_name: str, target_device, state_dict=None,
                               unexpected_keys=None, **kwargs):
        """Codes unpacked from the stored bytes, scales as stored (fp32), FP tensors as diffusers cast them."""
        owner, _, leaf = param_name.rpartition(".")
        layer = model.get_submodule(owner)
        if leaf == "qweight":
            spec = self.layers[owner]
            if spec.get("format", "int") == "fp8":  # e4m3 codes are stored as they are, one byte each
                value = check_fp8_codes(state_dict[param_name], tuple(spec["weight_shape"]))
            else:
                value = unpack_int(state_dict[param_name], spec["weight_bits"], tuple(spec["weight_shape"]))
        elif leaf in FP32_BUFFERS:
            value = state_dict[param_name]
        else:
            value = param_value
        value = value.to(target_device)
        if leaf in layer._parameters:
            layer._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            layer._buffers[leaf] = value

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Refuse a model with a tensor still on the meta device (missing from the shard), then mark it
        castable: diffusers refuses ``to(dtype)`` on quantized models because packed layers cannot follow a
        cast, and qsched's layers can (:class:`~qsched.runtime.qlayers.CastableQuantized`), as on
        ``export.load``'s denoiser; ``hf_quantizer`` still says which quantizer loaded it."""
        missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing:
            raise ValueError(f"the qsched denoiser's weights lack {missing[:3]}; the artifact is corrupt, re-export it")
        if self.cast_to is not None:
            for module in model.modules():
                if isinstance(module, QuantLayer):
                    module.compute_dtype = self.cast_to
        model.is_quantized = False
        return model

    @property
    def is_serializable(self) -> bool:  # an artifact is written by qcompile, with its manifest
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def component_config(config: dict, specs: dict, dtype: torch.dtype) -> bytes:
    """The denoiser folder's ``config.json``: its diffusers config plus the ``quantization_config`` read here."""
    from qsched.core.version import __version__

    record = QschedConfig(specs, str(dtype).removeprefix("torch."), qsched_version=__version__).to_dict()
    return (json.dumps({**config, "quantization_config": record}, indent=2, sort_keys=True) + "\n").encode("utf-8")


def register() -> None:
    """Add the quantizer and its config to diffusers' mapping (what ``from_pretrained`` looks the method up in)."""
    auto = importlib.import_module("diffusers.quantizers.auto")
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QschedQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QschedConfig


register()
