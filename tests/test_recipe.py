from pathlib import Path

import pytest

from qsched.core.errors import RecipeError
from qsched.recipe import RECIPES_DIR, find_recipe, load_recipe, parse_recipe


def test_every_shipped_recipe_is_valid():
    files = sorted(RECIPES_DIR.glob("*.yaml"))
    assert files, "no shipped recipes"
    for path in files:
        recipe = load_recipe(path)
        model, _, bits = path.stem.rpartition("-")
        assert recipe.bits == bits and recipe.model == model, path


def test_find_recipe_picks_model_and_bits():
    assert find_recipe("flux-schnell", "w4a8").name == "flux-schnell-w4a8.yaml"
    assert find_recipe("no-such-model", "w4a8") is None


def test_unknown_key_names_the_key_and_valid_keys():
    with pytest.raises(RecipeError) as err:
        parse_recipe({"calibration": {"prompt": 3}})
    assert "'prompt'" in str(err.value) and "prompts" in str(err.value) and "calibration" in str(err.value)
    with pytest.raises(RecipeError, match="top level"):
        parse_recipe({"bogus": 1})


@pytest.mark.parametrize("data,match", [
    ({"calibration": {"prompts": "many"}}, "must be int"),
    ({"calibration": {"prompts": 0}}, "positive"),
    ({"quantization": {"method": "magic"}}, "method"),
    ({"bits": "w7a8"}, "invalid --bits"),
    ({"quantization": {"keep_fp": "proj_out"}}, "must be a list"),
    ({"calibration": []}, "must be a mapping"),
    ({"qsched": {"select": "best"}}, "qsched.select"),
    ({"qsched": {"patience": 0}}, "qsched.patience"),
    ({"quantization": {"min_weight_bits": 9}}, "min_weight_bits"),
    ({"quantization": {"normalise": "max"}}, "normalise"),
    ({"cache_search": {"guard_prompts": -1}}, "guard_prompts"),
    ({"cache_search": {"generations": 2, "proxy_generations": 3}}, "proxy_generations"),
])
def test_bad_values_are_rejected(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


def test_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("calibration: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_ints_are_accepted_for_floats():
    assert parse_recipe({"qsched": {"k": 2}}).qsched.k == 2.0


def test_qsched_selection_defaults_and_patience():
    default = parse_recipe({}).qsched
    assert default.select == "guard" and default.patience is None
    assert parse_recipe({"qsched": {"patience": 30, "select": "train"}}).qsched.patience == 30
