"""Saving the shipped assets: standard save_pretrained folders whose weights are stored in fp16.

Configs keep float32 so that a default from_pretrained (no torch_dtype) gives a float32 model on CPU.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..delta import atomic_save

log = logging.getLogger(__name__)


def halve_safetensors(folder: str | Path) -> None:
    """Rewrite every *.safetensors under folder with floating tensors in fp16."""
    for f in Path(folder).rglob("*.safetensors"):
        sd = load_file(f)
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        atomic_save(sd, {"format": "pt"}, f)  # an ordinary 0644 file (safetensors alone writes 0600)


def save_pipeline(vae, unet, text_encoder, tokenizer, out: str | Path, tokenizer_files: Path) -> Path:
    """Save a StableDiffusionPipeline (no safety checker) with fp16 weights, plus vocab.json/merges.txt."""
    from diffusers import StableDiffusionPipeline

    from .models import make_scheduler

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the classic slow-tokenizer files, for any CLIP tokenizer loader
        shutil.copy(tokenizer_files / name, out / "tokenizer" / name)
    halve_safetensors(out)
    log.info("saved pipeline to %s", out)
    return out


def save_clip(model, tokenizer, image_processor, out: str | Path, tokenizer_files: Path) -> Path:
    """Save CLIPModel + CLIPProcessor (tokenizer and image processor) with fp16 weights."""
    from transformers import CLIPProcessor

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files / name, out / name)
    halve_safetensors(out)
    log.info("saved CLIP to %s", out)
    return out


def load_pipeline(path: str | Path):
    """Load the shipped pipeline in float32 and check the tokenizer is the real one."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    assert len(pipe.tokenizer) > 2, "tokenizer files missing: got the empty fallback tokenizer"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_clip(path: str | Path):
    """Load the shipped CLIP model (float32) and its processor."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(path), dtype=torch.float32).eval()
    proc = CLIPProcessor.from_pretrained(str(path))
    assert len(proc.tokenizer) > 2, "tokenizer files missing: got the empty fallback tokenizer"
    return model, proc


def folder_mb(folder: str | Path) -> float:
    """Total size of the files under a folder in MB."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6
