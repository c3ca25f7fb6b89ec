"""How demo and bench train on the toy world: one concept spec helper and the calibrated settings per method.

The toy models were trained from scratch at a learning rate of 1e-3, so fine-tuning them needs larger rates
than Stable Diffusion's 1e-5 per image. The values below come from the sweep in docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """A training method as the toy demo and bench run it."""

    name: str
    train: str = "crossattn_kv"
    learning_rate: float = 3e-5  # per image (scaled by the batch, as the reference)
    steps: int = 250
    reg: bool = True
    augment: bool = True


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("custom_diffusion"),
    Recipe("cd_no_reg", reg=False),
    Recipe("cd_no_aug", augment=False),
    Recipe("dreambooth", train="unet", learning_rate=1e-5),
    Recipe("textual_inversion", train="tokens", learning_rate=3e-4),
)}


def concept_spec(concept: Any, token: str, reg: bool = True) -> Any:
    """A ConceptSpec for an evaluation concept (customdiff.dataset.Concept): "photo of a <tok> square" with
    the toy class images (and their captions) as regularization."""
    from ..data import ConceptSpec

    cls = concept.class_prompt
    return ConceptSpec(str(concept.instance_dir), f"photo of a {token} {cls}", f"photo of a {cls}",
                       reg_dir=str(concept.class_dir) if reg and concept.class_dir else None)
