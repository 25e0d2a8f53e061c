"""Traditional -> Simplified conversion of text on its way into the model."""

from __future__ import annotations

import threading

import pytest

from cnclip.errors import CNClipError
from cnclip.model import t2s
from cnclip.model.t2s import T2S_ENV, t2s_default, to_simplified, to_simplified_all


def test_traditional_becomes_simplified():
    assert to_simplified("海邊的日落") == "海边的日落"
    assert to_simplified("一隻貓在沙發上睡覺") == "一只猫在沙发上睡觉"
    assert to_simplified("頭髮乾淨的小孩在後面") == "头发干净的小孩在后面"
    assert to_simplified_all(["東京鐵塔", "cat"]) == ["东京铁塔", "cat"]


@pytest.mark.parametrize(
    "text",
    ["海边的日落", "一只黑色的狗在草地上奔跑", "两个孩子在沙滩上玩耍", "乾隆年间", "著名的建筑", "sunset 2024", ""],
)
def test_simplified_and_ascii_text_pass_unchanged(text):
    assert to_simplified(text) == text


def test_ascii_does_not_load_opencc(monkeypatch):
    monkeypatch.setattr(t2s, "_converter", None)
    monkeypatch.setattr(t2s, "_t2s", lambda: pytest.fail("OpenCC loaded for ASCII text"))
    assert to_simplified("a red car") == "a red car"


def test_missing_opencc_is_one_line_with_the_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_opencc(name, *args, **kwargs):
        if name == "opencc":
            raise ImportError("No module named 'opencc'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(t2s, "_converter", None)
    monkeypatch.setattr(builtins, "__import__", no_opencc)
    with pytest.raises(CNClipError, match="pip install opencc.*--no-t2s"):
        to_simplified("海邊")


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("yes", True), ("0", False), ("off", False)])
def test_env_sets_the_default(monkeypatch, value, expected):
    monkeypatch.setenv(T2S_ENV, value)
    assert t2s_default() is expected


def test_env_unset_gives_the_measured_default(monkeypatch):
    monkeypatch.delenv(T2S_ENV, raising=False)
    assert t2s_default() is t2s.DEFAULT_T2S


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv(T2S_ENV, "maybe")
    with pytest.raises(CNClipError, match=r"\$CNCLIP_T2S is 'maybe'"):
        t2s_default()


def test_threads_share_the_converter():
    results: list[str] = []

    def work():
        results.extend(to_simplified("廣州的夜景") for _ in range(200))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["广州的夜景"] * 800
