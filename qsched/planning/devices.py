"""The devices ``qcompile --plan`` prices a compile on: dense throughput and memory, each figure with its source.

A plan's time is MACs × 2 / (the device's dense throughput at the compile's dtype × an achieved fraction).
The GPU figures are the vendor's peak *dense* tensor-core numbers (datasheets print the 2:4-sparsity figure
first, twice these; a compile's matmuls are dense). ``fp32`` is the plain (non-tensor-core) FP32 rate, what
torch's default matmul (TF32 off) gets on a GPU: flux-tiny compiles in fp32. The ``cpu`` entry is not a
datasheet figure but one measured on the machine the project is developed on, by
``benchmarks/matmul_throughput.py``; rerun it on yours and pass ``tflops=`` to
:func:`qsched.planning.plan_compile` (or edit the entry) to price a compile on your CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qsched.core.errors import QschedError

#: the share of the listed throughput a compile's denoiser evaluations reach on average (matmuls at these
#: shapes run near peak; attention softmax, norms, activations, the sampler loop and small batches do not).
#: An assumption, stated in every plan; ``plan_compile(achieved_fraction=...)`` overrides it.
DEFAULT_ACHIEVED_FRACTION = 0.5


@dataclass(frozen=True)
class Device:
    """A device a plan can price: dense BF16 and FP32 TFLOPS, memory (GB; None: the host's, unknown), source."""

    name: str
    label: str
    bf16_tflops: float
    fp32_tflops: float
    memory_gb: float | None
    source: str

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"

    def tflops(self, dtype: str) -> float:
        """Dense throughput at a compile dtype (``bfloat16``/``float16`` → the BF16 figure, else FP32)."""
        return self.bf16_tflops if dtype in ("bfloat16", "float16") else self.fp32_tflops

    def to_dict(self) -> dict:
        return asdict(self)


DEVICES: dict[str, Device] = {d.name: d for d in (
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: "BF16 Tensor Core 1,979 teraFLOPS*" (* with sparsity),
    # dense = half; "FP32 67 teraFLOPS"; "GPU memory 80GB".
    Device("h100", "NVIDIA H100 SXM 80 GB", 989.0, 67.0, 80.0,
           "NVIDIA H100 datasheet (SXM): BF16 1,979 TFLOPS with sparsity = 989 dense; FP32 67 TFLOPS; 80 GB"),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: "BF16 Tensor Core 1,979 TFLOPS*" (* with sparsity),
    # dense = half (the H100's compute with more memory); "FP32 67 TFLOPS"; "GPU memory 141GB".
    Device("h200", "NVIDIA H200 SXM 141 GB", 989.0, 67.0, 141.0,
           "NVIDIA H200 datasheet (SXM): BF16 1,979 TFLOPS with sparsity = 989 dense; FP32 67 TFLOPS; 141 GB"),
    # NVIDIA A100 Tensor Core GPU datasheet: "BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS*" (* with sparsity);
    # "FP32 19.5 TFLOPS"; 80 GB (SXM / PCIe 80GB).
    Device("a100", "NVIDIA A100 80 GB", 312.0, 19.5, 80.0,
           "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity); FP32 19.5 TFLOPS; 80 GB"),
    # NVIDIA L40S datasheet: "BF16 Tensor Core 362.05 | 733* TFLOPS" (* with sparsity); "FP32 91.6 TFLOPS";
    # "GPU Memory 48GB GDDR6 with ECC".
    Device("l40s", "NVIDIA L40S 48 GB", 362.05, 91.6, 48.0,
           "NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity); FP32 91.6 TFLOPS; 48 GB"),
    # NVIDIA Ada Lovelace GPU architecture whitepaper, appendix table for the GeForce RTX 4090: "Peak BF16 Tensor
    # TFLOPS with FP32 Accumulate 165.2/330.4" (dense/sparse; GeForce runs FP32 accumulation at half the FP16-
    # accumulate rate, and torch's bf16 matmuls accumulate in FP32); "Peak FP32 TFLOPS (non-Tensor) 82.6"; 24 GB.
    Device("4090", "NVIDIA GeForce RTX 4090 24 GB", 165.2, 82.6, 24.0,
           "NVIDIA Ada Lovelace whitepaper (RTX 4090): BF16 tensor with FP32 accumulate 165.2 TFLOPS dense "
           "(330.4 with sparsity; 330.3 only with FP16 accumulate); FP32 82.6 TFLOPS; 24 GB"),
    # Measured, not a datasheet: `python benchmarks/matmul_throughput.py` (F.linear, 1024 × 3072 → 3072, median
    # of 5) on the project's shared 2-core AMD EPYC (no native bf16 instructions), torch 2.13.0+cpu, 2 threads,
    # load average ~3 from other jobs: bf16 9.1 GFLOP/s, fp32 55.6 GFLOP/s (1 thread: 9.3 and 52.9).
    Device("cpu", "CPU (the 2-core AMD EPYC this project is developed on; measured)", 0.0091, 0.0556, None,
           "measured by benchmarks/matmul_throughput.py on a shared 2-core AMD EPYC, torch 2.13.0+cpu, "
           "2 threads: bf16 9.1 GFLOP/s, fp32 55.6 GFLOP/s (F.linear 1024×3072→3072)"),
)}


def device(name: str) -> Device:
    """The :class:`Device` named ``name`` (case-insensitive); an unknown name is one error line listing them."""
    key = str(name).strip().lower()
    if key not in DEVICES:
        raise QschedError(f"unknown --plan-device {name!r}: expected one of {', '.join(DEVICES)}")
    return DEVICES[key]
