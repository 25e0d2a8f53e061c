"""How a model runs for inference: which device, which engine (PyTorch or ONNX Runtime), which precision.

"auto" runs both towers in ONNX Runtime fp32 on CPUs without fast bf16, with nothing to measure. On
CPUs with AMX or AVX-512 BF16 it measures once per (CPU, model) which engine and precision is fastest
for each tower, and keeps bf16 only where its rankings match fp32's (`cnclip.model.calibrate`); the
result is cached under `cache_dir()/runtime/`. On GPUs "auto" means fp16 weights, as the official code
runs them. The timings behind these choices: scripts/bench/README.md, "What `auto` runs, and why".
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cnclip.errors import CNClipError
from cnclip.model.cpu import cpu_has_fast_bf16, onnxruntime_available

if TYPE_CHECKING:
    from cnclip.model.encoder import Encoder, TwoTowers

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
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


NO_FAST_BF16 = "no AMX or AVX-512 BF16 on this CPU, where bf16 runs ~3x slower than fp32"


@dataclass(frozen=True)
class Runtime:
    """A resolved choice: `device` ("cpu", "cuda", "cuda:1"), the image tower's `precision` (and
    the text tower's, `text_precision`, when it differs), the towers that run in ONNX Runtime
    (`onnx_towers`; the others run in PyTorch), and why (`reason`).

    `calibrate`: "auto" on a CPU with fast bf16, where the choice is measured per model by
    `for_model` (the fields then hold the fallback: ONNX Runtime fp32)."""

    device: str = "cpu"
    precision: str = "fp32"
    onnx_towers: tuple[str, ...] = ()
    text_precision: str | None = None
    calibrate: bool = False
    reason: str = field(default="", compare=False)

    @property
    def precisions(self) -> dict[str, str]:
        return {"image": self.precision, "text": self.text_precision or self.precision}

    @classmethod
    def resolve(cls, device: str | None = None, backend: str | None = None, precision: str | None = None) -> Runtime:
        """Fill in "auto" (or None) choices for this machine, and refuse combinations that cannot run.

        `device` defaults to `$CNCLIP_DEVICE`, then "cuda" when a GPU is visible, else "cpu";
        `backend` defaults to `$CNCLIP_BACKEND`, then "auto".
        """
        device = device or os.environ.get(DEVICE_ENV) or "auto"
        backend = backend or os.environ.get(BACKEND_ENV) or "auto"
        precision = asked = precision or "auto"
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
        if precision == "int8" and (kind != "cpu" or backend == "torch"):
            raise CNClipError("int8 runs on the CPU in ONNX Runtime; use --device cpu and --backend auto or onnx")
        if backend == "onnx" and (kind != "cpu" or precision not in ("fp32", "int8")):
            raise CNClipError("--backend onnx runs fp32 or int8 on the CPU; use --backend torch for a GPU or bf16")
        if (backend == "onnx" or precision == "int8") and not onnxruntime_available():
            raise CNClipError(
                f"--{'precision int8' if precision == 'int8' else 'backend onnx'} needs onnxruntime; "
                "pip install onnxruntime, or use --backend torch"
            )
        auto_cpu = kind == "cpu" and asked == "auto" and backend == "auto"
        if precision == "int8":  # the image tower only: queries stay exact, and are fast already
            reason = "int8 images, fp32 text, both in ONNX Runtime, as asked for"
            return cls(device, "int8", ("image", "text"), text_precision="fp32", reason=reason)
        if backend == "onnx":
            towers: tuple[str, ...] = ("image", "text")
        elif backend == "auto" and kind == "cpu" and precision == "fp32" and onnxruntime_available():
            towers = ("image", "text")
        else:
            towers = ()
        if auto_cpu and cpu_has_fast_bf16():
            reason = "this CPU has fast bf16: the fastest engine and precision per tower is measured once per model"
            return cls(device, precision, towers, calibrate=True, reason=reason)
        if auto_cpu:
            engine = "ONNX Runtime" if towers else "PyTorch (onnxruntime is not installed)"
            reason = f"{NO_FAST_BF16}: fp32, both towers in {engine}"
        elif kind == "cuda":
            reason = f"GPU: {precision}" + (" (auto)" if asked == "auto" else " (asked for)")
        else:
            reason = f"{precision} in {'ONNX Runtime' if towers else 'PyTorch'}, as asked for"
        return cls(device, precision, towers, reason=reason)

    def for_model(self, model: TwoTowers) -> Runtime:
        """This choice made concrete for `model`: where it says `calibrate`, the measured choice
        (cached per CPU and model; measured now, once, if not cached yet)."""
        if not self.calibrate:
            return self
        from cnclip.model.calibrate import calibrated

        return self._with(calibrated(model))

    def for_digest(self, digest: str) -> Runtime | None:
        """This choice for the model with weights `digest` without loading it: None when it must
        be measured first (`for_model`)."""
        if not self.calibrate:
            return self
        from cnclip.model.calibrate import load_cached

        found = load_cached(digest)
        return None if found is None else self._with(found)

    def _with(self, calibration) -> Runtime:
        towers = tuple(t for t in ("image", "text") if calibration.engine(t) == "onnx")
        return replace(
            self,
            precision=calibration.precision("image"),
            text_precision=calibration.precision("text"),
            onnx_towers=towers,
            calibrate=False,
            reason=calibration.reason,
        )

    def build(self, model: TwoTowers, onnx_folder: str | os.PathLike | None = None) -> Encoder:
        """An `Encoder` running `model` (a `CNClipModel`) this way: on this device, each tower in its
        precision and engine (ONNX sessions open on first use; exports go to `onnx_folder`, default
        the cache). `model` is left as it is. The concrete choice is the encoder's `runtime`."""
        from cnclip.model.encoder import Encoder  # torch: only once a model exists

        chosen = self.for_model(model)
        return Encoder.build(
            model,
            device=chosen.device,
            precisions=chosen.precisions,
            onnx_towers=chosen.onnx_towers,
            onnx_folder=onnx_folder,
            runtime=chosen,
        )

    def describe(self) -> str:
        if self.calibrate:
            return f"auto on {self.device}: measured per model (fast bf16 CPU)"

        def tower(name: str) -> str:
            return f"{'ONNX Runtime' if name in self.onnx_towers else 'PyTorch'} {self.precisions[name]}"

        return f"{self.device}; images: {tower('image')}, text: {tower('text')}"

    def to_dict(self) -> dict:
        """What `cnclip info` and /api/health report."""
        return {
            "device": self.device,
            "image": {"engine": "onnx" if "image" in self.onnx_towers else "torch", "precision": self.precision},
            "text": {
                "engine": "onnx" if "text" in self.onnx_towers else "torch",
                "precision": self.precisions["text"],
            },
            "measured_per_model": self.calibrate,
            "reason": self.reason,
        }
