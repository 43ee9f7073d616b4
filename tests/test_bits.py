import pytest

from qsched.core.bits import parse_bits
from qsched.core.errors import BitSpecError


@pytest.mark.parametrize("text,w,a", [("w4a8", 4, 8), ("w8a8", 8, 8), ("w2a16", 2, 16), ("W6A4", 6, 4),
                                      ("w3.5a8", 3.5, 8), ("w5a8", 5, 8)])
def test_valid_specs(text, w, a):
    spec = parse_bits(text)
    assert (spec.weight_bits, spec.act_bits) == (w, a)
    assert str(parse_bits(str(spec))) == str(spec)


def test_fractional_budget_needs_mixed_precision():
    spec = parse_bits("w3.5a8")
    assert spec.is_fractional
    with pytest.raises(BitSpecError, match="fractional"):
        spec.uniform_weight_bits
    assert parse_bits("w4a8").uniform_weight_bits == 4 and not parse_bits("w4a8").is_fractional


def test_a16_means_float_activations():
    assert not parse_bits("w4a16").quantize_activations
    assert parse_bits("w4a8").quantize_activations


@pytest.mark.parametrize("bad", ["w7a8", "w4a6", "w1a8", "w9a8", "w4", "int4", "w8.5a8", "w1.5a8", "w4a8x", "", "w4a32"])
def test_invalid_specs_list_the_valid_forms(bad):
    with pytest.raises(BitSpecError) as err:
        parse_bits(bad)
    assert "w{2,3,4,5,6,8}a{4,8,16}" in str(err.value)
