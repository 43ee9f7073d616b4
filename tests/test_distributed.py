"""Scale-out on a real local Ray cluster (two worker processes): same results as in process, and a worker
that dies mid-task is restarted and its task retried."""
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'qsched[ray]'); CI installs it")

from cache_search.guard import guard_front  # noqa: E402
from qsched.runtime.cache_schedule import block_layout  # noqa: E402
from cache_search.search import SearchConfig, distributed_schedule_quality, nsga2_search, schedule_quality  # noqa: E402
from qsched.scoring.scorer import WorldJudgeScorer  # noqa: E402
from cache_search.cost import CostModel  # noqa: E402
from calibrate.sensitivity import analyze_sensitivity  # noqa: E402
from qsched.distributed import PipelineSource, RayConfig, WorkerPool  # noqa: E402
from qsched.core.errors import QschedError  # noqa: E402
from qsched.metrics import ssim  # noqa: E402
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline  # noqa: E402

from conftest import TEST_WORDS  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square above a green triangle"]
SETTINGS = replace(TINY_SETTINGS, steps=2)
LAYERS = ["single_transformer_blocks.0.*"]  # quality layers and a content one (proj_mlp)
TWO = RayConfig(address="local", workers=2)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """A real local Ray cluster with two CPU slots; in-process runs use one thread, as each worker does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                       # workers unpickle this module's helpers by name
                                       "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                      os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0, TEST_WORDS)


class Counter:
    """Worker state for the pool tests: remembers its process and how often it was built."""

    def __init__(self, marker: str | None = None):
        self.pid, self.marker = os.getpid(), marker

    def square(self, x: int) -> tuple[int, int]:
        if self.marker and x == 3 and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies mid-task, once
        return x * x, self.pid

    def fail(self, x: int):
        raise ValueError(f"bad item {x}")


def test_pool_builds_state_once_per_worker_and_keeps_order():
    with WorkerPool(TWO, Counter) as pool:
        assert len(pool) == 2
        pids = pool.pids()
        assert len(set(pids)) == 2 and os.getpid() not in pids
        results = pool.map("square", range(10))
    assert [r for r, _ in results] == [x * x for x in range(10)]
    assert {pid for _, pid in results} <= set(pids)  # every item ran on one of the two long-lived workers


def test_a_worker_that_dies_mid_task_is_restarted_and_the_task_retried(tmp_path):
    marker = tmp_path / "died"
    with WorkerPool(TWO, lambda: Counter(str(marker))) as pool:
        results = pool.map("square", range(8))
    assert marker.exists(), "the worker never died: the test proves nothing"
    assert [r for r, _ in results] == [x * x for x in range(8)]
    assert results[3][1] != int(marker.read_text())  # item 3 was finished by a fresh process


def test_task_errors_surface_as_themselves():
    with WorkerPool(TWO, Counter) as pool, pytest.raises(ValueError, match="bad item 1"):
        pool.map("fail", [1])


def test_bad_addresses_and_sizes_are_clear_errors():
    with pytest.raises(QschedError, match="at least 1"):
        RayConfig(workers=0)
    with pytest.raises(QschedError, match="needs a value"):
        RayConfig(address="")


def _sensitivity(pipe, layers=LAYERS, **kwargs):
    return analyze_sensitivity(pipe, PROMPTS, SETTINGS, weight_widths=(4, 8), act_widths=(8,), layers=layers,
                               progress=False, **kwargs)


class DiesOnce:
    """A content metric that kills its Ray worker the first time it runs there (never the driver)."""

    def __init__(self, marker: Path, driver_pid: int):
        self.marker, self.driver_pid = marker, driver_pid

    def __call__(self, images, reference):
        if os.getpid() != self.driver_pid and not self.marker.exists():
            self.marker.write_text("died")
            os._exit(1)
        return ssim(images, reference)


@pytest.fixture(scope="module")
def local_table(pipe):
    return _sensitivity(pipe)


def _same(a, b) -> bool:
    return {n: l.to_dict() for n, l in a.layers.items()} == {n: l.to_dict() for n, l in b.layers.items()}


def test_sensitivity_on_ray_equals_in_process_even_when_a_worker_dies(pipe, local_table, tmp_path):
    remote = _sensitivity(pipe, image_metric=DiesOnce(tmp_path / "died", os.getpid()), ray=TWO)
    assert (tmp_path / "died").exists(), "no worker died: the retry path was not exercised"
    assert remote.stats["workers"] == 2 and len(local_table.layers) >= 4
    assert _same(remote, local_table)
    assert remote.stats["evaluations"] >= local_table.stats["evaluations"]  # the retried layer may count twice


def test_sensitivity_workers_can_load_the_model_themselves(tiny_pipeline_dir, pipe, local_table):
    from qsched.models.registry import state_digest

    digest = state_digest(pipe.transformer)  # the directory holds the same seeded model as ``pipe``
    layer = "single_transformer_blocks.0.proj_mlp"  # a content layer: full sampler runs on the workers
    source = PipelineSource.from_loader(str(tiny_pipeline_dir), digest=digest)
    remote = _sensitivity(pipe, layers=[layer], ray=TWO, pipeline_source=source)
    assert remote.layers[layer].to_dict() == local_table.layers[layer].to_dict()
    wrong = PipelineSource.from_loader(str(tiny_pipeline_dir), digest="0" * 64)
    with pytest.raises(QschedError, match="different weights"):
        _sensitivity(pipe, layers=[layer], ray=TWO, pipeline_source=wrong)


def test_cache_search_on_ray_finds_the_same_front(pipe):
    settings = replace(TINY_SETTINGS, steps=3)
    cost = CostModel.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
    config = SearchConfig(population=8, generations=2, seed=3, proxy_generations=1)  # generation 0 on the proxy
    layout = block_layout(pipe)
    guard_prompts = ["a green triangle", "a red square on the right"]
    # max_batch 4 → two candidates per pipeline call, so each generation is several Ray tasks
    in_process = schedule_quality(pipe, PROMPTS, settings, WorldJudgeScorer(), max_batch=4)
    local = nsga2_search(settings.steps, layout, in_process, cost.schedule_macs, config)
    local = guard_front(local, in_process.on_prompts(guard_prompts, seed=9))
    with distributed_schedule_quality(pipe, PROMPTS, settings, WorldJudgeScorer(), ray=TWO, max_batch=4) as evaluator:
        remote = nsga2_search(settings.steps, layout, evaluator, cost.schedule_macs, config)
        remote = guard_front(remote, evaluator.on_prompts(guard_prompts, seed=9))  # proxy and guard on the workers
    assert remote.evaluations == local.evaluations > config.population and local.proxy["candidates"] > 0
    assert remote.to_dict() == local.to_dict()  # qualities (search, proxy, guard) and all the counters
    assert local.counts["component_rows"] < local.counts["component_rows_naive"]


def test_cli_rejects_bad_ray_options(capsys):
    from qsched.cli import main

    assert main(["--model", "flux-tiny", "--ray-workers", "0", "--out", "/tmp/never-written"]) == 2
    assert "--ray-workers 0 must be at least 1" in capsys.readouterr().err
    assert not Path("/tmp/never-written").exists()
