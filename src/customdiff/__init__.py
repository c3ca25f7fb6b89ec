"""customdiff: Custom Diffusion (multi-concept customization of text-to-image diffusion models)."""

__version__ = "0.1.0"
