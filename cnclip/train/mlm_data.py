"""Masked-language-model data for the text tower: whole-word masking over jieba words, packed blocks.

RoBERTa's recipe adapted to Chinese: no next-sentence task; documents are packed into full
blocks (crossing document boundaries with [SEP]); each time a block is seen it gets a new mask
(dynamic masking); 15 % of its tokens are chosen by whole jieba words, and a chosen word becomes
all [MASK] (80 %), random tokens (10 %) or stays as it is (10 %).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cnclip.errors import CNClipError
from cnclip.model.tokenizer import Tokenizer, normalize_text
from cnclip.userpath import expand_user

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)
MASK_PROB = 0.15
NOT_A_WORD = -1  # word index of [CLS], [SEP] and separators: never chosen


@dataclass
class Block:
    """One packed training sequence: [CLS] tokens [SEP], and which word each token belongs to."""

    ids: np.ndarray  # int64 (L,)
    words: np.ndarray  # int64 (L,), word index within the block, NOT_A_WORD for specials


def read_corpus(path: str | os.PathLike) -> Iterator[str]:
    """Non-empty lines of a text file, or of every .txt file under a folder (sorted), stripped."""
    path = expand_user(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CNClipError(f"{path} has no .txt files; give a text file or a folder of .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise CNClipError(f"no corpus at {path}; give a text file (one document per line) or a folder of .txt files")
    for file in files:
        try:
            with open(file, encoding="utf-8", errors="strict") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line
        except UnicodeDecodeError as e:
            raise CNClipError(f"{file} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from e


def load_user_dict(path: str | os.PathLike | None) -> None:
    """Add a jieba user dictionary (one word per line, optional frequency and tag) before segmenting."""
    if path is None:
        return
    path = expand_user(path)
    if not path.is_file():
        raise CNClipError(f"no jieba user dictionary at {path}; give a text file with one word per line")
    _jieba().load_userdict(str(path))


def _jieba():
    """jieba, without the lines it logs to stderr when its dictionary loads (once per process, and so
    once more in every data-loading worker: `cnclip pretrain-text` printed them twice)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def word_pieces(tokenizer: Tokenizer, text: str) -> list[list[int]]:
    """`text` segmented by jieba, each word as its token ids (words that give no tokens are dropped)."""
    out = []
    for word in _jieba().lcut(normalize_text(text), HMM=True):
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
        if ids:
            out.append(ids)
    return out


def pack_blocks(tokenizer: Tokenizer, documents: Sequence[str] | Iterator[str], max_length: int) -> list[Block]:
    """Pack documents into blocks of at most `max_length` tokens ([CLS] ... [SEP]).

    Documents follow each other with a [SEP] between them, and a block is cut only between words
    (a word longer than a whole block is cut); the last block may be shorter.
    """
    if max_length < 8:
        raise CNClipError(f"--max-length {max_length} is too short for masked-language training; use 64 or more")
    room = max_length - 2
    blocks: list[Block] = []
    ids: list[int] = []
    words: list[int] = []
    n_words = 0

    def flush() -> None:
        nonlocal ids, words, n_words
        while ids and ids[-1] == tokenizer.sep_id:  # a separator at the end says nothing
            ids.pop(), words.pop()
        if ids:
            blocks.append(
                Block(
                    np.array([tokenizer.cls_id, *ids, tokenizer.sep_id], dtype=np.int64),
                    np.array([NOT_A_WORD, *words, NOT_A_WORD], dtype=np.int64),
                )
            )
        ids, words, n_words = [], [], 0

    for doc in documents:
        if ids:
            if len(ids) + 1 >= room:
                flush()
            else:
                ids.append(tokenizer.sep_id)
                words.append(NOT_A_WORD)
        for piece in word_pieces(tokenizer, doc):
            while len(piece) > room:  # longer than a block: the only word ever cut
                flush()
                ids, words = piece[:room], [0] * room
                flush()
                piece = piece[room:]
            if len(ids) + len(piece) > room:
                flush()
            ids.extend(piece)
            words.extend([n_words] * len(piece))
            n_words += 1
    flush()
    return blocks


@dataclass(frozen=True)
class Masker:
    """Whole-word masking: choose ~`prob` of a block's tokens by whole words; 80/10/10 per word."""

    mask_id: int
    vocab_size: int
    first_regular_id: int  # random replacements are drawn from [first_regular_id, vocab_size): no specials
    prob: float = MASK_PROB

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, prob: float = MASK_PROB) -> Masker:
        specials = (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)
        return cls(tokenizer.mask_id, tokenizer.vocab_size, max(specials) + 1, prob)

    def __call__(self, block: Block, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels): labels hold the original id where a token is to be predicted, else IGNORE."""
        ids, words = block.ids, block.words
        candidates = np.unique(words[words != NOT_A_WORD])
        inputs, labels = ids.copy(), np.full_like(ids, IGNORE)
        maskable = int((words != NOT_A_WORD).sum())
        if maskable == 0:
            return inputs, labels
        target = max(1, int(round(maskable * self.prob)))
        covered = 0
        for word in rng.permutation(candidates):
            if covered >= target:
                break
            positions = np.flatnonzero(words == word)
            if covered + len(positions) > target:  # would overshoot: look for a shorter word
                continue
            covered += len(positions)
            labels[positions] = ids[positions]
            roll = rng.random()
            if roll < 0.8:
                inputs[positions] = self.mask_id
            elif roll < 0.9:
                inputs[positions] = rng.integers(self.first_regular_id, self.vocab_size, len(positions))
        return inputs, labels


def mask_batch(
    blocks: Sequence[Block], masker: Masker, rng: np.random.Generator, pad_id: int
) -> dict[str, torch.Tensor]:
    """Masked blocks padded to the longest: input_ids, attention_mask and labels (N, L)."""
    width = max(len(b.ids) for b in blocks)
    input_ids = np.full((len(blocks), width), pad_id, dtype=np.int64)
    labels = np.full((len(blocks), width), IGNORE, dtype=np.int64)
    attention = np.zeros((len(blocks), width), dtype=np.int64)
    for row, block in enumerate(blocks):
        inputs, lab = masker(block, rng)
        input_ids[row, : len(inputs)] = inputs
        labels[row, : len(lab)] = lab
        attention[row, : len(inputs)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
    }


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The masks of one batch: new in every epoch (dynamic masking), the same again after a resume."""
    return np.random.default_rng([seed, epoch, batch])
