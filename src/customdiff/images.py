"""Decoding user images once, safely: PIL's decompression-bomb guard as a clear refusal, every mode to RGB.

Modes: 1, L, P, RGB, CMYK, YCbCr go through PIL's conversion; anything with alpha (RGBA, LA, PA, RGBa, La,
P or L or RGB with a transparency entry) is composited on white; 16- and 32-bit greyscale (I;16*, I) and
float (F) images are rescaled to 8 bits instead of clipped (PIL's own conversion turns 16-bit grey white).
Animated files (GIF, APNG, WebP) give their first frame with a warning.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .validate import unreadable, warn

log = logging.getLogger(__name__)

ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's default guard (about 9459 x 9459)
MAX_ASPECT = 4.0  # beyond this the centre square keeps less than a quarter of the photo


def _scaled_grey(im: Image.Image, path: Path) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit L, keeping the picture (not clipping it to white)."""
    arr = np.asarray(im).astype(np.float64)
    if not np.isfinite(arr).all():
        raise UserError(f"{path}: float image with NaN or infinite pixels; re-save it as an ordinary PNG")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        arr = arr / 257.0  # 0..65535 -> 0..255
    elif im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    elif lo >= 0.0 and hi <= 255.0:
        pass  # already 8-bit values
    elif im.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        arr = arr / 257.0  # 16-bit PNGs load as mode I in older Pillow releases
    else:
        warn(f"{path}: {im.mode} pixel values span {lo:g}..{hi:g}; stretched to 0..255")
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, high bit depths rescaled, not clipped."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if mode.startswith("I") or mode == "F":
        return _scaled_grey(im, path).convert("RGB")
    if mode in ALPHA_MODES or "transparency" in im.info:
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # PIL has no La -> RGBA
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise UserError(f"{path}: colour mode {mode} cannot be converted to RGB ({e}); re-save it as RGB") from e


def open_image(path: str | Path, min_side: int = 0) -> Image.Image:
    """Decode an image file to RGB with EXIF orientation applied; bad files, bombs and odd modes handled.

    `min_side` > 0 warns when the photo is smaller than that (e.g. the training resolution).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_PIXELS and raises above twice that; refuse both before decoding a pixel
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    im.seek(0)
                    warn(f"{path}: animated ({frames} frames); using the first frame")
                im.load()  # decode now: a truncated file fails here, not mid-training
                try:
                    im = ImageOps.exif_transpose(im) or im
                except Exception as e:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
                    warn(f"{path}: unreadable EXIF orientation ({type(e).__name__}); used as stored")
                rgb = to_rgb(im, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{path}: too many pixels for an image (over {MAX_PIXELS:,}; PIL's decompression-bomb "
                        "guard); resize it below about 9000 x 9000") from e
    except UserError:
        raise
    except PermissionError:
        raise unreadable(path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        reason = str(e).splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable image ({reason}); remove or replace the file") from e
    w, h = rgb.size
    if min_side and min(w, h) < min_side:
        warn(f"{path}: {w}x{h} is smaller than the training resolution {min_side}; it will be upscaled (blurry)")
    if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
        warn(f"{path}: {w}x{h} is very elongated; training uses its centre square only")
    return rgb
