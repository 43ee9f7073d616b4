"""Skip-layer guidance: a skipped block hands its inputs on, and the guided call is v + scale·(v − v_skip)."""
import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

from qsched.tinyworld.model import TRANSFORMER_CONFIG
from qsched.tinyworld.skip_guidance import skip_layer_guidance, skipped


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**dict(TRANSFORMER_CONFIG, num_layers=1, num_single_layers=2)).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 16, 32, generator=g), encoder_hidden_states=torch.randn(2, 16, 64, generator=g),
                pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.tensor([0.3, 0.9]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(16, 3), return_dict=False)


@torch.no_grad()
def test_a_skipped_block_is_the_identity_and_comes_back_after(model):
    gated = copy.deepcopy(model)  # zero residual gates: the block adds nothing to either stream
    block = gated.single_transformer_blocks[1]
    block.norm.linear.weight[2 * gated.inner_dim:] = 0
    block.norm.linear.bias[2 * gated.inner_dim:] = 0
    plain = model(**_inputs())[0]
    with skipped(model, ["single_transformer_blocks.1"]):
        skip = model(**_inputs())[0]
    torch.testing.assert_close(skip, gated(**_inputs())[0])
    assert not torch.allclose(skip, plain)
    torch.testing.assert_close(model(**_inputs())[0], plain)  # hooks removed


@torch.no_grad()
def test_guided_call_pushes_away_from_the_skipped_model(model):
    blocks = ["transformer_blocks.0", "single_transformer_blocks.0"]
    plain = model(**_inputs())[0]
    with skipped(model, blocks):
        weak = model(**_inputs())[0]
    with skip_layer_guidance(model, blocks, 0.75):
        guided = model(**_inputs())[0]
        as_dict = model(**{**_inputs(), "return_dict": True}).sample
    torch.testing.assert_close(guided, plain + 0.75 * (plain - weak))
    torch.testing.assert_close(as_dict, guided)
    torch.testing.assert_close(model(**_inputs())[0], plain)


@pytest.mark.parametrize("name", ["single_transformer_blocks.7", "transformer_blocks.0.attn"])
def test_unknown_block_names_the_module_path_form(model, name):
    with pytest.raises(ValueError, match="module path"):  # a sub-module is not a block: it has no two streams
        with skipped(model, [name]):
            pass


def _bench():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "benchmarks" / "tiny_skip_guidance.py"
    spec = importlib.util.spec_from_file_location("tiny_skip_guidance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_pairs_each_row_with_no_guidance(tmp_path):
    import json
    out = tmp_path / "slg.json"
    with torch.no_grad():
        _bench().main(["--skip", "single_transformer_blocks.1", "--scales", "0.5", "--steps", "1", "--prompts", "2",
                       "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["skip"], r["scale"]) for r in rows] == [([], 0.0), (["single_transformer_blocks.1"], 0.5)]
    assert rows[0]["paired_vs_plain"] == [0.0, 0.0] and 0 <= rows[1]["accuracy"] <= 1


def test_benchmark_rejects_an_unknown_block_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _bench().main(["--skip", "single_transformer_blocks.9", "--out", str(tmp_path / "x.json")])
    assert exit_.value.code == 2 and not (tmp_path / "x.json").exists()
    assert "single_transformer_blocks.9" in capsys.readouterr().err.splitlines()[-1]
