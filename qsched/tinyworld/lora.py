"""A LoRA for flux-tiny, trained with peft on the shape world: the kind of adapter users bring to a
compressed pipeline, made here because no hub is reachable.

The adapter learns a style the base model never saw, colour-inverted renders (the same scenes and captions,
``255 - image``), so its effect on the images is large and easy to measure. Training is the base model's
own rectified-flow loss on the adapter's parameters only; the result is saved with diffusers'
``save_lora_weights``, the format ``pipe.load_lora_weights`` reads.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from qsched.tinyworld.train import encode, velocity
from qsched.tinyworld.world import sample_batch

#: The attention projections of both block kinds and the single blocks' MLP input: what FLUX LoRAs usually target.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "proj_mlp")


def inverted(images):
    """The style the adapter learns: every render colour-inverted."""
    return 255 - images


def train_style_lora(pipe, steps: int = 60, rank: int = 8, lr: float = 5e-3, batch: int = 16, seed: int = 0,
                     target_modules=DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """Train a LoRA on ``pipe.transformer`` for ``steps`` Adam steps and return its state dict (peft names,
    ready for ``FluxPipeline.save_lora_weights(transformer_lora_layers=...)``). ``pipe`` is left as it was:
    the adapter is removed afterwards. Seeded: the same arguments give the same adapter."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = pipe.transformer
    adapter = "style"
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules),
                                       init_lora_weights="gaussian"), adapter_name=adapter)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    transformer.train()
    try:
        for step in range(steps):
            images, captions = sample_batch(seed=seed * 1_000_003 + step, n=batch, split="train")
            x0, *cond = encode(pipe, inverted(images), captions)
            noise = torch.randn(x0.shape, generator=gen)
            sigma = torch.sigmoid(torch.randn(batch, generator=gen))
            xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
            loss = F.mse_loss(velocity(transformer, xt, sigma, *cond), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter).items()}
    finally:
        transformer.eval()
        transformer.delete_adapters(adapter)
    return state


def save_style_lora(state: dict[str, torch.Tensor], out_dir, pipeline_cls=None) -> Path:
    """Write ``state`` with diffusers' ``save_lora_weights`` (``pytorch_lora_weights.safetensors``)."""
    if pipeline_cls is None:
        from diffusers import FluxPipeline as pipeline_cls
    out = Path(out_dir)
    pipeline_cls.save_lora_weights(out, transformer_lora_layers=state, safe_serialization=True)
    return out
