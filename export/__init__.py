"""Artifact writing and loading (``export.load``), packed weights, and runtime exports.

Importing this package (``import qsched`` does) registers qsched's quantizer with diffusers, so that diffusers'
own ``from_pretrained`` loads artifacts (:mod:`export.diffusers_quantizer`): at once when diffusers' quantizer
registry is already imported, else right after it is, since importing diffusers takes seconds that
``import qsched`` should not.
"""
import importlib.util
import sys
import warnings

_REGISTRY = "diffusers.quantizers.auto"


def load(path, device: str = "cpu", verify: bool = True, runtime: str = "simulated", compile: str | bool = False):
    """Load an artifact directory into a diffusers pipeline; see :func:`export.loader.load`."""
    from export.loader import load as _load

    return _load(path, device=device, verify=verify, runtime=runtime, compile=compile)


def _register() -> None:
    try:
        import export.diffusers_quantizer  # noqa: F401  (registers itself on import)
    except Exception as e:  # never break the user's diffusers import; export.load works without it
        warnings.warn(f"qsched could not register its diffusers quantizer ({type(e).__name__}: {e}); diffusers' "
                      "from_pretrained will not load qsched artifacts, export.load still does", stacklevel=2)


class _AfterRegistryImport:
    """One-shot import hook: finds diffusers' quantizer registry as the other finders would, and registers
    qsched's quantizer once that module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != _REGISTRY:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _register()
            spec.loader.exec_module = exec_module
        return spec


def register_with_diffusers() -> None:
    """Register qsched's diffusers quantizer now, or as soon as diffusers' quantizer registry is imported."""
    if _REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterRegistryImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryImport())


register_with_diffusers()

__all__ = ["load", "register_with_diffusers"]
