"""``--init random --width-scale F``: a registry architecture at real depth and reduced width (the rehearsal of
a full-size compile), planned and built from the shipped configs, with its bad input refused before any work."""
import pytest
import torch
from torch import nn

from qsched.core.errors import QschedError
from qsched.models.random_init import build_random_pipeline
from qsched.models.shipped_configs import SHIPPED, build_denoiser, components, scaled_component_config
from qsched.planning import plan_compile
from qsched.runtime.generation import GenerationSettings, generate

from test_cli_bad_input import check_rejected


def _linears(module):
    return sum(isinstance(m, nn.Linear) for m in module.modules())


def test_flux_keeps_its_depth_heads_and_text_projections():
    full = build_denoiser("flux-schnell")
    small = build_denoiser("flux-schnell", width_scale=1 / 24)
    c = small.config
    assert (c.num_layers, c.num_single_layers, c.attention_head_dim) == (19, 38, 128)
    assert c.num_attention_heads == 1 and c.axes_dims_rope == full.config.axes_dims_rope
    assert c.joint_attention_dim == scaled_component_config("flux-schnell", "text_encoder_2", 1 / 24)["d_model"] == 192
    assert c.pooled_projection_dim == scaled_component_config("flux-schnell", "text_encoder", 1 / 24)["hidden_size"] == 64
    assert _linears(small) == _linears(full) == 502
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters()) / 100
    assert scaled_component_config("flux-schnell", "transformer", 1.0) == \
        scaled_component_config("flux-schnell", "transformer")


@pytest.mark.parametrize("model", sorted(SHIPPED))
def test_every_registry_model_plans_at_reduced_width_with_its_full_layer_count(model):
    full = plan_compile(model, "w4a8", init="random", coefficients=False, cache_search=False, eval_prompts=0)
    small = plan_compile(model, "w4a8", init="random", width_scale=0.05, coefficients=False, cache_search=False,
                         eval_prompts=0)
    assert not any("meta-device forward failed" in w for w in small.warnings), small.warnings
    a, b = full.architecture, small.architecture
    assert b["quantizable_layers"] == a["quantizable_layers"] and b["cacheable_blocks"] == a["cacheable_blocks"]
    assert b["denoiser_parameters"] < a["denoiser_parameters"] / 20
    assert small.width_scale == 0.05 and "widths × 0.05" in b["source"]
    assert small.memory["hessians"]["shared_inputs"] > 0  # q/k/v read one input: one Hessian between them


@pytest.mark.parametrize("model,scale,size", [("flux-schnell", 1 / 24, 64), ("sdxl-turbo", 0.05, 64),
                                              ("pixart-sigma", 1 / 16, 64)])
def test_a_scaled_pipeline_samples_as_the_real_one_does(model, scale, size):
    pipe = build_random_pipeline(model, dtype=torch.float32, width_scale=scale)
    settings = GenerationSettings(steps=1, height=size, width=size, guidance_scale=0.0,
                                  max_sequence_length=16 if "text_encoder_2" in components(model) or
                                  model.startswith("pixart") else None)
    images = generate(pipe, ["a red cat"], settings)
    assert images.shape == (1, 3, size, size) and torch.isfinite(images).all()


@pytest.mark.parametrize("argv,needles", [
    (["--model", "flux-schnell", "--init", "random", "--width-scale", "0"], ["--width-scale 0.0", "(0, 1]"]),
    (["--model", "flux-schnell", "--init", "random", "--width-scale", "1.5"], ["(0, 1]"]),
    (["--model", "flux-schnell", "--width-scale", "0.1"], ["needs --init random"]),
    (["--model", "flux-tiny", "--init", "random", "--width-scale", "0.5"], ["shipped configs", "flux-tiny"]),
    (["--model", "flux-schnell", "--init", "random", "--width-scale", "nan"], ["(0, 1]"]),
], ids=["zero", "above-one", "without-random-init", "embedded-model", "nan"])
@pytest.mark.parametrize("plan", [True, False], ids=["plan", "compile"])
def test_bad_width_scale_is_one_line_and_status_2(argv, needles, plan, tmp_path, capsys):
    check_rejected(argv + (["--plan"] if plan else []) + ["--no-qsched", "--no-cache-search"], tmp_path, capsys, needles)


def test_width_scale_from_python_is_checked_like_the_cli(tmp_path):
    import qsched

    with pytest.raises(QschedError, match="needs --init random"):
        qsched.compile("flux-schnell", width_scale=0.5, out=tmp_path / "a", coefficients=False, cache_search=False)
    assert not (tmp_path / "a").exists()


def test_a_rehearsal_artifact_records_its_width_and_loads_back(tmp_path):
    """A width-scaled compile (uniform RTN here, to stay fast) records the scale and dtype in its source, so
    ``export.load`` rebuilds the same scaled pipeline around the quantized denoiser."""
    import export
    import qsched
    from qsched.recipe import load_recipe

    recipe = load_recipe("recipes/rehearsal/flux-schnell-w4a8.yaml").override(
        {"generation.height": 64, "generation.width": 64, "generation.max_sequence_length": 16,
         "generation.steps": 2, "quantization.rounding": "rtn", "calibration.prompts": 1, "report.samples": 0})
    art = qsched.compile("flux-schnell", "w8a8", out=tmp_path / "a", recipe=recipe, init="random", width_scale=1 / 24,
                         dtype="float32", uniform=True, coefficients=False, cache_search=False, eval_prompts=1,
                         progress=False)
    source = {k: v for k, v in art.manifest["source"].items() if k != "denoiser_sha256"}
    assert source == {"model": "flux-schnell", "kind": "registry-random", "revision": None, "seed": 0,
                      "width_scale": 1 / 24, "dtype": "float32"}
    pipe = export.load(art.path)
    assert pipe.transformer.config.num_attention_heads == 1 and pipe.text_encoder_2.config.d_model == 192
    images = generate(pipe, ["a red cat"], GenerationSettings(steps=2, height=64, width=64, max_sequence_length=16))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
