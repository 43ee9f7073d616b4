"""flux-tiny v2 training (qsched.tinyworld.train_v2): every phase runs on a tiny budget, checkpoints in
safetensors, and a run stopped after any step resumes to exactly the state of an uninterrupted run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qsched.tinyworld import train_v2

TINY = ["--threads", "1", "--ckpt-every", "1", "--vae-batch", "4", "--vae-eval", "0", "--norm-images", "16", "--text-batch", "8",
        "--flow-batch", "4", "--width", "1", "--depth", "1,1", "--eval-every", "0"]
PHASES = ("vae", "vaedec", "text", "flow", "reflow", "guide", "coef", "temp")
COEF = ["--coef-cx", "0.8,0.9", "--coef-ce", "1.1,0.95"]  # the coef phase's teacher: 2-step Q-Sched coefficients


def _budget(**steps):
    return [a for k, v in steps.items() for a in (f"--{k}-steps", str(v))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two steps of every phase in one go, with an evaluation and an export."""
    work = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    try:
        train_v2.main(["--work", str(work), "--phases", "temp,export", "--eval-every", "2", "--eval-prompts", "4",
                       "--teacher-steps", "2", *COEF, *TINY[:-2],
                       *_budget(vae=2, vaedec=2, text=2, flow=2, reflow=2, guide=2, coef=2, temp=2)])
    finally:
        torch.set_num_threads(threads)
    return work


def test_phases_checkpoint_evaluate_and_export(straight):
    for phase in PHASES:
        assert (straight / f"{phase}.safetensors").is_file()
    rows = [json.loads(line) for line in (straight / "curve.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"], r["n"]) for r in rows] == [("flow", 2, 4), ("reflow", 2, 4), ("guide", 2, 4),
                                                               ("coef", 2, 4), ("temp", 2, 4)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for r in rows:  # each prompt's verdict is kept, so two runs' curves compare prompt by prompt
        assert train_v2.unpack_correct(r["correct_bits"], r["n"]).mean() == pytest.approx(r["accuracy"])
    from diffusers import FluxPipeline

    from qsched.runtime.generation import generate
    pipe = FluxPipeline.from_pretrained(str(straight / "pipeline"), local_files_only=True)
    assert pipe.vae_scale_factor == 2 and pipe.transformer.config.in_channels == 16
    from qsched.tinyworld.model import SHIPPED_SCHEDULER_CONFIG, WEIGHTS_DIR
    shipped = json.loads((WEIGHTS_DIR / "scheduler" / "scheduler_config.json").read_text())
    # an export carries the shipped sampler (time shift 3.0), so a retrained flux-tiny samples as the package does
    assert pipe.scheduler.config.shift == shipped["shift"] == SHIPPED_SCHEDULER_CONFIG["shift"]
    images = generate(pipe, ["a red circle"], train_v2.SETTINGS_V2, batch_size=1)
    assert images.shape == (1, 3, 32, 32)
    threads = torch.get_num_threads()
    try:  # the acceptance evaluation loads every finished phase and writes its numbers
        train_v2.main(["--work", str(straight), "--phases", "eval", "--final-eval", "16", *TINY,
                       *_budget(vae=0, vaedec=0, text=0, flow=0, reflow=0, guide=0, coef=0, temp=0)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads((straight / "eval-flow2.json").read_text())
    assert res["n"] == 16 and 0 <= res["steps_20"]["accuracy"] <= 1 and res["fp16_megabytes"] < 20


def test_resume_reaches_the_same_state(straight, tmp_path):
    threads = torch.get_num_threads()
    try:
        for i, phase in enumerate(PHASES):  # each phase: stop after one step, then resume for the second
            done = {p: 2 for p in PHASES[:i]}
            for steps in (1, 2):
                budget = _budget(**{**{p: 0 for p in PHASES}, **done, phase: steps})
                train_v2.main(["--work", str(tmp_path), "--phases", phase, "--teacher-steps", "2", *COEF, *TINY,
                               *budget])
    finally:
        torch.set_num_threads(threads)
    for phase in PHASES:
        a, b = load_file(str(straight / f"{phase}.safetensors")), load_file(str(tmp_path / f"{phase}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (phase, k)


@pytest.mark.parametrize("item", ["relation", "relation=x", "relaton=2"])
def test_bad_kind_weight_is_one_line_and_status_2_before_any_work(item, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_v2.main(["--work", str(tmp_path / "w"), "--kind-weight", item])
    assert exit_.value.code == 2 and not (tmp_path / "w").exists()
    assert "kind" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("flags", [["--text-role-weight", "-1"], ["--text-scene-weight", "0.5", "--freeze-text"],
                                   ["--text-group-weight", "0.5", "--freeze-text"], ["--init-from", "no/such/dir"],
                                   ["--fresh-transformer"], ["--guide-scale", "0.5"],
                                   ["--caption-dropout", "1"], ["--guide-on-policy", "1.5"],
                                   ["--coef-cx", "0.8,x"], ["--coef-on-path", "2"],
                                   ["--coef-steps", "5", "--coef-cx", "0.8,0.9"],
                                   ["--coef-cx", "0.8,0.9", "--coef-ce", "1", "--phases", "coef"],
                                   ["--coef-cx", "0.8,0", "--coef-ce", "1,1", "--coef-steps", "5"],
                                   ["--temp-tau", "0"], ["--temp-tau", "1.5"], ["--temp-on-path", "-1"],
                                   ["--guide-skip", "single_transformer_blocks.4"], ["--guide-skip", "blocks.0"]])
def test_bad_fine_tune_flags_are_one_line_and_status_2_before_any_work(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_v2.main(["--work", str(tmp_path / "w"), *flags])
    assert exit_.value.code == 2 and not (tmp_path / "w").exists()
    assert flags[0] in capsys.readouterr().err.splitlines()[-1]


def test_scene_target_is_the_scene_not_the_word_order():
    rows = train_v2.scene_targets(["a red circle above a blue square", "a blue square below a red circle",
                                   "a blue square above a red circle", "a red circle to the left of a blue square",
                                   "a large blue square to the right of a red circle", "a red circle and a blue square"])
    assert torch.equal(rows[0], rows[1])  # same scene said the other way
    assert not torch.equal(rows[0], rows[2])  # objects swapped: another scene
    assert torch.equal(rows[3], rows[4]) and not torch.equal(rows[0], rows[3])  # sizes ignored; the axis counts
    assert rows[5].tolist() == [0] * 5  # no relation: "none"


@pytest.mark.parametrize("flag,head,more", [("--text-scene-weight", "scene.", []), ("--text-role-weight", "role.", []),
                                            ("--text-group-weight", "group.", ["--caption-dropout", "0.5"])])
def test_auxiliary_text_loss_checkpoints_and_resumes(tmp_path, flag, head, more):
    """Two flow steps with an auxiliary head on the T5 states (the pooled scene or the per-token roles) from the
    shipped weights, in one go and as 1 + 1 steps: identical checkpoints, the head saved in them. With caption
    dropout the head learns from the kept captions only."""
    flags = ["--phases", "flow", "--init-from", "shipped", flag, "0.5", *more, *TINY[:-6], "--eval-every", "0"]
    a = _two_steps_equal_one_plus_one(tmp_path, flags, "flow")
    assert any(k.startswith(head) for k in a)


def _two_steps_equal_one_plus_one(tmp_path, flags: list[str], phase: str) -> dict:
    """Run ``phase`` for two steps in one go and as 1 + 1 (a resume): the checkpoints must be identical."""
    threads = torch.get_num_threads()
    try:
        train_v2.main(["--work", str(tmp_path / "a"), *flags, f"--{phase}-steps", "2"])
        for steps in ("1", "2"):
            train_v2.main(["--work", str(tmp_path / "b"), *flags, f"--{phase}-steps", steps])
    finally:
        torch.set_num_threads(threads)
    a, b = (load_file(str(tmp_path / run / f"{phase}.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a


@pytest.mark.parametrize("source", ["shipped", "folder"])
def test_init_from_shipped_starts_from_the_shipped_weights(tmp_path, source):
    from qsched.tinyworld.model import WEIGHTS_DIR, load_embedded
    threads = torch.get_num_threads()
    init = "shipped" if source == "shipped" else str(WEIGHTS_DIR)
    try:  # zero flow steps: the pipeline is the shipped one (the VAE, text and flow phases train nothing)
        pipe = train_v2.main(["--work", str(tmp_path), "--phases", "flow", "--init-from", init,
                              "--flow-steps", "0", *TINY[:-6]])
    finally:
        torch.set_num_threads(threads)
    shipped = load_embedded()
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        mine, ref = getattr(pipe, name).state_dict(), getattr(shipped, name).state_dict()
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref), name
    assert pipe.vae.config.scaling_factor == shipped.vae.config.scaling_factor
    assert not (tmp_path / "vae.safetensors").exists() and not (tmp_path / "text.safetensors").exists()


def test_fresh_transformer_keeps_the_shipped_vae_and_text_and_takes_another_width(tmp_path):
    from qsched.tinyworld.model import load_embedded
    threads = torch.get_num_threads()
    try:  # width 1, not the shipped 4: only a fresh transformer fits
        pipe = train_v2.main(["--work", str(tmp_path), "--phases", "flow", "--init-from", "shipped",
                              "--fresh-transformer", "--flow-steps", "0", *TINY])
    finally:
        torch.set_num_threads(threads)
    shipped = load_embedded()
    for name in ("text_encoder", "text_encoder_2", "vae"):
        mine, ref = getattr(pipe, name).state_dict(), getattr(shipped, name).state_dict()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), name
    assert pipe.transformer.config.num_attention_heads == 1 != shipped.transformer.config.num_attention_heads
    assert pipe.vae.config.scaling_factor == shipped.vae.config.scaling_factor


def test_role_targets_mark_where_each_words_object_goes():
    from qsched.tinyworld.model import load_embedded
    tok = load_embedded().tokenizer_2
    caps = ["a red circle above a blue square", "a small blue square to the left of a red circle",
            "a red circle in the top right corner", "a red circle and a blue square"]
    y = train_v2.role_targets(tok, caps, 16)
    v, h = train_v2.ROLE_FIELDS["vertical"], train_v2.ROLE_FIELDS["horizontal"]
    assert [v[i] for i in y[0, :3, 0]] == ["upper"] * 3 and v[y[0, 3, 0]] == "none"  # "above" itself: none
    assert [v[i] for i in y[0, 4:7, 0]] == ["lower"] * 3 and (y[0, :8, 1] == 0).all()  # eos: none
    assert (y[0, 8:] == -100).all()  # padding ignored
    assert [h[i] for i in y[1, :4, 1]] == ["left"] * 4 and [h[i] for i in y[1, 8:11, 1]] == ["right"] * 3
    assert (v[y[2, 0, 0]], h[y[2, 0, 1]]) == ("upper", "right") and (y[2, 3:, :][y[2, 3:, 0] >= 0] == 0).all()
    assert (y[3][y[3] >= 0] == 0).all()  # no place named: all "none"


def test_group_targets_carry_count_and_size_to_every_word_of_the_group():
    from qsched.tinyworld.model import load_embedded
    pipe = load_embedded()
    tok = pipe.tokenizer_2
    caps = ["two small red circles and a blue square", "three large green triangles", "a red circle above a blue square"]
    y = train_v2.group_targets(tok, caps, 16)
    c, s = train_v2.GROUP_FIELDS["count"], train_v2.GROUP_FIELDS["size"]
    assert [(c[a], s[b]) for a, b in y[0, :4].tolist()] == [(2, "small")] * 4
    assert y[0, 4].tolist() == [0, 0] and [(c[a], s[b]) for a, b in y[0, 5:8].tolist()] == [(1, "unsaid")] * 3
    assert y[0, 8].tolist() == [0, 0] and (y[0, 9:] == -100).all()  # eos "none", then padding
    assert [(c[a], s[b]) for a, b in y[1, :4].tolist()] == [(3, "large")] * 4
    assert y[2, 3].tolist() == [0, 0] and (y[2, :3, 0] == c.index(1)).all()  # "above" belongs to no group
    with pytest.raises(ValueError, match="word-level tokenizer"):
        train_v2.group_targets(pipe.tokenizer, ["a red circle"], 16)  # CLIP's adds a BOS


def _benchmark(name: str = "tiny_sampler"):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capacity_benchmark_parses_variants_and_rejects_bad_ones():
    import argparse

    bench = _benchmark("tiny_capacity_latency")
    assert bench.parse_variant("5:2,4") == (5, 2, 4) and bench.parse_variant("4:0,8") == (4, 0, 8)
    for bad in ("5", "5:2", "x:2,4", "0:2,4", "4:0,0", "4:-1,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_variant(bad)


def test_sampler_benchmark_parses_scheduler_overrides_and_rejects_bad_ones():
    bench = _benchmark()
    assert bench.parse_overrides("shift=3,shift_terminal=0.2,use_beta_sigmas=true") == {
        "shift": 3.0, "shift_terminal": 0.2, "use_beta_sigmas": True}
    for bad in ("shift=x", "shift=0", "shift_terminal=1.5", "sigma_min=0.1", "shift",
                "use_karras_sigmas=yes", "use_karras_sigmas=true,use_beta_sigmas=true"):
        with pytest.raises(ValueError):
            bench.parse_overrides(bad)


def test_caption_dropout_is_seeded_per_step_and_off_by_default():
    off = train_v2.parse_args(["--caption-dropout", "0"])
    assert train_v2._kept_captions(off, "flow", 3, 64).all()
    on = train_v2.parse_args(["--caption-dropout", "0.25"])
    keep = train_v2._kept_captions(on, "guide", 3, 4096)
    assert torch.equal(keep, train_v2._kept_captions(on, "guide", 3, 4096))
    assert not torch.equal(keep, train_v2._kept_captions(on, "guide", 4, 4096))
    assert 0.7 < keep.float().mean() < 0.8


def test_on_policy_guide_runs_on_the_shipped_sampler_grid_and_resumes(tmp_path):
    """The on-policy guide phase takes states the model's own 4-step sampler visits (the shipped grid, time
    shift 3.0), with caption dropout; two steps in one go equal 1 + 1 steps."""
    from qsched.tinyworld.model import load_embedded
    assert train_v2.sampler_grid(load_embedded().scheduler, 4) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    flags = ["--phases", "guide", "--init-from", "shipped", "--flow-steps", "0", "--guide-on-policy", "1",
             "--caption-dropout", "0.5", *TINY[:-6], "--eval-every", "0"]
    _two_steps_equal_one_plus_one(tmp_path, flags, "guide")


def test_coefficient_field_steps_exactly_as_the_coefficient_sampler():
    """One plain Euler step of the coef phase's target field from each σ of the grid is the Q-Sched scheduler's
    step with those coefficients (so a model that learns the field samples what the wrapped scheduler samples),
    and a σ between grid points takes its interval's coefficients."""
    import numpy as np

    from qsched.runtime.schedulers import QSchedScheduler, SchedulerCoefficients
    from qsched.tinyworld import world
    from qsched.tinyworld.model import load_embedded
    torch.manual_seed(0)
    pipe = load_embedded()
    coefs = SchedulerCoefficients(4, [0.7, 0.85, 0.7, 0.95], [0.95, 0.8, 0.97, 0.83])
    grid = train_v2.sampler_grid(pipe.scheduler, 4)
    images, captions = world.sample_batch(seed=1, n=3, split="test")
    x0, ids = train_v2.encode_images(pipe, images, "cpu")
    cond = (*train_v2.encode_text(pipe, captions, "cpu"), ids)
    sched = QSchedScheduler.wrap(pipe.scheduler, coefs)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    x = y = torch.randn(x0.shape)
    with torch.no_grad():
        for i in range(4):
            sigma = torch.full((3,), grid[i])
            y = sched.step(train_v2._velocity(pipe.transformer, y, sigma, *cond), sched.timesteps[i], y).prev_sample
            x = x + (grid[i + 1] - grid[i]) * train_v2._coefficient_velocity(pipe.transformer, x, sigma, cond,
                                                                             coefs, grid)
            assert torch.allclose(x, y, atol=1e-5), i
        sigma = torch.tensor([0.95, 0.8, 0.3])  # intervals 0, 1 and 3 of [1, 0.9, 0.75, 0.5, 0]
        v = train_v2._velocity(pipe.transformer, x, sigma, *cond)
        k = torch.tensor([(0.7 - 1) / -0.1, (0.85 - 1) / -0.15, (0.95 - 1) / -0.5])
        want = torch.tensor([0.95, 0.8, 0.83])[:, None, None] * v + k[:, None, None] * x
        got = train_v2._coefficient_velocity(pipe.transformer, x, sigma, cond, coefs, grid)
        assert torch.allclose(got, want, atol=1e-5)


def test_coef_phase_runs_on_the_coefficient_path_and_resumes(tmp_path):
    """The coef phase, every batch on the coefficient sampler's own path (shipped grid), two steps in one go
    equal 1 + 1 steps."""
    flags = ["--phases", "coef", "--init-from", "shipped", "--flow-steps", "0", "--coef-on-path", "1",
             "--coef-cx", "0.7,0.85,0.7,0.95", "--coef-ce", "0.95,0.8,0.97,0.83", *TINY[:-6], "--eval-every", "0"]
    _two_steps_equal_one_plus_one(tmp_path, flags, "coef")


def test_field_resampling_steps_the_field_the_coef_phase_learns():
    """``SchedulerCoefficients.field_resampled`` (what ``interpolate=True`` uses on finer flow grids, and
    benchmarks/tiny_coefficients.py's field reading) takes, from each σ of another grid, one Euler step of the
    coef phase's target field; at the coefficients' own step count it is them."""
    import dataclasses

    from qsched.runtime.schedulers import SchedulerCoefficients
    from qsched.tinyworld import world
    from qsched.tinyworld.model import load_embedded
    torch.manual_seed(0)
    pipe = load_embedded()
    coefs = SchedulerCoefficients(4, [0.7, 0.85, 0.7, 0.95], [0.95, 0.8, 0.97, 0.83])
    grid, grid20 = train_v2.sampler_grid(pipe.scheduler, 4), train_v2.sampler_grid(pipe.scheduler, 20)
    recorded = dataclasses.replace(coefs, sigmas=grid)
    same = recorded.field_resampled(grid)
    assert same.cx == pytest.approx(coefs.cx) and same.ce == pytest.approx(coefs.ce)
    used = recorded.field_resampled(grid20)
    images, captions = world.sample_batch(seed=1, n=1, split="test")
    x0, ids = train_v2.encode_images(pipe, images, "cpu")
    cond = (*train_v2.encode_text(pipe, captions, "cpu"), ids)
    x = torch.randn(x0.shape)
    with torch.no_grad():
        for j in range(20):
            sigma = torch.full((1,), grid20[j])
            v = train_v2._velocity(pipe.transformer, x, sigma, *cond)
            step = used.cx[j] * x + (grid20[j + 1] - grid20[j]) * used.ce[j] * v
            field = x + (grid20[j + 1] - grid20[j]) * train_v2._coefficient_velocity(pipe.transformer, x, sigma,
                                                                                     cond, coefs, grid)
            assert torch.allclose(step, field, atol=1e-5), j
            x = step


def test_tempered_student_steps_land_on_the_teachers_offset_path_at_any_grid():
    """The temp phase's pairs: from y = x + σ(1 − τ)·noise an Euler step of the learned velocity lands on the
    teacher's Euler step from x plus the same offset at the next σ, on the 4-step grid and the 20-step one, so
    the plain sampler from noise draws what the teacher draws from τ·noise."""
    from qsched.tinyworld import world
    from qsched.tinyworld.model import load_embedded
    torch.manual_seed(0)
    pipe = load_embedded()
    images, captions = world.sample_batch(seed=1, n=2, split="test")
    x0, ids = train_v2.encode_images(pipe, images, "cpu")
    cond = (*train_v2.encode_text(pipe, captions, "cpu"), ids)
    noise, tau = torch.randn(x0.shape), 0.7
    for steps in (4, 20):
        grid = train_v2.sampler_grid(pipe.scheduler, steps)
        x = tau * noise
        y = x + grid[0] * (1 - tau) * noise
        assert torch.allclose(y, noise, atol=1e-6)  # the student starts from plain noise
        with torch.no_grad():
            for s, s2 in zip(grid[:-1], grid[1:]):
                sigma = torch.full((2,), s)
                y_at, v = train_v2._tempered(pipe.transformer, x, sigma, noise, cond, tau)
                assert torch.allclose(y_at, y, atol=1e-5)
                y = y + (s2 - s) * v
                x = x + (s2 - s) * train_v2._velocity(pipe.transformer, x, sigma, *cond)
        assert torch.allclose(y, x, atol=1e-5)  # σ = 0: the same image


def test_temp_phase_runs_on_the_tempered_path_and_resumes(tmp_path):
    flags = ["--phases", "temp", "--init-from", "shipped", "--flow-steps", "0", "--temp-on-path", "1",
             "--temp-tau", "0.7", *TINY[:-6], "--eval-every", "0"]
    _two_steps_equal_one_plus_one(tmp_path, flags, "temp")


def test_reflow_sigma_mix_sits_on_the_shipped_samplers_grid():
    """Reflow's few-step σ mix uses the σ values the shipped sampler steps from (time shift 3.0), not an even
    grid; the rest stays logit-normal."""
    from qsched.tinyworld.model import load_embedded

    grid = train_v2.sampler_grid(load_embedded().scheduler, 4)
    assert grid[-1] == 0.0 and grid[1] > 0.75  # shift 3.0 spends the early steps at high σ
    gen = torch.Generator().manual_seed(0)
    mixed = train_v2._sigmas(gen, 4000, "cpu", 1.0, grid)
    assert set(mixed.tolist()) <= set(torch.tensor(grid[:-1]).tolist())
    half = train_v2._sigmas(gen, 4000, "cpu", 0.5, grid)
    on_grid = torch.isin(half, torch.tensor(grid[:-1]))
    assert 0.4 < on_grid.float().mean() < 0.6


def test_grow_keeps_the_shipped_transformer_function_and_adds_trainable_blocks(tmp_path):
    from qsched.tinyworld.model import load_embedded
    threads = torch.get_num_threads()
    try:  # the shipped width, one more block in each stack
        pipe = train_v2.main(["--work", str(tmp_path), "--phases", "flow", "--init-from", "shipped", "--grow",
                              "--flow-steps", "0", *TINY, "--width", "4", "--depth", "3,5"])
    finally:
        torch.set_num_threads(threads)
    shipped = load_embedded().transformer
    grown = pipe.transformer
    assert (len(grown.transformer_blocks), len(grown.single_transformer_blocks)) == (3, 5)
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 64, 16), encoder_hidden_states=torch.randn(2, 16, 64),
                  pooled_projections=torch.randn(2, 64), timestep=torch.tensor([0.3, 0.9]),
                  img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(16, 3), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs)[0], shipped(**inputs)[0], rtol=1e-5, atol=1e-5)
    new = grown.single_transformer_blocks[4]
    assert new.norm.linear.weight[2 * grown.inner_dim:].abs().sum() == 0 != new.proj_out.weight.abs().sum()
    loss = grown.requires_grad_(True)(**inputs)[0].square().mean()
    loss.backward()  # the zero gates still learn: their gradient is the new block's output
    assert new.norm.linear.weight.grad[2 * grown.inner_dim:].abs().sum() > 0


@pytest.mark.parametrize("flags", [["--grow"], ["--init-from", "shipped", "--grow", "--fresh-transformer"],
                                   ["--init-from", "shipped", "--grow", "--depth", "1,4"],
                                   ["--init-from", "shipped", "--grow", "--width", "5", "--depth", "2,4"]])
def test_bad_grow_flags_are_one_line_and_status_2_before_any_work(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_v2.main(["--work", str(tmp_path / "w"), "--phases", "flow", *flags])
    assert exit_.value.code == 2 and not (tmp_path / "w").exists()
    assert "--grow" in capsys.readouterr().err.splitlines()[-1]


def test_skip_guided_target_is_the_teacher_pushed_away_from_its_skipped_self():
    from qsched.tinyworld.model import load_embedded
    from qsched.tinyworld.skip_guidance import skipped
    pipe = load_embedded()
    torch.manual_seed(0)
    xt, sigma = torch.randn(2, 64, 16), torch.tensor([0.4, 0.8])
    cond = (torch.randn(2, 16, 64), torch.randn(2, 64), torch.zeros(16, 3), torch.zeros(64, 3))
    blocks = ["single_transformer_blocks.1", "single_transformer_blocks.2"]
    target = train_v2._skip_guided_velocity(pipe.transformer, xt, sigma, cond, blocks, 2.0)
    with torch.no_grad():
        v = train_v2._velocity(pipe.transformer, xt, sigma, *cond)
        with skipped(pipe.transformer, blocks):
            v_skip = train_v2._velocity(pipe.transformer, xt, sigma, *cond)
    torch.testing.assert_close(target, v + (v - v_skip))
    assert (target - v).abs().mean() > 1e-3


def test_guide_phase_with_skip_layer_guidance_trains_and_checkpoints(tmp_path):
    threads = torch.get_num_threads()
    try:
        train_v2.main(["--work", str(tmp_path), "--phases", "guide", "--init-from", "shipped", "--flow-steps", "0",
                       "--guide-steps", "1", "--guide-skip", "single_transformer_blocks.1", "--guide-scale", "2",
                       *TINY, "--width", "4", "--depth", "2,4"])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "guide.safetensors").is_file()
    assert '"guide_skip": "single_transformer_blocks.1"' in (tmp_path / "log.txt").read_text()
