"""Captioned image folders from the world: NNNNNN.png + NNNNNN.txt (the layout the trainer reads)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .world import SHAPES, SIZE, caption, render, sample_scene

log = logging.getLogger(__name__)


def _write(out: Path, i: int, image, text: str) -> None:
    image.save(out / f"{i:06d}.png")
    (out / f"{i:06d}.txt").write_text(text + "\n")


def write_corpus(out_dir: str | Path, n: int, seed: int, size: int = SIZE) -> Path:
    """Write n random world images with caption sidecars (a stand-in for LAION)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = sample_scene(rng, size=size)
        _write(out, i, render(scene, size), caption(scene, size))
    log.info("wrote %d corpus images to %s", n, out)
    return out


def write_class_images(out_dir: str | Path, class_word: str, n: int, seed: int, size: int = SIZE) -> Path:
    """Write n real world images whose main object is `class_word`, with their captions."""
    if class_word not in SHAPES:
        raise ValueError(f"{class_word!r} is not a class of the toy world {SHAPES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = sample_scene(rng, size=size, shape=class_word)
        _write(out, i, render(scene, size), caption(scene, size))
    log.info("wrote %d %s images to %s", n, class_word, out)
    return out
