"""Sampling: images from a base plus deltas, identical to stock diffusers with the same arguments."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import NonFiniteError, UserError

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


class SamplingCancelled(Exception):
    """The caller's cancel event was set: sampling stopped at the next denoising step."""


def step_check(cancel: threading.Event | None) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """Step callback: stop when `cancel` is set, and with a clear error as soon as the latents hold NaN or inf
    (else: black images)."""
    def check(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if cancel is not None and cancel.is_set():
            raise SamplingCancelled(f"sampling cancelled at step {step + 1}")
        if not bool(torch.isfinite(kwargs["latents"]).all()):
            raise NonFiniteError(f"sampling produced NaN or infinite latents at step {step + 1}; a delta or the "
                                 "base holds extreme values, or float16 overflowed (try --dtype float32)")
        return kwargs

    return check


def check_token_reach(pipe: Any, prompts: Sequence[str]) -> None:
    """Refuse a prompt whose modifier token lands past what the text encoder reads: the pipeline would cut it
    off, and the concept would be silently left out of the images. Warn of a prompt whose other words are cut."""
    from .conditioning import sides
    from .tokens import find_tokens, token_position
    from .validate import warn

    for side in sides(pipe):
        tok = getattr(pipe, side.tokenizer)
        for p in prompts:
            for t in find_tokens(p):
                at = token_position(tok, p, t)
                if at >= tok.model_max_length - 1:  # the last place holds the end token
                    raise UserError(f"prompt {p[:60]!r}...: {t} comes at token {at}, past the {tok.model_max_length} "
                                    "tokens the text encoder reads, so its concept would be left out; shorten the "
                                    "words before it")
    tok = pipe.tokenizer  # every side reads as many tokens (diffusers' own warning of the cut is silenced)
    for p in dict.fromkeys(prompts):
        ids = tok(p).input_ids
        if len(ids) > tok.model_max_length:
            last = tok.decode(ids[1:tok.model_max_length - 1]).split()[-3:]
            warn(f"prompt {p[:60]!r}: {len(ids)} tokens, the text encoder reads {tok.model_max_length}; what comes "
                 f"after {' '.join(last)!r} is cut off and left out of the images")


def check_timesteps(pipe: Any, steps: int) -> None:
    """Refuse a step count whose timesteps this scheduler places past its training range (DPM-Solver++ with
    "leading" spacing does at 999 steps on SD's config): diffusers would index past the noise schedule."""
    sched = pipe.scheduler
    try:
        sched.set_timesteps(steps)  # what the pipeline does first anyway
    except (ValueError, IndexError, RuntimeError) as e:  # PNDM's Runge-Kutta warm-up needs 4 steps (measured)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--steps {steps}: {type(sched).__name__} cannot schedule {steps} steps ({first}); use "
                        "more --steps or another --scheduler") from e
    last, limit = int(sched.timesteps.max()), int(sched.config.num_train_timesteps)
    if last >= limit:
        raise UserError(f"--steps {steps}: {type(sched).__name__} places timestep {last} beyond its {limit} training "
                        "steps at this count; use fewer --steps")


@torch.no_grad()
def generate(pipe: Any, prompt: str, n: int = 1, seed: int = 0, steps: int = 50, guidance: float = 7.5,
             resolution: int | None = None, negative_prompt: str | None = None,
             cancel: threading.Event | None = None) -> list[Image.Image]:
    """`n` images of one prompt, exactly as `pipe(prompt, ..., generator=Generator("cpu").manual_seed(seed))`.

    Latents and decoded pixels are checked for NaN/inf (a NonFiniteError instead of black images); setting
    `cancel` (from another thread) stops it at the next step with SamplingCancelled."""
    kw: dict[str, Any] = {}
    if resolution:
        kw.update(height=resolution, width=resolution)
    # output_type="np" then numpy_to_pil is exactly what diffusers does for "pil", with a look in between
    arrays = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
                  negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="np", callback_on_step_end=step_check(cancel), **kw).images
    if not np.isfinite(arrays).all():
        raise NonFiniteError("the VAE decoded NaN or infinite pixels; float16 overflow? try --dtype float32")
    return pipe.numpy_to_pil(arrays)


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
                  progress: bool = True, cancel: threading.Event | None = None) -> list[Path]:
    """Write `{index:04d}.png` for every prompt x n, `grid.png` and `prompts.json`; each prompt uses `seed`.

    `out` must be new, empty or an earlier sample folder, which is replaced whole (no stale images beside the new
    ones). Nothing is written until every image is made, and a failure (or `cancel`, see generate) leaves no
    partial output."""
    from .outputs import INDEX_FILE, check_out, staged, write_image_folder

    out = check_out(out, "sample", INDEX_FILE)
    check_timesteps(pipe, steps)  # before any sampling
    check_token_reach(pipe, prompts)
    images, index = [], []
    for prompt in tqdm(prompts, desc="sample", disable=not progress):
        ims = generate(pipe, prompt, n, seed, steps, guidance, resolution, negative_prompt, cancel)
        images += ims
        index += [prompt] * len(ims)
    with staged(out, replace=True, last=INDEX_FILE) as tmp:
        names = [p.name for p in write_image_folder(tmp, images, index, [seed] * len(images),
                                                    cols=n if len(prompts) > 1 else None)]
    log.info("wrote %d images to %s", len(names), out)
    return [out / name for name in names]


class ChunkedSampler:
    """Samples n images of a prompt in chunks of `batch`, updating a shared progress bar; chunk k uses seed + k,
    so chunk 0 gives exactly the images of `customdiff sample` with the same seed."""

    def __init__(self, pipe: Any, steps: int, guidance: float, seed: int, resolution: int | None, batch: int,
                 bar: Any):
        self.pipe, self.steps, self.guidance, self.seed = pipe, steps, guidance, seed
        self.resolution, self.batch, self.bar = resolution, batch, bar

    def __call__(self, prompt: str, n: int) -> tuple[list[Image.Image], list[int]]:
        images, seeds = [], []
        for k in range(math.ceil(n / self.batch)):
            m = min(self.batch, n - k * self.batch)
            images += generate(self.pipe, prompt, m, self.seed + k, self.steps, self.guidance, self.resolution)
            seeds += [self.seed + k] * m
            self.bar.update(1)
        return images, seeds
