"""Shared fixtures: everything offline, seeded, and built here (no hub)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_WORDS = "a red blue green circle square triangle on the left right above below".split()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A randomly initialised flux-tiny-architecture pipeline saved as a local diffusers directory."""
    from qsched.tinyworld.model import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_pipeline(seed=0, words=TEST_WORDS).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_report_artifact(tmp_path_factory):
    """flux-tiny compiled once with small knobs (every stage runs, report measured): for the report tests."""
    import qsched
    from qsched.recipe import parse_recipe

    recipe = parse_recipe({"calibration": {"prompts": 8, "batch_size": 8},
                           "qsched": {"budget": 4, "prompts": 2, "heldout_prompts": 2},
                           "cache_search": {"population": 8, "generations": 1, "prompts": 4},
                           "report": {"samples": 3, "repeats": 2}})
    out = tmp_path_factory.mktemp("report-art") / "flux-tiny-w4a8"
    return qsched.compile("flux-tiny", "w4a8", out=out, recipe=recipe, eval_prompts=2, progress=False)
