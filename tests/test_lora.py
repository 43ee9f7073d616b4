"""LoRA on a compressed pipeline (export.lora): diffusers' own ``load_lora_weights`` / ``set_adapters`` /
``disable_lora`` / ``unload_lora_weights`` on what ``export.load`` returns, simulated and native, with the
artifact's Q-Sched scheduler and cache schedule in place.

The LoRA is made here for flux-tiny with peft (:mod:`qsched.tinyworld.lora`: a colour-inverting style, a few
Adam steps on the world), so its effect is large: it must move the quantized pipeline's images the way it
moves the FP model's, i.e. LoRA-on-quantized against LoRA-on-FP stays close to the plain quantized-vs-FP
figure. Here that figure is dominated by the pipeline's FORA-2 cache (about 16 dB); the quantized denoiser
alone does carry its own extra error under this LoRA on the v2 weights (7.5 dB, benchmarks/lora_tiny.py,
docs/results.md), which this test does not claim away.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("peft")

import export  # noqa: E402
from export.lora import FUSE_REFUSED, LoraError, lora_loading  # noqa: E402
from qsched.runtime.qlayers import QuantLayer  # noqa: E402
from qsched.runtime.cache_schedule import CacheSchedule, block_layout  # noqa: E402
from qsched.runtime.caching import enable_cache  # noqa: E402
from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on the left", "two blue squares", "a green triangle above a red square"]


def _images(pipe) -> np.ndarray:
    return np.stack(pipe(PROMPTS, num_inference_steps=4, guidance_scale=0.0, height=32, width=32, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images)


def _with_qsched_and_cache(pipe):
    """What ``export.load`` installs when the compile chose them (the small fixture compile may keep either or
    neither): a Q-Sched scheduler and a FORA-style cache schedule."""
    if not isinstance(pipe.scheduler, QSchedScheduler):
        if getattr(pipe, "qsched_cache", None) is not None:  # a cache is tied to its scheduler: re-enable below
            pipe.qsched_cache.disable()
            pipe.qsched_cache = None
        pipe.scheduler = QSchedScheduler.wrap(pipe.scheduler, SchedulerCoefficients.linear_ramp(4, 0.97, 1.03))
    if getattr(pipe, "qsched_cache", None) is None:
        pipe.qsched_cache = enable_cache(pipe, CacheSchedule.fora(4, block_layout(pipe), 2))
    return pipe


def _psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))


@pytest.fixture(scope="module")
def style_lora(tmp_path_factory):
    """(LoRA directory, FP images, FP+LoRA images): flux-tiny's own adapter and what it does to the FP model."""
    from qsched.tinyworld.lora import save_style_lora, train_style_lora
    from qsched.tinyworld.model import load_embedded

    pipe = load_embedded()
    state = train_style_lora(pipe, steps=20, batch=8, seed=0)
    path = save_style_lora(state, tmp_path_factory.mktemp("style-lora"))
    fp = _images(pipe)
    pipe.load_lora_weights(path, adapter_name="style")
    return path, fp, _images(pipe)


@pytest.mark.parametrize("runtime", ["simulated", "native"])
def test_lora_moves_the_compressed_images_as_it_moves_fp(tiny_report_artifact, style_lora, runtime):
    path, fp, fp_lora = style_lora
    pipe = _with_qsched_and_cache(export.load(tiny_report_artifact.path, runtime=runtime))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plain = _images(pipe)
    pipe.load_lora_weights(path, adapter_name="style")
    with_lora = _images(pipe)

    assert _psnr(fp, fp_lora) < 15  # the adapter changes the FP images a lot...
    assert _psnr(plain, with_lora) < 20  # ...and the compressed ones too (about 16 dB here; FP: about 9)
    # ...and the same way: with it, the compressed images come clearly closer to what the adapter makes of FP
    # (by how much depends on the weights: the adapter adds some error of its own, docs/results.md)
    assert _psnr(with_lora, fp_lora) > _psnr(plain, fp_lora) + 2
    assert isinstance(pipe.scheduler, QSchedScheduler)  # Q-Sched and the cache schedule still drive the sampler
    assert pipe.qsched_cache.counts()["reused"] > 0
    lora_keys = [k for k in pipe.transformer.state_dict() if "lora_" in k]
    assert lora_keys and not any(k.endswith(".weight") and "lora_" not in k and k.replace("base_layer.", "") not in before
                                 for k in pipe.transformer.state_dict())  # no weight stand-in left behind

    pipe.set_adapters(["style"], [0.0])
    np.testing.assert_array_equal(_images(pipe), plain)
    pipe.set_adapters(["style"], [1.0])
    pipe.disable_lora()
    np.testing.assert_array_equal(_images(pipe), plain)
    pipe.enable_lora()
    np.testing.assert_array_equal(_images(pipe), with_lora)

    with pytest.raises(LoraError) as err:
        pipe.fuse_lora()
    assert str(err.value) == FUSE_REFUSED and "\n" not in FUSE_REFUSED
    np.testing.assert_array_equal(_images(pipe), with_lora)  # refused before any layer changed

    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    np.testing.assert_array_equal(_images(pipe), plain)


def test_lora_for_another_model_is_one_line(tiny_report_artifact, style_lora, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, _ = style_lora
    state = load_file(path / "pytorch_lora_weights.safetensors")
    other = {k.replace("transformer_blocks", "joint_blocks"): v for k, v in state.items()}  # another model's names
    save_file(other, tmp_path / "pytorch_lora_weights.safetensors")
    pipe = export.load(tiny_report_artifact.path)
    plain = _images(pipe)
    with pytest.raises(LoraError) as err:
        pipe.load_lora_weights(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "made for another model" in message and "FluxTransformer2DModel" in message
    np.testing.assert_array_equal(_images(pipe), plain)


def test_onnx_runtime_refuses_a_lora_in_one_line():
    from export.runtime_onnx import OnnxDenoiser

    with pytest.raises(LoraError, match="runtime='simulated' or 'native'"):
        OnnxDenoiser.load_lora_adapter(object(), {})


def _one_layer_model(kind):
    from conftest import random_quant_layer

    shape = (16, 8) if kind == "linear" else (16, 8, 3, 3)
    conv = None if kind == "linear" else {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    model = torch.nn.Module()
    model.proj = random_quant_layer(kind=kind, shape=shape, conv_args=conv)
    return model


def test_peft_wraps_quantized_linear_and_refuses_conv_and_dora():
    import peft
    from peft import LoraConfig


    model = _one_layer_model("linear")
    x = torch.randn(4, 8)
    base = model.proj(x)
    with lora_loading(model):
        peft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights="gaussian"), model)
    assert isinstance(model.proj.base_layer, QuantLayer) and not hasattr(model.proj.base_layer, "weight")
    delta = model.proj(x) - base
    a, b = model.proj.lora_A["default"].weight, model.proj.lora_B["default"].weight
    torch.testing.assert_close(delta, x @ a.t() @ b.t() * model.proj.scaling["default"])

    conv = _one_layer_model("conv2d")
    with lora_loading(conv), pytest.raises(LoraError, match="linear layers only"):
        peft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"]), conv)
    dora = _one_layer_model("linear")
    with lora_loading(dora), pytest.raises(LoraError, match="DoRA"):
        peft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], use_dora=True), dora)
