"""What low-rank compression costs a concept, on the toy world: train Custom Diffusion's recipe, then score the
delta as trained and compressed at each energy and rank, as `customdiff bench` scores a run. With `--pairs N`,
the first N concept pairs too: each concept trained alone, the two merged in closed form (`customdiff merge`'s
defaults), and the merged delta compressed; it is scored on its first concept's own prompts, where that concept
keeps its token <new1> (so `--concepts` must name it; the probe reads a single entry's concept as <new1>).

    python benchmarks/toy_compress.py --concepts checker_square striped_circle --pairs 1 --seeds 0 \
        --energies 0.6 0.8 0.9 0.95 --ranks 1 4

Prints one row per setting, averaged over concepts and seeds: the probe's measures, the ranks kept and the
delta's size. Compressed and uncompressed deltas are sampled with the same seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from customdiff.base import load_pipeline
from customdiff.bench import BenchConfig, Runner
from customdiff.compress import compress_delta
from customdiff.delta import load_delta, save_delta
from customdiff.merge import merge_deltas, read_captions

KEYS = ("concept_fidelity", "context_fidelity", "class_leakage")


def _ranks(path: Path) -> tuple[int, int]:
    """Smallest and largest rank kept in a delta (0, 0 for a full one)."""
    d = load_delta(path)
    ranks = [t.shape[1] for k, t in d.weights.items() if k.endswith(".up")]
    return (min(ranks), max(ranks)) if ranks else (0, 0)


def main() -> None:
    """Train each concept (and pair) and seed once; score it as trained and compressed at every setting; print
    the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="+", default=["checker_square"])
    p.add_argument("--pairs", type=int, default=0, help="concept pairs to merge and compress too")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--energies", nargs="+", type=float, default=[0.6, 0.8, 0.9, 0.95])
    p.add_argument("--ranks", nargs="+", type=int, default=[])
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write every score to this JSON file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(concepts=args.concepts, pairs=args.pairs, seeds=args.seeds, n=args.n, n_class=16, sample_steps=20)
    settings = [("trained", {})] + [(f"energy {e:g}", {"energy": e}) for e in args.energies] + \
               [(f"rank {r}", {"rank": r}) for r in args.ranks]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(cfg, Path(tmp))
        by_dir = {c.instance_dir.name: e for e in run.singles for c in e.concepts}
        lacking = {e.concepts[0].instance_dir.name for e in run.pairs} - set(by_dir)
        if lacking:
            raise SystemExit(f"--pairs {args.pairs}: add {' '.join(sorted(lacking))} to --concepts (each concept "
                             "of a merged pair's first concept is scored on its own prompts)")
        for seed in args.seeds:
            for kind, entries in (("single", run.singles), ("merged pair", run.pairs)):
                for e in entries:
                    full = Path(tmp) / "full.safetensors"
                    if kind == "single":
                        run.train("custom_diffusion", e, seed, full)
                    else:
                        parts = [Path(tmp) / f"part{i}.safetensors" for i in range(len(e.concepts))]
                        for i, (c, part) in enumerate(zip(e.concepts, parts, strict=True)):
                            run.train("custom_diffusion", e, seed, part, concepts=[(i, c)])
                        save_delta(merge_deltas([load_delta(p) for p in parts], load_pipeline("toy"),
                                                read_captions(), [str(p) for p in parts]), full)
                    scored = [e] if kind == "single" else [by_dir[e.concepts[0].instance_dir.name]]
                    for label, kw in settings:
                        d = full
                        if kw:
                            d = Path(tmp) / "small.safetensors"
                            save_delta(compress_delta(load_delta(full), **kw), d)
                        for one in scored:
                            m = run.evaluate(one, [d], seed)
                            rows.append({"kind": kind, "setting": label, "seed": seed, "entry": e.name,
                                         "scored": one.name, "ranks": _ranks(d), "bytes": d.stat().st_size,
                                         **{k: m.get(k) for k in KEYS}})
                            print(json.dumps(rows[-1]), flush=True)
    print("| delta | setting | ranks kept | size | " + " | ".join(k.replace("_", " ") for k in KEYS) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(KEYS))
    for kind, label in dict.fromkeys((r["kind"], r["setting"]) for r in rows):
        mine = [r for r in rows if r["kind"] == kind and r["setting"] == label]
        lo, hi = min(r["ranks"][0] for r in mine), max(r["ranks"][1] for r in mine)
        size = np.mean([r["bytes"] for r in mine]) / 1024
        means = [[r[k] for r in mine if r[k] is not None] for k in KEYS]
        print(f"| {kind} | {label} | {'full' if not hi else f'{lo}-{hi}'} | {size:.0f} KiB | "
              + " | ".join(f"{np.mean(v):.3f}" if v else "–" for v in means) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
