"""Artifact writing and loading (``export.load``), packed weights, and runtime exports."""


def load(path, device: str = "cpu", verify: bool = True, runtime: str = "simulated", compile: str | bool = False):
    """Load an artifact directory into a diffusers pipeline; see :func:`export.loader.load`."""
    from export.loader import load as _load

    return _load(path, device=device, verify=verify, runtime=runtime, compile=compile)


__all__ = ["load"]
