"""Mixed-precision bit allocation as one integer program (MixDQ's ILP, solved jointly).

Given a per-layer sensitivity table, choose one weight width and one activation width per layer so
that the size-weighted average weight width meets the budget and the predicted quality loss is
smallest. MixDQ solves four separate programs ({weight, act} x {content, quality}) and sweeps the bit
split between groups; here the two metric groups share one objective after normalisation, so the
split falls out of the solve and a single HiGHS call (milliseconds; 1-2 s at FLUX size) replaces the
sweep. HiGHS solves every program: the CBC bundled with PuLP returned worse plans labelled "Optimal" on
small programs (its preprocessing), and status only says "Optimal" for what HiGHS proved.

Scores are converted to additive losses before they are combined:

- SSIM (content layers): ``1 - SSIM``, which for small distortions grows like the error power;
- SQNR in dB (quality layers): the relative noise power ``10^(-SQNR/10)``; independent per-layer
  noises add in the output, whereas summing dB values (MixDQ) multiplies ratios.

Floating point (width ``None``) is lossless by definition. Each layer's losses are made monotone
(a narrower width is never predicted better than a wider one: near-lossless widths otherwise chase
measurement noise), taken relative to the layer's best candidate, and each group's losses are divided
by the group's spread (its total loss with every layer at its narrowest candidate), so that both groups
live on [0, 1] and ``content_weight`` sets their exchange rate.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from qsched.core.errors import QschedError

from qsched.core.bitplan import BitPlan, LayerPlan
from qsched.recipe import QuantizationConfig

#: the recipe's default (qsched.recipe.QuantizationConfig), so a bare call allocates as a compile does
CONTENT_WEIGHT = QuantizationConfig().content_weight

if TYPE_CHECKING:  # pragma: no cover
    from calibrate.sensitivity import SensitivityTable

FP_BITS = 16
_OBJECTIVE_SCALE = 1000.0  # keeps the solver's absolute tolerances far below one layer's contribution


def width_cost(bits: int | None) -> int:
    """Storage/compute width of a candidate (floating point costs 16 bits)."""
    return FP_BITS if bits is None else int(bits)


def score_to_loss(metric: str, score: float) -> float:
    """An additive loss (0 = lossless) from a higher-is-better metric value."""
    if metric == "ssim":
        return max(0.0, 1.0 - float(score))
    if metric == "sqnr":
        return 10.0 ** (-float(score) / 10.0)
    raise ValueError(f"unknown sensitivity metric {metric!r} (expected 'ssim' or 'sqnr')")


@dataclass
class AllocationResult:
    """The chosen widths per layer and how well the program was solved."""

    weight_bits: dict[str, int | None]
    act_bits: dict[str, int | None]
    objective: float          # normalised predicted loss of the choice (lower is better; 0 = all at best width)
    status: str               # "Optimal" only when HiGHS proved optimality
    solve_seconds: float      # solver wall time (the model build is in build_seconds)
    build_seconds: float = 0.0
    weight_budget: float = 0.0
    act_budget: float | None = None
    average_weight_bits: float = 0.0
    average_act_bits: float | None = None   # over activation-quantized layers, MAC-weighted
    fp_act_layers: list[str] = field(default_factory=list)
    budget_floor: bool = True  # whether the choice uses the budget ("average >= budget - tolerance")
    bops: float = 0.0          # sum of macs * weight bits * act bits (FP = 16)
    group_loss: dict[str, float] = field(default_factory=dict)
    content_weight: float = CONTENT_WEIGHT
    gap: float = 0.0           # relative optimality gap HiGHS left (0 when proven optimal)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weight_bits"] = dict(sorted(self.weight_bits.items()))
        data["act_bits"] = dict(sorted(self.act_bits.items()))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "AllocationResult":
        return cls(**data)


@dataclass
class _Layer:
    name: str
    group: str
    frac: float                   # params / total params (weight budget coefficient)
    act_frac: float               # macs (or params) / total (activation budget coefficient)
    macs: float
    w_cand: list[int | None]
    a_cand: list[int | None]
    w_loss: dict[int | None, float]
    a_loss: dict[int | None, float]


def _losses(metric: str, scores: dict, candidates: list[int | None], monotone: bool) -> dict:
    """Relative, optionally monotone losses per candidate width."""
    raw = {}
    for bits in candidates:
        if bits is None:
            raw[bits] = 0.0
        elif bits in scores:
            raw[bits] = score_to_loss(metric, scores[bits])
        else:
            raise QschedError(f"the sensitivity table has no score for width {bits}; "
                              f"scored widths: {sorted(scores)}")
    if monotone:
        running = 0.0
        for bits in sorted(candidates, key=width_cost, reverse=True):
            running = max(running, raw[bits])
            raw[bits] = running
    best = min(raw.values())
    return {bits: value - best for bits, value in raw.items()}


def _prepare(table: "SensitivityTable", weight_widths, act_widths, content_weight, monotone, fixed_fp_params,
             reference: tuple | None = None):
    names = sorted(table.layers)
    if not names:
        raise QschedError("the sensitivity table is empty: nothing to allocate")
    total_params = sum(table.layers[n].params for n in names) + int(fixed_fp_params)
    use_macs = all(table.layers[n].macs > 0 for n in names)
    act_weights = {n: (table.layers[n].macs if use_macs else table.layers[n].params) for n in names}
    total_act = sum(act_weights.values()) or 1.0
    layers = []
    for n in names:
        entry = table.layers[n]
        w_cand = list(weight_widths) if weight_widths is not None else sorted(entry.weight)
        a_cand = list(act_widths)
        layers.append(_Layer(n, entry.group, entry.params / total_params, act_weights[n] / total_act,
                             float(entry.macs or entry.params), w_cand, a_cand,
                             _losses(entry.metric, entry.weight, w_cand, monotone),
                             _losses(entry.metric, entry.act, a_cand, monotone)))
    # Put the groups on one scale: each group's losses are divided by a reference total of that group.
    spread: dict[str, float] = {}
    for layer in layers:
        spread[layer.group] = spread.get(layer.group, 0.0) + _reference_loss(layer, reference)
    if reference is not None:
        _check_reference(layers, spread, content_weight, reference)
    for layer in layers:
        weight = content_weight if layer.group == "content" else 1.0 - content_weight
        scale = weight / spread[layer.group] if spread[layer.group] > 0 else 0.0
        layer.w_loss = {b: v * scale for b, v in layer.w_loss.items()}
        layer.a_loss = {b: v * scale for b, v in layer.a_loss.items()}
    return layers, fixed_fp_params / total_params


NORMALISATIONS = ("budget", "spread")


def reference_widths(weight_budget: float, act_budget: float | None, weight_widths, act_widths) -> tuple:
    """The uniform widths a budget stands for: the widest weight candidate within the budget (else the
    narrowest), and the narrowest quantized activation candidate that meets the activation budget."""
    ws = sorted(width_cost(b) for b in weight_widths if b is not None)
    w_ref = max((b for b in ws if b <= weight_budget + 1e-9), default=ws[0]) if ws else None
    quant = sorted(a for a in act_widths if a is not None)
    a_ref = None if act_budget is None or not quant else min((a for a in quant if a >= act_budget - 1e-9),
                                                              default=quant[-1])
    return w_ref, a_ref


def _reference_loss(layer: "_Layer", reference: tuple | None) -> float:
    """The layer's loss at the reference widths (``None``: its narrowest candidates, the old 'spread')."""
    if reference is None:
        return max(layer.w_loss.values()) + max(layer.a_loss.values())
    w_ref, a_ref = reference
    w = layer.w_loss.get(w_ref, max(layer.w_loss.values())) if w_ref is not None else 0.0
    a = layer.a_loss.get(a_ref, 0.0) if a_ref is not None else 0.0
    return w + a


def _check_reference(layers: list[_Layer], at_reference: dict[str, float], content_weight: float,
                     reference: tuple) -> None:
    """Refuse a budget normalisation that divides by (almost) zero: a group that loses nothing at the
    reference widths (typically the widest candidates) but something elsewhere would make any loss of
    it infinitely expensive, and the zero scale used instead made every plan score alike."""
    for group, total in sorted(at_reference.items()):
        weight = content_weight if group == "content" else 1.0 - content_weight
        worst = sum(_reference_loss(l, None) for l in layers if l.group == group)
        if weight > 0 and worst > 0 and total <= 1e-9 * worst:
            w_ref, a_ref = (("FP" if b is None else b) for b in reference)
            raise QschedError(f"normalise='budget' cannot weigh the {group} layers: at the budget's reference "
                              f"widths (weights {w_ref}, activations {a_ref}) they lose nothing; "
                              f"use normalise='spread'")


@dataclass
class _SizeClass:
    """Layers with the same weight size: interchangeable in the weight budget, so the program only needs
    their total width T. ``value[T]`` is the least loss of any split of T among them (exact, by dynamic
    programming); ``choice`` lets the split be recovered."""

    members: list[int]
    frac: float
    value: "object"          # numpy array over T (inf where unreachable)
    choice: "object"         # [member, T] -> candidate index
    options: list[int]       # every reachable T
    undominated: list[int]   # the T strictly better than every cheaper one (enough without a budget floor)

    def split(self, layers: list[_Layer], total: int) -> dict[str, int | None]:
        out = {}
        for pos in range(len(self.members) - 1, -1, -1):
            layer = layers[self.members[pos]]
            bits = layer.w_cand[int(self.choice[pos, total])]
            out[layer.name] = bits
            total -= width_cost(bits)
        return out


def _size_classes(layers: list[_Layer]) -> list[_SizeClass]:
    import numpy as np

    by_size: dict[float, list[int]] = {}
    for i, layer in enumerate(layers):
        by_size.setdefault(layer.frac, []).append(i)
    classes = []
    for frac, members in sorted(by_size.items()):
        top = sum(max(width_cost(b) for b in layers[i].w_cand) for i in members)
        value = np.full(top + 1, np.inf)
        value[0] = 0.0
        choice = np.zeros((len(members), top + 1), dtype=np.int8)
        for pos, i in enumerate(members):
            best = np.full(top + 1, np.inf)
            for k, bits in enumerate(layers[i].w_cand):
                cost = width_cost(bits)
                cand = np.full(top + 1, np.inf)
                cand[cost:] = value[:top + 1 - cost] + layers[i].w_loss[bits]
                better = cand < best
                best[better] = cand[better]
                choice[pos, better] = k
            value = best
        options = [t for t in range(top + 1) if np.isfinite(value[t])]
        undominated, running = [], np.inf
        for total in options:
            if value[total] < running:
                undominated.append(total)
                running = value[total]
        classes.append(_SizeClass(members, frac, value, choice, options, undominated))
    return classes


def _variable(prob, name: str, cat: str = "Binary"):
    """A variable in ``prob`` (PuLP 3.3 deprecates free-standing LpVariable; older PuLP lacks add_variable)."""
    import pulp

    low = 0 if cat == "Continuous" else None
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lowBound=low, cat=cat)
    return pulp.LpVariable(name, lowBound=low, cat=cat)


@functools.cache
def _first_highs_quietly() -> None:
    """Create the process's first HiGHS object with stdout sent to /dev/null: that is when HiGHS prints its
    banner on file descriptor 1, whatever its options, and qcompile's stdout is a JSON summary."""
    import highspy

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to keep clean
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _solve(prob, time_limit: float) -> tuple[str, float]:
    """Solve ``prob`` with HiGHS (single-threaded, zero gap) and return what HiGHS proved, with the gap
    left: "optimal", "infeasible", "stopped" (a solution, not proven optimal) or "none". Read from HiGHS
    itself, because PuLP reports a time-limited solution as LpStatusOptimal."""
    import highspy
    import pulp

    _first_highs_quietly()
    prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=0.0, gapAbs=1e-9, threads=1))
    status = prob.solverModel.getModelStatus()
    if status == highspy.HighsModelStatus.kOptimal:
        return "optimal", 0.0
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        return "infeasible", math.inf  # every variable is bounded: "unbounded or infeasible" is infeasible
    info = prob.solverModel.getInfo()
    if info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible:
        return "stopped", float(info.mip_gap)
    return "none", math.inf


def allocate(table: "SensitivityTable", weight_budget: float, act_budget: float | None = None, *,
             weight_widths: list[int | None] | None = None, act_widths: list[int | None] | None = None,
             content_weight: float = CONTENT_WEIGHT, max_fp_act: int | None = None, fp_act_exempt: bool = True,
             max_bops: float | None = None, budget_tolerance: float = 0.02, fixed_fp_params: int = 0,
             monotone: bool = True, time_limit: float = 60.0, normalise: str = "spread") -> AllocationResult:
    """Solve the joint weight/activation width program for ``table``.

    ``weight_budget``: size-weighted average weight bits (``fixed_fp_params`` count as FP weights in it).
    ``act_budget``: average activation bits, MAC-weighted (parameter-weighted when the table has no
    MACs); ``None`` keeps every activation in floating point. ``act_widths`` defaults to the table's
    widths plus FP when ``max_fp_act`` allows any FP layer. With ``fp_act_exempt`` the FP-protected
    layers are outside the activation average (MixDQ's "keep the most sensitive ~1% in FP16") and
    ``max_fp_act`` caps how many there are; without it they count at 16 bits. ``max_bops`` caps
    sum(macs * weight bits * act bits).

    Formulation: binary y[i, a] per layer and activation width; on the weight side, layers of equal
    size are interchangeable in every constraint but BOPs, so the per-layer binaries x[i, b] of each
    size class are aggregated exactly into one binary per class total T (value: the best split of T,
    by dynamic programming). Per-layer x over 502 FLUX layers is a knapsack whose LP bound closes slowly;
    the aggregated program (10 size classes) is proven optimal in 1-2 s. ``normalise`` sets the groups'
    exchange rate: ``"spread"`` divides each group's losses by its total at the narrowest candidates,
    ``"budget"`` by its total at the uniform widths the budget stands for (:func:`reference_widths`),
    i.e. by what round-to-nearest at the target would cost that group (a :class:`QschedError` when that
    is nothing for a group that can lose something). BOPs depend on each layer's MACs and on both widths,
    so ``max_bops`` switches to one binary per layer and (weight, act) pair: exact, proven optimal in
    3-5 s at FLUX size. A solve stopped by ``time_limit`` before HiGHS proves its solution optimal keeps
    that solution, with a status saying so and its ``gap``.
    """
    import pulp

    if not 0.0 <= content_weight <= 1.0:
        raise QschedError(f"content_weight must lie in [0, 1], got {content_weight}")
    if normalise not in NORMALISATIONS:
        raise QschedError(f"unknown normalisation {normalise!r}: expected one of {', '.join(NORMALISATIONS)}")
    if act_budget is None:
        act_widths = [None]
    elif act_widths is None:
        act_widths = sorted(table.act_widths) + ([None] if max_fp_act != 0 else [])
    if not act_widths:
        raise QschedError("no activation width candidates")
    t0 = time.perf_counter()
    reference = None if normalise == "spread" else reference_widths(
        weight_budget, act_budget, weight_widths if weight_widths is not None else table.weight_widths, act_widths)
    layers, fixed_frac = _prepare(table, weight_widths, act_widths, content_weight, monotone, fixed_fp_params,
                                  reference)

    lowest = sum(l.frac * min(width_cost(b) for b in l.w_cand) for l in layers) + fixed_frac * FP_BITS
    highest = sum(l.frac * max(width_cost(b) for b in l.w_cand) for l in layers) + fixed_frac * FP_BITS
    if weight_budget < lowest - 1e-12:
        raise QschedError(f"weight budget {weight_budget:g} bits is infeasible: the narrowest candidates already "
                          f"average {lowest:.4f} bits; raise the budget or allow narrower widths")
    quantized_acts = [a for a in act_widths if a is not None]
    if act_budget is not None and quantized_acts and min(quantized_acts) > act_budget and not (
            None in act_widths and fp_act_exempt and (max_fp_act is None or max_fp_act >= len(layers))):
        raise QschedError(f"activation budget {act_budget:g} bits is infeasible: the narrowest activation "
                          f"candidate is {min(quantized_acts)} bits")
    classes = _size_classes(layers)
    per_layer = max_bops is not None

    def build(with_floor: bool):
        """The program and a reader of its solution: ({layer: weight bits}, {layer: act bits})."""
        prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
        if per_layer:  # one binary per layer and (weight, act) pair; x and y are its marginals
            u = {(i, b, a): _variable(prob, f"u_{i}_{width_cost(b)}_{width_cost(a)}")
                 for i, l in enumerate(layers) for b in l.w_cand for a in l.a_cand}
            y = {(i, a): pulp.lpSum(u[i, b, a] for b in l.w_cand) for i, l in enumerate(layers) for a in l.a_cand}
            prob += pulp.lpSum(_OBJECTIVE_SCALE * (l.w_loss[b] + l.a_loss[a]) * u[i, b, a]
                               for i, l in enumerate(layers) for b in l.w_cand for a in l.a_cand)
            for i, l in enumerate(layers):
                prob += pulp.lpSum(y[i, a] for a in l.a_cand) == 1, f"one_width_pair_{i}"
            weight_avg = pulp.lpSum(l.frac * width_cost(b) * u[i, b, a]
                                    for i, l in enumerate(layers) for b in l.w_cand for a in l.a_cand)
            fp_bops = sum(l.macs for l in layers) * FP_BITS * FP_BITS  # normalised: coefficients stay O(1)
            prob += pulp.lpSum(l.macs * width_cost(b) * width_cost(a) / fp_bops * u[i, b, a] for i, l in
                               enumerate(layers) for b in l.w_cand for a in l.a_cand) <= max_bops / fp_bops, "max_bops"

            def read():
                pairs = {l.name: next((b, a) for b in l.w_cand for a in l.a_cand if u[i, b, a].value() > 0.5)
                         for i, l in enumerate(layers)}
                return {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}
        else:
            # Without the floor, a class total that costs more and is no better is never chosen.
            offered = [cls.options if with_floor else cls.undominated for cls in classes]
            v = {(c, t): _variable(prob, f"v_{c}_{t}") for c in range(len(classes)) for t in offered[c]}
            y = {(i, a): _variable(prob, f"y_{i}_{width_cost(a)}") for i, l in enumerate(layers) for a in l.a_cand}
            prob += pulp.lpSum(_OBJECTIVE_SCALE * float(cls.value[t]) * v[c, t]
                               for c, cls in enumerate(classes) for t in offered[c]) \
                + pulp.lpSum(_OBJECTIVE_SCALE * l.a_loss[a] * y[i, a] for i, l in enumerate(layers) for a in l.a_cand)
            for c in range(len(classes)):
                prob += pulp.lpSum(v[c, t] for t in offered[c]) == 1, f"one_total_{c}"
            for i, l in enumerate(layers):
                prob += pulp.lpSum(y[i, a] for a in l.a_cand) == 1, f"one_act_width_{i}"
            weight_avg = pulp.lpSum(cls.frac * t * v[c, t] for c, cls in enumerate(classes) for t in offered[c])

            def read():
                weight = {}
                for c, cls in enumerate(classes):
                    weight.update(cls.split(layers, next(t for t in offered[c] if v[c, t].value() > 0.5)))
                act = {l.name: next(a for a in l.a_cand if y[i, a].value() > 0.5) for i, l in enumerate(layers)}
                return weight, act

        weight_avg += fixed_frac * FP_BITS
        prob += weight_avg <= weight_budget, "weight_budget"
        if with_floor:
            prob += weight_avg >= weight_budget - budget_tolerance, "weight_budget_floor"
        if act_budget is not None:
            if fp_act_exempt:  # average over quantized layers only, linearised: sum w (a - A) y <= 0
                prob += pulp.lpSum(l.act_frac * (a - act_budget) * y[i, a] for i, l in enumerate(layers)
                                   for a in l.a_cand if a is not None) <= 0, "act_budget"
            else:
                prob += pulp.lpSum(l.act_frac * width_cost(a) * y[i, a] for i, l in enumerate(layers)
                                   for a in l.a_cand) <= act_budget, "act_budget"
            if max_fp_act is not None and None in act_widths:
                prob += pulp.lpSum(y[i, None] for i, l in enumerate(layers) if None in l.a_cand) <= max_fp_act, \
                    "max_fp_act"
        return prob, read

    # The floor only matters when the unfloored optimum leaves budget unused: try without it first
    # (a relaxation, so an optimum that happens to meet the floor is the floored optimum too). When the
    # floored program is infeasible (discreteness leaves no mix inside [budget - tol, budget]), the
    # unfloored optimum stands.
    attempts = [False, True] if highest >= weight_budget - budget_tolerance else [False]
    build_seconds, solve_seconds, solution = time.perf_counter() - t0, 0.0, None
    for with_floor in attempts:
        t1 = time.perf_counter()
        prob, read = build(with_floor)
        build_seconds += time.perf_counter() - t1
        t1 = time.perf_counter()
        state, gap = _solve(prob, time_limit)
        solve_seconds += time.perf_counter() - t1
        if state in ("optimal", "stopped"):
            solution = (state, gap, *read())
            average = sum(l.frac * width_cost(solution[2][l.name]) for l in layers) + fixed_frac * FP_BITS
            if average >= weight_budget - budget_tolerance - 1e-9:
                break
        elif with_floor and state == "infeasible":
            break
        else:
            solution = None
            break
    if solution is None and state == "infeasible":
        raise QschedError(f"no bit allocation meets weight budget {weight_budget:g}"
                          + (f", activation budget {act_budget:g}" if act_budget is not None else "")
                          + (f", at most {max_fp_act} FP activation layers" if max_fp_act is not None else "")
                          + (f" and {max_bops:.4g} BOPs" if max_bops is not None else "")
                          + "; relax a budget or widen the candidate widths")
    if solution is None:
        raise QschedError(f"the bit allocation solver stopped without a solution; raise the time limit "
                          f"({time_limit:g} s)")
    state, gap, weight_bits, act_bits = solution
    status = "Optimal" if state == "optimal" else f"Feasible (time limit, gap {gap:.2%})"
    result = _summarise(layers, weight_bits, act_bits, fixed_frac, status, solve_seconds, build_seconds,
                        weight_budget, act_budget, content_weight, budget_tolerance)
    result.gap = gap
    return result


def _summarise(layers, weight_bits, act_bits, fixed_frac, status, solve_seconds, build_seconds, weight_budget,
               act_budget, content_weight, tolerance) -> AllocationResult:
    """Exact bookkeeping of a choice (recomputed in Python, not read back from the solver)."""
    avg_w = sum(l.frac * width_cost(weight_bits[l.name]) for l in layers) + fixed_frac * FP_BITS
    if avg_w > weight_budget + 1e-9:
        raise RuntimeError(f"solver returned an allocation over budget ({avg_w} > {weight_budget})")
    quant = [l for l in layers if act_bits[l.name] is not None]
    act_total = sum(l.act_frac for l in quant)
    avg_a = sum(l.act_frac * act_bits[l.name] for l in quant) / act_total if quant and act_total else None
    group_loss: dict[str, float] = {}
    for l in layers:
        group_loss[l.group] = group_loss.get(l.group, 0.0) + l.w_loss[weight_bits[l.name]] + l.a_loss[act_bits[l.name]]
    return AllocationResult(
        weight_bits=weight_bits, act_bits=act_bits, objective=sum(group_loss.values()), status=status,
        solve_seconds=solve_seconds, build_seconds=build_seconds, weight_budget=weight_budget, act_budget=act_budget,
        average_weight_bits=avg_w, average_act_bits=avg_a,
        fp_act_layers=sorted(l.name for l in layers if act_bits[l.name] is None and act_budget is not None),
        budget_floor=avg_w >= weight_budget - tolerance - 1e-9,
        bops=sum(l.macs * width_cost(weight_bits[l.name]) * width_cost(act_bits[l.name]) for l in layers),
        group_loss=group_loss, content_weight=content_weight)


def evaluate_assignment(table: "SensitivityTable", weight_bits: dict, act_bits: dict, *, act_widths: list,
                        weight_widths: list | None = None, content_weight: float = CONTENT_WEIGHT, monotone: bool = True,
                        reference: tuple | None = None) -> float:
    """The normalised loss :func:`allocate` minimises, for any assignment (tests, what-if reports).

    Pass the candidate widths the allocation used, and for ``normalise="budget"`` its
    :func:`reference_widths`: the normalisation depends on them.
    """
    layers, _ = _prepare(table, weight_widths, act_widths, content_weight, monotone, 0, reference)
    return sum(l.w_loss[weight_bits[l.name]] + l.a_loss[act_bits[l.name]] for l in layers)


def allocation_plan(result: AllocationResult, table: "SensitivityTable", *, target: str = "", method: str = "mixdq",
                    group_sizes: dict[str, int | None] | None = None, weight_scale: str = "max") -> BitPlan:
    """A BitPlan from an allocation; each reason names the width and the score that earned it.
    ``weight_scale`` is recorded for every layer with quantized weights. An ``fp8`` table's layers are
    FP8 W8A8 (weight width 8) or FP on both sides: see :func:`follow_weights`."""
    plan = BitPlan(method=method, target=target)
    for name in sorted(result.weight_bits):
        entry = table.layers[name]
        w, a = result.weight_bits[name], result.act_bits[name]
        if table.format == "fp8":
            score = _score_label(entry.weight.get(8), entry.metric)
            reason = f"ILP: fp8 W8A8 ({score})" if w is not None else f"ILP: fp (fp8 W8A8 would score {score})"
            plan.layers[name] = LayerPlan(w, w, entry.group, None, reason, entry.params,
                                          format="fp8" if w is not None else "int")
            continue
        reason = f"ILP: {_describe('w', w, entry.weight, entry.metric)}, {_describe('a', a, entry.act, entry.metric)}"
        plan.layers[name] = LayerPlan(w, a, entry.group, (group_sizes or {}).get(name), reason, entry.params,
                                      weight_scale=weight_scale if w is not None else "max")
    return plan


def follow_weights(result: AllocationResult, table: "SensitivityTable") -> AllocationResult:
    """An fp8 allocation's activations as the plan has them: an FP8 layer is W8A8, an FP layer FP on both sides.
    The program decides weights only (its activations are all "FP", outside any budget), because the fp8
    table scores each layer's W8A8 probe once, as its weight[8]; the record should say what runs."""
    result.act_bits = {n: w for n, w in result.weight_bits.items()}
    quantized = [n for n, w in result.weight_bits.items() if w is not None]
    result.average_act_bits = 8.0 if quantized else None
    result.bops = sum((table.layers[n].macs or table.layers[n].params) * width_cost(w) ** 2
                      for n, w in result.weight_bits.items())
    return result


def _describe(side: str, bits, scores: dict, metric: str) -> str:
    if bits is None:
        return f"{side}fp"
    score = scores.get(bits)
    if score is None or not math.isfinite(score):
        return f"{side}{bits}"
    return f"{side}{bits} ({_score_label(score, metric)})"


def _score_label(score, metric: str) -> str:
    if score is None or not math.isfinite(score):
        return "no score"
    return f"SSIM {score:.5f}" if metric == "ssim" else f"SQNR {score:.1f} dB"
