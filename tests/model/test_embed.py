"""Pipelined file embedding: same vectors as the direct path, bad files reported per batch."""

from __future__ import annotations

import numpy as np
from conftest import random_images

from cnclip.model.embed import embed_files


def test_embed_files_matches_embed_images_and_reports_failures(tiny_vit_encoder, tmp_path):
    images = random_images(7)
    paths = []
    for i, img in enumerate(images):
        p = tmp_path / f"{i}.png"
        img.save(p)
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    paths.insert(3, str(tmp_path / "bad.jpg"))
    paths.append(str(tmp_path / "gone.png"))

    batches = list(embed_files(tiny_vit_encoder, paths, batch_size=3, workers=2))
    assert len(batches) == 3
    ok = [p for b in batches for p in b.paths]
    vectors = np.concatenate([b.vectors for b in batches])
    failed = dict(f for b in batches for f in b.failed)
    assert ok == [p for p in paths if "bad" not in p and "gone" not in p]
    assert set(failed) == {str(tmp_path / "bad.jpg"), str(tmp_path / "gone.png")}
    assert "bad.jpg" in failed[str(tmp_path / "bad.jpg")]
    np.testing.assert_allclose(vectors, tiny_vit_encoder.embed_images(images), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


def test_embed_files_all_bad_batch(tiny_vit_encoder, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (batch,) = embed_files(tiny_vit_encoder, [str(tmp_path / "a.jpg")])
    assert batch.paths == [] and batch.vectors.shape == (0, 32) and len(batch.failed) == 1
