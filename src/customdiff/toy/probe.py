"""A small CNN that reads every attribute of a world image (the judge for generated images).

It reads the setting and up to two objects in reading order (slot 0 is the left or upper object, slot 1 the
other one or "absent"), each as shape, colour, pattern, pattern colour and detail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import run_loop
from .world import COLOURS, DETAILS, PATTERN_COLOURS, PATTERNS, SETTINGS, SHAPES, Look, Scene

log = logging.getLogger(__name__)

# one column per head in the target array; -1 means "no label" (ignored by the loss)
SLOT_HEADS: dict[str, tuple[str, ...]] = {
    "shape": (*SHAPES, "absent"), "colour": tuple(COLOURS), "pattern": tuple(PATTERNS),
    "pattern_colour": tuple(PATTERN_COLOURS), "detail": DETAILS,
}
HEADS: dict[str, tuple[str, ...]] = {"setting": tuple(SETTINGS)}
for _slot in (0, 1):
    HEADS.update({f"{k}{_slot}": v for k, v in SLOT_HEADS.items()})


class Probe(nn.Module):
    """Conv net (B, 3, 32, 32) -> a dict of logits, one entry per head of HEADS."""

    def __init__(self, width: int = 48, hidden: int = 256):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # (B, 2w, 4, 4): keeps position
            nn.Flatten(), nn.Linear(16 * 2 * w, hidden), nn.GELU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # x: (B, 3, 32, 32) in [-1, 1]
        h = self.body(x)
        return {k: head(h) for k, head in self.heads.items()}


def scene_targets(scenes: list[Scene]) -> np.ndarray:
    """Integer labels (N, len(HEADS)), -1 where a head has no label (absent slot, plain pattern's colour)."""
    y = np.full((len(scenes), len(HEADS)), -1, np.int64)
    cols = {k: i for i, k in enumerate(HEADS)}
    for i, sc in enumerate(scenes):
        y[i, cols["setting"]] = HEADS["setting"].index(sc.setting)
        y[i, cols["shape1"]] = SLOT_HEADS["shape"].index("absent")
        for slot, o in enumerate(sc.objects[:2]):
            lk = o.look
            y[i, cols[f"shape{slot}"]] = SHAPES.index(lk.shape)
            y[i, cols[f"colour{slot}"]] = SLOT_HEADS["colour"].index(lk.colour)
            y[i, cols[f"pattern{slot}"]] = SLOT_HEADS["pattern"].index(lk.pattern)
            if lk.pattern != "plain":
                y[i, cols[f"pattern_colour{slot}"]] = SLOT_HEADS["pattern_colour"].index(lk.pattern_colour)
            y[i, cols[f"detail{slot}"]] = SLOT_HEADS["detail"].index(lk.detail)
    return y


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # generated images are softer and noisier than renders: blur half the batch, add a little noise
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5
    x = torch.where(pick, 0.6 * x + 0.4 * blur, x)
    return x + 0.05 * torch.randn(x.shape, generator=gen)


def probe_loss(probe: Probe, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the cross-entropy, skipping unlabelled entries."""
    out = probe(x)
    return sum(F.cross_entropy(out[k], y[:, j], ignore_index=-1) for j, k in enumerate(HEADS))


def train_probe(images: np.ndarray, targets: np.ndarray, ckpt: Path, steps: int, batch: int = 128, seed: int = 4,
                decoded: np.ndarray | None = None):
    """Train the probe on rendered world images and their scene labels.

    With `decoded` (the same images after a VAE round trip), each example is the render or its round trip with
    equal odds: generated images are decoded latents, so the judge must read what the autoencoder can express
    (at night, for one, the toy VAE turns black stripes into the night sky's navy).
    """
    from .train_base import to_tensor

    torch.manual_seed(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=0.0)

    def step(i: int, rng: np.random.Generator, gen: torch.Generator) -> float:
        idx = rng.integers(0, len(images), batch)
        x = images[idx]
        if decoded is not None:
            x = np.where(rng.random(batch)[:, None, None, None] < 0.5, decoded[idx], x)
        loss = probe_loss(probe, _augment(to_tensor(x), gen), torch.from_numpy(targets[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    losses = run_loop(ckpt, {"probe": probe}, opt, steps, 2e-3, step, seed, name="probe")
    return probe.eval(), losses


@dataclass
class Reading:
    """What the probe sees in one image: the setting and one or two objects in reading order."""

    setting: str
    objects: list[Look]


@torch.no_grad()
def read(probe: Probe, x: torch.Tensor) -> list[Reading]:
    """The probe's reading of each image in x ((N, 3, 32, 32) in [-1, 1])."""
    out = {k: v.argmax(1).tolist() for k, v in probe(x).items()}
    readings = []
    for i in range(x.shape[0]):
        objs = []
        for slot in (0, 1):
            shape = SLOT_HEADS["shape"][out[f"shape{slot}"][i]]
            if shape == "absent":
                continue
            pattern = SLOT_HEADS["pattern"][out[f"pattern{slot}"][i]]
            pcol = SLOT_HEADS["pattern_colour"][out[f"pattern_colour{slot}"][i]] if pattern != "plain" else ""
            objs.append(Look(shape, SLOT_HEADS["colour"][out[f"colour{slot}"][i]], pattern, pcol,
                             SLOT_HEADS["detail"][out[f"detail{slot}"][i]]))
        readings.append(Reading(HEADS["setting"][out["setting"][i]], objs))
    return readings


def load_probe(path: str | Path) -> Probe:
    """Load the evaluation probe from a safetensors file."""
    from safetensors.torch import load_file

    probe = Probe()
    probe.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return probe.eval()
