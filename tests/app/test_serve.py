"""`cnclip serve`: the JSON API over a real index of generated images, a tiny random model."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import eventually, random_images, run_cli, write_photos
from fastapi.testclient import TestClient
from PIL import Image

import cnclip
from cnclip.app.serve import MAX_UPLOAD_BYTES, check_bind, create_app, is_loopback, listen_socket
from cnclip.errors import CNClipError

TEXTS = ["一只猫", "海边的日落", "城市夜景", "雪山"]
LOCAL = "http://127.0.0.1"
MANY_LABELS = ",".join(f"标签{i}" for i in range(100))


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir) -> tuple[Path, Path]:
    """(index folder, photo folder): 8 photos, a symlink to a photo outside the folder, texts."""
    base = tmp_path_factory.mktemp("serve")
    photos = base / "photos"
    write_photos(photos, 8, seed=1)
    write_photos(base / "private", 1, seed=99, prefix="secret")
    os.symlink(base / "private" / "secret0.png", photos / "link-out.png")
    os.symlink(photos / "p0.png", photos / "link-in.png")  # a symlink that stays inside: served
    with cnclip.Index.open(base / "idx", model=str(model_dir), create=True) as index:
        index.add_folder(photos)
        index.add_texts(TEXTS)
    return base / "idx", photos


@pytest.fixture(scope="module")
def client(built) -> Iterator[TestClient]:
    with TestClient(create_app(built[0]), base_url=LOCAL) as c:
        yield c


def _id_of(index_path: Path, path: Path) -> int:
    with cnclip.Index.open(index_path) as index:
        return index.catalog.file_id_for_path(str(path))


def _png(image: Image.Image | None = None) -> bytes:
    out = io.BytesIO()
    (image or random_images(1, seed=7)[0]).save(out, "PNG")
    return out.getvalue()


def _assert_json_error(r: httpx.Response, *statuses: int) -> str:
    assert r.status_code in statuses, (r.status_code, r.text)
    message = r.json()["error"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message
    return message


# -- searching ------------------------------------------------------------------------------------


def test_text_search_returns_ids_paths_scores_and_thumb_urls(client, built):
    r = client.get("/api/search", params={"q": "海边的日落", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["results"]) == 5 and body["took_ms"] >= 0
    with cnclip.Index.open(built[0]) as index:
        expected = index.search_text("海边的日落", k=5)
    assert [(h["id"], h["path"]) for h in body["results"]] == [(h.id, h.path) for h in expected]
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    for hit in body["results"]:
        assert hit["thumb"] == f"/api/thumb/{hit['id']}" and hit["image"] == f"/api/image/{hit['id']}"
        assert hit["name"] == os.path.basename(hit["path"])


def test_image_search_by_upload_finds_the_same_photo_first(client, built):
    photo = built[1] / "p3.png"
    r = client.post("/api/search/image", files={"file": ("查询.png", photo.read_bytes(), "image/png")}, data={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3
    assert body["results"][0]["path"] == str(photo) and body["results"][0]["score"] > 0.999


def test_similar_to_an_indexed_photo_leaves_it_out(client, built):
    file_id = _id_of(built[0], built[1] / "p2.png")
    body = client.get("/api/similar", params={"id": file_id, "k": 4}).json()
    assert body["count"] == 4 and file_id not in [h["id"] for h in body["results"]]


def _combined(built, terms, k: int) -> list[tuple[int, float]]:
    from cnclip.index.query import Term

    with cnclip.Index.open(built[0]) as index:
        return [(h.id, h.score) for h in index.search_combined([Term(*t) for t in terms], k=k)]


def test_search_with_not_and_like_combines_text_and_photo(client, built):
    like = _id_of(built[0], built[1] / "p5.png")
    params = [("q", "海边的日落"), ("not", "城市"), ("not", "人群"), ("like", like), ("k", 6)]
    body = client.get("/api/search", params=params).json()
    terms = [("text", "海边的日落"), ("text", "城市", -1.0), ("text", "人群", -1.0), ("file", like)]
    expected = _combined(built, terms, 6)
    assert [(h["id"], h["score"]) for h in body["results"]] == [(i, pytest.approx(s, abs=1e-5)) for i, s in expected]
    assert body["count"] == 6 and like not in [h["id"] for h in body["results"]]  # "more like this" leaves it out
    # t: a video's moment; words: the lines a photo was found by
    assert set(body["results"][0]) == {"id", "path", "name", "score", "thumb", "image", "t", "words"}

    only_not = client.get("/api/search", params={"q": "雪山", "not": "城市", "k": 8}).json()
    expected = _combined(built, [("text", "雪山"), ("text", "城市", -1.0)], 8)
    assert [h["id"] for h in only_not["results"]] == [i for i, _ in expected]
    # a blank `not` (an empty form field) is no term at all: the plain search, unchanged
    blank = client.get("/api/search", params={"q": "雪山", "not": " ", "k": 8}).json()
    plain = client.get("/api/search", params={"q": "雪山", "k": 8}).json()
    assert blank["results"] == plain["results"] and blank["results"] != only_not["results"]


def test_unusable_not_and_like_are_4xx_json(client, built):
    cancelled = _assert_json_error(client.get("/api/search", params={"q": "猫", "not": "猫"}), 400)
    assert "cancels out" in cancelled
    missing = _assert_json_error(client.get("/api/search", params={"q": "猫", "like": 987654}), 404)
    assert "987654" in missing
    for bad in (0, -1, "abc", 2**63):
        _assert_json_error(client.get("/api/search", params={"q": "猫", "like": bad}), 422)
    _assert_json_error(client.get("/api/search", params={"like": _id_of(built[0], built[1] / "p1.png")}), 422)
    _assert_json_error(client.get("/api/search", params={"q": "猫", "not": "狗" * 1001}), 400)


def test_tag_ranks_labels_given_in_every_form(client, built):
    files = {"file": ("p.png", (built[1] / "p1.png").read_bytes(), "image/png")}
    r = client.post("/api/tag", files=files, data={"labels": ["猫,狗\n海滩", "城市，雪山"]})
    assert r.status_code == 200, r.text
    labels = r.json()["labels"]
    assert sorted(x["label"] for x in labels) == sorted(["猫", "狗", "海滩", "城市", "雪山"])
    scores = [x["score"] for x in labels]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
    top2 = client.post("/api/tag", files=files, data={"labels": "猫,狗,海滩", "k": 2}).json()
    assert top2["count"] == 2


def test_texts_closest_to_an_indexed_photo(client, built):
    file_id = _id_of(built[0], built[1] / "p4.png")
    body = client.get("/api/texts", params={"image_id": file_id, "k": 3}).json()
    assert body["count"] == 3 and {t["text"] for t in body["results"]} <= set(TEXTS)
    assert [t["score"] for t in body["results"]] == sorted((t["score"] for t in body["results"]), reverse=True)
    _assert_json_error(client.get("/api/texts", params={"image_id": 99999}), 404)


def test_health_reports_counts_model_and_last_update(client):
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert body["count"] == 10 and body["texts"] == len(TEXTS)  # 8 photos and both symlinks
    assert body["model"]["name"] == "tiny-vit" and body["model"]["dim"] > 0
    assert body["last_update"].startswith("20") and body["vector_index"]["current"] is True


def _scores(client, q: str) -> list[tuple[int, float]]:
    r = client.get("/api/search", params={"q": q, "k": 5})
    assert r.status_code == 200, r.text
    return [(h["id"], h["score"]) for h in r.json()["results"]]


def test_traditional_queries_are_read_as_simplified_unless_turned_off(client, built):
    assert client.get("/api/health").json()["t2s"] is True
    assert _scores(client, "海邊的日落") == _scores(client, "海边的日落")
    with TestClient(create_app(built[0], t2s=False), base_url=LOCAL) as as_typed:
        assert as_typed.get("/api/health").json()["t2s"] is False
        assert _scores(as_typed, "海边的日落") == _scores(client, "海边的日落")
        assert _scores(as_typed, "海邊的日落") != _scores(client, "海邊的日落")


def test_openapi_schema_lists_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/search", "/api/search/image", "/api/tag", "/api/texts", "/api/thumb/{file_id}", "/api/health"):
        assert path in paths


def test_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "以图搜图" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


# -- files by id ----------------------------------------------------------------------------------


def test_thumbnail_and_original_by_id(client, built):
    photo = built[1] / "p5.png"
    file_id = _id_of(built[0], photo)
    r = client.get(f"/api/thumb/{file_id}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    assert client.get(f"/api/thumb/{file_id}").content == r.content  # from the cache
    original = client.get(f"/api/image/{file_id}")
    assert original.status_code == 200 and original.content == photo.read_bytes()
    assert original.headers["content-type"] == "image/png" and original.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "url",
    [
        "/api/image/../../etc/passwd",
        "/api/image/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/image/%252e%252e%252fetc%252fpasswd",
        "/api/thumb/1%2F..%2F..%2Fetc%2Fpasswd",
        "/api/image//etc/passwd",
        "/api/image/1/../../../etc/passwd",
        "/api/image/0",
        "/api/image/-1",
        "/api/image/99999",
        "/api/image/99999999999999999999999",
        "/api/image/1.5",
        "/api/thumb/abc",
        "/static/../serve.py",
        "/static/..%2Fserve.py",
        "/static/%2e%2e/serve.py",
    ],
)
def test_path_traversal_and_unknown_ids_serve_nothing(client, url):
    r = client.get(url)
    _assert_json_error(r, 404, 422)
    assert b"root:" not in r.content and b"create_app" not in r.content


def test_symlink_out_of_the_indexed_folder_is_not_served(client, built):
    outside = _id_of(built[0], built[1] / "link-out.png")
    inside = _id_of(built[0], built[1] / "link-in.png")
    assert outside and inside
    for kind in ("thumb", "image"):
        _assert_json_error(client.get(f"/api/{kind}/{outside}"), 404)
        assert client.get(f"/api/{kind}/{inside}").status_code == 200


def test_a_file_gone_from_disk_is_404(tmp_path, model_dir):
    photos = tmp_path / "photos"
    paths = write_photos(photos, 2, seed=3)
    with cnclip.Index.open(tmp_path / "idx", model=str(model_dir), create=True) as index:
        index.add_folder(photos)
    file_id = _id_of(tmp_path / "idx", paths[0])
    paths[0].unlink()
    with TestClient(create_app(tmp_path / "idx"), base_url=LOCAL) as client:
        _assert_json_error(client.get(f"/api/image/{file_id}"), 404)
        _assert_json_error(client.get(f"/api/thumb/{file_id}"), 404)


# -- bad input ------------------------------------------------------------------------------------


def test_oversized_uploads_are_413(client):
    big = b"\xff\xd8" + b"\0" * MAX_UPLOAD_BYTES  # one byte over, with a JPEG start
    r = client.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
    assert "20 MB" in _assert_json_error(r, 413)
    huge = b"\0" * (MAX_UPLOAD_BYTES + 200_000)  # the whole body over the cap: refused from Content-Length
    r = client.post("/api/search/image", content=huge, headers={"content-type": "multipart/form-data; boundary=x"})
    _assert_json_error(r, 413)


def test_streamed_upload_without_length_is_cut_off_at_the_cap(client):
    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(22):
            yield b"\0" * 2**20

    r = client.post("/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    _assert_json_error(r, 413)


def _png_header(width: int, height: int) -> bytes:
    """A small PNG that claims width x height pixels (its pixel data is one compressed row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, data, status",
    [
        ("notes.txt", b"just some text, not an image", 415),
        ("fake.jpg", b"<html><script>alert(1)</script></html>", 415),
        ("empty.png", b"", 400),
        ("truncated.png", _png(Image.new("RGB", (64, 64), (9, 9, 9)))[:80], 400),
        ("bomb.png", _png_header(40_000, 40_000), 413),
        ("110mp.png", _png_header(11_000, 10_000), 413),
    ],
)
def test_bad_uploads_are_4xx_json(client, name, data, status):
    r = client.post("/api/search/image", files={"file": (name, data, "image/png")})
    _assert_json_error(r, status)
    r = client.post("/api/tag", files={"file": (name, data, "image/png")}, data={"labels": "猫,狗"})
    _assert_json_error(r, status)


@pytest.mark.parametrize(
    "method, url, kwargs",
    [
        ("get", "/api/search", {"params": {"q": "猫", "k": 0}}),
        ("get", "/api/search", {"params": {"q": "猫", "k": -3}}),
        ("get", "/api/search", {"params": {"q": "猫", "k": "abc"}}),
        ("get", "/api/search", {"params": {"q": "猫", "k": 10000}}),
        ("get", "/api/search", {"params": {"q": "猫", "k": 201}}),
        ("get", "/api/search", {"params": {"q": "猫", "k": "1e3"}}),
        ("get", "/api/search", {"params": {"q": ""}}),
        ("get", "/api/search", {"params": {"q": "   \t "}}),
        ("get", "/api/search", {"params": {"q": "猫" * 1001}}),
        ("get", "/api/search", {"params": {"q": "\u200b"}}),  # zero-width: the model would read no text at all
        ("get", "/api/search", {"params": {"q": "\ufeff\x00\u0301"}}),
        ("get", "/api/search", {"params": {"q": "猫", "not": "\u200d"}}),
        ("get", "/api/search", {}),
        ("get", "/api/texts", {"params": {"image_id": "abc"}}),
        ("get", "/api/texts", {"params": {"image_id": 0}}),
        ("get", "/api/texts", {}),
        ("get", "/api/similar", {"params": {"id": 1, "k": 0}}),
        ("post", "/api/search/image", {}),
        ("post", "/api/search/image", {"data": {"k": 5}}),
        ("post", "/api/search/image", {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"k": 0}}),
        ("post", "/api/search/image", {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"k": "many"}}),
        ("post", "/api/tag", {"files": {"file": ("a.png", _png(), "image/png")}}),
        ("post", "/api/tag", {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"labels": " , \n"}}),
        ("post", "/api/tag", {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"labels": "x" * 1001}}),
        ("post", "/api/tag", {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"labels": MANY_LABELS}}),
        ("post", "/api/tag", {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"labels": "猫,\u200b"}}),
        ("post", "/api/search", {}),
        ("get", "/api/search/image", {}),
    ],
)  # fmt: skip
def test_malformed_parameters_are_4xx_json(client, method, url, kwargs):
    r = getattr(client, method)(url, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _assert_json_error(r, r.status_code)


def test_too_many_folders_is_4xx_json(client, built):
    # each folder adds a condition: a thousand of them overflowed SQLite's expression depth (a 500)
    r = client.get("/api/search", params=[("q", "猫")] + [("in", str(built[1]))] * 1000)
    assert _assert_json_error(r, 422).startswith("in:")


# -- safety ---------------------------------------------------------------------------------------


def test_token_is_required_when_configured(built):
    app = create_app(built[0], token="s3cret-token", host="0.0.0.0")
    with TestClient(app) as client:  # host "testserver": with a token any Host header is fine
        message = _assert_json_error(client.get("/api/search", params={"q": "猫"}), 401)
        assert "token" in message
        _assert_json_error(client.get("/api/health", headers={"Authorization": "Bearer wrong"}), 401)
        _assert_json_error(client.get("/api/thumb/1", params={"token": "wrong"}), 401)
        _assert_json_error(client.post("/api/search/image", files={"file": ("a.png", _png(), "image/png")}), 401)
        assert client.get("/api/health", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert client.get("/api/search", params={"q": "猫", "token": "s3cret-token"}).status_code == 200
        assert client.get("/").status_code == 200  # the page holds no data; it asks for the token

        r = client.get("/", params={"token": "s3cret-token"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        assert client.get("/api/thumb/1").status_code == 200  # the cookie now carries it


def test_foreign_host_header_is_refused_without_token(client):
    # A DNS-rebinding page reaches 127.0.0.1 under its own name; without a token only loopback names pass.
    _assert_json_error(client.get("/api/health", headers={"host": "evil.example:8000"}), 403)
    assert client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200


def test_other_web_pages_cannot_use_the_api(client):
    # Without a token, any page the user visits could <img src=http://127.0.0.1:8000/api/thumb/1> or post a form.
    for headers in (
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"origin": "https://evil.example"},
    ):
        message = _assert_json_error(client.get("/api/thumb/1", headers=headers), 403)
        assert "cross-site" in message
    form = {"files": {"file": ("a.png", _png(), "image/png")}, "data": {"labels": "猫"}}
    _assert_json_error(client.post("/api/tag", headers={"origin": "http://localhost:3000"}, **form), 403)
    origin = str(client.base_url).rstrip("/")
    own = client.get("/api/thumb/1", headers={"sec-fetch-site": "same-origin", "origin": origin})
    assert own.status_code == 200 and own.headers["cross-origin-resource-policy"] == "same-origin"
    assert client.get("/api/health", headers={"sec-fetch-site": "none"}).status_code == 200  # typed by the user
    assert client.get("/api/health").status_code == 200  # programs send neither header


def test_non_loopback_host_needs_a_token(built):
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com", ""):
        assert not is_loopback(host)
        with pytest.raises(CNClipError, match="token"):
            check_bind(host, None)
        check_bind(host, "a-token")
    out = run_cli("serve", "--index", built[0], "--host", "0.0.0.0", "--port", "0", env={"CNCLIP_TOKEN": ""})
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "--token" in out.stderr, out.stderr


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(CNClipError, match="no cnclip index"):
        create_app(tmp_path / "nothing-here")


# -- a live index ---------------------------------------------------------------------------------


def test_new_items_indexed_by_another_writer_appear_in_later_searches(tmp_path, model_dir):
    photos = tmp_path / "photos"
    write_photos(photos, 3, seed=11)
    with cnclip.Index.open(tmp_path / "idx", model=str(model_dir), create=True) as index:
        index.add_folder(photos)
    with TestClient(create_app(tmp_path / "idx"), base_url=LOCAL) as client:
        assert client.get("/api/search", params={"q": "猫", "k": 50}).json()["count"] == 3
        new = write_photos(photos, 2, seed=12, prefix="new")
        (photos / "p0.png").unlink()
        with cnclip.Index.open(tmp_path / "idx") as writer:  # its own connection, as `cnclip index` would be
            writer.add_folder(photos)
        body = client.get("/api/search", params={"q": "猫", "k": 50}).json()
        paths = {h["path"] for h in body["results"]}
        assert body["count"] == 4 and {str(p) for p in new} <= paths and str(photos / "p0.png") not in paths
        assert client.get("/api/health").json()["count"] == 4
        found = next(h for h in body["results"] if h["path"] == str(new[0]))
        assert client.get(found["thumb"]).status_code == 200


def test_the_socket_accepts_connections_before_the_server_loop_runs():
    # `cnclip serve` prints its URL before uvicorn starts; a browser opening it then must wait, not be refused
    sock = listen_socket("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname(), timeout=5):
            pass
    finally:
        sock.close()


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a background thread; yields its base URL."""
    import uvicorn

    sock = listen_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_concurrent_requests_from_threads_all_succeed(built):
    photo = (built[1] / "p6.png").read_bytes()
    queries = ["猫", "海边的日落", "城市夜景", "雪山", "一只狗在草地上", "早餐"]

    def one_client(n: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(6):
                kind = (n + i) % 4
                if kind == 0:
                    r = http.post("/api/search/image", files={"file": ("p.png", photo, "image/png")})
                elif kind == 1:
                    r = http.get("/api/thumb/1")
                elif kind == 2:
                    r = http.get("/api/health")
                else:
                    r = http.get("/api/search", params={"q": queries[(n * 7 + i) % len(queries)] + str(n), "k": 5})
                statuses.append(r.status_code)
        return statuses

    with serve_in_thread(create_app(built[0])) as base, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one_client, range(8)))
    assert [s for statuses in results for s in statuses] == [200] * 48


def test_scores_match_cosine_of_the_stored_vectors(client, built):
    """The API reports the index's own cosine similarities, unchanged beyond rounding."""
    body = client.get("/api/search", params={"q": "雪山", "k": 3}).json()
    with cnclip.Index.open(built[0]) as index:
        query = index.query_vector("雪山")[0]
        for hit in body["results"]:
            stored = index.catalog.vector_for_path(hit["path"])
            assert abs(float(np.dot(query, stored)) - hit["score"]) < 1e-4


def test_raw_dot_dot_paths_over_http_serve_nothing(built):
    """What `curl --path-as-is` sends: the path reaches the server with its `..` segments intact."""
    paths = ["/api/image/../../../../etc/passwd", "/static/../serve.py", "/static/../../../../etc/passwd", "/api/../"]
    with serve_in_thread(create_app(built[0])) as base:
        port = int(base.rsplit(":", 1)[1])
        for path in paths:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                reply = b""
                while chunk := conn.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 404"), (path, reply[:200])
            assert b"root:" not in reply and b"create_app" not in reply


# -- faults ---------------------------------------------------------------------------------------


def _index_of_photos(base: Path, model_dir: Path, n: int) -> Path:
    write_photos(base / "photos", n, seed=21)
    with cnclip.Index.open(base / "idx", model=str(model_dir), create=True) as index:
        index.add_folder(base / "photos")
    return base / "idx"


def _add_photos(index_path: Path, photos: Path, n: int) -> None:
    """`n` new photos indexed by another writer: more than half the index changes, so servers rebuild."""
    write_photos(photos, n, seed=22, prefix="new")
    with cnclip.Index.open(index_path) as writer:
        writer.add_folder(photos)


def test_health_reports_a_failing_rebuild_and_its_back_off(tmp_path, model_dir, monkeypatch):
    from cnclip.index import index as folder
    from cnclip.index.vectors import VectorIndex

    index_path = _index_of_photos(tmp_path, model_dir, 2)
    with TestClient(create_app(index_path), base_url=LOCAL) as client:
        quiet = {"running": False, "failures": 0, "last_error": None, "retry_in_s": 0.0}
        assert client.get("/api/health").json()["rebuild"] == quiet
        _add_photos(index_path, tmp_path / "photos", 4)

        def out_of_memory(cls, *args, **kwargs):
            raise MemoryError

        monkeypatch.setattr(folder, "_SYNC_MIN_REBUILD", 0)
        monkeypatch.setattr(VectorIndex, "build_streaming", classmethod(out_of_memory))

        def failed() -> dict | None:
            assert client.get("/api/search", params={"q": "猫"}).status_code == 200  # the old index answers
            rebuild = client.get("/api/health").json()["rebuild"]
            return rebuild if rebuild["failures"] else None

        rebuild = eventually(failed, "health reports the failed rebuild", timeout=30)
        assert rebuild["failures"] == 1 and rebuild["last_error"] == "MemoryError" and rebuild["running"] is False
        assert 0 < rebuild["retry_in_s"] <= 5


WITH_A_SLOW_REBUILD = """
import sys, time
from cnclip.app.cli import main
from cnclip.index import index as folder
from cnclip.index.vectors import VectorIndex

def slow(cls, *args, **kwargs):
    time.sleep(300)  # a rebuild of a large index

folder._SYNC_MIN_REBUILD = 0  # every change is past half of the index: a rebuild
VectorIndex.build_streaming = classmethod(slow)
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_serve_at_once_while_a_rebuild_runs(tmp_path, model_dir):
    import signal
    import subprocess
    import sys

    index_path = _index_of_photos(tmp_path, model_dir, 2)
    script = tmp_path / "serve_slowly.py"
    script.write_text(WITH_A_SLOW_REBUILD, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(script), "serve", "--index", str(index_path), "--port", "0", "--upload-memory", "64"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True).start()
    try:
        url = eventually(lambda: next((line.split()[3] for line in lines if line.startswith("serving")), None),
                         "the server prints its address", timeout=120)  # fmt: skip
        _add_photos(index_path, tmp_path / "photos", 4)
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/api/search", params={"q": "猫"}).status_code == 200  # starts the rebuild
            eventually(lambda: http.get("/api/health").json()["rebuild"]["running"], "a rebuild runs", timeout=30)
        started = time.monotonic()
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        server.kill()
        server.wait()
    assert code == 130 and took < 10, (code, took, "".join(lines))


# -- memory under load ----------------------------------------------------------------------------


def _flat_png(width: int, height: int) -> bytes:
    """A valid width x height RGB PNG of one colour: a small file that decodes to a large image."""
    deflate = zlib.compressobj(9)
    row = b"\0" + b"\x60\x80\xa0" * width  # filter byte, then the pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_concurrent_large_uploads_decode_within_the_memory_budget(built, monkeypatch):
    from cnclip.model import transform

    png = _flat_png(1500, 1500)  # 2.25 MP: 18 MB to decode (the image and its RGB copy) from 20 KB
    assert len(png) < 50_000
    budget = 40 * 2**20  # room for two at once
    decoding, most, lock = [0], [0], threading.Lock()
    real_load = transform.load_image

    def counted_load(*args, **kwargs):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            time.sleep(0.2)  # as long as a large PNG takes: long enough for the others to overlap
            return real_load(*args, **kwargs)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(transform, "load_image", counted_load)
    app = create_app(built[0], upload_memory=budget)

    def upload(n: int) -> httpx.Response:
        with httpx.Client(base_url=base, timeout=120) as http:
            return http.post("/api/search/image", files={"file": (f"big{n}.png", png, "image/png")}, data={"k": 2})

    with serve_in_thread(app) as base, ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(upload, range(12)))
    assert [r.status_code for r in replies] == [200] * 12, [r.text for r in replies if r.status_code != 200]
    assert most[0] <= 2  # never more than two decoded at once
    assert 0 < app.state.upload_memory.peak <= budget and app.state.upload_memory.used == 0


def test_the_decode_budget_waits_then_answers_503_and_refuses_more_than_all_of_it():
    from fastapi import HTTPException

    from cnclip.app.serve import DecodeBudget

    budget = DecodeBudget(100, wait_s=0.05)
    with budget.reserve(60, "a.png"):
        with pytest.raises(HTTPException) as busy, budget.reserve(60, "b.png"):
            pass
        with budget.reserve(40, "c.png"):  # what is left still serves
            assert budget.used == 100
    assert busy.value.status_code == 503 and "b.png" in busy.value.detail and busy.value.headers["Retry-After"]
    with pytest.raises(HTTPException) as too_big, budget.reserve(101, "d.png"):
        pass
    assert too_big.value.status_code == 413 and "d.png" in too_big.value.detail
    assert budget.used == 0 and budget.peak == 100

    patient = DecodeBudget(100, wait_s=60)
    held = threading.Event()

    def hold_briefly() -> None:
        with patient.reserve(100, "first.png"):
            held.set()
            time.sleep(0.2)

    thread = threading.Thread(target=hold_briefly)
    thread.start()
    held.wait(10)
    with patient.reserve(100, "second.png"):  # waits for the first, then has it all
        assert patient.used == 100
    thread.join()


def test_a_jpeg_reserves_its_reduced_decode_a_png_all_of_it(built):
    out = io.BytesIO()
    Image.new("RGB", (2000, 2000), (90, 120, 150)).save(out, "JPEG")
    with TestClient(create_app(built[0], upload_memory=8 * 2**20), base_url=LOCAL) as client:
        r = client.post("/api/search/image", files={"file": ("big.jpg", out.getvalue(), "image/jpeg")})
        assert r.status_code == 200, r.text  # decoded at 1/8 scale: 250x250
        r = client.post("/api/search/image", files={"file": ("big.png", _flat_png(2000, 2000), "image/png")})
        assert "takes 30 MB to decode" in _assert_json_error(r, 413)


def test_search_uses_the_words_in_photos_and_returns_the_matched_lines(tmp_path, model_dir):
    from conftest import word_photo

    photos = tmp_path / "photos"
    word_photo(photos / "receipt.png", ["增值税普通发票"])
    word_photo(photos / "notes" / "m.png", ["會議紀要"], seed=1)
    write_photos(photos / "plain", 3, seed=5)
    with cnclip.Index.open(tmp_path / "idx", model=str(model_dir), create=True) as index:
        index.add_folder(photos)
    with TestClient(create_app(tmp_path / "idx"), base_url=LOCAL) as client:
        assert client.get("/api/health").json()["words"]["read"] == 0
        receipt = client.get("/api/search", params={"q": "发票", "k": 5}).json()["results"]
        receipt_id = next(r["id"] for r in receipt if r["name"] == "receipt.png")
        assert client.get(f"/api/words/{receipt_id}").json() == {
            "id": receipt_id,
            "read": False,
            "lines": [],
            "error": None,
        }
        with cnclip.Index.open(tmp_path / "idx") as writer:  # another process reads the words meanwhile
            assert writer.read_words().with_words == 2
        # every line read in a photo, with its box, for the page to show and copy
        words = client.get(f"/api/words/{receipt_id}").json()
        assert words["read"] is True and words["error"] is None
        [line] = words["lines"]
        assert line["text"] == "增值税普通发票" and 0.9 < line["score"] <= 1 and len(line["box"]) == 4
        plain = next(r["id"] for r in receipt if r["name"] not in ("receipt.png", "m.png"))
        assert client.get(f"/api/words/{plain}").json() == {"id": plain, "read": True, "lines": [], "error": None}
        assert client.get("/api/words/999999").status_code == 404
        assert client.get("/api/health").json()["words"] == {"photos": 5, "read": 5, "with_words": 2, "failed": 0}
        first = client.get("/api/search", params={"q": "发票", "k": 5}).json()["results"]
        assert first[0]["name"] == "receipt.png"
        assert first[0]["words"] == [{"text": "增值税普通发票", "spans": [[5, 7]]}]
        assert len(first) == 5 and all(r["words"] is None for r in first[1:])
        only = client.get("/api/search", params={"q": "会议纪要", "words": "only"}).json()["results"]
        assert [r["name"] for r in only] == ["m.png"]
        off = client.get("/api/search", params={"q": "发票", "k": 5, "words": "off"}).json()["results"]
        assert all(r["words"] is None for r in off)
        filtered = client.get("/api/search", params={"q": "发票", "in": str(photos / "plain"), "words": "only"})
        assert filtered.json()["results"] == []  # filters hold for word matches too
        bad = client.get("/api/search", params={"q": "发票", "words": "sometimes"})
        assert bad.status_code == 422
        assert client.get("/api/health").json()["words"] == {"photos": 5, "read": 5, "with_words": 2, "failed": 0}
