"""A handle on a written artifact: its path, manifest, and a way to get a pipeline back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Artifact:
    """What :func:`qsched.compile` returns: the artifact directory and its manifest."""

    path: Path
    manifest: dict
    #: The quantized pipeline still in memory when the artifact was just compiled (None when opened from disk).
    compiled_pipeline: object | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path) -> "Artifact":
        """Open and verify an artifact on disk."""
        from export.format import read_manifest

        return cls(Path(path), read_manifest(path))

    @property
    def bit_plan(self):
        from qsched.core.bitplan import BitPlan

        return BitPlan.from_dict(self.manifest["bit_plan"])

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def pipeline(self, device: str = "cpu"):
        """The diffusers pipeline with everything in the artifact applied (see :func:`export.load`)."""
        from export.loader import load

        return load(self.path, device=device)
