"""GPTQ weight rounding: round-to-nearest codes corrected for the layer's inputs.

Why: at 3 bits, round-to-nearest error dominates and mixed precision has no room left (every layer must
stay at 3 bits or wider). GPTQ (Frantar et al., 2022) rounds one input column at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian ``H = X^T X`` of
the layer's calibration inputs, so the layer's *output* error shrinks rather than its weight error. The
codes and scales it returns have exactly the layout of :func:`qsched.runtime.quantizers.quantize_weight`
(symmetric, per output channel or per group, max scales), so packing, the artifact and every runtime are
unchanged: only which integer each weight rounds to differs.

Linear layers only; convolutions keep round-to-nearest (their inputs would need unfolding), and so do
weights wider than :data:`GPTQ_MAX_BITS`.
"""
from __future__ import annotations

import torch
from torch import nn

from qsched.runtime.quantizers import _grouped, weight_qmax, weight_scale


#: GPTQ rounds weights of at most this width; wider ones keep round-to-nearest, which at 8 bits is within
#: 0.15 dB of GPTQ on flux-tiny (W8A8 image PSNR 43.79 against 43.93 dB) and needs no Hessian pass.
GPTQ_MAX_BITS = 6


def uses_gptq(bits: int | None) -> bool:
    """Whether a weight of ``bits`` width is GPTQ-rounded (``None``: FP, never)."""
    return bits is not None and bits <= GPTQ_MAX_BITS


class HessianObserver:
    """Accumulates ``X^T X`` (fp32, on the layer's device) of a linear layer's inputs over calibration calls."""

    def __init__(self, features: int, device=None):
        self.h = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.rows = 0

    def __call__(self, _module, args, _output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.h.addmm_(x.T, x)
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.h / max(self.rows, 1)


class SharedInputs:
    """One Hessian per distinct layer input: layers fed the very same tensor share one observer.

    FLUX's ``to_q``/``to_k``/``to_v`` read one normalised input, as do ``add_{q,k,v}_proj`` and a single
    block's ``proj_mlp`` with its attention projections; their Hessians are equal, so one is accumulated
    and handed to every member (about 7 GB of FLUX.1's 70 GB, which the down projections dominate). Found
    while the model runs, from nothing but object identity: a layer shares the observer of the layer hooked
    just before it when it receives the same tensor object on its first call. Later calls check that this
    still holds; if it ever does not, :attr:`consistent` turns False and the caller collects again unshared.
    ``share=False``: one observer per layer, never shared.
    """

    def __init__(self, layers: dict[str, nn.Module], share: bool = True):
        self.layers = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
        self.observers: dict[str, HessianObserver] = {}
        self.leader: dict[str, str] = {}
        if not share:
            self.leader = {n: n for n in self.layers}
            self.observers = {n: HessianObserver(m.in_features, m.weight.device) for n, m in self.layers.items()}
        self.consistent = True
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            prev_name, prev_x = self._last
            self._last = (name, x)
            if name not in self.leader:  # first call: share with the previous layer if fed the same tensor
                if prev_x is x and prev_name is not None and prev_name in self.leader \
                        and self.layers[prev_name].in_features == module.in_features:
                    self.leader[name] = self.leader[prev_name]
                    self.observers[name] = self.observers[self.leader[name]]
                    return  # the leader has just seen this input
                self.leader[name] = name
                self.observers[name] = HessianObserver(module.in_features, module.weight.device)
            elif self.leader[name] != name:
                if not (prev_x is x and prev_name is not None and self.leader.get(prev_name) == self.leader[name]):
                    self.consistent = False
                return
            self.observers[name](module, args, output)
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._last = (None, None)

    def hessians(self, device=None) -> dict[str, torch.Tensor]:
        """Mean ``X^T X`` per layer; members get their leader's tensor (one copy), moved to ``device`` if
        given (``"cpu"`` frees the accelerator: GPTQ brings each one back as it rounds that layer)."""
        done: dict[int, torch.Tensor] = {}
        out = {}
        for name, obs in self.observers.items():
            if not obs.rows:
                continue
            if id(obs) not in done:
                h = obs.hessian
                done[id(obs)] = h.to(device) if device is not None else h
            out[name] = done[id(obs)]
        return out

    def groups(self) -> dict[str, list[str]]:
        """Leader -> its members (itself first), for layers that share."""
        found: dict[str, list[str]] = {}
        for name, lead in self.leader.items():
            found.setdefault(lead, []).append(name)
        return {k: v for k, v in found.items() if len(v) > 1}


#: fp32 Hessians collected in one calibration pass at most
HESSIAN_CHUNK_BYTES = 4 << 30


def hessian_chunks(layers: dict[str, nn.Module], max_bytes: int) -> list[dict[str, nn.Module]]:
    """Split the linear layers into groups whose fp32 Hessians fit in ``max_bytes`` together (one layer
    alone may exceed it): FLUX.1's Hessians total about 70 GB, so they are collected a group per pass."""
    chunks, current, used = [], {}, 0
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            continue
        size = 4 * module.in_features ** 2
        if current and used + size > max_bytes:
            chunks.append(current)
            current, used = {}, 0
        current[name] = module
        used += size
    if current:
        chunks.append(current)
    return chunks


def collect_hessians(pipe, layers: dict[str, nn.Module], prompts: list[str], settings, seed: int = 0,
                     batch_size: int = 8, max_bytes: int = HESSIAN_CHUNK_BYTES, progress=False,
                     store: str | None = "cpu") -> dict[str, torch.Tensor]:
    """Mean ``X^T X`` of every linear layer's inputs over FP sampler runs on ``prompts`` (one run per
    :func:`hessian_chunks` group; one run in all for models whose Hessians fit in ``max_bytes``). Layers
    fed one tensor share one Hessian (:class:`SharedInputs`). Each group's Hessians move to ``store`` (host
    memory by default) once collected, so the accelerator holds one group at a time."""
    from qsched.runtime.generation import generate

    hessians = {}
    chunks = hessian_chunks(layers, max_bytes)
    for i, chunk in enumerate(chunks):
        label = progress if not progress or len(chunks) == 1 else f"{progress} {i + 1}/{len(chunks)}"
        share = True
        while True:
            with SharedInputs(chunk, share=share) as observed:
                generate(pipe, prompts, settings, seed=seed, batch_size=batch_size, progress=label)
            if observed.consistent:
                break
            share = False  # a layer's input stopped being its leader's: collect this group again, unshared
        hessians.update(observed.hessians(store))
    return hessians


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  damp: float = 0.01, block: int = 128, scale_method: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ codes (int8, weight's shape) and fp32 scales ``[out, groups]`` of a linear weight ``[out, in]``.

    Scales are those of round-to-nearest on the original weight (``scale_method``, per row or per group of
    ``group_size`` columns), so a zero Hessian gives round-to-nearest exactly. ``damp`` (a fraction of the mean diagonal) keeps the
    Cholesky factorisation stable; dead inputs (zero diagonal) are left to round-to-nearest."""
    w = weight.detach().to(torch.float64).clone()
    out_features, in_features = w.shape
    qmax = weight_qmax(bits)
    scale = weight_scale(_grouped(weight.detach().float(), group_size), bits, scale_method).to(torch.float64)
    size = in_features if not group_size else group_size
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_features, dtype=torch.float64, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # a singular Hessian: fall back to round-to-nearest
        hinv = torch.eye(in_features, dtype=torch.float64, device=w.device)
    codes = torch.zeros_like(w)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block = w[:, start:stop].clone()
        err_block = torch.zeros_like(w_block)
        h_block = hinv[start:stop, start:stop]
        for j in range(stop - start):
            col = start + j
            s = scale[:, col // size]
            q = torch.round(w_block[:, j] / s).clamp(-qmax, qmax)
            codes[:, col] = q
            err = (w_block[:, j] - q * s) / h_block[j, j]
            w_block[:, j:] -= err.unsqueeze(1) * h_block[j, j:].unsqueeze(0)
            err_block[:, j] = err
        w[:, stop:] -= err_block @ hinv[start:stop, stop:]
    return codes.to(torch.int8), scale.float()
