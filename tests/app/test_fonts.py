"""The contact sheets' font: telling real glyphs from tofu, ranking CJK font files, `$CNCLIP_FONT`."""

from __future__ import annotations

import pytest
from PIL import ImageFont

from cnclip.app import fonts


def test_glyph_probe_detects_tofu() -> None:
    builtin = ImageFont.load_default(size=20)  # Pillow's own font has no Han glyphs
    assert fonts.has_glyphs(builtin, "Abc")
    assert not fonts.has_glyphs(builtin, "中")


def test_font_name_hints_prefer_regular_cjk() -> None:
    assert fonts._hint_rank("DejaVuSans.ttf") is None
    assert fonts._hint_rank("NotoSansCJK-Regular.txt") is None
    regular = fonts._hint_rank("NotoSansCJK-Regular.ttc")
    bold = fonts._hint_rank("NotoSansCJK-Bold.ttc")
    assert regular is not None and bold is not None and regular < bold
    assert fonts._hint_rank("msyh.ttc") is not None and fonts._hint_rank("wqy-microhei.ttc") is not None


def test_font_choice_honours_cncl_font(monkeypatch: pytest.MonkeyPatch) -> None:
    default = fonts.font_choice()
    if default.path is None:
        pytest.skip("no TrueType font on this machine to point CNCLIP_FONT at")
    monkeypatch.setenv("CNCLIP_FONT", default.path)
    assert fonts.font_choice().path == default.path
