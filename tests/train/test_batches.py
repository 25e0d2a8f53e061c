"""Tests for cnclip.train.batches: image-unique batches, the tensors of a batch, their collation."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnclip.model.tokenizer import Tokenizer, normalize_text
from cnclip.train.batches import PairDataset, collate_pairs, unique_image_batches
from cnclip.train.pairs import Pair


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path, format=fmt)
    return path


# 1. image-unique batches ---------------------------------------------------------------------------


def _captioned(images: int, captions: int) -> list[Pair]:
    return [Pair(f"/img/{i}.jpg", f"caption {c}") for i in range(images) for c in range(captions)]


def _assert_unique_images(pairs: list[Pair], batches: list[list[int]]) -> None:
    for batch in batches:
        assert len({pairs[i].image for i in batch}) == len(batch)


@pytest.mark.parametrize("batch_size", [2, 8, 32, 50])
def test_batches_never_repeat_an_image(batch_size: int) -> None:
    pairs = _captioned(200, 5)
    for seed in range(30):
        batches = unique_image_batches(pairs, batch_size, seed=seed, epoch=seed % 3)
        _assert_unique_images(pairs, batches)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        assert all(len(b) == batch_size for b in batches)  # drop_last: only full batches
        assert len(flat) > len(pairs) - batch_size


def test_batches_cover_every_pair_when_sizes_divide() -> None:
    pairs = _captioned(64, 5)  # 320 pairs
    for seed in range(50):
        for batch_size in (32, 40, 64):
            batches = unique_image_batches(pairs, batch_size, seed=seed, epoch=0)
            assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
            assert len(batches) == len(pairs) // batch_size
            _assert_unique_images(pairs, batches)


def test_batches_are_deterministic_and_change_per_epoch() -> None:
    pairs = _captioned(100, 3)
    first = unique_image_batches(pairs, 16, seed=7, epoch=0)
    assert first == unique_image_batches(pairs, 16, seed=7, epoch=0)
    assert first != unique_image_batches(pairs, 16, seed=7, epoch=1)
    assert first != unique_image_batches(pairs, 16, seed=8, epoch=0)


def test_batches_on_35000_pairs() -> None:
    pairs = _captioned(7000, 5)
    for batch_size in (256, 5000):
        batches = unique_image_batches(pairs, batch_size, seed=0, epoch=0)
        _assert_unique_images(pairs, batches)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == batch_size * (len(pairs) // batch_size)


def test_batches_with_one_image_captioned_more_often_than_batches() -> None:
    pairs = [Pair("/img/same.jpg", f"c{i}") for i in range(300)] + _captioned(100, 1)
    kept = unique_image_batches(pairs, 10, seed=1, epoch=0)
    _assert_unique_images(pairs, kept)
    assert all(len(b) == 10 for b in kept)
    everything = unique_image_batches(pairs, 10, seed=1, epoch=0, drop_last=False)
    _assert_unique_images(pairs, everything)
    assert sorted(i for b in everything for i in b) == list(range(len(pairs)))


def test_batches_edge_cases() -> None:
    assert unique_image_batches([], 4, seed=0, epoch=0) == []
    pairs = _captioned(3, 1)
    assert unique_image_batches(pairs, 4, seed=0, epoch=0) == []
    assert sorted(unique_image_batches(pairs, 4, seed=0, epoch=0, drop_last=False)[0]) == [0, 1, 2]
    with pytest.raises(ValueError, match="batch_size"):
        unique_image_batches(pairs, 0, seed=0, epoch=0)


# 2. tensors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def test_dataset_and_collate_drop_a_corrupt_image(tmp_path: Path, tokenizer: Tokenizer) -> None:
    good = _image(tmp_path / "good.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:100])
    other = _image(tmp_path / "other.png", (0, 0, 255), fmt="PNG")
    texts = ["一只很长很长很长的红色的猫在沙发上睡觉", "坏图", "蓝色"]
    pairs = [Pair(str(good), texts[0]), Pair(str(corrupt), texts[1]), Pair(str(other), texts[2])]
    dataset = PairDataset(pairs, 32, tokenizer)
    assert len(dataset) == 3
    items = [dataset[i] for i in range(3)]
    assert items[1] is None

    pixels, ids, dropped = collate_pairs(items)
    assert dropped == 1
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    long_row = tokenizer.encode(normalize_text(texts[0]))
    short_row = tokenizer.encode(normalize_text(texts[2]))
    assert ids.dtype == torch.long and ids.shape == (2, len(long_row))
    assert ids[0].tolist() == long_row
    assert ids[1].tolist() == short_row + [tokenizer.pad_id] * (len(long_row) - len(short_row))


def test_collate_all_unreadable(tokenizer: Tokenizer) -> None:
    pixels, ids, dropped = collate_pairs([None, None])
    assert (pixels.shape[0], ids.shape, dropped) == (0, (0, 0), 2)
    dataset = PairDataset([], 24, tokenizer)
    pixels, ids, dropped = dataset.collate([None])
    assert (pixels.shape, ids.shape, dropped) == ((0, 3, 24, 24), (0, 0), 1)


def test_dataset_pickles_for_spawned_workers(tmp_path: Path, tokenizer: Tokenizer) -> None:
    pair = Pair(str(_image(tmp_path / "a.jpg")), "红色")
    dataset = PairDataset([pair], 16, tokenizer, draft=False)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.tokenizer.encode("红色") == tokenizer.encode("红色")
    assert torch.equal(copy[0][0], dataset[0][0])


def test_dataloader_with_unique_batches(tmp_path: Path, tokenizer: Tokenizer) -> None:
    paths = [str(_image(tmp_path / f"{i}.jpg", (i * 40, 0, 0))) for i in range(4)]
    pairs = [Pair(p, f"第{c}句") for p in paths for c in range(2)]
    batches = unique_image_batches(pairs, 4, seed=0, epoch=0)
    dataset = PairDataset(pairs, 16, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_pairs)
    shapes = [(x.shape, t.shape[0], d) for x, t, d in loader]
    assert shapes == [((4, 3, 16, 16), 4, 0)] * 2
