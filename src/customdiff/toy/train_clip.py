"""Contrastive training of the toy CLIP on world images and captions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import run_loop
from .models import make_clip
from .world import COLOURS, PATTERNS, SETTINGS, SHAPES, Scene

log = logging.getLogger(__name__)
# OpenAI CLIP's normalisation, identical to what CLIPImageProcessor applies
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
AUX_SCALE = 10.0  # fixed temperature of the attribute head on unit-norm embeddings


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> normalised (N, 3, 32, 32), as CLIPImageProcessor does at native size."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


# attribute groups of the auxiliary head (softmax over each)
AUX_GROUPS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": tuple(PATTERNS),
                                          "setting": tuple(SETTINGS)}


def clip_targets(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Soft attribute targets (N, sum of group sizes) and which groups each caption names (N, groups).

    A two-object scene splits each object attribute between its two objects. The image side uses every
    group; the caption side only the groups its caption names (captions leave colour, pattern, setting out).
    """
    sizes = [len(v) for v in AUX_GROUPS.values()]
    offs = np.cumsum([0, *sizes])
    y = np.zeros((len(scenes), offs[-1]), np.float32)
    named = np.ones((len(scenes), len(sizes)), bool)
    for i, sc in enumerate(scenes):
        w = 1.0 / len(sc.objects)
        for o in sc.objects:
            for g, value in enumerate((o.look.shape, o.look.colour, o.look.pattern)):
                y[i, offs[g] + list(AUX_GROUPS.values())[g].index(value)] += w
        y[i, offs[3] + AUX_GROUPS["setting"].index(sc.setting)] = 1.0
        named[i, 1] = all(o.named.get("colour", True) for o in sc.objects)
        # a pattern counts as named when every patterned object's pattern is (plain objects are never named)
        named[i, 2] = all(o.named.get("pattern", True) or o.look.pattern == "plain" for o in sc.objects) and \
            not any(o.look.pattern == "plain" for o in sc.objects)
        named[i, 3] = sc.name_setting or sc.setting == "plain"
    return y, named


def hard_batch(rng: np.random.Generator, colour_rows: list[np.ndarray], n: int, batch: int) -> np.ndarray:
    """Half random images, half sharing one random colour (negatives told apart only by shape or setting)."""
    same = colour_rows[int(rng.integers(len(colour_rows)))]
    return np.concatenate([rng.integers(0, n, batch - batch // 2), rng.choice(same, batch // 2)])


def train_clip(images: np.ndarray, ids: torch.Tensor, caption_ids: np.ndarray, targets: np.ndarray,
               named: np.ndarray, tokenizer, ckpt: Path, steps: int, batch: int = 128, lr: float = 1e-3, seed: int = 3, aux_weight: float = 1.0,
               hard: bool = True, max_scale: float = 100.0, **clip_kw: int):
    """CLIPModel trained with the symmetric InfoNCE loss plus an auxiliary attribute loss.

    targets, named: from `clip_targets` (soft attribute targets; which groups each caption names).
    Contrastive loss alone (1,200 steps, random or hard-negative batches) learned colour but no shape: 23-24%
    zero-shot shape, and a linear probe on its image features read shape only 39% of the time. The auxiliary
    loss is a softmax cross-entropy over the shapes and over the colours, from one linear head shared by the
    unit-norm image and text embeddings (scaled by AUX_SCALE); sharing the head makes the shape directions of
    both towers coincide. The head is discarded after training: the result is a plain CLIPModel, used zero-shot
    exactly as OpenAI CLIP. World v1, 3,000 steps (~22 min at 1 thread): 95.5% zero-shot shape, 100% colour.
    On the caption side a group counts only where the caption names it.
    Identical captions in a batch count as positives; hard=True makes half of each batch share one colour;
    clip_kw go to make_clip (tower sizes).
    """
    torch.manual_seed(seed)
    model = make_clip(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, **clip_kw)
    head = torch.nn.Linear(model.config.projection_dim, targets.shape[1])
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n_shapes = len(SHAPES)
    colour_rows = [np.flatnonzero(targets[:, n_shapes + c]) for c in range(len(COLOURS))]
    y_all, named_all = torch.from_numpy(targets).float(), torch.from_numpy(named)
    offs = np.cumsum([0, *(len(v) for v in AUX_GROUPS.values())])

    def step(i: int, rng: np.random.Generator, gen: torch.Generator) -> float:
        idx = hard_batch(rng, colour_rows, len(images), batch) if hard else rng.integers(0, len(images), batch)
        out = model(input_ids=ids[idx], pixel_values=pixel_values(images[idx]))
        cid = torch.from_numpy(caption_ids[idx])
        same = (cid[:, None] == cid[None, :]).float()  # (B, B) several images can share one caption
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target))
        if aux_weight > 0:
            y = y_all[idx].repeat(2, 1)  # image rows then caption rows: the same objects
            use = torch.cat([torch.ones(len(idx), len(offs) - 1, dtype=torch.bool), named_all[idx]])  # (2B, G)
            emb = torch.cat([out.image_embeds, out.text_embeds])  # both already L2-normalised
            logits = head(AUX_SCALE * emb)
            aux = 0.0
            for g in range(len(offs) - 1):  # softmax per attribute group, over the rows that know it
                sl, rows = slice(offs[g], offs[g + 1]), use[:, g]
                if rows.any():
                    aux = aux + F.cross_entropy(logits[rows, sl], y[rows, sl])
            loss = loss + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(max_scale))
        return loss.item()

    losses = run_loop(ckpt, {"clip": model, "head": head}, opt, steps, lr, step, seed, name="clip")
    return model.eval(), losses
