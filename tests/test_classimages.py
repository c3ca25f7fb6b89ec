"""Generated regularization images: cached, resumable, deterministic per index."""

from __future__ import annotations

from customdiff.base import load_pipeline
from customdiff.classimages import ensure_class_images


def test_generation_resumes_with_identical_images(tiny_base, tmp_path):
    pipe = load_pipeline(tiny_base)
    folder = tmp_path / "cls"
    ensure_class_images(pipe, "photo of a cat", folder, 3, seed=5, batch_size=2, steps=2, progress=False)
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png"]
    assert (folder / "00001.txt").read_text().strip() == "photo of a cat"
    kept = (folder / "00000.png").read_bytes()
    lost = (folder / "00002.png").read_bytes()
    (folder / "00002.png").unlink()  # as if interrupted before the last image
    mtime = (folder / "00000.png").stat().st_mtime_ns
    ensure_class_images(pipe, "photo of a cat", folder, 3, seed=5, batch_size=2, steps=2, progress=False)
    assert (folder / "00000.png").read_bytes() == kept and (folder / "00000.png").stat().st_mtime_ns == mtime
    assert (folder / "00002.png").read_bytes() == lost  # regenerated from the same per-index seed
    ensure_class_images(pipe, "photo of a cat", folder, 4, seed=5, batch_size=2, steps=2, progress=False)
    assert len(list(folder.glob("*.png"))) == 4
