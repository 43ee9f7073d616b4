"""Every ```python block of README.md runs: each in a fresh interpreter, in an empty temporary directory (so a
snippet's relative ``out/…`` lands there), offline.

As written, the README's compile is the whole default compile of flux-tiny (the shipped recipe: MixDQ on 64
calibration prompts, Q-Sched with a budget of 120 runs, the cache search, 8 evaluation prompts): minutes on a
CPU (208 s measured on a shared 2-core machine). So by default each block runs with ``qsched.compile``
shrunk: the same methods and the same shipped recipe, its budgets cut to a few prompts and evaluations and
its sampler to 2 steps (``SHRINK``), unless the snippet passes a recipe itself. That checks every name, call
and return value the snippet uses. Blocks that compile the same model, bits and options share one shrunk
compile (the first writes it, the others get a copy opened with ``qsched.Artifact.open``): a shared compiled
fixture. ``QSCHED_README_FULL=1`` runs the blocks exactly as written.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FULL = os.environ.get("QSCHED_README_FULL") == "1"

# the recipe sections a shrunk compile overrides, on top of the shipped recipe for the model and bits
SHRINK = {"calibration": {"prompts": 4, "batch_size": 4},
          "quantization": {"sensitivity_prompts": 2, "weight_widths": [4, 8]},
          "coefficients": {"budget": 2, "prompts": 2, "heldout_prompts": 2},
          "cache_search": {"population": 4, "generations": 1, "prompts": 2, "guard_prompts": 2},
          "generation": {"steps": 2},
          "report": {"samples": 1, "repeats": 1}}

SHRUNK_COMPILE = f'''\
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

import qsched
from qsched.recipe import find_recipe

_compile = qsched.compile


def _shrunk_compile(model="flux-tiny", bits="w4a8", out=None, recipe=None, **kwargs):
    """qsched.compile with the shipped recipe's budgets cut (test_readme's fast mode); the same call in an
    earlier block is copied from the session's compiles instead of compiled again."""
    kwargs.setdefault("eval_prompts", 1)
    memo = None
    if recipe is None and out is not None and os.environ.get("QSCHED_README_COMPILES"):
        key = json.dumps([model, str(bits), sorted(kwargs.items())], default=str)
        memo = Path(os.environ["QSCHED_README_COMPILES"]) / hashlib.sha256(key.encode()).hexdigest()[:16]
        if memo.is_dir():
            shutil.copytree(memo, out)
            return qsched.Artifact.open(out)
    if recipe is None:
        shipped = find_recipe(model, str(bits))
        data = yaml.safe_load(shipped.read_text()) if shipped else {{}}
        for section, values in {SHRINK!r}.items():
            data[section] = {{**(data.get(section) or {{}}), **values}}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(data, f)
        recipe = f.name
    artifact = _compile(model, bits, out, recipe, **kwargs)
    if memo is not None:
        shutil.copytree(artifact.path, memo)
    return artifact


qsched.compile = _shrunk_compile
'''


def python_blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python fenced block; ``line`` is the README line of its first code line."""
    text = README.read_text()
    blocks = []  # a fence may be indented (inside a list item): its code is dedented by as much
    for match in re.finditer(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL):
        blocks.append((text.count("\n", 0, match.start(2)) + 1, textwrap.dedent(match.group(2))))
    return blocks


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def readme_compiles(tmp_path_factory):
    """Shrunk compiles shared by the blocks (one per model, bits and options)."""
    return tmp_path_factory.mktemp("readme-compiles")


def test_the_readme_has_python_blocks():
    assert BLOCKS, "no ```python block found in README.md: the extraction is broken, or the README lost its examples"


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, readme_compiles):
    # blank lines put the snippet at its README line numbers, so a traceback points into README.md
    source = "\n" * (line - 1) + code
    runner = (("" if FULL else SHRUNK_COMPILE)
              + f"\nexec(compile({source!r}, {str(README)!r}, 'exec'), {{'__name__': '__main__'}})\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # one intra-op thread, as the in-process tests use (conftest's one_thread): on a small shared CPU two
    # oversubscribed threads made this compile's sensitivity pass over 20x slower (minutes instead of seconds)
    env.setdefault("OMP_NUM_THREADS", "1")
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"  # the snippet's working directory, and every temporary file
    cwd.mkdir()
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    env["QSCHED_README_COMPILES"] = str(readme_compiles)
    result = subprocess.run([sys.executable, "-c", runner], cwd=cwd, env=env, capture_output=True, text=True,
                            check=False, timeout=None if FULL else 600)
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stderr[-4000:]}"
