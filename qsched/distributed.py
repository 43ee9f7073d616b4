"""Scale-out on Ray: spread the many independent denoiser runs of a compile over workers and machines.

Why this shape:

* the expensive stages are embarrassingly parallel over small items (one layer's sensitivity, one batch of
  cache-schedule candidates), but every item needs the whole model; so each worker is a Ray **actor** that
  loads the model once, when it starts, and then serves items (:class:`WorkerPool`);
* the model reaches a worker through a :class:`PipelineSource`: either the driver's pipeline object, put
  once into Ray's object store (whatever state it is in: quantized, with Q-Sched coefficients), or a
  loader spec (model name, init, seed) that each worker loads from its own disk or hub cache, so a
  full-size model never travels through the object store;
* items are split exactly as the in-process code splits them and results are put back in input order,
  so a distributed run gives the same numbers as the in-process one (same BitPlan, same front);
* a worker that dies mid-task is restarted by Ray (reloading the model) and its task retried
  (``max_restarts`` / ``max_task_retries`` on the actor), so the run finishes with the same result.

Without a :class:`RayConfig` nothing here is imported and everything runs in process.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

from qsched.core.errors import QschedError

INSTALL_HINT = "install it with `pip install 'qsched[ray]'` (or `pip install ray`)"


@dataclass
class RayConfig:
    """Where and how wide to run.

    ``address``: ``"auto"`` joins the cluster this machine belongs to (``ray start`` / ``RAY_ADDRESS``) and
    starts a local one when there is none; ``"local"`` always starts a local one; anything else is a
    cluster address (``host:6379`` or ``ray://host:10001``) that must be reachable. A Ray session the
    caller already started with ``ray.init`` is used as is. ``workers``: actors to start (default: one per
    GPU for a CUDA device, else one per CPU in the cluster). ``cpus_per_worker``: CPU slots each actor
    takes, also its torch thread count. ``max_retries``: restarts of a dead worker and retries of its task.
    """

    address: str = "auto"
    workers: int | None = None
    cpus_per_worker: int = 1
    max_retries: int = 3

    def __post_init__(self):
        if not self.address:
            raise QschedError("--ray needs a value: auto, local, or a cluster address such as 10.0.0.1:6379")
        if self.workers is not None and self.workers < 1:
            raise QschedError(f"--ray-workers {self.workers} must be at least 1")
        if self.cpus_per_worker < 1:
            raise QschedError(f"cpus_per_worker {self.cpus_per_worker} must be at least 1")
        if self.max_retries < 0:
            raise QschedError(f"max_retries {self.max_retries} must be 0 or more")

    def to_dict(self) -> dict:
        return asdict(self)


def _ray():
    try:
        import ray
    except ImportError:
        raise QschedError(f"--ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


def connect(config: RayConfig) -> None:
    """Attach this process to the Ray cluster ``config`` names (idempotent)."""
    ray = _ray()
    if ray.is_initialized():
        return
    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    address = config.address
    if address == "local":
        ray.init(**common)
        return
    try:
        ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as err:
        if address != "auto":
            raise QschedError(f"cannot reach the Ray cluster at {address!r} ({str(err).splitlines()[0]}); check the "
                              "address (`ray status` on the head node prints it) or use --ray local") from None
        ray.init(**common)  # no cluster to join: run one on this machine


def cluster_summary() -> dict:
    """Nodes and resources of the connected cluster (recorded in the manifest). ``connected`` is False, with
    zero resources, when no stage needed Ray (e.g. ``--uniform --no-cache-search``): nothing is started."""
    ray = _ray()
    if not ray.is_initialized():
        return {"connected": False, "nodes": 0, "cpus": 0, "gpus": 0}
    resources = ray.cluster_resources()
    return {"connected": True, "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}


# --- how a worker gets the model ---------------------------------------------------------------------


class PipelineSource:
    """A recipe for getting the same pipeline on every worker: a shared object, or a loader spec."""

    def __init__(self, ref=None, loader: dict | None = None, digest: str | None = None):
        self._ref, self._loader, self.digest = ref, loader, digest

    @classmethod
    def from_pipeline(cls, pipe) -> "PipelineSource":
        """The driver's pipeline as it is now, through the object store (fetched once per node)."""
        return cls(ref=_ray().put(pipe))

    @classmethod
    def from_loader(cls, model: str, init: str = "pretrained", seed: int = 0, device: str = "cpu",
                    digest: str | None = None, width_scale: float | None = None,
                    dtype=None) -> "PipelineSource":
        """Load ``model`` on each worker with :func:`qsched.models.registry.load_pipeline`. ``digest`` (the driver's
        ``state_digest`` of the denoiser) is checked on the worker, so a node with different weights fails
        loudly instead of silently changing the result."""
        device = "cuda" if str(device).startswith("cuda") else str(device)  # a worker sees only its own GPU
        return cls(loader={"model": model, "init": init, "seed": seed, "device": device,
                           "width_scale": width_scale, "dtype": dtype}, digest=digest)

    def load(self):
        if self._ref is not None:
            return _ray().get(self._ref)
        from qsched.models.registry import load_pipeline
        pipe, _ = load_pipeline(**self._loader)
        if self.digest is not None:
            from qsched.models.adapters import adapter_for
            from qsched.models.registry import state_digest
            found = state_digest(adapter_for(pipe).denoiser(pipe))
            if found != self.digest:
                raise QschedError(f"worker on {os.uname().nodename} loaded {self._loader['model']} with different "
                                  f"weights (denoiser sha256 {found[:12]}, driver has {self.digest[:12]}); every "
                                  "node must have the same model files")
        return pipe


# --- actors ------------------------------------------------------------------------------------------


class _Worker:
    """One actor: builds its state once (``builder()``, typically loading the model) and serves calls."""

    def __init__(self, builder: Callable[[], Any], threads: int):
        import torch
        torch.set_num_threads(max(1, threads))
        self.state = builder()

    def call(self, method: str, item):
        return getattr(self.state, method)(item)

    def pid(self) -> int:
        return os.getpid()


def _last_line(err: Exception) -> str:
    """The final line of a remote traceback: the worker's own exception and message."""
    text = getattr(err, "error_msg", None) or str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else repr(err)
    return last.split("QschedError: ", 1)[-1]


class WorkerPool:
    """``workers`` actors each holding ``builder()``; :meth:`imap` runs ``state.<method>(item)`` over items.

    Results come back in input order. Items are handed out as workers free up (one in flight per worker),
    so a slow node takes fewer items. ``device`` ``cuda*`` gives each worker one GPU.
    """

    def __init__(self, config: RayConfig, builder: Callable[[], Any], device: str = "cpu"):
        connect(config)
        ray = _ray()
        gpus = 1 if str(device).startswith("cuda") else 0
        resources = ray.cluster_resources()
        if config.workers is not None:
            n = config.workers
        elif gpus:
            n = int(resources.get("GPU", 0))
        else:
            n = int(resources.get("CPU", 1) // config.cpus_per_worker)
        if n < 1:
            raise QschedError(f"the Ray cluster has no room for a worker ({resources}); "
                              + ("a CUDA device needs GPUs in the cluster" if gpus else "add CPUs"))
        actor = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=gpus, max_restarts=config.max_retries,
                           max_task_retries=config.max_retries)(_Worker)
        self.actors = [actor.remote(builder, config.cpus_per_worker) for _ in range(n)]
        self.config = config
        try:  # wait until every worker has loaded the model, so a failure to start shows here, as itself
            ray.get([a.pid.remote() for a in self.actors])
        except ray.exceptions.RayActorError as err:
            self.close()
            raise QschedError(f"a Ray worker could not start: {_last_line(err)}") from None

    def __len__(self) -> int:
        return len(self.actors)

    def imap(self, method: str, items: Iterable) -> Iterator:
        """Yield ``(index, result)`` as tasks finish (any order); see :meth:`map` for input order."""
        ray = _ray()
        items = list(items)
        pending, free, nxt = {}, list(self.actors), 0
        while nxt < len(items) or pending:
            while free and nxt < len(items):
                actor = free.pop()
                pending[actor.call.remote(method, items[nxt])] = (nxt, actor)
                nxt += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            index, actor = pending.pop(done[0])
            free.append(actor)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:  # the task itself raised: re-raise its own error
                raise err.as_instanceof_cause() from None
            except ray.exceptions.RayActorError as err:
                raise QschedError(f"a Ray worker died {self.config.max_retries + 1} times on item {index} "
                                  f"({_last_line(err)}); raise max_retries or check the worker logs") from None
            yield index, result

    def map(self, method: str, items: Iterable) -> list:
        """All results, in input order."""
        items = list(items)
        out = [None] * len(items)
        for index, result in self.imap(method, items):
            out[index] = result
        return out

    def pids(self) -> list[int]:
        return _ray().get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
