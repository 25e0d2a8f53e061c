"""How a model runs for inference: which device, which engine (PyTorch or ONNX Runtime), which precision.

Measured on this project's build machine (2-core AMD EPYC, AVX2, no AVX-512/AMX; see
scripts/bench/embed.py), same output either way (cosine 0.9999999):
- text: ONNX Runtime fp32 ran a query in ~19-23 ms against PyTorch's ~55-80 ms;
- images: ONNX Runtime (4 images per run) reached 4.3-4.5 images/s model-only, 84-91 % of the
  machine's fp32 ceiling, against PyTorch's 3.2; indexing 12 MP JPEGs end to end 3.96 against
  3.30 images/s. torch.compile (inductor, with or without freezing) matched ONNX Runtime at
  best (4.1-4.3) after 23-36 s of compiling in every new process, so it is not used.
So "auto" runs both towers in ONNX Runtime on CPUs (each exported once per model and cached).
bf16 is ~3x *slower* than fp32 on such CPUs, and even on AMX CPUs, where it is faster, its
embeddings differ from fp32 (cosine ~0.998 in our measurement), so "auto" keeps fp32 on the CPU
and bf16 is opt-in. On GPUs "auto" means fp16 weights, as the official code runs them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cnclip.errors import CNClipError

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_ENV = "CNCLIP_DEVICE"
BACKEND_ENV = "CNCLIP_BACKEND"
_OTHER_DEVICES = re.compile(r"(mps|xpu|xla|hpu|ipu|mtia|meta|privateuseone)(:\d+)?")


def _gpu_possible() -> bool:
    """False when this machine surely has no GPU PyTorch could use, found without importing torch
    (~2.5 s): a one-shot `cnclip search` answers in about a second when it need not load torch."""
    if sys.modules.get("torch") is not None or not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return Path("/proc/driver/nvidia/version").exists() or (dev / "kfd").exists() or any(dev.glob("nvidia[0-9]*"))


def cuda_available() -> bool:
    if not _gpu_possible():
        return False
    import torch

    return torch.cuda.is_available()


CPU_BF16_ENV = "CNCLIP_CPU_BF16"  # "1"/"0": say whether this CPU has fast bf16, instead of reading /proc/cpuinfo


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: without them bf16 matmuls run *slower* than fp32 (measured here).

    `$CNCLIP_CPU_BF16` overrides the answer: for a CPU the flags misreport (some VMs hide AMX), and
    so that the test suite can make the choices an AMX machine makes on any machine."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


@dataclass(frozen=True)
class Runtime:
    """A resolved choice: `device` ("cpu", "cuda", "cuda:1"), `precision`, and the towers that run
    in ONNX Runtime (`onnx_towers`; the others run in PyTorch)."""

    device: str = "cpu"
    precision: str = "fp32"
    onnx_towers: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, device: str | None = None, backend: str | None = None, precision: str | None = None) -> Runtime:
        """Fill in "auto" (or None) choices for this machine, and refuse combinations that cannot run.

        `device` defaults to `$CNCLIP_DEVICE`, then "cuda" when a GPU is visible, else "cpu";
        `backend` defaults to `$CNCLIP_BACKEND`, then "auto".
        """
        device = device or os.environ.get(DEVICE_ENV) or "auto"
        backend = backend or os.environ.get(BACKEND_ENV) or "auto"
        precision = precision or "auto"
        if backend not in BACKENDS:
            raise CNClipError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise CNClipError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        if _OTHER_DEVICES.fullmatch(device):
            raise CNClipError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise CNClipError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
        kind = device.split(":")[0]
        if kind == "cuda" and not cuda_available():
            raise CNClipError(f"device {device} asked for, but PyTorch sees no GPU here; use --device cpu")

        if precision == "auto":
            precision = "fp16" if kind == "cuda" else "fp32"
        if precision == "fp16" and kind == "cpu":
            raise CNClipError("fp16 inference needs a GPU; on the CPU use --precision fp32 or bf16")
        if backend == "onnx" and (kind != "cpu" or precision != "fp32"):
            raise CNClipError("--backend onnx runs fp32 on the CPU; use --backend torch for a GPU or bf16")
        if backend == "onnx" and not onnxruntime_available():
            raise CNClipError("--backend onnx needs onnxruntime; pip install onnxruntime, or use --backend torch")
        if backend == "onnx":
            towers: tuple[str, ...] = ("image", "text")
        elif backend == "auto" and kind == "cpu" and precision == "fp32" and onnxruntime_available():
            towers = ("image", "text")
        else:
            towers = ()
        return cls(device=device, precision=precision, onnx_towers=towers)

    def apply(self, model):
        """Make `model` run this way; returns it (moved, cast, its ONNX towers set; sessions open on first use)."""
        model.weights_digest()  # of the fp32 weights, before any cast: an index compares it
        import torch

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        model.to(device=self.device, dtype=dtypes[self.precision])
        model.use_onnx(self.onnx_towers)
        return model

    def describe(self) -> str:
        engines = {t: "ONNX Runtime" if t in self.onnx_towers else "PyTorch" for t in ("image", "text")}
        return f"{self.precision} on {self.device}; images: {engines['image']}, text: {engines['text']}"
