"""Outputs of every command: atomic files, folders published whole or not at all, the foreign-output check
and image folders.

A file appears complete under its name or not at all (a temporary sibling, then a rename). A folder is built
in a staging folder beside its destination (same file system) and moved in at the end: `staged(out)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .validate import check_replaceable, check_utf8, warn

if TYPE_CHECKING:
    from PIL import Image

METRICS_FILE, REPORT_FILE, IMAGES_DIR = "metrics.json", "metrics.md", "images"
INDEX_FILE, GRID_FILE = "prompts.json", "grid.png"


# ---------------------------------------------------------------- files


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


# ---------------------------------------------------------------- folders


def check_out(out: str | Path, command: str, markers: str | Sequence[str], replaces: Sequence[str] | None = None,
              flag: str = "--out") -> Path:
    """Refuse an output folder that is a file, or that holds what `command` would replace without any of its
    `markers` (files an earlier run of `command` left). `replaces`: the items it replaces (None: the whole
    folder, so any content counts)."""
    out = Path(out)
    check_utf8(flag, out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a folder")
    check_replaceable(flag, out, whole=replaces is None)  # it is built beside itself, then moved in
    if not out.is_dir():
        return out
    if any((out / m).exists() for m in ([markers] if isinstance(markers, str) else markers)):
        return out
    at_risk = [out / n for n in replaces] if replaces is not None else list(out.iterdir())
    found = next((p for p in at_risk if p.exists()), None)
    if found is not None:
        what = f"has {found.name}{'/' if found.is_dir() else ''}" if replaces is not None else "holds files"
        raise UserError(f"{flag} {out}: {what} not from `customdiff {command}`; choose a new or empty folder, "
                        f"or an earlier `customdiff {command}` output")
    return out


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside `out` (same file system, so publishing is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def _swap(new: Path, dest: Path, old: Path) -> None:
    """Put `new` at `dest`; an existing folder is moved to `old` first, so a failure leaves the old or the new."""
    if dest.is_dir() and not dest.is_symlink():
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old)
    else:
        os.replace(new, dest)


def publish(staging: Path, out: Path, replace: bool = False, last: str | None = METRICS_FILE) -> None:
    """Move a staged folder to `out`: as a whole when `out` is new (or `replace`), else item by item,
    replacing same-named items and keeping others, the item named `last` moved last (it marks completion)."""
    if not out.exists():
        os.chmod(staging, 0o755)  # mkdtemp creates 0700; outputs are ordinary folders
        os.replace(staging, out)
        warn(f"created the output folder {out}")
        return
    if replace:
        os.chmod(staging, 0o755)
        _swap(staging, out, staging.with_name(staging.name + ".old"))
        return
    for item in sorted(staging.iterdir(), key=lambda p: p.name == last):
        _swap(item, out / item.name, staging / (".old." + item.name))
    staging.rmdir()


@contextlib.contextmanager
def staged(out: str | Path, replace: bool = False, last: str | None = METRICS_FILE) -> Iterator[Path]:
    """Yield a staging folder for `out`; when the block succeeds it is published (see `publish`), and in
    every case nothing of it is left behind."""
    out = Path(out)
    staging = staging_dir(out)
    token = _publishing.set((*_publishing.get(), (staging, out)))
    try:
        yield staging
        publish(staging, out, replace=replace, last=last)
    finally:
        _publishing.reset(token)
        if staging.exists():
            shutil.rmtree(staging)


# (staging folder, destination) of every `staged` block the current code runs in, innermost last
_publishing: contextvars.ContextVar[tuple[tuple[Path, Path], ...]] = contextvars.ContextVar("publishing", default=())


def final_path(path: str | Path) -> Path:
    """Where `path` will be once the staging folder it lies in is published (`path` itself outside one): the name
    to show in logs, since a staging folder is gone by the time anyone reads them."""
    path = Path(path)
    for staging, out in reversed(_publishing.get()):  # an inner block's destination may lie in an outer's staging
        if path == staging or staging in path.parents:
            path = out / path.relative_to(staging)
    return path


# ---------------------------------------------------------------- image folders


def write_image_folder(folder: str | Path, images: Sequence[Image.Image], prompts: Sequence[str],
                       seeds: Sequence[int], cols: int | None = None) -> list[Path]:
    """`{index:04d}.png` per image, `grid.png` and `prompts.json` ({file, prompt, seed} per image), each file
    atomic; on failure the files written so far are removed. Returns the image paths."""
    from .sample import make_grid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index = []
    try:
        for i, (im, prompt, s) in enumerate(zip(images, prompts, seeds, strict=True)):
            path = folder / f"{i:04d}.png"
            save_image(im, path)
            written.append(path)
            index.append({"file": path.name, "prompt": prompt, "seed": s})
        save_image(make_grid(images, cols=cols), folder / GRID_FILE)
        written.append(folder / GRID_FILE)
        write_text(folder / INDEX_FILE, json.dumps(index, indent=1))
    except BaseException:  # interrupts included: no partial image folder
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return written[:len(index)]


def read_image_folder(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """The images and prompts of a folder `write_image_folder` wrote."""
    from .data import load_image

    index_file = folder / INDEX_FILE
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--images: {index_file} is missing or broken ({e}); give the images folder a "
                        "previous `customdiff eval` wrote") from e
    return [load_image(folder / x["file"]) for x in index], [x["prompt"] for x in index]
