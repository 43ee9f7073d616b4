"""nvidia-modelopt bridge and checkpoint: every planned layer (FLUX single blocks' ``proj_out`` included)
gets an explicit, enabled, calibrated modelopt quantizer; weights match our reference quantizer code for
code; the activation modes are reported per layer as they are; the checkpoint lands in an existing
artifact with checksums and restores with ``mto.restore``.

Tolerances: weights are compared by integer codes (must be identical) and by value (float rounding:
< 1e-6 here, weights are ~0.1). Affine activations may differ only at rounding ties (modelopt rounds
(x - bias) * qmax/amax, we round x/s: within fp32 rounding of k + 1/2 either neighbour can win), so a
layer's output may move by one input step there. FP8 (e4m3) layers compare e4m3 codes: identical on weights
and on activations except where x/s is within fp32 rounding of a midpoint between two e4m3 values (modelopt
scales by 448/amax, we divide by s); tests/test_fp8.py holds the FP8 cases, this file the mixed artifact.
"""
import copy
import hashlib
import json
import pickle
import shutil
import sys

import pytest
import torch

pytest.importorskip("modelopt")

from calibrate import modelopt_bridge as mb  # noqa: E402
from qsched.runtime.apply import quantize_  # noqa: E402
from qsched.core.bitplan import BitPlan, LayerPlan  # noqa: E402
from qsched.core.errors import ArtifactError  # noqa: E402


def skewed_ranges(names, seed=0):
    """Asymmetric static ranges (zero points far from the middle), as calibration gives after GELU/SiLU."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (-0.2 - float(torch.rand((), generator=gen)), 1.0 + 4 * float(torch.rand((), generator=gen)))
            for n in names}


def mixed_plan(denoiser, fp_layer, grouped=16):
    """W4 (grouped where the width allows), W8, one layer FP, one with FP weights but int8 inputs."""
    from qsched.models.adapters import adapter_for

    plan = BitPlan(method="test")
    for i, (name, module) in enumerate(adapter_for(denoiser).quantizable_layers(denoiser).items()):
        fan_in = module.weight[0].numel()
        if name == fp_layer:
            plan.layers[name] = LayerPlan(None, None, reason="kept FP")
        elif i == 1:
            plan.layers[name] = LayerPlan(None, 8)
        elif i % 3 == 0 and fan_in % grouped == 0 and fan_in > grouped:
            plan.layers[name] = LayerPlan(4, 8, group_size=grouped)
        else:
            plan.layers[name] = LayerPlan(8 if i % 3 == 1 else 4, 8)
    return plan


def flux_inputs(config, batch=1, image_tokens=16, text_tokens=8, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, image_tokens, config["in_channels"], generator=gen),
                encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=gen),
                pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=gen),
                timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(image_tokens, 3),
                txt_ids=torch.zeros(text_tokens, 3), return_dict=False)


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    from qsched.tinyworld.model import TRANSFORMER_CONFIG

    from calibrate.statistics import observe_inputs

    torch.manual_seed(0)
    fp = FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    plan = mixed_plan(fp, fp_layer="norm_out.linear")
    with observe_inputs({n: fp.get_submodule(n) for n in plan.layers}) as observers, torch.no_grad():
        fp(**flux_inputs(TRANSFORMER_CONFIG, seed=4))  # static ranges from one FP call, as calibration does
    ranges = {n: o.range for n, o in observers.items()}
    return fp, plan, ranges, quantize_(copy.deepcopy(fp), plan, ranges)


@pytest.fixture(scope="module")
def pixart():
    from diffusers import PixArtTransformer2DModel

    from qsched.models.tiny_pixart import PIXART_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    fp = PixArtTransformer2DModel(**PIXART_TRANSFORMER_CONFIG).eval()
    plan = mixed_plan(fp, fp_layer="proj_out", grouped=8)
    assert plan.layers["pos_embed.proj"].group_size == 8  # a 2x2-patch conv grouped over 2 input channels
    ranges = skewed_ranges(plan.layers, seed=1)
    return fp, plan, ranges, quantize_(copy.deepcopy(fp), plan, ranges)


def test_config_is_explicit_and_covers_every_layer_including_proj_out(flux):
    fp, plan, ranges, _ = flux
    layers = mb.planned_layers(fp, plan, ranges)
    config = mb.modelopt_config(layers)
    entries = config["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False} and config["algorithm"] is None
    assert not any("*" in e["quantizer_name"] for e in entries[1:])  # no wildcard besides the deny-all
    named = {e["quantizer_name"]: e for e in entries}
    single_proj_out = [n for n in plan.layers if n.startswith("single_transformer_blocks.") and n.endswith(".proj_out")]
    assert len(single_proj_out) == 4
    for name, lp in plan.layers.items():
        for side, bits in (("weight", lp.weight_bits), ("input", lp.act_bits)):
            entry = named[f"{name}.{side}_quantizer"]
            assert (entry.get("enable", True) and entry["cfg"]["num_bits"] == bits) if bits else entry["enable"] is False
    # modelopt's default exclusions would have switched exactly these off
    assert set(single_proj_out) | {"proj_out"} <= set(mb.uncovered_by_default_filters(plan.layers))


def test_default_proj_out_exclusion_is_caught(flux):
    from modelopt.torch.quantization.config import _default_disabled_quantizer_cfg

    _, plan, _, reference = flux
    with pytest.raises(mb.ModeloptCoverageError, match=r"single_transformer_blocks\.0\.proj_out\.weight_quantizer is disabled"):
        mb.to_modelopt(copy.deepcopy(reference), plan, extra_cfg=_default_disabled_quantizer_cfg)


@pytest.mark.parametrize("model", ["flux", "pixart"])
def test_per_layer_check_weights_exact_affine_activations_to_ties(model, request):
    fp, plan, ranges, reference = request.getfixturevalue(model)
    table = mb.check_against_reference(reference, plan=plan, activations="affine")
    json.dumps(table, allow_nan=False)  # plain and serialisable
    assert set(table) == set(plan.layers)
    for name, row in table.items():
        assert row["weight_match"], (name, row["reason"])
        if row["weight_bits"] is not None:
            assert row["weight_codes_differ"] == 0 and row["weight_max_abs_diff"] < 1e-6
        if row["act_bits"] is not None:
            assert row["act_match"] or row["act_differ_only_at_ties"], (name, row["reason"])
            assert row["act_levels_differ"] < 1e-3
            assert row["output_rel_diff"] < 5e-3, (name, row)  # a near-tie input may move by one step
    fp_name = next(n for n, p in plan.layers.items() if p.weight_bits is None and p.act_bits is None)
    assert table[fp_name]["match"] and "explicitly disabled" in table[fp_name]["reason"]
    if model == "pixart":
        assert table["pos_embed.proj"]["group_size"] == 8 and table["pos_embed.proj"]["weight_match"]


def test_fp_denoiser_path_rounds_like_ours(flux):
    """From FP weights modelopt quantizes itself: with amax = s*qmax it lands on our codes (both round half
    to even) except where w/s is within fp32 rounding of a tie (w*(qmax/amax) and w/s round differently)."""
    fp, plan, ranges, _ = flux
    table = mb.check_against_reference(fp, plan=plan, act_ranges=ranges)
    summary = mb.summarize(table)
    assert summary["weight_codes_differ"] <= 5  # of ~400k codes (2 with this seed)
    for row in table.values():  # any differing code sits on a rounding tie of the FP weight
        assert row["weight_match"] or row["weight_differ_only_at_ties"], row["reason"]


def test_symmetric_mode_reports_the_activation_difference(flux):
    _, plan, _, reference = flux
    table = mb.check_against_reference(reference, plan=plan, activations="symmetric")
    acts = [r for r in table.values() if r["act_bits"] is not None]
    assert acts and all(r["weight_match"] for r in table.values())
    assert all(not r["act_match"] and "symmetric" in r["reason"] for r in acts)
    assert all(r["act_mode"] == "symmetric" and r["act_max_abs_diff"] > 0 for r in acts)


def test_bf16_affine_activations_are_reported_not_hidden():
    """In bf16 modelopt subtracts the affine bias in bf16: weights still match, activation levels do not."""
    from torch import nn

    from qsched.runtime.qlayers import QuantLayer

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    plan = BitPlan(layers={"0": LayerPlan(4, 8)})
    reference = nn.Sequential(QuantLayer.from_module(fp[0], 4, 8, (-0.7, 3.1)))
    row = mb.check_against_reference(reference, plan=plan, activations="affine")["0"]
    assert row["weight_match"] and row["weight_codes_differ"] == 0
    assert not row["act_match"] and row["act_levels_differ"] > 0.05 and "activations (affine)" in row["reason"]


def test_fp_token_rows_are_reported_as_not_expressible():
    """A layer serving BOS rows in FP (MixDQ) has no modelopt equivalent: its quantizers match, the row says why
    the layer does not."""
    from torch import nn

    from calibrate.fp_tokens import FPTokens
    from qsched.runtime.qlayers import QuantLayer

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(16, 8))
    bos = torch.randn(1, 16) * 20
    tokens = FPTokens((0,), bos, fp[0](bos).detach())
    reference = nn.Sequential(QuantLayer.from_module(fp[0], 8, 8, (-2.0, 2.0), fp_tokens=tokens))
    row = mb.check_against_reference(reference, plan=BitPlan(layers={"0": LayerPlan(8, 8)}))["0"]
    assert row["weight_match"] and row["fp_token_positions"] == [0]
    assert not row["match"] and "token rows [0] in FP" in row["reason"]


def test_errors_are_clear(flux, monkeypatch):
    with pytest.raises(ValueError, match="splits 3x3 kernel windows"):
        mb.weight_block_sizes("conv2d", (8, 4, 3, 3), 4, "conv")
    with pytest.raises(ValueError, match="unknown activations mode"):
        mb.to_modelopt(copy.deepcopy(flux[3]), flux[1], activations="asymmetric")
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    with pytest.raises(mb.ModeloptMissingError, match=r"pip install qsched\[modelopt\]"):
        mb.require_modelopt()


# ------------------------------------------------------------------------------------------- artifact

@pytest.fixture(scope="module")
def artifact(flux, tmp_path_factory):
    """A bundled tiny FLUX artifact holding the mixed plan (written by export.save, as the compile does)."""
    from export.save import save_quantized
    from qsched.tinyworld.model import build_tiny_pipeline

    from conftest import TEST_WORDS

    fp, plan, ranges, reference = flux
    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    pipe.transformer = copy.deepcopy(reference)
    out = tmp_path_factory.mktemp("mo") / "tiny"
    return save_quantized(out, pipe, "transformer", plan, {"bits": "w4a8", "source": {"kind": "test"}}, bundle=True)


def test_checkpoint_restores_with_mto_restore(artifact, flux, monkeypatch):
    import modelopt.torch.opt as mto
    from diffusers import FluxTransformer2DModel

    import export
    from export.format import read_manifest
    from export.runtime_modelopt import export_modelopt, modelopt_denoiser, restore_modelopt

    record = export_modelopt(artifact)  # default: symmetric activations, the TensorRT-runnable ones
    manifest = read_manifest(artifact, verify=True)
    assert manifest["modelopt"] == record and record["activations"] == "symmetric"
    for rel in (record["checkpoint"], record["check"]):
        assert manifest["files"][rel]["sha256"] == hashlib.sha256((artifact / rel).read_bytes()).hexdigest()
    check = json.loads((artifact / record["check"]).read_text())
    assert record["summary"]["weight_match"] == record["summary"]["weight_layers"] == \
        sum(r["weight_bits"] is not None for r in check.values())

    inputs = flux_inputs(manifest["denoiser"]["config"])
    saved, _, _ = modelopt_denoiser(artifact, "symmetric", check=False)
    fresh = FluxTransformer2DModel.from_config(manifest["denoiser"]["config"])
    restored = mto.restore(fresh, str(artifact / record["checkpoint"])).eval()
    with monkeypatch.context() as m:  # export.load verifies every checksum and still never unpickles
        for target, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            m.setattr(target, attr, lambda *a, **k: pytest.fail("export.load unpickled something"))
        simulated = export.load(artifact, verify=True).transformer
    with torch.no_grad():
        expected, got = saved(**inputs)[0], restored(**inputs)[0]
        ours = simulated(**inputs)[0]
        assert torch.equal(got, expected)
        assert torch.equal(restore_modelopt(artifact)(**inputs)[0], expected)
    assert ((got - ours).abs().max() / ours.abs().max()).item() < 0.1  # symmetric activations: not ours

    with pytest.raises(ArtifactError, match="already has a 'modelopt' export"):
        export_modelopt(artifact)
    record = export_modelopt(artifact, activations="affine", overwrite=True)  # replaced in place
    manifest = read_manifest(artifact, verify=True)
    assert manifest["modelopt"]["activations"] == "affine"
    assert sorted(r for r in manifest["files"] if r.startswith("modelopt/")) == ["modelopt/check.json",
                                                                                   "modelopt/transformer.pth"]
    assert not [p for p in artifact.iterdir() if p.name.startswith(".")]  # no temporary folders left
    with torch.no_grad():
        affine = restore_modelopt(artifact)(**inputs)[0]
    assert ((affine - ours).abs().max() / ours.abs().max()).item() < 1e-4  # affine reproduces the artifact


def test_tampered_checkpoint_fails_verification(artifact, tmp_path):
    from export.format import read_manifest
    from export.runtime_modelopt import export_modelopt, restore_modelopt

    copy_dir = tmp_path / "copy"
    shutil.copytree(artifact, copy_dir)
    if "modelopt" not in read_manifest(copy_dir, verify=False):
        export_modelopt(copy_dir)
    ckpt = copy_dir / "modelopt" / "transformer.pth"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modelopt/transformer.pth sha256 mismatch"):
        read_manifest(copy_dir, verify=True)
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        restore_modelopt(copy_dir)


def test_failed_export_leaves_the_artifact_as_it_was(artifact, tmp_path):
    from export.amend import add_folder
    from export.format import read_manifest

    target = tmp_path / "fail"
    shutil.copytree(artifact, target)
    before = (target / "manifest.json").read_bytes()

    def write(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError, match="killed mid-export"):
        add_folder(target, "other", write, "other", {"a": 1})
    assert (target / "manifest.json").read_bytes() == before
    assert not (target / "other").exists() and not [p for p in target.iterdir() if p.name.startswith(".")]
    read_manifest(target, verify=True)


def test_missing_checkpoint_and_missing_modelopt_errors(artifact, tmp_path, monkeypatch, capsys):
    from export.runtime_modelopt import restore_modelopt
    from qsched import cli

    bare = tmp_path / "bare"
    shutil.copytree(artifact, bare)
    if (bare / "modelopt").exists():  # strip the export again through the manifest writer's own format
        manifest = json.loads((bare / "manifest.json").read_text())
        manifest.pop("modelopt")
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("modelopt/")}
        (bare / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
        shutil.rmtree(bare / "modelopt")
    with pytest.raises(ArtifactError, match="--export modelopt"):
        restore_modelopt(bare)

    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    compiled = []
    monkeypatch.setattr("qsched.compiler.compile", lambda **kw: compiled.append(kw))
    assert cli.main(["--model", "flux-tiny", "--out", str(tmp_path / "x"), "--export", "modelopt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error:") and "pip install qsched[modelopt]" in err
    assert not compiled  # refused before compiling anything


def test_cli_export_modelopt_adds_the_checkpoint(artifact, tmp_path, monkeypatch, capsys):
    from qsched import cli
    from qsched.artifact import Artifact

    target = tmp_path / "cli"
    shutil.copytree(artifact, target)
    monkeypatch.setattr("qsched.compiler.compile",
                        lambda **kw: Artifact(target, json.loads((target / "manifest.json").read_text())))
    assert cli.main(["--model", "flux-tiny", "--out", str(target), "--export", "modelopt", "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exports"]["modelopt"]["checkpoint"] == "modelopt/transformer.pth"
    from export.format import read_manifest
    assert "modelopt/transformer.pth" in read_manifest(target, verify=True)["files"]


def test_mixed_fp8_and_int_artifact_exports_and_restores(flux, tmp_path):
    """An artifact with FP8 (e4m3) linears next to W4/W8 integer layers: one modelopt model, FP8 quantizers
    (num_bits (4, 3)) where the plan says fp8, integer ones elsewhere; the FP8 rows match code for code, the
    integer weights too, and the checkpoint restores to what the export computed."""
    from export.format import read_manifest
    from export.runtime_modelopt import export_modelopt, modelopt_denoiser, restore_modelopt
    from export.save import save_quantized
    from qsched.tinyworld.model import build_tiny_pipeline

    from conftest import TEST_WORDS

    fp, plan, ranges, _ = flux
    mixed = BitPlan(method="test", layers=dict(plan.layers))
    fp8 = [n for i, (n, lp) in enumerate(plan.layers.items())
           if i % 2 == 0 and lp.weight_bits is not None and lp.act_bits is not None and lp.group_size is None]
    for name in fp8:
        mixed.layers[name] = LayerPlan(8, 8, format="fp8")
    assert fp8 and len(fp8) < len(mixed.layers)
    pipe = build_tiny_pipeline(seed=0, words=TEST_WORDS)
    pipe.transformer = quantize_(copy.deepcopy(fp), mixed, ranges)
    path = tmp_path / "mixed"
    save_quantized(path, pipe, "transformer", mixed, {"bits": "w4a8", "source": {"kind": "test"}}, bundle=True)
    record = export_modelopt(path)  # symmetric: the integer layers' activations differ, as reported
    check = json.loads((path / record["check"]).read_text())
    assert record["summary"]["fp8_layers"] == len(fp8)
    for name, row in check.items():
        assert row["format"] == ("fp8" if name in fp8 else "int") and row["weight_match"], (name, row["reason"])
        if name in fp8:
            assert row["match"] and row["act_mode"] == "fp8" and row["output_rel_diff"] < 1e-5, (name, row)
    model, manifest, _ = modelopt_denoiser(path, check=False)
    assert model.get_submodule(fp8[0]).weight_quantizer.num_bits == (4, 3)
    assert model.get_submodule(next(n for n in check if n not in fp8 and check[n]["weight_bits"])).weight_quantizer.num_bits in (4, 8)
    inputs = flux_inputs(manifest["denoiser"]["config"])
    with torch.no_grad():
        assert torch.equal(restore_modelopt(path)(**inputs)[0], model(**inputs)[0])
    read_manifest(path, verify=True)
