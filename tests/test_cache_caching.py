"""enable_cache on live diffusers pipelines: bit-exact when recomputing, exact removal, FORA-style reuse."""
import numpy as np
import pytest
import torch

from qsched.runtime.caching import enable_cache
from qsched.runtime.cache_schedule import CacheSchedule, block_layout
from qsched.models.tiny_pixart import build_tiny_pixart_pipeline, pixart_call_kwargs
from qsched.runtime.generation import generate
from qsched.tinyworld.model import TINY_SETTINGS, build_tiny_pipeline
from conftest import TEST_WORDS

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle above a red circle"]
STEPS = TINY_SETTINGS.steps


@pytest.fixture(scope="module")
def flux():
    return build_tiny_pipeline(seed=0, words=TEST_WORDS)


@pytest.fixture(scope="module")
def flux_ref(flux):
    return generate(flux, PROMPTS, TINY_SETTINGS, seed=0, batch_size=2)  # batches of 2 and 1


def _patched(pipe):
    """Instance-level attributes the cache may install (none may survive disable)."""
    out = [m for m in pipe.transformer.modules() if "forward" in vars(m)]
    out += [a for a in ("set_timesteps", "step") if a in vars(pipe.scheduler)]
    return out


def test_all_recompute_is_bit_exact_and_disable_restores(flux, flux_ref):
    blocks = block_layout(flux)
    with enable_cache(flux, CacheSchedule.no_cache(STEPS, blocks)) as handle:
        assert _patched(flux)
        out = generate(flux, PROMPTS, TINY_SETTINGS, seed=0, batch_size=2)
        assert handle.counts() == {"computed": 2 * STEPS * 18, "reused": 0}  # 2 calls × 4 steps × 18 slots
    assert torch.equal(out, flux_ref)
    assert not _patched(flux) and not handle.active

    handle = enable_cache(flux, CacheSchedule.fora(STEPS, blocks, 2))
    cached = generate(flux, PROMPTS, TINY_SETTINGS, seed=0, batch_size=2)
    assert handle.counts() == {"computed": 2 * 2 * 18, "reused": 2 * 2 * 18}
    handle.disable()
    assert not _patched(flux)
    assert torch.equal(generate(flux, PROMPTS, TINY_SETTINGS, seed=0, batch_size=2), flux_ref)
    # reuse changes the images but keeps them finite and in range
    assert not torch.equal(cached, flux_ref)
    assert torch.isfinite(cached).all() and cached.min() >= 0 and cached.max() <= 1


def test_reuse_regates_the_stored_output(flux):
    """A reused attn returns its step-0 pre-gate output; the block gates it with the *current* step's
    gate_msa and adds it to the live residual stream (checked against a hand-written block forward)."""
    blocks = block_layout(flux)
    table = np.zeros((STEPS, sum(len(c) for _, c in blocks)), dtype=bool)
    sched = CacheSchedule(STEPS, blocks, table)
    table[1:, sched.slot("transformer_blocks.1", "attn")] = True
    sched = CacheSchedule(STEPS, blocks, table)
    block = flux.transformer.transformer_blocks[1]
    attn_outs, calls = [], []
    h1 = block.attn.register_forward_hook(lambda m, a, out: attn_outs.append(out))
    h2 = block.register_forward_hook(lambda m, a, kw, out: calls.append((kw, out)), with_kwargs=True)
    try:
        with enable_cache(flux, sched):
            generate(flux, PROMPTS[:2], TINY_SETTINGS, seed=0, batch_size=2)
    finally:
        h1.remove(), h2.remove()
    assert len(attn_outs) == STEPS
    for out in attn_outs[1:]:
        assert out[0] is attn_outs[0][0] and out[1] is attn_outs[0][1]
    stored_img = attn_outs[0][0]  # FluxAttnProcessor returns (image, context)
    kw, (enc_out, img_out) = calls[2]  # step 2: reuse
    hs, temb = kw["hidden_states"], kw["temb"]
    with torch.inference_mode():
        _, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hs, emb=temb)
        x = hs + gate_msa.unsqueeze(1) * stored_img
        y = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        expected = x + gate_mlp.unsqueeze(1) * block.ff(y)
    assert torch.equal(img_out, expected)
    # and the gate really is the current one: step 0's gate gives something else
    assert not torch.equal(block.norm1(calls[0][0]["hidden_states"], emb=calls[0][0]["temb"])[1], gate_msa)


def _run_batched(flux, schedules, groups, p, share=True):
    """Images of ``groups`` candidates × the first ``p`` prompts in one call (per-row seeded noise), and the
    cache handle (None for a plain call)."""
    gens = [torch.Generator().manual_seed(i) for _ in range(groups) for i in range(p)]
    kw = dict(num_inference_steps=STEPS, height=32, width=32, guidance_scale=0.0, output_type="pt",
              max_sequence_length=16, generator=gens)
    handle = enable_cache(flux, schedules, rows_per_group=p, share_prefixes=share) if schedules else None
    with torch.inference_mode():
        try:
            return flux(PROMPTS[:p] * groups, **kw).images, handle
        finally:
            handle is not None and handle.disable()


def test_batched_candidates_match_separate_runs(flux):
    """K schedules in one call (rows_per_group): without prefix sharing, all-recompute groups are bit-exact
    to a plain call with the same batch; each group matches its own separate run up to batch-size
    rounding. With sharing, K identical schedules collapse into one group (the denoiser runs P rows)."""
    blocks = block_layout(flux)
    scheds = [CacheSchedule.no_cache(STEPS, blocks), CacheSchedule.fora(STEPS, blocks, 2),
              CacheSchedule.attention_only(STEPS, blocks)]
    p, k = 2, len(scheds)

    def run(schedules, groups, share=True):
        return _run_batched(flux, schedules, groups, p, share)[0]

    plain = run(None, k)
    assert torch.equal(run([scheds[0]] * k, k, share=False), plain)
    same, handle = _run_batched(flux, [scheds[0]] * k, k, p)
    assert handle.row_counts()["denoiser_rows"] * k == handle.row_counts()["denoiser_rows_naive"] == k * p * STEPS
    assert all(torch.equal(same[g * p:(g + 1) * p], same[:p]) for g in range(k))
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    for share in (False, True):
        batched = run(scheds, k, share)
        for g, s in enumerate(scheds):
            alone = run([s], 1)
            torch.testing.assert_close(batched[g * p:(g + 1) * p], alone, atol=1e-5, rtol=0)
        assert not torch.equal(batched[p:2 * p], batched[:p])


def test_prefix_sharing_runs_each_shared_prefix_once(flux):
    """A hand-built batch whose candidates share prefixes of different lengths: the images equal the
    unshared batched run's up to rounding (modules run on fewer rows; see the caching module docstring),
    a duplicate candidate gets bit-identical images, and the row counts are those worked out by hand."""
    blocks = block_layout(flux)
    n = sum(len(c) for _, c in blocks)  # 18 slots
    first, last = 0, n - 1  # transformer_blocks.0.attn runs first in a forward, the last proj_out last
    none = CacheSchedule.no_cache(STEPS, blocks)

    def reuse_at(step, slot):
        table = np.zeros((STEPS, n), dtype=bool)
        table[step, slot] = True
        return CacheSchedule(STEPS, blocks, table)

    a, b, c, d = none, reuse_at(3, last), reuse_at(2, first), CacheSchedule.fora(STEPS, blocks, 2)
    scheds, p = [a, b, c, d, b], 2  # b twice
    shared, handle = _run_batched(flux, scheds, len(scheds), p, share=True)
    plain, plain_handle = _run_batched(flux, scheds, len(scheds), p, share=False)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    assert torch.equal(shared[p:2 * p], shared[4 * p:5 * p])  # the duplicate is the same computation
    assert not torch.equal(shared[:p], shared[p:2 * p])
    # denoiser rows per step: classes agreeing on steps 0..t are {abcde}, {abce}{d}, {abe}{c}{d}, {a}{be}{c}{d}
    # components, step by step (× p rows): 18 · 1 unit; 18 · 1 (d reuses everything); step 2: the first slot
    # runs a (= c's input) and d, the other 17 run a, c, d; step 3: d reuses, 17 slots run {a,b} and c, the
    # last runs a and c. Naive: a 72 computes, b, c and the duplicate 71 each, FORA-2 36.
    assert handle.row_counts() == {
        "component_rows": p * (18 + 18 + (2 + 3 * 17) + (2 * 17 + 2)), "component_rows_naive": p * (72 + 3 * 71 + 36),
        "component_rows_batched": p * len(scheds) * 72, "denoiser_rows": p * (1 + 2 + 3 + 4),
        "denoiser_rows_naive": p * len(scheds) * STEPS}
    unshared = plain_handle.row_counts()
    assert unshared["component_rows"] == unshared["component_rows_batched"] == handle.row_counts()["component_rows_batched"]
    assert unshared["component_rows_naive"] == handle.row_counts()["component_rows_naive"]


def test_prefix_sharing_cuts_only_known_batched_arguments():
    """Rows are cut by argument name: batched names are cut, known per-token tensors are left alone even
    when their length equals the batch, and an unknown batch-sized tensor is an error, not a guess."""
    from qsched.runtime.caching import _cut_kwargs

    index = torch.tensor([0, 2])
    rope = torch.zeros(4, 8)  # 4 tokens: as long as the batch
    out = _cut_kwargs({"hidden_states": torch.arange(4.0), "image_rotary_emb": (rope, rope), "txt_ids": rope,
                       "added_cond_kwargs": {"resolution": torch.arange(4.0), "aspect_ratio": None}}, 4, index, "x")
    assert out["hidden_states"].tolist() == [0.0, 2.0] and out["txt_ids"] is rope
    assert out["added_cond_kwargs"]["resolution"].tolist() == [0.0, 2.0]
    with pytest.raises(RuntimeError, match="'mystery'.*share_prefixes=False"):
        _cut_kwargs({"mystery": torch.zeros(4, 3)}, 4, index, "denoiser")


def test_quantized_components_are_cached_like_any_module():
    from qsched.runtime.qlayers import QuantLayer

    pipe = build_tiny_pipeline(seed=1, words=TEST_WORDS)
    tr = pipe.transformer
    single, double = tr.single_transformer_blocks[0], tr.transformer_blocks[0]
    single.proj_out = QuantLayer.from_module(single.proj_out, 8, None)  # a component itself
    double.ff.net[2] = QuantLayer.from_module(double.ff.net[2], 4, None, group_size=32)  # inside a component
    ref = generate(pipe, PROMPTS[:2], TINY_SETTINGS, seed=3, batch_size=2)
    blocks = block_layout(pipe)
    with enable_cache(pipe, CacheSchedule.no_cache(STEPS, blocks)):
        assert torch.equal(generate(pipe, PROMPTS[:2], TINY_SETTINGS, seed=3, batch_size=2), ref)
    with enable_cache(pipe, CacheSchedule.fora(STEPS, blocks, 3)) as handle:
        out = generate(pipe, PROMPTS[:2], TINY_SETTINGS, seed=3, batch_size=2)
        slot = handle.schedule.slot("single_transformer_blocks.0", "proj_out")
        assert handle.computed[slot] == 2 and handle.reused[slot] == 2  # steps 0, 3 computed; 1, 2 reused
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_guards(flux):
    import inspect

    blocks = block_layout(flux)
    signatures = [inspect.signature(flux.scheduler.set_timesteps), inspect.signature(flux.scheduler.step)]
    with enable_cache(flux, CacheSchedule.no_cache(STEPS, blocks)):
        # pipelines inspect these (FLUX: ``sigmas`` support; PixArt: ``generator`` / ``eta``)
        assert [inspect.signature(flux.scheduler.set_timesteps), inspect.signature(flux.scheduler.step)] == signatures
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_cache(flux, CacheSchedule.no_cache(STEPS, blocks))
        with pytest.raises(ValueError, match="runs 3 steps"):
            flux(["a red circle"], num_inference_steps=3, height=32, width=32, guidance_scale=0.0,
                 max_sequence_length=16, output_type="pt")
    with pytest.raises(ValueError, match="not a cacheable block"):
        enable_cache(flux, CacheSchedule.no_cache(STEPS, [("transformer_blocks.9", ("attn",))]))
    with pytest.raises(ValueError, match="no component"):
        enable_cache(flux, CacheSchedule.no_cache(STEPS, [("transformer_blocks.0", ("attn1",))]))
    assert not _patched(flux)  # failed installs leave nothing behind


def test_pixart_with_classifier_free_guidance():
    pipe = build_tiny_pixart_pipeline(seed=0, words=TEST_WORDS)
    blocks = block_layout(pipe)
    with torch.inference_mode():
        ref = pipe(PROMPTS, **pixart_call_kwargs(STEPS)).images
        with enable_cache(pipe, CacheSchedule.no_cache(STEPS, blocks)) as handle:
            assert torch.equal(pipe(PROMPTS, **pixart_call_kwargs(STEPS)).images, ref)
            assert handle.counts() == {"computed": STEPS * 6, "reused": 0}  # CFG halves share one call
        with enable_cache(pipe, CacheSchedule.fora(STEPS, blocks, 2)) as handle:
            cached = pipe(PROMPTS, **pixart_call_kwargs(STEPS)).images
            assert handle.counts() == {"computed": 2 * 6, "reused": 2 * 6}
        assert torch.equal(pipe(PROMPTS, **pixart_call_kwargs(STEPS)).images, ref)
    assert not torch.equal(cached, ref) and torch.isfinite(cached).all()
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())

    # two candidates in one CFG call: rows are [uncond K·P ; cond K·P], grouped by (row // P) % K
    def run(schedules, groups, share=True):
        kw = pixart_call_kwargs(STEPS)
        kw["generator"] = [torch.Generator().manual_seed(i) for _ in range(groups) for i in range(len(PROMPTS))]
        with enable_cache(pipe, schedules, rows_per_group=len(PROMPTS), share_prefixes=share) as handle, \
                torch.inference_mode():
            return pipe(PROMPTS * groups, **kw).images, handle.row_counts()

    scheds = [CacheSchedule.fora(STEPS, blocks, 2), CacheSchedule.no_cache(STEPS, blocks)]
    batched, counts = run(scheds, 2)
    # prefix sharing with both CFG halves in one call: step 0 runs once per prompt and half
    assert counts["denoiser_rows"] == 2 * 3 * (1 + 2 + 2 + 2) and counts["denoiser_rows_naive"] == 2 * 3 * 2 * STEPS
    assert counts["component_rows"] == 2 * 3 * 6 * (1 + 1 + 2 + 1) == counts["component_rows_naive"] - 2 * 3 * 6
    torch.testing.assert_close(batched, run(scheds, 2, share=False)[0], atol=1e-5, rtol=0)
    for g, s in enumerate(scheds):
        torch.testing.assert_close(batched[g * 3:(g + 1) * 3], run([s], 1)[0], atol=1e-5, rtol=0)
