"""The shipped full-size configs build the real architectures (on the meta device: no memory).

The parameter and ``nn.Linear`` counts pin the configs to the public checkpoints: a wrong value in
a transcribed config.json changes them.
"""

import json

import pytest
import torch

from qsched.models import shipped_configs as sc
from qsched.core.errors import ModelNotFoundError, QschedError


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _numel(params):
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def schnell():
    return sc.build_denoiser("flux-schnell")


@pytest.fixture(scope="module")
def dev():
    return sc.build_denoiser("flux-dev")


def test_shipped_names_and_hub_ids():
    assert set(sc.SHIPPED) == {"flux-schnell", "flux-dev", "sdxl-turbo", "pixart-sigma"}
    for name, hub in sc.SHIPPED.items():
        assert sc.hub_id(name) == hub
        assert (sc.CONFIG_ROOT / name / "model_index.json").is_file()


def test_every_json_is_strict_json():
    # No NaN/Infinity literals: other tools (jq, JS) must read these too.
    for path in sc.CONFIG_ROOT.glob("*/*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))


def test_flux_schnell_transformer_matches_public_figures(schnell):
    assert type(schnell).__name__ == "FluxTransformer2DModel"
    total = _numel(schnell.parameters())
    assert total == 11_891_178_560
    assert total / 1e9 == pytest.approx(11.89, abs=0.01)
    assert len(schnell.transformer_blocks) == 19
    assert len(schnell.single_transformer_blocks) == 38
    linears = _linears(schnell)
    assert len(linears) == 502
    assert _numel(p for m in linears for p in m.parameters()) / total >= 0.9999
    assert not hasattr(schnell.time_text_embed, "guidance_embedder")
    p = next(schnell.parameters())
    assert p.device.type == "meta" and p.dtype == torch.bfloat16


def test_flux_dev_is_schnell_plus_guidance_embedder(schnell, dev):
    assert len(dev.transformer_blocks) == 19 and len(dev.single_transformer_blocks) == 38
    guidance = dev.time_text_embed.guidance_embedder
    extra = _numel(guidance.parameters())
    assert extra == (256 * 3072 + 3072) + (3072 * 3072 + 3072)
    assert _numel(dev.parameters()) == _numel(schnell.parameters()) + extra
    assert _numel(dev.parameters()) / 1e9 == pytest.approx(11.90, abs=0.01)
    assert len(_linears(dev)) == 502 + 2


def test_sdxl_unet_and_pixart_param_counts():
    unet = sc.build_denoiser("sdxl-turbo")
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert _numel(unet.parameters()) == 2_567_463_684
    pixart = sc.build_denoiser("pixart-sigma")
    assert type(pixart).__name__ == "PixArtTransformer2DModel"
    assert len(pixart.transformer_blocks) == 28
    assert _numel(pixart.parameters()) / 1e9 == pytest.approx(0.61, abs=0.005)
    # The fp32 sin-cos pos_embed buffer is cast with the rest.
    assert all(b.dtype == torch.bfloat16 for b in pixart.buffers() if b.is_floating_point())


EXPECTED_CLASSES = {
    "flux-schnell": {
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    },
    "flux-dev": {
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    },
    "sdxl-turbo": {
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
    },
    "pixart-sigma": {"vae": "AutoencoderKL", "text_encoder": "T5EncoderModel"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_every_component_builds_on_meta(name):
    expected = EXPECTED_CLASSES[name]
    assert set(sc.components(name)) == set(expected) | {"scheduler", sc.denoiser_component(name)}
    index = sc.load_component_config(name, "model_index")
    for component, cls_name in expected.items():
        model = sc.build_component(name, component)
        assert type(model).__name__ == cls_name
        assert index[component][1] == cls_name
        assert all(p.device.type == "meta" for p in model.parameters())


def test_component_sizes_match_public_checkpoints():
    t5 = sc.build_component("flux-schnell", "text_encoder_2")
    assert _numel(t5.parameters()) == 4_762_310_656  # t5-v1_1-xxl encoder
    assert t5.config.d_model == 4096 and t5.config.num_layers == 24
    clip_l = sc.build_component("flux-schnell", "text_encoder")
    assert _numel(clip_l.parameters()) == 123_060_480
    big_g = sc.build_component("sdxl-turbo", "text_encoder_2")
    assert _numel(big_g.parameters()) == 694_659_840
    assert big_g.config.projection_dim == 1280
    flux_vae = sc.build_component("flux-dev", "vae")
    assert flux_vae.config.latent_channels == 16 and flux_vae.config.shift_factor == 0.1159
    assert sc.build_component("sdxl-turbo", "vae").config.latent_channels == 4


def test_schedulers():
    import diffusers

    schnell = sc.build_scheduler("flux-schnell")
    dev = sc.build_scheduler("flux-dev")
    assert isinstance(schnell, diffusers.FlowMatchEulerDiscreteScheduler)
    assert (schnell.config.shift, schnell.config.use_dynamic_shifting) == (1.0, False)
    assert isinstance(dev, diffusers.FlowMatchEulerDiscreteScheduler)
    assert (dev.config.shift, dev.config.use_dynamic_shifting) == (3.0, True)
    turbo = sc.build_scheduler("sdxl-turbo")
    assert isinstance(turbo, diffusers.EulerAncestralDiscreteScheduler)
    assert turbo.config.timestep_spacing == "trailing"
    turbo.set_timesteps(1)
    assert turbo.timesteps.tolist() == [999]  # trailing spacing: the single step starts at T
    pixart = sc.build_scheduler("pixart-sigma")
    assert isinstance(pixart, diffusers.DPMSolverMultistepScheduler)
    assert pixart.config.algorithm_type == "dpmsolver++"


def test_model_index_and_defaults():
    expected = {
        "flux-schnell": ("FluxPipeline", 4, 0.0, 1024),
        "flux-dev": ("FluxPipeline", 28, 3.5, 1024),
        "sdxl-turbo": ("StableDiffusionXLPipeline", 1, 0.0, 512),
        "pixart-sigma": ("PixArtSigmaPipeline", 20, 4.5, 1024),
    }
    for name, (pipeline, steps, guidance, res) in expected.items():
        assert sc.load_component_config(name, "model_index")["_class_name"] == pipeline
        d = sc.default_settings(name)
        assert (d["num_inference_steps"], d["guidance_scale"]) == (steps, guidance)
        assert d["height"] == d["width"] == res


def test_returned_configs_are_copies():
    cfg = sc.load_component_config("flux-dev", "transformer")
    cfg["num_layers"] = 1
    assert sc.load_component_config("flux-dev", "transformer")["num_layers"] == 19


def test_build_on_cpu_allocates_in_requested_dtype():
    vae = sc.build_component("sdxl-turbo", "vae", device="cpu", dtype=torch.bfloat16)
    params = list(vae.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params)
    assert torch.count_nonzero(vae.encoder.conv_in.weight) > 0  # really initialised


def test_unknown_name_and_component():
    with pytest.raises(ModelNotFoundError) as err:
        sc.build_denoiser("flux-pro")
    msg = str(err.value)
    assert "flux-pro" in msg and all(n in msg for n in sc.SHIPPED)
    with pytest.raises(QschedError, match="available"):
        sc.load_component_config("sdxl-turbo", "transformer")
    with pytest.raises(QschedError):
        sc.build_component("flux-dev", "scheduler")
