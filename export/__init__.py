"""Artifact writing and loading (``export.load``), packed weights, and runtime exports."""


def load(path, device: str = "cpu", verify: bool = True):
    """Load an artifact directory into a diffusers pipeline; see :func:`export.loader.load`."""
    from .loader import load as _load

    return _load(path, device=device, verify=verify)


__all__ = ["load"]
