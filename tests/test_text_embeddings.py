"""Text embeddings computed once per prompt (qsched.runtime.text_embeddings): the same images as the
pipeline's own encoding, no text-encoder work after the precompute, and a compile that lists every prompt."""
import json

import pytest
import torch

from qsched.models.registry import default_settings, load_pipeline
from qsched.models.tiny_pipelines import build_tiny_pixart_sigma_pipeline, build_tiny_sdxl_pipeline
from qsched.runtime.generation import GenerationSettings, call_arguments, generate
from qsched.runtime.text_embeddings import cache_text_embeddings, release_text_encoders, text_encoders

PROMPTS = ["a red circle", "a blue square left of a green triangle", "two small yellow circles", "a red circle"]


def _flux():
    pipe = load_pipeline("flux-tiny")[0]
    return pipe, default_settings("flux-tiny", pipe)


def _sdxl():  # classifier-free guidance: negative embeddings are cached per row too
    return build_tiny_sdxl_pipeline(), GenerationSettings(steps=2, height=64, width=64, guidance_scale=2.0)


def _pixart():  # a T5 with attention masks, and CFG
    return build_tiny_pixart_sigma_pipeline(), GenerationSettings(steps=2, height=64, width=64, guidance_scale=2.0)


def _count_encoder_rows(pipe) -> dict:
    seen = {"rows": 0}

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen["rows"] += ids.shape[0]

    for module in text_encoders(pipe).values():
        module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("build", [_flux, _sdxl, _pixart], ids=["flux", "sdxl", "pixart-sigma"])
def test_cached_embeddings_draw_the_same_images_without_the_encoders(build):
    pipe, settings = build()
    reference = generate(pipe, PROMPTS, settings, seed=3, batch_size=2)
    seen = _count_encoder_rows(pipe)
    cache = cache_text_embeddings(pipe)
    assert cache.precompute(PROMPTS, call_arguments(pipe, settings)) == 3  # the repeated prompt once
    encoded = seen["rows"]
    assert encoded > 0
    images = generate(pipe, PROMPTS, settings, seed=3, batch_size=2)
    assert seen["rows"] == encoded, "the text encoders ran after every prompt was cached"
    torch.testing.assert_close(images, reference, atol=1e-5, rtol=0)
    assert cache.stats.served_rows == len(PROMPTS) and cache.stats.late_rows == 0
    assert cache.stats.stored_rows == 3 and cache.stats.stored_bytes > 0

    generate(pipe, ["a green square"], settings, seed=0)  # a prompt nobody listed: encoded then, once
    generate(pipe, ["a green square"], settings, seed=0)
    assert cache.stats.late_rows == 1 and cache.stats.stored_rows == 4
    cache.remove()
    assert "encode_prompt" not in vars(pipe)


def test_uncacheable_calls_reach_the_pipelines_own_method():
    pipe, settings = _flux()
    own = type(pipe).encode_prompt(pipe, prompt=["a red circle"], device="cpu", num_images_per_prompt=2,
                                   max_sequence_length=settings.max_sequence_length or 512)
    cache = cache_text_embeddings(pipe)
    got = pipe.encode_prompt(prompt=["a red circle"], device="cpu", num_images_per_prompt=2,
                             max_sequence_length=settings.max_sequence_length or 512)
    assert cache.stats.bypassed_calls == 1 and cache.stats.stored_rows == 0
    for a, b in zip(own, got):
        torch.testing.assert_close(a, b)
    given = pipe.encode_prompt(prompt=None, prompt_embeds=own[0], pooled_prompt_embeds=own[1], device="cpu")
    assert cache.stats.bypassed_calls == 2 and given[0] is own[0]


def test_one_prompt_batches_learn_the_layout_and_match_batched_encoding():
    pipe, settings = _flux()
    kwargs = {"device": "cpu", "max_sequence_length": settings.max_sequence_length or 512}
    own = type(pipe).encode_prompt(pipe, prompt=PROMPTS[:2], **kwargs)
    cache = cache_text_embeddings(pipe)
    first = pipe.encode_prompt(prompt=PROMPTS[0], **kwargs)  # one prompt: a second, two-row probe learns the layout
    both = pipe.encode_prompt(prompt=PROMPTS[:2], **kwargs)
    assert first[0].shape[0] == 1 and both[0].shape[0] == 2
    assert both[2].shape == own[2].shape  # FLUX's text ids: one for the batch, not a row per prompt
    for a, b in zip(own, both):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # batch size changes float sums


def test_release_moves_only_text_encoders_and_is_a_no_op_where_they_are():
    pipe, _ = _flux()
    cache = cache_text_embeddings(pipe)
    assert release_text_encoders(pipe, cache, "cpu") == 0  # already in host memory
    assert set(text_encoders(pipe)) == {"text_encoder", "text_encoder_2"}
    cache.remove()


def test_a_compile_encodes_each_prompt_once(tiny_report_artifact):
    manifest = json.loads((tiny_report_artifact.path / "manifest.json").read_text())
    text = manifest["stages"]["load"]["text_embeddings"]
    listed = set(manifest["calibration_prompts"]) | set(manifest["eval_prompts"])
    assert text["prompts"] >= len(listed)
    assert text["late_rows"] == 0, "a stage sampled a prompt the compile did not list ahead"
    assert text["encoded_rows"] <= text["prompts"] + 2  # the layout probe encodes at most two more rows
    # every sampler call after load reads the store: Q-Sched's search images alone are that many rows
    assert text["bypassed_calls"] == 0 and text["served_rows"] >= manifest["stages"]["coefficients"]["sampler_calls"] > 0
    assert text["served_rows"] > 2 * text["encoded_rows"]
    assert text["text_encoders"].startswith("in host memory")
