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
    ({"coefficients": {"select": "best"}}, "coefficients.select"),
    ({"coefficients": {"patience": 0}}, "coefficients.patience"),
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
    assert parse_recipe({"coefficients": {"k": 2}}).coefficients.k == 2.0


def test_qsched_selection_defaults_and_patience():
    default = parse_recipe({}).coefficients
    assert default.select == "guard" and default.patience is None
    assert parse_recipe({"coefficients": {"patience": 30, "select": "train"}}).coefficients.patience == 30


def test_configs_validate_themselves_when_built_in_python():
    """A config built in Python is checked exactly like one read from YAML, with the recipe key named."""
    from qsched.recipe import CacheSearchConfig, CoefficientsConfig, QuantizationConfig

    with pytest.raises(RecipeError, match="quantization.method must be one of uniform, mixdq"):
        QuantizationConfig(method="magic")
    with pytest.raises(RecipeError, match="coefficients.select"):
        CoefficientsConfig(select="best")
    with pytest.raises(RecipeError, match="'cache_search.population' must be int"):
        CacheSearchConfig(population="16")
    with pytest.raises(RecipeError, match="multiple of 4"):
        CacheSearchConfig(population=6)
    with pytest.raises(RecipeError, match="'quantization' must be a QuantizationConfig"):
        from qsched.recipe import Recipe
        Recipe(quantization={"method": "uniform"})
    assert QuantizationConfig(weight_widths=[4, 8]).weight_widths == (4, 8)  # lists become tuples


def test_overrides_copy_and_never_change_the_recipe():
    import dataclasses

    from qsched.recipe import Recipe

    recipe = parse_recipe({"cache_search": {"budget": 0.5}, "quantization": {"keep_fp": ["proj_out"]}})
    changed = recipe.override({"cache_search.budget": 0.25, "coefficients.enabled": False, "scorer": "world-judge"})
    assert recipe.cache_search.budget == 0.5 and recipe.coefficients.enabled and recipe.scorer is None
    assert changed.cache_search.budget == 0.25 and not changed.coefficients.enabled and changed.scorer == "world-judge"
    assert changed.quantization is recipe.quantization  # untouched sections are shared, safely: they are frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.cache_search.budget = 0.1
    with pytest.raises(RecipeError, match="cache_search.budget"):
        recipe.override({"cache_search.budget": 2.0})
    with pytest.raises(RecipeError, match="unknown recipe key"):
        recipe.override({"cache_search.bugdet": 0.2})
    assert Recipe().to_dict()["quantization"]["weight_widths"] == [2, 3, 4, 5, 6, 8]


def test_stage_defaults_are_the_recipe_defaults():
    """``calibrate()`` and ``mixdq_plan()`` take the recipe's config, so a bare call uses what a compile uses."""
    import inspect

    from calibrate.calibration import calibrate
    from calibrate.mixdq import mixdq_plan
    from qsched.recipe import QuantizationConfig

    for fn in (calibrate, mixdq_plan):
        assert inspect.signature(fn).parameters["config"].default == QuantizationConfig()
    assert QuantizationConfig().rounding == "gptq" and QuantizationConfig().method == "mixdq"


def test_mixdq_objective():
    from qsched.recipe import QuantizationConfig

    assert QuantizationConfig().objective == "decoupled" and QuantizationConfig().layer_groups == {}
    assert QuantizationConfig(groups={"ff.*": "content"}).layer_groups == {"ff.*": "content"}
    assert QuantizationConfig(objective="sqnr").layer_groups == {"*": "quality"}
    with pytest.raises(RecipeError, match="groups has no effect"):
        QuantizationConfig(objective="sqnr", groups={"ff.*": "content"})
    with pytest.raises(RecipeError, match="objective must be decoupled or sqnr"):
        parse_recipe({"quantization": {"objective": "psnr"}})
