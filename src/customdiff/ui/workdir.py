"""The UI's work folder: every file the app reads or writes lives under it, named by the app, never by the browser.

Layout: deltas/ (the library), jobs/<id>/ (photos, regularization uploads, previews, checkpoints, job.json),
samples/<id>/ (sampled images), exports/ (LoRA zips). Names coming from the browser are only ever looked up
in these listings (`entry`), or turned into new names by `safe_name`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

ENTRY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_UPLOAD_BYTES = 30 * 1024 * 1024  # one photo or delta file
MAX_PHOTOS = 20  # the fewest, data.MIN_PHOTOS, is where the command line warns
MAX_REG_IMAGES = 1000  # class images generated for a job
# class images uploaded with a job: with a caption each and 20 photos, under the 1000 files a form may carry
MAX_REG_UPLOAD = 480
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
                 "MPO": ".jpg"}


def safe_name(text: str, default: str = "concept", limit: int = 48) -> str:
    """A file-name stem from user text: ASCII letters, digits, '-' and '_' only, never empty or hidden."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_.")[:limit].strip("-_")
    return stem or default


def display_name(name: str) -> str:
    """A browser-given file name shortened for messages (no folders, no control characters)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(c for c in base if c.isprintable())
    return (base[:60] + "...") if len(base) > 63 else (base or "(unnamed file)")


@dataclass
class Workdir:
    """Paths of one work folder."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        for d in (self.deltas, self.jobs, self.samples, self.exports, self.tmp):
            if d.exists() and not d.is_dir():
                raise UserError(f"--workdir {self.root}: {d.name} is a file where the app keeps a folder; move it "
                                "away or choose another --workdir")
            d.mkdir(parents=True, exist_ok=True)
            if not os.access(d, os.W_OK | os.X_OK):  # else an upload, a job or a sample fails later, mid-way
                raise UserError(f"--workdir {self.root}: this user may not write in its {d.name}/ folder; change "
                                "its permissions or choose another --workdir")

    @property
    def deltas(self) -> Path:
        """The library: one .safetensors file per delta."""
        return self.root / "deltas"

    @property
    def jobs(self) -> Path:
        """One folder per training job."""
        return self.root / "jobs"

    @property
    def samples(self) -> Path:
        """One folder per sampling run."""
        return self.root / "samples"

    @property
    def exports(self) -> Path:
        """Zipped exports for download."""
        return self.root / "exports"

    @property
    def tmp(self) -> Path:
        """Uploads being checked."""
        return self.root / ".tmp"

    def unique(self, folder: Path, stem: str, suffix: str) -> Path:
        """A path `folder/stem{suffix}` that does not exist yet (stem-2, stem-3, ... when taken)."""
        for i in range(1, 10_000):
            p = folder / (f"{stem}{suffix}" if i == 1 else f"{stem}-{i}{suffix}")
            if not p.exists():
                return p
        raise UserError(f"too many files named {stem}; delete some")


def entry(folder: Path, name: str, kind: str = "file", is_dir: bool = False) -> Path:
    """The existing file or folder `name` directly inside `folder`, or a UserError: the only way a name
    from the browser becomes a path."""
    if not isinstance(name, str) or not ENTRY_RE.match(name) or ".." in name:
        raise UserError(f"no such {kind}: {display_name(str(name))!r}")
    p = folder / name
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok or p.is_symlink() or p.resolve().parent != folder.resolve():
        raise UserError(f"no such {kind}: {name!r}")
    return p


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary sibling, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_image_upload(data: bytes, name: str, folder: Path, stem: str, tmp: Path) -> Path:
    """Check one uploaded image (decodable, not a bomb) and store it as `folder/stem.<ext>`; errors name the
    uploaded file, not any server path."""
    from PIL import Image

    from ..images import open_image

    shown = display_name(name)
    if len(data) > MAX_UPLOAD_BYTES:
        raise UserError(f"{shown}: larger than {MAX_UPLOAD_BYTES // 2**20} MB; use a smaller photo")
    if not data:
        raise UserError(f"{shown}: empty file")
    fd, probe = tempfile.mkstemp(prefix=".upload.", dir=tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            open_image(probe)
            with Image.open(probe) as im:
                ext = IMAGE_FORMATS.get(im.format or "", "")
        except UserError as e:
            raise UserError(str(e).replace(probe, shown)) from None
        if not ext:
            raise UserError(f"{shown}: not a supported image (jpg, png, webp, bmp, gif, tiff)")
        dest = folder / f"{stem}{ext}"
        os.replace(probe, dest)
        os.chmod(dest, 0o644)
        return dest
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def delta_info(path: Path) -> dict[str, Any]:
    """What the library shows about one delta file, read from its header only (no tensors loaded)."""
    from ..delta import FORMAT, read_metadata

    info: dict[str, Any] = {"name": path.name, "bytes": path.stat().st_size, "modified": path.stat().st_mtime}
    try:
        meta = read_metadata(path)
    except UserError as e:
        return {**info, "error": str(e).replace(str(path), path.name)}
    if meta.get("format") != FORMAT:
        return {**info, "error": "not a customdiff delta"}

    def parse(key: str, default: Any) -> Any:
        """The key's JSON value when it has the default's type; else (absent, damaged, another type) the default."""
        try:
            value = json.loads(meta[key]) if key in meta else default
        except (json.JSONDecodeError, RecursionError):
            return default
        return value if isinstance(value, type(default)) else default

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    base, config, tokens = parse("base", {}), parse("config", {}), parse("tokens", [])
    residuals = [r.get("constraint") for r in parse("merge_residuals", {}).values() if isinstance(r, dict)]
    by_matrix = parse("compression", {}).get("ranks")
    ranks = [r for r in by_matrix.values() if number(r)] if isinstance(by_matrix, dict) else []
    steps = config.get("steps")
    return {**info,
            "base": str(base.get("name", "")),
            "tokens": [{"token": str(t.get("token", "")), "class": str(t.get("class", ""))} for t in tokens
                       if isinstance(t, dict)],
            "trained": meta.get("trained", ""), "storage": meta.get("storage", ""),
            "steps": steps if number(steps) else None,
            "merged_from": [str(s.get("source", "")) for s in parse("merge_sources", []) if isinstance(s, dict)],
            "worst_residual": max((r for r in residuals if number(r)), default=None),
            "ranks": [min(ranks), max(ranks)] if ranks else None}


def list_deltas(wd: Workdir) -> list[dict[str, Any]]:
    """Every delta in the library, newest first."""
    items = [delta_info(p) for p in wd.deltas.glob("*.safetensors") if p.is_file() and not p.name.startswith(".")]
    return sorted(items, key=lambda x: -x["modified"])
