"""Tampered artifacts: each is refused with one ArtifactError line, and nothing is ever unpickled.

Why this shape: the promise under test is "loading never unpickles", which only a process whose pickle
entry points are booby-trapped can check (a refused load proves nothing if a pickle was read on the way).
One bundled flux-tiny artifact is compiled per module; each case tampers with a copy. ONE child interpreter
imports torch, diffusers and ``export`` once, replaces ``pickle``/``_pickle`` load, loads and Unpickler and
``torch.load``/``torch.serialization.load`` with traps that record every call, then forks a fresh process
per case that calls ``export.load``; results come back as JSON on stdout. Two controls keep the harness
honest: the untampered copy loads (it does not refuse everything) and a deliberate ``torch.load`` is caught
(the traps work). Offline and seeded; no timing asserts.
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "mkfifo"), reason="needs POSIX fork")]

VAE = "vae/diffusion_pytorch_model.safetensors"
CLIP = "text_encoder/model.safetensors"
SHARD = "transformer/diffusion_pytorch_model.safetensors"

HARNESS = r'''
import io, json, os, pickle, _pickle, signal, sys, traceback
import torch, torch.serialization, diffusers, transformers
import export, export.loader
from qsched.core.errors import ArtifactError

torch.set_num_threads(1)
for name in ("FluxPipeline", "AutoencoderKL", "FluxTransformer2DModel", "FlowMatchEulerDiscreteScheduler"):
    getattr(diffusers, name)  # resolve diffusers' lazy imports once, before forking
for name in ("CLIPTextModel", "T5EncoderModel", "PreTrainedTokenizerFast"):
    getattr(transformers, name)

HITS = []

class UnpickleTrap(Exception):
    pass

def trap(what):
    def refuse(*args, **kwargs):
        HITS.append(what)  # recorded even if a loader catches the exception and carries on or wraps it
        raise UnpickleTrap(f"unpickling attempted through {what}")
    return refuse

def trap_class(what):
    return type("TrapUnpickler", (), {"__init__": lambda self, *a, **k: trap(what)()})

for mod in (pickle, _pickle):
    mod.load, mod.loads = trap(f"{mod.__name__}.load"), trap(f"{mod.__name__}.loads")
    mod.Unpickler = trap_class(f"{mod.__name__}.Unpickler")
pickle._load, pickle._loads, pickle._Unpickler = trap("pickle._load"), trap("pickle._loads"), trap_class("pickle._Unpickler")
torch.load = trap("torch.load")
for name in ("load", "_load", "_legacy_load"):
    setattr(torch.serialization, name, trap(f"torch.serialization.{name}"))

def run(case):
    if case["kind"] == "trap-control":  # the traps must catch a deliberate load
        for call in (lambda: torch.load(case["path"], weights_only=True), lambda: pickle.loads(b"\x80\x04K\x01.")):
            try:
                call()
            except UnpickleTrap:
                pass
        return {"outcome": "none"}
    try:
        export.load(case["path"], runtime=case["runtime"], verify=case["verify"])
        return {"outcome": "loaded"}
    except ArtifactError as e:
        return {"outcome": "ArtifactError", "message": str(e)}
    except BaseException as e:
        return {"outcome": type(e).__name__, "message": "".join(traceback.format_exception(e))[-3000:]}

results = {}
for case in json.load(open(sys.argv[1])):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fresh process per case, traps installed
        os.close(r)
        signal.alarm(300)
        try:
            out = run(case)
        except BaseException as e:
            out = {"outcome": "harness-error", "message": repr(e)}
        out["trap_hits"] = HITS
        with os.fdopen(w, "wb") as f:
            f.write(json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    results[case["name"]] = json.loads(data) if data else {"outcome": f"child died ({status})", "trap_hits": []}
print("RESULTS " + json.dumps(results))
'''


# --- tampering helpers ----------------------------------------------------------------------------------


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _save(d, m):
    (d / "manifest.json").write_text(json.dumps(m, sort_keys=True, indent=2) + "\n")


def _entry(path):
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _edit(fn):
    """A case that edits the manifest with ``fn(manifest)`` and saves it in the writer's format."""
    def prepare(d, outside):
        m = _manifest(d)
        fn(m)
        _save(d, m)
    return prepare


def _pickle_bytes():
    """A plain tensor dict as torch.save writes it: what diffusers would load silently."""
    import io
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(4)}, buf)
    return buf.getvalue()


class _Mkdir:
    """A crafted pickle: unpickling it creates a marker folder (harmless, and proves code ran)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _swap_for_pickle(safetensors_rel, *names, listed=True, payload=None):
    """Delete a component's safetensors (and its manifest entry), put pickles under ``names`` instead."""
    def prepare(d, outside):
        m = _manifest(d)
        (d / safetensors_rel).unlink()
        m["files"].pop(safetensors_rel)
        for rel in names:
            data = payload(outside) if payload else _pickle_bytes()
            if rel.endswith(".index.json"):  # a sharded index naming the pickle shard that follows it
                data = json.dumps({"metadata": {}, "weight_map": {"weight": names[-1].rsplit("/", 1)[1]}}).encode()
            (d / rel).write_bytes(data)
            if listed:
                m["files"][rel] = _entry(d / rel)
        _save(d, m)
    return prepare


def _relisted(rel, data):
    """Replace a listed file's bytes and re-list it (checksums match): only its content is wrong."""
    def prepare(d, outside):
        (d / rel).write_bytes(data)
        m = _manifest(d)
        m["files"][rel] = _entry(d / rel)
        _save(d, m)
    return prepare


def _pickle_named(rel):
    """Overwrite a listed safetensors with a pickle under the same name, and re-list it (checksums match)."""
    return _relisted(rel, _pickle_bytes())


def _truncate(relist):
    def prepare(d, outside):
        data = (d / SHARD).read_bytes()
        (d / SHARD).write_bytes(data[: len(data) - 100])
        if relist:
            m = _manifest(d)
            m["files"][SHARD] = _entry(d / SHARD)
            _save(d, m)
    return prepare


def _flip(rel):
    def prepare(d, outside):
        data = bytearray((d / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (d / rel).write_bytes(bytes(data))
    return prepare


def _first_layer_bits(m):
    name = min(m["layers"])
    m["layers"][name]["weight_bits"] = 8 if m["layers"][name]["weight_bits"] != 8 else 4


def _write(rel, data):
    def prepare(d, outside):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return prepare


def _link_outside(rel):
    """Move a listed file (or folder) outside and leave a symlink: contents and checksums still match."""
    def prepare(d, outside):
        target = outside / rel.replace("/", "_")
        shutil.move(str(d / rel), str(target))
        os.symlink(target, d / rel)
    return prepare


def _link_inside(d, outside):
    """config.json becomes a link to a listed copy of itself inside the artifact."""
    rel, copy = "vae/config.json", "vae_config.json"
    shutil.copy(d / rel, d / copy)
    (d / rel).unlink()
    os.symlink("../vae_config.json", d / rel)
    m = _manifest(d)
    m["files"][copy] = _entry(d / copy)
    _save(d, m)


def _unlisted_link(d, outside):
    (outside / "evil.bin").write_bytes(_pickle_bytes())
    m = _manifest(d)
    (d / VAE).unlink()
    m["files"].pop(VAE)
    _save(d, m)
    os.symlink(outside / "evil.bin", d / "vae/diffusion_pytorch_model.bin")


def _list_outside(how):
    """List a real safetensors file outside the artifact, by '..' or by absolute path."""
    def prepare(d, outside):
        shutil.copy(d / SHARD, outside / "x.safetensors")
        rel = "../outside/x.safetensors" if how == "dotdot" else str(outside / "x.safetensors")
        m = _manifest(d)
        m["files"][rel] = _entry(outside / "x.safetensors")
        _save(d, m)
    return prepare


def _shard_outside(d, outside):
    shutil.copy(d / SHARD, d.parent / "outside.safetensors")
    _edit(lambda m: m["denoiser"].__setitem__("shards", ["../outside.safetensors"]))(d, outside)


def _onnx_outside(d, outside):
    """The ONNX record points onnxruntime at a graph outside the artifact (not a listed file)."""
    (outside / "x.onnx").write_bytes(b"not a graph")
    _edit(lambda m: m.__setitem__("onnx", {"schema": 1, "graph": "../outside/x.onnx", "steps": []}))(d, outside)


def _onnx_switched_outside(d, outside):
    """The same through the record's one-graph-for-every-step entry."""
    (outside / "x.onnx").write_bytes(b"not a graph")
    _edit(lambda m: m.__setitem__("onnx", {"schema": 1, "graph": None, "steps": [],
                                           "switched": {"graph": "../outside/x.onnx"}}))(d, outside)


def _remove_weights(d, outside):
    m = _manifest(d)
    (d / VAE).unlink()
    m["files"].pop(VAE)
    _save(d, m)


def _crafted(outside):
    return pickle.dumps(_Mkdir(str(outside / "PWNED")))


# name -> (prepare(dir, outside), expected message fragment, runtime, verify)
CASES = {
    "untampered": (None, None, "simulated", True),
    "untampered-native": (None, None, "native", True),
    "truncated-shard": (_truncate(False), "expected", "simulated", True),
    "truncated-shard-relisted": (_truncate(True), "cannot be read as safetensors", "simulated", True),
    "truncated-shard-no-verify": (_truncate(False), "expected", "native", False),
    "bit-flipped-shard": (_flip(SHARD), "sha256 mismatch", "simulated", True),
    "bit-flipped-component": (_flip(VAE), "sha256 mismatch", "simulated", True),
    "edited-layer-bits": (_edit(_first_layer_bits), "bit width", "simulated", True),
    "edited-layer-bits-native": (_edit(_first_layer_bits), "bit width", "native", True),
    "edited-checksum": (_edit(lambda m: m["files"][SHARD].__setitem__("sha256", "0" * 64)), "sha256 mismatch",
                        "simulated", True),
    "edited-byte-count": (_edit(lambda m: m["files"][SHARD].__setitem__("bytes", m["files"][SHARD]["bytes"] + 1)),
                          "expected", "simulated", True),
    "future-schema": (_edit(lambda m: m.__setitem__("schema_version", 99)), "newer qsched", "simulated", True),
    "pipeline-class-not-a-pipeline": (_edit(lambda m: m.__setitem__("pipeline_class", "AutoencoderKL")),
                                      "DiffusionPipeline belongs", "simulated", True),
    "manifest-not-json": (_write("manifest.json", b"{not json"), "not valid JSON", "simulated", True),
    "manifest-not-an-object": (_write("manifest.json", b"[1, 2]"), "not a JSON object", "simulated", True),
    "missing-listed-file": (lambda d, o: (d / "vae/config.json").unlink(), "is missing", "simulated", True),
    "component-weights-removed": (_remove_weights, "bundled components", "simulated", True),
    "extra-unlisted-file": (_write("notes.txt", b"hi"), "is not listed", "simulated", True),
    "extra-unlisted-folder": (_write(".onnx.tmp-1234/model.onnx", b"x"), "does not list", "simulated", True),
    "special-file": (lambda d, o: os.mkfifo(d / "vae/fifo"), "not a regular file", "simulated", True),
    # pickles under every weight-file name diffusers and transformers look for, unlisted and listed
    "diffusers-bin-unlisted": (_swap_for_pickle(VAE, "vae/diffusion_pytorch_model.bin", listed=False),
                               "is not listed", "simulated", True),
    "diffusers-bin-unlisted-no-verify": (_swap_for_pickle(VAE, "vae/diffusion_pytorch_model.bin",
                                                          listed=False), "is not listed", "native", False),
    "diffusers-bin-listed": (_swap_for_pickle(VAE, "vae/diffusion_pytorch_model.bin"),
                             "loads with pickle", "simulated", True),
    "diffusers-bin-crafted": (_swap_for_pickle(VAE, "vae/diffusion_pytorch_model.bin", payload=_crafted),
                              "loads with pickle", "simulated", True),
    "diffusers-bin-sharded": (_swap_for_pickle(VAE, "vae/diffusion_pytorch_model.bin.index.json",
                                               "vae/diffusion_pytorch_model-00001-of-00001.bin"),
                              "loads with pickle", "simulated", True),
    "diffusers-flax": (_swap_for_pickle(VAE, "vae/diffusion_flax_model.msgpack"), "loads with pickle",
                       "simulated", True),
    "diffusers-ckpt": (_swap_for_pickle(VAE, "vae/model.ckpt"), "loads with pickle", "simulated", True),
    "diffusers-pt": (_swap_for_pickle(VAE, "vae/diffusion_pytorch_model.pt"), "loads with pickle",
                     "simulated", True),
    "diffusers-pth": (_swap_for_pickle(VAE, "vae/diffusion_pytorch_model.pth"), "loads with pickle",
                      "simulated", True),
    "transformers-bin-unlisted": (_swap_for_pickle(CLIP, "text_encoder/pytorch_model.bin", listed=False),
                                  "is not listed", "simulated", True),
    "transformers-bin-listed": (_swap_for_pickle(CLIP, "text_encoder/pytorch_model.bin"),
                                "loads with pickle", "simulated", True),
    "transformers-bin-sharded": (_swap_for_pickle(CLIP, "text_encoder/pytorch_model.bin.index.json",
                                                  "text_encoder/pytorch_model-00001-of-00001.bin"),
                                 "loads with pickle", "simulated", True),
    "transformers-tf-h5": (_swap_for_pickle(CLIP, "text_encoder/tf_model.h5"), "loads with pickle",
                           "simulated", True),
    "transformers-flax": (_swap_for_pickle(CLIP, "text_encoder/flax_model.msgpack"), "loads with pickle",
                          "simulated", True),
    "denoiser-bin-listed": (_swap_for_pickle(SHARD, "transformer/diffusion_pytorch_model.bin"), "loads with pickle",
                            "native", True),
    "model-index-not-json": (_relisted("model_index.json", b"{not json"), "model_index.json", "simulated", True),
    "code-file-listed": (_swap_for_pickle(CLIP, "text_encoder/modeling_evil.py"), "runs code",
                         "simulated", True),
    "component-safetensors-is-pickle": (_pickle_named(VAE), "cannot be read as safetensors", "simulated", True),
    "text-encoder-safetensors-is-pickle": (_pickle_named(CLIP), "cannot be read as safetensors", "simulated", True),
    "denoiser-shard-is-pickle": (_pickle_named(SHARD), "cannot be read as safetensors", "simulated", True),
    "denoiser-shard-is-pickle-native": (_pickle_named(SHARD), "cannot be read as safetensors", "native", True),
    # symlinks and paths that lead outside
    "symlink-file-outside": (_link_outside(VAE), "symbolic link", "simulated", True),
    "symlink-file-inside": (_link_inside, "symbolic link", "simulated", True),
    "symlink-component-dir": (_link_outside("vae"), "symbolic link", "simulated", True),
    "symlink-manifest": (_link_outside("manifest.json"), "symbolic link", "simulated", True),
    "symlink-unlisted-pickle": (_unlisted_link, "symbolic link", "simulated", False),
    "listed-path-dotdot": (_list_outside("dotdot"), "unsafe file path", "simulated", True),
    "listed-path-absolute": (_list_outside("absolute"), "unsafe file path", "simulated", True),
    "denoiser-shard-outside": (_shard_outside, "not a plain relative path", "simulated", True),
    "onnx-graph-outside": (_onnx_outside, "ONNX record names", "onnx", True),
    "onnx-switched-graph-outside": (_onnx_switched_outside, "ONNX record names", "onnx", True),
    # not artifacts at all
    "not-an-artifact": ("notes", "has no manifest.json", "simulated", True),
    "empty-directory": ("empty", "has no manifest.json", "simulated", True),
    "path-is-a-file": ("file", "is not a directory", "simulated", True),
    "path-does-not-exist": ("missing", "does not exist", "simulated", True),
}


@pytest.fixture(scope="module")
def base_artifact(tmp_path_factory):
    """A bundled flux-tiny artifact written the way the compile writes one (``save_quantized`` with listed
    extras and an unlisted ``report.html`` from ``finalize``), minus the compile's search stages: the cases
    need its layout, not its quality. (Compiled artifacts load in test_roundtrip and test_cli.)"""
    from qsched.runtime.apply import quantize_
    from qsched.core.bitplan import BitPlan, LayerPlan
    from export.save import save_quantized
    from qsched.tinyworld.model import build_tiny_pipeline

    from conftest import TEST_WORDS

    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    denoiser = pipe.transformer
    names = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = BitPlan({n: LayerPlan(4, 8, params=denoiser.get_submodule(n).weight.numel()) for n in names},
                   target="w4a8")
    quantize_(denoiser, plan, {n: (-4.0, 4.0) for n in names})
    out = tmp_path_factory.mktemp("tamper-base") / "art"
    return save_quantized(out, pipe, "transformer", plan, {"bits": "w4a8", "source": {"kind": "test"}}, bundle=True,
                          extra_files={"sensitivity.json": b"{}", "report/data.json": b"{}"},
                          finalize=lambda tmp: (tmp / "report.html").write_text("<html></html>"))


def _build(name, base, root):
    prepare = CASES[name][0]
    case_dir = root / name
    case_dir.mkdir()
    outside = case_dir / "outside"
    outside.mkdir()
    path = case_dir / "art"
    if prepare == "notes":
        path.mkdir()
        (path / "notes.txt").write_text("hi")
    elif prepare == "empty":
        path.mkdir()
    elif prepare == "file":
        path.write_bytes(b"not a folder")
    elif prepare != "missing":
        shutil.copytree(base, path)
        if prepare is not None:
            prepare(path, outside)
    return path


@pytest.fixture(scope="module")
def results(base_artifact, tmp_path_factory):
    """Every case loaded once, each in a fresh forked process with the pickle traps installed."""
    root = tmp_path_factory.mktemp("tamper-cases")
    cases = [{"name": name, "path": str(_build(name, base_artifact, root)), "runtime": runtime, "verify": verify,
              "kind": "load"} for name, (_, _, runtime, verify) in CASES.items()]
    (root / "control.pt").write_bytes(_pickle_bytes())
    cases.append({"name": "trap-control", "path": str(root / "control.pt"), "kind": "trap-control"})
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", HARNESS, str(root / "cases.json")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(ln for ln in reversed(run.stdout.splitlines()) if ln.startswith("RESULTS "))
    return {"root": root, **json.loads(line[len("RESULTS "):])}


def test_controls_the_harness_loads_good_artifacts_and_the_traps_fire(results):
    for name in ("untampered", "untampered-native"):
        assert results[name] == {"outcome": "loaded", "trap_hits": []}, results[name]
    assert {"torch.load", "pickle.loads"} <= set(results["trap-control"]["trap_hits"])


@pytest.mark.parametrize("name", [n for n, (_, expected, _, _) in CASES.items() if expected])
def test_tampered_artifact_is_refused_without_unpickling(results, name):
    result, expected = results[name], CASES[name][1]
    assert result["trap_hits"] == [], f"{name}: unpickling attempted: {result}"
    assert result["outcome"] == "ArtifactError", f"{name}: {result}"
    message = result["message"]
    assert "\n" not in message and message.strip() == message, message
    assert expected in message, f"{name}: {message!r} does not say {expected!r}"


def test_crafted_pickle_never_ran(results):
    assert not (results["root"] / "diffusers-bin-crafted" / "outside" / "PWNED").exists()
