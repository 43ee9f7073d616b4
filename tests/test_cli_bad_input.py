"""Every bad ``qcompile`` input: status 2, one ``qcompile: error:`` line, no traceback, nothing written.

In process (``main(argv)``) so the table stays cheap; two subprocess runs check the real entry point.
"""
import os
import sys

import pytest
import torch
from test_cli import assert_one_line_error, run_cli

from qsched.cli import main


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def _recipe(tmp, text, name="r.yaml"):
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _file(tmp, name="file"):
    (tmp / name).write_text("x")
    return str(tmp / name)


def _dir(tmp, name="d", files=()):
    (tmp / name).mkdir()
    for f in files:
        (tmp / name / f).write_text("x")
    return str(tmp / name)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")

# (id, argv builder taking tmp_path, words the error line must contain[, skip mark]); --out tmp/art unless set
TABLE = [
    ("model-empty", lambda t: ["--model", ""], ["--model is empty", "flux-tiny"]),
    ("model-blank", lambda t: ["--model", "   "], ["--model is empty"]),
    ("model-is-a-file", lambda t: ["--model", _file(t)], ["is a file", "directory"]),
    ("model-dir-not-pipeline", lambda t: ["--model", _dir(t)], ["model_index.json"]),
    ("model-unknown", lambda t: ["--model", "no_such_model"], ["unknown model", "flux-schnell"]),
    ("init-random-local-dir", lambda t: ["--model", _dir(t, files=["model_index.json"]), "--init", "random"],
     ["--init random", "registry"]),
    ("init-bad-choice", lambda t: ["--init", "zeros"], ["--init", "zeros"]),
    ("bits-bad", lambda t: ["--bits", "w7a8"], ["w7a8", "w{2,3,4,5,6,8}a{4,8,16}"]),
    ("bits-empty", lambda t: ["--bits", ""], ["invalid --bits"]),
    ("bits-fractional-uniform", lambda t: ["--bits", "w3.5a8", "--uniform"], ["fractional", "mixed precision"]),
    ("seed-negative", lambda t: ["--seed", "-1"], ["--seed", "4294967295"]),
    ("seed-2**32", lambda t: ["--seed", str(2**32)], ["--seed", "4294967295"]),
    ("seed-2**64", lambda t: ["--seed", str(2**64)], ["--seed", "out of range"]),
    ("seed-not-int", lambda t: ["--seed", "abc"], ["--seed", "abc"]),
    ("device-meta", lambda t: ["--device", "meta"], ["--device", "meta", "cpu"]),
    ("device-gpu", lambda t: ["--device", "gpu"], ["--device", "gpu"]),
    ("device-cuda-abc", lambda t: ["--device", "cuda:abc"], ["cuda:abc"]),
    ("device-empty", lambda t: ["--device", ""], ["invalid --device"]),
    ("device-cpu-1", lambda t: ["--device", "cpu:1"], ["cpu:1"]),
    ("device-cuda-none", lambda t: ["--device", "cuda"], ["CUDA", "--device cpu"], NO_CUDA),
    ("device-mps-none", lambda t: ["--device", "mps"], ["MPS", "--device cpu"], NO_MPS),
    ("eval-prompts-negative", lambda t: ["--eval-prompts", "-1"], ["--eval-prompts", "0"]),
    ("cache-budget-zero", lambda t: ["--cache-budget", "0"], ["--cache-budget", "(0, 1]"]),
    ("cache-budget-above-1", lambda t: ["--cache-budget", "1.5"], ["--cache-budget", "(0, 1]"]),
    ("cache-budget-nan", lambda t: ["--cache-budget", "nan"], ["--cache-budget", "(0, 1]"]),
    ("cache-budget-no-search", lambda t: ["--cache-budget", "0.5", "--no-cache-search"], ["--no-cache-search"]),
    ("recipe-empty-string", lambda t: ["--recipe", ""], ["--recipe is empty"]),
    ("recipe-missing", lambda t: ["--recipe", str(t / "nope.yaml")], ["does not exist"]),
    ("recipe-is-dir", lambda t: ["--recipe", _dir(t)], ["is a directory", "YAML file"]),
    ("recipe-not-utf8", lambda t: ["--recipe", _recipe(t, b"calibration:\n  prompts: \xff\xfe\n")], ["UTF-8"]),
    ("recipe-not-yaml", lambda t: ["--recipe", _recipe(t, "calibration: [unclosed\n")], ["not valid YAML"]),
    ("recipe-not-mapping", lambda t: ["--recipe", _recipe(t, "- 1\n- 2\n")], ["must be a mapping"]),
    ("recipe-unknown-key", lambda t: ["--recipe", _recipe(t, "calibration: {prompt: 3}")], ["'prompt'", "valid keys"]),
    ("recipe-wrong-type", lambda t: ["--recipe", _recipe(t, "calibration:\n  prompts: many\n")], ["must be int"]),
    ("recipe-seed-range", lambda t: ["--recipe", _recipe(t, "calibration:\n  seed: -5\n")], ["calibration.seed"]),
    ("recipe-budget-range", lambda t: ["--recipe", _recipe(t, "cache_search: {budget: 2}")], ["cache_search.budget"]),
    ("out-empty", lambda t: ["--out", ""], ["--out is empty"]),
    ("out-exists", lambda t: ["--out", _dir(t, "art", ["keep.txt"])], ["already exists", "--overwrite"]),
    ("out-is-file-overwrite", lambda t: ["--out", _file(t, "art"), "--overwrite"], ["not a directory"]),
    ("out-foreign-dir-overwrite", lambda t: ["--out", _dir(t, "art", ["keep.txt"]), "--overwrite"],
     ["not a qsched artifact"]),
    ("out-under-a-file", lambda t: ["--out", os.path.join(_file(t), "art")], ["cannot write", "not a directory"]),
    ("out-in-proc", lambda t: ["--out", "/proc/qcompile-test-art"], ["cannot write", "/proc"]),
    ("scorer-empty", lambda t: ["--scorer", ""], ["--scorer is empty"]),
    ("scorer-missing-dir", lambda t: ["--scorer", str(t / "no" / "clip")], ["no such directory", "world-judge"]),
    ("no-scorer-local-model", lambda t: ["--model", _dir(t, files=["model_index.json"])],
     ["no image scorer", "--scorer", "--no-qsched --no-cache-search", "flux-tiny"]),
    ("ray-empty", lambda t: ["--ray", ""], ["--ray needs a value"]),
    ("ray-bad-address", lambda t: ["--ray", "somewhere"], ["invalid --ray", "HOST:PORT"]),
    ("ray-bad-port", lambda t: ["--ray", "10.0.0.1:99999"], ["invalid --ray"]),
    ("ray-workers-zero", lambda t: ["--ray", "local", "--ray-workers", "0"], ["--ray-workers 0"]),
    ("export-unknown", lambda t: ["--export", "tensorrt"], ["--export", "tensorrt"]),
    ("unknown-flag", lambda t: ["--fast"], ["unrecognized arguments", "--fast"]),
    ("stray-positional", lambda t: ["flux-tiny"], ["unrecognized arguments"]),
]
CASES = [pytest.param(*row[1:3], id=row[0], marks=row[3:]) for row in TABLE]


def run_main(argv, capsys):
    """``main(argv)``'s status and stderr; argparse's own errors leave by SystemExit(2)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def check_rejected(argv, tmp_path, capsys, needles):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "art")]
    before = {p: (tmp_path / p).stat().st_mtime_ns for p in _files(tmp_path)}
    code, err = run_main(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("qcompile: error:")]
    assert len(lines) == 1, err
    other = [ln for ln in err.splitlines() if ln and not ln.startswith(("usage:", " ", "qcompile: error:"))]
    assert not other, err  # argparse's usage lines are the only other output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in _files(tmp_path)} == before  # nothing written
    assert not os.path.exists("/proc/qcompile-test-art")


@pytest.mark.parametrize("build,needles", CASES)
def test_bad_input_is_one_line_and_status_2(build, needles, tmp_path, capsys):
    check_rejected(build(tmp_path), tmp_path, capsys, needles)


def test_ray_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    check_rejected(["--ray", "local"], tmp_path, capsys, ["needs Ray", "pip install"])


def test_cases_are_distinct_and_many():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids) >= 30


def test_entry_point_non_utf8_recipe(tmp_path):
    """The real ``python -m qsched.cli``: the issue's UnicodeDecodeError traceback, now one line."""
    result = run_cli("--recipe", _recipe(tmp_path, b"\xff\xfe\x00bad"), "--out", str(tmp_path / "art"))
    assert result.returncode == 2
    assert_one_line_error(result, "UTF-8")
    assert not (tmp_path / "art").exists()


def test_entry_point_seed_overflow(tmp_path):
    """The issue's OverflowError traceback from torch.manual_seed, now one line."""
    result = run_cli("--seed", str(2**64), "--out", str(tmp_path / "art"))
    assert result.returncode == 2
    assert_one_line_error(result, "--seed", "4294967295")
    assert not (tmp_path / "art").exists()
