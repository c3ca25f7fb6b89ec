"""Resumable training loops: modules, optimiser, step and every RNG state in one checkpoint file."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to floor * peak."""
    if step < warmup:
        return float(peak * (step + 1) / warmup)
    t = (step - warmup) / max(1, total - warmup)
    # a Python float: a numpy scalar in the optimiser's param_groups breaks torch.load(weights_only=True) on resume
    return float(peak * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * t))))


def run_loop(
    path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, steps: int, peak_lr: float,
    step_fn: Callable[[int, np.random.Generator, torch.Generator], float], seed: int,
    every: int = 200, name: str = "train",
) -> list[float]:
    """Run `step_fn(step, np_rng, torch_gen) -> loss` for `steps` steps, resuming from `path` if present.

    Returns the loss history (also stored in the checkpoint, so a resumed run reports the whole curve).
    """
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    start, losses = 0, []
    if path.exists():
        ck = torch.load(path, weights_only=True)  # tensors and plain Python values only: no code runs
        for k, m in modules.items():
            m.load_state_dict(ck["modules"][k])
        opt.load_state_dict(ck["opt"])
        rng.bit_generator.state, start, losses = json.loads(ck["np_rng"]), ck["step"], ck["losses"]
        gen.set_state(ck["torch_gen"])
        log.info("%s: resuming at step %d/%d", name, start, steps)
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr)
        losses.append(float(step_fn(step, rng, gen)))
        if (step + 1) % every == 0 or step + 1 == steps:
            tmp = path.with_suffix(".tmp")
            torch.save({"modules": {k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(),
                        "np_rng": json.dumps(rng.bit_generator.state), "torch_gen": gen.get_state(),
                        "step": step + 1, "losses": [float(x) for x in losses]}, tmp)
            tmp.replace(path)  # atomic: a killed run never leaves a half-written checkpoint
            recent = float(np.mean(losses[-every:]))
            log.info("%s: step %d/%d loss %.4f (%.2f s/step)", name, step + 1, steps, recent,
                     (time.time() - t0) / (step + 1 - start))
    return losses
