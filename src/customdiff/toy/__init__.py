"""The embedded toy world: a procedural captioned world, a tiny Stable Diffusion and CLIP trained on it."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
ASSETS_ENV = "CUSTOMDIFF_TOY_ASSETS"  # use a rebuilt assets folder instead of the shipped one

__all__ = ["ASSETS", "assets_dir", "paths"]


def assets_dir() -> Path:
    """The toy assets folder in use: $CUSTOMDIFF_TOY_ASSETS (a `python -m customdiff.toy.build --out` folder)
    or the shipped one."""
    return Path(os.environ.get(ASSETS_ENV) or ASSETS).resolve()


def paths() -> dict[str, str]:
    """Absolute folders of the toy pipeline, toy CLIP, personal concepts and the probe in use."""
    a = assets_dir()
    return {"base": str(a / "base"), "clip": str(a / "clip"), "concepts": str(a / "concepts"),
            "probe": str(a / "probe.safetensors")}
