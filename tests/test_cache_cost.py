"""Analytic MACs against torch's FlopCounterMode (flops = 2 · MACs), uncached and under cache schedules."""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from qsched.runtime.caching import enable_cache
from cache_search.cost import CostModel, module_macs, token_counts
from qsched.runtime.cache_schedule import CacheSchedule, block_layout
from qsched.models.tiny_pixart import build_tiny_pixart_pipeline, pixart_call_kwargs
from conftest import TEST_WORDS
from qsched.tinyworld.model import build_tiny_pipeline

# CPU attention runs aten._scaled_dot_product_flash_attention_for_cpu, which the flop counter lacks
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}


def _flops(fn) -> dict[str, int]:
    with FlopCounterMode(display=False, depth=None, custom_mapping=_CPU_SDPA) as counter, torch.inference_mode():
        fn()
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def _flux_call(pipe, steps, batch=1):
    return lambda: pipe(["a red circle on the left"] * batch, num_inference_steps=steps, height=32, width=32,
                        guidance_scale=0.0, max_sequence_length=16, output_type="pt",
                        generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def flux():
    return build_tiny_pipeline(seed=0, words=TEST_WORDS)


@pytest.fixture(scope="module")
def pixart():
    return build_tiny_pixart_pipeline(seed=0, words=TEST_WORDS)


def _check_per_module(model, counted: dict[str, int], prefix: str, evaluations: int):
    """Every linear/conv, and every attention's two matmuls (its module total minus its projections)."""
    per_module = module_macs(model, CostModel.from_pipeline(model, 32, 32, 16).tokens)
    for path, macs in per_module.items():
        measured = counted.get(f"{prefix}.{path}", 0)
        if path.endswith(("attn", "attn1", "attn2")):
            measured -= sum(counted.get(f"{prefix}.{p}", 0) for p in per_module if p.startswith(path + "."))
        assert measured == 2 * macs * evaluations, path


def test_flux_macs_match_flop_counter(flux):
    cost = CostModel.from_pipeline(flux, 32, 32, 16)
    assert cost.tokens == token_counts(flux, 32, 32, 16) and (cost.tokens.image, cost.tokens.text) == (16, 16)
    assert cost.step_macs == cost.overhead + sum(cost.components.values())
    counted = _flops(_flux_call(flux, steps=1))
    assert counted["FluxTransformer2DModel"] == 2 * cost.step_macs
    _check_per_module(flux, counted, "FluxTransformer2DModel", 1)
    for (block, comp), macs in cost.components.items():
        assert counted[f"FluxTransformer2DModel.{block}.{comp}"] == 2 * macs


def test_pixart_macs_match_flop_counter(pixart):
    cost = CostModel.from_pipeline(pixart, 32, 32, 16)
    assert (cost.tokens.image, cost.tokens.text) == (16, 16)
    # 2 steps (this pipeline's 1-step path is special-cased), no CFG: 2 evaluations of batch 1
    counted = _flops(lambda: pixart(["a red circle"], **pixart_call_kwargs(steps=2, guidance_scale=1.0)))
    assert counted["PixArtTransformer2DModel"] == 2 * 2 * cost.step_macs
    _check_per_module(pixart, counted, "PixArtTransformer2DModel", 2)
    for (block, comp), macs in cost.components.items():
        assert counted[f"PixArtTransformer2DModel.{block}.{comp}"] == 2 * 2 * macs


def _random_schedules(steps, blocks, n, seed):
    rng = np.random.default_rng(seed)
    length = CacheSchedule.genome_length(steps, blocks)
    return [CacheSchedule.from_genome((rng.random(length) < rng.random()).astype(int).tolist(), steps, blocks)
            for _ in range(n)]


def test_schedule_macs_are_exact_for_cached_flux_runs(flux):
    cost = CostModel.from_pipeline(flux, 32, 32, 16)
    blocks = block_layout(flux)
    scheds = [CacheSchedule.fora(4, blocks, 2), CacheSchedule.ff_only(4, blocks)] + _random_schedules(4, blocks, 2, 0)
    for sched in scheds:
        with enable_cache(flux, sched):
            counted = _flops(_flux_call(flux, steps=4, batch=2))
        assert counted["FluxTransformer2DModel"] == 2 * cost.schedule_macs(sched, batch=2)
        assert cost.schedule_macs(sched) < cost.no_cache_macs(4)
    none = CacheSchedule.no_cache(4, blocks)
    assert cost.schedule_macs(none) == cost.no_cache_macs(4) == 4 * cost.step_macs and cost.mac_fraction(none) == 1
    fora2 = CacheSchedule.fora(4, blocks, 2)
    expected = 4 * cost.overhead + 2 * sum(cost.components.values())
    assert cost.schedule_macs(fora2) == expected and cost.mac_fraction(fora2) == expected / (4 * cost.step_macs)


def test_schedule_macs_are_exact_for_cached_pixart_cfg_runs(pixart):
    cost = CostModel.from_pipeline(pixart, 32, 32, 16)
    blocks = block_layout(pixart)
    for sched in [CacheSchedule.attention_only(3, blocks)] + _random_schedules(3, blocks, 2, 1):
        with enable_cache(pixart, sched):
            counted = _flops(lambda: pixart(["a red circle", "a blue square"], **pixart_call_kwargs(steps=3)))
        assert counted["PixArtTransformer2DModel"] == 2 * cost.schedule_macs(sched, batch=2, passes=2)


def test_quantized_layers_cost_like_linears():
    from qsched.runtime.qlayers import QuantLayer

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    before = CostModel.from_pipeline(pipe, 32, 32, 16)
    blk = pipe.transformer.single_transformer_blocks[1]
    blk.proj_mlp = QuantLayer.from_module(blk.proj_mlp, 4, None, group_size=32)
    pipe.transformer.x_embedder = QuantLayer.from_module(pipe.transformer.x_embedder, 8, None)
    after = CostModel.from_pipeline(pipe, 32, 32, 16)
    assert after.components == before.components and after.overhead == before.overhead


def test_unknown_layers_are_refused(flux):
    tokens = CostModel.from_pipeline(flux, 32, 32, 16).tokens
    flux.transformer.extra_head = torch.nn.Linear(4, 4)
    try:
        with pytest.raises(ValueError, match="extra_head"):
            module_macs(flux, tokens)
    finally:
        del flux.transformer.extra_head


def test_prefix_shared_batches_run_the_macs_they_count(flux):
    """The work counters of a prefix-shared batched call (what the search reports as block evaluations and
    MACs saved) are what the denoiser really ran, measured by the flop counter; less than evaluating each
    candidate on its own (``macs_naive`` = the sum of their schedule MACs)."""
    cost = CostModel.from_pipeline(flux, 32, 32, 16)
    blocks = block_layout(flux)
    scheds = [CacheSchedule.no_cache(4, blocks), CacheSchedule.fora(4, blocks, 2)] + _random_schedules(4, blocks, 2, 3)
    p = 2
    comp = np.array([cost.components[s] for s in scheds[0].slots])
    gens = [torch.Generator().manual_seed(i) for _ in scheds for i in range(p)]
    call = lambda: flux(["a red circle", "a blue square"] * len(scheds), num_inference_steps=4, height=32,  # noqa: E731
                        width=32, guidance_scale=0.0, max_sequence_length=16, output_type="pt", generator=gens)
    with enable_cache(flux, scheds, rows_per_group=p) as handle:
        counted = _flops(call)
    run = int(handle.rows_run @ comp) + handle.denoiser_rows * cost.overhead
    naive = int(handle.rows_naive @ comp) + handle.denoiser_rows_naive * cost.overhead
    assert counted["FluxTransformer2DModel"] == 2 * run
    assert naive == sum(cost.schedule_macs(s, batch=p) for s in scheds) > run


def test_measured_macs_equal_the_analytic_rules(flux, pixart):
    """The measured table (shapes of one real call), used for families without rules, agrees with the
    analytic one module by module where both exist."""
    from qsched.models.tiny_pipelines import TINY_PIXART_SETTINGS
    from qsched.tinyworld.model import TINY_SETTINGS

    from cache_search.cost import measured_module_macs

    for pipe, settings in ((flux, TINY_SETTINGS), (pixart, TINY_PIXART_SETTINGS)):
        measured, tokens = measured_module_macs(pipe, settings)
        analytic = CostModel.from_pipeline(pipe, settings.height, settings.width, settings.max_sequence_length)
        assert measured == analytic.per_module
        assert (tokens.image, tokens.text) == (analytic.tokens.image, analytic.tokens.text)


def test_unet_macs_are_measured_and_match_flop_counter():
    """SDXL's UNet has no analytic rules (its resolution changes per block): its table is measured, and the
    whole step matches torch's flop counter; the cacheable transformer blocks are priced."""
    from qsched.models.tiny_pipelines import TINY_SDXL_SETTINGS, build_tiny_sdxl_pipeline
    from qsched.runtime.generation import call_arguments

    pipe = build_tiny_sdxl_pipeline(0, TEST_WORDS)
    cost = CostModel.for_pipeline(pipe, TINY_SDXL_SETTINGS)
    assert cost.components and all(m > 0 for m in cost.components.values())
    one = __import__("dataclasses").replace(TINY_SDXL_SETTINGS, steps=1)
    counted = _flops(lambda: pipe(["a red circle"], **call_arguments(pipe, one), output_type="latent"))
    assert counted["UNet2DConditionModel"] == 2 * cost.step_macs
    for (block, comp), macs in cost.components.items():
        assert counted[f"UNet2DConditionModel.{block}.{comp}"] == 2 * macs
