"""The bit-allocation program: optimal (checked by enumeration), within budget, clear when infeasible."""
import json
import math
import random
import re

import pytest

from calibrate.allocation import (CONTENT_WEIGHT, FP_BITS, AllocationResult, allocate, allocation_plan, evaluate_assignment,
                                  reference_widths, width_cost)
from calibrate.sensitivity import LayerSensitivity, SensitivityTable
from qsched.core.errors import QschedError


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
                max_bops=None, content_weight=CONTENT_WEIGHT, normalise="spread"):
    """The exhaustive optimum of an ``allocate`` call with the other options at their defaults."""
    objective, feasible, floor, bops, _ = enumerate_instance(
        table, weight_budget, act_budget, weight_widths=weight_widths, act_widths=act_widths, max_fp_act=max_fp_act,
        fp_act_exempt=True, budget_tolerance=0.02, fixed_fp_params=0, monotone=True, content_weight=content_weight,
        normalise=normalise)
    return exhaustive_optimum(objective, feasible & (bops <= max_bops if max_bops is not None else True), floor)


@pytest.mark.parametrize("seed", range(4))
def test_weight_allocation_matches_enumeration(seed):
    table = random_table(seed, 6)
    budget = random.Random(seed).choice([3.0, 3.5, 4.0, 5.0])
    result = allocate(table, budget, weight_widths=[2, 4, 8])
    expected = brute_force(table, budget, weight_widths=[2, 4, 8], act_widths=[None])
    assert result.status == "Optimal"
    assert result.objective == pytest.approx(expected, abs=1e-9)
    assert all(a is None for a in result.act_bits.values())


@pytest.mark.parametrize("seed", range(3))
def test_joint_allocation_matches_enumeration(seed):
    table = random_table(100 + seed, 4)
    kwargs = dict(weight_widths=[2, 4, 8], act_widths=[4, 8, None], max_fp_act=1)
    result = allocate(table, 4.0, 6.0, **kwargs)
    expected = brute_force(table, 4.0, 6.0, **kwargs)
    assert result.status == "Optimal"
    assert result.objective == pytest.approx(expected, abs=1e-9)
    assert len(result.fp_act_layers) <= 1


def test_bops_constraint_matches_enumeration():
    table = random_table(7, 4)
    kwargs = dict(weight_widths=[2, 4, 8], act_widths=[4, 8])
    free = allocate(table, 6.0, 8.0, **kwargs)
    cap = 0.8 * free.bops
    result = allocate(table, 6.0, 8.0, max_bops=cap, **kwargs)
    expected = brute_force(table, 6.0, 8.0, max_bops=cap, **kwargs)
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
    value = brute_force(table, 3.5, 8, weight_widths=widths, act_widths=acts, max_fp_act=1, normalise="budget")
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


# ------------------------------------------------------------------ randomized check against enumeration

def random_instance(rng: random.Random) -> tuple[SensitivityTable, tuple, dict]:
    """One small ``allocate`` call with every option drawn: (table, (weight budget, act budget), kwargs)."""
    table_w = sorted(rng.sample([2, 3, 4, 5, 6, 8], rng.randint(1, 3)))
    table_a = sorted(rng.sample([4, 6, 8], rng.randint(1, 2)))
    weight_widths = rng.choice([None, table_w, table_w + [None]])
    act_budget = None if rng.random() < 0.25 else round(rng.uniform(table_a[0] - 0.5, table_a[-1] + 1.0), 2)
    max_fp_act = rng.choice([None, 0, 1, 2])
    act_widths = rng.choice([None, table_a, table_a + [None], table_a[:1] + [None]])
    pairs = len(weight_widths or table_w) * (1 if act_budget is None else len(act_widths or table_a) + 1)
    n = rng.randint(2, max(2, min(6, int(math.log(3000) / math.log(max(pairs, 2))))))
    table = SensitivityTable(weight_widths=table_w, act_widths=table_a)
    macs_kind = rng.choice(["macs", "macs", "none", "some"])
    for i in range(n):
        group = rng.choice(["content", "quality"])
        params = rng.choice([64, 96, 128, 256, 512])
        macs = {"macs": params * rng.choice([1, 16]), "none": 0, "some": rng.choice([0, params * 4])}[macs_kind]
        entry = LayerSensitivity(group, params, "ssim" if group == "content" else "sqnr", macs=macs)
        if group == "content":
            level = rng.uniform(0.01, 0.5)
            lossless = rng.random() < 0.15  # bit-exact images at wide widths: SSIM exactly 1
            entry.weight = {b: 1.0 if lossless and b >= 6 else 1 - level * 4.0 ** (2 - b) * rng.uniform(0.5, 1.5)
                            for b in table_w}
            entry.act = {a: 1.0 if lossless and a == 8 else 1 - level * 2.0 ** (4 - a) * rng.uniform(0.5, 1.5)
                         for a in table_a}
        else:
            hard = rng.uniform(0, 15)
            entry.weight = {b: 6.02 * b + 10 - hard + rng.gauss(0, 2) for b in table_w}
            entry.act = {a: 6.02 * a + 5 - hard + rng.gauss(0, 2) for a in table_a}
        table.layers[f"layer{i}"] = entry
    fixed = rng.choice([0, 0, 0, 64, 256])
    total = sum(l.params for l in table.layers.values()) + fixed
    costs = [width_cost(b) for b in weight_widths or table_w]
    lo, hi, f = min(costs), max(costs), fixed / total
    weight_budget = round(rng.uniform((1 - f) * lo + 16 * f - 0.1, (1 - f) * hi + 16 * f + 0.25), 3)
    kwargs = dict(weight_widths=weight_widths, act_widths=act_widths, max_fp_act=max_fp_act,
                  fp_act_exempt=rng.random() < 0.7, budget_tolerance=rng.choice([0.02, 0.1, 0.5, 1.0]),
                  fixed_fp_params=fixed, monotone=rng.random() < 0.8,
                  content_weight=rng.choice([0.5, 0.15, 0.0, 1.0, round(rng.random(), 3)]),
                  normalise=rng.choice(["spread", "budget"]))
    return table, (weight_budget, act_budget), kwargs


def enumerate_instance(table, weight_budget, act_budget, *, weight_widths, act_widths, max_fp_act, fp_act_exempt,
                       budget_tolerance, fixed_fp_params, monotone, content_weight, normalise):
    """Every assignment of an ``allocate`` call, vectorised: (objective, feasible, meets floor, BOPs), flat,
    and the flat index of a plan ({layer: weight bits}, {layer: act bits}).

    Widths and defaults are resolved as ``allocate`` documents them; the objective is
    :func:`evaluate_assignment`'s, decomposed per layer (it is a sum over layers)."""
    import numpy as np

    names = sorted(table.layers)
    widths = list(weight_widths) if weight_widths is not None else sorted(table.weight_widths)
    if act_budget is None:
        acts = [None]
    else:
        acts = list(act_widths) if act_widths is not None else sorted(table.act_widths) + (
            [None] if max_fp_act != 0 else [])
    reference = None if normalise == "spread" else reference_widths(weight_budget, act_budget, widths, acts)
    score_args = dict(weight_widths=widths, act_widths=acts, content_weight=content_weight, monotone=monotone,
                      reference=reference)
    pairs = [(b, a) for b in widths for a in acts]
    base_w, base_a = {n: widths[0] for n in names}, {n: acts[0] for n in names}
    base = evaluate_assignment(table, base_w, base_a, **score_args)
    layers = table.layers
    total = sum(layers[n].params for n in names) + fixed_fp_params
    act_w = {n: (layers[n].macs if all(layers[m].macs > 0 for m in names) else layers[n].params) for n in names}
    act_total = sum(act_w.values())
    columns = []  # per layer: loss, weight bits, act term, FP count, BOPs for each (b, a) pair
    for n in names:
        rows = []
        for b, a in pairs:
            delta = evaluate_assignment(table, {**base_w, n: b}, {**base_a, n: a}, **score_args) - base
            act_term = (0.0 if a is None else act_w[n] / act_total * (a - act_budget)) if fp_act_exempt else (
                act_w[n] / act_total * width_cost(a))
            rows.append((delta, layers[n].params / total * width_cost(b), act_term, a is None,
                         (layers[n].macs or layers[n].params) * width_cost(b) * width_cost(a)))
        columns.append(np.array(rows, dtype=float))
    grid = columns[0]
    for col in columns[1:]:
        grid = (grid[:, None, :] + col[None, :, :]).reshape(-1, col.shape[1])
    loss, avg, act_sum, fp_count, bops = grid.T
    avg = avg + fixed_fp_params / total * FP_BITS
    feasible = avg <= weight_budget + 1e-9
    if act_budget is not None:
        feasible &= act_sum <= (1e-9 if fp_act_exempt else act_budget + 1e-9)
        if max_fp_act is not None and None in acts:
            feasible &= fp_count <= max_fp_act

    def index(weight_bits, act_bits):
        flat = 0
        for n in names:
            flat = flat * len(pairs) + pairs.index((weight_bits[n], act_bits[n]))
        return flat

    return base + loss, feasible, avg >= weight_budget - budget_tolerance - 1e-9, bops, index


def exhaustive_optimum(objective, feasible, floor):
    """The optimum ``allocate`` promises: the best assignment that uses the budget (meets the floor) when one
    exists, else the best of all; ``None`` when nothing is feasible."""
    for mask in (feasible & floor, feasible):
        if mask.any():
            return float(objective[mask].min())
    return None


def disagreement(allocate_fn, table, budgets, kwargs, max_bops=None) -> str | None:
    """How ``allocate_fn``'s answer differs from enumeration; ``None`` when it agrees (an infeasible
    instance must raise the infeasibility error, a feasible one must come back proven optimal)."""
    try:
        objective, feasible, floor, bops, index = enumerate_instance(table, *budgets, **kwargs)
    except QschedError as exc:  # the scoring itself is undefined: allocate must refuse alike
        with pytest.raises(QschedError, match=re.escape(str(exc))):
            allocate_fn(table, *budgets, max_bops=max_bops, **kwargs)
        return None
    if max_bops is not None:
        feasible = feasible & (bops <= max_bops)
    best = exhaustive_optimum(objective, feasible, floor)
    try:
        result = allocate_fn(table, *budgets, max_bops=max_bops, **kwargs)
    except QschedError as exc:
        infeasible = re.search("is infeasible|no bit allocation meets", str(exc))
        return None if best is None and infeasible else f"raised {exc!r}; optimum {best}"
    if best is None:
        return f"{result.status} {result.objective:.9g} on an infeasible instance"
    if result.status != "Optimal" or abs(result.objective - best) > 1e-6 * best + 1e-12:
        return f"{result.status} {result.objective:.9g}, optimum {best:.9g}"
    chosen = index(result.weight_bits, result.act_bits)
    if not feasible[chosen] or abs(objective[chosen] - result.objective) > 1e-9 * best + 1e-12:
        return f"the plan is infeasible or scored {objective[chosen]:.9g}, not {result.objective:.9g}"
    return None


def bops_cap(rng: random.Random, table, budgets, kwargs) -> float:
    """A BOPs cap halfway between two achievable totals (never on one: solver tolerances), sometimes below all."""
    import numpy as np

    bops = enumerate_instance(table, *budgets, **kwargs)[3]
    values = np.unique(bops)
    if len(values) < 2 or rng.random() < 0.1:
        return float(values[0]) * 0.9
    k = rng.randrange(len(values) - 1)
    return float(values[k] + values[k + 1]) / 2


@pytest.mark.parametrize("block", range(3))
def test_allocation_matches_enumeration_on_random_instances(block):
    """100 random small instances per block, each without and with a BOPs cap: the objective must equal
    the exhaustive optimum and infeasible instances must be reported as such."""
    rng = random.Random(1000 + block)
    failures = []
    for case in range(100):
        table, budgets, kwargs = random_instance(rng)
        try:
            cap = bops_cap(rng, table, budgets, kwargs)
        except QschedError:
            cap = 1.0
        for max_bops in (None, cap):
            why = disagreement(allocate, table, budgets, kwargs, max_bops)
            if why:
                failures.append(f"case {case}, max_bops={max_bops}: {why}")
    assert not failures, "\n".join(failures)


def test_budget_normalisation_refuses_a_lossless_reference():
    """At a budget that reaches the widest candidates every layer is lossless at the reference widths:
    dividing by that zero used to zero every score (an arbitrary plan); now it is a clear error."""
    table = random_table(11, 4)
    with pytest.raises(QschedError, match="normalise='budget' cannot weigh the .* layers: .*weights 8, activations FP"):
        allocate(table, 8.0, weight_widths=[2, 4, 8], normalise="budget")
    with pytest.raises(QschedError, match="activations 8"):
        allocate(table, 8.0, 8, weight_widths=[2, 4, 8], act_widths=[4, 8], normalise="budget")
    # FP activations as a candidate: 8-bit activations cost something against them, so the rate is defined
    result = allocate(table, 8.0, 8, weight_widths=[2, 4, 8], act_widths=[4, 8, None], max_fp_act=1,
                      normalise="budget")
    assert result.status == "Optimal" and all(b == 8 for b in result.weight_bits.values())
    # a group with no weight in the objective, or no loss anywhere, needs no rate
    for entry in table.layers.values():
        if entry.group == "quality":
            entry.weight = {b: 150.0 for b in entry.weight}
            entry.act = {a: 150.0 for a in entry.act}
    content_only = allocate(table, 8.0, weight_widths=[2, 4, 8], content_weight=1.0, normalise="budget")
    assert content_only.status == "Optimal"


def test_status_says_what_the_solver_proved(monkeypatch):
    """A solve stopped by the time limit is never reported "Optimal": with a solution it keeps it with its
    gap, without one it is a clear error."""
    import highspy

    table = random_table(12, 4)
    with pytest.raises(QschedError, match="stopped without a solution; raise the time limit"):
        allocate(table, 4.0, 8, act_widths=[4, 8], time_limit=0.0)
    monkeypatch.setattr(highspy.Highs, "getModelStatus", lambda self: highspy.HighsModelStatus.kTimeLimit)
    for max_bops in (None, 1e12):
        result = allocate(table, 4.0, 8, act_widths=[4, 8], max_bops=max_bops)
        assert result.status.startswith("Feasible (time limit, gap ") and result.gap >= 0.0
