"""The embedded flux-tiny model: ships in the package, loads offline, draws what its prompt says."""
import pytest
import torch

import qsched
from qsched.runtime.generation import generate
from qsched.tinyworld.judge import judge
from qsched.tinyworld.model import TINY_SETTINGS, WEIGHTS_DIR, load_embedded
from qsched.tinyworld.world import sample_batch


@pytest.fixture(scope="module")
def pipe():
    return load_embedded()


def test_weights_ship_small_and_load_offline(pipe):
    files = list(WEIGHTS_DIR.rglob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) < 10 * 2**20
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.transformer.dtype == torch.float32


def test_shipped_weights_are_the_architecture_model_py_builds(pipe):
    """``build_tiny_pipeline(shipped=True)`` (what train_v2 trains) and the shipped weights describe one
    model: same parameter names and shapes in every component."""
    from qsched.tinyworld.model import build_tiny_pipeline

    fresh = build_tiny_pipeline(seed=0, shipped=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        shapes = {k: v.shape for k, v in getattr(fresh, name).state_dict().items()}
        assert shapes == {k: v.shape for k, v in getattr(pipe, name).state_dict().items()}, name


def test_follows_held_out_prompts_at_four_steps(pipe):
    """Guards the shipped weights and the pipeline against breakage. The shipped model (v2) is below the
    issue's target (benchmarks/tiny_model_report.py: 47.6% judged accuracy at 4 steps, colour 92%); the
    thresholds sit well above what images that ignore their prompt score, and below what it reaches."""
    _, prompts = sample_batch(seed=4321, n=96, split="test")
    images = generate(pipe, prompts, TINY_SETTINGS, seed=4321, batch_size=48)
    matched = judge(images, prompts)
    shuffled = judge(images, prompts[1:] + prompts[:1])
    assert matched.per_attribute["color"] >= 0.8
    assert matched.score > shuffled.score + 0.1 and matched.accuracy > shuffled.accuracy
    assert matched.accuracy >= 0.3  # v2 reaches about 0.48; v1 (0.33) would sit at the edge


def test_shipped_model_varies_its_draws_like_the_world(pipe):
    """Accuracy can be bought by drawing one easy layout per prompt (a low noise temperature, strong guidance),
    which the judge cannot see. The shipped model's draws of one prompt must still vary about as much as the
    world's own scenes of it (benchmarks/compare_weights.py --draws 4: layout 0.90, background 0.68 of the
    world's at 4 steps on 256 prompts for the skip-layer-guidance-distilled weights; 0.88 and 0.52 on these 24);
    a model that collapsed to one layout scores near 0."""
    import numpy as np

    from qsched.tinyworld.diversity import diversity, reference_draws

    _, prompts = sample_batch(seed=99, n=24, split="test")
    doubled = [p for p in prompts for _ in range(2)]  # two noises per prompt, in one call
    images = generate(pipe, doubled, TINY_SETTINGS, seed=99, batch_size=48)
    model = diversity(images.reshape(len(prompts), 2, *images.shape[1:]))
    world = diversity(reference_draws(prompts, draws=2, seed=99))
    assert np.isfinite(model.layout).all()
    assert model.layout.mean() >= 0.6 * world.layout.mean()
    assert model.background.mean() >= 0.3 * world.background.mean()  # 0.52 here: few prompts, noisy


def test_compile_records_judged_fidelity(tmp_path):
    from qsched.recipe import parse_recipe

    recipe = parse_recipe({"calibration": {"prompts": 16, "batch_size": 16},
                           "quantization": {"method": "uniform"},
                           "coefficients": {"budget": 6, "prompts": 4, "heldout_prompts": 4},
                           "cache_search": {"population": 8, "generations": 1, "prompts": 4}})
    art = qsched.compile("flux-tiny", "w4a8", out=tmp_path / "a", recipe=recipe, eval_prompts=16, progress=False)
    fid = art.metrics["fidelity"]
    assert fid["psnr_vs_fp"] > 15 and 0 <= fid["accuracy"] <= 1 and fid["fp_score"] > 0.2  # prompt-following, see docs/results.md
    assert art.manifest["source"]["kind"] == "embedded"
    stage = art.manifest["stages"]["coefficients"]
    assert stage["status"] in ("done", "kept identity") and stage["runs"] == 6
    import export
    loaded = export.load(art.path)
    if stage["status"] == "done":  # the learned coefficients travel with the artifact
        assert loaded.scheduler.coefficients.to_dict() == stage["coefficients"]
    cache = art.manifest["cache"]
    front = cache["pareto_front"]["points"]
    # the guard may drop the no-cache point when a cached one scores better on its held-out prompts
    assert front and all(0.0 < p["mac_fraction"] <= 1.0 for p in front)
    assert art.manifest["stages"]["cache_search"]["status"] == "done"
    assert (cache["schedule"] is None) == (not hasattr(loaded, "qsched_cache"))
    # the loaded artifact generates exactly what the compiled pipeline does (quantized + Q-Sched + cache)
    prompts = sample_batch(seed=9, n=4, split="test")[1]
    assert torch.equal(generate(loaded, prompts, TINY_SETTINGS, seed=9), generate(art.compiled_pipeline, prompts, TINY_SETTINGS, seed=9))
    assert type(loaded.transformer.transformer_blocks[0].attn.to_q).__name__ == "QuantLayer"
