"""Model loading: registry architectures at random init (on the meta device), the embedded model, errors."""
import pytest
import torch

from qsched.core.errors import ModelNotFoundError
from qsched.models.registry import REGISTRY, load_pipeline
from qsched.models.random_init import build_random_pipeline

EXPECTED = {"flux-schnell": ("FluxPipeline", "transformer", 11.89e9), "flux-dev": ("FluxPipeline", "transformer", 11.90e9),
            "sdxl-turbo": ("StableDiffusionXLPipeline", "unet", 2.567e9),
            "pixart-sigma": ("PixArtSigmaPipeline", "transformer", 0.611e9)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_pipeline_builds_from_shipped_configs(name):
    pipe = build_random_pipeline(name, device="meta")
    cls, attr, params = EXPECTED[name]
    assert type(pipe).__name__ == cls
    denoiser = getattr(pipe, attr)
    assert abs(sum(p.numel() for p in denoiser.parameters()) - params) / params < 0.005
    assert all(p.is_meta for p in denoiser.parameters())
    ids = pipe.tokenizer("a red fox sitting in fresh snow").input_ids
    clip_style = name != "pixart-sigma"  # PixArt has only a T5 tokenizer, which adds no BOS
    assert (ids[0] == pipe.tokenizer.bos_token_id) == clip_style and ids[-1] == pipe.tokenizer.eos_token_id


def test_registry_settings_come_from_shipped_configs():
    assert REGISTRY["flux-schnell"].settings.steps == 4
    assert REGISTRY["sdxl-turbo"].settings.steps == 1
    assert REGISTRY["flux-schnell"].hub_id == "black-forest-labs/FLUX.1-schnell"


def test_random_init_needs_a_registry_model():
    with pytest.raises(ModelNotFoundError, match="registry model"):
        load_pipeline("some-org/model", init="random")


def test_hub_offline_error_names_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline("flux-schnell")
    message = str(err.value)
    assert "black-forest-labs/FLUX.1-schnell" in message and "HF_HUB_OFFLINE" in message
    assert "flux-tiny" in message and "--init random" in message and "local diffusers directory" in message
