"""How demo and bench train on the toy world: one concept spec helper and the calibrated settings per method.

The toy models were trained from scratch at a learning rate of 1e-3, so fine-tuning them needs larger rates
than Stable Diffusion's 1e-5 per image. The values below come from the sweep in docs/benchmarks.md
(`benchmarks/toy_sweep.py`, world v2, checker_square, seed 0): Custom Diffusion at 1e-4 and 250 steps had the
best concept fidelity and the lowest class leakage of {1e-4, 3e-4} x {250, 500}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """A training method as the toy demo and bench run it."""

    name: str
    train: str = "crossattn_kv"
    learning_rate: float = 1e-4  # per image (scaled by the batch, as the reference)
    steps: int = 250
    reg: bool = True
    augment: bool = True


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("custom_diffusion"),
    Recipe("cd_no_reg", reg=False),
    Recipe("cd_no_aug", augment=False),
    Recipe("dreambooth", train="unet", learning_rate=3e-5),  # better than 3e-4 (sweep); lower not tried
    Recipe("textual_inversion", train="tokens", learning_rate=3e-4),  # not swept on world v2
)}


def concept_spec(concept: Any, token: str, reg: bool = True) -> Any:
    """A ConceptSpec for an evaluation concept (customdiff.dataset.Concept): "photo of a <tok> square" with
    the toy class images (and their captions) as regularization."""
    from ..data import ConceptSpec

    cls = concept.class_prompt
    return ConceptSpec(str(concept.instance_dir), f"photo of a {token} {cls}", f"photo of a {cls}",
                       reg_dir=str(concept.class_dir) if reg and concept.class_dir else None)
