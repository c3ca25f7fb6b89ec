"""What the toy base draws when a concept's held-out prompts name it in full words instead of a token.

    python benchmarks/words_ceiling.py [--n 2] [--seeds 0 1 2] [--no-pairs]

Custom Diffusion re-routes a new token to what the UNet can already render. This prints, per personal concept,
the share of samples of its 16 held-out prompts ("a {} at night", ...) in which the probe reads the exact
concept (shape, colour, pattern, pattern colour) when `{}` is "purple heart with white dots" rather than
"<new1> heart", sampled as `customdiff bench` samples (20 DDIM steps, guidance 5, `--n` images per prompt).
A token that carried the concept's words exactly would score about this; the identity detail is not named,
and the judge does not ask for it. Then the same for the three pairs' 8 prompts: the share of samples showing
each concept, and both in one image (pair fidelity's probe part).
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import torch

from customdiff.base import load_pipeline
from customdiff.toy import paths
from customdiff.toy.concepts import CONCEPTS, PAIR_PROMPTS, PAIRS, SINGLE_PROMPTS
from customdiff.toy.fidelity import Judge, images_to_tensor, shows
from customdiff.toy.probe import read
from customdiff.toy.quality import generate
from customdiff.toy.world import look_phrase


def _worded(templates: tuple[str, ...], *looks) -> list[str]:
    words = [look_phrase(lk).split(" ", 1)[1] for lk in looks]  # the phrase without its article
    return [re.sub(r"\ba ([aeiou])", r"an \1", t.format(*words)) for t in templates]


def worded_prompts(look) -> list[str]:
    """The held-out single-concept prompts with the concept named in words ('an orange triangle with ...')."""
    return _worded(SINGLE_PROMPTS, look)


def worded_pair_prompts(first, second) -> list[str]:
    """The pair prompts with both concepts named in words."""
    return _worded(PAIR_PROMPTS, first, second)


def main() -> None:
    """CLI: print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2, help="images per prompt (the bench's 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-pairs", action="store_true", help="skip the pair prompts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    paths()  # fails early with the assets' own error when they are missing
    pipe, judge = load_pipeline("toy"), Judge.toy()
    pipe.set_progress_bar_config(disable=True)
    print("| concept | prompt phrase | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|---|" + "---:|" * (len(args.seeds) + 1))
    means = []
    for c in CONCEPTS:
        prompts = [t for t in worded_prompts(c.look) for _ in range(args.n)]
        shares = []
        for s in args.seeds:
            images = generate(pipe, prompts, steps=20, guidance=5.0, seed=s)
            shares.append(float(np.mean(shows(read(judge.probe, images_to_tensor(images)), c.look))))
        means.append(float(np.mean(shares)))
        print(f"| {c.name} | {look_phrase(c.look)} | " + " | ".join(f"{v:.2f}" for v in shares)
              + f" | {means[-1]:.3f} |", flush=True)
    print(f"\nmean over the six concepts: {np.mean(means):.3f}\n")
    if args.no_pairs:
        return
    looks = {c.name: c.look for c in CONCEPTS}
    print("| pair | first drawn | second drawn | both (mean over seeds) |")
    print("|---|---:|---:|---:|")
    for a, b in PAIRS:
        prompts = [t for t in worded_pair_prompts(looks[a], looks[b]) for _ in range(args.n)]
        hits = []
        for s in args.seeds:
            readings = read(judge.probe, images_to_tensor(generate(pipe, prompts, steps=20, guidance=5.0, seed=s)))
            hits.append((np.array(shows(readings, looks[a])), np.array(shows(readings, looks[b]))))
        first, second = (float(np.mean([h[i].mean() for h in hits])) for i in (0, 1))
        both = float(np.mean([np.logical_and(*h).mean() for h in hits]))
        print(f"| {a} + {b} | {first:.3f} | {second:.3f} | {both:.3f} |", flush=True)


if __name__ == "__main__":
    main()
