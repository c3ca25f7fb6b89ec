"""Loading a base text-to-image pipeline: a local diffusers folder, a hub id, or the embedded toy world."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)

_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_base(base: str) -> str:
    """Map `toy` to the shipped toy pipeline folder; return local folders and hub ids unchanged."""
    if base == "toy":
        from .toy import paths

        return paths()["base"]
    return base


def _check_local_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        raise UserError(f"--base {path}: no model_index.json; give a diffusers Stable Diffusion pipeline folder or 'toy'")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--base {path}/model_index.json is not valid JSON ({e}); re-save the pipeline") from e
    missing = [c for c in _COMPONENTS if c not in index or not (path / c).is_dir()]
    if missing:
        raise UserError(f"--base {path}: missing pipeline components {', '.join(missing)}; save it with save_pretrained")


def load_pipeline(base: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load a StableDiffusionPipeline (SD 1.x/2.x layout) from a local folder, a hub id or `toy`."""
    from diffusers import StableDiffusionPipeline

    resolved = resolve_base(base)
    path = Path(resolved)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if path.exists():
        _check_local_folder(path)
        kwargs["local_files_only"] = True  # a local path never touches the network
    elif os.sep in resolved and resolved.count("/") != 1:
        raise UserError(f"--base {base}: no such folder; give a pipeline folder, a hub id (owner/name) or 'toy'")
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype; older releases only know it
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"--base {base}: cannot load a Stable Diffusion pipeline ({str(e).splitlines()[0]})") from e
    if len(pipe.tokenizer) <= 2:
        # transformers silently builds an empty tokenizer when its files are missing (GUIDE 9)
        raise UserError(f"--base {base}: the tokenizer has no vocabulary; the folder lacks tokenizer files")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    log.debug("loaded base %s (%s, prediction %s)", base, resolved, pipe.scheduler.config.get("prediction_type"))
    return pipe
