"""Add an optional export (a folder of files) to an artifact that already exists, without rewriting it.

Why not :func:`export.format.write_artifact`: that writes a whole new directory, which for FLUX means
copying gigabytes of shards to add one folder. Here only the new folder and ``manifest.json`` are written,
and each step leaves a consistent artifact (``export.load(verify=True)`` passes after any of them):

1. the files are written into a hidden folder beside the artifact (same filesystem, so step 3 is a
   rename), fsynced, and hashed: the reader refuses anything the manifest does not list, so a temporary
   folder inside would make the artifact unloadable while an export runs, or for good after a crash;
2. when replacing (``overwrite=True``), the manifest first stops listing the old folder, then the old
   folder is moved aside (beside the artifact, for the same reason);
3. the new folder is renamed into place;
4. ``manifest.json`` is replaced atomically (temporary file, fsync, ``os.replace``) with the new files
   listed (sha256 and bytes, as :mod:`export.format` does) and the caller's record under ``key``.

Only for an instant (a rename apart, in step 2 and between steps 3 and 4) does the artifact hold a folder
its manifest does not list; a crash exactly there leaves it refused by ``export.load`` with a message
naming the folder to delete. A failure before step 4 removes the new folder, so a retry starts clean. Concurrent writers of the
same artifact are not supported (the compile and ``qcompile report`` never run at the same time as this).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qsched.core.errors import ArtifactError

from export.format import (MANIFEST_NAME, _check_json, _check_relpath, _fsync_dir, _hash_and_fsync, _oserr, _write_bytes,
                     read_manifest)

__all__ = ["add_folder"]


def _manifest_bytes(manifest: dict) -> bytes:
    """The exact serialisation :func:`export.format.write_artifact` uses."""
    _check_json(manifest, "manifest")
    return (json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def _replace_manifest(path: Path, manifest: dict) -> None:
    tmp = path / f".{MANIFEST_NAME}.tmp-{secrets.token_hex(4)}"
    try:
        _write_bytes(tmp, _manifest_bytes(manifest))
        os.replace(tmp, path / MANIFEST_NAME)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path)


def _without(manifest: dict, folder: str, key: str) -> dict:
    out = {k: v for k, v in manifest.items() if k != key}
    out["files"] = {rel: e for rel, e in manifest["files"].items() if not rel.startswith(folder + "/")}
    return out


def add_folder(path, folder: str, write: Callable[[Path], None], key: str, record: dict[str, Any],
               overwrite: bool = False, verify: bool = True) -> dict:
    """Write ``folder/`` into the artifact at ``path`` with ``write(tmp_dir)``, list every file it wrote in
    the manifest, set ``manifest[key] = record``, and return the new manifest.

    Raises :class:`ArtifactError` if the artifact is corrupt (checked with ``verify``), if ``folder`` or
    ``key`` already exists and ``overwrite`` is false, or on an I/O error.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    _check_relpath(folder, "folder")
    if "/" in folder or folder.endswith(".safetensors"):
        raise ArtifactError(f"export folder {folder!r} must be one plain name such as 'modelopt'")
    if key in ("files", "schema_version"):
        raise ArtifactError(f"manifest key {key!r} belongs to the artifact writer; choose another key")
    from export.loader import pipeline_files

    if folder in {rel.split("/")[0] for rel in pipeline_files(path, manifest)}:  # overwrite would replace it
        raise ArtifactError(f"{folder!r} is a folder of the artifact's pipeline, not an export folder; choose another name")
    target = path / folder
    listed = [rel for rel in manifest["files"] if rel == folder or rel.startswith(folder + "/")]
    exists = os.path.lexists(target) or key in manifest or bool(listed)
    if exists and not overwrite:
        raise ArtifactError(f"{target} already has a {folder!r} export; pass overwrite=True to replace it")
    if any(rel == folder for rel in listed) or (target.exists() and not target.is_dir()):
        raise ArtifactError(f"{target} is a file of the artifact, not an export folder; choose another name")
    _check_json(record, key)

    real = Path(os.path.realpath(path))  # temporaries go beside the real folder: same filesystem, never inside
    tmp = real.parent / f".{real.name}.{folder}.tmp-{secrets.token_hex(4)}"
    old = None
    moved = False
    try:
        tmp.mkdir()
        write(tmp)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f"{folder}/{f.relative_to(tmp).as_posix()}"
            _check_relpath(rel, "export file")
            sha, size = _hash_and_fsync(f)
            files[rel] = {"sha256": sha, "bytes": size}
        if not files:
            raise ArtifactError(f"the {folder!r} export wrote no files")
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        new = _without(manifest, folder, key)
        if os.path.lexists(target):
            if listed or key in manifest:
                _replace_manifest(path, new)  # stop listing the old folder before it goes
            old = real.parent / f".{real.name}.{folder}.old-{secrets.token_hex(4)}"
            os.rename(target, old)
        os.rename(tmp, target)
        moved = True
        new[key] = record
        new["files"] = {k: v for k, v in sorted({**new["files"], **files}.items())}
        _replace_manifest(path, new)
    except OSError as e:
        _cleanup(tmp, target if moved else None)
        raise ArtifactError(f"cannot add {folder}/ to {path}: {_oserr(e)}") from e
    except BaseException:
        _cleanup(tmp, target if moved else None)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return new


def _cleanup(tmp: Path, placed: Path | None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if placed is not None:
        shutil.rmtree(placed, ignore_errors=True)
