"""``qcompile view``: serve an artifact's ``report.html`` on 127.0.0.1, and nothing else.

Why a server at all when the page works from a file: some browsers restrict ``file://`` pages, and a
URL is easy to open from a remote shell through an SSH tunnel. Why this little: the server binds the
loopback address only (never a public interface), answers ``GET``/``HEAD`` for ``/`` and
``/report.html`` (the rest of the artifact, weights included, is not exposed), opens no browser and
starts nothing else. The page is read from disk on every request, so ``qcompile report`` shows up on
reload; an artifact without ``report.html`` is rendered in memory (nothing is written).
"""
from __future__ import annotations

import errno
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from qsched.core.errors import QschedError

from qsched.report.render import REPORT_FILE, render_html

HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class ReportServer(ThreadingHTTPServer):
    """A loopback HTTP server for one artifact's report; ``url`` is where it listens."""

    daemon_threads = True

    def __init__(self, artifact_dir: Path, port: int):
        self.artifact_dir = Path(artifact_dir)
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def page(self) -> bytes:
        path = self.artifact_dir / REPORT_FILE
        if path.is_file():
            return path.read_bytes()
        from qsched.report.collect import collect
        return render_html(collect(self.artifact_dir)).encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    server: ReportServer

    def _respond(self, body: bool) -> None:
        if self.path.split("?", 1)[0] not in ("/", "/" + REPORT_FILE):
            self.send_error(404, "only the report is served here: open /")
            return
        try:
            page = self.server.page()
        except QschedError as err:
            self.send_error(500, str(err).splitlines()[0])
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body:
            self.wfile.write(page)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(body=False)

    def log_message(self, format: str, *args) -> None:  # quiet: the terminal shows the URL, not every request
        pass


def make_server(artifact_dir, port: int = DEFAULT_PORT) -> ReportServer:
    """A :class:`ReportServer` for the artifact at ``artifact_dir`` on 127.0.0.1:``port`` (0: a free port).

    Checks first that ``artifact_dir`` is an artifact (:class:`ArtifactError` otherwise) and turns a
    port that cannot be bound into a :class:`QschedError` naming it.
    """
    from export.format import read_manifest

    read_manifest(artifact_dir, verify=False)
    if not (Path(artifact_dir) / REPORT_FILE).is_file():
        from qsched.report.collect import collect
        collect(artifact_dir)  # a corrupt artifact fails here, with its one-line error, not on the first request
    if not 0 <= int(port) <= 65535:
        raise QschedError(f"--port {port} is not a TCP port; use 1-65535, or 0 for a free one")
    try:
        return ReportServer(Path(artifact_dir), int(port))
    except OSError as err:
        why = "it is already in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err))
        raise QschedError(f"cannot serve on {HOST}:{port}: {why}; choose another --port (0 picks a free one)") from None


def serve(artifact_dir, port: int = DEFAULT_PORT, announce=print) -> None:
    """Serve until interrupted (Ctrl-C); ``announce`` gets the one line with the URL."""
    server = make_server(artifact_dir, port)
    try:
        page = Path(artifact_dir) / REPORT_FILE
        how = "" if page.is_file() else " (no report.html in the artifact: rendered in memory)"
        announce(f"Serving the report of {artifact_dir} at {server.url}{how}; press Ctrl-C to stop")
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["DEFAULT_PORT", "HOST", "ReportServer", "make_server", "serve"]
