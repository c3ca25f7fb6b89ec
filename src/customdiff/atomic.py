"""Atomic writes: a file appears complete under its name or not at all (temporary sibling, then rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .validate import warn


def make_dirs(folder: str | Path) -> bool:
    """Create `folder` (and its parents) if missing, with a one-line warning naming it; True if created."""
    folder = Path(folder)
    if folder.is_dir():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    warn(f"created the output folder {folder}")
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only when the block succeeds."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_image(image: Any, path: str | Path, format: str = "PNG") -> None:
    """Save a PIL image atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=format)
