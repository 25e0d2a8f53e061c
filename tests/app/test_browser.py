"""The search page in a real browser: headless Chromium (the system's, driven by Selenium) against the
real `cnclip serve` command in a subprocess. Screenshots go to tests/artifacts/browser/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import random_images

import cnclip

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
TOKEN = "browser-test-token"
INSTALL = (
    "install Chromium and its driver: apt-get install -y chromium chromium-driver fonts-wqy-zenhei "
    "(the README set-up command does this), or point $CNCLIP_CHROMIUM and $CNCLIP_CHROMEDRIVER at them"
)


def _find(env: str, names: tuple[str, ...]) -> str | None:
    """The program named by $env (if it exists), else the first of `names` on PATH."""
    if os.environ.get(env):
        return shutil.which(os.environ[env])
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[dev]'")
    binary = _find("CNCLIP_CHROMIUM", ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))
    driver_path = _find("CNCLIP_CHROMEDRIVER", ("chromedriver",))
    if binary is None or driver_path is None:
        pytest.fail(f"no {'Chromium' if binary is None else 'chromedriver'} found; {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--lang=zh-CN"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`cnclip serve --port 0 --token ...` on a fresh index of 12 photos; yields (base URL, photo folder)."""
    base = tmp_path_factory.mktemp("browser")
    photos = base / "照片"
    photos.mkdir()
    for i, image in enumerate(random_images(12, seed=21, size=(160, 120))):
        image.save(photos / f"海边{i:02d}.jpg", quality=90)
    yield from _serve(base, photos, seed=1)


def _serve(base: Path, photos: Path, seed: int, words: bool = False) -> Iterator[tuple[str, Path]]:
    """Index `photos` with a tiny random model (seed `seed`), reading their words if `words`, and
    run the real `cnclip serve` on it with a token; yields (base URL, photos) and stops the server afterwards."""
    import torch

    torch.manual_seed(seed)
    model = cnclip.create_model("tiny-vit").save_pretrained(base / "model")
    with cnclip.Index.open(base / "idx", model=str(model), create=True) as index:
        index.add_folder(photos)
        if words:
            index.read_words()
    env = dict(os.environ, HF_HUB_OFFLINE="1", CNCLIP_TOKEN="")
    command = [sys.executable, "-m", "cnclip", "serve", "--index", str(base / "idx"), "--port", "0"]
    proc = subprocess.Popen([*command, "--token", TOKEN], stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield _wait_for_url(proc), photos
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_for_url(proc: subprocess.Popen) -> str:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        found = re.search(r"at (http://\S+?/)\?token=", line)
        if found:
            # keep reading stderr, so that a chatty server never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return found.group(1)
    pytest.fail("cnclip serve did not start:\n" + "".join(lines))


def _wait(driver, condition, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.1)
    _shot(driver, "failed")
    pytest.fail(f"timed out waiting for {what}; page status: {driver.find_element('id', 'status').text!r}")


def _shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


LOADED_THUMBS = """
const imgs = Array.from(document.querySelectorAll('#results img'));
return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;
"""


def test_search_page_text_lightbox_and_image_search(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, photos = server
    browser.get(f"{url}?token={TOKEN}")  # sets the token cookie and drops it from the address bar
    assert browser.current_url == url
    _wait(browser, lambda d: "索引共 12 张图片" in d.find_element(By.ID, "info").text, "the index summary")

    box = browser.find_element(By.ID, "q")
    box.send_keys("海边的日落", Keys.ENTER)
    assert _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails") == 12
    status = browser.find_element(By.ID, "status").text
    assert "找到 12 张图片" in status and "毫秒" in status, status
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .score")) == 12
    _shot(browser, "1-text-search")

    browser.find_element(By.CSS_SELECTOR, "#results .hit button").click()
    big = "const i = document.getElementById('lightbox-img'); return i.complete && i.naturalWidth > 0;"
    _wait(browser, lambda d: d.find_element(By.ID, "lightbox").is_displayed() and d.execute_script(big), "lightbox")
    assert browser.execute_script("return document.getElementById('lightbox-img').naturalWidth") == 160
    _shot(browser, "2-lightbox")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _wait(browser, lambda d: not d.find_element(By.ID, "lightbox").is_displayed(), "the lightbox to close")

    query = photos / "海边07.jpg"
    browser.find_element(By.ID, "file").send_keys(str(query))
    _wait(browser, lambda d: "以图搜图：找到" in d.find_element(By.ID, "status").text, "image search results")
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails of the image search")
    first = browser.find_element(By.CSS_SELECTOR, "#results .hit .name").text
    assert first == query.name
    _shot(browser, "3-image-search")

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors  # no script errors, no blocked (CSP) loads, no failed requests


def test_page_without_token_asks_for_it(browser, server):
    from selenium.webdriver.common.by import By

    url, _ = server
    browser.delete_all_cookies()
    browser.get(url)
    _wait(browser, lambda d: d.find_element(By.ID, "token-form").is_displayed(), "the token prompt")
    assert "token" in browser.find_element(By.ID, "error").text
    _shot(browser, "4-token-prompt")
    browser.find_element(By.ID, "token").send_keys(TOKEN + "\n")
    _wait(browser, lambda d: "索引共 12 张图片" in d.find_element(By.ID, "info").text, "the page after the token")
    _shot(browser, "5-after-token")


# Builds a File from one of the page's own thumbnails and hands it over as a drop or a paste would.
HAND_OVER = """
const [kind, done] = arguments;
const hit = document.querySelector('#results .hit img');
fetch(hit.src).then(r => r.blob()).then(blob => {
  const data = new DataTransfer();
  data.items.add(new File([blob], kind + '.jpg', {type: 'image/jpeg'}));
  const event = kind === 'drop'
    ? new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true})
    : new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
  document.body.dispatchEvent(event);
  done(hit.alt);
});
"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_dropped_or_pasted_image_searches_by_image(browser, server, kind):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    browser.get(f"{url}?token={TOKEN}")
    browser.find_element(By.ID, "q").send_keys("日落", Keys.ENTER)
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails")
    name = browser.execute_async_script(HAND_OVER, kind)
    _wait(browser, lambda d: "以图搜图：找到" in d.find_element(By.ID, "status").text, f"results of the {kind}")
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails")
    assert browser.find_element(By.CSS_SELECTOR, "#results .hit .name").text == name  # a thumbnail finds its photo
    _shot(browser, f"6-{kind}")


def _combined_names(photos: Path, terms: list[tuple]) -> list[str]:
    """File names of the library's own combined search on the served index, best first."""
    from cnclip.index.query import Term

    with cnclip.Index.open(photos.parent / "idx") as index:
        return [Path(h.path).name for h in index.search_combined([Term(*t) for t in terms], k=20)]


def test_minus_field_and_more_like_this_combine_with_the_text(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, photos = server
    browser.get_log("browser")  # drop what earlier tests left (the token prompt's 401s)
    browser.get(f"{url}?token={TOKEN}")
    _wait(browser, lambda d: "索引共 12 张图片" in d.find_element(By.ID, "info").text, "the index summary")
    browser.find_element(By.ID, "not").send_keys("人群，城市")
    browser.find_element(By.ID, "q").send_keys("海边的日落", Keys.ENTER)
    status = "“海边的日落” 不要“人群” 不要“城市”：找到 12 张图片"
    _wait(browser, lambda d: status in d.find_element(By.ID, "status").text, "the search minus two texts")
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails")
    minus = [("text", "海边的日落"), ("text", "人群", -1.0), ("text", "城市", -1.0)]
    shown = [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
    assert shown == _combined_names(photos, minus)
    _shot(browser, "8-minus")

    liked = shown[2]
    browser.find_elements(By.CSS_SELECTOR, "#results .like")[2].click()
    _wait(browser, lambda d: "更像这张：找到 11 张图片" in d.find_element(By.ID, "status").text, "more like this")
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails")
    with cnclip.Index.open(photos.parent / "idx") as index:
        liked_id = index.catalog.file_id_for_path(str(photos / liked))
    shown = [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
    assert shown == _combined_names(photos, [*minus, ("file", liked_id)]) and liked not in shown
    _shot(browser, "9-more-like-this")

    browser.get(browser.current_url)  # the address keeps the minus texts: a reload searches the same
    _wait(browser, lambda d: status in d.find_element(By.ID, "status").text, "the reloaded search")
    assert browser.find_element(By.ID, "not").get_attribute("value") == "人群，城市"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


@pytest.fixture(scope="module")
def dupes_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`cnclip serve` on an index of 5 photos plus byte-identical copies of two of them (3 files and 2)."""
    base = tmp_path_factory.mktemp("browser-dupes")
    photos = base / "照片"
    (photos / "备份").mkdir(parents=True)
    for i, image in enumerate(random_images(5, seed=23, size=(160, 120))):
        image.save(photos / f"旅行{i}.jpg", quality=90)
    for name in ("旅行1.jpg", "旅行3.jpg"):
        shutil.copyfile(photos / name, photos / "备份" / name)
    shutil.copyfile(photos / "旅行1.jpg", photos / "备份" / "旅行1 副本.jpg")
    yield from _serve(base, photos, seed=2)


def test_dupes_view_shows_groups_best_copy_first_and_opens_the_lightbox(browser, dupes_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, photos = dupes_server
    browser.get(f"{url}?token={TOKEN}")
    _wait(browser, lambda d: "索引共 8 张图片" in d.find_element(By.ID, "info").text, "the index summary")
    browser.find_element(By.ID, "dupes-button").click()
    _wait(browser, lambda d: "重复照片：" in d.find_element(By.ID, "status").text, "the duplicate groups")
    # a random tiny model may also find other photos alike at 0.95; the copies group whatever the model
    assert _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails of the groups") >= 5
    groups = browser.find_elements(By.CSS_SELECTOR, "#results .dupe-group")
    heads = [g.find_element(By.TAG_NAME, "h2").text for g in groups]
    assert len(groups) >= 2 and heads[0].startswith("第 1 组："), heads
    names = [[n.text.split(" ", 1)[1] for n in g.find_elements(By.CSS_SELECTOR, ".name")] for g in groups]
    assert any({"旅行1.jpg", "旅行1 副本.jpg"} <= set(group) for group in names), names
    assert any("旅行3.jpg" in group for group in names), names
    for group in groups:  # the best copy, and only it, is marked
        marks = [s.text for s in group.find_elements(By.CSS_SELECTOR, ".score")]
        assert marks[0] == "最佳" and "最佳" not in marks[1:], marks
    assert "160×120" in groups[0].find_element(By.CSS_SELECTOR, ".name").text
    _shot(browser, "7-dupes")

    groups[0].find_elements(By.CSS_SELECTOR, ".hit button")[1].click()
    big = "const i = document.getElementById('lightbox-img'); return i.complete && i.naturalWidth > 0;"
    _wait(browser, lambda d: d.find_element(By.ID, "lightbox").is_displayed() and d.execute_script(big), "lightbox")
    assert browser.find_element(By.ID, "lightbox-caption").text.endswith(names[0][1])
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _wait(browser, lambda d: not d.find_element(By.ID, "lightbox").is_displayed(), "the lightbox to close")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_filter_fields_limit_every_search_and_stay_in_the_address(browser, dupes_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, photos = dupes_server
    browser.get_log("browser")
    browser.get(f"{url}?token={TOKEN}")
    _wait(browser, lambda d: "索引共 8 张图片" in d.find_element(By.ID, "info").text, "the index summary")
    browser.find_element(By.ID, "in").send_keys("备份")
    browser.find_element(By.ID, "q").send_keys("旅行的照片", Keys.ENTER)
    _wait(browser, lambda d: "找到 3 张图片" in d.find_element(By.ID, "status").text, "the search in one folder")
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails")
    paths = [e.get_attribute("title") or e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
    assert sorted(paths) == ["旅行1 副本.jpg", "旅行1.jpg", "旅行3.jpg"], paths
    _shot(browser, "11-filter-folder")

    browser.find_element(By.ID, "file").send_keys(str(photos / "旅行0.jpg"))  # image search, same filter
    _wait(browser, lambda d: "以图搜图：找到 3 张图片" in d.find_element(By.ID, "status").text, "filtered image search")

    browser.execute_script("document.getElementById('after').value = '2099-01'")  # taken from 2099 on: none
    browser.find_element(By.ID, "q").send_keys(Keys.ENTER)
    _wait(browser, lambda d: "没有找到图片" in d.find_element(By.ID, "status").text, "an empty filtered search")
    assert "after=2099-01" in browser.current_url and "in=" in browser.current_url
    browser.get(browser.current_url)  # a reload keeps the filters and searches the same
    _wait(browser, lambda d: "没有找到图片" in d.find_element(By.ID, "status").text, "the reloaded search")
    assert browser.find_element(By.ID, "in").get_attribute("value") == "备份"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


@pytest.fixture(scope="module")
def video_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`cnclip serve` on an index of one generated video (red, green, blue: 4 s each) and two photos."""
    from conftest import write_video

    base = tmp_path_factory.mktemp("browser-video")
    photos = base / "视频"
    photos.mkdir()
    write_video(photos / "旅行.mp4", [(200, 30, 30), (30, 200, 30), (30, 30, 200)], seconds_each=4)
    for i, image in enumerate(random_images(2, seed=25, size=(160, 120))):
        image.save(photos / f"照片{i}.jpg", quality=90)
    yield from _serve(base, photos, seed=3)


def test_a_video_result_shows_its_moment_and_the_lightbox_plays_from_there(browser, video_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    url, photos = video_server
    browser.get_log("browser")
    browser.get(f"{url}?token={TOKEN}")
    _wait(browser, lambda d: "索引共 2 张图片、1 个视频" in d.find_element(By.ID, "info").text, "the index summary")
    Select(browser.find_element(By.ID, "kind")).select_by_value("video")  # the kind filter: videos only
    browser.find_element(By.ID, "q").send_keys("视频", Keys.ENTER)
    _wait(browser, lambda d: "找到 1 张图片" in d.find_element(By.ID, "status").text, "the video alone")
    assert "kind=video" in browser.current_url
    Select(browser.find_element(By.ID, "kind")).select_by_value("")
    browser.find_element(By.ID, "q").send_keys(Keys.ENTER)
    _wait(browser, lambda d: "找到 3 张图片" in d.find_element(By.ID, "status").text, "results: a video, two photos")
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails, the video's from its frame")
    names = [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
    video_at = next(i for i, name in enumerate(names) if name.endswith("旅行.mp4"))
    assert re.fullmatch(r"▶ 0:0[048] 旅行\.mp4", names[video_at]), names
    browser.find_elements(By.CSS_SELECTOR, "#results .hit > button")[video_at].click()
    _wait(browser, lambda d: d.find_element(By.ID, "lightbox-video").is_displayed(), "the video in the lightbox")
    src = browser.find_element(By.ID, "lightbox-video").get_attribute("src")
    assert re.search(r"/api/image/\d+#t=[048](\.0)?$", src), src
    assert not browser.find_element(By.ID, "lightbox-img").is_displayed()
    _shot(browser, "12-video")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _wait(browser, lambda d: not d.find_element(By.ID, "lightbox").is_displayed(), "the lightbox to close")
    assert browser.find_element(By.ID, "lightbox-video").get_attribute("src") in (None, "")


# -- the page on a phone: 390×844 CSS pixels, 3 device pixels each, touch events (Chrome DevTools Protocol) --
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True}
SIDEWAYS = "return document.documentElement.scrollWidth"
BIG = "const i = document.getElementById('lightbox-img'); return i.complete && i.naturalWidth > 0;"
# The number of results once those on screen have their thumbnails (the others load lazily, when scrolled to).
ON_SCREEN_THUMBS = """
const imgs = Array.from(document.querySelectorAll('#results img'));
const seen = imgs.filter(i => { const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; });
return seen.length > 0 && seen.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;
"""


def _touch(driver, kind: str, x: float = 0, y: float = 0) -> None:
    """One touch event at (x, y) CSS pixels of the viewport; touchEnd lifts the finger where it last was."""
    points = [] if kind == "touchEnd" else [{"x": x, "y": y}]
    driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})


def _tap_at(driver, x: float, y: float) -> None:
    _touch(driver, "touchStart", x, y)
    _touch(driver, "touchEnd")


def _box(driver, element) -> dict:
    """`element`'s box in the viewport, CSS pixels: left, top, right, bottom, width, height."""
    return driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", element)


def _tap(driver, element) -> None:
    """Scroll `element` into view and tap its middle, as a finger would (the browser makes the click)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    box = _box(driver, element)
    _tap_at(driver, box["left"] + box["width"] / 2, box["top"] + box["height"] / 2)


def _swipe(driver, x0: float, x1: float, y: float) -> None:
    _touch(driver, "touchStart", x0, y)
    for step in range(1, 6):
        _touch(driver, "touchMove", x0 + (x1 - x0) * step / 5, y)
    _touch(driver, "touchEnd")


@pytest.fixture
def phone(browser, server):
    """The browser as a phone with touch, on the page after a text search; yields the result names in order."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    browser.get_log("browser")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
    try:
        browser.get(f"{url}?token={TOKEN}")
        _wait(browser, lambda d: "索引共 12 张图片" in d.find_element(By.ID, "info").text, "the index summary")
        assert browser.execute_script("return innerWidth") == 390
        browser.find_element(By.ID, "q").send_keys("海边的日落", Keys.ENTER)
        assert _wait(browser, lambda d: d.execute_script(ON_SCREEN_THUMBS), "thumbnails on screen") == 12
        yield [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_on_a_phone_the_lightbox_opens_by_tap_swipes_and_closes_by_tap(browser, phone):
    from selenium.webdriver.common.by import By

    names = phone
    hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit > button")
    caption = browser.find_element(By.ID, "lightbox-caption")
    _tap(browser, hits[0])
    _wait(browser, lambda d: d.find_element(By.ID, "lightbox").is_displayed() and d.execute_script(BIG), "lightbox")
    assert caption.text.endswith(names[0])
    figure = _box(browser, browser.find_element(By.CSS_SELECTOR, "#lightbox figure"))
    middle = figure["top"] + figure["height"] / 2
    _swipe(browser, 320, 70, middle)  # to the left: the next photo
    _wait(browser, lambda d: caption.text.endswith(names[1]) and d.execute_script(BIG), "the next photo")
    _shot(browser, "phone-lightbox")
    _swipe(browser, 70, 320, middle)
    _wait(browser, lambda d: caption.text.endswith(names[0]), "the photo before, after a swipe right")
    _tap_at(browser, 195, figure["top"] / 2)  # above the photo, on the dark backdrop
    _wait(browser, lambda d: not d.find_element(By.ID, "lightbox").is_displayed(), "a tap outside to close it")
    _tap(browser, hits[1])
    _wait(browser, lambda d: caption.text.endswith(names[1]), "the lightbox on the second photo")
    _tap(browser, browser.find_element(By.ID, "lightbox-close"))
    _wait(browser, lambda d: not d.find_element(By.ID, "lightbox").is_displayed(), "the close button to close it")


# How many results are on screen (in the viewport) and how many of those the footer covers.
UNDER_FOOTER = """
const foot = document.getElementById('info').getBoundingClientRect();
const shown = Array.from(document.querySelectorAll('#results .hit'), h => h.getBoundingClientRect())
  .filter(r => r.bottom > 0 && r.top < innerHeight);
return [shown.length, shown.filter(r => r.bottom > foot.top && r.top < foot.bottom).length];
"""


def test_on_a_phone_results_are_a_grid_of_squares_that_the_footer_never_covers(browser, phone):
    from selenium.webdriver.common.by import By

    assert browser.execute_script(SIDEWAYS) <= 390  # nothing scrolls sideways
    hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit > button")
    boxes = [_box(browser, h) for h in hits]
    in_first_row = [b for b in boxes if abs(b["top"] - boxes[0]["top"]) < 1]
    assert len(in_first_row) >= 2 and boxes[1]["left"] >= boxes[0]["right"], boxes[:3]
    assert all(abs(b["width"] - b["height"]) <= 1 for b in boxes), boxes[0]
    shown, covered = browser.execute_script(UNDER_FOOTER)
    assert shown > 0 and covered == 0, (shown, covered)
    _shot(browser, "phone-search")
    browser.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")
    shown, covered = browser.execute_script(UNDER_FOOTER)
    last = _box(browser, hits[-1])["bottom"]
    assert shown > 0 and covered == 0 and last <= 844, (shown, covered, last)


# Whether each filter label stays on one line (its box is less than two lines of its font tall).
ONE_LINE = """
return Array.from(document.querySelectorAll('#filters label'),
  l => l.getBoundingClientRect().height < 2 * parseFloat(getComputedStyle(l).fontSize));
"""


def test_on_a_phone_the_filters_fold_behind_one_button_that_counts_them(browser, phone):
    from selenium.webdriver.common.by import By

    toggle = browser.find_element(By.ID, "filters-toggle")
    count = browser.find_element(By.ID, "filters-count")
    assert not browser.find_element(By.ID, "filters").is_displayed()
    assert toggle.is_displayed() and toggle.text == "筛选" and not count.is_displayed()
    _tap(browser, toggle)
    _wait(browser, lambda d: d.find_element(By.ID, "filters").is_displayed(), "the filters after a tap")
    assert toggle.get_attribute("aria-expanded") == "true"
    assert all(browser.execute_script(ONE_LINE)), "a filter label wraps"
    browser.find_element(By.ID, "camera").send_keys("iPhone")
    assert count.is_displayed() and count.text == "1"
    assert browser.execute_script(SIDEWAYS) <= 390
    _shot(browser, "phone-filters")
    _tap(browser, toggle)
    _wait(browser, lambda d: not d.find_element(By.ID, "filters").is_displayed(), "the filters to fold again")
    assert toggle.get_attribute("aria-expanded") == "false" and count.text == "1"


@pytest.fixture(scope="module")
def words_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """Six photos, two with 发票 written on them, their words read before serving."""
    from conftest import word_photo

    base = tmp_path_factory.mktemp("browser-words")
    photos = base / "照片"
    word_photo(photos / "发票.png", ["增值税普通发票"])
    word_photo(photos / "号码.png", ["發票號碼 2024"], seed=1)
    word_photo(photos / "快递.png", ["请凭取件码领取"], seed=2)
    for i, image in enumerate(random_images(3, seed=23, size=(160, 120))):
        image.save(photos / f"风景{i}.jpg", quality=90)
    yield from _serve(base, photos, seed=2, words=True)


def test_photos_found_by_their_words_show_them_marked(browser, words_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    url, _ = words_server
    browser.get_log("browser")
    browser.get(f"{url}?token={TOKEN}")
    _wait(browser, lambda d: "索引共 6 张图片（3 张有文字）" in d.find_element(By.ID, "info").text, "the index summary")
    browser.find_element(By.ID, "q").send_keys("发票", Keys.ENTER)
    _wait(browser, lambda d: "找到 6 张图片" in d.find_element(By.ID, "status").text, "the search")
    _wait(browser, lambda d: d.execute_script(LOADED_THUMBS), "thumbnails")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
    assert sorted(names[:2]) == ["发票.png", "号码.png"], names  # the photos with the words come first
    lines = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .words")]
    marks = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .words mark")]
    assert sorted(lines) == ["增值税普通发票", "發票號碼 2024"] and marks.count("发票") == 1 and "發票" in marks
    _shot(browser, "14-words")

    # the big photo shows every line read in it, the match marked, and copies them
    first = names.index("发票.png")
    browser.find_elements(By.CSS_SELECTOR, "#results .hit button:not(.like)")[first].click()
    _wait(browser, lambda d: d.find_element(By.ID, "lightbox-words").is_displayed(), "the words under the photo")
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#lightbox-lines li")] == ["增值税普通发票"]
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#lightbox-lines mark")] == ["发票"]
    # and over the photo, a box where the matched line is (drawn at x=53, y=80 of 640×480, 40 px high)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lightbox-boxes polygon"), "the box over the words")
    where = browser.execute_script(
        "const i = document.getElementById('lightbox-img').getBoundingClientRect();"
        "const b = document.querySelector('#lightbox-boxes polygon').getBoundingClientRect();"
        "return [(b.left - i.left) / i.width, (b.top - i.top) / i.height, b.width / i.width, b.height / i.height];"
    )
    left, top, width, height = where
    assert abs(left - 53 / 640) < 0.04 and abs(top - 80 / 480) < 0.05, where
    assert 0.35 < width < 0.6 and 0.06 < height < 0.2, where
    _shot(browser, "15-words-lightbox")
    browser.find_element(By.ID, "lightbox-copy").click()
    copied = "return document.getElementById('lightbox-copy').textContent"
    _wait(browser, lambda d: d.execute_script(copied) != "复制文字", "the copy")
    if browser.execute_script(copied) != "已复制":  # no clipboard for this page: the lines are selected
        assert browser.execute_script("return window.getSelection().toString()").strip() == "增值税普通发票"
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _wait(browser, lambda d: not d.find_element(By.ID, "lightbox").is_displayed(), "the lightbox to close")
    # a photo without words shows none
    plain = next(i for i, name in enumerate(names) if name.startswith("风景"))
    browser.find_elements(By.CSS_SELECTOR, "#results .hit button:not(.like)")[plain].click()
    _wait(browser, lambda d: d.find_element(By.ID, "lightbox").is_displayed(), "the lightbox")
    time.sleep(0.5)  # its (empty) words have come back by now
    assert not browser.find_element(By.ID, "lightbox-words").is_displayed()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)

    Select(browser.find_element(By.ID, "words")).select_by_value("only")
    browser.find_element(By.ID, "q").send_keys(Keys.ENTER)
    _wait(browser, lambda d: "找到 2 张图片" in d.find_element(By.ID, "status").text, "the words-only search")
    assert "words=only" in browser.current_url
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
