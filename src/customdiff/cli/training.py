"""Subcommands that make training runs and their inputs: `train` and `retrieve` (regularization images)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Interrupted, UserError
from .flags import (
    add_base,
    add_config_flags,
    add_device,
    add_no_base,
    add_out,
    config_from,
    device,
    refuse_base,
)

if TYPE_CHECKING:
    from ..train import StopRequest

log = logging.getLogger(__name__)


def _cmd_train(a: argparse.Namespace) -> None:
    from ..config import TrainConfig
    from ..data import ConceptSpec, read_concepts_file
    from ..train import StopRequest, TrainingStopped, train
    from ..validate import deferred_warnings

    if a.concepts:
        given = [flag for flag, v in (("--concept", a.concept), ("--instance-prompt", a.instance_prompt),
                                      ("--class-prompt", a.class_prompt), ("--reg-dir", a.reg_dir),
                                      ("--reg-captions", a.reg_captions)) if v]
        if given:  # each concept of the file carries its own; a flag beside it would be silently ignored
            raise UserError(f"give either --concepts FILE or {given[0]}, not both: the file's concepts carry their own "
                            "prompts and folders (instance_prompt, class_prompt, class_data_dir)")
        with deferred_warnings(hand_on=True):  # shown once train's own checks pass, or not at all
            specs = read_concepts_file(a.concepts)
    else:
        if not (a.concept and a.instance_prompt and a.class_prompt):
            raise UserError("--concept DIR, --instance-prompt and --class-prompt are required (or --concepts FILE)")
        if a.reg_captions and not a.reg_dir:
            raise UserError(f"--reg-captions {a.reg_captions}: captions of --reg-dir's images, and no --reg-dir is "
                            "given; add --reg-dir DIR or leave --reg-captions out")
        specs = [ConceptSpec(a.concept, a.instance_prompt, a.class_prompt, reg_dir=a.reg_dir,
                             reg_captions=a.reg_captions)]
    cfg = config_from(TrainConfig, a)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # processes in lock step: each stops at once, as before
        out = train(cfg, specs, progress=not a.quiet)
    else:
        interrupt = StopRequest()
        try:
            with _first_interrupt_stops(interrupt):
                out = train(cfg, specs, progress=not a.quiet, interrupt=interrupt)
        except TrainingStopped as e:
            raise Interrupted(f"stopped at step {e.step} of {cfg.steps}; checkpoint in {e.checkpoint}: run the same "
                              "command with --resume to continue") from e
    if int(os.environ.get("RANK", "0")) == 0:  # one line from the main process under accelerate launch
        print(out)


@contextlib.contextmanager
def _first_interrupt_stops(interrupt: StopRequest) -> Iterator[None]:
    """Ctrl-C in the training loop: finish the step and save a checkpoint (a second Ctrl-C quits at once);
    anywhere else, quit at once."""
    def handler(signum: int, frame: Any) -> None:
        if not interrupt.in_loop or interrupt.requested:
            raise KeyboardInterrupt
        interrupt.requested = True
        log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to quit without one)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cmd_retrieve(a: argparse.Namespace) -> None:
    from ..features import ClipFeatures, resolve_clip
    from ..retrieve import check_retrieval, retrieve
    from ..validate import check_number, check_out_dir, deferred_warnings

    refuse_base(a)
    with deferred_warnings():
        check_number("-n", a.n, 1, 1_000_000)
        if not Path(a.corpus).is_dir():
            raise UserError(f"--corpus {a.corpus}: no such folder")
        check_out_dir("--out", a.out)
        clip = resolve_clip(a.clip, None)
        files = check_retrieval(a.corpus, a.class_prompt, a.n, a.out, a.index)
    retrieve(a.corpus, a.class_prompt, a.n, a.out, ClipFeatures(clip, device=device(a.device)), index_path=a.index,
             progress=not a.quiet, files=files)
    print(a.out)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `retrieve`."""
    from ..config import TrainConfig

    t = sub.add_parser("train", help="fine-tune one or several concepts into a delta file",
                       description="Fine-tune cross-attention (K/V by default) and one new token per concept. "
                       "Target images are mixed 1:1 with regularization images of the class.")
    add_base(t)
    add_out(t, "output delta file (.safetensors)", metavar="DELTA.safetensors")
    t.add_argument("--concept", metavar="DIR", help="folder of 4-20 photos of the concept (jpg, png, webp)")
    t.add_argument("--instance-prompt", help="prompt with the new token, e.g. 'photo of a <new1> cat'")
    t.add_argument("--class-prompt", help="prompt of the class, e.g. 'photo of a cat'")
    t.add_argument("--reg-dir", metavar="DIR", help="regularization images with captions (.txt beside each "
                   "image); if absent, --num-class-images are generated by the base and cached")
    t.add_argument("--reg-captions", metavar="FILE", help="captions of --reg-dir's images, one per line")
    t.add_argument("--concepts", metavar="FILE", help="JSON list of concepts for joint training "
                   "(instance_prompt, class_prompt, instance_data_dir, class_data_dir)")
    add_config_flags(t, TrainConfig, skip={"base", "out"})
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("retrieve", help="regularization images from a local captioned corpus by CLIP similarity",
                       description="Rank a folder of images with same-stem .txt captions by CLIP similarity to "
                       "the class prompt and copy the top N as 000000.png + 000000.txt into --out (the layout "
                       "train --reg-dir reads). Embeddings are cached in the corpus and updated incrementally.")
    r.add_argument("--corpus", required=True, metavar="DIR", help="folder of images with .txt captions "
                   "(searched recursively)")
    r.add_argument("--class-prompt", required=True, help="prompt of the class, e.g. 'photo of a cat'")
    r.add_argument("-n", "--n", type=int, required=True, help="number of images to copy")
    add_out(r, "output folder (new, empty, or an earlier retrieval)")
    r.add_argument("--clip", metavar="PATH", help="CLIP folder in transformers format (default: the toy CLIP)")
    r.add_argument("--index", metavar="FILE", help="embedding cache (default: CORPUS/.customdiff_index.safetensors)")
    add_device(r)
    add_no_base(r, "retrieve takes no base: it ranks --corpus with a CLIP (--clip PATH), and the images it copies "
                "serve any base (SD or SDXL) as train --reg-dir")
    r.set_defaults(func=_cmd_retrieve)
