"""``qcompile --plan``: what a compile will cost, worked out from the recipe and the architecture alone.

Nothing runs the model. The denoiser is built on the meta device (:mod:`qsched.planning.architecture`), and
every count follows what the compile's code does with the same recipe, flags and settings:

* **denoiser evaluations**, in sample rows (one image through one denoiser call; classifier-free guidance
  doubles them): each stage's sampler runs, as :mod:`qsched.stages` and the methods make them;
* **memory**: the pipeline at its load dtype, the GPTQ Hessians the calibrate stage holds, the report's FP
  copy, activations and the cache search's stored outputs, phase by phase;
* **time** on a named device (:mod:`qsched.planning.devices`): MACs per evaluation (the cache search's own
  :class:`cache_search.cost.CostModel`, linear + attention) × evaluations / (dense throughput × an achieved
  fraction).

Each evaluation line says whether its count is exact, an upper bound or an estimate. The inputs are checked
as a compile checks them (:func:`qsched.compiler.plan_job`); the artifact directory is not, since a plan
writes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qsched.compiler import plan_job
from qsched.core.errors import QschedError
from qsched.planning.architecture import Architecture, module_bytes, resolve
from qsched.planning.devices import DEFAULT_ACHIEVED_FRACTION, Device
from qsched.planning.devices import device as device_named
from qsched.runtime.text_embeddings import is_text_encoder

EXACT, UPPER, ESTIMATE = "exact", "upper bound", "estimate"
SAMPLER, REPLAY = "sampler", "replay"
_GENERATE_BATCH = 8  # qsched.runtime.generation.generate's default batch (the evaluation images)
ACTIVATION_FACTOR = 3  # live tensors per row ≈ 3 × (input + output) of the widest layer (documented rough)


@dataclass(frozen=True)
class Evaluations:
    """One line of the plan: ``sample_rows`` denoiser evaluations (one image through one denoiser call), how
    sure the count is (``bound``), how it was computed (``formula``), whether the whole sampler runs
    (``sampler``: text encoders, the denoiser at every step, the VAE) or the denoiser alone (``replay``), and
    the predicted seconds on the plan's device."""

    stage: str
    what: str
    sample_rows: int
    bound: str
    formula: str
    mode: str = SAMPLER
    seconds: float | None = None
    share: float = 1.0  # of the denoiser's MACs each evaluation computes (sensitivity probes skip earlier blocks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CompilePlan:
    """What ``qcompile ... --plan`` prints: the job, the architecture, the denoiser evaluations per stage, the
    cache search's candidates and block evaluations, memory, time, warnings and assumptions. ``to_dict`` is
    plain JSON (``--json``)."""

    model: str
    bits: str
    recipe: str | None
    init: str
    settings: dict
    methods: dict
    architecture: dict
    evaluations: tuple[Evaluations, ...]
    cache_search: dict | None
    memory: dict
    time: dict
    warnings: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()
    width_scale: float | None = None

    @property
    def total_sample_rows(self) -> int:
        return sum(e.sample_rows for e in self.evaluations)

    @property
    def total_bound(self) -> str:
        bounds = {e.bound for e in self.evaluations if e.sample_rows}
        return EXACT if bounds <= {EXACT} else ESTIMATE if ESTIMATE in bounds else UPPER

    def rows(self, stage: str) -> int:
        return sum(e.sample_rows for e in self.evaluations if e.stage == stage)

    def to_dict(self) -> dict:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["evaluations"] = [e.to_dict() for e in self.evaluations]
        data["warnings"], data["assumptions"] = list(self.warnings), list(self.assumptions)
        data["totals"] = {"sample_rows": self.total_sample_rows, "bound": self.total_bound,
                          "by_stage": {s: self.rows(s) for s in dict.fromkeys(e.stage for e in self.evaluations)}}
        return data


def plan_compile(model: str = "flux-tiny", bits="w4a8", out=None, recipe=None, seed: int = 0, device: str = "cpu",
                 init: str = "pretrained", width_scale: float | None = None, dtype: str = "auto",
                 uniform: bool = False, coefficients: bool = True, cache_search: bool = True,
                 bundle: bool = False, eval_prompts: int = 8, overwrite: bool = False, progress: bool = True,
                 cache_budget: float | None = None, ray=None, scorer: str | None = None, *,
                 plan_device: str | None = None, achieved_fraction: float = DEFAULT_ACHIEVED_FRACTION,
                 tflops: float | None = None, measure: bool = False) -> CompilePlan:
    """The :class:`CompilePlan` of ``qsched.compile`` called with the same arguments (in the same order): no
    weights are loaded and nothing runs. ``out``, ``overwrite`` and ``progress`` are accepted and not used (a
    plan writes nothing, so ``out`` is not checked). ``plan_device`` names the device the time and memory are
    for (a key of :data:`qsched.planning.devices.DEVICES`; default ``cpu`` for a CPU ``device``, else ``h100``);
    ``achieved_fraction`` is the share of its dense throughput the compile is assumed to reach, ``tflops``
    replaces the table's figure (e.g. your own ``benchmarks/matmul_throughput.py`` result). ``measure`` times
    one denoiser call on ``device`` instead (:mod:`qsched.planning.measure`: random weights, the compile's
    calibration batch and resolution) and prices every evaluation at the measured seconds per row. Bad input
    raises the :class:`qsched.core.errors.QschedError` a compile would."""
    del out, overwrite, progress  # a plan writes nothing and shows no progress
    job = plan_job(model, bits, None, recipe, check_output=False, uniform=uniform, coefficients=coefficients,
                   cache_search=cache_search, cache_budget=cache_budget, ray=ray, scorer=scorer, seed=seed,
                   device=device, init=init, width_scale=width_scale, dtype=dtype, eval_prompts=eval_prompts, bundle=bundle)
    target = device_named(plan_device if plan_device is not None else
                          "cpu" if str(device).split(":")[0] == "cpu" else "h100")
    if not isinstance(eval_prompts, int) or eval_prompts < 0:
        raise QschedError(f"--eval-prompts {eval_prompts} is negative: use 0 to skip the evaluation, or more")
    if not 0.0 < achieved_fraction <= 1.0:
        raise QschedError(f"achieved_fraction {achieved_fraction} must lie in (0, 1]")
    if tflops is not None and not (math.isfinite(tflops) and tflops > 0):
        raise QschedError(f"tflops {tflops} must be a positive number")
    if measure and tflops is not None:
        raise QschedError("give either tflops (a throughput figure) or measure (time the denoiser here), not both")
    arch = resolve(job.model, job.init, job.width_scale, job.dtype)
    return _Planner(job, arch, target, achieved_fraction, tflops, measure).plan()


class _Planner:
    """One plan's working state; :meth:`plan` assembles the :class:`CompilePlan`."""

    def __init__(self, job, arch: Architecture, target: Device, fraction: float, tflops: float | None,
                 measure: bool = False):
        from qsched.models.adapters import adapter_for
        from qsched.stages import generation_settings

        self.job, self.arch, self.target, self.fraction, self.tflops_override = job, arch, target, fraction, tflops
        self.measure = measure
        self.recipe, self.spec = job.recipe, job.spec
        self.settings = generation_settings(job.model, arch.settings_pipe, job.recipe)
        self.steps = int(self.settings.steps)
        self.adapter = adapter_for(arch.denoiser)
        self.layers = self.adapter.quantizable_layers(arch.denoiser)
        self.cfg = _cfg_passes(arch, self.settings.guidance_scale)
        self.dtype_bytes = torch.empty((), dtype=arch.dtype).element_size()
        self.lines: list[Evaluations] = []
        self.warnings: list[str] = []
        self.assumptions: list[str] = []
        self.shape = _MetaShapes.measure(arch, self.settings)
        if self.shape.error:
            self.warnings.append(f"the meta-device forward failed ({self.shape.error}): activation and cache-store "
                                 "sizes are unknown" + ("" if self.shape.analytic else ", and so is the time"))

    # --- helpers ---------------------------------------------------------------------------------------

    def rows(self, prompts: int, steps: int | None = None) -> int:
        """Sample rows of ``prompts`` images sampled over ``steps`` (default: the compile's) steps."""
        return int(prompts) * int(self.steps if steps is None else steps) * self.cfg

    def add(self, stage, what, rows, bound, formula, mode=SAMPLER, share=1.0):
        head, sep, note = formula.partition("; ")  # the CFG factor belongs to the product, before any note
        self.lines.append(Evaluations(stage, what, int(rows), bound, head + self._cfg_note() + sep + note, mode,
                                      share=round(float(share), 4)))

    def _cfg_note(self) -> str:
        return " × 2 (CFG)" if self.cfg == 2 else ""

    # --- the stages ------------------------------------------------------------------------------------

    def plan(self) -> CompilePlan:
        job, recipe = self.job, self.recipe
        E, S = job.eval_prompts, min(recipe.report.samples, recipe.calibration.prompts)
        fp_bytes = sum(p.numel() * p.element_size() for p in self.arch.denoiser.parameters())
        self.fp_copy = fp_bytes <= recipe.report.fp_copy_max_gb * 1e9
        self.fp_param_bytes = fp_bytes
        if E:
            self.add("load", "FP reference images (evaluation prompts)", self.rows(E), EXACT,
                     f"{E} evaluation prompts × {self.steps} steps")
        if not self.fp_copy and S:
            self.add("load", "report: FP latency, timed at load (no FP copy kept)",
                     recipe.report.repeats * self.rows(S), EXACT,
                     f"{recipe.report.repeats} repeats × {S} samples × {self.steps} steps")
        calibrate = self._calibrate()
        coefficients = self._coefficients()
        cache = self._cache_search()
        if E:
            self.add("export", "quantized evaluation images", self.rows(E), EXACT,
                     f"{E} evaluation prompts × {self.steps} steps")
        self._report(S, cache)
        memory = self._memory(calibrate, coefficients, cache, S)
        time = self._time()
        self._assumptions(cache)
        methods = {"quantization": calibrate["method"], "rounding": recipe.quantization.rounding,
                   "coefficients": coefficients["status"], "cache_search": cache["status"] if cache else "skipped"}
        return CompilePlan(
            model=job.model, bits=str(self.spec), recipe=job.recipe_path, init=job.init,
            settings={**self.settings.to_dict(), "cfg_passes": self.cfg, "denoiser_dtype": _dtype_name(self.arch.dtype)},
            methods=methods, architecture=self._architecture(calibrate), evaluations=tuple(self.lines_timed),
            cache_search=cache, memory=memory, time=time, warnings=tuple(self.warnings),
            assumptions=tuple(self.assumptions), width_scale=job.width_scale)

    def _architecture(self, calibrate: dict) -> dict:
        den = self.arch.denoiser
        linear = sum(isinstance(m, nn.Linear) for m in self.layers.values())
        blocks = self.shape.blocks
        return {"source": self.arch.source, "pipeline": self.arch.pipeline_class, "family": self.adapter.family,
                "denoiser": type(den).__name__, "denoiser_parameters": sum(p.numel() for p in den.parameters()),
                "quantizable_layers": len(self.layers), "linear_layers": linear, "conv_layers": len(self.layers) - linear,
                "gptq_rounded_layers": calibrate["rounded_linear_layers"],
                "cacheable_blocks": len(blocks), "cacheable_components": sum(len(c) for _, c in blocks),
                "tokens": self.shape.tokens, "scheduler": self.arch.scheduler_class}

    def _calibrate(self) -> dict:
        from calibrate.calibration import gptq_layers
        from calibrate.gptq import HESSIAN_CHUNK_BYTES, hessian_chunks
        from calibrate.sensitivity import metric_for_group

        q, cal, spec = self.recipe.quantization, self.recipe.calibration, self.spec
        C, method = cal.prompts, q.method
        keep_fp = list(q.keep_fp)
        rounded = gptq_layers(self.layers, q, spec)
        chunks = hessian_chunks(rounded, HESSIAN_CHUNK_BYTES)
        leader = self.shape.input_leader  # layers fed one tensor share one Hessian (calibrate.gptq.SharedInputs)
        distinct = [{leader.get(n, n) if leader.get(n, n) in c else n for n in c} for c in chunks]
        sizes = [sum(4 * rounded[n].in_features ** 2 for n in d) for d in distinct]
        shared = sum(len(c) - len(d) for c, d in zip(chunks, distinct))
        stats = spec.quantize_activations
        extra = len(chunks) - 1 if stats and chunks else len(chunks)
        if stats:
            self.add("calibrate", "statistics pass (activation ranges" + (", GPTQ Hessian group 1)" if chunks else ")"),
                     self.rows(C), EXACT, f"{C} calibration prompts × {self.steps} steps")
        if extra:
            why = "Hessians beyond the first 4 GiB group" if stats else "activations stay FP: no statistics pass"
            self.add("calibrate", f"GPTQ Hessian passes ({why})", extra * self.rows(C), EXACT,
                     f"{extra} Hessian groups × {C} calibration prompts × {self.steps} steps")
        record = {"method": method, "rounded_linear_layers": sum(isinstance(m, nn.Linear) for m in rounded.values()),
                  "hessian_groups": len(chunks), "hessian_passes": extra, "hessian_group_bytes": sizes,
                  "shared_input_layers": shared,
                  "statistics_pass": stats, "decided_layers": 0}
        if method != "mixdq":
            return record
        scope = {n: m for n, m in self.layers.items()
                 if q.layers is None or any(fnmatch.fnmatchcase(n, p) for p in q.layers)}
        if not scope:
            raise QschedError(f"no quantizable layer matches {list(q.layers or [])}")
        decided = [n for n in scope if not any(fnmatch.fnmatchcase(n, p) for p in keep_fp)]
        if spec.format == "fp8":  # FP8 covers linear layers: MixDQ decides those (calibrate.mixdq.mixdq_plan)
            decided = [n for n in decided if isinstance(self.layers[n], nn.Linear)]
        if not decided:
            raise QschedError("every layer in scope is kept FP by the recipe: nothing for mixed precision to decide")
        n_s = min(q.sensitivity_prompts, C)
        from calibrate.mixdq import allowed_weight_widths, width_floor

        if spec.format == "fp8":  # one probe per layer: FP8 on both sides at once (calibrate.sensitivity)
            per_layer, widths = 1, "(FP8 W8A8, weights and activations together)"
        else:
            probed = allowed_weight_widths(q.weight_widths, width_floor(q.min_weight_bits, q.rounding),
                                           self.spec.weight_bits)
            per_layer = len(probed) + (len(set(q.act_widths)) if stats else 0)
            widths = f"({len(probed)} weight" + (f" + {len(set(q.act_widths))} activation" if stats else "") \
                + " widths)"
        content = sum(metric_for_group(self.adapter.layer_group(n, q.layer_groups)) == "ssim" for n in decided)
        quality = len(decided) - content
        self.add("calibrate", "MixDQ sensitivity: FP reference run (records the trajectory)", self.rows(n_s), EXACT,
                 f"{n_s} sensitivity prompts × {self.steps} steps")
        quality_layers = [n for n in decided if metric_for_group(self.adapter.layer_group(n, q.layer_groups)) != "ssim"]
        order, share, depth = self.shape.block_order, 1.0, 0
        if quality_layers and order is not None and q.sensitivity_record_gb > 0:
            itemsize = self.arch.dtype.itemsize
            depth = order.depth_within(int(q.sensitivity_record_gb * 1e9), self.rows(n_s), itemsize)
            shares = order.shares(depth)
            share = sum(shares.get(n, 1.0) for n in quality_layers) / len(quality_layers)
            record["sensitivity_record"] = {"blocks": len(order.finished), "recorded_blocks": depth,
                                            "bytes": order.record_bytes(depth, self.rows(n_s), itemsize),
                                            "mean_probe_share": round(share, 4)}
        if "sensitivity_record" in record:
            self.add("calibrate", "MixDQ sensitivity: block record (one replay of the trajectory)", self.rows(n_s),
                     EXACT, f"{n_s} sensitivity prompts × {self.steps} steps", REPLAY)
        self.add("calibrate", "MixDQ sensitivity: replayed probes (quality layers, SQNR)",
                 quality * per_layer * self.rows(n_s), EXACT,
                 f"{quality} layers × {per_layer} probe{'s' * (per_layer != 1)} {widths} × {n_s} prompts × {self.steps} steps"
                 + (f"; each computes {share:.2f} of the denoiser on average (the first {depth} of "
                    f"{len(order.finished)} blocks are recorded and skipped where they precede the layer)"
                    if share < 1.0 else ""), REPLAY, share)
        self.add("calibrate", "MixDQ sensitivity: full-sampler probes (content layers, SSIM)",
                 content * per_layer * self.rows(n_s), EXACT,
                 f"{content} layers × {per_layer} probe{'s' * (per_layer != 1)} {widths} × {n_s} prompts × {self.steps} steps")
        record.update(decided_layers=len(decided), sensitivity_prompts=n_s, probes_per_layer=per_layer,
                      content_layers=content, quality_layers=quality, sensitivity_evaluations=len(decided) * per_layer)
        if q.sensitivity_context == "uniform":
            record["sensitivity_context_copy"] = True
        return record

    def _coefficients(self) -> dict:
        from qsched.runtime.schedulers import SUPPORTED_SCHEDULERS

        co = self.recipe.coefficients
        if not co.enabled:
            return {"status": "skipped (switched off)"}
        if self.arch.scheduler_class not in SUPPORTED_SCHEDULERS:
            return {"status": f"skipped (scheduler {self.arch.scheduler_class} is not supported by Q-Sched)"}
        stop = "patience or convergence may stop it sooner" if co.patience or co.method != "cma" else \
            "CMA-ES spends it unless its step size collapses"
        self.add("coefficients", "Q-Sched train runs (identity included)", co.budget * self.rows(co.prompts), UPPER,
                 f"budget {co.budget} runs × {co.prompts} train prompts × {self.steps} steps; {stop}")
        self.add("coefficients", "Q-Sched guard runs (one per new train best)", co.budget * self.rows(co.heldout_prompts),
                 UPPER, f"≤ {co.budget} runs × {co.heldout_prompts} held-out prompts × {self.steps} steps; "
                 "at least 1 (flux-tiny's CMA-ES: 8-12 in 62 runs)")
        return {"status": f"{co.method}, budget {co.budget}", "train_runs": co.budget, "guard_runs_at_most": co.budget,
                "train_prompts": co.prompts, "guard_prompts": co.heldout_prompts}

    def _cache_search(self) -> dict | None:
        from cache_search.search import SearchConfig, proxy_prompt_count

        cs = self.recipe.cache_search
        if not cs.enabled:
            return None
        slots = sum(len(c) for _, c in self.shape.blocks)
        if self.steps < 2:
            self.warnings.append(f"the cache search is skipped at {self.steps} step: step 0 always computes, so "
                                 "there is nothing to reuse (the stage records why)")
            return {"status": "skipped (one step: nothing to reuse)"}
        if not slots:
            self.warnings.append("the denoiser has no cacheable block: the cache search is skipped")
            return {"status": "skipped (no cacheable block)"}
        P, pop, G, Gp, guard = cs.prompts, cs.population, cs.generations, cs.proxy_generations, cs.guard_prompts
        max_batch = cs.batch_rows
        k = max(1, max_batch // P)  # candidates per pipeline call (batch_plan)
        n_proxy = proxy_prompt_count(P, SearchConfig().proxy_fraction) if Gp else 0
        full_generations = G + 1 - Gp  # generation 0 is the initial population
        full = pop * full_generations + (pop if Gp else 0)  # + the switch's re-scoring of the population
        proxy = pop * Gp
        front = pop  # an assumption: the final front's size is known only after the search

        def shared(n, p, per_call):  # step 0 once per call, every candidate's later steps
            return math.ceil(n / per_call) * p + n * p * (self.steps - 1)

        full_shared = full_generations * shared(pop, P, k) + (shared(pop, P, k) if Gp else 0)
        self.add("cache_search", "search reference (uncached images)", self.rows(P), EXACT,
                 f"{P} search prompts × {self.steps} steps")
        self.add("cache_search", "search candidates, full fidelity", full_shared * self.cfg, UPPER,
                 f"≤ {full} candidates ({pop} × {full_generations} generations" + (" + the switch" if Gp else "")
                 + f") × {P} prompts × {self.steps} steps, step 0 shared per call of {k}")
        if Gp:
            self.add("cache_search", "proxy reference", self.rows(n_proxy), EXACT,
                     f"{n_proxy} proxy prompts × {self.steps} steps")
            self.add("cache_search", "search candidates, proxy", Gp * shared(pop, n_proxy, k) * self.cfg, UPPER,
                     f"≤ {proxy} candidates ({pop} × {Gp} generations) × {n_proxy} prompts × {self.steps} steps, "
                     f"step 0 shared per call of {k}")
        kg = max(1, max_batch // guard) if guard else 0
        if guard:
            self.add("cache_search", "guard reference", self.rows(guard), EXACT,
                     f"{guard} guard prompts × {self.steps} steps")
            self.add("cache_search", "guard re-scoring of the front", shared(front, guard, kg) * self.cfg, ESTIMATE,
                     f"~{front} front points (assumed = population) × {guard} prompts × {self.steps} steps, "
                     f"step 0 shared per call of {kg}")
        rows_naive = (full * P + proxy * n_proxy) * self.steps * self.cfg
        rows_shared = (full_shared + (Gp * shared(pop, n_proxy, k) if Gp else 0)) * self.cfg
        return {"status": f"population {pop} × {G + 1} generations (0 = the seeded population)",
                "candidates": {"full": full, "proxy": proxy, "bound": UPPER,
                               "why": "offspring identical to a population member, an earlier child or an archived "
                                      "schedule are not evaluated again"},
                "prompts": P, "candidates_per_call": k, "guard_prompts": guard, "guard_points_per_call": kg,
                "front_points_assumed": front,
                "cacheable_components": slots,
                "denoiser_rows": {"without_sharing": rows_naive, "with_step0_sharing": rows_shared, "bound": UPPER},
                "block_evaluations": {
                    "without_sharing": rows_naive * slots, "with_step0_sharing": rows_shared * slots, "bound": UPPER,
                    "note": "component rows (one sample through one cacheable component) if every candidate "
                            "recomputed everything; the code also shares every later step that candidates of a call "
                            "agree on and skips reused components, which depends on the genomes, so those savings "
                            "are not computable before the search (flux-tiny: 12-45 % fewer than without sharing)"}}

    def _report(self, S: int, cache: dict | None) -> None:
        rep = self.recipe.report
        cache_runs = cache is not None and "candidates" in cache
        front = cache["front_points_assumed"] if cache_runs else 0
        live = (1 if self.fp_copy else 0) + (1 if self.fp_copy and not self.spec.is_fractional else 0) \
            + (2 if self.shape.blocks else 0) + (front if cache_runs else 1)
        self.report_points = live
        bound = ESTIMATE if cache_runs else EXACT
        names = ", ".join(filter(None, ["FP" if self.fp_copy else "", "RTN" if self.fp_copy and not self.spec.is_fractional
                                        else "", "FORA-2, FORA-3" if self.shape.blocks else "",
                                        f"~{front} front points" if cache_runs else "the compiled model"]))
        if S:
            self.add("export", "report: latency and sample images", live * rep.repeats * self.rows(S), bound,
                     f"{live} points ({names}) × {rep.repeats} repeats × {S} samples × {self.steps} steps")
        P = self.recipe.cache_search.prompts
        if self.job.scorer_source and self.fp_copy:
            self.add("export", "report: quality against FP", live * self.rows(P), bound,
                     f"FP reference + {live - 1} points × {P} search prompts × {self.steps} steps")

    # --- memory ----------------------------------------------------------------------------------------

    def _memory(self, calibrate: dict, coefficients: dict, cache: dict | None, S: int) -> dict:
        arch, recipe, b = self.arch, self.recipe, self.dtype_bytes
        pipeline = sum(arch.component_bytes.values())
        den = arch.component_bytes.get(arch.denoiser_attr, module_bytes(arch.denoiser))
        gpu = self.target.is_gpu
        # every prompt is encoded once at load (qsched.runtime.text_embeddings); on a GPU the text encoders then
        # wait in host memory, so every later phase holds the pipeline without them
        text = sum(v for k, v in arch.component_bytes.items() if is_text_encoder(k))
        prompts = self._compile_prompts()
        embeddings = prompts * self.shape.text_elements * b * self.cfg
        resident = pipeline - text if gpu else pipeline
        quantized, packed = self._quantized_bytes()
        # the simulated layers keep dequantized weights between calls, within the recipe's budget
        # (qsched.runtime.qlayers.limit_dequantized_cache): after calibration the denoiser holds those too
        dequantized = self._quantized_weight_count() * b
        dq_cache = int(min(dequantized, recipe.quantization.dequantized_cache_gb * 1e9))
        fp_copy = self.fp_param_bytes if self.fp_copy else 0
        act_row = self.shape.activation_elements * ACTIVATION_FACTOR * b
        store_row = self.shape.store_elements * b

        def act(rows):
            return rows * act_row

        # calibrate: Hessians of the rounded layers (fp32, in_features² each; layers fed one tensor share one,
        # calibrate.gptq.SharedInputs). One group is accumulated per pass on the compile's device; once collected,
        # its Hessians move to host memory, where they wait for GPTQ (which brings each back as it rounds).
        groups = calibrate["hessian_group_bytes"]
        total_h = sum(groups)
        in_flight = max(groups, default=0)
        # on a CPU the accumulators and their results meet the groups already stored at the end of each pass
        collect_peak = max((sum(groups[:i]) + 2 * g for i, g in enumerate(groups)), default=0)
        held = 0 if gpu else total_h
        gptq = max((8 * (4 * m.in_features ** 2 + 2 * m.in_features * m.out_features)
                    for m in self.layers.values() if isinstance(m, nn.Linear)), default=0) if total_h else 0
        cal = recipe.calibration
        cal_rows = min(cal.batch_size, cal.prompts) * self.cfg
        sens_rows = calibrate.get("sensitivity_prompts", 0) * self.cfg
        record = self.steps * sens_rows * self.shape.call_elements * b  # the FP trajectory the probes replay
        # the block outputs the sensitivity probes' skipped blocks return, within its budget: kept in host memory
        prefix_record = (calibrate.get("sensitivity_record") or {}).get("bytes", 0)
        context = quantized if calibrate.get("sensitivity_context_copy") else 0
        phases = {
            "load: text embeddings": pipeline,
            "calibrate: Hessian collection": resident + fp_copy + (in_flight if gpu else collect_peak) + act(cal_rows),
            # a probe's GPTQ rounding returns (and frees its workspace) before the probe's sampler pass starts
            "calibrate: sensitivity and GPTQ": resident + fp_copy + held + max(gptq, act(max(sens_rows, cal_rows))
                                                                                   + record)
                                                 + context + (0 if gpu else prefix_record),
        }
        rest = resident - den + quantized + dq_cache + fp_copy
        co = recipe.coefficients
        if "train_runs" in coefficients:
            phases["coefficients"] = rest + act(max(co.prompts, co.heldout_prompts) * self.cfg)
        search_rows = guard_rows = 0
        if cache is not None and "candidates" in cache:
            pop, P = recipe.cache_search.population, cache["prompts"]
            cap = recipe.cache_search.batch_rows  # a candidate on more prompts runs in slices of this many rows
            search_rows = min(min(cache["candidates_per_call"], pop) * P, cap) * self.cfg
            g = cache["guard_prompts"]
            guard_rows = min(min(cache["guard_points_per_call"], cache["front_points_assumed"]) * g, cap) * self.cfg
            phases["cache_search"] = rest + max(act(search_rows) + search_rows * store_row,
                                                act(guard_rows) + guard_rows * store_row)
        rtn = self.fp_param_bytes + quantized if self.fp_copy and not self.spec.is_fractional else 0
        native = quantized if S and recipe.report.runtime == "native" else 0  # the report's deployable twin (≤ this)
        phases["export and report"] = rest + rtn + native + act(max(S, recipe.cache_search.prompts) * self.cfg)
        working = max(phases.values())
        staging = 0 if (self.job.init == "random" and arch.source.startswith("the shipped")) else pipeline
        export_host = packed + (pipeline - den if self.job.bundle else 0)
        if gpu:
            device_peak = working
            host_peak = max(staging, text + embeddings + max(export_host, total_h + prefix_record))
        else:
            device_peak, host_peak = 0, max(working, rest + export_host) + embeddings
        if self.target.memory_gb and device_peak > self.target.memory_gb * 1e9:
            worst = max(phases, key=phases.get)
            fix = ""
            if worst == "cache_search" and act_row + store_row > 0:
                fits = int((self.target.memory_gb * 1e9 - rest) // (act_row + store_row))
                if fits >= 1:
                    fix = (f"; cache_search.batch_rows: {fits} fits it (sample rows per call, now "
                           f"{recipe.cache_search.batch_rows}: fewer candidates share step 0 per call)")
            self.warnings.append(f"the predicted device peak, {_gb(device_peak)}, exceeds the {self.target.label}'s "
                                 f"{self.target.memory_gb:g} GB (largest phase: {worst}){fix}")
        return {
            "dtype": _dtype_name(arch.dtype), "components": dict(arch.component_bytes), "pipeline_bytes": pipeline,
            "denoiser_bytes": den, "quantized_denoiser_bytes": quantized, "packed_denoiser_bytes": packed,
            "dequantized_cache": {"bytes": dq_cache, "all_bytes": dequantized,
                                  "budget_gb": recipe.quantization.dequantized_cache_gb},
            "hessians": {"groups": len(groups), "largest_group_bytes": max(groups, default=0),
                         "total_bytes": total_h, "held_bytes": total_h, "held_in": "host memory",
                         "collection_peak_bytes": in_flight if gpu else collect_peak,
                         "shared_inputs": calibrate.get("shared_input_layers", 0),
                         "gptq_workspace_bytes": gptq},
            "text_encoder_bytes": text,
            "text_embeddings": {"prompts": prompts, "bytes": embeddings, "held_in": "host memory",
                                "text_encoders": "host memory after load" if gpu else "host memory"},
            "fp_copy_bytes": fp_copy,
            "fp_copy": ("kept: the FP denoiser is within report.fp_copy_max_gb" if self.fp_copy else
                        f"not kept: the FP denoiser ({_gb(self.fp_param_bytes)}) exceeds report.fp_copy_max_gb "
                        f"({recipe.report.fp_copy_max_gb:g} GB); the RTN baseline and the report's quality are not "
                        "measured"),
            "activation_bytes_per_row": act_row, "cache_store_bytes_per_row": store_row,
            "batch_rows": {"calibration": cal_rows, "sensitivity": sens_rows, "cache_search": search_rows,
                           "guard": guard_rows},
            "sensitivity_trajectory_bytes": record, "sensitivity_prefix_bytes": prefix_record,
            "sensitivity_prefix_in": "host memory", "phases": phases,
            "device_peak_bytes": device_peak, "host_peak_bytes": host_peak,
            "where": (f"the compile runs on the {self.target.label} (--device cuda): the pipeline and the "
                      "activations live in device memory, the text encoders only until every prompt is encoded; "
                      "the host holds " + ("the pipeline while it loads, then " if staging else "")
                      + "the text encoders and embeddings, the packed artifact while it is written, and during "
                      "calibration the GPTQ Hessians and the sensitivity record") if gpu else
                     "the compile runs on the CPU: everything is host memory",
        }

    def _compile_prompts(self) -> int:
        """How many prompts the compile encodes at load (:func:`qsched.stages.compile_prompts`, before
        duplicates are dropped: an upper bound)."""
        r = self.recipe
        n = self.job.eval_prompts + r.calibration.prompts
        if r.coefficients.enabled:
            n += r.coefficients.prompts + r.coefficients.heldout_prompts
        if r.cache_search.enabled:
            n += r.cache_search.prompts + r.cache_search.guard_prompts
        return n

    def _quantized_layers(self) -> list[nn.Module]:
        q = self.recipe.quantization
        return [m for n, m in self.layers.items() if not any(fnmatch.fnmatchcase(n, p) for p in q.keep_fp)
                and (q.method != "mixdq" or q.layers is None or any(fnmatch.fnmatchcase(n, p) for p in q.layers))]

    def _quantized_weight_count(self) -> int:
        return sum(m.weight.numel() for m in self._quantized_layers())

    def _quantized_bytes(self) -> tuple[int, int]:
        """The denoiser after ``quantize_`` in memory (int8 codes, one byte per weight, fp32 per-channel scales,
        the rest at its dtype) and packed in the artifact (two codes per byte at ≤ 4 bits), at the target widths."""
        q = self.recipe.quantization
        den = self.arch.denoiser
        total = sum(p.numel() for p in den.parameters())
        quantized = self._quantized_layers()
        weights = sum(m.weight.numel() for m in quantized)
        scales = 4 * sum(m.weight.shape[0] for m in quantized)
        rest = (total - weights) * self.dtype_bytes
        per_code = 0.5 if self.spec.weight_bits <= 4 else 1.0
        if self.spec.format == "fp8" and q.method == "mixdq":  # FP8 or FP per layer: the budget bounds the bytes
            per_code = q.fp8_budget_bits / 8
        return int(weights * max(per_code, 1.0)) + scales + rest, int(weights * per_code) + scales + rest

    # --- time ------------------------------------------------------------------------------------------

    def _time(self) -> dict:
        """Seconds per evaluation line: one sample row priced from MACs at the device table's throughput, or
        (``measure``) at the seconds per row of one real call; then summed by stage."""
        macs = self.shape.macs
        dtype = _dtype_name(self.arch.dtype)
        if self.measure:
            record, per_row = self._measured_row()
        else:
            tflops = self.tflops_override or self.target.tflops(dtype)
            per_row = 2 * macs["total"] / (tflops * 1e12 * self.fraction) if macs else None
            record = {"device": self.target.name, "label": self.target.label, "source": self.target.source,
                      "tflops": tflops, "achieved_fraction": self.fraction}
        self.lines_timed = [dataclasses.replace(e, seconds=e.sample_rows * e.share * per_row if per_row else None)
                            for e in self.lines]
        by_stage: dict[str, float] = {}
        for e in self.lines_timed:
            by_stage[e.stage] = by_stage.get(e.stage, 0.0) + (e.seconds or 0.0)
        total = sum(by_stage.values()) if per_row else None
        return {**record, "dtype": dtype, "macs_per_evaluation": macs, "seconds_by_stage": by_stage if per_row else {},
                "seconds": total, "human": _duration(total) if total is not None else "unknown"}

    def _measured_row(self) -> tuple[dict, float]:
        """The seconds per sample row of one real denoiser call on the compile's device, at the calibration batch
        (the rows most calls of a compile carry), and its record."""
        from qsched.planning.measure import measure_row_seconds

        cal = self.recipe.calibration
        rows = max(1, min(cal.batch_size, cal.prompts)) * self.cfg
        inputs, _ = _meta_inputs(self.arch.denoiser, self.settings, self.arch, self.shape.tokens)
        measured = measure_row_seconds(self.arch.denoiser, inputs, self.job.device, rows)
        per_row = measured["seconds_per_row"]
        macs = self.shape.macs
        return {"device": str(self.job.device), "label": f"this machine's {self.job.device} (measured)",
                "source": (f"measured: one denoiser call of {rows} sample rows with random weights took "
                           f"{measured['seconds_per_call']:.3g} s (median of {measured['repeats']} after a warm-up)"),
                "tflops": 2 * macs["total"] / per_row / 1e12 if macs else None, "achieved_fraction": 1.0,
                "measured": measured}, per_row

    def _assumptions(self, cache: dict | None) -> None:
        a = self.assumptions
        a.append(f"the compile runs in process on one {self.target.label}" +
                 (" (--device cuda)" if self.target.is_gpu else "") + "; with --ray the counts are the same, and each "
                 "Ray worker also runs its own sensitivity FP reference and search reference")
        a.append("a cold work folder: no sensitivity table or cache-search checkpoint in .qsched-work to resume")
        left_out = ("it counts the denoiser only: text encoders, VAE decodes, CLIP or judge scoring, GPTQ rounding "
                    "(fp64), the integer program and the artifact write are left out")
        if self.measure:
            a.append(f"time = sample rows × the seconds per row of one measured denoiser call on {self.job.device} "
                     f"(× each probe's share of the denoiser); {left_out}")
        else:
            a.append(f"time = 2 × MACs per evaluation × sample rows / ({self.tflops_override or self.target.tflops(_dtype_name(self.arch.dtype)):g} "
                     f"TFLOPS × {self.fraction:g} achieved); {left_out}")
        a.append("MACs per evaluation at no cache reuse (" + self.shape.macs_source + "); cache-search candidates "
                 "reuse components and cost less, so their time is an upper bound")
        a.append(f"activations ≈ {ACTIVATION_FACTOR} × (input + output) of the widest layer per sample row, attention in "
                 "a fused kernel (no Tq × Tk score matrix); the cache search's stored outputs at their upper bound "
                 "(every cacheable component's output kept for every row of a call)")
        if cache is not None and "candidates" in cache:
            a.append(f"the cache search's final front has ~{cache['front_points_assumed']} points (= population; "
                     "flux-tiny's default compile had 14 of 16): the guard and the report scale with it")
        if self.arch.source.startswith("the shipped") and self.job.init != "random":
            a.append("the hub checkpoint has the architecture of the shipped configs (qsched/configs), in bf16")


# --- the meta-device forward ------------------------------------------------------------------------------


@dataclass
class _MetaShapes:
    """What one denoiser call looks like at the compile's settings, measured on the meta device (batch 1):
    tokens, MACs per evaluation, the widest layer's input + output elements, the cacheable components' output
    elements (what the cache stores per row) and the call's own input + output elements."""

    blocks: tuple = ()
    tokens: dict = field(default_factory=dict)
    macs: dict | None = None
    macs_source: str = ""
    analytic: bool = False
    activation_elements: int = 0
    store_elements: int = 0
    call_elements: int = 0
    text_elements: int = 0  # one prompt's text embeddings as the denoiser reads them (sequence and pooled)
    input_leader: dict = field(default_factory=dict)  # layer -> the layer whose input (and Hessian) it shares
    block_order: object = None  # the repeated blocks in the order they finish (:class:`_BlockOrder`), with MACs
    error: str = ""

    @classmethod
    def measure(cls, arch: Architecture, settings) -> _MetaShapes:
        from cache_search.cost import _FAMILIES, CostModel, measure_denoiser_macs, token_counts
        from calibrate.gptq import SharedInputs
        from qsched.runtime.cache_schedule import block_layout

        den = arch.denoiser
        out = cls()
        try:
            out.blocks = block_layout(den)
        except ValueError:
            out.blocks = ()
        stub = _PipeShape(den, arch.vae_scale_factor)
        if type(den).__name__ in _FAMILIES:  # analytic, as the cache search prices schedules
            tokens = token_counts(stub, settings.height, settings.width, settings.max_sequence_length)
            cost = CostModel.from_model(den, tokens)
            out.analytic = True
            out.tokens = {"image": tokens.image, "text": tokens.text}
            out.macs = _split_macs(den, cost.per_module)
            out.macs_source = "cache_search.cost.CostModel on the meta-device denoiser: linear + attention"
        try:
            inputs, text = _meta_inputs(den, settings, arch, out.tokens)
            elements = _ElementHooks(den, out.blocks)
            linears = {n: m for n, m in den.named_modules() if isinstance(m, nn.Linear)}
            order = _BlockOrder(den, linears)
            with elements, order, SharedInputs(linears) as shared:
                measured, seen = measure_denoiser_macs(den, lambda: _call(den, inputs))
            out.input_leader = {n: lead for n, lead in shared.leader.items() if lead != n}
            order.macs = measured
            out.block_order = order
            out.activation_elements = elements.widest
            out.store_elements = sum(elements.slots.values())
            out.call_elements = sum(t.numel() for t in _tensors(inputs)) + elements.output
            out.text_elements = sum(t.numel() for t in _tensors({k: v for k, v in _flat(inputs).items()
                                                                 if k in _TEXT_INPUTS}))
            if not out.analytic:
                out.tokens = {"image": seen.image, "text": seen.text or text}
                out.macs = _split_macs(den, measured)
                out.macs_source = "measured on the meta-device denoiser (cache_search.cost.measure_denoiser_macs)"
        except Exception as err:  # noqa: BLE001 - an unusual local model must not stop the plan
            out.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        return out


class _PipeShape:
    """What :func:`cache_search.cost.token_counts` reads from a pipeline."""

    def __init__(self, denoiser, vae_scale_factor):
        self.transformer, self.vae_scale_factor = denoiser, vae_scale_factor


def _split_macs(den: nn.Module, per_module: dict[str, int]) -> dict:
    from cache_search.cost import _is_leaf_compute

    modules = dict(den.named_modules())
    linear = sum(v for k, v in per_module.items() if k in modules and _is_leaf_compute(modules[k]))
    total = sum(per_module.values())
    return {"total": int(total), "linear": int(linear), "attention": int(total - linear)}


def _meta_inputs(den: nn.Module, settings, arch: Architecture, tokens: dict) -> tuple[dict, int]:
    """Batch-1 meta tensors for one denoiser call at ``settings`` (the arguments the pipelines pass)."""
    c, dt, meta = den.config, arch.dtype, "meta"
    name = type(den).__name__
    z = lambda *shape: torch.zeros(*shape, device=meta, dtype=dt)
    h, w = settings.height // arch.vae_scale_factor, settings.width // arch.vae_scale_factor
    if name == "FluxTransformer2DModel":
        ti, tt = tokens["image"], tokens["text"]
        kw = {"hidden_states": z(1, ti, c.in_channels), "encoder_hidden_states": z(1, tt, c.joint_attention_dim),
                  "pooled_projections": z(1, c.pooled_projection_dim), "timestep": z(1),
                  "img_ids": torch.zeros(ti, 3, device=meta), "txt_ids": torch.zeros(tt, 3, device=meta)}
        if c.guidance_embeds:
            kw["guidance"] = z(1)
        return kw, tt
    if name == "PixArtTransformer2DModel":
        extra = {"resolution": z(1, 2), "aspect_ratio": z(1, 1)} if c.use_additional_conditions else \
            {"resolution": None, "aspect_ratio": None}
        return {"hidden_states": z(1, c.in_channels, h, w), "encoder_hidden_states": z(1, tokens["text"], c.caption_channels),
                    "timestep": z(1), "added_cond_kwargs": extra}, tokens["text"]
    if name == "UNet2DConditionModel":
        text = arch.text_length or 77
        kw = {"sample": z(1, c.in_channels, h, w), "timestep": z(1), "encoder_hidden_states": z(1, text, c.cross_attention_dim)}
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": z(1, pooled), "time_ids": z(1, 6)}
        if c.time_cond_proj_dim:
            kw["timestep_cond"] = z(1, c.time_cond_proj_dim)
        return kw, text
    raise ValueError(f"no meta-device call for {name}")


#: the denoiser inputs that carry a prompt's text embeddings, in the three families' call signatures
_TEXT_INPUTS = ("encoder_hidden_states", "pooled_projections", "text_embeds")


def _flat(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        out.update(_flat(v) if isinstance(v, dict) else {k: v})
    return out


def _call(den: nn.Module, inputs: dict):
    with torch.inference_mode():
        return den(**inputs)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class _BlockOrder:
    """Which repeated blocks finish before each layer first runs, and how many elements the blocks output, on
    one meta call: what :class:`calibrate.sensitivity._BlockPrefix` skips and records in a real one."""

    def __init__(self, den: nn.Module, layers: dict[str, nn.Module]):
        from calibrate.sensitivity import repeated_blocks

        self.den, self.layers = den, layers
        ids = {id(b) for b in repeated_blocks(den)}
        self.blocks = {id(b): name for name, b in den.named_modules() if id(b) in ids}
        self.finished: list[str] = []
        self.elements: list[int] = []  # each finished block's output elements (batch 1)
        self.before: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self.handles = []

    def __enter__(self):
        def done(_m, _args, out):
            self.finished.append(self.blocks[id(_m)])
            self.elements.append(sum(t.numel() for t in _tensors(out)))

        def start(name):
            def hook(_m, _args):
                self.before.setdefault(name, len(self.finished))
            return hook

        modules = dict(self.den.named_modules())
        self.handles = [modules[n].register_forward_hook(done) for n in self.blocks.values()]
        self.handles += [m.register_forward_pre_hook(start(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def depth_within(self, max_bytes: int, row_steps: int, itemsize: int) -> int:
        """How many blocks (in finishing order) a record of ``row_steps`` calls keeps within ``max_bytes``."""
        used = 0
        for depth, elements in enumerate(self.elements):
            used += row_steps * elements * itemsize
            if used > max_bytes:
                return depth
        return len(self.elements)

    def record_bytes(self, depth: int, row_steps: int, itemsize: int) -> int:
        return row_steps * sum(self.elements[:depth]) * itemsize

    def shares(self, depth: int) -> dict[str, float]:
        """Per layer: 1 − (MACs of the recorded blocks that finished before it) / (the call's MACs)."""
        total = sum(self.macs.values())
        if not total:
            return {}
        block_macs = {b: sum(v for k, v in self.macs.items() if k.startswith(b + ".")) for b in self.finished}
        return {n: 1.0 - sum(block_macs[b] for b in self.finished[:min(k, depth)]) / total
                for n, k in self.before.items()}


class _ElementHooks:
    """Forward hooks that record the widest compute layer (input + output elements), each cacheable
    component's output elements, and the denoiser's own output elements, on one (batch-1) call."""

    def __init__(self, den: nn.Module, blocks):
        self.den, self.blocks = den, blocks
        self.widest = self.output = 0
        self.slots: dict[tuple[str, str], int] = {}
        self.handles = []

    def __enter__(self):
        from cache_search.cost import _is_leaf_compute

        def leaf(_m, args, out):
            ins = sum(t.numel() for t in _tensors(args[:1]))
            self.widest = max(self.widest, ins + sum(t.numel() for t in _tensors(out)))

        def slot(key):
            def hook(_m, _args, out):
                self.slots.setdefault(key, sum(t.numel() for t in _tensors(out)))
            return hook

        def whole(_m, _args, out):
            self.output = sum(t.numel() for t in _tensors(out))

        for _, module in self.den.named_modules():
            if _is_leaf_compute(module):
                self.handles.append(module.register_forward_hook(leaf))
        for block, comps in self.blocks:
            for comp in comps:
                sub = self.den.get_submodule(f"{block}.{comp}")
                self.handles.append(sub.register_forward_hook(slot((block, comp))))
        # registered before measure_denoiser_macs registers the hook that stops the call, so it runs first
        self.handles.append(self.den.register_forward_hook(whole))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _cfg_passes(arch: Architecture, guidance: float) -> int:
    """Denoiser rows per image and step: 2 where the pipeline runs classifier-free guidance as a doubled batch
    (PixArt at guidance > 1; an SDXL UNet at guidance > 1 without a guidance embedding), else 1 (FLUX's
    guidance is an embedding; its true CFG needs a negative prompt, which the compile never passes)."""
    name = type(arch.denoiser).__name__
    if name == "PixArtTransformer2DModel":
        return 2 if guidance > 1.0 else 1
    if name == "UNet2DConditionModel":
        return 2 if guidance > 1.0 and arch.denoiser.config.time_cond_proj_dim is None else 1
    return 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 730 * 86400:
        return f"{seconds / 86400:,.1f} days"
    return f"{seconds / (365.25 * 86400):,.1f} years"
