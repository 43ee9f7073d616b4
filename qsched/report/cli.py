"""``qcompile report DIR`` and ``qcompile view DIR [--port P]``: the report subcommands.

``qsched.cli.main`` hands over when the first word is ``report`` or ``view``, so every compile command
line keeps its meaning. Input errors (a missing directory, not an artifact, a busy port) print one line,
``qcompile: error: …``, and exit with status 2, like the compile command.
"""
from __future__ import annotations

import argparse
import sys

from qsched.core.cli_support import OneLineParser as _Parser
from qsched.core.errors import QschedError

COMMANDS = ("report", "view")


def build_parser(command: str) -> argparse.ArgumentParser:
    from qsched.report.serve import DEFAULT_PORT

    if command == "report":
        p = _Parser(prog="qcompile report", description="Regenerate DIR/report.html from the artifact's manifest "
                    "and report data (atomically; the manifest and its checksums are left untouched).")
    else:
        p = _Parser(prog="qcompile view", description="Serve DIR's report on http://127.0.0.1:PORT/ until Ctrl-C. "
                    "Prints the URL; opens no browser.")
        p.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"TCP port on 127.0.0.1 (default: {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("dir", metavar="DIR", help="an artifact directory written by qcompile")
    return p


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    args = build_parser(command).parse_args(rest)
    try:
        if command == "report":
            from qsched.report.render import write_report
            print(write_report(args.dir))
        else:
            from qsched.report.serve import serve
            serve(args.dir, args.port, announce=lambda line: print(line, flush=True))
    except QschedError as err:
        print(f"qcompile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
