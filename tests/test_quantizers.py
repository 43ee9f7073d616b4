"""The weight quantizer's scale choice: plain max against clipped MSE scales, and that the choice travels
through the plan, the quantized layer and the sensitivity cache."""
import pytest
import torch
from torch import nn

from qsched.runtime.apply import quantize_
from qsched.core.bitplan import BitPlan, LayerPlan
from qsched.runtime.qlayers import QuantLayer
from qsched.runtime.quantizers import dequantize_weight, quantize_weight, weight_qmax
from calibrate.sensitivity import _cache_key
from qsched.core.errors import RecipeError
from qsched.runtime.generation import GenerationSettings
from qsched.recipe import parse_recipe


def _row_error(weight, bits, method, group_size=None):
    codes, scale = quantize_weight(weight, bits, group_size, method)
    restored = dequantize_weight(codes, scale, torch.float32, group_size)
    return ((restored - weight) ** 2).reshape(weight.shape[0], -1).sum(dim=1), codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_mse_scales_never_lose_to_max_and_stay_in_range(bits, group_size):
    torch.manual_seed(bits)
    weight = torch.distributions.StudentT(3.0).sample((24, 64)) * 0.02  # heavy tails, like trained weights
    max_err, _ = _row_error(weight, bits, "max", group_size)
    mse_err, codes = _row_error(weight, bits, "mse", group_size)
    assert torch.all(mse_err <= max_err * (1 + 1e-6))
    assert int(codes.abs().max()) <= weight_qmax(bits)
    if bits <= 4:  # outliers waste levels at low widths: clipping must help somewhere
        assert float(mse_err.sum()) < 0.95 * float(max_err.sum())


def test_mse_scale_keeps_the_maximum_when_the_grid_is_exact():
    """Weights already on a symmetric grid have zero error at the max scale; ties keep it."""
    codes = torch.randint(-3, 4, (8, 32), generator=torch.Generator().manual_seed(0))
    codes[:, 0] = 3  # every row reaches the top code
    weight = codes.float() * 0.01
    _, s_max = quantize_weight(weight, 3, None, "max")
    _, s_mse = quantize_weight(weight, 3, None, "mse")
    assert torch.equal(s_max, s_mse)


def test_unknown_scale_method_is_refused():
    with pytest.raises(ValueError, match="unknown weight scale 'rms'"):
        quantize_weight(torch.ones(2, 4), 4, None, "rms")


def test_plan_scale_reaches_the_layer_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    plan = BitPlan(layers={"0": LayerPlan(3, None, params=512, weight_scale="mse"), "1": LayerPlan(3, None, params=128)})
    assert "weight_scale" not in plan.to_dict()["layers"]["1"]  # "max" is omitted: old plans hash the same
    assert BitPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    expected = {"0": quantize_weight(model[0].weight, 3, None, "mse")[1],
                "1": quantize_weight(model[1].weight, 3, None, "max")[1]}
    assert not torch.equal(expected["0"], quantize_weight(model[0].weight, 3, None, "max")[1])
    quantize_(model, plan, {})
    for name in ("0", "1"):
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLayer)
        assert torch.equal(layer.weight_scale, expected[name])


def test_sensitivity_cache_key_depends_on_the_scale_only_when_clipped():
    settings = GenerationSettings(steps=2, height=32, width=32)
    args = ("digest", ["a prompt"], [3, 4], [8], settings, 0, 1, None, None, None, 0.95, None, None)
    plain = _cache_key(*args)
    assert _cache_key(*args, "max") == plain
    assert _cache_key(*args, "mse") != plain


def test_recipe_checks_the_weight_scale():
    assert parse_recipe({}).quantization.weight_scale == "max"
    assert parse_recipe({"quantization": {"weight_scale": "mse"}}).quantization.weight_scale == "mse"
    with pytest.raises(RecipeError, match="weight_scale must be max or mse"):
        parse_recipe({"quantization": {"weight_scale": "minmax"}})


def test_range_observer_averages_or_keeps_the_envelope():
    from calibrate.statistics import RangeObserver

    calls = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.0, 5.0])]
    ema, envelope = RangeObserver(0.5), RangeObserver(None)
    for x in calls:
        ema.update(x)
        envelope.update(x)
    assert envelope.range == (-3.0, 5.0)
    assert ema.range == pytest.approx((-1.0, 3.25))  # (-1, 2) -> (-2, 1.5) -> (-1, 3.25)


def test_dequantized_cache_budget_keeps_the_numbers_and_drops_the_copies():
    """limit_dequantized_cache: layers within the budget keep their dequantized weight between calls, the
    others dequantize on every call; every output is the same either way."""
    from conftest import random_quant_layer
    from qsched.runtime.qlayers import limit_dequantized_cache

    model = nn.Sequential(*(random_quant_layer(shape=(96, 96), seed=i) for i in range(3)))
    x = torch.randn(4, 96)
    with torch.no_grad():
        unlimited = model(x)
    assert all(layer._dequantized is not None for layer in model)
    one = 96 * 96 * 4  # fp32 compute dtype
    record = limit_dequantized_cache(model, one * 1.5)
    assert record == {"cached_bytes": one, "dequantized_bytes": 3 * one, "cached_layers": 1, "layers": 3}
    with torch.no_grad():
        limited = model(x)
    assert torch.equal(limited, unlimited)
    assert [layer._dequantized is not None for layer in model] == [True, False, False]
    assert limit_dequantized_cache(model, 0)["cached_layers"] == 0 and model[0]._dequantized is None
    assert limit_dequantized_cache(model, None)["cached_bytes"] == 3 * one


def test_a_compile_records_its_dequantized_cache(tiny_report_artifact):
    record = tiny_report_artifact.manifest["stages"]["calibrate"]["dequantized_cache"]
    assert record["layers"] > 0 and record["cached_layers"] == record["layers"]  # flux-tiny: far under 8 GB
    assert record["cached_bytes"] == record["dequantized_bytes"] > 0
