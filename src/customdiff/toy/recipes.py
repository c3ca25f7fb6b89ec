"""How demo and bench train on the toy world: one concept spec helper and the calibrated settings per method.

The toy models were trained from scratch at a learning rate of 1e-3, so fine-tuning them needs larger rates
than Stable Diffusion's 1e-5 per image. The values below come from the sweep in docs/benchmarks.md
(`benchmarks/toy_sweep.py`, the base of 2026-11-26, checker_square, seed 0, 250 steps): no method drew the
exact concept. Custom Diffusion's 1e-4 (of 1e-4, 3e-4, 1e-3) and DreamBooth's 3e-5 (of 3e-5, 3e-4) had the best
image alignment and context of their rows. Textual Inversion keeps 3e-4 although 3e-5 scored higher there: neither
learned anything of the concept, and the choice waits for a base on which one does.
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
    token_lr_scale: float = 1.0  # the new token rows' rate as a multiple of learning_rate
    reg_prompt: str = "captions"  # or "class": every class image trained with the bare class prompt

    def train_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """TrainConfig fields of this recipe on the toy base (overrides win; None values are ignored)."""
        kw = {"base": "toy", "train": self.train, "steps": self.steps, "learning_rate": self.learning_rate,
              "augment": self.augment, "token_lr_scale": self.token_lr_scale, "reg_prompt": self.reg_prompt,
              "num_class_images": 0}
        return {**kw, **{k: v for k, v in overrides.items() if v is not None}}


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("custom_diffusion"),
    Recipe("cd_no_reg", reg=False),
    Recipe("cd_no_aug", augment=False),
    Recipe("dreambooth", train="unet", learning_rate=3e-5),  # better than 3e-4 (sweep); lower not tried
    Recipe("textual_inversion", train="tokens", learning_rate=3e-4),  # see the docstring
)}


def concept_spec(concept: Any, token: str, reg: bool = True) -> Any:
    """A ConceptSpec for an evaluation concept (customdiff.dataset.Concept): "photo of a <tok> square" with
    the toy class images (and their captions) as regularization."""
    from ..data import ConceptSpec

    cls = concept.class_prompt
    return ConceptSpec(str(concept.instance_dir), f"photo of a {token} {cls}", f"photo of a {cls}",
                       reg_dir=str(concept.class_dir) if reg and concept.class_dir else None)
