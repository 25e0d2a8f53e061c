"""Which engine and precision runs each tower fastest on this CPU, measured once per (CPU, model).

Used by `Runtime` "auto" on CPUs with fast bf16 (AMX or AVX-512 BF16), where bf16 PyTorch can
run a tower ~3x faster than fp32 but is not always the fastest (the text tower's small matrices,
ONNX Runtime's fused kernels). Each candidate (ONNX Runtime fp32, PyTorch fp32, PyTorch bf16)
runs a few batches; bf16 is kept for a tower only if it keeps fp32's rankings on a probe set:
every probe row's cosine to fp32 >= MIN_COSINE and text->image top-10 overlap >= MIN_OVERLAP,
for bf16 images searched by fp32 text and the other way round too (an index may be built in one
precision and searched in the other). The answer is cached as JSON under
`cache_dir()/runtime/`, keyed by the CPU, the library versions and the model's weights digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnclip import atomic
from cnclip.model.cpu import cpu_has_fast_bf16, onnxruntime_available, package_version
from cnclip.model.onnx_runtime import cache_dir

if TYPE_CHECKING:
    import torch

    from cnclip.model.encoder import Encoder, TwoTowers

log = logging.getLogger(__name__)

VERSION = 1  # of the measurement: a cached answer from another version is measured again
CANDIDATES = ("onnx-fp32", "torch-fp32", "torch-bf16")
DEFAULT = "onnx-fp32"  # what "auto" ran before measuring existed, and the fallback
MIN_COSINE = 0.999
MIN_OVERLAP = 0.95
TOP = 10
MARGIN = 1.05  # another candidate must beat the default by 5 % (timing noise must not flip choices)
IMAGE_ROWS = 8  # images per timed batch (bf16 on AMX ran best at 8)
PROBE_IMAGES = 48
PROBE_TEXTS = (
    "海边的日落",
    "一只在沙发上睡觉的橘猫",
    "城市夜景",
    "我家的狗在公园里奔跑",
    "生日蛋糕和蜡烛",
    "雪山和湖泊",
    "红色的汽车停在路边",
    "穿着校服的孩子们",
    "一碗热腾腾的面条",
    "下雨天的街道",
    "绿色的森林和小路",
    "蓝天白云",
    "黑白照片",
    "一群人在海滩上玩排球",
    "夜空中的烟花",
    "桌上的一杯咖啡",
    "秋天的红叶",
    "老人在公园下棋",
    "地铁站里的人群",
    "一只白色的鸟站在水边",
    "花园里盛开的玫瑰",
    "高楼大厦",
    "婚礼上的新娘",
    "结冰的河面",
)

# Set by the CLI to say on stderr that a one-time measurement is running (library code never prints).
notify: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Calibration:
    """A measured choice: `choice` per tower ("onnx-fp32", "torch-fp32" or "torch-bf16"), the
    measured `speeds` (rows per second per tower and candidate), `fidelity` of bf16 to fp32,
    the CPU it was measured on, and a one-line `reason`."""

    choice: dict[str, str]
    speeds: dict[str, dict[str, float]]
    fidelity: dict[str, float]
    cpu: str
    reason: str
    ceilings: dict[str, float] = field(default_factory=dict)  # matrix-product GFLOP/s per precision
    version: int = VERSION

    def engine(self, tower: str) -> str:
        return self.choice[tower].split("-")[0]

    def precision(self, tower: str) -> str:
        return self.choice[tower].split("-")[1]

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a measurement depends on besides the model: CPU, its bf16 flags, cores, library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu_name(), f"fast_bf16={cpu_has_fast_bf16()}", f"cores={cores}"]
    parts += [f"{name}={package_version(name)}" for name in ("torch", "onnxruntime")]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


def cache_path(digest: str) -> Path:
    return cache_dir() / "runtime" / f"{machine_key()}-{digest[:32]}.json"


def load_cached(digest: str) -> Calibration | None:
    """The cached measurement for the model with weights `digest` on this machine, if any."""
    path = cache_path(digest)
    try:
        data = json.loads(path.read_text("utf-8"))
        found = Calibration(**data)
    except (OSError, ValueError, TypeError):
        return None  # none yet, or unreadable: measured again
    return found if found.version == VERSION and set(found.choice) == {"image", "text"} else None


def calibrated(model: TwoTowers) -> Calibration:
    """The choice for `model` on this machine: cached, else measured now (seconds) and cached."""
    digest = model.weights_digest()
    found = load_cached(digest)
    if found is not None:
        return found
    if notify is not None:
        notify(f"measuring how {model.config.name or 'this model'} runs fastest on this CPU (once per model) ...")
    found = measure(model)
    try:
        cache_path(digest).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(cache_path(digest), found.to_dict())
    except OSError as e:  # a read-only cache: measured again next time, nothing else lost
        log.warning("could not cache the runtime measurement in %s: %s", cache_path(digest), e)
    return found


# -- measuring --------------------------------------------------------------------------------------


def measure(model: TwoTowers, timer: Callable[[], float] = time.perf_counter) -> Calibration:
    """Time every candidate on both towers and check bf16's rankings against fp32; `choose`.

    Each candidate is an `Encoder` of its own; `model` is left as it is."""
    import torch

    ceilings = {
        name: matmul_gflops(getattr(torch, dtype), timer) for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16"))
    }
    # bf16 emulated in software (a CPU whose flags claim more than it has) runs ~400x slower than
    # fp32: one batch would take minutes, so such a CPU is found out by one matrix product.
    with_bf16 = ceilings["bf16"] > ceilings["fp32"]
    candidates = [
        c for c in CANDIDATES if (c != "onnx-fp32" or onnxruntime_available()) and (c != "torch-bf16" or with_bf16)
    ]
    encoders = {name: candidate(model, name) for name in candidates}
    fp32 = encoders["torch-fp32"]
    pixels = fp32.preprocess.batch(probe_images(PROBE_IMAGES, model.config.vision.image_size))
    ids = fp32.tokenizer(list(PROBE_TEXTS))
    speeds: dict[str, dict[str, float]] = {"image": {}, "text": {}}
    fidelity: dict[str, float] = {}
    with torch.inference_mode():
        for name, encoder in encoders.items():
            image, text = encoder.image_features, encoder.text_features
            speeds["image"][name] = _rate(lambda f=image: f(pixels[:IMAGE_ROWS]), IMAGE_ROWS, timer, 1.0, 5)
            speeds["text"][name] = _rate(lambda f=text: f(ids[:1]), 1, timer, 0.5, 20)
        bf16 = encoders.get("torch-bf16")
        if bf16 is not None:  # bf16 images run IMAGE_ROWS at a time, as they are timed and embedded
            fidelity = compare(
                _unit(fp32.image_features(pixels)),
                _unit(fp32.text_features(ids)),
                _unit(bf16.image_features(pixels)),
                _unit(bf16.text_features(ids)),
            )
    choice, reason = choose(speeds, fidelity)
    if not with_bf16:
        reason += (
            f"; bf16 not tried: its matrix products ran at {ceilings['bf16']:.1f} GFLOP/s, "
            f"fp32's at {ceilings['fp32']:.1f}"
        )
    return Calibration(choice, speeds, fidelity, cpu_name(), reason, ceilings)


def candidate(model: TwoTowers, name: str) -> Encoder:
    """The encoder a candidate ("onnx-fp32", "torch-fp32", "torch-bf16") runs both towers with, on the CPU."""
    from cnclip.model.encoder import Encoder

    engine, precision = name.split("-")
    onnx = ("image", "text") if engine == "onnx" else ()
    return Encoder.build(model, device="cpu", precisions={"image": precision, "text": precision}, onnx_towers=onnx)


def matmul_gflops(dtype: torch.dtype, timer: Callable[[], float] = time.perf_counter, n: int = 512) -> float:
    """How fast this CPU multiplies n x n matrices in `dtype` (GFLOP/s): the ceiling of a precision."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    with torch.inference_mode():
        rate = _rate(lambda: a @ b, 1, timer, 0.2, 50)
    return 2 * n**3 * rate / 1e9


def _unit(features: torch.Tensor) -> np.ndarray:
    x = features.float().cpu().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rate(fn: Callable[[], object], rows: int, timer: Callable[[], float], min_time: float, max_runs: int) -> float:
    """Rows per second after one warm-up run (allocation, session start), over at least `min_time` s."""
    fn()
    runs, start = 0, timer()
    while True:
        fn()
        runs += 1
        elapsed = timer() - start
        if elapsed >= min_time or runs >= max_runs:
            return rows * runs / max(elapsed, 1e-9)


def probe_images(n: int, size: int, seed: int = 0):
    """`n` generated pictures (a colour gradient and a few shapes each): varied enough that a
    trained model ranks them apart, the same on every machine."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    for _ in range(n):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        rows = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
        image = Image.fromarray(np.repeat(rows, size, axis=1))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        images.append(image)
    return images


def overlap(
    queries: np.ndarray, items: np.ndarray, queries_b: np.ndarray, items_b: np.ndarray, top: int = TOP
) -> float:
    """Mean share of each query's top-`top` items that two versions of the vectors agree on."""
    a = np.argsort(-(queries @ items.T), axis=1)[:, :top]
    b = np.argsort(-(queries_b @ items_b.T), axis=1)[:, :top]
    return float(np.mean([len(set(x) & set(y)) / top for x, y in zip(a, b, strict=True)]))


def compare(image32: np.ndarray, text32: np.ndarray, image16: np.ndarray, text16: np.ndarray) -> dict[str, float]:
    """bf16 against fp32 on the probes: lowest row cosine per tower, and top-10 overlap of
    text->image rankings with bf16 images, bf16 text, and both."""
    return {
        "image_min_cosine": float(np.min(np.sum(image32 * image16, axis=1))),
        "text_min_cosine": float(np.min(np.sum(text32 * text16, axis=1))),
        "overlap_bf16_images": overlap(text32, image32, text32, image16),
        "overlap_bf16_text": overlap(text32, image32, text16, image32),
        "overlap_bf16_both": overlap(text32, image32, text16, image16),
    }


def _faithful(fidelity: dict[str, float], tower: str) -> bool:
    plural = "images" if tower == "image" else "text"
    return (
        fidelity[f"{tower}_min_cosine"] >= MIN_COSINE
        and fidelity[f"overlap_bf16_{plural}"] >= MIN_OVERLAP
        and fidelity["overlap_bf16_both"] >= MIN_OVERLAP
    )


def choose(speeds: dict[str, dict[str, float]], fidelity: dict[str, float]) -> tuple[dict[str, str], str]:
    """Per tower, the fastest candidate that keeps fp32's rankings; the default unless another
    beats it by `MARGIN`. Returns the choice and a one-line reason with the figures."""
    choice, parts = {}, []
    for tower, unit in (("image", "images/s"), ("text", "queries/s")):
        measured = speeds[tower]
        allowed = {c: v for c, v in measured.items() if c != "torch-bf16" or _faithful(fidelity, tower)}
        default = DEFAULT if DEFAULT in allowed else "torch-fp32"
        best = max(allowed, key=allowed.get)
        pick = best if allowed[best] >= MARGIN * allowed.get(default, 0.0) else default
        choice[tower] = pick
        figures = ", ".join(f"{c} {v:.1f}" for c, v in sorted(measured.items(), key=lambda kv: -kv[1]))
        note = "" if "torch-bf16" in allowed or "torch-bf16" not in measured else "; bf16 left out: rankings moved"
        parts.append(f"{tower}: {pick} ({unit}: {figures}{note})")
    reason = "measured on this CPU: " + "; ".join(parts)
    if fidelity:
        cos = min(fidelity["image_min_cosine"], fidelity["text_min_cosine"])
        reason += f"; bf16 vs fp32: lowest cosine {cos:.5f}, top-{TOP} overlap {fidelity['overlap_bf16_both']:.3f}"
    return choice, reason
