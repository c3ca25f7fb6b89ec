"""Sampling: images from a base plus deltas, identical to stock diffusers with the same arguments."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import UserError

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Swap the pipeline's scheduler for another of the same config (None keeps the pipeline's own)."""
    if not name:
        return
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler {name!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and # comments skipped)."""
    from .data import read_lines

    return read_lines(path, "prompts file")


@torch.no_grad()
def generate(pipe: Any, prompt: str, n: int = 1, seed: int = 0, steps: int = 50, guidance: float = 7.5,
             resolution: int | None = None, negative_prompt: str | None = None) -> list[Image.Image]:
    """`n` images of one prompt, exactly as `pipe(prompt, ..., generator=Generator("cpu").manual_seed(seed))`."""
    kw: dict[str, Any] = {}
    if resolution:
        kw.update(height=resolution, width=resolution)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
                negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed), **kw).images


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images into one grid picture."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def sample_to_dir(pipe: Any, prompts: Sequence[str], out: str | Path, n: int = 1, seed: int = 0, steps: int = 50,
                  guidance: float = 7.5, resolution: int | None = None, negative_prompt: str | None = None,
                  progress: bool = True) -> list[Path]:
    """Write `{index:04d}.png` for every prompt x n, `grid.png` and `prompts.json`; each prompt uses `seed`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, images, index = [], [], []
    for prompt in tqdm(prompts, desc="sample", disable=not progress):
        for im in generate(pipe, prompt, n, seed, steps, guidance, resolution, negative_prompt):
            p = out / f"{len(paths):04d}.png"
            tmp = p.with_name("." + p.name + ".tmp")
            im.save(tmp, format="PNG")
            os.replace(tmp, p)
            paths.append(p)
            images.append(im)
            index.append({"file": p.name, "prompt": prompt, "seed": seed})
    make_grid(images, cols=n if len(prompts) > 1 else None).save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps(index, indent=1))
    log.info("wrote %d images to %s", len(paths), out)
    return paths
