"""CLIP feature extraction: L2-normalised image and text embeddings from any transformers-format CLIP."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .errors import UserError

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _load_image_processor(path: str, local: bool, image_size: int) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as e:  # a folder with model + tokenizer only: OpenAI CLIP's preprocessing
        from transformers import CLIPImageProcessor

        log.warning("%s: no image processor config (%s); using CLIP's defaults at %d px",
                    path, str(e).splitlines()[0], image_size)
        return CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size},
                                  image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))


def _toy_clip() -> str | None:
    """The shipped toy CLIP folder, or None when the toy world is not installed or built."""
    try:
        from .toy import paths
    except ImportError:
        return None
    folder = Path(paths()["clip"])
    return str(folder) if (folder / "config.json").is_file() else None


def resolve_clip(clip: str | None, base: str | None) -> str:
    """`clip`, or the toy CLIP when the base is the toy world (eval) or no base is involved (retrieve)."""
    if clip:
        return clip
    if base is None or base == "toy":
        toy = _toy_clip()
        if toy:
            return toy
        raise UserError("--clip PATH is required: the toy CLIP is not built in this installation")
    raise UserError("--clip PATH is required unless --base toy (e.g. a local openai/clip-vit-base-patch32 folder)")


class ClipFeatures:
    """A CLIP model with its tokenizer and image processor; embeds images and texts (no grad, batched)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 64):
        from transformers import AutoTokenizer, CLIPModel

        path = str(path)
        local = Path(path).exists()
        if not local and (os.sep in path.rstrip(os.sep) and path.count("/") != 1):
            raise UserError(f"--clip {path}: no such folder; give a local CLIP folder (transformers format) "
                            "or a hub id such as openai/clip-vit-base-patch32")
        try:
            self.model = CLIPModel.from_pretrained(path, dtype=dtype, local_files_only=local).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as e:
            raise UserError(f"--clip {path}: cannot load a CLIP model ({str(e).splitlines()[0]})") from e
        if len(self.tokenizer) <= 2:  # transformers silently builds an empty tokenizer without its files
            raise UserError(f"--clip {path}: the tokenizer has no vocabulary; the folder lacks tokenizer files")
        cfg = self.model.config
        self.processor = _load_image_processor(path, local, cfg.vision_config.image_size)
        self.max_length = min(int(self.tokenizer.model_max_length), cfg.text_config.max_position_embeddings)
        self.path, self.device, self.dtype, self.batch_size = path, torch.device(device), dtype, batch_size
        self.dim = cfg.projection_dim
        log.debug("loaded CLIP %s (%d-dim features, %d px)", path, self.dim, cfg.vision_config.image_size)

    def fingerprint(self) -> str:
        """A content hash of the model's config and projection weights (identifies it for caches)."""
        h = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for w in (self.model.visual_projection.weight, self.model.text_projection.weight):
            h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> Tensor:
        """L2-normalised image embeddings (N, D), float32 on the CPU."""
        out = [torch.empty(0, self.dim)]
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i:i + self.batch_size]]
            px = self.processor(images=batch, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
            pooled = self.model.vision_model(pixel_values=px.to(self.device, self.dtype)).pooler_output
            out.append(self._unit(self.model.visual_projection(pooled)))  # (B, D)
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings (N, D), float32 on the CPU (texts truncated to the model's length)."""
        out = [torch.empty(0, self.dim)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            pooled = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device)).pooler_output
            out.append(self._unit(self.model.text_projection(pooled)))  # (B, D)
        return torch.cat(out)

    @staticmethod
    def _unit(x: Tensor) -> Tensor:
        x = x.float().cpu()
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
