"""The native denoiser under torch.compile: one graph, no graph break, plain, with a cache schedule and with
the Q-Sched scheduler; compiled output equals eager output to fp32 rounding.

Graph breaks are counted with ``torch._dynamo.explain`` and with dynamo's own break counter while a compiled
pipeline runs. Tracing uses the ``eager`` backend (what dynamo captures is what inductor would compile);
only the numerics test runs inductor, on a few layers, since a CPU inductor compile of a model is slow.
"""
import copy

import pytest
import torch
from torch import nn

from conftest import TEST_WORDS, random_quant_layer
from export.loader import compile_denoiser
from export.runtime_torch import NativeInt8Linear, native_layer
from test_runtime_torch import activations, quantize_all, rel_err, write_test_artifact

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS, TEXT = 16, 6


@pytest.fixture(scope="module")
def native_flux(tmp_path_factory):
    """Tiny FLUX with every native path (int8 matmul plain and grouped, packed 2-4 bit, FP token rows),
    streamed from an artifact as ``export.load(runtime="native")`` builds it."""
    from diffusers import FluxTransformer2DModel

    from export.format import read_manifest
    from export.loader import build_native_denoiser
    from qsched.tinyworld.model import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    quantize_all(model, fp_layers=("context_embedder",))
    path = write_test_artifact(model, tmp_path_factory.mktemp("compile") / "flux")
    denoiser = build_native_denoiser(read_manifest(path), path)
    assert any(isinstance(m, NativeInt8Linear) and m.groups > 1 for m in denoiser.modules())
    return denoiser


def flux_inputs(batch: int = 2) -> dict:
    from qsched.tinyworld.model import TRANSFORMER_CONFIG as C

    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, TOKENS, C["in_channels"], generator=gen),
                encoder_hidden_states=torch.randn(batch, TEXT, C["joint_attention_dim"], generator=gen),
                pooled_projections=torch.randn(batch, C["pooled_projection_dim"], generator=gen),
                timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(TOKENS, 3), txt_ids=torch.zeros(TEXT, 3),
                return_dict=False)


def explain(module: nn.Module, inputs: dict):
    with torch.no_grad():
        return torch._dynamo.explain(module)(**inputs)


def mixed_schedule(denoiser, steps: int = 2):
    """Step 1 reuses some components of every kind and recomputes the others."""
    from qsched.runtime.cache_schedule import CacheSchedule, block_layout

    layout = block_layout(denoiser)
    genome = [i % 2 for i in range(CacheSchedule.genome_length(steps, layout))]
    return CacheSchedule.from_genome(genome, steps, layout)


def test_native_denoiser_is_one_graph(native_flux):
    result = explain(native_flux, flux_inputs())
    assert (result.graph_count, result.graph_break_count) == (1, 0), result.break_reasons


def test_cached_native_denoiser_has_no_graph_break_on_compute_or_reuse_steps(native_flux):
    from qsched.runtime.caching import enable_cache

    schedule = mixed_schedule(native_flux)
    with enable_cache(native_flux, schedule) as handle:
        handle.reset()
        for step in range(schedule.steps):
            result = explain(native_flux, flux_inputs())
            assert (result.graph_count, result.graph_break_count) == (1, 0), (step, result.break_reasons)
            handle.advance()
        # the traced wrappers did their bookkeeping: explain runs the captured graph once per step
        assert handle.counts() == {"computed": len(schedule.slots) * 2 - schedule.num_reused,
                                   "reused": schedule.num_reused}


class GraphCounter:
    """A dynamo backend that runs the captured graph as is and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def run_tiny(pipe, steps: int) -> torch.Tensor:
    from qsched.tinyworld.model import TINY_SETTINGS

    with torch.inference_mode():
        return pipe(["a red circle on the left", "a blue square"], num_inference_steps=steps,
                    height=TINY_SETTINGS.height, width=TINY_SETTINGS.width, guidance_scale=0.0,
                    max_sequence_length=TINY_SETTINGS.max_sequence_length, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images


def test_compiled_pipeline_with_qsched_and_cache_has_no_graph_break(native_flux):
    """A whole pipeline call with Q-Sched coefficients and a cache schedule: the compiled denoiser never
    breaks its graph, compiles once per distinct step pattern (not per call), and draws what eager draws."""
    from torch._dynamo.utils import counters

    from qsched.runtime.caching import enable_cache
    from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients
    from qsched.tinyworld.model import build_tiny_pipeline

    steps = 2
    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = copy.deepcopy(native_flux)
    pipe.scheduler = QSchedScheduler.wrap(pipe.scheduler, SchedulerCoefficients(steps, [1.02, 0.97], [0.95, 1.05]))
    enable_cache(pipe, mixed_schedule(pipe.transformer, steps))
    expected = run_tiny(pipe, steps)
    counter = GraphCounter()
    torch._dynamo.reset()
    counters.clear()
    assert compile_denoiser(pipe.transformer, "full", backend=counter) == "full"
    first = run_tiny(pipe, steps)
    assert (counter.graphs, dict(counters["graph_break"])) == (steps, {})
    again = run_tiny(pipe, steps)
    assert counter.graphs == steps  # guards hold across pipeline calls: nothing recompiles
    assert torch.equal(first, expected) and torch.equal(again, expected)


def test_regional_compile_compiles_the_repeated_blocks(native_flux):
    from torch._dynamo.utils import counters

    denoiser = copy.deepcopy(native_flux)
    counter = GraphCounter()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = denoiser(**flux_inputs())[0]
        assert compile_denoiser(denoiser, "regional", backend=counter) == "regional"
        got = denoiser(**flux_inputs())[0]
    blocks = [m for m in denoiser.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(blocks) == len(denoiser.transformer_blocks) + len(denoiser.single_transformer_blocks)
    # blocks share a graph only when their layers take the same paths and bits; here (cycled configs) few do
    assert 2 <= counter.graphs <= len(blocks) and not counters["graph_break"]
    assert torch.equal(got, expected)


def test_regional_compile_shares_one_graph_across_blocks_with_different_ranges():
    """Uniform W8A8 over more single blocks than dynamo's recompile limit, each layer with its own calibrated
    range: the scales are buffers (graph inputs), not guarded constants, so each block class compiles once and
    no block falls back to eager."""
    from diffusers import FluxTransformer2DModel
    from torch._dynamo.utils import counters

    from qsched.runtime.apply import set_submodule
    from qsched.runtime.qlayers import QuantLayer
    from qsched.tinyworld.model import TRANSFORMER_CONFIG
    from export.runtime_torch import to_native_

    singles = torch._dynamo.config.recompile_limit + 2
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, num_layers=2, num_single_layers=singles)).eval()
    gen = torch.Generator().manual_seed(0)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        lo, hi = -0.5 - float(torch.rand((), generator=gen)), 2.0 + float(torch.rand((), generator=gen))
        set_submodule(model, name, QuantLayer.from_module(m, 8, 8, (lo, hi), None))
    assert set(to_native_(model)) == {"int8_mm"}
    counter = GraphCounter()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = model(**flux_inputs())[0]
        compile_denoiser(model, "regional", backend=counter)
        got = model(**flux_inputs())[0]
    assert counter.graphs <= 3  # a double block, a single block (and at most one more frame); not one per block
    assert counters["frames"]["total"] == counters["frames"]["ok"] and not counters["graph_break"]
    assert torch.equal(got, expected)


def test_inductor_output_equals_eager_to_fp32_rounding():
    """Inductor fuses the input quantization and the rescale + bias into neighbouring kernels; the integer
    product is unchanged, so compiled and eager agree to fp32 rounding on every native path."""
    model = nn.Sequential(native_layer(random_quant_layer(shape=(96, 96))), nn.GELU(),
                          native_layer(random_quant_layer(shape=(64, 96), group_size=32, seed=1)), nn.LayerNorm(64),
                          native_layer(random_quant_layer(shape=(96, 64), weight_bits=4, seed=2))).eval()
    assert [getattr(m, "path", None) for m in model] == ["int8_mm", None, "int8_mm", None, "dequant-packed4"]
    x = activations((2, 24, 96))
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    compile_denoiser(compiled, "full")
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("value,mode", [(False, "off"), (None, "off"), ("off", "off"), (True, "full"),
                                        ("full", "full"), ("regional", "regional")])
def test_compile_mode_values(value, mode):
    from export.loader import compile_mode
    assert compile_mode(value) == mode


@pytest.mark.parametrize("kwargs", [{"compile": "max-autotune"}, {"compile": 1}, {"compile": "full", "runtime": "onnx"}])
def test_bad_compile_argument_is_one_artifact_error(tmp_path, kwargs):
    import export
    from qsched.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="compile") as info:
        export.load(tmp_path, **kwargs)
    assert "\n" not in str(info.value)
