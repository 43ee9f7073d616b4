"""Apply a :class:`CacheSchedule` to a live diffusers pipeline, through the pipeline's own ``__call__``.

How (FORA-style reuse without forking any diffusers code): every scheduled component module (``attn``,
``ff``, ``proj_mlp`` ... of each block) gets an instance-level ``forward`` wrapper. On a compute step the
wrapper calls the original forward and, if a later step reuses it, stores the output; on a reuse step it
returns the stored output without running the module. The gate is applied *outside* these modules in
diffusers' block code (``gate_msa * attn_output``, ``gate_mlp * ff_output``, ``gate * proj_out(...)``,
PixArt's ``gate_msa * attn1(...)``), so the block itself re-applies the current step's AdaLN gate to the
stored pre-gate output and adds it to the live residual stream. Quantized layers are just modules inside
(or as) the components and need nothing special. Enable caching after swapping in quantized modules.

Step tracking hooks the pipeline's scheduler: ``set_timesteps`` (called once at the start of every
pipeline call) resets the step counter and frees the store, ``step`` advances it. All denoiser calls
between two ``scheduler.step`` calls belong to one step; a component called k times within a step (two
denoiser passes for true CFG, chunked feed-forward) keeps k separate stored outputs, so any batch size and
any number of passes per step work. With an all-recompute schedule nothing but the wrappers' bookkeeping
runs, so outputs are bit-identical to the uncached pipeline.

Several schedules at once (for evaluating search candidates in one batched call): pass a list of K
schedules and ``rows_per_group`` = P; batch row r belongs to candidate ``(r // P) % K`` (so the prompt
batch is K consecutive groups of P, and classifier-free guidance's concatenated halves map the same way).
A component runs when any candidate recomputes it, and the rows of candidates that reuse it are replaced
by their stored rows; when all reuse, it does not run at all. The stored tensor is thus, row by row, each
candidate's own last computed output.

Usage::

    with enable_cache(pipe, schedule) as handle:   # or handle = enable_cache(...); handle.disable()
        images = pipe(prompts, ...).images
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from .schedule import CacheSchedule, _denoiser, block_layout

_ATTR = "_qsched_cache_handle"


class CacheHandle:
    """The installed cache of one pipeline: step state, stored outputs, counters, and ``disable()``."""

    def __init__(self, pipe, schedule: CacheSchedule | Sequence[CacheSchedule], strict_steps: bool = True,
                 rows_per_group: int | None = None):
        schedules = [schedule] if isinstance(schedule, CacheSchedule) else list(schedule)
        if not schedules:
            raise ValueError("need at least one cache schedule")
        if any(not s.same_layout(schedules[0]) for s in schedules):
            raise ValueError("batched cache schedules must share steps and blocks")
        if len(schedules) > 1 and not rows_per_group:
            raise ValueError("several schedules need rows_per_group (batch rows per candidate)")
        self.schedules = schedules
        self.schedule = schedules[0]  # the layout (and the schedule, when there is one)
        self.rows_per_group = int(rows_per_group or 0)
        self.strict_steps = strict_steps
        self.denoiser = _denoiser(pipe)
        self.scheduler = getattr(pipe, "scheduler", None)
        self._pipe = pipe
        self.step = 0
        self._ready = self.scheduler is None  # with a scheduler, the first set_timesteps arms the cache
        self._calls: dict[int, int] = defaultdict(int)  # slot -> calls within the current step
        self._store: dict[tuple[int, int], object] = {}  # (slot, call) -> stored output
        self.computed = np.zeros(len(self.schedule.slots), dtype=np.int64)  # component calls that ran
        self.reused = np.zeros(len(self.schedule.slots), dtype=np.int64)  # component calls served from the store
        self._tables = np.stack([s.table for s in schedules])  # [K, steps, slots]
        table = self._tables.any(axis=0)
        # last step that reuses each slot (-1: never): outputs are stored only while a later step needs them
        self._last_reuse = np.array([np.flatnonzero(table[:, j]).max() if table[:, j].any() else -1
                                     for j in range(table.shape[1])])
        self._patched: list[tuple[object, str, bool, object]] = []  # (obj, attr, had_instance_attr, old)
        self._hooks = []
        self.active = False

    # --- step bookkeeping (called by the scheduler hooks, or by hand when driving a bare denoiser) ----

    def reset(self) -> None:
        """Start of a sampling run: step 0, nothing stored."""
        self.step = 0
        self._calls.clear()
        self._store.clear()
        self._ready = True

    def advance(self) -> None:
        """One denoising step done: the next denoiser calls belong to the next step."""
        self.step += 1
        self._calls.clear()
        for key in [k for k in self._store if self._last_reuse[k[0]] < self.step]:
            del self._store[key]  # never read again in this run

    def counts(self) -> dict[str, int]:
        return {"computed": int(self.computed.sum()), "reused": int(self.reused.sum())}

    # --- the component wrapper ------------------------------------------------------------------------

    def _run(self, slot: int, original, args, kwargs):
        call = self._calls[slot]
        self._calls[slot] = call + 1
        reuse = self._tables[:, self.step, slot]  # one flag per schedule
        if reuse.any():
            try:
                stored = self._store[(slot, call)]
            except KeyError:
                block, comp = self.schedule.slots[slot]
                raise RuntimeError(f"step {self.step} reuses {block}.{comp} (call {call}) but nothing is stored; "
                                   "was the denoiser called outside a pipeline call?") from None
            if reuse.all():
                self.reused[slot] += 1
                return stored
        out = original(*args, **kwargs)
        self.computed[slot] += 1
        if reuse.any():
            out = _merge_rows(out, stored, reuse, self.rows_per_group)
        if self._last_reuse[slot] > self.step:
            self._store[(slot, call)] = out  # by reference: diffusers' blocks never modify it in place
        return out

    def _pre_forward(self, module, args):
        if self.scheduler is not None and getattr(self._pipe, "scheduler", None) is not self.scheduler:
            raise RuntimeError("the pipeline's scheduler was replaced after enable_cache(); disable and re-enable")
        if not self._ready:
            raise RuntimeError("denoiser called before scheduler.set_timesteps(); call handle.reset() when "
                               "driving the denoiser by hand")
        if self.step >= self.schedule.steps:
            raise RuntimeError(f"denoiser step {self.step} is beyond the cache schedule's {self.schedule.steps} "
                               "steps")
        return None

    # --- install / remove -----------------------------------------------------------------------------

    def _patch(self, obj, attr: str, new) -> None:
        had = attr in vars(obj)
        self._patched.append((obj, attr, had, vars(obj).get(attr)))
        setattr(obj, attr, new)

    def _install(self) -> None:
        layout = dict(block_layout(self.denoiser))
        for block, comps in self.schedule.blocks:
            if block not in layout:
                raise ValueError(f"schedule block {block!r} is not a cacheable block of "
                                 f"{type(self.denoiser).__name__}")
            missing = set(comps) - set(layout[block])
            if missing:
                raise ValueError(f"block {block!r} has no component(s) {sorted(missing)}")
        modules = dict(self.denoiser.named_modules())
        try:
            for slot, (block, comp) in enumerate(self.schedule.slots):
                module = getattr(modules[block], comp)
                original = module.forward  # bound method, or an earlier instance-level wrapper (accelerate)

                def cached_forward(*args, _slot=slot, _original=original, **kwargs):
                    return self._run(_slot, _original, args, kwargs)

                self._patch(module, "forward", cached_forward)
            if self.scheduler is not None:
                self._hook_scheduler()
            self._hooks.append(self.denoiser.register_forward_pre_hook(self._pre_forward))
        except Exception:
            self._uninstall()
            raise
        self.active = True

    def _hook_scheduler(self) -> None:
        sched = self.scheduler
        orig_set, orig_step = sched.set_timesteps, sched.step

        # functools.wraps keeps the signatures visible (via __wrapped__): pipelines inspect set_timesteps
        # for ``sigmas`` / ``timesteps`` support and would refuse a bare (*args, **kwargs) wrapper.
        @functools.wraps(orig_set)
        def set_timesteps(*args, **kwargs):
            result = orig_set(*args, **kwargs)
            self.reset()
            n = len(sched.timesteps)
            if self.strict_steps and n != self.schedule.steps:
                raise ValueError(f"the pipeline runs {n} steps but the cache schedule has {self.schedule.steps}")
            return result

        @functools.wraps(orig_step)
        def step(*args, **kwargs):
            result = orig_step(*args, **kwargs)
            self.advance()
            return result

        self._patch(sched, "set_timesteps", set_timesteps)
        self._patch(sched, "step", step)

    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for obj, attr, had, old in reversed(self._patched):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._patched.clear()
        self._store.clear()

    def disable(self) -> None:
        """Remove every wrapper and hook; the pipeline is exactly as before ``enable_cache``."""
        if not self.active:
            return
        self._uninstall()
        self.active = False
        if getattr(self.denoiser, _ATTR, None) is self:
            delattr(self.denoiser, _ATTR)

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()


def _merge_rows(fresh, stored, reuse: np.ndarray, rows_per_group: int):
    """``fresh`` with the rows of reusing candidates taken from ``stored`` (tuples element-wise)."""
    if isinstance(fresh, (tuple, list)):
        return type(fresh)(_merge_rows(f, s, reuse, rows_per_group) for f, s in zip(fresh, stored))
    rows, k = fresh.shape[0], len(reuse)
    if rows % (rows_per_group * k):
        raise RuntimeError(f"batch of {rows} rows is not a multiple of {k} candidates × {rows_per_group} rows")
    group = (torch.arange(rows) // rows_per_group) % k
    mask = torch.as_tensor(reuse)[group].to(fresh.device).view(rows, *([1] * (fresh.ndim - 1)))
    return torch.where(mask, stored, fresh)


def enable_cache(pipe, schedule: CacheSchedule | Sequence[CacheSchedule], strict_steps: bool = True,
                 rows_per_group: int | None = None) -> CacheHandle:
    """Install ``schedule`` on ``pipe`` (a diffusers pipeline, or a bare denoiser driven by hand with
    ``handle.reset()`` / ``handle.advance()``). Returns the handle; ``handle.disable()`` removes it.

    A list of K schedules with ``rows_per_group`` = P caches each group of P batch rows by its own
    schedule (see the module docstring); MACs saved are then only those of components all K reuse.

    ``strict_steps``: refuse a pipeline call whose scheduler has a different number of timesteps than the
    schedule has steps (turn off for img2img-style pipelines that run only a tail of the timesteps).
    """
    denoiser = _denoiser(pipe)
    existing = getattr(denoiser, _ATTR, None)
    if existing is not None and existing.active:
        raise RuntimeError("a cache schedule is already enabled on this pipeline; disable it first")
    handle = CacheHandle(pipe, schedule, strict_steps=strict_steps, rows_per_group=rows_per_group)
    handle._install()
    object.__setattr__(denoiser, _ATTR, handle)  # plain attribute, not a registered submodule
    return handle
