"""Words read in photos, made searchable: normalisation, full-text tokens, queries and highlights.

SQLite FTS5's trigram tokenizer cannot find two-character words (发票, 合同), and its unicode61
tokenizer takes a whole run of Chinese as one token. So the text is tokenized here and FTS5 only
splits on spaces: each run of Chinese (or Japanese, Korean) characters becomes its overlapping
character pairs plus its last character alone (取件码 -> 取件 件码 码), and letters and digits
become words. A query of two or more characters is then a phrase of pairs, which matches exactly
where the text contains it; one character is a prefix query, which finds it at the start of a
pair or as a run's last character, so every occurrence. `scripts/bench/ocr.py` measures the
index at 10^5 and 10^6 photos.

OCR and people write the same words differently, so both sides are normalised alike, one
character at a time: Unicode compatibility forms (full-width Ａ１, ① and ㈱ to A1, 1 and (株)),
case, Traditional to Simplified (OpenCC t2s, as for queries), and spaces and punctuation between
Chinese characters dropped (取 件 码 and 会议·纪要 match 取件码 and 会议纪要).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cnclip.errors import QueryError
from cnclip.model.t2s import to_simplified

MAX_QUERY_CHARS = 200

_folded: dict[str, str] = {}


def _fold(char: str) -> str:
    """One character as matching sees it (several for some compatibility forms, none for a
    control or format character)."""
    out = _folded.get(char)
    if out is None:
        if unicodedata.category(char) in ("Cc", "Cf"):
            out = ""
        else:
            out = to_simplified(unicodedata.normalize("NFKC", char).casefold())
        _folded[char] = out
    return out


def _kind(char: str) -> str:
    """ "cjk" for characters written without spaces between words, "word" for other letters and
    digits, "sep" for everything else (spaces, punctuation, symbols)."""
    category = unicodedata.category(char)
    if category == "Lo":
        return "cjk"
    if category[0] in "LN" or category == "Mn":
        return "word"
    return "sep"


def _runs(text: str) -> Iterator[tuple[str, str]]:
    """(kind, run) of normalised `text`: Chinese runs continue over separators, words end at them."""
    kind, run = "", []
    for original in text:
        for char in _fold(original):
            k = _kind(char)
            if k == "sep":
                if kind == "word":
                    yield kind, "".join(run)
                    kind, run = "", []
                continue
            if k != kind and run:
                yield kind, "".join(run)
                run = []
            kind = k
            run.append(char)
    if run:
        yield kind, "".join(run)


def _cjk_tokens(run: str, last: bool) -> list[str]:
    if len(run) == 1:
        return [run]
    pairs = [run[i : i + 2] for i in range(len(run) - 1)]
    return pairs if last else pairs + [run[-1]]


def tokens(text: str) -> str:
    """The space-separated tokens FTS5 indexes for `text` (lines separated by newlines)."""
    out: list[str] = []
    for line in text.splitlines():
        for kind, run in _runs(line):
            out += _cjk_tokens(run, last=False) if kind == "cjk" else [run]
    return " ".join(out)


@dataclass(frozen=True)
class WordQuery:
    """A words query: space-separated terms, all of which must occur (each as a substring for
    Chinese, as a word, or the start of one for the last word, for letters and digits)."""

    terms: tuple[str, ...]
    fts: str  # the FTS5 MATCH expression
    chars: int  # characters it matches on (letters, digits, Chinese), after normalising

    @classmethod
    def parse(cls, query: str) -> WordQuery | None:
        """The words query for a search text; None when it has nothing to match (only punctuation)."""
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(f"a words query is at most {MAX_QUERY_CHARS} characters, not {len(query)}")
        terms, phrases, chars = [], [], 0
        for term in query.split():
            runs = list(_runs(term))
            if not runs:
                continue
            parts: list[str] = []
            chars += sum(len(run) for _, run in runs)
            for i, (kind, run) in enumerate(runs):
                last = i == len(runs) - 1
                if kind == "cjk":
                    parts += _cjk_tokens(run, last=last)
                else:
                    parts.append(run)
            # the last token as a prefix: a last single character is also the start of a pair,
            # and a last word may continue (meet -> meeting)
            phrases.append(" + ".join(f'"{t}"' for t in parts) + " *")
            terms.append(term)
        if not phrases:
            return None
        return cls(tuple(terms), " AND ".join(f"({p})" for p in phrases), chars)


def _normalised_with_positions(line: str) -> tuple[str, list[int]]:
    """`line` normalised with separators dropped, and for each of its characters the index of
    the original character it came from."""
    chars, where = [], []
    for i, original in enumerate(line):
        for char in _fold(original):
            if _kind(char) != "sep":
                chars.append(char)
                where.append(i)
    return "".join(chars), where


def spans(line: str, terms: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) character ranges of `line` where any of `terms` occurs, merged and sorted:
    what a page highlights. Matched as the search matched (normalised, across separators)."""
    text, where = _normalised_with_positions(line)
    found: list[tuple[int, int]] = []
    for term in terms:
        needle, _ = _normalised_with_positions(term)
        if not needle:
            continue
        start = text.find(needle)
        while start >= 0:
            found.append((where[start], where[start + len(needle) - 1] + 1))
            start = text.find(needle, start + 1)
    merged: list[tuple[int, int]] = []
    for s, e in sorted(found):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def matching_lines(lines: Sequence[str], terms: Sequence[str]) -> list[dict]:
    """The lines that hold a match, each {"text", "spans"}; all lines, without spans, when the
    match spans lines."""
    out = [{"text": line, "spans": [list(s) for s in spans(line, terms)]} for line in lines]
    hit = [o for o in out if o["spans"]]
    return hit or out
