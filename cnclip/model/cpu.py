"""What this CPU and install offer for inference: fast bf16 (AMX, AVX-512 BF16), ONNX Runtime, OpenVINO.

Torch-free, read from /proc/cpuinfo and the installed packages.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

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


def openvino_available() -> bool:
    """OpenVINO, the word reader's engine on CPUs with fast bf16 (installed on x86-64)."""
    return importlib.util.find_spec("openvino") is not None


def package_version(name: str) -> str | None:
    """The installed version of a distribution, without importing it (None if not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
