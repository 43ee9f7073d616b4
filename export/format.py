"""The artifact directory: ``manifest.json`` plus ``*.safetensors`` shards (plus optional extras).

Layout::

    out_dir/
        manifest.json            # sorted keys, indent=2, plain JSON types only
        transformer/diffusion_pytorch_model.safetensors   # one or more shards; names may contain sub-folders
        report/data.json         # optional extra files (bytes), e.g. report data or onnx/model.onnx
        report.html              # optional views written by ``finalize``: not listed, so regenerable

``manifest.json`` holds whatever the caller put in it, plus two keys the writer owns:
``schema_version`` (:data:`SCHEMA_VERSION`) and ``files``, a map from every written file's relative
path (POSIX separators) to ``{"sha256": <hex>, "bytes": <size>}``. ``manifest.json`` itself is not
listed, nor is ``report.html`` (:data:`UNLISTED_VIEWS`: the one view a ``finalize`` callback may add,
derived from listed files, so it can be regenerated in place without touching the manifest; no loader
reads it). Anything else in the directory is refused by the reader (see below).

Why it is built this way:

* **Atomic writes.** A compile can take an hour and be killed at any moment (Ctrl-C, OOM, a
  pre-empted node). Everything is written into a hidden sibling directory ``.{name}.tmp-<random>``,
  fsynced, and only then renamed to ``out_dir``; on any failure, ``KeyboardInterrupt`` included, the
  temporary directory is removed. So ``out_dir`` is either absent, the previous artifact, or the
  complete new one -- never half-written.
* **safetensors, never pickle.** Artifacts get shared; loading a pickle runs arbitrary code. Shards
  are read with ``safetensors.torch.load_file`` and the manifest with ``json``, so reading an
  artifact never unpickles anything.
* **Checksums.** Every file's size and sha256 are in the manifest, so a truncated download or a
  flipped byte is reported as such (naming the file) instead of surfacing as garbage images.
* **Nothing unlisted.** A loader downstream (diffusers, transformers) picks files by name, so a file the
  manifest does not list would be read unverified -- e.g. a ``diffusion_pytorch_model.bin`` pickle next
  to a deleted ``.safetensors``. The reader therefore refuses any file or folder the manifest does not
  list (except ``manifest.json`` and :data:`UNLISTED_VIEWS`), any symlink (even one pointing inside:
  what it points at is not what was listed) and any special file, before it checks sizes or hashes.
* **Streaming.** ``shards`` may be an iterable of ``(name, tensors)`` pairs (e.g. a generator); each
  shard is written and released before the next is requested, so a model larger than RAM can be
  exported shard by shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Union

import torch

from qsched.core.errors import ArtifactError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "SHARD_SUFFIX",
    "UNLISTED_VIEWS",
    "write_artifact",
    "read_manifest",
    "load_shard",
    "open_shard",
    "shard_names",
    "sha256_file",
]

#: Version of the on-disk layout. Bump it when a reader of the old version would misread a new artifact.
#: 2: bit-plan layers may carry ``fp_tokens`` (with FP rows in the shards), ``weight_scale`` and
#: ``rounding``, which a version-1 reader refuses as unknown keys; version-1 artifacts still load.
#: 3: the denoiser is a diffusers component folder (``<attr>/config.json`` with a ``quantization_config``,
#: ``<attr>/diffusion_pytorch_model.safetensors``) and a bundle lays its components out at the top level
#: with ``model_index.json``, where version 2 had ``<attr>.safetensors`` and ``components/``; a version-2
#: reader would look for the bundle in the wrong place. Versions 1 and 2 still load.
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".safetensors"
#: Unlisted files an artifact may hold at its top level: views derived from listed files, read by no loader.
UNLISTED_VIEWS = frozenset({"report.html"})

_CHUNK = 1 << 20  # 1 MiB hashing chunks: constant memory for multi-GB shards.

PathLike = Union[str, "os.PathLike[str]"]
ShardsArg = Union[Mapping[str, Mapping[str, torch.Tensor]], Iterable[tuple[str, Mapping[str, torch.Tensor]]]]


# ----------------------------------------------------------------------------------------- helpers


def _hash_open_file(f) -> tuple[str, int]:
    """sha256 hex and byte count of an open binary file, read in 1 MiB chunks (files may be GBs)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    while True:
        n = f.readinto(buf)
        if not n:
            break
        h.update(view[:n])
        size += n
    return h.hexdigest(), size


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    with open(path, "rb", buffering=0) as f:
        return _hash_open_file(f)[0]


def _hash_and_fsync(path: Path) -> tuple[str, int]:
    """Hash a just-written file in chunks and fsync it; returns (sha256 hex, size in bytes)."""
    with open(path, "rb", buffering=0) as f:
        digest = _hash_open_file(f)
        os.fsync(f.fileno())
    return digest


def _oserr(e: OSError) -> str:
    """One-line description of an OSError, naming the path it was about."""
    text = e.strerror or str(e) or type(e).__name__
    return f"{text} ({e.filename})" if e.filename else text


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. Windows, where directories cannot be opened; nothing more we can do
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_relpath(name: object, what: str) -> str:
    """A safe relative POSIX path inside the artifact: no absolute paths, no '..', no backslashes."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{what} name must be a non-empty string, got {name!r}")
    p = PurePosixPath(name)
    if (
        "\\" in name
        or "\x00" in name
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise ArtifactError(
            f"{what} name {name!r} is not a plain relative path; use names like 'transformer.safetensors' "
            f"or 'onnx/model.onnx'"
        )
    if name == MANIFEST_NAME:
        raise ArtifactError(f"{what} name {name!r} is reserved for the manifest; choose another name")
    return name


def _check_json(value: Any, where: str) -> None:
    """Reject anything json would not round-trip as plain JSON (tensors, numpy scalars, NaN, ...)."""
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArtifactError(f"manifest value at {where} is {value}, which is not valid JSON; store it as null or a string")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ArtifactError(f"manifest key {k!r} at {where} is not a string; JSON keys must be strings")
            _check_json(v, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    raise ArtifactError(
        f"manifest value at {where} has type {type(value).__name__}, which is not plain JSON; "
        f"convert it to a str/int/float/bool/list/dict first"
    )


def _iter_shards(shards: ShardsArg) -> Iterator[tuple[str, Mapping[str, torch.Tensor]]]:
    if isinstance(shards, Mapping):
        yield from shards.items()
        return
    if isinstance(shards, (str, bytes)) or not isinstance(shards, Iterable):
        raise ArtifactError(
            f"shards must be a dict {{file name: {{tensor name: tensor}}}} or an iterable of "
            f"(file name, tensors) pairs, got {type(shards).__name__}"
        )
    for item in shards:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ArtifactError(
                f"each shard must be a (file name, tensors) pair, got {type(item).__name__}"
            )
        yield item
        del item  # do not pin the previous shard while the caller's generator builds the next one


class _Layout:
    """Tracks the relative paths written so far, so names never collide (including file vs folder)."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def claim(self, name: str, what: str) -> None:
        parents = [str(p) for p in PurePosixPath(name).parents if str(p) != "."]
        if name in self.files:
            raise ArtifactError(f"{what} name {name!r} is used twice; give every file a unique name")
        if name in self.dirs:
            raise ArtifactError(f"{what} name {name!r} is already a folder of other files; rename one of them")
        clash = next((p for p in parents if p in self.files), None)
        if clash is not None:
            raise ArtifactError(f"{what} name {name!r} needs a folder {clash!r}, which is already a file; rename one of them")
        self.files.add(name)
        self.dirs.update(parents)


def _prepare_parent(parent: Path, out_dir: Path) -> list[Path]:
    """Create the parent folder if needed; returns the folders created (outermost first)."""
    missing: list[Path] = []
    p = parent
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    missing.reverse()
    if os.path.lexists(p) and not p.is_dir():
        raise ArtifactError(f"cannot write to {out_dir}: {p} is a file, not a directory; choose another path")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty_dirs(missing)
        raise ArtifactError(f"cannot write to {out_dir}: {_oserr(e)}") from e
    if not parent.is_dir():
        raise ArtifactError(f"cannot write to {out_dir}: {parent} is not a directory")
    return missing


def _remove_empty_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


def _check_replaceable(out_dir: Path, overwrite: bool) -> bool:
    """Returns True if out_dir exists (and may be replaced); raises if it may not."""
    if not os.path.lexists(out_dir):
        return False
    if not overwrite:
        raise ArtifactError(f"{out_dir} already exists; pass overwrite=True (--overwrite) or choose another path")
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise ArtifactError(
            f"refusing to overwrite {out_dir}: it is not a directory; remove it yourself or choose another path"
        )
    if not (out_dir / MANIFEST_NAME).is_file() and any(out_dir.iterdir()):
        raise ArtifactError(
            f"refusing to overwrite {out_dir}: it is a non-empty directory that is not a qsched artifact "
            f"(no {MANIFEST_NAME}); remove it yourself or choose another path"
        )
    return True


def _make_sibling_dir(parent: Path, name: str, tag: str, out_dir: Path) -> Path:
    for _ in range(100):
        cand = parent / f".{name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(cand)  # honours the umask, unlike tempfile.mkdtemp's 0700
            return cand
        except FileExistsError:
            continue
        except OSError as e:
            raise ArtifactError(f"cannot write to {out_dir}: {_oserr(e)}") from e
    raise ArtifactError(f"cannot write to {out_dir}: could not create a temporary directory in {parent}")


def _free_sibling_name(parent: Path, name: str, tag: str) -> Path:
    while True:
        cand = parent / f".{name}.{tag}-{secrets.token_hex(4)}"
        if not os.path.lexists(cand):
            return cand


# ------------------------------------------------------------------------------------------ writer


def write_artifact(
    out_dir: PathLike,
    manifest: Mapping[str, Any],
    shards: ShardsArg,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Write an artifact directory atomically and return its absolute path.

    ``manifest``: plain-JSON dict; ``schema_version`` and ``files`` are set by the writer (any values
    the caller put there are replaced). ``shards``: ``{file name: {tensor name: tensor}}``, or an
    iterable of ``(file name, tensors)`` pairs that is consumed one shard at a time (a generator keeps
    only one shard in memory). File names are relative POSIX paths ending in ``.safetensors``.
    ``extra_files``: ``{relative path: bytes}`` written alongside (not ``*.safetensors``).

    If ``out_dir`` exists, raises unless ``overwrite=True``; then an existing artifact (a directory
    with ``manifest.json``) or an empty directory is replaced, and anything else is refused so a typo
    cannot delete an unrelated folder. ``finalize(tmp_dir)``, when given, runs once the temporary
    directory holds every listed file and the manifest, before the rename; what it writes there lands
    atomically with the rest but is not listed in ``files``, so it may only write :data:`UNLISTED_VIEWS`
    (anything else would make the artifact unloadable, and is refused here).

    Raises :class:`ArtifactError` for bad names or values, an
    unwritable destination or an I/O failure; on any failure nothing is left at ``out_dir`` (or the old
    artifact is left untouched) and the temporary directory is removed.
    """
    out_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
    name = out_dir.name
    if not name:
        raise ArtifactError(f"cannot write an artifact at {out_dir}; give a directory path such as ./out/model")
    parent = out_dir.parent

    if not isinstance(manifest, Mapping):
        raise ArtifactError(f"manifest must be a dict, got {type(manifest).__name__}")
    _check_json(manifest, "manifest")
    extras: dict[str, bytes] = {}
    for rel, data in (extra_files or {}).items():
        _check_relpath(rel, "extra file")
        if rel.endswith(SHARD_SUFFIX):
            raise ArtifactError(f"extra file {rel!r} ends in {SHARD_SUFFIX}; pass tensors as a shard instead")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArtifactError(f"extra file {rel!r} must be bytes, got {type(data).__name__}; encode text first")
        extras[rel] = bytes(data)
    layout = _Layout()
    for rel in extras:  # claimed first so a clash with a shard name fails before any shard is written
        layout.claim(rel, "extra file")

    # Up-front checks, before any expensive work.
    _check_replaceable(out_dir, overwrite)
    created_parents = _prepare_parent(parent, out_dir)
    tmp = _make_sibling_dir(parent, name, "tmp", out_dir)

    try:
        files: dict[str, dict[str, Any]] = {}

        n_shards = 0
        for shard_name, tensors in _iter_shards(shards):
            _check_relpath(shard_name, "shard")
            if not shard_name.endswith(SHARD_SUFFIX):
                raise ArtifactError(f"shard name {shard_name!r} must end in {SHARD_SUFFIX}")
            layout.claim(shard_name, "shard")
            files[shard_name] = _write_shard(tmp, shard_name, tensors, out_dir)
            n_shards += 1
            del tensors  # let a streaming caller's shard be freed before the next one is made
        if n_shards == 0:
            raise ArtifactError("an artifact needs at least one shard; nothing to write")

        for rel, data in extras.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_bytes(dest, data)
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

        full = dict(manifest)
        full["schema_version"] = SCHEMA_VERSION
        full["files"] = {k: files[k] for k in sorted(files)}
        text = json.dumps(full, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        _write_bytes(tmp / MANIFEST_NAME, text.encode("utf-8"))
        if finalize is not None:
            finalize(tmp)
            _check_tree(tmp, full["files"])  # what the reader will accept: fail here, not at load time

        for d in sorted(layout.dirs, key=lambda s: -s.count("/")):
            _fsync_dir(tmp / d)
        _fsync_dir(tmp)

        _move_into_place(tmp, out_dir, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty_dirs(created_parents)
        raise ArtifactError(f"cannot write to {out_dir}: {_oserr(e)}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty_dirs(created_parents)
        raise
    return out_dir


def _write_shard(tmp: Path, shard_name: str, tensors: Mapping[str, torch.Tensor], out_dir: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not isinstance(tensors, Mapping):
        raise ArtifactError(f"shard {shard_name!r} must be a dict of tensors, got {type(tensors).__name__}")
    prepared: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not key:
            raise ArtifactError(f"shard {shard_name!r}: tensor names must be non-empty strings, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"shard {shard_name!r}: {key!r} is a {type(t).__name__}, not a torch.Tensor")
        prepared[key] = t.detach().contiguous()
    dest = tmp / shard_name
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(prepared, str(dest), metadata={"format": "pt"})
    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"cannot write shard {shard_name!r} of {out_dir}: {msg}") from e
    finally:
        del prepared
    sha, size = _hash_and_fsync(dest)
    return {"sha256": sha, "bytes": size}


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    parent = out_dir.parent
    if not _check_replaceable(out_dir, overwrite):  # re-check: something may have appeared meanwhile
        os.rename(tmp, out_dir)
        _fsync_dir(parent)
        return
    old = _free_sibling_name(parent, out_dir.name, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the previous artifact back
        raise
    try:
        _fsync_dir(parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ reader


def _artifact_dir(path: PathLike) -> Path:
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise ArtifactError(f"not a qsched artifact: {p} does not exist; check the path")
    if not p.is_dir():
        raise ArtifactError(f"not a qsched artifact: {p} is not a directory; pass the artifact folder")
    if (p / MANIFEST_NAME).is_symlink():
        raise _refused(p, MANIFEST_NAME, "is a symbolic link", "replace the link with the file itself")
    if not (p / MANIFEST_NAME).is_file():
        raise ArtifactError(f"not a qsched artifact: {p} has no {MANIFEST_NAME}; pass the folder qcompile wrote")
    return p


def _refused(p: Path, rel: str, why: str, fix: str = "delete it") -> ArtifactError:
    return ArtifactError(f"refusing artifact {p}: {rel!r} {why}; an artifact holds only the plain files its "
                         f"{MANIFEST_NAME} lists, so {fix} or re-export the artifact")


def _check_tree(p: Path, files: Mapping[str, Any]) -> None:
    """Refuse every entry under ``p`` that is not ``manifest.json``, a listed file, a folder of listed files
    or an :data:`UNLISTED_VIEWS` file; and every symlink or special file, wherever it points. Why: loaders
    pick files by name, so anything unlisted would be read unverified, and a link can lead outside."""
    dirs = {str(d) for rel in files for d in PurePosixPath(rel).parents if str(d) != "."}
    allowed = set(files) | {MANIFEST_NAME} | UNLISTED_VIEWS
    stack = [("", p)]
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise ArtifactError(f"cannot read {folder}: {_oserr(e)}") from e
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                raise _refused(p, rel, "is a symbolic link", "replace the link with the file itself")
            if entry.is_dir(follow_symlinks=False):
                if rel not in dirs:
                    raise _refused(p, rel + "/", f"is a folder {MANIFEST_NAME} does not list")
                stack.append((rel + "/", Path(entry.path)))
            elif not entry.is_file(follow_symlinks=False):
                raise _refused(p, rel, "is not a regular file")
            elif rel not in allowed:
                raise _refused(p, rel, f"is not listed in {MANIFEST_NAME}, so it was never verified")


def _corrupt(p: Path, what: str) -> ArtifactError:
    return ArtifactError(f"corrupt artifact {p}: {what}; re-export it")


def read_manifest(path: PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check an artifact's ``manifest.json``; returns it as a dict (with ``files``).

    Always checks that the manifest is valid JSON of a supported schema, that the directory holds nothing
    it does not list (no unlisted file or folder, no symlink: see the module docstring) and that every
    listed file exists with the recorded size (cheap). With ``verify=True`` (the default) it also re-hashes every
    file against its recorded sha256 (reads everything; slow for GB-sized artifacts). Raises
    :class:`ArtifactError` naming the offending file. Uses only ``json``; never unpickles.
    """
    p = _artifact_dir(path)
    mpath = p / MANIFEST_NAME
    try:
        raw = mpath.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {mpath}: {_oserr(e)}") from e
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(p, f"{MANIFEST_NAME} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise _corrupt(p, f"{MANIFEST_NAME} is not a JSON object")

    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _corrupt(p, f"{MANIFEST_NAME} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{p} was written by a newer qsched (schema {version}); this qsched reads schema "
            f"{SCHEMA_VERSION} or older; upgrade qsched"
        )
    if version < 1:
        raise _corrupt(p, f"{MANIFEST_NAME} has an invalid schema_version {version}")

    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _corrupt(p, f"{MANIFEST_NAME} has no 'files' section")
    for rel, entry in files.items():
        try:
            _check_relpath(rel, "file")
        except ArtifactError:
            raise _corrupt(p, f"{MANIFEST_NAME} lists an unsafe file path {rel!r}") from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or isinstance(entry.get("bytes"), bool)
            or not isinstance(entry.get("bytes"), int)
            or entry["bytes"] < 0
        ):
            raise _corrupt(p, f"{MANIFEST_NAME} has a malformed entry for {rel}")
    _check_tree(p, files)

    for rel, entry in files.items():
        fpath = p / rel
        if not fpath.is_file():
            raise ArtifactError(f"corrupt or truncated: {rel} is missing from {p}; re-export or re-download the artifact")
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(
                f"corrupt or truncated: {rel} has {size} bytes, expected {entry['bytes']}; "
                f"re-export or re-download the artifact {p}"
            )
    if verify:
        for rel, entry in files.items():
            try:
                digest = sha256_file(p / rel)
            except OSError as e:
                raise ArtifactError(f"cannot read {p / rel}: {_oserr(e)}") from e
            if digest != entry["sha256"].lower():
                raise ArtifactError(
                    f"corrupt or truncated: {rel} sha256 mismatch; re-export or re-download the artifact {p}"
                )
    return manifest


def shard_names(manifest: Mapping[str, Any]) -> list[str]:
    """The ``*.safetensors`` files listed in a manifest, sorted."""
    return sorted(k for k in manifest.get("files", {}) if k.endswith(SHARD_SUFFIX))


def load_shard(path: PathLike, name: str, device: str | int = "cpu") -> dict[str, torch.Tensor]:
    """Load one shard of an artifact with ``safetensors.torch.load_file`` (never pickle).

    Checks that ``name`` is a shard listed in the manifest and has its recorded size, but does not
    re-hash it (call :func:`read_manifest` with ``verify=True`` once for that). Raises
    :class:`ArtifactError` for an unknown shard or a file safetensors cannot parse.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = _artifact_dir(path)
    _check_relpath(name, "shard")
    manifest = read_manifest(p, verify=False)
    shards = shard_names(manifest)
    if name not in shards:
        raise ArtifactError(
            f"artifact {p} has no shard {name!r} (shards: {', '.join(shards) or 'none'}); pick one of those"
        )
    try:
        return load_file(str(p / name), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"corrupt or truncated: {name} cannot be read as safetensors ({msg}); "
            f"re-export or re-download the artifact {p}"
        ) from e


class ShardReader:
    """One open shard, read tensor by tensor; see :func:`open_shard`."""

    def __init__(self, handle, name: str, path: Path, copy: bool):
        self._handle, self.name, self._path, self._copy = handle, name, path, copy

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` in memory the caller owns (no view of a file mapping)."""
        try:
            tensor = self._handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type (and OSError on a short read)
            raise _unreadable(self.name, self._path, e) from e
        return tensor.clone() if self._copy else tensor


def _unreadable(name: str, p: Path, e: BaseException) -> ArtifactError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ArtifactError(f"corrupt or truncated: {name} cannot be read as safetensors ({msg}); "
                         f"re-export or re-download the artifact {p}")


@contextlib.contextmanager
def open_shard(path: PathLike, name: str, manifest: Mapping[str, Any] | None = None) -> Iterator[ShardReader]:
    """Open one shard for reading tensor by tensor (a streaming loader's view of :func:`load_shard`).

    Only the header is read on open; :meth:`ShardReader.get` then reads one tensor into memory the caller
    owns: safetensors' ``pread`` backend (0.8+) reads straight into a fresh tensor, and older releases map
    the file and the tensor is copied out. Either way no tensor keeps the file mapped, so a loader that
    keeps what it reads holds only that, and the file is closed when the block ends. ``manifest``: the
    already-read manifest (saves re-reading it per shard); the same checks as :func:`load_shard`.
    """
    from safetensors import safe_open

    p = _artifact_dir(path)
    _check_relpath(name, "shard")
    shards = shard_names(manifest if manifest is not None else read_manifest(p, verify=False))
    if name not in shards:
        raise ArtifactError(
            f"artifact {p} has no shard {name!r} (shards: {', '.join(shards) or 'none'}); pick one of those"
        )
    try:
        handle, copy = safe_open(str(p / name), framework="pt", device="cpu", backend="pread"), False
    except Exception:  # safetensors < 0.8 has no backend argument: mapped, so each tensor is copied out
        try:
            handle, copy = safe_open(str(p / name), framework="pt", device="cpu"), True
        except Exception as e:
            raise _unreadable(name, p, e) from e
    with handle:
        yield ShardReader(handle, name, p, copy)
