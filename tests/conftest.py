"""Shared fixtures: everything offline, seeded, and built here (no hub)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh runs one worker per core: one thread each, children too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case a plugin imported torch before the variables above were set

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a small
    shared CPU, oversubscribed threads make the sampler-heavy tests 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_report_artifact(tmp_path_factory):
    """flux-tiny compiled once with small knobs (Q-Sched, cache search and report run; uniform widths, since
    MixDQ's sensitivity pass costs minutes and has tests of its own): for the report tests."""
    import qsched
    from qsched.recipe import parse_recipe

    recipe = parse_recipe({"calibration": {"prompts": 8, "batch_size": 8}, "quantization": {"method": "uniform"},
                           "coefficients": {"budget": 4, "prompts": 2, "heldout_prompts": 2},
                           "cache_search": {"population": 8, "generations": 1, "prompts": 4},
                           "report": {"samples": 3, "repeats": 2}})
    out = tmp_path_factory.mktemp("report-art") / "flux-tiny-w4a8"
    return qsched.compile("flux-tiny", "w4a8", out=out, recipe=recipe, eval_prompts=2, progress=False)


def random_quant_layer(kind="linear", shape=(64, 96), weight_bits=8, act_bits=8, group_size=None,
                       dtype=torch.float32, conv_args=None, bias=True, seed=0, fp_token_positions=(),
                       act_range=(-2.5, 9.0)):
    """A QuantLayer with random codes and scales (no source weights needed); activations calibrated to
    ``act_range`` (post-GELU-like by default: skewed, so the zero point is far from 0 and 128)."""
    from qsched.runtime.qlayers import QuantLayer
    from qsched.runtime.quantizers import activation_qparams, weight_qmax

    gen = torch.Generator().manual_seed(seed)
    layer = QuantLayer(kind, shape, weight_bits, act_bits, group_size, conv_args, bias, dtype,
                       fp_token_positions=fp_token_positions)
    with torch.no_grad():
        if weight_bits is None:
            layer.weight.copy_(torch.randn(shape, generator=gen) * 0.05)
        else:
            qmax = weight_qmax(weight_bits)
            layer.qweight.copy_(torch.randint(-qmax, qmax + 1, shape, generator=gen, dtype=torch.int8))
            layer.weight_scale.copy_((torch.rand(layer.weight_scale.shape, generator=gen) + 0.5) * 0.08 / qmax)
        if bias:
            layer.bias.copy_(torch.randn(shape[0], generator=gen) * 0.1)
        if act_bits is not None:
            scale, zp = activation_qparams(*act_range, act_bits)
            layer.act_scale.fill_(scale)
            layer.act_zero_point.fill_(zp)
    return layer


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP saved as a local directory: the real-model scorer of the tests (no hub)."""
    from test_clip_scoring import _tiny_clip, _tokenizer

    path = tmp_path_factory.mktemp("tiny-clip")
    _tiny_clip().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path
