"""A tiny random CLIP saved as a local directory: the scorer of rehearsals and tests, where the hub's CLIP
cannot be had. Its scores carry no meaning; it exercises the real CLIP code path (tokenizer, both towers,
CLIPScore and CLIP-IQA) at negligible cost."""
from __future__ import annotations

import re
from pathlib import Path

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def tiny_clip_vocabulary(texts) -> list[str]:
    """The special tokens, then every lower-cased word and punctuation mark of ``texts``, sorted."""
    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())}
    return list(SPECIALS) + sorted(words - set(SPECIALS))


def tiny_clip_tokenizer(vocabulary: list[str]):
    """A word-level CLIP-style tokenizer (``<bos> … <eos>``) over ``vocabulary``, whose first four entries
    are :data:`SPECIALS`."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                unk_token="<unk>", pad_token="<pad>")


def tiny_clip_model(vocab_size: int, seed: int = 0, max_positions: int = 16):
    """A one-layer, 32-wide ``transformers.CLIPModel`` at random init (deterministic in ``seed``)."""
    import torch
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=max_positions, bos_token_id=2,
                         eos_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return transformers.CLIPModel(cfg).eval()


def save_tiny_clip(path: str | Path, texts, seed: int = 0) -> Path:
    """Write a tiny CLIP whose vocabulary covers ``texts`` (e.g. the prompts it will score) to ``path``."""
    vocabulary = tiny_clip_vocabulary(texts)
    longest = max((len(re.findall(r"\w+|[^\w\s]", t)) for t in texts), default=0) + 2
    path = Path(path)
    tiny_clip_model(len(vocabulary), seed, max(16, longest)).save_pretrained(path)
    tiny_clip_tokenizer(vocabulary).save_pretrained(path)
    return path
