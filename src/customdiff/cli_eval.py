"""The `customdiff eval` and `customdiff retrieve` subcommands (registered by cli.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger("customdiff")


def _toy_clip() -> str | None:
    """The shipped toy CLIP folder, or None when the toy world is not installed or built."""
    try:
        from .toy import paths
    except ImportError:
        return None
    folder = Path(paths()["clip"])
    return str(folder) if (folder / "config.json").is_file() else None


def resolve_clip(clip: str | None, base: str | None) -> str:
    """--clip, or the toy CLIP when the base is the toy world (eval) or no base is involved (retrieve)."""
    if clip:
        return clip
    if base is None or base == "toy":
        toy = _toy_clip()
        if toy:
            return toy
        raise UserError("--clip PATH is required: the toy CLIP is not built in this installation")
    raise UserError("--clip PATH is required unless --base toy (e.g. a local openai/clip-vit-base-patch32 folder)")


def _cmd_eval(a: argparse.Namespace) -> None:
    from .evaluate import read_dataset, run_eval
    from .validate import check_number, check_out_dir, deferred_warnings

    with deferred_warnings():
        for flag, v in (("--n", a.n), ("--steps", a.steps), ("--n-class", a.n_class), ("--max-real", a.max_real),
                        ("--kid-subsets", a.kid_subsets)):
            check_number(flag, v, 1, 100_000)
        check_number("--guidance", a.guidance, 0, 100)
        check_number("--resolution", a.resolution, 8, 8192)
        check_number("--seed", a.seed, 0, 2**64 - 1)
        if "{}" not in a.class_template:
            raise UserError("--class-template must contain {} (where the class prompt goes), e.g. 'photo of a {}'")
        read_dataset(a.dataset, a.entries)  # schema, prompt files and entry names, before any model loads
        check_out_dir("--out", a.out)
        clip = resolve_clip(a.clip, a.base)
    run_eval(a.base, a.dataset, a.delta or [], clip, a.out, select=a.entries, images_in=a.images,
             device=a.device, progress=not a.quiet, n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed,
             resolution=a.resolution, n_class=a.n_class, class_template=a.class_template, max_real=a.max_real,
             kid_subsets=a.kid_subsets, strip=a.strip_tokens)
    print(Path(a.out) / "metrics.json")


def _cmd_retrieve(a: argparse.Namespace) -> None:
    from .features import ClipFeatures
    from .retrieve import retrieve
    from .validate import check_number, check_out_dir, deferred_warnings

    with deferred_warnings():
        check_number("-n", a.n, 1, 1_000_000)
        if not Path(a.corpus).is_dir():
            raise UserError(f"--corpus {a.corpus}: no such folder")
        check_out_dir("--out", a.out)
    clip = ClipFeatures(resolve_clip(a.clip, None), device=a.device)
    retrieve(a.corpus, a.class_prompt, a.n, a.out, clip, index_path=a.index, progress=not a.quiet)
    print(a.out)


def register(sub: Any) -> None:
    """Add the `eval` and `retrieve` subparsers to the `customdiff` subparsers object."""
    e = sub.add_parser("eval", help="CLIP text/image alignment and KID on a CustomConcept101-style dataset",
                       description="Sample every entry's prompts (N images each) with the deltas applied and "
                       "score them: CLIP text alignment (prompt without modifier tokens), CLIP image alignment "
                       "(to the concept photos) and KID x1000 of class-prompt images vs the real class images. "
                       "Writes metrics.json, metrics.md and images/ into --out.")
    e.add_argument("--base", required=True, help="base pipeline: local diffusers folder, hub id, or 'toy'")
    e.add_argument("--dataset", required=True, metavar="FILE", help="CustomConcept101-style dataset.json")
    e.add_argument("--delta", action="extend", nargs="+", metavar="FILE", help="delta file(s) to apply")
    e.add_argument("--clip", metavar="PATH", help="CLIP folder in transformers format (default with --base toy: "
                   "the toy CLIP)")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder")
    e.add_argument("--entries", nargs="+", metavar="NAME", help="evaluate only these entries (index, or "
                   "instance folder name such as cat1, or full name such as 00_cat1)")
    e.add_argument("--images", metavar="DIR", help="score images an earlier eval wrote (its --out/images) "
                   "instead of sampling")
    e.add_argument("--n", type=int, default=4, help="images per prompt (default: 4)")
    e.add_argument("--n-class", type=int, default=50, metavar="N", help="class-prompt images per class for KID (default: 50)")
    e.add_argument("--max-real", type=int, default=200, metavar="N", help="real class images used for KID (default: 200)")
    e.add_argument("--class-template", default="{}", metavar="TEXT", help="class-prompt template for KID sampling, e.g. "
                   "'photo of a {}' (default: the class prompt as is)")
    e.add_argument("--kid-subsets", type=int, default=100, metavar="N", help="random subsets averaged by KID (default: 100)")
    e.add_argument("--steps", type=int, default=50, metavar="N", help="denoising steps (default: 50)")
    e.add_argument("--guidance", type=float, default=6.0, metavar="G", help="classifier-free guidance (default: 6, as the "
                   "reference's sampling)")
    e.add_argument("--resolution", type=int, default=None, metavar="N", help="image size (default: the base's)")
    e.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the CPU generator (default: 0)")
    e.add_argument("--strip-tokens", action="store_true", help="sample prompts without their modifier tokens "
                   "(a base-model baseline)")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("retrieve", help="regularization images from a local captioned corpus by CLIP similarity",
                       description="Rank a folder of images with same-stem .txt captions by CLIP similarity to "
                       "the class prompt and copy the top N as 000000.png + 000000.txt into --out (the layout "
                       "train --reg-dir reads). Embeddings are cached in the corpus and updated incrementally.")
    r.add_argument("--corpus", required=True, metavar="DIR", help="folder of images with .txt captions "
                   "(searched recursively)")
    r.add_argument("--class-prompt", required=True, help="prompt of the class, e.g. 'photo of a cat'")
    r.add_argument("-n", "--n", type=int, required=True, help="number of images to copy")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (new, empty, or an earlier retrieval)")
    r.add_argument("--clip", metavar="PATH", help="CLIP folder in transformers format (default: the toy CLIP)")
    r.add_argument("--index", metavar="FILE", help="embedding cache (default: CORPUS/.customdiff_index.safetensors)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.set_defaults(func=_cmd_retrieve)
