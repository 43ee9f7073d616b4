"""CLIPScore / CLIP-IQA on a tiny random CLIP saved to disk (no hub, no downloads)."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers

from qsched.core.errors import ModelNotFoundError
from qsched.scoring import clip as clip_mod
from qsched.scoring import clip_iqa, clip_score, load_clip, preprocess
from qsched.scoring.tiny_clip import tiny_clip_model, tiny_clip_tokenizer

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "good", "bad", "photo", "a", "of", "cat", "dog", "."]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _tokenizer():
    return tiny_clip_tokenizer(WORDS)


def _tiny_clip():
    return tiny_clip_model(len(WORDS))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Hub layout: model + tokenizer + preprocessor_config.json (non-default mean/std)."""
    d = tmp_path_factory.mktemp("tiny_clip")
    _tiny_clip().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "image_mean": MEAN, "image_std": STD,
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
    }))
    return d


@pytest.fixture(scope="module")
def bundle(clip_dir):
    return load_clip(str(clip_dir))


def _images(n=4, h=32, w=32, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a photo of a cat", "a dog", "good photo .", "bad photo of a dog"]


def test_load_reads_processor_settings(bundle):
    assert bundle.crop_size == (32, 32) and bundle.resize_shortest == 32
    assert bundle.mean.tolist() == pytest.approx(MEAN) and bundle.std.tolist() == pytest.approx(STD)
    assert bundle.max_length == 16
    assert not bundle.model.training


def test_transformers5_processor_config_layout(tmp_path):
    """transformers 5 saves a CLIPProcessor as processor_config.json with a nested entry."""
    _tiny_clip().save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "CLIPProcessor",
        "image_processor": {"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1],
                            "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}},
    }))
    b = load_clip(str(tmp_path))
    assert b.resize_shortest == 40 and b.mean.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_clip_score_equals_cosine_from_clip_forward(bundle):
    images = _images()
    scores = clip_score(bundle, images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == np.float64
    # Independent path: CLIPModel.forward on hand-normalised pixels (32x32: no resize, no crop).
    model = bundle.model
    pix = (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    tok = bundle.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
    cos = torch.diagonal(out.logits_per_image) / model.logit_scale.detach().exp()
    expected = np.maximum(100.0 * cos.double().numpy(), 0.0)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
    paper = clip_score(bundle, images, PROMPTS, w=2.5)  # Hessel et al.'s scale
    np.testing.assert_allclose(paper, expected / 40, rtol=1e-5, atol=1e-5)


def test_clip_score_is_clamped_at_zero(bundle):
    """Negating the text projection flips the sign of every cosine: the scores must clamp to 0,
    and w=-100 must give back the original scores."""
    images = _images(n=6, seed=3)
    prompts = [PROMPTS[i % 4] for i in range(6)]
    scores = clip_score(bundle, images, prompts)
    assert (scores > 0).all()
    flipped = dataclasses.replace(bundle, model=copy.deepcopy(bundle.model))
    with torch.no_grad():
        flipped.model.text_projection.weight.neg_()
    assert (clip_score(flipped, images, prompts) == 0).all()
    np.testing.assert_allclose(clip_score(flipped, images, prompts, w=-100.0), scores, rtol=1e-5)


def test_scores_are_deterministic_and_batch_independent(bundle):
    images = _images(n=5, h=48, w=40, seed=2)
    prompts = PROMPTS + ["cat"]
    a = clip_score(bundle, images, prompts)
    np.testing.assert_array_equal(a, clip_score(bundle, images, prompts))
    np.testing.assert_allclose(a, clip_score(bundle, images, prompts, batch_size=2), rtol=1e-5, atol=1e-5)
    q = clip_iqa(bundle, images)
    np.testing.assert_array_equal(q, clip_iqa(bundle, images))
    np.testing.assert_allclose(q, clip_iqa(bundle, images, batch_size=1), rtol=1e-5, atol=1e-6)
    # A single prompt string applies to every image.
    np.testing.assert_allclose(
        clip_score(bundle, images, "a cat"), clip_score(bundle, images, ["a cat"] * 5), rtol=1e-6
    )


def test_clip_iqa_range_antonym_symmetry_and_pair_average(bundle):
    images = _images(n=6, seed=4)
    pair1, pair2 = ("Good photo.", "Bad photo."), ("a cat", "a dog")
    q1 = clip_iqa(bundle, images, (pair1,))
    assert q1.shape == (6,) and ((q1 >= 0) & (q1 <= 1)).all()
    np.testing.assert_allclose(clip_iqa(bundle, images, ((pair1[1], pair1[0]),)), 1 - q1, atol=1e-6)
    np.testing.assert_array_equal(clip_iqa(bundle, images), q1)  # default pair
    q2 = clip_iqa(bundle, images, (pair2,))
    np.testing.assert_allclose(clip_iqa(bundle, images, (pair1, pair2)), (q1 + q2) / 2, atol=1e-6)
    # Hand computation: softmax over 100 * cos of the two prompts.
    img = clip_mod.image_embeddings(bundle, images)
    txt = clip_mod.text_embeddings(bundle, list(pair2))
    logits = 100.0 * img @ txt.T
    np.testing.assert_allclose(q2, torch.softmax(logits, -1)[:, 0].double().numpy(), atol=1e-6)


def test_preprocess_resizes_crops_and_normalises(bundle):
    # Constant colour survives resize and crop; normalisation maps it to (c - mean) / std.
    colour = torch.tensor([0.2, 0.5, 0.9])
    images = colour[None, :, None, None].expand(2, 3, 96, 60).contiguous()
    pix = preprocess(bundle, images)
    assert pix.shape == (2, 3, 32, 32)
    expected = (colour - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(pix, expected[None, :, None, None].expand_as(pix), rtol=0, atol=1e-5)
    with pytest.raises(Exception, match=r"\[n, 3, H, W\]"):
        preprocess(bundle, torch.rand(3, 32, 32))


def test_preprocess_matches_hf_image_processor(bundle):
    """Parity with transformers' own (PIL) CLIP preprocessing on smooth images."""
    pil_image = pytest.importorskip("PIL.Image")
    ip = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    coarse = torch.rand(3, 3, 8, 6, generator=torch.Generator().manual_seed(5))
    smooth = torch.nn.functional.interpolate(coarse, size=(128, 96), mode="bilinear")
    u8 = (smooth.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    ref = ip(images=[pil_image.fromarray(a) for a in u8], return_tensors="pt")["pixel_values"]
    mine = preprocess(bundle, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    assert mine.shape == ref.shape
    assert (mine - ref).abs().max().item() < 0.05  # PIL vs torch bicubic, in normalised units


def test_offline_hub_id_raises_model_not_found(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_clip("some-org/missing-model")
    msg = str(err.value)
    assert "local directory" in msg and "offline" in msg and "some-org/missing-model" in msg
    assert "\n" not in msg


def test_unreachable_hub_raises_model_not_found(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", no_network)
    with pytest.raises(ModelNotFoundError, match="unreachable.*local directory"):
        load_clip("openai/clip-vit-large-patch14")


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_clip(str(tmp_path / "nope" / "clip"))
    with pytest.raises(ModelNotFoundError, match="not a saved CLIP directory.*local directory"):
        load_clip(str(tmp_path))


def test_prompt_count_must_match(bundle):
    with pytest.raises(Exception, match="one prompt per image"):
        clip_score(bundle, _images(n=2), ["a cat"])
