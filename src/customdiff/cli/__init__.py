"""The `customdiff` command line: the parser, logging, and exit codes (0 ok, 2 bad input, 1 other).

Subcommands live in modules by concern (COMMAND_MODULES); shared flags in flags.py.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import signal
import sys
import threading
import warnings
from typing import Any

from .. import __version__
from ..errors import Interrupted, UserError
from .flags import Parser

log = logging.getLogger("customdiff")


# the modules of cli/ that add subcommands, each by concern; a module here has `register(sub)`
COMMAND_MODULES = ("training", "sampling", "deltas", "evaluation", "toy", "ui")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = Parser(prog="customdiff", description="Custom Diffusion: teach a text-to-image diffusion model new "
               "concepts by fine-tuning cross-attention K/V and new token embeddings; store small deltas.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--version", action="version", version=f"customdiff {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for command in sub.choices.values():  # an unknown flag is the command's to refuse, under its name
        command.set_defaults(command_parser=command)
        # -q after the command too (`customdiff train -q ...`); left out there, the top level's value stands
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars or info logs")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; an unrecognized argument is refused by its subcommand's parser
    (`customdiff train: error: ...`), where argparse would report it as the top-level parser's."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (redirected or captured streams)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Lines(logging.Formatter):
    """The message alone; a warning starts with `warning:` however the library worded it."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno == logging.WARNING and not text.startswith("warning:"):
            text = "warning: " + text
        return text


def _main_process() -> bool:
    """Whether this is the main (or only) process of an `accelerate launch` run."""
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    ours = logging.getLogger("customdiff")
    for h in [h for h in ours.handlers if isinstance(h, _StderrHandler)]:
        ours.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Lines())
    ours.addHandler(handler)
    # under accelerate launch the other processes would repeat every line: they report errors only
    ours.setLevel(logging.ERROR if not _main_process() else logging.WARNING if quiet else logging.INFO)
    ours.propagate = False  # one line per record, whatever the root logger has
    for name in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the libraries' notices of their own future changes are for developers, not for a command's user
    warnings.filterwarnings("ignore", category=FutureWarning)
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


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a CI timeout, docker stop), raised wherever the program is, so that every cleanup runs as
    on Ctrl-C: no staging folder or half-written output is left."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _stopped(e: KeyboardInterrupt) -> int:
    """The last line and exit code of a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    return _fail(None, "terminated", 143) if isinstance(e, _Terminated) else _fail(None, "interrupted", 130)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `customdiff` command."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    logging.disable(logging.NOTSET)  # an earlier failed call in this process silenced logging
    try:
        args = parse(argv)
        _setup_logging(args.quiet)  # imports diffusers and transformers: seconds in which Ctrl-C may come
    except KeyboardInterrupt as e:
        return _stopped(e)
    try:
        args.func(args)
    except UserError as e:
        if not _main_process():  # every process refuses the same input: the main one says it
            logging.disable(logging.CRITICAL)
            return 2
        return _fail(args.command, str(e), 2)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f" writing {e.filename}" if e.filename else ""
            return _fail(args.command, f"the disk is full{where} ({e.strerror}); nothing partial was kept: "
                         "free some space and run again", 1)
        if e.errno == errno.ENAMETOOLONG:
            return _fail(args.command, f"{e.filename or 'a path'}: file name too long; choose a shorter name", 2)
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            why = "its file system is read-only" if e.errno == errno.EROFS else "this user may not read or write it"
            return _fail(args.command, f"{e.filename or 'a file'}: {e.strerror}: {why}; change its permissions or "
                         "choose another path", 2)
        raise
    except Interrupted as e:
        return _fail(None, f"interrupted: {e}", 130)
    except KeyboardInterrupt as e:
        return _stopped(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
