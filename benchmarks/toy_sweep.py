"""Learning-rate x steps sweep per method on the toy world; prints a table of probe and CLIP measures.

    python benchmarks/toy_sweep.py --methods custom_diffusion --lrs 3e-5 1e-4 --steps 150 250 \
        --concepts checker_square dotted_heart --seeds 0 [--token-lr-scales 1 10 30] [--reg-prompts captions class]

Each cell trains the recipe (customdiff.toy.recipes) at that rate, step count, token-rate multiple and
regularization prompt (the last two default to the recipe's) and evaluates it as `customdiff bench` does. The
chosen settings and the table behind them are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from customdiff.bench import METRICS, BenchConfig, Runner

KEYS = ("concept_fidelity", "context_fidelity", "class_leakage", "text_alignment", "image_alignment")


def main() -> None:
    """Run the grid and print one row per (method, lr, steps), averaged over concepts and seeds."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["custom_diffusion"])
    p.add_argument("--lrs", nargs="+", type=float, required=True)
    p.add_argument("--steps", nargs="+", type=int, required=True)
    p.add_argument("--concepts", nargs="+", default=["checker_square"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--token-lr-scales", nargs="+", type=float, default=[None])
    p.add_argument("--reg-prompts", nargs="+", choices=["captions", "class"], default=[None])
    p.add_argument("--n", type=int, default=2, help="images per prompt")
    p.add_argument("--n-class", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write every run to this JSON file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(concepts=args.concepts, pairs=0, seeds=args.seeds, n=args.n, n_class=args.n_class,
                      sample_steps=20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(cfg, Path(tmp))
        print("| method | lr | steps | token x | reg prompt | " + " | ".join(k.replace("_", " ") for k in KEYS)
              + " |")
        print("|---|---:|---:|---:|---|" + "---:|" * len(KEYS))
        for method, lr, steps, scale, reg in itertools.product(args.methods, args.lrs, args.steps,
                                                               args.token_lr_scales, args.reg_prompts):
            cell = []
            for seed in args.seeds:
                for e in run.singles:
                    d = Path(tmp) / "d.safetensors"
                    stats = run.train(method, e, seed, d, learning_rate=lr, steps=steps, token_lr_scale=scale,
                                      reg_prompt=reg)
                    m = run.evaluate(e, [d], seed, None)
                    cell.append(m)
                    rows.append({"method": method, "lr": lr, "steps": steps, "token_lr_scale": scale,
                                 "reg_prompt": reg, "seed": seed, "entry": e.name, **stats, **m})
            means = [np.mean([c[k] for c in cell if c.get(k) is not None]) for k in KEYS]
            print(f"| {method} | {lr:g} | {steps} | {scale or 'recipe'} | {reg or 'recipe'} | "
                  + " | ".join(f"{v:.3f}" for v in means) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"metrics": list(METRICS), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
