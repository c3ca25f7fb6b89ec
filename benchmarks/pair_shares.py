"""How often each concept of a pair is drawn in the pair prompts' samples of finished `customdiff bench` folders.

    python benchmarks/pair_shares.py BENCH_DIR [BENCH_DIR ...]

Pair fidelity asks for both concepts exact in one image, which the toy base rarely manages for any method. This
reads the saved pair samples (BENCH_DIR/images/s<seed>/<method>/<pair>/prompts/) again with the toy probe and
prints, per pair method, the share of samples that show each concept (shape, colour, pattern and pattern colour
on some object), the mean over the concepts the judge can read (ringed_star's own photos are not read as the
concept, so it is left out of the mean), and the share with both: means over pairs within a seed, then mean ±
std over seeds.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from customdiff.bench import PAIR_METHODS
from customdiff.toy.fidelity import Judge, shows

UNJUDGED = {"ringed_star"}  # benchmarks/judge_check.py: 0 of 8 own photos read as the concept


def pair_rows(folders: list[Path], judge: Judge) -> list[dict]:
    """One row per (seed, method, pair): the share of its samples showing each concept, and both."""
    rows = []
    for folder in folders:
        for prompts in sorted((folder / "images").glob("s*/*/*+*/prompts/*")):
            pair, method, seed_dir = (prompts.parents[i].name for i in (1, 2, 3))
            if method not in PAIR_METHODS:
                continue
            files = sorted(f for f in prompts.glob("*.png") if f.stem.isdigit())  # not grid.png
            if not files:
                raise SystemExit(f"{prompts}: no saved samples; pass folders of a finished `customdiff bench`")
            readings = judge.read([Image.open(f).convert("RGB") for f in files])
            names = pair.split("+")
            hits = {n: np.array(shows(readings, judge.looks[n])) for n in names}
            rows.append({"seed": int(seed_dir[1:]), "method": method, "pair": pair, "n": len(files),
                         **{f"shows_{n}": float(h.mean()) for n, h in hits.items()},
                         "both": float(np.mean(np.logical_and(*hits.values())))})
    if not rows:
        raise SystemExit(f"no pair samples under {[str(f) for f in folders]}: run `customdiff bench --pairs N` first")
    return rows


def stat(values: list[float]) -> str:
    """'mean ± std' over seeds, as `customdiff bench` gives it (population std; 0 for one seed)."""
    return f"{np.mean(values):.3f} ± {np.std(values) if len(values) > 1 else 0:.3f}"


def main() -> None:
    """CLI: print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args()
    judge = Judge.toy()
    rows = pair_rows(args.folders, judge)
    concepts = sorted({k[6:] for r in rows for k in r if k.startswith("shows_")})
    by: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["method"], r["seed"])].append(r)
    print("| method | seeds | " + " | ".join(concepts) + " | mean over judgeable concepts | both |")
    print("|---|---:|" + "---:|" * (len(concepts) + 2))
    for m in PAIR_METHODS:
        seeds = sorted(s for mm, s in by if mm == m)
        if not seeds:
            continue
        per_concept = [stat([next(r[f"shows_{c}"] for r in by[(m, s)] if f"shows_{c}" in r) for s in seeds])
                       for c in concepts]
        judged = [np.mean([r[f"shows_{c}"] for r in by[(m, s)] for c in concepts
                           if f"shows_{c}" in r and c not in UNJUDGED]) for s in seeds]
        both = [np.mean([r["both"] for r in by[(m, s)]]) for s in seeds]
        print(f"| {m} | {len(seeds)} | " + " | ".join(per_concept) + f" | {stat(judged)} | {stat(both)} |")


if __name__ == "__main__":
    main()
