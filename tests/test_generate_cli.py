"""``qcompile generate``: draws with export.load's pipeline, writes one PNG per prompt reproducibly, times the
first batch apart, and refuses bad input in one line (status 2) before loading anything."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qsched.cli import main

PROMPTS = ["a red circle above a blue square", "two green triangles", "a small yellow diamond on the left"]


def test_generate_writes_one_png_per_prompt_equal_to_the_loaded_pipeline(tiny_report_artifact, tmp_path, capsys):
    import export

    out = tmp_path / "images"
    args = ["generate", str(tiny_report_artifact.path), "--out", str(out), "--batch", "2", "--seed", "5"]
    assert main([*args, *(a for p in PROMPTS for a in ("--prompt", p))]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["runtime"] == "native" and record["compile"] == "off"
    assert [b["prompts"] for b in record["batches"]] == [2, 1] and record["later_batch_seconds"] is not None
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00-a-red-circle-above-a-blue-square.png", "01-two-green-triangles.png",
                                       "02-a-small-yellow-diamond-on-the-left.png"]
    assert record["images"] == [str(f) for f in files]
    pipe = export.load(tiny_report_artifact.path, runtime="native")
    expected = []
    for b, start in enumerate(range(0, 3, 2)):  # batch i is seeded with seed + i
        with torch.inference_mode():
            expected += pipe(PROMPTS[start:start + 2], generator=torch.Generator("cpu").manual_seed(5 + b)).images
    for file, want in zip(files, expected):
        got = np.asarray(Image.open(file))
        assert got.shape == (32, 32, 3) and np.array_equal(got, np.asarray(want))


def test_prompts_file_and_overwrite(tiny_report_artifact, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  two blue squares  \n")
    out = tmp_path / "images"
    args = ["generate", str(tiny_report_artifact.path), "--prompts-file", str(prompts), "--out", str(out),
            "--runtime", "simulated", "--batch", "8"]
    assert main(args) == 0
    assert sorted(f.name for f in out.iterdir()) == ["00-a-red-circle.png", "01-two-blue-squares.png"]
    capsys.readouterr()
    assert main(args) == 2  # the images exist: never replaced silently
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("case", ["no prompt", "blank prompt", "not an artifact", "no onnx export", "batch 0",
                                  "out is a file", "out inside the artifact", "compile with onnx", "bad device",
                                  "unknown runtime", "unreadable prompts file"])
def test_bad_input_is_one_line_status_2_before_loading(case, tiny_report_artifact, tmp_path, capsys, monkeypatch):
    import export.loader

    def no_load(*a, **k):
        raise AssertionError("the artifact was loaded before the input was checked")

    monkeypatch.setattr(export.loader, "load", no_load)
    art, out = str(tiny_report_artifact.path), tmp_path / "images"
    (tmp_path / "file").write_text("x")
    args = {"no prompt": [art],
            "blank prompt": [art, "--prompt", "  "],
            "not an artifact": [str(tmp_path), "--prompt", "a red circle"],
            "no onnx export": [art, "--prompt", "a red circle", "--runtime", "onnx"],
            "batch 0": [art, "--prompt", "a red circle", "--batch", "0"],
            "out is a file": [art, "--prompt", "a red circle", "--out", str(tmp_path / "file")],
            "out inside the artifact": [art, "--prompt", "a red circle", "--out", f"{art}/images"],
            "compile with onnx": [art, "--prompt", "a red circle", "--runtime", "onnx", "--compile", "full"],
            "bad device": [art, "--prompt", "a red circle", "--device", "tpu"],
            "unknown runtime": [art, "--prompt", "a red circle", "--runtime", "tensorrt"],
            "unreadable prompts file": [art, "--prompts-file", str(tmp_path / "missing.txt")]}[case]
    if "--out" not in args:
        args += ["--out", str(out)]
    try:
        status = main(["generate", *args])
    except SystemExit as exit_:  # argparse's own checks (choices) exit from the parser
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tiny_report_artifact.path / "images").exists()


def test_an_artifact_whose_source_denoiser_changed_is_refused_in_one_line(tiny_report_artifact):
    """A non-bundled artifact takes its VAE and text encoders from its source; when the source's denoiser has
    changed shape since (an upgraded embedded model), loading says so instead of failing inside the VAE."""
    from export.format import read_manifest
    from export.loader import check_source_matches
    from qsched.core.errors import ArtifactError

    manifest = read_manifest(tiny_report_artifact.path, verify=False)
    check_source_matches(manifest, tiny_report_artifact.path)  # as compiled: fine
    edited = copy.deepcopy(manifest)
    edited["denoiser"]["config"]["in_channels"] *= 2
    with pytest.raises(ArtifactError, match="in_channels .*recompile it, or compile with --bundle"):
        check_source_matches(edited, tiny_report_artifact.path)


def test_an_artifact_compiled_from_earlier_embedded_weights_is_refused(tiny_report_artifact):
    """Retrained embedded weights keep the architecture, so the config check cannot see them: the recorded
    digest of the source denoiser must match the installed one."""
    from export.format import read_manifest
    from export.loader import check_source_matches
    from qsched.core.errors import ArtifactError

    edited = copy.deepcopy(read_manifest(tiny_report_artifact.path, verify=False))
    assert edited["source"]["kind"] == "embedded"
    edited["source"]["denoiser_sha256"] = "0" * 64
    with pytest.raises(ArtifactError, match="compiled from an earlier flux-tiny"):
        check_source_matches(edited, tiny_report_artifact.path)
