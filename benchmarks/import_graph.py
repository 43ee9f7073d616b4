"""The import graph between packages: cyclic pairs and strongly connected groups, and what loading an
artifact imports.

    .venv/bin/python benchmarks/import_graph.py [--units top|layers]

``top`` groups modules by top-level package (qsched, calibrate, cache_search, export); ``layers`` by the
units of ``.importlinter``'s layers contract (a subpackage or module of qsched, or a top-level package).
Counts every import statement, function-level ones included (grimp, as import-linter does).
"""
from __future__ import annotations

import argparse
import configparser
import json
import subprocess
import sys
from pathlib import Path

import grimp

ROOTS = ("qsched", "calibrate", "cache_search", "export")


def layer_units(root: Path) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(root / ".importlinter")
    lines = cfg["importlinter:contract:layers"]["layers"].split("\n")
    return [u.strip() for line in lines for u in line.replace(":", "|").split("|") if u.strip()]


def unit_of(module: str, units: list[str]) -> str | None:
    best = [u for u in units if module == u or module.startswith(u + ".")]
    return max(best, key=len) if best else None


def strongly_connected(nodes, edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            out.append(sorted(group))
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", choices=("top", "layers"), default="layers")
    ap.add_argument("--artifact", help="also load this artifact in a fresh interpreter and list what it imports")
    args = ap.parse_args()
    root = Path.cwd()
    graph = grimp.build_graph(*ROOTS, cache_dir=None)
    units = list(ROOTS) if args.units == "top" else layer_units(root)
    edges: dict[str, set[str]] = {}
    for m in graph.modules:
        a = unit_of(m, units)
        for i in graph.find_modules_directly_imported_by(m):
            b = unit_of(i, units)
            if a and b and a != b:
                edges.setdefault(a, set()).add(b)
    mutual = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    groups = [g for g in strongly_connected(units, edges) if len(g) > 1]
    result = {"units": len(units), "edges": sum(map(len, edges.values())), "mutual_pairs": mutual,
              "cyclic_groups": groups}
    if args.artifact:
        code = ("import json, sys, export\nexport.load(sys.argv[1])\n"
                "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
                f"{ROOTS + ('pulp', 'highspy', 'deap', 'ray', 'modelopt')!r})))")
        run = subprocess.run([sys.executable, "-c", code, args.artifact], capture_output=True, text=True, check=True)
        result["loaded_by_export_load"] = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
