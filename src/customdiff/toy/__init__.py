"""The embedded toy world: a procedural captioned world, a tiny Stable Diffusion and CLIP trained on it."""

from .paths import paths

__all__ = ["paths"]
