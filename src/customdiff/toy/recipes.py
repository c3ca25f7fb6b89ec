"""How demo and bench train on the toy world: one concept spec helper and the calibrated settings per method.

The toy models were trained from scratch at a learning rate of 1e-3, so fine-tuning them needs larger rates
than Stable Diffusion's 1e-5 per image. Two settings make the new token carry the concept on this base
(docs/benchmarks.md, `benchmarks/toy_sweep.py`): the token's row learns at 3e-3 per image, 30x the K/V rate
(at one rate for all, the K/V change re-routes the class word itself and the token stays inert), and the class
images regularize the bare class prompt ("photo of a square") rather than their alt-text captions, which name
colours and patterns and leave the bare class word free to drift.
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


# Every method's new token learns at 3e-3 per image (x the batch), the rate at which the token carries the
# concept on this base (sweep in docs/benchmarks.md); the methods differ in what they train beside it.
TOKEN_RATE = 3e-3
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("custom_diffusion", token_lr_scale=TOKEN_RATE / 1e-4, reg_prompt="class"),
    Recipe("cd_no_reg", token_lr_scale=TOKEN_RATE / 1e-4, reg=False),
    Recipe("cd_no_aug", token_lr_scale=TOKEN_RATE / 1e-4, reg_prompt="class", augment=False),
    Recipe("dreambooth", train="unet", learning_rate=3e-5, token_lr_scale=TOKEN_RATE / 3e-5, reg_prompt="class"),
    Recipe("textual_inversion", train="tokens", learning_rate=TOKEN_RATE),
)}
# The demo's and the web app's toy recipe: Custom Diffusion as tuned for this base. Augmentation is off since its
# prompt words ("zoomed in", "far away", ...) never occur in the toy's base captions (docs/benchmarks.md).
DEMO_RECIPE = "cd_no_aug"


def concept_spec(concept: Any, token: str, reg: bool = True) -> Any:
    """A ConceptSpec for an evaluation concept (customdiff.dataset.Concept): "photo of a <tok> square" with
    the toy class images (and their captions) as regularization."""
    from ..data import ConceptSpec

    cls = concept.class_prompt
    return ConceptSpec(str(concept.instance_dir), f"photo of a {token} {cls}", f"photo of a {cls}",
                       reg_dir=str(concept.class_dir) if reg and concept.class_dir else None)
