"""Subcommands on the metrics path: `eval` (any base, a dataset file), and `demo` and `bench` on the toy world."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import DemoConfig
from .flags import (
    add_base,
    add_config_flags,
    add_deltas,
    add_device,
    add_no_base,
    add_out,
    config_from,
    refuse_base,
)


def _cmd_eval(a: argparse.Namespace) -> None:
    from ..config import EvalConfig
    from ..dataset import read_dataset
    from ..evaluate import run_eval
    from ..features import resolve_clip
    from ..validate import check_out_dir, deferred_warnings

    cfg = config_from(EvalConfig, a)
    with deferred_warnings():
        cfg.validate()
        read_dataset(cfg.dataset, cfg.entries)  # schema, prompt files and entry names, before any model loads
        check_out_dir("--out", cfg.out)
        cfg.clip = resolve_clip(cfg.clip, cfg.base)
    run_eval(cfg, progress=not a.quiet)
    print(Path(cfg.out) / "metrics.json")


def _cmd_demo(a: argparse.Namespace) -> None:
    from ..demo import run_demo

    refuse_base(a)
    cfg = DemoConfig(out=a.out, concept=a.concept, steps=a.steps, seed=a.seed)
    if a.quick:  # at most 30 steps; a bad --steps is still refused by run_demo
        cfg.steps = 30 if a.steps is None else min(a.steps, 30)
        cfg.prompts, cfg.n, cfg.sample_steps, cfg.n_class = 2, 2, 10, 8
    print(run_demo(cfg, progress=not a.quiet))


def _cmd_bench(a: argparse.Namespace) -> None:
    from ..bench import BenchConfig, rescore_bench, run_bench

    refuse_base(a)
    if a.rescore:  # trains nothing: --steps plays no part
        out = rescore_bench(a.out, progress=not a.quiet)
        print((out / "results.md").read_text())
        print(f"report: {out / 'report.html'}")
        return
    cfg = BenchConfig.quick() if a.quick else BenchConfig()
    if a.concepts:
        cfg.concepts = a.concepts
    if a.pairs is not None:
        cfg.pairs = a.pairs
    if a.steps is not None:
        cfg.steps = a.steps
    if a.seeds:
        cfg.seeds = a.seeds
    if a.methods:
        cfg.methods = a.methods
    out = run_bench(cfg, a.out, progress=not a.quiet)
    print((out / "results.md").read_text())
    print(f"report: {out / 'report.html'}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval`, `demo` and `bench`."""
    from ..bench import SINGLE_METHODS
    from ..config import EvalConfig

    e = sub.add_parser("eval", help="CLIP text/image alignment and KID on a CustomConcept101-style dataset",
                       description="Sample every entry's prompts (N images each) with the deltas applied and "
                       "score them: CLIP text alignment (prompt without modifier tokens), CLIP image alignment "
                       "(to the concept photos) and KID x1000 of class-prompt images vs the real class images. "
                       "Writes metrics.json, metrics.md and images/ into --out.")
    add_base(e)
    add_deltas(e)
    add_out(e, "output folder")
    add_device(e)
    add_config_flags(e, EvalConfig, skip={"base", "deltas", "out", "device"})
    e.set_defaults(func=_cmd_eval)

    d = sub.add_parser("demo", help="the main job: teach a toy concept, sample before/after, write a report",
                       description="Train one personal concept of the embedded toy world with Custom Diffusion, "
                       "sample held-out prompts before and after, and write an HTML report: every image judged "
                       "by the toy world's probe (concept fidelity, context fidelity, class leakage) beside CLIP "
                       "text/image alignment and KID. About a minute on 2 idle CPU cores.")
    add_out(d, "output folder (default: out/demo; replaced if present)", required=False, default="out/demo")
    d.add_argument("--concept", default=DemoConfig.concept,
                   help="toy concept (default: %(default)s, the one this base learns best; see `customdiff toy paths`)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the calibrated recipe's, "
                   "see customdiff.toy.recipes)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--quick", action="store_true", help="a reduced run (30 steps, 2 prompts) for smoke tests")
    add_no_base(d, "demo runs on the embedded toy world only and takes no base; for a Stable Diffusion or SDXL "
                "folder use train, sample and eval with --base")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="the paper's comparisons on the toy world (CD vs DreamBooth vs TI; joint vs "
                       "merge)", description="Train Custom Diffusion, its ablations (no regularization, no "
                       "augmentation), DreamBooth-style and Textual Inversion on the toy concepts, and joint "
                       "training vs closed-form merge vs two deltas on concept pairs, each with its calibrated "
                       "recipe and for several seeds; evaluate with the toy world's probe (concept/pair fidelity, "
                       "context fidelity, class leakage) and the toy CLIP (text/image alignment, KID); write "
                       "results.md, results.json, report.html.")
    b.add_argument("--quick", action="store_true", help="one concept, one pair, one seed, fewer samples "
                   "(~10 min on 2 cores)")
    add_out(b, "output folder (replaced when the run completes)")
    b.add_argument("--concepts", nargs="+", metavar="NAME", help="toy concepts to run (default: all, or one with "
                   "--quick)")
    b.add_argument("--pairs", type=int, default=None, help="number of concept pairs (default: 3, or 1 with --quick)")
    b.add_argument("--steps", type=int, default=None, help="training steps per single concept (default: each "
                   "recipe's; pairs train twice as long)")
    b.add_argument("--seeds", type=int, nargs="+", metavar="N", help="training/sampling seeds (default: 0 1 2, "
                   "or 0 with --quick)")
    b.add_argument("--methods", nargs="+", choices=SINGLE_METHODS, metavar="NAME",
                   help=f"single-concept methods (default: all of {', '.join(SINGLE_METHODS)})")
    b.add_argument("--rescore", action="store_true", help="score the saved samples of the finished bench in "
                   "--out again with the current probe and CLIP (no training or sampling) and rewrite its results "
                   "there")
    add_no_base(b, "bench compares methods on the embedded toy world only and takes no base; for a Stable "
                "Diffusion or SDXL folder use train and eval with --base")
    b.set_defaults(func=_cmd_bench)
