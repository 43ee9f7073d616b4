"""The package layers: imports point downward only, and loading an artifact stays light."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("pulp", "highspy", "deap", "ray", "modelopt", "calibrate", "cache_search", "qsched.compiler",
         "qsched.coefficients", "qsched.stages")


def test_import_contracts_hold():
    """`.importlinter`'s layers and forbidden-imports contracts (function-level imports count too)."""
    pytest.importorskip("importlinter")
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(no_cache=True))"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_loading_an_artifact_imports_no_compile_time_code(tiny_report_artifact):
    """Measured at run time, in a fresh interpreter: what `export.load` really imports (the static
    contract misses imports done by name, for example through importlib)."""
    code = ("import json, sys, export\n"
            f"pipe = export.load({str(tiny_report_artifact.path)!r})\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    modules = json.loads(run.stdout.strip().splitlines()[-1])
    loaded = [m for m in modules if m.split(".")[0] in HEAVY or any(m.startswith(h + ".") or m == h for h in HEAVY)]
    assert loaded == []
    assert "export.loader" in modules and "qsched.runtime.qlayers" in modules
