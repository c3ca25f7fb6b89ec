"""Publishing output folders: staged beside the destination, moved in at the end, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from PIL import Image

METRICS_FILE, REPORT_FILE, IMAGES_DIR = "metrics.json", "metrics.md", "images"


def check_out(out: Path) -> None:
    """Refuse an --out that holds an `images` folder not written by a previous evaluation."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if (out / IMAGES_DIR).exists() and not (out / METRICS_FILE).exists():
        raise UserError(f"--out {out}: has an images/ folder that is not from `customdiff eval`; choose another --out")


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside `out` (same file system, so publishing is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def publish(staging: Path, out: Path) -> None:
    """Move the staged items into `out`, replacing same-named ones; metrics.json last, so it marks completion."""
    out.mkdir(parents=True, exist_ok=True)
    items = sorted(staging.iterdir(), key=lambda p: p.name == METRICS_FILE)
    for item in items:
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            old = staging / (".old." + item.name)
            os.replace(dest, old)  # swap out first, so a failure leaves either the old or the new item
            os.replace(item, dest)
            shutil.rmtree(old)
        else:
            os.replace(item, dest)
    staging.rmdir()


def write_image_folder(folder: Path, images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
                       cols: int) -> None:
    """`{index:04d}.png` per image, `grid.png` and `prompts.json` ({file, prompt, seed} per image)."""
    from .sample import make_grid

    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (im, prompt, s) in enumerate(zip(images, prompts, seeds, strict=True)):
        im.save(folder / f"{i:04d}.png")
        index.append({"file": f"{i:04d}.png", "prompt": prompt, "seed": s})
    make_grid(images, cols=cols).save(folder / "grid.png")
    (folder / "prompts.json").write_text(json.dumps(index, indent=1))


def read_image_folder(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """The images and prompts of a folder `write_image_folder` wrote."""
    from .data import load_image

    index_file = folder / "prompts.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--images: {index_file} is missing or broken ({e}); give the images folder a "
                        "previous `customdiff eval` wrote") from e
    return [load_image(folder / x["file"]) for x in index], [x["prompt"] for x in index]
