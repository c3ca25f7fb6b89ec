"""The embedded toy world: a procedural captioned world, a tiny Stable Diffusion and CLIP trained on it."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"

__all__ = ["ASSETS", "paths"]


def paths() -> dict[str, str]:
    """Absolute folders of the shipped toy pipeline, toy CLIP and personal concepts."""
    return {"base": str(ASSETS / "base"), "clip": str(ASSETS / "clip"), "concepts": str(ASSETS / "concepts")}
