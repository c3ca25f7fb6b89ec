"""A small CNN that tells which shapes and colours are in a world image (the judge for generated images)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import run_loop
from .world import COLOURS, SHAPES, Scene

log = logging.getLogger(__name__)


class Probe(nn.Module):
    """Conv net 32x32x3 -> (shape logits [6], colour logits [6]), multi-label."""

    def __init__(self, width: int = 48):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * w, len(SHAPES) + len(COLOURS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x: (B, 3, 32, 32) in [-1, 1]
        out = self.head(self.body(x))
        return out[:, :len(SHAPES)], out[:, len(SHAPES):]


def scene_targets(scenes: list[Scene]) -> np.ndarray:
    """Multi-hot (N, 12): shapes present then colours present."""
    y = np.zeros((len(scenes), len(SHAPES) + len(COLOURS)), np.float32)
    colours = list(COLOURS)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            y[i, SHAPES.index(o.shape)] = 1
            y[i, len(SHAPES) + colours.index(o.colour)] = 1
    return y


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # generated images are softer and noisier than renders: blur half the batch, add a little noise
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5
    x = torch.where(pick, 0.5 * x + 0.5 * blur, x)
    return x + 0.06 * torch.randn(x.shape, generator=gen)


def train_probe(images: np.ndarray, targets: np.ndarray, ckpt: Path, steps: int, batch: int = 128, seed: int = 4):
    """Train the probe with BCE on multi-hot shape/colour labels."""
    from .train_base import to_tensor

    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=0.0)

    def step(i: int, rng: np.random.Generator, gen: torch.Generator) -> float:
        idx = rng.integers(0, len(images), batch)
        s, c = probe(_augment(to_tensor(images[idx]), gen))
        loss = F.binary_cross_entropy_with_logits(torch.cat([s, c], 1), torch.from_numpy(targets[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    losses = run_loop(ckpt, {"probe": probe}, opt, steps, 2e-3, step, seed, name="probe")
    return probe.eval(), losses


@torch.no_grad()
def predict(probe: Probe, x: torch.Tensor, k: int = 1) -> tuple[list[list[str]], list[list[str]]]:
    """Top-k shapes and top-k colours, best first, for each image in x ((N, 3, 32, 32) in [-1, 1])."""
    s, c = probe(x)
    colours = list(COLOURS)
    shapes = [[SHAPES[j] for j in row.tolist()] for row in s.topk(k, 1).indices]
    cols = [[colours[j] for j in row.tolist()] for row in c.topk(k, 1).indices]
    return shapes, cols
