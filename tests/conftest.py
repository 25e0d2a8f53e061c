"""Shared fixtures: tiny random models, generated images; never the network."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

# Before anything imports huggingface_hub: tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
for name in ("CNCLIP_MODEL", "CNCLIP_DEVICE", "CNCLIP_BACKEND", "CNCLIP_OCR_ENGINE"):
    os.environ.pop(name, None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (96, 72)) -> list[Image.Image]:
    """Smooth random RGB images (noise plus gradients), different per index."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        base = rng.integers(0, 256, size=(3,), dtype=np.int64)
        grad = np.linspace(0, 1, size[0])[None, :, None] * rng.integers(-120, 120, size=(3,))
        noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
        arr = np.clip(base + grad + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr, "RGB"))
    return images


def write_photos(folder, n: int, seed: int, prefix: str = "p") -> list:
    """`n` generated photos saved in `folder` (made if missing) as PREFIX0.png, PREFIX1.png, ...; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(random_images(n, seed=seed)):
        paths.append(folder / f"{prefix}{i}.png")
        image.save(paths[-1])
    return paths


def solid_photo(path, rgb, size=(48, 40)):
    """A photo of one colour with a lattice of its complement (images then differ in more than
    their mean), saved at `path` (folders made); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), rgb, np.uint8)
    arr[::7, ::5] = (255 - np.array(rgb)).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def mount_tmpfs(path) -> None:
    """Mount a fresh 16 MB tmpfs at `path`: a real drive to unplug (skips where mounting is refused;
    CI runs as root)."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "cnclip-test", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs needs root (CI runs as root): {done.stderr.decode().strip()}")


def umount(path) -> None:
    subprocess.run(["umount", str(path)], check=True)


# The word reader's second engine, OpenVINO, is installed on x86-64 only (pyproject.toml).
X86 = platform.machine().lower() in ("x86_64", "amd64")
NO_OPENVINO = "OpenVINO is installed on x86-64 only (pyproject.toml)"
needs_openvino = pytest.mark.skipif(not X86, reason=NO_OPENVINO)


def word_photo(path, lines, size=(640, 480), font_size=40, background=(236, 230, 214), seed=0):
    """A picture with `lines` of text drawn on it (the CJK font the set-up installs), over a
    background of one colour with some texture; saved at `path` (folders made); returns `path`."""
    from PIL import ImageDraw, ImageFont

    from cnclip.app.fonts import find_cjk_font

    font_file = find_cjk_font()
    assert font_file is not None, "no CJK font: the set-up installs fonts-wqy-zenhei (see README)"
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(background, np.float32) + rng.normal(0, 6, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(str(font_file), font_size)
    for i, line in enumerate(lines):
        draw.text((size[0] // 12, size[1] // 6 + i * font_size * 2), line, font=font, fill=(24, 24, 24))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def eventually(condition, what: str, timeout: float):
    """Poll `condition` until it returns something true (returned), failing after `timeout` seconds:
    for what happens on another thread or process, without a sleep of fixed length."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def indexed_vectors(index_dir) -> dict[str, np.ndarray]:
    """Path -> stored vector of every searchable file in the index at `index_dir`."""
    import cnclip

    with cnclip.Index.open(index_dir) as index:
        ids, vectors = next(index.catalog.file_vectors())
        records = index.catalog.files_by_ids(ids)
        return {records[i].path: v for i, v in zip(ids.tolist(), vectors, strict=True)}


def record_builds(monkeypatch, cls, name: str) -> list:
    """Wrap the classmethod `cls.name` so each call appends its `total` keyword to the returned list."""
    builds = []
    real = getattr(cls, name).__func__

    def counting(klass, *args, **kwargs):
        builds.append(kwargs.get("total"))
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, name, classmethod(counting))
    return builds


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Exported ONNX towers go to a per-run folder, not the user's ~/.cache (subprocesses inherit it)."""
    os.environ["CNCLIP_CACHE"] = str(tmp_path_factory.mktemp("cnclip-cache"))
    # and an index made without --index goes to a per-run data folder, not ~/.local/share/cnclip
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    os.environ.pop("CNCLIP_INDEX", None)
    # The suite makes the same choices on every CPU: "auto" would measure bf16 per model on AMX
    # machines and compare with fp32 numbers elsewhere. Tests of the bf16 paths set it to 1
    # themselves, and `CNCLIP_CPU_BF16=1 pytest` runs the whole suite as an AMX machine would.
    os.environ.setdefault("CNCLIP_CPU_BF16", "0")
    # Reading words costs ~0.1-0.4 s a picture even where a picture has none; the tests about words
    # (tests/model/test_ocr.py, tests/index/test_words*.py, tests/app/test_words_cli.py) turn it
    # on with CNCLIP_OCR=1 or --ocr-only; the others index as `--no-ocr` would.
    os.environ["CNCLIP_OCR"] = "0"


@pytest.fixture(scope="session")
def tiny_vit():
    import cnclip

    torch.manual_seed(0)
    return cnclip.create_model("tiny-vit")


@pytest.fixture(scope="session")
def tiny_vit_encoder(tiny_vit):
    """tiny_vit run as it is (PyTorch fp32 on the CPU)."""
    from cnclip.model.encoder import Encoder

    return Encoder.build(tiny_vit)


@pytest.fixture(scope="session")
def tiny_rn():
    import cnclip

    torch.manual_seed(0)
    return cnclip.create_model("tiny-rn")


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """tiny-vit (seed 3) saved as a model folder, for the real CLI's `--model`."""
    import cnclip

    torch.manual_seed(3)
    return cnclip.create_model("tiny-vit").save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def model_dir(tiny_vit_dir):
    """The model folder the CLI, serve and watch tests pass as --model: one for the whole run, so
    that its ONNX export is made once."""
    return tiny_vit_dir


@pytest.fixture
def images():
    return random_images(4)


def run_cli(
    *args: str, cwd=None, env: dict[str, str | None] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The real `cnclip` in a subprocess, offline; `env` adds variables, and a None value removes one
    (e.g. HF_HUB_OFFLINE for a test that serves weights on 127.0.0.1)."""
    merged = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    env = {k: v for k, v in merged.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "cnclip", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def write_video(path, scenes, seconds_each: int = 4, fps: int = 6, size=(96, 64), gop_seconds: int = 2, bit_rate=None):
    """A short MPEG-4 video (PyAV): `seconds_each` seconds of each scene in turn, a key frame every
    `gop_seconds`; a scene is a colour (with a lattice of its complement) or a PIL picture. Returns `path`."""
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.gop_size = fps * gop_seconds
    if bit_rate is not None:
        stream.bit_rate = bit_rate  # enough for words in the frames to stay legible
    for scene in scenes:
        if isinstance(scene, Image.Image):
            frame = np.asarray(scene.convert("RGB").resize(size))
        else:
            frame = np.full((size[1], size[0], 3), scene, np.uint8)
            frame[::5, ::7] = 255 - np.array(scene, np.uint8)  # texture, so frames are more than a mean colour
        for _ in range(seconds_each * fps):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path
