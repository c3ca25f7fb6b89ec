"""The `customdiff` command line: subcommands, logging, and exit codes (0 ok, 2 bad input, 1 other)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import typing
from dataclasses import fields
from typing import Any

from .errors import UserError

log = logging.getLogger("customdiff")


# argparse's own pattern (-1, -.5) misses -1e-4 and -inf, so `--learning-rate -1e-4` read the value as an
# option; with this one every float spelling is a value, and the range checks explain what is allowed
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2 and reads -1e-4 as a number."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_flags(p: argparse.ArgumentParser, skip: set[str]) -> None:
    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=help_)
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help_)
            continue
        if typing.get_origin(kind) is list:
            p.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="WORD", help=help_)
            continue
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"{help_} (default: {f.default})",
                       choices=f.metadata.get("choices"))


def _cmd_train(a: argparse.Namespace) -> None:
    from .config import TrainConfig
    from .data import ConceptSpec, read_concepts_file
    from .train import train

    if a.concepts:
        if a.concept:
            raise UserError("give either --concepts FILE or --concept DIR, not both")
        specs = read_concepts_file(a.concepts)
    else:
        if not (a.concept and a.instance_prompt and a.class_prompt):
            raise UserError("--concept DIR, --instance-prompt and --class-prompt are required (or --concepts FILE)")
        specs = [ConceptSpec(a.concept, a.instance_prompt, a.class_prompt, reg_dir=a.reg_dir,
                             reg_captions=a.reg_captions)]
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    out = train(cfg, specs, progress=not a.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # one line from the main process under accelerate launch
        print(out)


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _load_with_deltas(base: str, deltas: list[Any], delta_paths: list[str], device: str,
                      dtype: str = "float32") -> tuple[Any, Any]:
    import torch

    from .base import load_pipeline
    from .delta import apply_deltas

    pipe = load_pipeline(base, dtype=getattr(torch, DTYPES[dtype]), device=device)
    return pipe, apply_deltas(pipe, deltas, delta_paths)


def _check_sample_door(a: argparse.Namespace, prompts: list[str]) -> None:
    """Flags, base facts and the output folder of `sample`, before any model loads."""
    from .base import base_facts
    from .validate import check_multiple, check_number, check_out_dir

    check_number("--n", a.n, 1, 10_000)
    check_number("--steps", a.steps, 1, 10_000)
    check_number("--seed", a.seed, 0, 2**64 - 1)
    check_number("--guidance", a.guidance, 0, 100)
    check_number("--resolution", a.resolution, 8, 8192)
    facts = base_facts(a.base)
    if facts is not None:
        check_multiple("--resolution", a.resolution, facts.factor, " (the VAE's factor)")
        check_number("--steps", a.steps, 1, facts.num_train_timesteps, why=" (the scheduler's training steps)")
    side = a.resolution or (facts.native_resolution if facts else 512)
    per_image = side * side * 3 // 2 + 4096  # a generous PNG size (noise compresses badly)
    check_out_dir("--out", a.out, need_bytes=2 * per_image * a.n * len(prompts))


def _cmd_sample(a: argparse.Namespace) -> None:
    from .sample import read_prompts, sample_to_dir, set_scheduler
    from .validate import deferred_warnings

    with deferred_warnings():
        prompts = a.prompt or read_prompts(a.prompts_file)
        _check_sample_door(a, prompts)
        from .delta import load_delta

        deltas = [load_delta(p) for p in a.delta or []]  # validate every file before the slow base load
    pipe, _ = _load_with_deltas(a.base, deltas, a.delta or [], a.device, a.dtype)
    set_scheduler(pipe, a.scheduler)
    sample_to_dir(pipe, prompts, a.out, n=a.n, seed=a.seed, steps=a.steps, guidance=a.guidance,
                  resolution=a.resolution, negative_prompt=a.negative_prompt, progress=not a.quiet)
    print(a.out)


def _cmd_demo(a: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(out=a.out, concept=a.concept, steps=a.steps, seed=a.seed)
    if a.quick:
        cfg.steps, cfg.prompts, cfg.n, cfg.sample_steps, cfg.n_class = min(cfg.steps or 30, 30), 2, 2, 10, 8
    print(run_demo(cfg, progress=not a.quiet))


def _cmd_bench(a: argparse.Namespace) -> None:
    from .bench import BenchConfig, run_bench

    cfg = BenchConfig.quick() if a.quick else BenchConfig()
    if a.concepts:
        cfg.concepts = a.concepts
    if a.pairs is not None:
        cfg.pairs = a.pairs
    if a.steps:
        cfg.steps = a.steps
    if a.seeds:
        cfg.seeds = a.seeds
    if a.methods:
        cfg.methods = a.methods
    out = run_bench(cfg, a.out, progress=not a.quiet)
    print((out / "results.md").read_text())
    print(f"report: {out / 'report.html'}")


def _cmd_toy(a: argparse.Namespace) -> None:
    from .toy import paths

    print(json.dumps(paths()))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from .bench import SINGLE_METHODS
    from .sample import SCHEDULERS

    p = _Parser(prog="customdiff", description="Custom Diffusion: teach a text-to-image diffusion model new "
                "concepts by fine-tuning cross-attention K/V and new token embeddings; store small deltas.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="fine-tune one or several concepts into a delta file",
                       description="Fine-tune cross-attention (K/V by default) and one new token per concept. "
                       "Target images are mixed 1:1 with regularization images of the class.")
    t.add_argument("--base", required=True, help="base pipeline: local diffusers folder, hub id, or 'toy'")
    t.add_argument("--out", required=True, help="output delta file (.safetensors)")
    t.add_argument("--concept", metavar="DIR", help="folder of 4-20 photos of the concept (jpg, png, webp)")
    t.add_argument("--instance-prompt", help="prompt with the new token, e.g. 'photo of a <new1> cat'")
    t.add_argument("--class-prompt", help="prompt of the class, e.g. 'photo of a cat'")
    t.add_argument("--reg-dir", metavar="DIR", help="regularization images with captions (.txt beside each "
                   "image); if absent, --num-class-images are generated by the base and cached")
    t.add_argument("--reg-captions", metavar="FILE", help="captions of --reg-dir's images, one per line")
    t.add_argument("--concepts", metavar="FILE", help="JSON list of concepts for joint training "
                   "(instance_prompt, class_prompt, instance_data_dir, class_data_dir)")
    _add_config_flags(t, skip={"base", "out"})
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate images from a base plus deltas",
                       description="Generate images; with the pipeline's own scheduler the images equal stock "
                       "diffusers' pipe(prompt, ..., generator=torch.Generator('cpu').manual_seed(seed)).")
    s.add_argument("--base", required=True, help="base pipeline: local diffusers folder, hub id, or 'toy'")
    s.add_argument("--delta", action="append", metavar="FILE", help="delta file to apply (repeatable)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="prompt (repeatable)")
    g.add_argument("--prompts-file", metavar="FILE", help="text file with one prompt per line")
    s.add_argument("--n", type=int, default=4, help="images per prompt (default: 4)")
    s.add_argument("--seed", type=int, default=0, help="seed of the CPU generator (default: 0)")
    s.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    s.add_argument("--resolution", type=int, default=None, help="image size (default: the base's)")
    s.add_argument("--negative-prompt", default=None, help="negative prompt")
    s.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                   help="replace the pipeline's scheduler (default: keep it, for exact reproducibility)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights' precision (default: float32; "
                   "float16 halves GPU memory)")
    s.add_argument("--out", required=True, help="output folder for {index:04d}.png, grid.png, prompts.json")
    s.set_defaults(func=_cmd_sample)

    d = sub.add_parser("demo", help="the main job: teach a toy concept, sample before/after, write a report",
                       description="Train one personal concept of the embedded toy world with Custom Diffusion, "
                       "sample held-out prompts before and after, and write an HTML report: every image judged "
                       "by the toy world's probe (concept fidelity, context fidelity, class leakage) beside CLIP "
                       "text/image alignment and KID. A few minutes on a laptop CPU.")
    d.add_argument("--out", default="out/demo", help="output folder (default: out/demo; replaced if present)")
    d.add_argument("--concept", default="checker_square", help="toy concept (see `customdiff toy paths`)")
    d.add_argument("--steps", type=int, default=0, help="training steps (default: the calibrated recipe's, "
                   "see customdiff.toy.recipes)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--quick", action="store_true", help="a reduced run (30 steps, 2 prompts) for smoke tests")
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
    b.add_argument("--out", required=True, help="output folder (replaced when the run completes)")
    b.add_argument("--concepts", nargs="+", metavar="NAME", help="toy concepts to run (default: all, or one with --quick)")
    b.add_argument("--pairs", type=int, default=None, help="number of concept pairs (default: 3, or 1 with --quick)")
    b.add_argument("--steps", type=int, default=0, help="training steps per single concept (default: each "
                   "recipe's; pairs train twice as long)")
    b.add_argument("--seeds", type=int, nargs="+", metavar="N", help="training/sampling seeds (default: 0 1 2, "
                   "or 0 with --quick)")
    b.add_argument("--methods", nargs="+", choices=SINGLE_METHODS, metavar="NAME",
                   help=f"single-concept methods (default: all of {', '.join(SINGLE_METHODS)})")
    b.set_defaults(func=_cmd_bench)

    y = sub.add_parser("toy", help="the embedded toy world", description="The embedded toy world.")
    y.add_argument("what", choices=["paths"], help="paths: print JSON with the toy base, CLIP and concepts")
    y.set_defaults(func=_cmd_toy)

    from .cli_eval import register as register_eval
    from .cli_extra import register as register_extra

    register_extra(sub)
    register_eval(sub)
    return p


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (redirected or captured streams)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    ours = logging.getLogger("customdiff")
    for h in [h for h in ours.handlers if isinstance(h, _StderrHandler)]:
        ours.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.WARNING if quiet else logging.INFO)
    ours.propagate = False  # one line per record, whatever the root logger has
    for name in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        diffusers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _fail(command: str | None, message: str, code: int) -> int:
    """Print the error as the last line on stderr: progress bars closed, later log lines silenced."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except ImportError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    line = re.sub(r"\s*[\r\n]+\s*", " ", message.strip())  # one line, whatever the message holds
    print(f"customdiff {command}: error: {line}" if command else f"customdiff: {line}", file=sys.stderr, flush=True)
    logging.disable(logging.CRITICAL)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `customdiff` command."""
    logging.disable(logging.NOTSET)  # an earlier failed call in this process silenced logging
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    if getattr(args, "device", "x") is None:
        args.device = _default_device()
    try:
        args.func(args)
    except UserError as e:
        return _fail(args.command, str(e), 2)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f" writing {e.filename}" if e.filename else ""
            return _fail(args.command, f"the disk is full{where} ({e.strerror}); nothing partial was kept: "
                         "free some space and run again", 1)
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return _fail(args.command, f"{e.filename or 'a file'}: {e.strerror}; choose a path you can write", 2)
        raise
    except KeyboardInterrupt:
        return _fail(None, "interrupted", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
