"""Model surgery: which UNet parameters train, and detaching the start token's K/V in cross-attention."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

# Name fragments of the trained UNet parameters for each --train choice (matched by substring, as PEFT does
# by suffix; the reference matches "attn2.to_k"/"attn2.to_v" in parameter names).
TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "crossattn_kv": ("attn2.to_k.", "attn2.to_v."),
    "crossattn": ("attn2.",),
    # baselines of the paper's comparison, trained by the same loop: DreamBooth-style (whole UNet + token)
    # and Textual Inversion (token only)
    "unet": ("",),
    "tokens": (),
}


def trainable_names(unet: nn.Module, train: str) -> list[str]:
    """Names of the UNet parameters trained under `train` (crossattn_kv, crossattn, unet; none for tokens)."""
    if train not in TRAIN_CHOICES:
        raise UserError(f"--train {train!r} is unknown; choose one of {', '.join(TRAIN_CHOICES)}")
    names = [n for n, _ in unet.named_parameters() if any(f in n for f in TRAIN_CHOICES[train])]
    if not names and train != "tokens":
        raise UserError(f"the UNet has no cross-attention parameters for --train {train} (no 'attn2' modules)")
    return names


def freeze_except(unet: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """Freeze every UNet parameter except `names`; return the trainable ones and log their share."""
    wanted = set(names)
    trainable = {}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in wanted)
        if n in wanted:
            trainable[n] = p
    n_train = sum(p.numel() for p in trainable.values())
    n_total = sum(p.numel() for p in unet.parameters())
    assert len(trainable) == len(wanted)
    log.info("trainable UNet parameters: %d of %d (%.2f%% of the UNet) in %d tensors", n_train, n_total,
             100.0 * n_train / n_total, len(trainable))
    return trainable


def _detach_first(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # (B, T, C): the start token's key/value keep their value but pass no gradient, as in the reference.
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


def detach_start_token(unet: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook every cross-attention to_k/to_v so the first text token's K and V carry no gradient."""
    handles = []
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            handles.append(module.register_forward_hook(_detach_first))
    return handles
