"""Zoo weights from the hub, ModelScope, URL templates and folders: resumed, verified, cached.

Every source is imitated by a server on 127.0.0.1 that answers in that source's URL layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import logging
import random
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import random_images, run_cli
from reference import official_model, save_official_checkpoint

import cnclip
from cnclip.errors import CheckpointError, ModelNotFoundError
from cnclip.model import checkpoint, download
from cnclip.model.config import get_model_config
from cnclip.model.transform import ImageTransform

FILE = "clip_cn_tiny.pt"
HUB_PATH = f"/OFA-Sys/chinese-clip-tiny/resolve/main/{FILE}"
MODELSCOPE_PATH = f"/api/v1/models/AI-ModelScope/chinese-clip-tiny/repo?Revision=master&FilePath={FILE}"
VIT_B_16 = "clip_cn_vit-b-16.pt"


def _config(**fields) -> cnclip.ModelConfig:
    """tiny-vit as if it were published: a hub repo, a ModelScope repo and an official file name."""
    return dataclasses.replace(
        get_model_config("tiny-vit"),
        name="tiny-dl",
        hub_repo="OFA-Sys/chinese-clip-tiny",
        modelscope_repo="AI-ModelScope/chinese-clip-tiny",
        official_file=FILE,
        **fields,
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> bytes:
    """An official-format checkpoint of the tiny-vit shape, as bytes."""
    path = tmp_path_factory.mktemp("official") / FILE
    return save_official_checkpoint(official_model(get_model_config("tiny-vit")), path).read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cnclip cache, the network allowed (to 127.0.0.1 only: no proxy), no source configured."""
    monkeypatch.setenv("CNCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("CNCLIP_WEIGHTS_SOURCE", "HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    return tmp_path / "cache" / "weights"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        site = self.server.site
        site.requests.append((self.path, self.headers.get("Range")))
        site.if_ranges.append(self.headers.get("If-Range"))
        if self.path in site.redirects:
            self.send_response(302)
            self.send_header("Location", site.redirects[self.path])
            for name, value in site.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = site.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        etag = f'"{hashlib.sha1(body).hexdigest()[:12]}"'  # a new version of the file has a new ETag
        start, wanted = 0, self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and not site.ignore_range and (if_range in (None, etag) or not site.honour_if_range):
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = max(0, start - site.shift)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if site.etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if site.drops:  # announce the whole body, send half of it, hang up
            site.drops -= 1
            payload = payload[: len(payload) // 2]
            self.close_connection = True
        site.sent.append(len(payload))
        with contextlib.suppress(ConnectionError):  # a client stopped on purpose
            self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@dataclasses.dataclass
class Site:
    url: str
    files: dict[str, bytes]
    redirects: dict[str, str] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # sent with redirects
    drops: int = 0  # this many responses stop half-way
    ignore_range: bool = False
    etag: bool = True  # send an ETag (a digest of the body)
    honour_if_range: bool = True  # False: answer a Range with 206 whatever If-Range says
    shift: int = 0  # a 206 starts this many bytes before the offset asked for
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)  # (path, Range header)
    if_ranges: list[str | None] = dataclasses.field(default_factory=list)  # each request's If-Range header
    sent: list[int] = dataclasses.field(default_factory=list)  # body bytes of each file answer


@contextlib.contextmanager
def serve(files: dict[str, bytes] | None = None, **options) -> Iterator[Site]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.site = Site(f"http://127.0.0.1:{server.server_address[1]}", dict(files or {}), **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.site
    finally:
        server.shutdown()
        server.server_close()


def dead_url() -> str:
    """An address on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"
    return text


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*") if not p.name.endswith(".lock")) if folder.exists() else []


# -- the sources ----------------------------------------------------------------------------------------


def test_from_the_hub_layout_then_offline_from_the_cache(cache, weights, monkeypatch):
    seen = []
    with serve({HUB_PATH: weights}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")  # a trailing slash, as mirror instructions often have
        path = download.fetch_official(_config(), "hf", progress=lambda done, total: seen.append((done, total)))
    assert path == cache / FILE and path.read_bytes() == weights
    assert hub.requests == [(HUB_PATH, None)]
    assert seen[-1] == (len(weights), len(weights)) and all(t == len(weights) for _, t in seen)
    assert _left_in(cache) == [FILE]  # no .part left behind
    # the server is gone: the cached file is used without asking anyone
    assert download.fetch_official(_config(), "hf") == path


def test_from_the_modelscope_layout(cache, weights, monkeypatch):
    with serve({MODELSCOPE_PATH: weights}) as modelscope:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", modelscope.url)
        monkeypatch.setenv("CNCLIP_WEIGHTS_SOURCE", "modelscope")
        assert download.fetch_official(_config()).read_bytes() == weights
    assert modelscope.requests == [(MODELSCOPE_PATH, None)]


def test_modelscope_host_from_the_modelscope_packages_own_setting(monkeypatch):
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "mirror.example.cn")
    (source,) = download.parse_sources("modelscope")
    assert source.locate(_config()) == "https://mirror.example.cn" + MODELSCOPE_PATH
    monkeypatch.delenv("MODELSCOPE_DOMAIN")
    (source,) = download.parse_sources("ms")
    assert source.locate(_config()) == "https://www.modelscope.cn" + MODELSCOPE_PATH


def test_url_template_and_folder_sources(cache, weights, tmp_path):
    with serve({f"/weights/{FILE}": weights}) as site:
        assert download.fetch_official(_config(), f"{site.url}/weights/{{file}}").read_bytes() == weights
    (cache / FILE).unlink()
    share = tmp_path / "share"
    share.mkdir()
    (share / FILE).write_bytes(weights)
    done = []
    path = download.fetch_official(_config(), str(share), progress=lambda d, t: done.append(d))
    assert path == cache / FILE and path.read_bytes() == weights and done[-1] == len(weights)


def test_bad_source_lists_are_one_line_errors(cache):
    with pytest.raises(ModelNotFoundError) as e:
        download.parse_sources("hf,hff")
    _one_line(e, "'hff'", "modelscope")
    with pytest.raises(ModelNotFoundError):
        download.parse_sources(" , ")


# -- resuming -------------------------------------------------------------------------------------------


def test_a_dropped_connection_is_resumed_with_range(cache, weights, monkeypatch):
    with serve({HUB_PATH: weights}, drops=1) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = download.fetch_official(_config(), "hf")
    half = len(weights) // 2
    assert hub.requests == [(HUB_PATH, None), (HUB_PATH, f"bytes={half}-")]
    assert path.read_bytes() == weights


class _Killed(Exception):
    """Stands for a kill: the download stops where it is, leaving its part behind."""


def _killed_after(config: cnclip.ModelConfig, sources: str, stop_at: int) -> int:
    """Start downloading, stop once `stop_at` bytes are in the part; the part's size."""

    def progress(done: int, total: int | None) -> None:
        if done >= stop_at:
            raise _Killed

    with pytest.raises(_Killed):
        download.fetch_official(config, sources, progress=progress)
    return (download.weights_dir() / f"{config.official_file}.part").stat().st_size


def _versions(size: int = 1 << 20) -> tuple[bytes, bytes]:
    """Two different files of one size: two versions, or what two sources hold."""
    rng = random.Random(0)
    return rng.randbytes(size), rng.randbytes(size)


def test_a_killed_run_resumes_from_the_same_source_and_version(cache, weights, monkeypatch):
    with serve({"/cdn/blob": weights}, redirects={HUB_PATH: "/cdn/blob"}) as hub:  # the hub sends files to its CDN
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        kept = _killed_after(_config(), "hf", 1_000_000)
        assert 0 < kept < len(weights)
        first, answers = len(hub.requests), len(hub.sent)
        assert download.fetch_official(_config(), "hf").read_bytes() == weights
    assert hub.requests[first:] == [(HUB_PATH, f"bytes={kept}-"), ("/cdn/blob", f"bytes={kept}-")]
    assert hub.if_ranges[-1] == f'"{hashlib.sha1(weights).hexdigest()[:12]}"'  # the CDN's ETag, from the first try
    assert hub.sent[answers:] == [len(weights) - kept]  # only the missing bytes travel
    assert _left_in(cache) == [FILE]


def test_a_part_from_one_source_is_not_resumed_from_another(cache, monkeypatch):
    on_hub, on_modelscope = _versions()
    with serve({HUB_PATH: on_hub}) as hub, serve({MODELSCOPE_PATH: on_modelscope}) as modelscope:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", modelscope.url)
        _killed_after(_config(), "hf", 300_000)
        path = download.fetch_official(_config(), "modelscope")
    assert path.read_bytes() == on_modelscope  # not the hub's first bytes spliced to ModelScope's last ones
    assert modelscope.requests == [(MODELSCOPE_PATH, None)]
    assert _left_in(cache) == [FILE]


def test_a_part_of_an_older_version_starts_over(cache, monkeypatch):
    old, new = _versions()
    with serve({HUB_PATH: old}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        kept = _killed_after(_config(), "hf", 300_000)
        hub.files[HUB_PATH] = new  # published again meanwhile: a new ETag
        first = len(hub.requests)
        assert download.fetch_official(_config(), "hf").read_bytes() == new
    assert hub.requests[first:] == [(HUB_PATH, f"bytes={kept}-")]  # If-Range: the server sends all of it, 200
    assert hub.if_ranges[first:] == [f'"{hashlib.sha1(old).hexdigest()[:12]}"']


@pytest.mark.parametrize("wrong", ["offset", "version"])
def test_a_206_from_another_offset_or_version_starts_over(cache, monkeypatch, wrong):
    old, new = _versions()
    with serve({HUB_PATH: old}, honour_if_range=False) as hub:  # a server that ignores If-Range
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        kept = _killed_after(_config(), "hf", 300_000)
        if wrong == "offset":
            hub.shift = 1000  # and miscounts: its 206 starts 1000 bytes early
        else:
            hub.files[HUB_PATH] = new  # and sends a new version's bytes, under its new ETag
        first = len(hub.requests)
        got = download.fetch_official(_config(), "hf").read_bytes()
    assert got == (old if wrong == "offset" else new)
    assert hub.requests[first:] == [(HUB_PATH, f"bytes={kept}-"), (HUB_PATH, None)]


def test_a_part_without_a_known_source_or_version_starts_over(cache, weights, monkeypatch):
    cache.mkdir(parents=True)
    (cache / f"{FILE}.part").write_bytes(b"\0" * 1000)  # left by an older cnclip: where from is unknown
    with serve({HUB_PATH: weights}, etag=False, drops=1) as hub:  # no ETag, no Last-Modified
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert download.fetch_official(_config(), "hf").read_bytes() == weights
    assert hub.requests == [(HUB_PATH, None), (HUB_PATH, None)]  # nothing to send If-Range with: no Range


def test_a_server_that_ignores_range_starts_the_file_over(cache, weights, monkeypatch):
    with serve({HUB_PATH: weights}, ignore_range=True, drops=1) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert download.fetch_official(_config(), "hf").read_bytes() == weights
    assert [r for _, r in hub.requests] == [None, f"bytes={len(weights) // 2}-"]


def test_a_complete_part_is_published_without_downloading_it_again(cache, weights, monkeypatch):
    with serve({HUB_PATH: weights}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        # killed between the last byte and the rename
        assert _killed_after(_config(), "hf", len(weights)) == len(weights)
        first = len(hub.requests)
        assert download.fetch_official(_config(), "hf").read_bytes() == weights
    assert hub.requests[first:] == [(HUB_PATH, f"bytes={len(weights)}-")]  # answered 416: nothing more to send
    assert _left_in(cache) == [FILE]


# -- which source answers ---------------------------------------------------------------------------------


def test_a_dead_hub_falls_over_to_modelscope_and_says_so(cache, weights, monkeypatch, caplog):
    dead = dead_url()
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with serve({MODELSCOPE_PATH: weights}) as modelscope:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", modelscope.url)
        with caplog.at_level(logging.WARNING, logger="cnclip.model.download"):
            path = download.fetch_official(_config())  # the default list: hub, then ModelScope
    assert path.read_bytes() == weights
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == f"{FILE} comes from modelscope {modelscope.url} (hub {dead}: connection refused)"


def test_a_404_does_not_fall_over(cache, weights, monkeypatch):
    with serve({}) as hub, serve({MODELSCOPE_PATH: weights}) as modelscope:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", modelscope.url)
        with pytest.raises(ModelNotFoundError) as e:
            download.fetch_official(_config())
    _one_line(e, f"hub {hub.url}: HTTP 404")
    assert modelscope.requests == []  # the hub answered: its 404 is the answer, not a reason to ask elsewhere


def test_every_source_failing_names_each_and_the_way_out(cache, monkeypatch):
    dead = dead_url()
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with serve({}) as modelscope:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", modelscope.url)
        with pytest.raises(ModelNotFoundError) as e:
            download.fetch_official(_config(), "hf,modelscope")
    _one_line(
        e,
        f"hub {dead}: connection refused; modelscope {modelscope.url}: HTTP 404",
        f"--model /path/to/{FILE}",
        f"https://huggingface.co/OFA-Sys/chinese-clip-tiny/resolve/main/{FILE}",
        "https://www.modelscope.cn/models/AI-ModelScope/chinese-clip-tiny",
    )
    assert _left_in(cache) == []


# -- refusing bad files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("told_by", ["config", "X-Linked-Etag", "ETag"])
def test_a_file_with_the_wrong_sha256_is_refused_and_not_kept(cache, weights, monkeypatch, told_by):
    wrong = hashlib.sha256(b"something else").hexdigest()
    config = _config(sha256=wrong) if told_by == "config" else _config()
    # the hub sends an LFS file's digest on the redirect to its CDN
    header = "X-Linked-Etag" if told_by == "config" else told_by
    with serve({"/cdn/blob": weights}, redirects={HUB_PATH: "/cdn/blob"}, headers={header: f'"{wrong}"'}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError) as e:
            download.fetch_official(config)
    _one_line(e, "bad file", "sha256", wrong[:16])
    assert [p for p, _ in hub.requests] == [HUB_PATH, "/cdn/blob"]  # a bad file is not a reason to try ModelScope
    assert _left_in(cache) == []


def test_the_right_sha256_and_size_pass(cache, weights, monkeypatch):
    right = hashlib.sha256(weights).hexdigest()
    with serve({"/cdn/blob": weights}, redirects={HUB_PATH: "/cdn/blob"}, headers={"X-Linked-Etag": right}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = download.fetch_official(_config(sha256=right, size=len(weights)), "hf")
    assert path.read_bytes() == weights


def test_a_wrong_size_is_refused_before_it_is_downloaded(cache, weights, monkeypatch):
    seen = []
    with serve({HUB_PATH: weights}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError) as e:
            download.fetch_official(_config(size=len(weights) + 1), "hf", progress=lambda *a: seen.append(a))
    _one_line(e, FILE, f"hub {hub.url}: bad file", f"{len(weights)} bytes, not the expected {len(weights) + 1}")
    assert seen == []  # the announced size was enough: no byte was stored
    assert _left_in(cache) == []


def test_a_resumed_file_with_the_wrong_sha256_leaves_nothing_behind(cache, weights, monkeypatch):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with serve({HUB_PATH: weights}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        _killed_after(_config(sha256=wrong), "hf", 1_000_000)
        with pytest.raises(CheckpointError) as e:
            download.fetch_official(_config(sha256=wrong), "hf")
    _one_line(e, FILE, f"hub {hub.url}: bad file", wrong[:16])
    assert _left_in(cache) == []
    assert hub.requests[-1][1] is not None  # it was resumed


def test_load_model_refuses_weights_of_another_shape_before_caching_them(cache, weights, monkeypatch):
    hub_path = f"/OFA-Sys/chinese-clip-vit-base-patch16/resolve/main/{VIT_B_16}"
    with serve({hub_path: weights}) as hub:  # a tiny model under ViT-B-16's name
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError) as e:
            cnclip.load_model("ViT-B-16")
    _one_line(e, "tiny-vit", "not ViT-B-16")
    assert _left_in(cache) == []


def test_load_model_by_zoo_name_downloads_and_loads(cache, weights, monkeypatch):
    config = _config()
    monkeypatch.setattr(checkpoint, "_zoo_names", lambda: {"tiny-dl"})
    monkeypatch.setattr(checkpoint, "get_model_config", lambda name: config)
    with serve({MODELSCOPE_PATH: weights}) as modelscope:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", modelscope.url)
        monkeypatch.setenv("CNCLIP_WEIGHTS_SOURCE", "modelscope")
        model = cnclip.load_model("tiny-dl")
    assert model.source == "tiny-dl"
    reference = cnclip.load_model(cache / FILE)
    pixels = ImageTransform(model.config.vision.image_size).batch(random_images(2))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), reference.encode_image(pixels))


# -- offline -----------------------------------------------------------------------------------------------


def test_offline_uses_the_cache_and_never_the_network(cache, weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with serve({HUB_PATH: weights, MODELSCOPE_PATH: weights}) as site:
        monkeypatch.setenv("HF_ENDPOINT", site.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", site.url)
        with pytest.raises(ModelNotFoundError) as e:
            download.fetch_official(_config())
        _one_line(e, "HF_HUB_OFFLINE=1", "--model PATH", str(cache))
        cache.mkdir(parents=True, exist_ok=True)
        (cache / FILE).write_bytes(weights)
        assert download.fetch_official(_config()) == cache / FILE
    assert site.requests == []


def test_offline_still_reads_a_folder_source(cache, weights, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / FILE).write_bytes(weights)
    assert download.fetch_official(_config(), f"hf,{tmp_path}").read_bytes() == weights


# -- the command line -------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real `cnclip`, with the network to 127.0.0.1 allowed."""
    return run_cli(*args, env={**env, "HF_HUB_OFFLINE": None, "CNCLIP_WEIGHTS_SOURCE": None})


def _vit_b_16_served(weights: bytes) -> dict[str, bytes]:
    # ViT-B-16's official name with tiny weights: the download is real, the shape check then refuses it
    return {
        f"/api/v1/models/AI-ModelScope/chinese-clip-vit-base-patch16/repo?Revision=master&FilePath={VIT_B_16}": weights
    }


def test_cli_weights_source_picks_modelscope(cache, weights, tmp_path):
    with serve({}) as hub, serve(_vit_b_16_served(weights)) as modelscope:
        env = {"HF_ENDPOINT": hub.url, "MODELSCOPE_ENDPOINT": modelscope.url, "no_proxy": "*"}
        out = _cli("convert", "ViT-B-16", tmp_path / "out", "--weights-source", "modelscope", env=env)
    assert out.returncode == 1
    assert hub.requests == [] and len(modelscope.requests) == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("cnclip: error: ViT-B-16:") and "modelscope" in line and "not ViT-B-16" in line
    assert _left_in(cache) == []


def test_cli_says_once_which_source_answered(cache, weights, tmp_path):
    dead = dead_url()
    with serve(_vit_b_16_served(weights)) as modelscope:
        env = {"HF_ENDPOINT": dead, "MODELSCOPE_ENDPOINT": modelscope.url, "no_proxy": "*"}
        out = _cli("convert", "ViT-B-16", tmp_path / "out", env=env)
    lines = out.stderr.strip().splitlines()
    assert lines[0] == (
        f"WARNING cnclip.model.download: {VIT_B_16} comes from modelscope {modelscope.url} "
        f"(hub {dead}: connection refused)"
    )
    assert sum("comes from" in line for line in lines) == 1


def test_cli_every_source_failing(cache, tmp_path):
    env = {"HF_ENDPOINT": dead_url(), "MODELSCOPE_ENDPOINT": dead_url(), "no_proxy": "*"}
    out = _cli("--weights-source", "hf,modelscope", "convert", "ViT-B-16", tmp_path / "out", env=env)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert "hub http://127.0.0.1:" in line and "modelscope http://127.0.0.1:" in line
    assert f"--model /path/to/{VIT_B_16}" in line


def test_cli_weights_source_folder_works_offline(cache, weights, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / VIT_B_16).write_bytes(weights)
    out = run_cli("convert", "ViT-B-16", tmp_path / "out", "--weights-source", share)  # HF_HUB_OFFLINE=1
    assert out.returncode == 1 and "not ViT-B-16" in out.stderr  # read, checked and refused
    bad = run_cli("--weights-source=hf,nowhere", "models")
    assert bad.returncode == 2 and "'nowhere'" in bad.stderr


def test_cli_download_bar(capsys):
    from cnclip.app.cli import _DownloadBar

    bar = _DownloadBar(enabled=True)
    bar(1_000_000, 4_000_000)  # a resumed download: the first megabyte was already there
    bar(4_000_000, 4_000_000)
    err = capsys.readouterr().err
    assert err.startswith("\rdownloading weights 1.0/4.0 MB") and err.endswith("\n")
    assert "4.0/4.0 MB" in err and "MB/s" in err
    bar(3_000_000, None)  # a source that does not say the size
    bar(3_000_000, 3_000_000)
    assert "3.0 MB" in capsys.readouterr().err
    _DownloadBar(enabled=False)(1, 2)
    assert capsys.readouterr().err == ""


def test_cli_killed_mid_download_resumes_the_same_file_from_where_it_stopped(cache, weights, tmp_path):
    """kill -9 right after a chunk reached the `.part` (cnclip.faults): the next run asks only for
    the rest, from the same source and version."""
    served = _vit_b_16_served(weights)
    with serve({}) as hub, serve(served) as modelscope:
        env = {"HF_ENDPOINT": hub.url, "MODELSCOPE_ENDPOINT": modelscope.url, "no_proxy": "*"}
        args = ("convert", "ViT-B-16", tmp_path / "out", "--weights-source", "modelscope")
        killed = _cli(*args, env={**env, "CNCLIP_FAULT": "download.mid"})
        assert killed.returncode == -9, killed.stderr
        kept = (cache / f"{VIT_B_16}.part").stat().st_size
        assert 0 < kept < len(weights)
        again = _cli(*args, env=env)
    assert again.returncode == 1 and "not ViT-B-16" in again.stderr  # downloaded whole, then refused by shape
    assert modelscope.requests[-1][1] == f"bytes={kept}-" and modelscope.sent[-1] == len(weights) - kept
    assert _left_in(cache) == []
