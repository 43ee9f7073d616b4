"""Report dict → one self-contained HTML file, and the atomic write of ``report.html`` into an artifact.

Why this shape:

* **Offline, self-contained.** The viewer (``static/viewer.js``, vanilla JS drawing inline SVG) and its
  stylesheet are inlined, images are ``data:`` URIs, and a Content-Security-Policy meta tag forbids
  every other source (``default-src 'none'``), so the page works from a file and cannot fetch anything.
* **Escaping.** The data travels as JSON in ``<script type="application/json">`` with ``<``, ``>``,
  ``&`` and U+2028/U+2029 written as ``\\uXXXX`` escapes, so no prompt or layer name can close the tag
  (``</script>``) or open another; the viewer inserts every string with ``textContent``, never as
  markup. The CSP allows only the viewer script itself (by hash), as a second line of defence.
* **Atomic replace.** ``report.html`` is written to a temporary sibling and renamed over the old one,
  so a reader sees the old page or the new page, never half of one. It is not listed in the manifest's
  checksums (it is derived from listed files), so regenerating it never breaks ``export.load``'s
  verification.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import secrets
from importlib import resources
from pathlib import Path

from export.format import _write_bytes
from qsched.core.errors import ArtifactError

REPORT_FILE = "report.html"

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<noscript><p>This report draws its charts with JavaScript; enable it to see them.</p></noscript>
<main id="report"></main>
<script type="application/json" id="report-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""


def _static(name: str) -> str:
    return resources.files("qsched.report").joinpath("static", name).read_text(encoding="utf-8")


def embed_json(data: dict) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` or line separators survive."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def render_html(data: dict) -> str:
    """The report page for ``data`` (from :func:`qsched.report.collect.collect`)."""
    js = _static("viewer.js").strip("\n")
    script = f"\n{js}\n"  # exactly the element's text in _TEMPLATE: the CSP hash covers all of it
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
           "base-uri 'none'; form-action 'none'")
    return _TEMPLATE.format(csp=csp, title=html.escape(f"qsched report: {data.get('title', '')}"),
                            css=_static("viewer.css").strip("\n"), data=embed_json(data), js=script)


def write_report(artifact_dir) -> Path:
    """(Re)write ``report.html`` in ``artifact_dir`` from its manifest and report data; returns its path.

    Used by the compile (on the temporary directory, before it is renamed into place) and by
    ``qcompile report``. Raises :class:`ArtifactError` for a missing or corrupt artifact.
    """
    from qsched.report.collect import collect

    artifact_dir = Path(artifact_dir)
    page = render_html(collect(artifact_dir)).encode("utf-8")
    target = artifact_dir / REPORT_FILE
    tmp = artifact_dir / f".{REPORT_FILE}.tmp-{secrets.token_hex(4)}"
    try:
        _write_bytes(tmp, page)  # written and fsynced, then renamed over the old page
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {target}: {err.strerror or err}") from err
    return target
