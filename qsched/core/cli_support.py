"""What every ``qcompile`` command shares: an argument parser whose errors are one line with status 2, and
the ``--device`` check (a valid name, and one this machine has), so subcommands in any layer refuse bad
input the same way before any work."""
from __future__ import annotations

import argparse
import sys

from qsched.core.errors import QschedError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors print ``qcompile: error: …`` on one line (no usage block) and exit 2."""

    def error(self, message):
        print(f"qcompile: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def check_device(device: str, available: bool = True) -> None:
    """A valid device name and, unless ``available`` is False (a plan for another machine), one this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps") or (dev.type != "cuda" and dev.index not in (None, 0)):
        raise QschedError(f"invalid --device {device!r}: expected cpu, cuda, cuda:N or mps")
    if not available:
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QschedError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise QschedError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"numbered from 0; pick one of those or use --device cuda")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise QschedError(f"--device {device} requested but MPS (Apple GPU) is not available; use --device cpu")
