"""CacheSchedule: layouts, JSON and genome round trips, step-0 rule, heuristic constructors."""
import json

import numpy as np
import pytest

from qsched.runtime.cache_schedule import CacheSchedule, block_layout

BLOCKS = (("transformer_blocks.0", ("attn", "ff", "ff_context")),
          ("single_transformer_blocks.0", ("attn", "proj_mlp", "proj_out")))
STEPS = 5


def _random_schedule(seed: int) -> CacheSchedule:
    rng = np.random.default_rng(seed)
    n = CacheSchedule.genome_length(STEPS, BLOCKS)
    return CacheSchedule.from_genome(rng.integers(0, 2, n).tolist(), STEPS, BLOCKS)


def test_json_round_trip_is_exact_and_readable():
    sched = _random_schedule(0)
    data = json.loads(json.dumps(sched.to_dict()))
    back = CacheSchedule.from_dict(data)
    assert back == sched and hash(back) == hash(sched)
    assert np.array_equal(back.table, sched.table)
    # reuse lists the reused steps per component
    for b, comps in BLOCKS:
        for c in comps:
            assert data["reuse"][b][c] == [s for s in range(STEPS) if sched.reuses(s, b, c)]


def test_genome_round_trip_excludes_step_zero():
    sched = _random_schedule(1)
    genome = sched.to_genome()
    assert len(genome) == (STEPS - 1) * 6 == CacheSchedule.genome_length(STEPS, BLOCKS)
    assert set(genome) <= {0, 1}
    assert CacheSchedule.from_genome(genome, STEPS, BLOCKS) == sched
    assert not sched.table[0].any()
    # step-major then block then component
    assert genome[0] == int(sched.reuses(1, "transformer_blocks.0", "attn"))
    assert genome[5] == int(sched.reuses(1, "single_transformer_blocks.0", "proj_out"))
    assert genome[6] == int(sched.reuses(2, "transformer_blocks.0", "attn"))
    with pytest.raises(ValueError):
        CacheSchedule.from_genome(genome[:-1], STEPS, BLOCKS)


def test_step_zero_always_computes():
    table = np.zeros((STEPS, 6), dtype=bool)
    table[0, 2] = True
    with pytest.raises(ValueError, match="step 0"):
        CacheSchedule(STEPS, BLOCKS, table)
    bad = CacheSchedule.no_cache(STEPS, BLOCKS).to_dict()
    bad["reuse"]["transformer_blocks.0"]["ff"] = [0]
    with pytest.raises(ValueError):
        CacheSchedule.from_dict(bad)


def test_from_dict_rejects_unknown_components_and_steps():
    d = CacheSchedule.no_cache(STEPS, BLOCKS).to_dict()
    d["reuse"]["transformer_blocks.0"]["attn2"] = [1]
    with pytest.raises(ValueError, match="unknown"):
        CacheSchedule.from_dict(d)
    d = CacheSchedule.no_cache(STEPS, BLOCKS).to_dict()
    d["reuse"]["transformer_blocks.0"]["attn"] = [STEPS]
    with pytest.raises(ValueError, match="outside"):
        CacheSchedule.from_dict(d)


def test_heuristics():
    none = CacheSchedule.no_cache(STEPS, BLOCKS)
    assert none.num_reused == 0
    assert CacheSchedule.fora(STEPS, BLOCKS, 1) == none
    for n in (2, 3, 4):
        f = CacheSchedule.fora(STEPS, BLOCKS, n)
        for s in range(STEPS):
            assert f.table[s].all() == (s % n != 0) and f.table[s].any() == (s % n != 0)
    att = CacheSchedule.attention_only(STEPS, BLOCKS)
    ff = CacheSchedule.ff_only(STEPS, BLOCKS)
    for s in range(STEPS):
        for b, comps in BLOCKS:
            for c in comps:
                assert att.reuses(s, b, c) == (s % 2 == 1 and c == "attn")
                assert ff.reuses(s, b, c) == (s % 2 == 1 and c in ("ff", "ff_context", "proj_mlp"))
    assert len({none, CacheSchedule.fora(STEPS, BLOCKS, 2), CacheSchedule.fora(STEPS, BLOCKS, 2)}) == 2


def test_block_layout_of_flux_and_pixart():
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    from qsched.models.tiny_pixart import PIXART_TRANSFORMER_CONFIG
    from qsched.tinyworld.model import TRANSFORMER_CONFIG

    flux = block_layout(FluxTransformer2DModel(**TRANSFORMER_CONFIG))
    assert [b for b, _ in flux] == [f"transformer_blocks.{i}" for i in range(2)] + \
        [f"single_transformer_blocks.{i}" for i in range(4)]
    assert flux[0][1] == ("attn", "ff", "ff_context") and flux[-1][1] == ("attn", "proj_mlp", "proj_out")
    pixart = block_layout(PixArtTransformer2DModel(**PIXART_TRANSFORMER_CONFIG))
    assert pixart == (("transformer_blocks.0", ("attn1", "attn2", "ff")),
                      ("transformer_blocks.1", ("attn1", "attn2", "ff")))
    with pytest.raises(ValueError):
        block_layout(__import__("torch").nn.Linear(2, 2))
