"""The artifact's report: one self-contained, offline ``report.html`` to choose an operating point by looking.

* :mod:`.measure` — during ``qcompile``: quality, MACs, latency, size and sample images of every Pareto
  point and of the baselines (FP, uniform RTN, FORA every N), stored as ``report/data.json`` + PNGs;
* :mod:`.collect` — artifact directory → one plain JSON-serialisable dict;
* :mod:`.render` — that dict → ``report.html`` (inline JS + SVG, images as ``data:`` URIs), written
  atomically; not listed in the manifest's checksums, so regenerating it never breaks verification;
* :mod:`.serve` — ``qcompile view``: a 127.0.0.1-only server for the page;
* :mod:`.cli` — ``qcompile report DIR`` and ``qcompile view DIR [--port P]``.
"""
from qsched.report.collect import collect
from qsched.report.render import REPORT_FILE, render_html, write_report

__all__ = ["REPORT_FILE", "collect", "render_html", "write_report"]
