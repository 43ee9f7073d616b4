"""Artifact directory: atomic writes, checksums, clear errors, no pickle on load."""

import gc
import hashlib
import json
import pickle
import weakref

import pytest
import torch

from export import format as fmt
from export.format import SCHEMA_VERSION, load_shard, read_manifest, shard_names, write_artifact
from export.packing import pack_int
from qsched.core.errors import ArtifactError


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (6, 5), generator=g, dtype=torch.int64).to(torch.int8)
    return {
        "blocks.0.weight.packed": pack_int(q, 4),
        "blocks.0.weight.scale": torch.rand(6, 1, generator=g, dtype=torch.float32).to(torch.bfloat16),
        "blocks.0.bias": torch.randn(6, generator=g),
    }


def _siblings(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _write_simple(out, seed=0, **kw):
    return write_artifact(
        out,
        {"model": "tiny", "bits": {"default": 4}, "tags": ["a", "b"]},
        {"transformer.safetensors": _tensors(seed), "text_encoder/model.safetensors": {"x": torch.ones(3)}},
        extra_files={"report.html": b"<html></html>", "onnx/model.onnx": b"\x00\x01onnx"},
        **kw,
    )


def test_round_trip_and_checksums(tmp_path):
    out = tmp_path / "art"
    ret = _write_simple(out)
    assert ret == out.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary leftovers

    m = read_manifest(out)
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["model"] == "tiny" and m["bits"] == {"default": 4} and m["tags"] == ["a", "b"]
    assert set(m["files"]) == {
        "transformer.safetensors",
        "text_encoder/model.safetensors",
        "report.html",
        "onnx/model.onnx",
    }
    for rel, entry in m["files"].items():
        data = (out / rel).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert shard_names(m) == ["text_encoder/model.safetensors", "transformer.safetensors"]

    # sorted keys, indent=2, plain JSON
    text = (out / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"

    loaded = load_shard(out, "transformer.safetensors")
    ref = _tensors(0)
    assert set(loaded) == set(ref)
    for k in ref:
        assert loaded[k].dtype == ref[k].dtype
        assert torch.equal(loaded[k], ref[k])
    assert torch.equal(load_shard(out, "text_encoder/model.safetensors")["x"], torch.ones(3))
    assert (out / "report.html").read_bytes() == b"<html></html>"


def test_iterable_of_pairs_and_noncontiguous(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    out = write_artifact(tmp_path / "a", {}, [("a.safetensors", {"t": t}), ("b.safetensors", {"u": torch.zeros(2)})])
    assert torch.equal(load_shard(out, "a.safetensors")["t"], t)
    assert shard_names(read_manifest(out)) == ["a.safetensors", "b.safetensors"]


def test_generator_is_streamed_one_shard_at_a_time(tmp_path):
    refs = []
    seen_before_next = []

    def make(i):
        t = torch.full((64,), float(i))
        refs.append(weakref.ref(t))
        return {"w": t}

    def gen():
        for i in range(3):
            if refs:
                gc.collect()
                seen_before_next.append(refs[-1]() is None)  # previous shard already released?
            yield f"s{i}.safetensors", make(i)

    out = write_artifact(tmp_path / "a", {"k": 1}, gen())
    assert seen_before_next == [True, True]
    for i in range(3):
        assert torch.equal(load_shard(out, f"s{i}.safetensors")["w"], torch.full((64,), float(i)))


def test_corrupt_byte_names_file(tmp_path):
    out = _write_simple(tmp_path / "art")
    shard = out / "transformer.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"corrupt or truncated: transformer\.safetensors sha256 mismatch"):
        read_manifest(out)
    read_manifest(out, verify=False)  # same size: only the checksum catches it


def test_truncated_file(tmp_path):
    out = _write_simple(tmp_path / "art")
    shard = out / "transformer.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 7])
    with pytest.raises(ArtifactError, match=r"corrupt or truncated: transformer\.safetensors has \d+ bytes"):
        read_manifest(out)
    with pytest.raises(ArtifactError, match="transformer.safetensors"):
        read_manifest(out, verify=False)
    with pytest.raises(ArtifactError, match="transformer.safetensors"):
        load_shard(out, "transformer.safetensors")


def test_missing_listed_file(tmp_path):
    out = _write_simple(tmp_path / "art")
    (out / "onnx" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="onnx/model.onnx is missing"):
        read_manifest(out)


def test_unparseable_shard_is_artifact_error(tmp_path):
    # A shard whose manifest entry was (wrongly) updated to match garbage: safetensors fails -> ArtifactError.
    out = write_artifact(tmp_path / "a", {}, {"m.safetensors": {"x": torch.ones(2)}})
    garbage = b"\xff" * 40
    (out / "m.safetensors").write_bytes(garbage)
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["m.safetensors"] = {"sha256": hashlib.sha256(garbage).hexdigest(), "bytes": len(garbage)}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="m.safetensors cannot be read as safetensors"):
        load_shard(out, "m.safetensors")


def test_newer_schema(tmp_path):
    out = _write_simple(tmp_path / "art")
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = 999
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"newer qsched \(schema 999\).*upgrade qsched"):
        read_manifest(out)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"files": {}}', "schema_version"),
        (b'{"schema_version": 1}', "'files'"),
        (b'{"schema_version": 1, "files": {"../x": {"sha256": "' + b"0" * 64 + b'", "bytes": 1}}}', "unsafe"),
        (b'{"schema_version": 1, "files": {"x": {"sha256": "ab", "bytes": 1}}}', "malformed"),
    ],
)
def test_bad_manifest(tmp_path, content, match):
    d = tmp_path / "art"
    d.mkdir()
    (d / "manifest.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=match):
        read_manifest(d)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a qsched artifact.*does not exist"):
        read_manifest(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="not a qsched artifact.*not a directory"):
        read_manifest(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not a qsched artifact.*no manifest.json"):
        read_manifest(tmp_path / "empty")
    with pytest.raises(ArtifactError, match="not a qsched artifact"):
        load_shard(tmp_path / "nope", "transformer.safetensors")


def test_load_unknown_shard(tmp_path):
    out = _write_simple(tmp_path / "art")
    with pytest.raises(ArtifactError, match="no shard 'vae.safetensors'.*transformer.safetensors"):
        load_shard(out, "vae.safetensors")
    with pytest.raises(ArtifactError, match="no shard"):
        load_shard(out, "report.html")
    with pytest.raises(ArtifactError, match="relative path"):
        load_shard(out, "../art/transformer.safetensors")


def test_parent_not_writable(tmp_path):
    blocker = tmp_path / "regular_file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write to .*regular_file is a file, not a directory"):
        write_artifact(blocker / "sub" / "art", {}, {"a.safetensors": {"x": torch.ones(1)}})
    with pytest.raises(ArtifactError, match="cannot write to"):
        write_artifact(blocker / "art", {}, {"a.safetensors": {"x": torch.ones(1)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regular_file"]
    assert blocker.read_text() == "x"


def test_creates_missing_parents(tmp_path):
    out = write_artifact(tmp_path / "x" / "y" / "art", {}, {"a.safetensors": {"x": torch.ones(1)}})
    assert read_manifest(out)["files"]["a.safetensors"]["bytes"] > 0


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, exc):
    def gen():
        yield "a.safetensors", {"x": torch.ones(4)}
        raise exc

    out = tmp_path / "sub" / "art"
    with pytest.raises(type(exc)):
        write_artifact(out, {}, gen())
    assert not out.exists()
    assert not (tmp_path / "sub").exists()  # parent we created is removed again
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_keeps_old_artifact(tmp_path):
    out = _write_simple(tmp_path / "art", seed=1)
    before = read_manifest(out)

    def gen():
        yield "transformer.safetensors", _tensors(2)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_artifact(out, {}, gen(), overwrite=True)
    assert read_manifest(out) == before
    assert _siblings(tmp_path, "art") == []


def test_overwrite_semantics(tmp_path):
    out = _write_simple(tmp_path / "art", seed=1)
    with pytest.raises(ArtifactError, match="already exists.*overwrite"):
        _write_simple(out, seed=2)
    assert torch.equal(load_shard(out, "transformer.safetensors")["blocks.0.bias"], _tensors(1)["blocks.0.bias"])

    write_artifact(out, {"v": 2}, {"only.safetensors": {"y": torch.zeros(2)}}, overwrite=True)
    m = read_manifest(out)
    assert m["v"] == 2 and set(m["files"]) == {"only.safetensors"}
    assert not (out / "transformer.safetensors").exists()  # replaced, not merged
    assert _siblings(tmp_path, "art") == []

    # An empty directory may be replaced; an unrelated non-empty one is never deleted.
    empty = tmp_path / "empty"
    empty.mkdir()
    write_artifact(empty, {}, {"a.safetensors": {"x": torch.ones(1)}}, overwrite=True)
    assert read_manifest(empty)["files"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(ArtifactError, match="refusing to overwrite.*not a qsched artifact"):
        write_artifact(precious, {}, {"a.safetensors": {"x": torch.ones(1)}}, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(precious, {}, {"a.safetensors": {"x": torch.ones(1)}})
    assert _siblings(tmp_path, "precious") == []


def test_bad_inputs_raise_and_leave_nothing(tmp_path):
    one = {"a.safetensors": {"x": torch.ones(1)}}
    cases = [
        ({"t": torch.ones(1)}, one, None, "not plain JSON"),
        ({"f": float("nan")}, one, None, "not valid JSON"),
        ({1: "x"}, one, None, "not a string"),
        ({}, {}, None, "at least one shard"),
        ({}, {"a.bin": {"x": torch.ones(1)}}, None, "must end in .safetensors"),
        ({}, {"../a.safetensors": {"x": torch.ones(1)}}, None, "relative path"),
        ({}, {"/abs.safetensors": {"x": torch.ones(1)}}, None, "relative path"),
        ({}, {"a.safetensors": {"x": [1, 2]}}, None, "not a torch.Tensor"),
        ({}, one, {"manifest.json": b"{}"}, "reserved"),
        ({}, one, {"w.safetensors": b""}, "pass tensors as a shard"),
        ({}, one, {"r.html": "text"}, "must be bytes"),
        ({}, one, {"a.safetensors/x": b""}, "already a (file|folder)"),
        ({}, {"onnx/a.safetensors": {"x": torch.ones(1)}}, {"onnx": b""}, "already a (file|folder)"),
        ({}, [("a.safetensors", {"x": torch.ones(1)}), ("a.safetensors", {"x": torch.ones(1)})], None, "used twice"),
        ({}, [("a.safetensors",)], None, "pair"),
        ({}, 42, None, "iterable"),
    ]
    for manifest, shards, extra, match in cases:
        out = tmp_path / "art"
        with pytest.raises(ArtifactError, match=match):
            write_artifact(out, manifest, shards, extra_files=extra)
        assert list(tmp_path.iterdir()) == [], match


def test_writer_owns_schema_and_files_keys(tmp_path):
    out = write_artifact(
        tmp_path / "a", {"schema_version": 0, "files": {"bogus": 1}}, {"a.safetensors": {"x": torch.ones(1)}}
    )
    m = read_manifest(out)
    assert m["schema_version"] == SCHEMA_VERSION
    assert set(m["files"]) == {"a.safetensors"}


def test_loading_never_unpickles(tmp_path, monkeypatch):
    out = _write_simple(tmp_path / "art")

    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load used while loading an artifact")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    m = read_manifest(out, verify=True)
    for name in shard_names(m):
        assert load_shard(out, name)


def test_hashing_is_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "_CHUNK", 7)
    p = tmp_path / "f"
    data = bytes(range(256)) * 3
    p.write_bytes(data)
    assert fmt.sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert fmt._hash_and_fsync(p) == (hashlib.sha256(data).hexdigest(), len(data))


def test_io_error_is_artifact_error_and_cleans_up(tmp_path, monkeypatch):
    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(fmt, "_write_bytes", full_disk)
    with pytest.raises(ArtifactError, match="cannot write to .*No space left on device"):
        write_artifact(tmp_path / "art", {}, {"a.safetensors": {"x": torch.ones(1)}})
    assert list(tmp_path.iterdir()) == []


def _mapped(path):
    return [line for line in open("/proc/self/maps") if str(path) in line]


@pytest.mark.parametrize("old_safetensors", [False, True])
def test_open_shard_reads_owned_tensors_and_closes(tmp_path, monkeypatch, old_safetensors):
    """Tensor by tensor, equal to load_shard's, in memory of their own (no mapping outlives the block); with a
    safetensors that has no pread backend, the mapped tensors are copied out."""
    out = _write_simple(tmp_path / "art")
    if old_safetensors:
        import safetensors

        real = safetensors.safe_open

        def no_backend(*args, **kwargs):
            if "backend" in kwargs:
                raise TypeError("safe_open() got an unexpected keyword argument 'backend'")
            return real(*args, **kwargs)
        monkeypatch.setattr(safetensors, "safe_open", no_backend)
    expected = _tensors()
    with fmt.open_shard(out, "transformer.safetensors", read_manifest(out)) as reader:
        assert sorted(reader.keys()) == sorted(expected)
        got = {k: reader.get(k) for k in reader.keys()}
    for k, t in expected.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)
    gc.collect()
    assert _mapped(out) == []  # the tensors are kept, yet nothing of the file is mapped
    with pytest.raises(ArtifactError, match="no shard 'vae.safetensors'"):
        with fmt.open_shard(out, "vae.safetensors"):
            pass
    with pytest.raises(ArtifactError, match="relative path"):
        with fmt.open_shard(out, "../art/transformer.safetensors"):
            pass


def test_open_shard_refuses_a_file_that_is_not_safetensors(tmp_path):
    out = _write_simple(tmp_path / "art")
    shard = out / "transformer.safetensors"
    size = shard.stat().st_size
    shard.write_bytes(b"\xff" * size)  # same size, so only the reader notices
    with pytest.raises(ArtifactError, match=r"corrupt or truncated: transformer\.safetensors cannot be read"):
        with fmt.open_shard(out, "transformer.safetensors"):
            pass
