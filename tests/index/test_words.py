"""Words in photos: tokens and queries, the catalog's words, the reading stage, one search box."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import sys

import numpy as np
import pytest
from conftest import needs_openvino, random_images, word_photo, write_video

import cnclip
from cnclip.errors import ImageError, QueryError, ReaderError
from cnclip.index.words import WordQuery, matching_lines, spans, tokens
from cnclip.model import ocr
from cnclip.model.ocr import WordReader, default_reader

# -- tokens, queries, highlights (no model) -----------------------------------------------------------

DOCS = [
    "取件码 8-3-2017 增值税发票",
    "會議紀要 Meeting notes",
    "取 件 码：1234",
    "发票号码 NO.00123",
    "ＡＢＣ１２３ 全角",
]


@pytest.fixture(scope="module")
def fts():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE f USING fts5(tokens, tokenize='unicode61 remove_diacritics 2')")
    for i, doc in enumerate(DOCS):
        conn.execute("INSERT INTO f (rowid, tokens) VALUES (?, ?)", (i, tokens(doc)))

    def match(query: str) -> list[int]:
        wanted = WordQuery.parse(query)
        return [r[0] for r in conn.execute("SELECT rowid FROM f WHERE f MATCH ? ORDER BY rowid", (wanted.fts,))]

    return match


def test_chinese_runs_become_pairs_and_a_last_character():
    assert tokens("取件码") == "取件 件码 码"
    assert tokens("发票 2024") == "发票 票 2024"
    assert tokens("票") == "票"
    assert tokens("a\nb") == "a b"


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("发票", [0, 3]),  # two characters: what FTS5's trigram tokenizer cannot find
        ("增值税发票", [0]),
        ("税发", [0]),  # any substring, across word boundaries
        ("票", [0, 3]),  # one character, at the end of a run or inside one
        ("码", [0, 2, 3]),
        ("取件码", [0, 2]),  # spaces and punctuation between Chinese characters do not matter
        ("会议纪要", [1]),  # Traditional in the photo, Simplified typed
        ("會議", [1]),  # and the other way round
        ("meet", [1]),  # the start of a word, any case
        ("MEETING NOTES", [1]),
        ("abc123", [4]),  # full-width letters and digits
        ("８-３-２０１７", [0]),
        ("发票 2017", [0]),  # space-separated terms: all of them, anywhere
        ("发票号码", [3]),
        ("票号", [3]),
        ("发票号", [3]),
        ("猫", []),
    ],
)
def test_word_queries_find_substrings(fts, query, found):
    assert fts(query) == found


def test_a_query_of_only_punctuation_matches_nothing_and_a_huge_one_is_refused():
    assert WordQuery.parse("，。！ ") is None
    with pytest.raises(QueryError, match="at most"):
        WordQuery.parse("发" * 500)


def test_highlight_spans_point_into_the_line_as_written():
    line = "會議·紀要：取 件 码 123"
    assert [line[s:e] for s, e in spans(line, ["会议纪要"])] == ["會議·紀要"]
    assert [line[s:e] for s, e in spans(line, ["取件码", "123"])] == ["取 件 码", "123"]
    assert spans("发票发票", ["发票"]) == [(0, 4)]  # adjacent matches merge
    assert matching_lines(["一", "增值税发票"], ["发票"]) == [{"text": "增值税发票", "spans": [[3, 5]]}]


# -- the index: reading stage and search ------------------------------------------------------------

WORDS = {
    "fapiao.png": ["增值税普通发票"],
    "kuaidi.png": ["请凭取件码领取包裹"],
    "huiyi.png": ["會議紀要"],
    "haoma.png": ["发票号码 2024"],
}


def _photos(root):
    for i, (name, lines) in enumerate(WORDS.items()):
        word_photo(root / name, lines, seed=i)
    (root / "plain").mkdir()
    for i, image in enumerate(random_images(2, seed=9)):
        image.resize((320, 240)).save(root / "plain" / f"{i}.png")
    return root


class CountingReader(WordReader):
    """The process's real reader (its models loaded once), counting what it reads, failing on names in `fail`."""

    def __init__(self, fail=(), eio=()):
        super().__init__()
        self.paths: list[str] = []
        self.fail, self.eio = set(fail), set(eio)

    def read_file(self, path, max_pixels=None):
        self.paths.append(str(path))
        if any(str(path).endswith(name) for name in self.fail):
            raise ImageError(f"{path}: the reader gave up (test)")
        if any(str(path).endswith(name) for name in self.eio):  # as a network mount that dropped mid-read
            error = OSError(errno.EIO, os.strerror(errno.EIO))
            raise ImageError(f"{path}: truncated or corrupt image data ({error})") from error
        return default_reader().read_file(path)


@pytest.fixture(scope="module")
def indexed(tiny_vit, tmp_path_factory):
    root = _photos(tmp_path_factory.mktemp("photos"))
    index = cnclip.Index.open(tmp_path_factory.mktemp("idx"), model=tiny_vit, create=True)
    index.add_folder(root, workers=1)
    reader = CountingReader()
    summary = index.read_words(reader=reader)
    yield index, root, summary, reader
    index.close()


def test_reading_records_the_words_of_every_photo_once(indexed):
    index, root, summary, reader = indexed
    assert (summary.read, summary.with_words, summary.failed) == (6, 4, [])
    assert len(reader.paths) == 6
    assert index.catalog.words_progress() == {"photos": 6, "read": 6, "with_words": 4, "failed": 0}
    assert index.stats()["words"]["with_words"] == 4
    again = index.read_words(reader=reader)
    assert again.read == 0 and len(reader.paths) == 6  # nothing new: nothing read


def test_photos_with_the_words_come_first_with_the_match(indexed):
    index, root, _, _ = indexed
    hits = index.search_text("发票", k=6)
    assert {h.path for h in hits[:2]} == {str(root / "fapiao.png"), str(root / "haoma.png")}
    assert len(hits) == 6 and all(h.words is None for h in hits[2:])
    by_path = {h.path: h for h in hits[:2]}
    assert by_path[str(root / "fapiao.png")].words == ({"text": "增值税普通发票", "spans": [[5, 7]]},)
    assert by_path[str(root / "haoma.png")].to_dict()["words"] == [{"text": "发票号码 2024", "spans": [[0, 2]]}]
    # among the word matches, the order is the picture's: the score is the same cosine as without words
    plain = {h.path: h.score for h in index.search_text("发票", k=6, words="off")}
    assert [h.score for h in hits[:2]] == sorted((plain[p] for p in by_path), reverse=True)
    assert all(h.score == pytest.approx(plain[h.path]) for h in hits)


def test_words_only_and_words_off(indexed):
    index, root, _, _ = indexed
    assert [h.path for h in index.search_text("取件码", k=5, words="only")] == [str(root / "kuaidi.png")]
    assert index.search_text("不存在的字", k=5, words="only") == []
    off = index.search_text("取件码", k=6, words="off")
    assert all(h.words is None for h in off) and len(off) == 6
    with pytest.raises(QueryError, match="words must be"):
        index.search_text("取件码", words="sometimes")


def test_traditional_and_simplified_find_each_other(indexed):
    index, root, _, _ = indexed
    assert [h.path for h in index.search_text("会议纪要", words="only")] == [str(root / "huiyi.png")]
    assert [h.path for h in index.search_text("發票號碼", words="only")] == [str(root / "haoma.png")]


def test_filters_apply_to_word_matches(indexed):
    index, root, _, _ = indexed
    where = index.filter(folders=[root / "plain"])
    assert index.search_text("发票", k=3, where=where, words="only") == []
    hits = index.search_text("发票", k=3, where=where)
    assert hits and all("/plain/" in h.path and h.words is None for h in hits)


def _indexed_words(model, tmp_path, pictures: dict[str, list[str]]):
    """(open Index, photo folder): `pictures` (name -> lines) drawn, indexed with `model`, words not read yet."""
    root = tmp_path / "photos"
    for seed, (name, lines) in enumerate(pictures.items()):
        word_photo(root / name, lines, seed=seed)
    index = cnclip.Index.open(tmp_path / "idx", model=model, create=True)
    index.add_folder(root, workers=1)
    return index, root


def test_a_copy_is_not_read_again_and_changed_words_are(tiny_vit, tmp_path):
    index, root = _indexed_words(tiny_vit, tmp_path, {"a.png": ["取件码"]})
    with index:
        reader = CountingReader()
        index.read_words(reader=reader)
        shutil.copy(root / "a.png", root / "copy.png")
        index.add_folder(root, workers=1)
        assert index.read_words(reader=reader).read == 0 and len(reader.paths) == 1
        assert {h.path for h in index.search_text("取件码", words="only")} == {
            str(root / "a.png"),
            str(root / "copy.png"),
        }

        word_photo(root / "a.png", ["会议纪要"], seed=4)  # new words in the same file
        index.add_folder(root, workers=1)
        assert index.read_words(reader=reader).read == 1
        assert [h.path for h in index.search_text("取件码", words="only")] == [str(root / "copy.png")]
        assert [h.path for h in index.search_text("会议", words="only")] == [str(root / "a.png")]


def test_a_photo_the_reader_fails_on_keeps_its_vector(tiny_vit, tmp_path):
    index, root = _indexed_words(tiny_vit, tmp_path, {"good.png": ["取件码"], "bad.png": ["发票"]})
    with index:
        reader = CountingReader(fail={"bad.png"})
        summary = index.read_words(reader=reader)
        assert summary.read == 2 and [p for p, _ in summary.failed] == [str(root / "bad.png")]
        assert "gave up" in summary.failed[0][1]
        assert str(root / "bad.png") in {h.path for h in index.search_text("发票", k=2)}  # by its picture
        assert index.catalog.words_progress()["failed"] == 1
        assert index.read_words(reader=reader).read == 0  # recorded: not retried until it changes
        # asked for by name (`cnclip index --ocr-only`), it is tried again; read this time, it is found
        again = index.read_words(reader=CountingReader(), retry_failed=True)
        assert again.read == 1 and again.failed == [] and again.with_words == 1
        assert index.catalog.words_progress()["failed"] == 0
        assert [h.path for h in index.search_text("发票", words="only")] == [str(root / "bad.png")]


def test_a_photo_that_cannot_be_got_at_is_not_marked_and_is_read_when_back(tiny_vit, tmp_path):
    """Deleted since it was embedded (restored from the trash later), or on a drive that dropped:
    nothing about its content is known, so nothing is recorded and the next run reads it."""
    index, root = _indexed_words(tiny_vit, tmp_path, {"a.png": ["取件码"], "trash.png": ["发票"], "nas.png": ["合同"]})
    with index:
        saved = (root / "trash.png").read_bytes()
        (root / "trash.png").unlink()
        summary = index.read_words(reader=CountingReader(eio={"nas.png"}))
        assert summary.read == 1 and summary.failed == []
        assert sorted(p for p, _ in summary.unreachable) == [str(root / "nas.png"), str(root / "trash.png")]
        assert "Input/output error" in dict(summary.unreachable)[str(root / "nas.png")]
        assert index.catalog.words_progress() == {"photos": 3, "read": 1, "with_words": 1, "failed": 0}

        (root / "trash.png").write_bytes(saved)  # back from the trash, and the drive is back
        again = index.read_words(reader=CountingReader())
        assert again.read == 2 and again.unreachable == [] and again.with_words == 2
        assert [h.path for h in index.search_text("发票", words="only")] == [str(root / "trash.png")]


def test_a_copy_that_can_be_got_at_stands_in_for_one_that_cannot(tiny_vit, tmp_path):
    """The same photo on a NAS that dropped and on the laptop: its words are read from the laptop."""
    index, root = _indexed_words(tiny_vit, tmp_path, {"1-nas/a.png": ["取件码"]})
    shutil.copytree(root / "1-nas", root / "2-laptop")
    with index:
        index.add_folder(root, workers=1)
        reader = CountingReader(eio={"1-nas/a.png"})
        summary = index.read_words(reader=reader)
        assert summary.read == 1 and summary.with_words == 1 and summary.unreachable == []
        assert reader.paths == [str(root / "1-nas" / "a.png"), str(root / "2-laptop" / "a.png")]
        hits = {h.path for h in index.search_text("取件码", words="only")}
        assert hits == {str(root / "1-nas" / "a.png"), str(root / "2-laptop" / "a.png")}  # words are per content


def test_a_reader_that_cannot_load_records_nothing_and_the_next_run_reads_all(tiny_vit, tmp_path, monkeypatch):
    """Not installed, or its models do not load: no photo's fault, so none is marked as failed (a
    failure recorded per photo would never be retried until the photo changed)."""
    index, root = _indexed_words(tiny_vit, tmp_path, {"a.png": ["取件码"], "b.png": ["发票"]})
    with index:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "rapidocr", None)  # as if it were not installed
            with pytest.raises(ReaderError, match="needs rapidocr: pip install 'rapidocr==3.10.0'"):
                index.read_words(reader=WordReader(engine="onnxruntime"))
        assert index.catalog.words_progress() == {"photos": 2, "read": 0, "with_words": 0, "failed": 0}
        assert index.read_words(reader=WordReader(engine="onnxruntime")).with_words == 2


@needs_openvino
def test_the_summary_names_the_engine_that_read_after_a_fallback(tiny_vit, tmp_path, monkeypatch):
    index, _ = _indexed_words(tiny_vit, tmp_path, {"a.png": ["取件码"]})
    monkeypatch.setenv("CNCLIP_CPU_BF16", "1")  # OpenVINO picked for this CPU, and it cannot load
    monkeypatch.setattr(ocr, "model_files", lambda: dict.fromkeys(("Det", "Rec", "Cls"), tmp_path / "gone.onnx"))
    with index:
        summary = index.read_words(reader=WordReader())
    assert summary.engine == "onnxruntime" and summary.with_words == 1


def test_reading_stops_between_photos_and_the_next_run_goes_on(tiny_vit, tmp_path):
    root = tmp_path / "photos"
    for i in range(20):
        word_photo(root / f"{i:02d}.png", [f"第{i}号"], size=(320, 160), font_size=32, seed=i)
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(root, workers=1)
        reader = CountingReader()
        calls = iter(range(1000))
        first = index.read_words(reader=reader, should_stop=lambda: next(calls) >= 3)
        assert first.stopped and first.read == 3
        assert index.catalog.words_progress()["read"] == 3
        rest = index.read_words(reader=reader)
        assert rest.read == 17 and not rest.stopped
        assert index.catalog.words_progress() == {"photos": 20, "read": 20, "with_words": 20, "failed": 0}


def test_gc_drops_the_words_with_their_vector(tiny_vit, tmp_path):
    index, root = _indexed_words(tiny_vit, tmp_path, {"a.png": ["取件码"], "b.png": ["发票"]})
    with index:
        index.read_words(reader=CountingReader())
        (root / "a.png").unlink()
        index.add_folder(root, workers=1)
        db = index.catalog
        assert db.collect_garbage() == 1
        conn = sqlite3.connect(db.path)
        assert conn.execute("SELECT count(*) FROM words").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM words_fts WHERE words_fts MATCH '取件'").fetchone()[0] == 0
        assert np.array_equal(db.word_file_ids(WordQuery.parse("发票").fts), db.file_ids())


def test_one_character_ranks_by_the_picture_unless_words_are_asked_for(indexed):
    index, root, _, _ = indexed
    assert all(h.words is None for h in index.search_text("票", k=6))  # 票 alone: in too many photos' words
    assert {h.path for h in index.search_text("票", k=6, words="only")} == {
        str(root / "fapiao.png"),
        str(root / "haoma.png"),
    }


def test_words_in_a_video_find_it_at_their_moment(tiny_vit, tmp_path):
    from PIL import Image

    pictures = [
        Image.open(word_photo(tmp_path / "f0.png", ["城市夜景"], size=(480, 320), font_size=40)),
        Image.open(word_photo(tmp_path / "f1.png", ["请凭取件码领取"], size=(480, 320), font_size=40, seed=3)),
    ]
    root = tmp_path / "videos"
    root.mkdir()
    video = write_video(root / "clip.mp4", pictures, seconds_each=6, fps=4, size=(480, 320), bit_rate=2_000_000)
    with cnclip.Index.open(tmp_path / "idx", model=tiny_vit, create=True) as index:
        index.add_folder(root, workers=1)
        summary = index.read_words(reader=CountingReader())
        assert summary.failed == [] and summary.with_words >= 2
        [hit] = index.search_text("取件码", words="only")
        assert hit.path == str(video) and hit.t is not None and hit.t >= 5.0  # the second scene, from 6 s
        assert hit.words == ({"text": "请凭取件码领取", "spans": [[2, 5]]},)
        [first] = index.search_text("城市夜景", words="only")
        assert first.path == str(video) and first.t < 6.0
