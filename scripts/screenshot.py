"""The README's picture of the search page: the real `cnclip serve` in headless Chromium.

Draws a folder of coloured-shape scenes (tests/synthetic.py; nothing downloaded), indexes it with a
tiny model with random weights, starts `cnclip serve --port 0` in a subprocess, types a Chinese
query into the page, waits for the thumbnails and saves a PNG. The model is random, so the ranking
means nothing; the picture shows what the page looks like, not how well it finds things.

    .venv/bin/python scripts/screenshot.py                      # writes scripts/search-page.png
    .venv/bin/python scripts/screenshot.py --out /tmp/page.png --query 海边的日落

Needs Chromium and chromedriver (the README's set-up command installs them; `$CNCLIP_CHROMIUM` and
`$CNCLIP_CHROMEDRIVER` override the defaults `chromium` and `/usr/bin/chromedriver`) and
fonts-wqy-zenhei for readable Chinese.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from synthetic import SCENES, caption, draw_scene  # noqa: E402  (the tests' toy world)

LOADED_THUMBS = """
const imgs = Array.from(document.querySelectorAll('#results img'));
return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;
"""


def make_photos(folder: Path, n: int, seed: int) -> None:
    """`n` scenes, each saved under its own Chinese caption, e.g. `两个红色的圆形在左边.png`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in rng.permutation(len(SCENES))[:n]:
        scene = SCENES[int(i)]
        draw_scene(scene, rng, size=192).save(folder / f"{caption(scene)}.png")


def build_index(base: Path, photos: Path, seed: int) -> Path:
    import torch

    import cnclip

    torch.manual_seed(seed)
    model = cnclip.create_model("tiny-vit").save_pretrained(base / "model")
    with cnclip.Index.open(base / "idx", model=str(model), create=True) as index:
        index.add_folder(photos)
    return base / "idx"


def start_server(index: Path) -> tuple[subprocess.Popen, str]:
    """`cnclip serve --port 0` on loopback without a token; returns the process and its URL."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CNCLIP_TOKEN="")
    command = [sys.executable, "-m", "cnclip", "serve", "--index", str(index), "--port", "0"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r" at (http://\S+/)", line)
        if found:
            return proc, found.group(1)
    proc.wait()
    sys.exit("cnclip serve did not start:\n" + "".join(lines))


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    binary = os.environ.get("CNCLIP_CHROMIUM") or "chromium"
    options.binary_location = shutil.which(binary) or binary  # Chrome's driver wants a path, not a name
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--lang=zh-CN"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver_path = os.environ.get("CNCLIP_CHROMEDRIVER") or "/usr/bin/chromedriver"
    return webdriver.Chrome(options=options, service=Service(driver_path))


def wait(driver, condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def shoot(url: str, query: str, width: int, height: int) -> Image.Image:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser(width, height)
    try:
        driver.get(url)
        wait(driver, lambda d: "索引共" in d.find_element(By.ID, "info").text, "the index summary")
        driver.find_element(By.ID, "q").send_keys(query, Keys.ENTER)
        wait(driver, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails")
        wait(driver, lambda d: "找到" in d.find_element(By.ID, "status").text, "the result count")
        time.sleep(0.3)  # let the last thumbnails paint
        return Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    finally:
        driver.quit()


def save_small(shot: Image.Image, out: Path, width: int, limit: int) -> int:
    """Resize to `width` px and save as a 256-colour PNG if the full-colour one is over `limit` bytes."""
    if shot.width > width:
        shot = shot.resize((width, round(shot.height * width / shot.width)), Image.Resampling.LANCZOS)
    data = io.BytesIO()
    shot.save(data, "PNG", optimize=True)
    if data.tell() > limit:
        data = io.BytesIO()
        shot.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(data, "PNG", optimize=True)
    out.write_bytes(data.getvalue())
    return len(data.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "search-page.png")
    parser.add_argument("--query", default="红色的三角形")
    parser.add_argument("--photos", type=int, default=12, help="how many generated scenes to index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", default="1200x760", help="browser window, WIDTHxHEIGHT")
    parser.add_argument("--width", type=int, default=1000, help="width of the saved PNG")
    parser.add_argument("--max-bytes", type=int, default=300_000)
    args = parser.parse_args()
    width, height = (int(v) for v in args.window.split("x"))

    with tempfile.TemporaryDirectory(prefix="cnclip-screenshot-") as tmp:
        base = Path(tmp)
        make_photos(base / "照片", args.photos, args.seed)
        index = build_index(base, base / "照片", args.seed)
        proc, url = start_server(index)
        try:
            shot = shoot(url, args.query, width, height)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    size = save_small(shot, args.out, args.width, args.max_bytes)
    print(f"wrote {args.out} ({shot.width}x{shot.height} px shot, {size:,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
