"""Calibration prompts: the world's own captions for flux-tiny, a shipped list for real models."""
from __future__ import annotations

REAL_MODEL_PROMPTS = [
    "a red fox sitting in fresh snow at dawn, soft light",
    "a bowl of ramen with a soft boiled egg, top view",
    "an astronaut riding a horse on the moon, photograph",
    "a lighthouse on a rocky cliff during a storm",
    "a watercolor painting of a quiet canal in venice",
    "a close-up portrait of an old fisherman with a grey beard",
    "a modern glass house in a pine forest, architectural photo",
    "a cat wearing sunglasses lying on a beach towel",
    "a steaming cup of coffee next to an open book on a wooden table",
    "a futuristic city skyline at night with neon signs in the rain",
    "a field of sunflowers under a blue sky with white clouds",
    "a vintage red bicycle leaning against a yellow wall",
    "two hummingbirds hovering near a purple flower",
    "a pixel art castle on a floating island",
    "a snowy mountain reflected in a calm alpine lake",
    "a plate of sushi arranged on a black slate board",
    "an oil painting of a ship sailing through large waves",
    "a golden retriever puppy playing with a tennis ball on grass",
    "the word 'HELLO' written in chalk on a blackboard",
    "a cozy library with tall wooden shelves and a fireplace",
    "a macro photo of a dew drop on a green leaf",
    "a desert road with a single car driving toward the sunset",
    "a robot painting a portrait in an art studio",
    "a blue butterfly resting on a child's hand",
    "an isometric illustration of a small coffee shop",
    "a herd of elephants crossing a river at sunset",
    "a stack of pancakes with blueberries and maple syrup",
    "a medieval knight in shining armor holding a sword",
    "a hot air balloon festival over green hills",
    "a neon sign that says 'OPEN' in a dark window",
    "an underwater coral reef with colorful tropical fish",
    "a paper origami crane on a white background",
]


def calibration_prompts(model: str, count: int, seed: int = 0, embedded: bool = False) -> list[str]:
    """``count`` calibration prompts; the embedded world samples its training-split captions from ``seed``."""
    if embedded:
        from .tinyworld.world import sample_batch
        return list(sample_batch(seed=10_000 + seed, n=count, split="train")[1])
    return [REAL_MODEL_PROMPTS[i % len(REAL_MODEL_PROMPTS)] for i in range(count)]
