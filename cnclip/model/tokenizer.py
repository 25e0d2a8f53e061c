"""Chinese BERT tokenization with the official cn_clip token ids, on HuggingFace `tokenizers`' WordPiece.

Token ids equal those of the official `cn_clip.clip.tokenize` for every input string. The matching of
words against the vocabulary is `tokenizers`' Rust WordPiece. The character steps before it (cleanup,
CJK splitting, lowercasing, accent stripping, punctuation splitting) are done here with Python's own
`str.lower` and `unicodedata`, as the official code does them: `tokenizers`' BertNormalizer and
BertPreTokenizer use their own Unicode tables and rules, and give other ids than the official code for
private-use characters, word-final capital sigma, characters newer or older than their tables, and the
CJK Extension E block. Also here: the caption normalization the official models were trained with.
"""

from __future__ import annotations

import functools
import os
import threading
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers.models import WordPiece

from cnclip.errors import VocabularyError

if TYPE_CHECKING:  # torch is imported where tensors are made: a query through ONNX Runtime never loads it
    import torch

CONTEXT_LENGTH = 52  # [CLS] + 50 tokens + [SEP], as the official models were trained
DEFAULT_VOCAB = Path(__file__).with_name("resources") / "vocab.txt"

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
_SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)

# Words longer than this become a single [UNK]: the official WordpieceTokenizer's limit (Google's BERT).
_MAX_CHARS_PER_WORD = 200
# Bounds the per-word memo so a stream of unique junk cannot grow memory without limit.
_WORD_CACHE_SIZE = 1 << 17

# The code-point blocks Google's BERT treats as CJK ideographs (each becomes its own word).
# Hiragana, katakana and hangul are deliberately absent: BERT handles them like alphabetic scripts.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def normalize_text(text: str) -> str:
    """Lowercase and turn curly double quotes into ASCII ones, as the official training and eval code does."""
    # Chinese BERT's vocabulary has no entries for “ and ”, so without this they would become [UNK].
    return text.lower().replace("\u201c", '"').replace("\u201d", '"')


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # Every non-alphanumeric printable ASCII char counts, including symbols such as $ ^ ` that
    # Unicode files under S*, so that "a$b" splits the same way "a,b" does.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class _TextMap(dict):
    """`str.translate` table for BERT's per-character cleanup, filled lazily one code point at a time.

    Dropping NUL/U+FFFD/control chars, turning whitespace into a plain space and padding CJK ideographs
    with spaces are all decisions about a single character, so one translate pass does all three at C
    speed once each code point has been classified.
    """

    def __missing__(self, cp: int) -> str | None:
        ch = chr(cp)
        if ch in "\t\n\r ":
            out: str | None = " "
        elif cp == 0 or cp == 0xFFFD:
            out = None
        else:
            cat = unicodedata.category(ch)
            if cat in ("Cc", "Cf"):  # includes zero-width joiners, BOMs, soft hyphens
                out = None
            elif cat == "Zs":
                out = " "
            elif _is_cjk(cp):
                out = f" {ch} "
            else:
                out = ch
        self[cp] = out
        return out


class _WordMap(dict):
    """`str.translate` table for a lowercased, NFD-decomposed word: strips accents and splits off punctuation.

    Dropping nonspacing marks (after NFD that turns café into cafe, and, note, が into か) and padding
    punctuation with spaces, then splitting on whitespace, gives exactly the official word pieces.
    """

    def __missing__(self, cp: int) -> str | None:
        ch = chr(cp)
        if unicodedata.category(ch) == "Mn":
            out: str | None = None
        elif _is_punctuation(ch):
            out = f" {ch} "
        else:
            out = ch
        self[cp] = out
        return out


_TEXT_MAP = _TextMap()
_WORD_MAP = _WordMap()


def _read_vocab(path: Path) -> list[str]:
    """The vocabulary's tokens in id order (line number = id), validated."""
    hint = "point vocab_path at a checkpoint folder's vocab.txt, or omit it to use the bundled Chinese BERT vocabulary"
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise VocabularyError(f"vocabulary file {path} {what}; {hint}")
    try:
        # Text mode splits on \n, \r\n and \r alike, which is how the official loader reads it.
        with open(path, encoding="utf-8") as f:
            tokens = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise VocabularyError(f"vocabulary file {path} is not UTF-8 text ({e.reason}); {hint}") from None
    except OSError as e:
        raise VocabularyError(f"vocabulary file {path} cannot be read ({e.strerror}); {hint}") from None
    if not tokens:
        raise VocabularyError(f"vocabulary file {path} is empty; {hint}")
    present = set(tokens)
    missing = [t for t in _SPECIAL_TOKENS if t not in present]
    if missing:
        raise VocabularyError(f"vocabulary file {path} lacks the special tokens {' '.join(missing)}; {hint}")
    return tokens


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, not {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (room for [CLS] and [SEP]), not {context_length}")
    return context_length


class Tokenizer:
    """Chinese BERT WordPiece tokenizer (lowercasing, accent stripping) producing CLIP text-tower ids."""

    def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH):
        """Load `vocab_path` (a vocab.txt, or a folder holding one); None means the bundled vocabulary."""
        path = DEFAULT_VOCAB if vocab_path is None else Path(vocab_path)
        if path.is_dir() and (path / "vocab.txt").is_file():
            path = path / "vocab.txt"
        self.vocab_path: Path = path
        self.context_length: int = _check_context_length(context_length)

        tokens = _read_vocab(path)
        self._id_to_token: list[str] = tokens
        # A repeated line keeps its last id, as the official loader's dict assignment does.
        self._vocab: dict[str, int] = {tok: i for i, tok in enumerate(tokens)}
        # Ids run over line numbers, so this (not the count of distinct tokens) sizes an embedding table.
        self.vocab_size: int = len(tokens)
        self.pad_id: int = self._vocab[PAD]
        self.unk_id: int = self._vocab[UNK]
        self.cls_id: int = self._vocab[CLS]
        self.sep_id: int = self._vocab[SEP]
        self.mask_id: int = self._vocab[MASK]
        # The Rust matcher; the official WordpieceTokenizer's greedy longest-match-first, same limit.
        self._wordpiece = WordPiece(self._vocab, unk_token=UNK, max_input_chars_per_word=_MAX_CHARS_PER_WORD)
        # Captions repeat words constantly; memoizing per whitespace-separated word makes a whole
        # dataset tokenize in seconds (several times faster than running every word through
        # `tokenizers`). Built per instance because the answer depends on the vocabulary.
        self._word_ids = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._ids_of_word)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_path={str(self.vocab_path)!r}, context_length={self.context_length})"

    # -- the pipeline ---------------------------------------------------------------------------------

    def _words(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return text.translate(_TEXT_MAP).split()

    def _ids_of_word(self, word: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Pieces and ids of one whitespace-separated word: lowercase, strip accents, split punctuation, WordPiece."""
        # Lowercasing the word alone, as the official code does, keeps str.lower's final-sigma rule the same.
        chunks = unicodedata.normalize("NFD", word.lower()).translate(_WORD_MAP).split()
        pieces: list[str] = []
        ids: list[int] = []
        for chunk in chunks:
            try:
                tokens = self._wordpiece.tokenize(chunk)
            except UnicodeEncodeError:
                # A lone surrogate cannot cross into Rust. No UTF-8 vocabulary entry holds one, so
                # the official greedy match fails on it and makes the whole chunk [UNK].
                pieces.append(UNK)
                ids.append(self.unk_id)
                continue
            for t in tokens:
                pieces.append(t.value)
                ids.append(t.id)
        return tuple(pieces), tuple(ids)

    # -- public API -----------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """WordPiece pieces of `text`, without [CLS]/[SEP] and without truncation."""
        out: list[str] = []
        for word in self._words(text):
            out.extend(self._word_ids(word)[0])
        return out

    def _encode(self, text: str, context_length: int) -> list[int]:
        ids: list[int] = [self.cls_id]
        budget = context_length - 2
        for word in self._words(text):
            if len(ids) > budget:  # already full: skip the remaining words, the output cannot change
                break
            ids.extend(self._word_ids(word)[1])
        del ids[budget + 1 :]
        ids.append(self.sep_id)
        return ids

    def encode(self, text: str) -> list[int]:
        """[CLS] + the first context_length - 2 token ids + [SEP]."""
        return self._encode(text, self.context_length)

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        pad_to_longest: bool = True,
    ) -> torch.Tensor:
        """LongTensor (N, L) of encoded rows padded with pad_id; L is the longest row or context_length.

        Padding only to the longest row gives the same [CLS] embedding as padding to context_length
        (padding is masked out) for much less compute on short queries. An empty batch has
        L = context_length.
        """
        length = self.context_length if context_length is None else _check_context_length(context_length)
        if isinstance(texts, str):
            texts = [texts]
        # Any iterable of str is accepted (tuples, generators, numpy arrays, pandas columns).
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TypeError(f"texts must be a str or a sequence of str, not {type(texts).__name__}")
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, not {type(text).__name__}")
            rows.append(self._encode(text, length))
        width = max((len(r) for r in rows), default=length) if pad_to_longest else length
        pad = self.pad_id
        import torch

        # One tensor construction from padded lists is much faster than filling rows one by one.
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """Ids of vocabulary tokens; a token not in the vocabulary maps to unk_id."""
        vocab, unk = self._vocab, self.unk_id
        return [vocab.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary tokens of ids; an id outside [0, vocab_size) raises ValueError."""
        table, n = self._id_to_token, len(self._id_to_token)
        out = []
        for i in ids:
            i = int(i)  # accept numpy/torch integer scalars
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside this vocabulary's range 0..{n - 1}")
            out.append(table[i])
        return out


_default: Tokenizer | None = None
_default_lock = threading.Lock()


def default_tokenizer() -> Tokenizer:
    """The tokenizer over the bundled vocabulary, built on first use and then shared."""
    global _default
    # Built lazily so importing cnclip stays cheap and never touches the vocabulary file.
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Tokenizer()
    return _default


def text_batches(tokenizer: Tokenizer, texts: Sequence[str], batch_size: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """Texts (with the official normalization) as int64 id arrays, each batch padded only to its
    longest row, shortest texts first; with each batch, the positions in `texts` of its rows.

    Padding to the longest row gives the same [CLS] embedding as padding to 52 for far less
    compute, and sorting by length keeps the batches tight.
    """
    if isinstance(texts, str):
        raise TypeError("embed_texts takes a list of strings; wrap a single query as [query]")
    encoded = [tokenizer.encode(normalize_text(t)) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids = np.full((len(rows), max(len(encoded[i]) for i in rows)), tokenizer.pad_id, dtype=np.int64)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = encoded[i]
        yield rows, ids


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Like `cn_clip.clip.tokenize`: LongTensor (N, context_length) over the bundled vocabulary."""
    return default_tokenizer()(texts, context_length=context_length, pad_to_longest=False)
