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
The stored tensor is, row by row, each candidate's own last computed output.

Prefix sharing (``share_prefixes=True``, the default for K > 1): candidates whose schedules agree on steps
0..t-1 enter step t with the same latents and the same stored outputs (same prompt, same noise), so their
rows are the same computation. The cache therefore

* runs the denoiser at step t on one representative group per class of candidates that agree on steps
  0..t (its forward is wrapped: the batched arguments are cut down to those rows and the output is
  scattered back to every member), so every candidate's step 0 runs once per prompt;
* inside that forward, runs each component only on the rows that recompute it, once per class of
  representatives whose inputs are still the same: the classes start as "agree on steps 0..t-1" and are
  refined, in call order, by each component's reuse flag at step t (that flag is all that can make two
  such rows differ downstream). Reusing rows take their stored output, which is kept per candidate and
  written for every member of the class that computed it, so a class that splits later finds it.

Which rows are cut out of a call is decided by argument name (``hidden_states``, ``timestep``, ...); a
tensor argument that looks batched under any other name is an error rather than a silent guess. Running a
module on fewer rows can change floating-point results in the last bits (kernels pick their blocking by
batch size), so shared and unshared runs agree to rounding, not bit for bit; ``share_prefixes=False``
gives the plain batched behaviour: a component runs on the whole batch when any candidate recomputes it,
and the rows of candidates that reuse it are replaced by their stored rows.

Row counters (``handle.row_counts()``) say what ran: component rows (one sample through one component
call) actually computed, what per-candidate evaluation would compute (``naive``), and what the plain
batched path computes (``batched``), plus denoiser rows.

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

from qsched.runtime.cache_schedule import CacheSchedule, _denoiser, block_layout

_ATTR = "_qsched_cache_handle"

# Argument names whose tensors carry one row per batch sample (cut down to the shared rows), and names that
# never do (left alone even when their first dimension happens to equal the batch size).
_BATCHED = frozenset({"hidden_states", "encoder_hidden_states", "timestep", "guidance", "pooled_projections",
                      "attention_mask", "encoder_attention_mask", "added_cond_kwargs", "temb", "resolution",
                      "aspect_ratio"})
_UNBATCHED = frozenset({"image_rotary_emb", "txt_ids", "img_ids", "joint_attention_kwargs",
                        "cross_attention_kwargs", "return_dict"})


def restore_patches(patched: list) -> None:
    """Undo ``_patch`` calls, newest first: ``patched`` holds (object, attribute, had an instance attribute,
    its old value). Emptied afterwards."""
    for obj, attr, had, old in reversed(patched):
        if had:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)
    patched.clear()


def hook_scheduler_steps(handle, sched) -> None:
    """Make ``sched`` drive ``handle``'s step counter: ``set_timesteps`` (once per pipeline call) resets
    it and checks the step count against ``handle.schedule``, ``step`` advances it. Patched through
    ``handle._patch`` so that ``disable()`` restores the scheduler. Shared by :class:`CacheHandle` and the
    ONNX runtime's cache driver."""
    orig_set, orig_step = sched.set_timesteps, sched.step

    # functools.wraps keeps the signatures visible (via __wrapped__): pipelines inspect set_timesteps
    # for ``sigmas`` / ``timesteps`` support and would refuse a bare (*args, **kwargs) wrapper.
    @functools.wraps(orig_set)
    def set_timesteps(*args, **kwargs):
        result = orig_set(*args, **kwargs)
        handle.reset()
        n = len(sched.timesteps)
        if handle.strict_steps and n != handle.schedule.steps:
            raise ValueError(f"the pipeline runs {n} steps but the cache schedule has {handle.schedule.steps}")
        return result

    @functools.wraps(orig_step)
    def step(*args, **kwargs):
        result = orig_step(*args, **kwargs)
        handle.advance()
        return result

    handle._patch(sched, "set_timesteps", set_timesteps)
    handle._patch(sched, "step", step)


class CacheHandle:
    """The installed cache of one pipeline: step state, stored outputs, counters, and ``disable()``."""

    def __init__(self, pipe, schedule: CacheSchedule | Sequence[CacheSchedule], strict_steps: bool = True,
                 rows_per_group: int | None = None, share_prefixes: bool = True):
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
        self.share = bool(share_prefixes) and len(schedules) > 1
        self.strict_steps = strict_steps
        self.denoiser = _denoiser(pipe)
        self.scheduler = getattr(pipe, "scheduler", None)
        self._pipe = pipe
        self.step = 0
        self._ready = self.scheduler is None  # with a scheduler, the first set_timesteps arms the cache
        self._calls: dict[int, int] = defaultdict(int)  # slot -> calls within the current step
        self._store: dict[tuple[int, int], object] = {}  # (slot, call) -> stored output
        n_slots = len(self.schedule.slots)
        self.computed = np.zeros(n_slots, dtype=np.int64)  # component calls that ran
        self.reused = np.zeros(n_slots, dtype=np.int64)  # component calls served from the store
        # rows (samples × component calls): run, per-candidate ("naive"), plain batched; see row_counts()
        self.rows_run = np.zeros(n_slots, dtype=np.int64)
        self.rows_naive = np.zeros(n_slots, dtype=np.int64)
        self.rows_batched = np.zeros(n_slots, dtype=np.int64)
        self.denoiser_rows = 0
        self.denoiser_rows_naive = 0
        self._tables = np.stack([s.table for s in schedules])  # [K, steps, slots]
        table = self._tables.any(axis=0)
        # last step that reuses each slot (-1: never): outputs are stored only while a later step needs them
        self._last_reuse = np.array([np.flatnonzero(table[:, j]).max() if table[:, j].any() else -1
                                     for j in range(table.shape[1])])
        # prefix classes: _rep[t, k] = the first candidate agreeing with k on steps 0..t; _members[t, k] = the
        # size of k's class when k is its representative (else 0)
        k_count, steps = len(schedules), self.schedule.steps
        self._rep = np.zeros((steps, k_count), dtype=np.int64)
        for t in range(steps):
            first: dict[bytes, int] = {}
            for k in range(k_count):
                self._rep[t, k] = first.setdefault(self._tables[k, :t + 1].tobytes(), k)
        self._members = np.stack([np.bincount(r, minlength=k_count) for r in self._rep])
        # one schedule: each step's (reuse, store) flag pair per slot as Python bools, which torch.compile folds
        # into a graph per distinct step pattern, so the component wrappers cost the denoiser no graph break
        self._step_flags = tuple(tuple((bool(table[t, j]), bool(self._last_reuse[j] > t)) for j in range(n_slots))
                                 for t in range(steps))
        self._now = self._step_flags[0]
        self._events: list[tuple[int, int]] = []  # single-schedule component calls not yet counted
        self._active = np.arange(k_count)  # candidates whose row groups the running denoiser call holds
        self._labels = np.zeros(k_count, dtype=np.int64)  # within-call input classes of the active groups
        self._patched: list[tuple[object, str, bool, object]] = []  # (obj, attr, had_instance_attr, old)
        self._hooks = []
        self.active = False

    # --- step bookkeeping (called by the scheduler hooks, or by hand when driving a bare denoiser) ----

    def reset(self) -> None:
        """Start of a sampling run: step 0, nothing stored."""
        self._count_events()
        self.step = 0
        self._now = self._step_flags[0]
        self._calls.clear()
        self._store.clear()
        self._ready = True

    def advance(self) -> None:
        """One denoising step done: the next denoiser calls belong to the next step."""
        self._count_events()
        self.step += 1
        self._now = self._step_flags[self.step] if self.step < len(self._step_flags) else ()
        self._calls.clear()
        for key in [k for k in self._store if self._last_reuse[k[0]] < self.step]:
            del self._store[key]  # never read again in this run

    def counts(self) -> dict[str, int]:
        self._count_events()
        return {"computed": int(self.computed.sum()), "reused": int(self.reused.sum())}

    def row_counts(self) -> dict[str, int]:
        """Samples × component calls that ran (``component_rows``), that evaluating each candidate on its own
        would run (``..._naive``) and that the plain batched path runs (``..._batched``: every row whenever
        any candidate recomputes); denoiser forward rows run and per-candidate (``denoiser_rows_naive``)."""
        self._count_events()
        return {"component_rows": int(self.rows_run.sum()), "component_rows_naive": int(self.rows_naive.sum()),
                "component_rows_batched": int(self.rows_batched.sum()), "denoiser_rows": int(self.denoiser_rows),
                "denoiser_rows_naive": int(self.denoiser_rows_naive)}

    # --- the component wrapper ------------------------------------------------------------------------

    def _run(self, slot: int, original, args, kwargs):
        call = self._calls[slot]
        self._calls[slot] = call + 1
        if self.share:
            return self._run_shared(slot, call, original, args, kwargs)
        if len(self.schedules) == 1:
            return self._run_single(slot, call, original, args, kwargs)
        reuse = self._tables[:, self.step, slot]  # one flag per schedule
        rows = _batch_rows(args, kwargs)
        group = self.rows_per_group or rows
        self.rows_naive[slot] += (rows // (group * len(reuse))) * group * int((~reuse).sum())
        if reuse.any():
            stored = self._stored(slot, call)
            if reuse.all():
                self.reused[slot] += 1
                return stored
        out = original(*args, **kwargs)
        self.computed[slot] += 1
        self.rows_run[slot] += rows
        self.rows_batched[slot] += rows
        if reuse.any():
            out = _merge_rows(out, stored, reuse, self.rows_per_group)
        if self._last_reuse[slot] > self.step:
            self._store[(slot, call)] = out  # by reference: diffusers' blocks never modify it in place
        return out

    def _run_single(self, slot: int, call: int, original, args, kwargs):
        """One component call under one schedule: the batched path's bookkeeping with the decision read from
        ``_now`` (Python flags, no NumPy branch), so a compiled denoiser traces it without a graph break. The
        counters are NumPy arrays, which a traced graph cannot update in inference mode: each call appends an
        event (slot, rows computed; 0 = reused) that :meth:`_count_events` adds to them outside the graph."""
        reuse, store = self._now[slot]
        if reuse:
            self._events.append((slot, 0))
            return self._stored(slot, call)
        out = original(*args, **kwargs)
        self._events.append((slot, _batch_rows(args, kwargs)))
        if store:
            self._store[(slot, call)] = out  # by reference: diffusers' blocks never modify it in place
        return out

    def _count_events(self) -> None:
        for slot, rows in self._events:
            if rows == 0:
                self.reused[slot] += 1
                continue
            group = self.rows_per_group or rows
            self.rows_naive[slot] += (rows // group) * group
            self.computed[slot] += 1
            self.rows_run[slot] += rows
            self.rows_batched[slot] += rows
        self._events.clear()

    def _stored(self, slot: int, call: int):
        try:
            return self._store[(slot, call)]
        except KeyError:
            block, comp = self.schedule.slots[slot]
            raise RuntimeError(f"step {self.step} reuses {block}.{comp} (call {call}) but nothing is stored; "
                               "was the denoiser called outside a pipeline call?") from None

    def _run_shared(self, slot: int, call: int, original, args, kwargs):
        """One component call with prefix sharing: the active groups (representatives of this step's
        classes) are split into groups that reuse (served from the per-candidate store) and groups that
        compute, which run once per input class; the store rows of every member of a class that computed
        are overwritten in place (the store is per candidate, so a class that splits later finds them)."""
        t, active, labels, p = self.step, self._active, self._labels, self.rows_per_group
        k_all, k_act = self._tables.shape[0], len(active)
        rows = _batch_rows(args, kwargs)
        if rows % (p * k_act):
            raise RuntimeError(f"batch of {rows} rows is not a multiple of {k_act} candidates × {p} rows")
        passes = rows // (p * k_act)
        reuse = self._tables[active, t, slot]
        compute = ~reuse
        self.rows_naive[slot] += passes * p * int(self._members[t, active][compute].sum())
        key = (slot, call)
        stored = self._stored(slot, call) if reuse.any() else self._store.get(key)
        if not compute.any():
            self.reused[slot] += 1
            out = stored if k_act == k_all else _map(_take, stored, _group_rows(active, k_all, p, passes))
        else:
            computing = np.flatnonzero(compute)
            _, first = np.unique(labels[computing], return_index=True)
            units = np.sort(computing[first])  # one active group per input class among the computing ones
            unit_of = {labels[u]: i for i, u in enumerate(units)}
            if len(units) == k_act:
                fresh = original(*args, **kwargs)
            else:
                index = _group_rows(units, k_act, p, passes)
                fresh = original(*_cut(args, rows, index), **_cut_kwargs(kwargs, rows, index, "component"))
            self.computed[slot] += 1
            self.rows_run[slot] += passes * p * len(units)
            self.rows_batched[slot] += passes * p * k_all
            # fresh rows of each computing active group (its class's unit), and where they go
            unit_rows = _group_rows([unit_of[labels[a]] for a in computing], len(units), p, passes)
            in_order = np.array_equal(units, computing)  # fresh already holds exactly these groups, in order
            if len(units) == k_act:
                out = fresh
            elif not reuse.any():
                out = _map(_take, fresh, unit_rows)
            else:
                out = _map(_empty_rows, fresh, rows)
                _map(_put, out, _group_rows(computing, k_act, p, passes), fresh if in_order else
                     _map(_take, fresh, unit_rows))
                reusing = np.flatnonzero(reuse)
                _map(_put, out, _group_rows(reusing, k_act, p, passes),
                     _map(_take, stored, _group_rows(active[reusing], k_all, p, passes)))
            if self._last_reuse[slot] > t:
                if len(units) == k_act == k_all:
                    self._store[key] = fresh  # by reference: diffusers' blocks never modify it in place
                else:
                    pos = {int(c): i for i, c in enumerate(active)}
                    members = [k for k in range(k_all) if compute[pos[int(self._rep[t, k])]]]
                    sources = [unit_of[labels[pos[int(self._rep[t, k])]]] for k in members]
                    if stored is None:  # first computation: every candidate computes (step 0 always does)
                        stored = _map(_empty_rows, fresh, passes * p * k_all)
                        self._store[key] = stored
                    rows_of_units = (fresh if sources == list(range(len(units))) else
                                     _map(_take, fresh, _group_rows(sources, len(units), p, passes)))
                    _map(_put, stored, _group_rows(members, k_all, p, passes), rows_of_units)
        # the reuse flag is the only thing that can make two rows of one input class differ from here on
        _, inverse = np.unique(np.stack([labels, reuse.astype(np.int64)]), axis=1, return_inverse=True)
        self._labels = inverse.ravel()
        return out

    def _denoiser_forward(self, original, args, kwargs):
        """One denoiser call with prefix sharing: run it on the representatives of the classes of candidates
        that agree on steps 0..t, and give every member its representative's output rows."""
        t, p, k_all = self.step, self.rows_per_group, self._tables.shape[0]
        rows = _batch_rows(args, kwargs)
        if rows % (p * k_all):
            raise RuntimeError(f"denoiser batch of {rows} rows is not a multiple of {k_all} candidates × {p} rows")
        passes = rows // (p * k_all)
        reps = np.unique(self._rep[t])
        self._active = reps
        self._labels = self._rep[t - 1, reps] if t > 0 else np.zeros(len(reps), dtype=np.int64)
        self.denoiser_rows += passes * p * len(reps)
        self.denoiser_rows_naive += rows
        if len(reps) == k_all:
            return original(*args, **kwargs)
        index = _group_rows(reps, k_all, p, passes)
        out = original(*_cut(args, rows, index), **_cut_kwargs(kwargs, rows, index, "denoiser"))
        pos = {int(c): i for i, c in enumerate(reps)}
        back = _group_rows(np.array([pos[int(r)] for r in self._rep[t]]), len(reps), p, passes)
        return _index_output(out, back)

    def _pre_forward(self, module, args, kwargs):
        if self.scheduler is not None and getattr(self._pipe, "scheduler", None) is not self.scheduler:
            raise RuntimeError("the pipeline's scheduler was replaced after enable_cache(); disable and re-enable")
        if not self._ready:
            raise RuntimeError("denoiser called before scheduler.set_timesteps(); call handle.reset() when "
                               "driving the denoiser by hand")
        if self.step >= self.schedule.steps:
            raise RuntimeError(f"denoiser step {self.step} is beyond the cache schedule's {self.schedule.steps} "
                               "steps")
        if not self.share:  # the shared path counts in its forward wrapper
            rows = _batch_rows(args, kwargs)
            self.denoiser_rows += rows
            self.denoiser_rows_naive += rows
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
            if self.share:
                original = self.denoiser.forward

                def shared_forward(*args, _original=original, **kwargs):
                    return self._denoiser_forward(_original, args, kwargs)

                self._patch(self.denoiser, "forward", shared_forward)
            if self.scheduler is not None:
                self._hook_scheduler()
            self._hooks.append(self.denoiser.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        except Exception:
            self._uninstall()
            raise
        self.active = True

    def _hook_scheduler(self) -> None:
        hook_scheduler_steps(self, self.scheduler)

    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        restore_patches(self._patched)
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


def _batch_rows(args, kwargs) -> int:
    """Batch size of a denoiser or component call: its first positional tensor, else ``hidden_states``."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return int(value.shape[0])
    raise RuntimeError("cannot tell the batch size of a cached call: no positional tensor and no hidden_states")


def _group_rows(groups: np.ndarray, n_groups: int, rows_per_group: int, passes: int) -> torch.Tensor:
    """Row indices of ``groups`` (positions among ``n_groups`` groups of ``rows_per_group`` rows) in each of
    ``passes`` concatenated copies (classifier-free guidance's halves), pass-major as the batch is laid out."""
    groups = np.asarray(groups, dtype=np.int64)
    idx = ((np.arange(passes)[:, None, None] * n_groups + groups[None, :, None]) * rows_per_group
           + np.arange(rows_per_group)[None, None, :])
    return torch.as_tensor(idx.ravel())


def _is_batched(value, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows


def _take(value, index: torch.Tensor):
    return value.index_select(0, index.to(value.device))


def _cut(args, rows: int, index: torch.Tensor) -> tuple:
    """Positional arguments with their batched tensors cut down to ``index``."""
    return tuple(_take(v, index) if _is_batched(v, rows) else v for v in args)


def _cut_kwargs(kwargs: dict, rows: int, index: torch.Tensor, where: str) -> dict:
    """Keyword arguments with the batched ones (by name, see ``_BATCHED``) cut down to ``index``; a
    batch-sized tensor under an unknown name is an error, not a guess."""
    out = {}
    for name, value in kwargs.items():
        if name in _BATCHED:
            if isinstance(value, dict):
                value = {k: _take(v, index) if _is_batched(v, rows) else v for k, v in value.items()}
            elif _is_batched(value, rows):
                value = _take(value, index)
        elif name not in _UNBATCHED and _is_batched(value, rows):
            raise RuntimeError(f"prefix sharing: {where} argument {name!r} has a batch-sized first dimension but is "
                               "not a known batched argument; pass share_prefixes=False")
        out[name] = value
    return out


def _map(fn, value, *rest):
    """``fn`` over a component output's tensors (a tensor, or a tuple/list of them, element-wise)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, v, *(r[i] if isinstance(r, (tuple, list)) else r for r in rest))
                           for i, v in enumerate(value))
    return fn(value, *rest)


def _empty_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    return like.new_empty((rows, *like.shape[1:]))


def _put(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return target.index_copy_(0, index.to(target.device), source)


def _index_output(out, index: torch.Tensor):
    """A denoiser's output (tensor, tuple, or a diffusers output with ``sample``) with rows ``index``."""
    if isinstance(out, torch.Tensor):
        return _take(out, index)
    if isinstance(out, (tuple, list)):
        return type(out)(_index_output(o, index) if isinstance(o, torch.Tensor) else o for o in out)
    if hasattr(out, "sample"):
        return type(out)(sample=_take(out.sample, index))
    raise TypeError(f"cannot scatter a denoiser output of type {type(out).__name__}")


def enable_cache(pipe, schedule: CacheSchedule | Sequence[CacheSchedule], strict_steps: bool = True,
                 rows_per_group: int | None = None, share_prefixes: bool = True) -> CacheHandle:
    """Install ``schedule`` on ``pipe`` (a diffusers pipeline, or a bare denoiser driven by hand with
    ``handle.reset()`` / ``handle.advance()``). Returns the handle; ``handle.disable()`` removes it.

    A list of K schedules with ``rows_per_group`` = P caches each group of P batch rows by its own
    schedule (see the module docstring); ``share_prefixes`` runs what candidates share only once (equal
    to the unshared run up to floating-point rounding; False gives the plain batched run).

    ``strict_steps``: refuse a pipeline call whose scheduler has a different number of timesteps than the
    schedule has steps (turn off for img2img-style pipelines that run only a tail of the timesteps).
    """
    denoiser = _denoiser(pipe)
    existing = getattr(denoiser, _ATTR, None)
    if existing is not None and existing.active:
        raise RuntimeError("a cache schedule is already enabled on this pipeline; disable it first")
    handle = CacheHandle(pipe, schedule, strict_steps=strict_steps, rows_per_group=rows_per_group,
                         share_prefixes=share_prefixes)
    handle._install()
    object.__setattr__(denoiser, _ATTR, handle)  # plain attribute, not a registered submodule
    return handle
