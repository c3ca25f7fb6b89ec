"""Evaluation metrics as pure functions of feature tensors (no model inside; see features.py for CLIP).

Text alignment and image alignment follow the CustomConcept101 evaluation of the reference repository;
KID is the unbiased polynomial-kernel MMD of Binkowski et al., averaged over random subsets.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CLIPSCORE_WEIGHT = 2.5  # CLIPScore (Hessel et al.): w * max(cos, 0), as the reference reports it


def _unit(x: Tensor) -> Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def text_alignment(image_feats: Tensor, text_feats: Tensor) -> dict[str, float]:
    """Mean cosine of each image (N, D) with its prompt's text features (N, D), and the CLIPScore 2.5*max(cos, 0)."""
    if image_feats.shape != text_feats.shape or image_feats.ndim != 2:
        raise ValueError(f"need paired (N, D) features, got {tuple(image_feats.shape)} and {tuple(text_feats.shape)}")
    if image_feats.shape[0] == 0:
        raise ValueError("no features to compare")
    cos = (_unit(image_feats) * _unit(text_feats)).sum(-1)  # (N,)
    return {"cosine": float(cos.mean()), "clipscore": float((CLIPSCORE_WEIGHT * cos.clamp_min(0)).mean())}


def image_alignment(gen_feats: Tensor, target_feats: Tensor) -> float:
    """Mean pairwise cosine between every generated (N, D) and every target (M, D) image feature."""
    if gen_feats.ndim != 2 or target_feats.ndim != 2 or gen_feats.shape[1] != target_feats.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(gen_feats.shape)} and "
                         f"{tuple(target_feats.shape)}")
    if gen_feats.shape[0] == 0 or target_feats.shape[0] == 0:
        raise ValueError("no features to compare")
    return float((_unit(gen_feats) @ _unit(target_feats).T).mean())  # (N, M) -> scalar


def poly_kernel(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """KID's polynomial kernel (x.y / D + coef) ** degree between rows of x (N, D) and y (M, D)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased estimate of the squared MMD between two equal-sized samples (m, D) under the polynomial kernel."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
    off_xx = k_xx.sum() - k_xx.diagonal().sum()  # the diagonal (k(x, x)) is left out: unbiased
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return (off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / m**2


def kid(real_feats: Tensor, fake_feats: Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance between feature sets (N, D) and (M, D): mean and std of the unbiased MMD^2
    over `subsets` random subsets of `subset_size` from each (clamped to the smaller set; std over subsets,
    without Bessel's correction, as torchmetrics)."""
    if real_feats.ndim != 2 or fake_feats.ndim != 2 or real_feats.shape[1] != fake_feats.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(real_feats.shape)} and "
                         f"{tuple(fake_feats.shape)}")
    size = min(subset_size, real_feats.shape[0], fake_feats.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {real_feats.shape[0]} real "
                         f"and {fake_feats.shape[0]} generated")
    if size < subset_size:
        log.debug("KID subset size %d clamped to %d (the smaller feature set)", subset_size, size)
    real, fake = real_feats.double(), fake_feats.double()
    gen = torch.Generator().manual_seed(seed)
    scores = torch.stack([
        mmd2_unbiased(real[torch.randperm(real.shape[0], generator=gen)[:size]],
                      fake[torch.randperm(fake.shape[0], generator=gen)[:size]])
        for _ in range(subsets)
    ])  # (subsets,)
    return float(scores.mean()), float(scores.std(correction=0))
