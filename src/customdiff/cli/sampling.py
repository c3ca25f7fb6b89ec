"""The `sample` subcommand: images from a base plus deltas."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError
from .flags import DTYPES, add_base, add_deltas, add_device, add_out, device


def load_with_deltas(base: str, deltas: list[Any], delta_paths: list[str], on: str,
                     dtype: str = "float32") -> tuple[Any, Any]:
    """The base pipeline on device `on` with the (already loaded) deltas applied, and the applied handle."""
    import torch

    from ..base import load_pipeline
    from ..delta import apply_deltas

    pipe = load_pipeline(base, dtype=getattr(torch, DTYPES[dtype]), device=on)
    return pipe, apply_deltas(pipe, deltas, delta_paths)


def _check_door(a: argparse.Namespace, prompts: list[str]) -> None:
    """Flags, base facts and the output folder of `sample`, before any model loads."""
    from ..base import SAMPLING_MULTIPLE_WHY, STEPS_WHY, base_facts, sampling_multiple
    from ..outputs import INDEX_FILE, check_out
    from ..validate import check_multiple, check_number, check_out_dir

    check_number("--n", a.n, 1, 10_000)
    check_number("--steps", a.steps, 1, 10_000)
    check_number("--seed", a.seed, 0, 2**64 - 1)
    check_number("--guidance", a.guidance, 0, 100)
    check_number("--resolution", a.resolution, 8, 8192)
    facts = base_facts(a.base)
    if facts is not None:
        check_multiple("--resolution", a.resolution, sampling_multiple(facts), SAMPLING_MULTIPLE_WHY)
        check_number("--steps", a.steps, 1, facts.max_sampling_steps, why=STEPS_WHY)
    side = a.resolution or (facts.native_resolution if facts else 512)
    per_image = side * side * 3 // 2 + 4096  # a generous PNG size (noise compresses badly)
    check_out_dir("--out", a.out, need_bytes=2 * per_image * a.n * len(prompts))
    check_out(a.out, "sample", INDEX_FILE)  # an earlier sample folder is replaced whole; another folder is not


def _check_prompt_tokens(undefined: list[str], vocab: set[str]) -> None:
    """Refuse a modifier token (`<new1>`) that no --delta defines (`undefined`) and the base's vocabulary lacks:
    the tokenizer would split it into pieces and the sample would silently leave the concept out."""
    missing = [t for t in undefined if t not in vocab]
    if missing:
        raise UserError(f"the prompt uses {missing[0]}, which no --delta defines (the base's tokenizer does not "
                        f"know it either); pass the delta that teaches {missing[0]} with --delta FILE")


def _cmd_sample(a: argparse.Namespace) -> None:
    from ..base import base_vocabulary
    from ..conditioning import pipeline_vocabulary
    from ..delta import load_delta
    from ..sample import read_prompts, sample_to_dir, set_scheduler
    from ..tokens import undefined_tokens
    from ..validate import deferred_warnings

    paths = a.deltas or []
    with deferred_warnings():
        prompts = a.prompt or read_prompts(a.prompts_file)
        _check_door(a, prompts)
        deltas = [load_delta(p) for p in paths]  # validate every file before the slow base load
        undefined = undefined_tokens([*prompts, a.negative_prompt or ""], {t for d in deltas for t in d.tokens})
        # only those need the base's vocabulary: its tokenizers, loaded alone; a hub id's (None) once it is loaded
        vocab = base_vocabulary(a.base) if undefined else set()
        if vocab is not None:
            _check_prompt_tokens(undefined, vocab)
    pipe, _ = load_with_deltas(a.base, deltas, paths, device(a.device), a.dtype)
    if vocab is None:
        _check_prompt_tokens(undefined, pipeline_vocabulary(pipe))
    set_scheduler(pipe, a.scheduler)
    sample_to_dir(pipe, prompts, a.out, n=a.n, seed=a.seed, steps=a.steps, guidance=a.guidance,
                  resolution=a.resolution, negative_prompt=a.negative_prompt, progress=not a.quiet)
    print(a.out)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `sample`."""
    from ..sample import SCHEDULERS

    s = sub.add_parser("sample", help="generate images from a base plus deltas",
                       description="Generate images; with the pipeline's own scheduler the images equal stock "
                       "diffusers' pipe(prompt, ..., generator=torch.Generator('cpu').manual_seed(seed)).")
    add_base(s)
    add_deltas(s)
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
    add_device(s)
    s.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights' precision (default: float32; "
                   "float16 halves GPU memory)")
    add_out(s, "output folder for {index:04d}.png, grid.png, prompts.json")
    s.set_defaults(func=_cmd_sample)
