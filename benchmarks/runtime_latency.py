"""Runtime latency: does the native integer runtime beat FP on this machine, and by how much?

Two measurements, every variant side by side in one run (median of ``--repeat`` timed calls after
``--warmup`` untimed ones, under ``torch.inference_mode``):

1. One FLUX-size linear layer (3072 in x 12288 out, the single-stream MLP up-projection) at several token
   counts: fp32, bf16, native W8A8 (``torch._int_mm``, including the input quantization and rescale), the
   bare ``_int_mm`` kernel for reference, and native int4 (packed nibbles unpacked and dequantized every
   call, then an fp32 or bf16 matmul).
2. One denoiser step of flux-tiny (the trained weights when shipped, else a random pipeline; force random
   with ``--random-model``): fp32, bf16, simulated W8A8, and native W8A8 / W4A8 / W4A16. Activation ranges
   come from one captured pipeline call; the table also reports how far each output is from fp32.

Both also run onnxruntime (CPU EP, as many threads as torch) on graphs made by the artifact's own export
path (:mod:`export.onnx_graph`): fp32, W8A8 as QDQ (onnxruntime fuses it into ``MatMulIntegerToFloat``) and
4-bit ``MatMulNBits`` (accuracy level 0: fp32 compute, what the simulation computes; level 4: int8 compute).
The "ort kernels" column lists the quantized kernels onnxruntime actually runs after its graph
optimizations. ``--skip-onnx`` leaves them out (needs ``pip install 'qsched[onnx]'``).

    python benchmarks/runtime_latency.py --tokens 256 1024 4096 --repeat 10 --out bench-out/runtime-latency.json
    python benchmarks/runtime_latency.py --tokens 32 --repeat 2 --in-features 256 --out-features 512   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qsched.runtime.apply import set_submodule
from qsched.runtime.qlayers import QuantLayer
from qsched.runtime.quantizers import quantize_weight
from export.runtime_torch import NativeDequantLayer, NativeInt8Linear, to_native_


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeat: int, warmup: int, device: torch.device) -> dict:
    """Median (and min/max) wall time of ``fn()`` over ``repeat`` calls, after ``warmup`` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class _Call(nn.Module):
    """A module called like a diffusers denoiser (keyword input, tuple output), which is what the ONNX export
    path traces."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, return_dict=True):
        return (self.inner(hidden_states),)


_ORT_KERNELS = ("MatMulIntegerToFloat", "MatMulNBits", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger")


def ort_session(module: nn.Module, inputs: dict, threads: int, accuracy_level: int = 0, dynamic: bool = False):
    """``module`` exported as the artifact export does it, in a CPU session; returns (session, input names,
    the quantized kernels onnxruntime chose after its graph optimizations, model bytes)."""
    import tempfile

    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from export.onnx_graph import export_graph
    from export.runtime_onnx import session_settings

    model, info = export_graph(module, inputs, dynamic=dynamic, accuracy_level=accuracy_level)
    with tempfile.TemporaryDirectory() as tmp:
        path, optimized = f"{tmp}/model.onnx", f"{tmp}/optimized.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        settings = session_settings(info["layers"], accuracy_level)  # what OnnxDenoiser's sessions use
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        for key, value in settings["config"].items():
            options.add_session_config_entry(key, value)
        options.optimized_model_filepath = optimized
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=settings["disabled_optimizers"] or None)
        ops = [n.op_type for n in onnx.load(optimized, load_external_data=False).graph.node]
    kernels = {k: ops.count(k) for k in _ORT_KERNELS if k in ops}
    return session, info["inputs"], kernels, size


def quant_layer(weight: torch.Tensor, bias: torch.Tensor, weight_bits: int, act_bits: int | None,
                act_range: tuple[float, float], format: str = "int") -> QuantLayer:
    linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return QuantLayer.from_module(linear, weight_bits, act_bits, act_range if act_bits else None, format=format)


def bench_linear(in_features: int, out_features: int, tokens: list[int], repeat: int, warmup: int,
                 device: torch.device, onnx: bool = False) -> list[dict]:
    """Latency of one linear layer per variant and token count."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(device)
    bias = (torch.randn(out_features, generator=gen) * 0.01).to(device)
    act_range = (-4.0, 6.0)
    w8a8 = NativeInt8Linear(quant_layer(weight, bias, 8, 8, act_range))
    int4_fp32 = NativeDequantLayer(quant_layer(weight, bias, 4, None, act_range))
    int4_bf16 = NativeDequantLayer(quant_layer(weight.bfloat16(), bias.bfloat16(), 4, None, act_range))
    weight_bf16, bias_bf16 = weight.bfloat16(), bias.bfloat16()
    int8_codes = quantize_weight(weight, 8)[0]
    sizes = {"fp32": weight.numel() * 4, "bf16": weight.numel() * 2, "native int8 (W8A8)": _bytes(w8a8),
             "_int_mm kernel only": weight.numel(), "native int4 -> fp32": _bytes(int4_fp32),
             "native int4 -> bf16": _bytes(int4_bf16)}
    sessions, kernels = {}, {}
    if onnx and device.type == "cpu":
        linear = nn.Linear(in_features, out_features)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        example = {"hidden_states": torch.randn(max(tokens), in_features, generator=gen)}
        threads = torch.get_num_threads()
        for name, layer, level in (("ort fp32", linear, 0),
                                   ("ort W8A8 QDQ", quant_layer(weight, bias, 8, 8, act_range), 0),
                                   ("ort int4 MatMulNBits", quant_layer(weight, bias, 4, None, act_range), 0),
                                   ("ort int4 NBits acc4", quant_layer(weight, bias, 4, None, act_range), 4)):
            print(f"  exporting {name} ...", flush=True)
            sess, _, kernels[name], sizes[name] = ort_session(_Call(layer).eval(), example, threads, level,
                                                              dynamic=True)
            sessions[name] = sess
    rows = []
    for m in tokens:
        x = (torch.randn(m, in_features, generator=gen) * 1.5).to(device)
        x_bf16 = x.bfloat16()
        q = w8a8.quantize_input(x)
        variants = {
            "fp32": lambda: F.linear(x, weight, bias),
            "bf16": lambda: F.linear(x_bf16, weight_bf16, bias_bf16),
            "native int8 (W8A8)": lambda: w8a8(x),
            "_int_mm kernel only": lambda: torch._int_mm(q, int8_codes.t()),
            "native int4 -> fp32": lambda: int4_fp32(x),
            "native int4 -> bf16": lambda: int4_bf16(x_bf16),
        }
        x_np = x.cpu().numpy()
        for name, sess in sessions.items():
            variants[name] = lambda sess=sess: sess.run(None, {"hidden_states": x_np})
        base = None
        for name, fn in variants.items():
            timing = median_seconds(fn, repeat, warmup, device)
            base = base or timing["median_ms"]
            rows.append({"tokens": m, "variant": name, **timing, "speedup_vs_fp32": base / timing["median_ms"],
                         "weight_bytes": sizes[name], "ort_kernels": kernels.get(name)})
            print(f"  linear {in_features}x{out_features} tokens={m:<5} {name:<22} {timing['median_ms']:9.2f} ms",
                  flush=True)
    return rows


def tiny_pipeline(random_model: bool):
    from qsched.core.errors import ModelNotFoundError
    from qsched.tinyworld.model import build_tiny_pipeline, load_embedded

    if not random_model:
        try:
            return load_embedded(), "trained"
        except ModelNotFoundError:
            print("  (flux-tiny weights not shipped here: using a random flux-tiny pipeline)")
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, "random"


def capture_step(pipe, batch: int) -> tuple[dict, dict[str, tuple[float, float]]]:
    """The transformer's inputs for one step and each linear layer's input range (one pipeline call)."""
    from qsched.tinyworld.model import TINY_SETTINGS

    from calibrate.statistics import observe_inputs

    denoiser = pipe.transformer
    captured = {}

    def grab(_module, args, kwargs):
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    layers = {n: m for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)}
    prompts = ["a red circle on the left", "a large blue square above a green triangle"] * batch
    hook = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with observe_inputs(layers, momentum=None) as observers, torch.inference_mode():
            pipe(prompts[:batch], num_inference_steps=1, height=TINY_SETTINGS.height, width=TINY_SETTINGS.width,
                 guidance_scale=0.0, max_sequence_length=TINY_SETTINGS.max_sequence_length, output_type="pt")
    finally:
        hook.remove()
    ranges = {n: o.range for n, o in observers.items() if o.calls}
    return captured, ranges


def quantized_copy(denoiser: nn.Module, ranges: dict, weight_bits: int, act_bits: int | None,
                   format: str = "int") -> nn.Module:
    model = copy.deepcopy(denoiser)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name in ranges:
            set_submodule(model, name, QuantLayer.from_module(module, weight_bits, act_bits,
                                                              ranges[name] if act_bits else None, format=format))
    return model.eval()


def bench_denoiser(random_model: bool, batch: int, repeat: int, warmup: int, device: torch.device,
                   onnx: bool = False) -> dict:
    pipe, which = tiny_pipeline(random_model)
    inputs, ranges = capture_step(pipe, batch)
    fp32 = pipe.transformer.eval()
    variants: dict[str, tuple[nn.Module, torch.dtype]] = {"fp32": (fp32, torch.float32),
                                                          "bf16": (copy.deepcopy(fp32).to(torch.bfloat16), torch.bfloat16),
                                                          "simulated W8A8": (quantized_copy(fp32, ranges, 8, 8), torch.float32)}
    paths = {}
    for label, wb, ab in (("native W8A8", 8, 8), ("native W4A8", 4, 8), ("native W4A16", 4, None)):
        model = quantized_copy(fp32, ranges, wb, ab)
        paths[label] = to_native_(model)
        variants[label] = (model, torch.float32)
    with torch.inference_mode():
        reference = fp32(**inputs, return_dict=False)[0].float()
    rows = []
    if onnx and device.type == "cpu":
        rows += bench_denoiser_onnx(fp32, inputs, ranges, reference, repeat, warmup, device)
    for name, (model, dtype) in variants.items():
        model.to(device)
        args = {k: (v.to(device, dtype) if v.is_floating_point() and not k.endswith("_ids") else v.to(device))
                for k, v in inputs.items()}

        def step():
            return model(**args, return_dict=False)[0]
        timing = median_seconds(step, repeat, warmup, device)
        with torch.inference_mode():
            out = step().float().cpu()
        rel = float((out - reference).abs().max() / reference.abs().max())
        rows.append({"variant": name, **timing, "state_bytes": _bytes(model), "max_rel_diff_vs_fp32": rel,
                     "layer_paths": paths.get(name)})
        print(f"  flux-tiny step {name:<16} {timing['median_ms']:9.2f} ms   max|Δ|/max vs fp32 {rel:.2e}", flush=True)
    tokens = int(inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1])
    return {"model": which, "batch": batch, "tokens_per_sample": tokens, "rows": rows}


def bench_denoiser_onnx(fp32: nn.Module, inputs: dict, ranges: dict, reference: torch.Tensor, repeat: int,
                        warmup: int, device: torch.device) -> list[dict]:
    """The same step in onnxruntime: fp32, W8A8 QDQ, W4A8 and W4A16 MatMulNBits (static shapes)."""
    threads = torch.get_num_threads()
    rows = []
    for name, wb, ab, level in (("ort fp32", None, None, 0), ("ort W8A8 QDQ", 8, 8, 0),
                                ("ort W4A8 NBits", 4, 8, 0), ("ort W4A16 NBits", 4, None, 0),
                                ("ort W4A16 NBits acc4", 4, None, 4)):
        model = fp32 if wb is None else quantized_copy(fp32, ranges, wb, ab)
        print(f"  exporting flux-tiny {name} ...", flush=True)
        session, names, kernels, size = ort_session(model, inputs, threads, level)
        feed = {n: inputs[n].cpu().numpy() for n in names}

        def step():
            return session.run(None, feed)[0]
        timing = median_seconds(step, repeat, warmup, device)
        out = torch.from_numpy(step()).float()
        rel = float((out - reference).abs().max() / reference.abs().max())
        rows.append({"variant": name, **timing, "state_bytes": size, "max_rel_diff_vs_fp32": rel,
                     "ort_kernels": kernels})
        print(f"  flux-tiny step {name:<20} {timing['median_ms']:9.2f} ms   max|Δ|/max vs fp32 {rel:.2e}   "
              f"{kernels}", flush=True)
    return rows


def print_linear_table(rows: list[dict]) -> None:
    names = list(dict.fromkeys(r["variant"] for r in rows))
    tokens = list(dict.fromkeys(r["tokens"] for r in rows))
    print("\nlinear layer latency, median ms (speedup vs fp32)")
    print(f"{'variant':<22} {'weight MB':>9} " + " ".join(f"{f'{m} tok':>18}" for m in tokens))
    for name in names:
        cells = {r["tokens"]: r for r in rows if r["variant"] == name}
        mb = cells[tokens[0]]["weight_bytes"] / 2**20
        kernels = cells[tokens[0]].get("ort_kernels")
        print(f"{name:<22} {mb:9.1f} " + " ".join(
            f"{cells[m]['median_ms']:10.2f} ({cells[m]['speedup_vs_fp32']:4.2f}x)" for m in tokens)
            + (f"  ort kernels: {kernels}" if kernels is not None else ""))


def print_denoiser_table(result: dict) -> None:
    print(f"\nflux-tiny denoiser step ({result['model']} weights, batch {result['batch']}, "
          f"{result['tokens_per_sample']} tokens/sample), median ms")
    base = next(r["median_ms"] for r in result["rows"] if r["variant"] == "fp32")
    for r in result["rows"]:
        kernels = f"  ort kernels: {r['ort_kernels']}" if r.get("ort_kernels") is not None else ""
        print(f"{r['variant']:<21} {r['median_ms']:9.2f} ({base / r['median_ms']:4.2f}x)  "
              f"size {r['state_bytes'] / 2**20:6.2f} MB  max|Δ|/max vs fp32 {r['max_rel_diff_vs_fp32']:.2e}{kernels}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--in-features", type=int, default=3072)
    p.add_argument("--out-features", type=int, default=12288)
    p.add_argument("--repeat", type=int, default=10, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4, help="images per flux-tiny denoiser step")
    p.add_argument("--random-model", action="store_true", help="random flux-tiny even if trained weights are shipped")
    p.add_argument("--skip-denoiser", action="store_true")
    p.add_argument("--skip-onnx", action="store_true", help="leave out the onnxruntime variants")
    p.add_argument("--out", default="bench-out/runtime-latency.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"env": {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads(), "device": str(device), "machine": platform.machine(),
                      "processor": platform.processor()},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    onnx = not args.skip_onnx
    if onnx:
        import onnxruntime
        result["env"]["onnxruntime"] = onnxruntime.__version__
    result["linear"] = bench_linear(args.in_features, args.out_features, args.tokens, args.repeat, args.warmup, device,
                                    onnx)
    print_linear_table(result["linear"])
    if not args.skip_denoiser:
        result["denoiser_step"] = bench_denoiser(args.random_model, args.batch, args.repeat, args.warmup, device,
                                                 onnx)
        print_denoiser_table(result["denoiser_step"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
