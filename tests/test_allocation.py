"""The bit-allocation program: optimal (checked by enumeration), within budget, clear when infeasible."""
import itertools
import json
import random

import pytest

from calibrate.allocation import (AllocationResult, allocate, allocation_plan, evaluate_assignment, reference_widths,
                                  width_cost)
from calibrate.sensitivity import LayerSensitivity, SensitivityTable
from qsched.errors import QschedError


def random_table(seed: int, n: int, weight_widths=(2, 4, 8), act_widths=(4, 8)) -> SensitivityTable:
    """Layers with realistic score shapes; sizes drawn from a few values so that some layers share one."""
    rng = random.Random(seed)
    table = SensitivityTable(weight_widths=list(weight_widths), act_widths=list(act_widths))
    for i in range(n):
        group = rng.choice(["content", "quality"])
        params = rng.choice([64, 128, 256, 512, 96])
        metric = "ssim" if group == "content" else "sqnr"
        entry = LayerSensitivity(group, params, metric, macs=params * rng.choice([1, 16]))
        if group == "content":
            level = rng.uniform(0.05, 0.5)
            entry.weight = {b: 1 - level * 4.0 ** (2 - b) * rng.uniform(0.7, 1.3) for b in weight_widths}
            entry.act = {a: 1 - level * 2.0 ** (4 - a) * rng.uniform(0.7, 1.3) for a in act_widths}
        else:
            hard = rng.uniform(0, 15)
            entry.weight = {b: 6.02 * b + 10 - hard + rng.gauss(0, 1) for b in weight_widths}
            entry.act = {a: 6.02 * a + 5 - hard + rng.gauss(0, 1) for a in act_widths}
        table.layers[f"layer{i}"] = entry
    return table


def brute_force(table, weight_budget, act_budget=None, *, weight_widths, act_widths, max_fp_act=None,
                max_bops=None, tolerance=0.02, content_weight=0.5, reference=None):
    """Enumerate every assignment; the reference the solver must match."""
    names = sorted(table.layers)
    total = sum(table.layers[n].params for n in names)
    macs = {n: table.layers[n].macs for n in names}
    best = {True: None, False: None}  # keyed by "meets the floor"
    for ws in itertools.product(weight_widths, repeat=len(names)):
        avg = sum(table.layers[n].params * width_cost(b) for n, b in zip(names, ws)) / total
        if avg > weight_budget + 1e-12:
            continue
        for acts in itertools.product(act_widths, repeat=len(names)):
            if act_budget is not None:
                if sum(macs[n] * (a - act_budget) for n, a in zip(names, acts) if a is not None) > 1e-12:
                    continue
                if max_fp_act is not None and sum(a is None for a in acts) > max_fp_act:
                    continue
            if max_bops is not None and sum(macs[n] * width_cost(b) * width_cost(a)
                                            for n, b, a in zip(names, ws, acts)) > max_bops:
                continue
            value = evaluate_assignment(table, dict(zip(names, ws)), dict(zip(names, acts)),
                                        weight_widths=list(weight_widths), act_widths=list(act_widths),
                                        content_weight=content_weight, reference=reference)
            floor = avg >= weight_budget - tolerance - 1e-12
            if best[floor] is None or value < best[floor][0]:
                best[floor] = (value, avg)
    return best[True] or best[False]


@pytest.mark.parametrize("seed", range(4))
def test_weight_allocation_matches_enumeration(seed):
    table = random_table(seed, 6)
    budget = random.Random(seed).choice([3.0, 3.5, 4.0, 5.0])
    result = allocate(table, budget, weight_widths=[2, 4, 8])
    expected, _ = brute_force(table, budget, weight_widths=[2, 4, 8], act_widths=[None])
    assert result.status == "Optimal"
    assert result.objective == pytest.approx(expected, abs=1e-9)
    assert all(a is None for a in result.act_bits.values())


@pytest.mark.parametrize("seed", range(3))
def test_joint_allocation_matches_enumeration(seed):
    table = random_table(100 + seed, 4)
    kwargs = dict(weight_widths=[2, 4, 8], act_widths=[4, 8, None], max_fp_act=1)
    result = allocate(table, 4.0, 6.0, **kwargs)
    expected, _ = brute_force(table, 4.0, 6.0, **kwargs)
    assert result.status == "Optimal"
    assert result.objective == pytest.approx(expected, abs=1e-9)
    assert len(result.fp_act_layers) <= 1


def test_bops_constraint_matches_enumeration():
    table = random_table(7, 4)
    kwargs = dict(weight_widths=[2, 4, 8], act_widths=[4, 8])
    free = allocate(table, 6.0, 8.0, **kwargs)
    cap = 0.8 * free.bops
    result = allocate(table, 6.0, 8.0, max_bops=cap, **kwargs)
    expected, _ = brute_force(table, 6.0, 8.0, max_bops=cap, **kwargs)
    assert result.bops <= cap * (1 + 1e-9)
    assert result.objective == pytest.approx(expected, abs=1e-9)


def test_budget_is_respected_and_used():
    table = random_table(3, 60, weight_widths=(2, 3, 4, 5, 6, 8))
    for budget in (3.5, 4.0, 4.25):
        result = allocate(table, budget, 8, act_widths=[4, 8, None], max_fp_act=1)
        assert result.status == "Optimal"
        assert budget - 0.02 <= result.average_weight_bits <= budget + 1e-12
        assert result.budget_floor
        assert result.average_act_bits <= 8 + 1e-12 and len(result.fp_act_layers) <= 1
        plan = allocation_plan(result, table, target=f"w{budget}a8")
        assert plan.average_weight_bits() == pytest.approx(result.average_weight_bits)


def test_fixed_fp_layers_count_in_the_budget():
    table = random_table(4, 20)
    params = sum(l.params for l in table.layers.values())
    result = allocate(table, 4.0, weight_widths=[2, 4, 8], fixed_fp_params=params // 10)
    chosen = sum(table.layers[n].params * b for n, b in result.weight_bits.items())
    assert (chosen + 16 * (params // 10)) / (params + params // 10) <= 4.0 + 1e-12


def test_infeasible_budgets_raise_clear_errors():
    table = random_table(5, 8)
    with pytest.raises(QschedError, match="weight budget 1.5 bits is infeasible"):
        allocate(table, 1.5, weight_widths=[2, 4, 8])
    with pytest.raises(QschedError, match="activation budget 3 bits is infeasible"):
        allocate(table, 4.0, 3, act_widths=[4, 8])
    floor_bops = sum(l.macs for l in table.layers.values()) * 2 * 4
    with pytest.raises(QschedError, match="no bit allocation meets"):
        allocate(table, 4.0, 8, weight_widths=[2, 4, 8], act_widths=[4, 8], max_bops=floor_bops * 0.5)


def test_content_weight_moves_bits_between_groups():
    table = random_table(6, 30, weight_widths=(2, 3, 4, 5, 6, 8))

    def content_bits(result):
        layers = [n for n, l in table.layers.items() if l.group == "content"]
        return sum(table.layers[n].params * result.weight_bits[n] for n in layers)

    low = allocate(table, 4.0, content_weight=0.1)
    high = allocate(table, 4.0, content_weight=0.9)
    assert content_bits(high) > content_bits(low)


def test_reference_widths_are_what_the_budget_stands_for():
    assert reference_widths(4.0, 8, [2, 3, 4, 8], [4, 8, None]) == (4, 8)
    assert reference_widths(3.5, 8, [2, 3, 4, 8], [4, 8]) == (3, 8)
    assert reference_widths(1.5, 6, [2, 4], [4, 8]) == (2, 8)  # below every candidate: the narrowest
    assert reference_widths(4.0, None, [2, 4], [None]) == (4, None)


@pytest.mark.parametrize("seed", range(3))
def test_budget_normalisation_is_optimal_and_differs_from_spread(seed):
    """normalise="budget" is still solved exactly (enumeration agrees) and sets another exchange rate."""
    table = random_table(20 + seed, 5, weight_widths=(2, 3, 4, 8))
    widths, acts = [2, 3, 4, 8], [4, 8, None]
    result = allocate(table, 3.5, 8, weight_widths=widths, act_widths=acts, max_fp_act=1, normalise="budget")
    reference = reference_widths(3.5, 8, widths, acts)
    value, _ = brute_force(table, 3.5, 8, weight_widths=widths, act_widths=acts, max_fp_act=1, reference=reference)
    assert result.objective == pytest.approx(value, abs=1e-9)
    # each group's uniform-at-reference loss is exactly its share of the exchange rate
    uniform_w = {n: reference[0] for n in table.layers}
    uniform_a = {n: reference[1] for n in table.layers}
    groups = {l.group for l in table.layers.values()}
    expected = sum(0.5 for _ in groups)
    assert evaluate_assignment(table, uniform_w, uniform_a, weight_widths=widths, act_widths=acts,
                               reference=reference) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(QschedError, match="unknown normalisation"):
        allocate(table, 3.5, 8, weight_widths=widths, act_widths=acts, normalise="median")


def test_noise_never_buys_a_narrower_width():
    """A layer measured (by noise) better at 2 bits than at 8 is treated as equally good, not better."""
    table = random_table(8, 3)
    entry = next(iter(table.layers.values()))
    entry.weight = {2: 0.9999, 4: 0.9990, 8: 0.9995} if entry.metric == "ssim" else {2: 60.0, 4: 50.0, 8: 55.0}
    result = allocate(table, 8.0, weight_widths=[2, 4, 8])
    assert all(b == 8 for b in result.weight_bits.values())


def test_result_and_plan_serialise():
    table = random_table(9, 10)
    result = allocate(table, 3.5, 8, weight_widths=[2, 4, 8], act_widths=[4, 8, None], max_fp_act=1)
    data = json.loads(json.dumps(result.to_dict()))
    assert AllocationResult.from_dict(data).weight_bits == result.weight_bits
    plan = allocation_plan(result, table, target="w3.5a8")
    assert plan.method == "mixdq" and set(plan.layers) == set(table.layers)
    assert all(p.reason.startswith("ILP: w") for p in plan.layers.values())
    fp = result.fp_act_layers[0]
    assert plan.layers[fp].act_bits is None and "afp" in plan.layers[fp].reason
    assert SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict()))).layers == table.layers
