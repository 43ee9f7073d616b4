"""The artifact's report: data collected at compile time, the self-contained page, escaping, regeneration,
``qcompile report`` / ``qcompile view`` and their errors. The browser test is in test_report_browser.py."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from export.format import read_manifest
from qsched.cli import main
from qsched.core.errors import ArtifactError, RecipeError
from qsched.recipe import parse_recipe
from qsched.report import collect, render_html, write_report
from qsched.report.serve import make_server

MARKUP = '</script><script>window.__pwned = 1</script><b>bold</b> & "quoted" \u2028 <!--'


@pytest.fixture(scope="module")
def art(tiny_report_artifact):
    return tiny_report_artifact.path


@pytest.fixture(scope="module")
def data(art):
    return collect(art)


@pytest.fixture
def art_copy(art, tmp_path):
    return shutil.copytree(art, tmp_path / "copy")


def embedded_data(page: str) -> dict:
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


def assert_one_line_error(stderr: str, *needles):
    errors = [line for line in stderr.splitlines() if line.startswith("qcompile: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# --- what the compile stores --------------------------------------------------------------------------


def test_compile_writes_report_files_and_page(art):
    manifest = read_manifest(art, verify=True)
    files = manifest["files"]
    assert "report/data.json" in files and any(k.startswith("report/images/") and k.endswith(".png") for k in files)
    assert (art / "report.html").is_file() and "report.html" not in files  # derived view: not checksummed
    assert manifest["recipe"]["report"] == {"samples": 3, "repeats": 2, "fp_copy_max_gb": 2.0, "runtime": "native",
                                            "compile": "off"}
    assert manifest["timings_s"]["report"] > 0
    assert not list(art.parent.glob(".*tmp*"))


def test_compiled_pipeline_is_left_as_the_compile_made_it(tiny_report_artifact):
    """The report measures other schedules and models on the same pipeline; the chosen setup comes back."""
    import export
    from qsched.runtime.generation import GenerationSettings, generate

    manifest = tiny_report_artifact.manifest
    settings = GenerationSettings(**manifest["generation"])
    loaded = export.load(tiny_report_artifact.path)
    prompts = manifest["eval_prompts"]
    import torch
    assert torch.equal(generate(loaded, prompts, settings, seed=3), generate(tiny_report_artifact.compiled_pipeline,
                                                                             prompts, settings, seed=3))


def test_collect_is_plain_json_with_every_point(data, art):
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    manifest = read_manifest(art, verify=False)
    ids = [p["id"] for p in data["points"]]
    front = manifest["cache"]["pareto_front"]["points"]
    assert ids[:4] == ["fp", "rtn", "fora-2", "fora-3"] and ids[4:] == [f"front-{i}" for i in range(len(front))]
    chosen = [p for p in data["points"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["id"] == data["chosen"] == f"front-{manifest['stages']['cache_search']['chosen']}"
    size = manifest["metrics"]["size"]
    for p in data["points"]:
        assert p["measured"] and p["reason"] == ""
        assert 0 <= p["quality"] <= 1 and p["macs"] > 0 and 0 < p["mac_fraction"] <= 1 and p["latency_s"] > 0
        assert len(p["latency_runs"]) == 2 and len(p["images"]) == 3
        assert p["latency_note"] == ("FP, eager" if p["variant"] == "fp" else "native runtime, eager")
        assert all(uri.startswith("data:image/png;base64,") for uri in p["images"])
        if p["variant"] == "compiled":
            assert p["size_bytes"] == size["artifact_denoiser_bytes"]
    by_id = {p["id"]: p for p in data["points"]}
    fp, rtn = by_id["fp"], by_id["rtn"]
    assert fp["fidelity"] == 1.0 and fp["psnr_vs_fp"] == 100.0 and fp["size_bytes"] == size["denoiser_bf16_bytes"]
    assert rtn["size_bytes"] < fp["size_bytes"] and rtn["quality"] < fp["quality"]
    assert by_id["fora-2"]["mac_fraction"] < 1 and by_id["fora-2"]["schedule"]["reused"][1]
    for i, p in enumerate(front):  # the front's MACs and search quality are the search's own
        assert by_id[f"front-{i}"]["macs"] == p["macs"] and by_id[f"front-{i}"]["search_quality"] == p["quality"]
    assert data["samples"]["prompts"] == manifest["calibration_prompts"][:3]
    assert data["samples"]["fp_images"] == fp["images"]
    assert by_id["front-0"]["images"] != fp["images"]


def test_collect_bit_plan_schedule_and_coefficients(data, art):
    manifest = read_manifest(art, verify=False)
    plan = data["bit_plan"]
    names = [c["name"] for row in plan["cells"] for c in row if c]
    assert sorted(names) == sorted(manifest["bit_plan"]["layers"]) and len(set(names)) == len(names)
    assert plan["blocks"][0] == "transformer_blocks.0" and plan["blocks"][-1] == "(outside blocks)"  # module order
    cell = next(c for row in plan["cells"] for c in row if c and c["name"] == "transformer_blocks.0.attn.to_q")
    assert (cell["w"], cell["a"]) == (4, 8)
    layout = data["cache_layout"]
    assert layout["steps"] == manifest["generation"]["steps"] and "transformer_blocks.0" in layout["blocks"]
    stage = manifest["stages"]["coefficients"]
    coeffs = data["coefficients"]
    assert coeffs["status"] == stage["status"] and coeffs["cx"] == stage["coefficients"]["cx"]
    assert coeffs["applied"] == (stage["status"] == "done")
    labels = [row["label"] for row in data["summary"]]
    for label in ("Artifact size", "Compression ratio", "MACs saved", "Quality vs FP", "Compile time", "Versions"):
        assert label in labels


def test_a_model_without_scorer_or_fp_copy_records_what_was_not_measured(tiny_pipeline_dir, tmp_path):
    """A local diffusers directory with no scorer, and a report told to keep no FP copy (what a model too
    large for a second copy gets): FP is timed at load, RTN and quality are recorded as not measured."""
    import qsched
    recipe = parse_recipe({"calibration": {"prompts": 2, "batch_size": 2},
                           "report": {"samples": 2, "repeats": 1, "fp_copy_max_gb": 0}})
    artifact = qsched.compile(str(tiny_pipeline_dir), "w8a8", out=tmp_path / "art", recipe=recipe, eval_prompts=0,
                              progress=False, uniform=True, coefficients=False, cache_search=False)
    data = collect(artifact.path)
    by_id = {p["id"]: p for p in data["points"]}
    assert list(by_id) == ["fp", "rtn", "fora-2", "fora-3", "compiled"] and data["chosen"] == "compiled"
    assert not by_id["rtn"]["measured"] and "second copy" in by_id["rtn"]["reason"]
    for point in (by_id["fp"], by_id["fora-2"], by_id["compiled"]):  # timed and drawn; no quality without a scorer
        assert point["latency_s"] > 0 and len(point["images"]) == 2 and point["macs"] > 0
        assert point.get("quality") is None and "no image scorer" in point["quality_reason"]
    assert by_id["fora-2"]["mac_fraction"] < 1.0
    assert json.loads((artifact.path / "report" / "data.json").read_text())["latency"]["fp"].startswith("at load")
    assert data["quality"]["measured"] is False and data["cache_layout"]["steps"] == 4  # the FORA points' layout
    stages = artifact.manifest["stages"]
    assert stages["coefficients"]["status"] == stages["cache_search"]["status"] == "skipped"
    assert "--no-qsched" in stages["coefficients"]["reason"] and "--no-cache-search" in stages["cache_search"]["reason"]
    assert (artifact.path / "report.html").is_file()


def test_tampered_report_file_is_reported_not_shown(art_copy):
    image = next((art_copy / "report" / "images").glob("front-0-*.png"))
    image.write_bytes(image.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ArtifactError, match=r"report/images/front-0-\d\.png sha256 mismatch"):
        collect(art_copy)


def test_artifact_without_report_data_still_gets_a_report(art_copy):
    """Artifacts compiled before the report existed: front, bit plan and coefficients, with a note."""
    manifest_path = art_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("report/")}
    manifest_path.write_text(json.dumps(manifest))
    shutil.rmtree(art_copy / "report")
    data = collect(art_copy)
    assert data["notes"] and data["samples"]["prompts"] == []
    assert [p["kind"] for p in data["points"]] == ["front"] * len(manifest["cache"]["pareto_front"]["points"])
    assert "report-data" in render_html(data)


def test_latency_runs_on_the_deployed_runtime(tiny_report_artifact):
    """The timed twin of a quantized denoiser has native layers (one twin per model) and the configured compile;
    the measured models keep their simulated, eager layers."""
    import copy

    from export.runtime_torch import NativeDequantLayer, NativeInt8Linear
    from qsched.report.measure import ReportProbe, _Variant
    from qsched.runtime.qlayers import QuantLayer

    pipe = tiny_report_artifact.compiled_pipeline
    den, fp = pipe.transformer, copy.deepcopy(pipe.transformer)
    probe = ReportProbe("transformer", None, [], 1, 0, runtime="native", compile="regional")
    out = probe._deployed({"a": _Variant(den, pipe.scheduler), "b": _Variant(den, pipe.scheduler, "s"),
                           "fp": _Variant(fp, pipe.scheduler)})
    twin = out["a"].denoiser
    assert twin is out["b"].denoiser and out["b"].schedule == "s" and twin is not den
    assert not any(isinstance(m, QuantLayer) for m in twin.modules())
    assert any(isinstance(m, (NativeInt8Linear, NativeDequantLayer)) for m in twin.modules())
    assert sum(isinstance(m, QuantLayer) for m in den.modules()) > 0  # the measured model is untouched
    compiled = lambda model: [b for b in model.transformer_blocks if b._compiled_call_impl is not None]  # noqa: E731
    assert compiled(twin) and compiled(out["fp"].denoiser) and not compiled(den) and not compiled(fp)


def test_recipe_report_knobs_are_validated():
    assert parse_recipe({"report": {"samples": 0, "repeats": 1}}).report.samples == 0
    with pytest.raises(RecipeError, match="report.samples"):
        parse_recipe({"report": {"samples": -1}})
    with pytest.raises(RecipeError, match="'sample'.*valid keys: samples, repeats"):
        parse_recipe({"report": {"sample": 3}})
    with pytest.raises(RecipeError, match="runtime must be native or simulated"):
        parse_recipe({"report": {"runtime": "onnx"}})
    with pytest.raises(RecipeError, match="compile must be off, full or regional"):
        parse_recipe({"report": {"compile": "max"}})


# --- the page -----------------------------------------------------------------------------------------


def test_page_is_self_contained_and_offline(art):
    page = (art / "report.html").read_text(encoding="utf-8")
    assert "default-src 'none'" in page and "img-src data:" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external resource at all
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\b)", page)  # only the SVG namespace name
    assert embedded_data(page) == collect(art)


def test_markup_in_names_cannot_break_out(data):
    data = json.loads(json.dumps(data))
    data["samples"]["prompts"][0] = MARKUP
    data["points"][0]["label"] = MARKUP
    data["bit_plan"]["blocks"][0] = MARKUP
    data["title"] = MARKUP
    page = render_html(data)
    assert page.count("</script>") == 2 and page.count("<script") == 2  # the data and the viewer, nothing else
    assert "<b>bold" not in page and "<!--" not in page
    raw = re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1)
    assert not set("<>&\u2028\u2029") & set(raw)  # nothing in the JSON that HTML or JS would read specially
    assert "<title>qsched report: &lt;/script&gt;" in page
    back = embedded_data(page)
    assert back["samples"]["prompts"][0] == MARKUP and back["points"][0]["label"] == MARKUP


def test_csp_hash_matches_the_viewer_script(art):
    import base64
    page = (art / "report.html").read_text(encoding="utf-8")
    digest = re.search(r"script-src 'sha256-([^']+)'", page).group(1)
    script = re.findall(r"<script>(.*?)</script>", page, re.S)[0]
    assert base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() == digest


# --- qcompile report ----------------------------------------------------------------------------------


def test_qcompile_report_regenerates_only_the_page(art_copy, capsys):
    page = art_copy / "report.html"
    original = page.read_bytes()
    manifest = (art_copy / "manifest.json").read_bytes()
    page.write_text("stale")
    assert main(["report", str(art_copy)]) == 0
    assert capsys.readouterr().out.strip() == str(page)
    assert page.read_bytes() == original  # deterministic: same artifact, same page
    assert (art_copy / "manifest.json").read_bytes() == manifest
    read_manifest(art_copy, verify=True)  # the loader's verification still passes
    assert sorted(p.name for p in art_copy.iterdir()) == ["manifest.json", "report", "report.html",
                                                          "transformer"]  # no temp file left


def test_an_edited_page_does_not_break_loading(art_copy):
    (art_copy / "report.html").write_text("<p>edited</p>")
    read_manifest(art_copy, verify=True)
    assert write_report(art_copy).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("command", ["report", "view"])
def test_missing_directory_is_a_one_line_error(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "nope")]) == 2
    assert_one_line_error(capsys.readouterr().err, "does not exist")


@pytest.mark.parametrize("command", ["report", "view"])
def test_not_an_artifact_is_a_one_line_error(command, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    assert main([command, str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a qsched artifact", "manifest.json")
    assert not (tmp_path / "report.html").exists()


def test_bad_subcommand_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["view"])
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "DIR", "qcompile view --help")
    with pytest.raises(SystemExit) as exc:
        main(["view", "x", "--port", "eighty"])
    assert exc.value.code == 2


def test_compile_command_lines_keep_their_meaning():
    from qsched.cli import build_parser
    args = build_parser().parse_args(["--model", "flux-tiny", "--bits", "w4a8", "--out", "view"])
    assert (args.model, args.bits, args.out) == ("flux-tiny", "w4a8", "view")


# --- qcompile view ------------------------------------------------------------------------------------


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers, response.read()


def test_server_serves_only_the_report_on_loopback(art_copy):
    server = make_server(art_copy, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        status, headers, body = fetch(server.url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert body == (art_copy / "report.html").read_bytes()
        for path in ("manifest.json", "transformer.safetensors", "report/data.json", "../etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as err:
                fetch(server.url + path)
            assert err.value.code == 404
        (art_copy / "report.html").unlink()  # rendered in memory, nothing written
        status, _, body = fetch(server.url + "report.html")
        assert status == 200 and b"report-data" in body and not (art_copy / "report.html").exists()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_busy_port_is_a_one_line_error(art, capsys):
    server = make_server(art, port=0)
    try:
        assert main(["view", str(art), "--port", str(server.server_address[1])]) == 2
        assert_one_line_error(capsys.readouterr().err, "already in use", "--port")
    finally:
        server.server_close()


def test_qcompile_view_prints_the_url_and_serves(art):
    proc = subprocess.Popen([sys.executable, "-m", "qsched.cli", "view", str(art), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line + proc.stderr.read() if proc.poll() is not None else line
        status, _, body = fetch(url.group(0))
        assert status == 200 and body == (art / "report.html").read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
