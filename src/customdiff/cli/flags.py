"""Shared command-line pieces: the parser, one spelling and one help text per common flag, and flags derived
from the configuration dataclasses."""

from __future__ import annotations

import argparse
import re
import typing
from collections.abc import Collection
from dataclasses import fields
from typing import Any, TypeVar

from ..config import BASE_HELP, field_type, flag_name
from ..errors import UserError

T = TypeVar("T")

# argparse's own pattern (-1, -.5) misses -1e-4 and -inf, so `--learning-rate -1e-4` read the value as an
# option; with this one every float spelling is a value, and the range checks explain what is allowed
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2 and reads -1e-4 as a number."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_base(p: argparse.ArgumentParser, required: bool = True, note: str = "", default: str | None = None) -> None:
    """--base: the base pipeline (`note` says what it is for in this command)."""
    shown = f" (default: {default})" if default is not None else ""
    p.add_argument("--base", required=required, default=default, help=BASE_HELP + note + shown)


def add_no_base(p: argparse.ArgumentParser, why: str) -> None:
    """A hidden --base for a command that takes none: `refuse_base` answers it with `why` (toy is accepted)."""
    p.add_argument("--base", default=None, help=argparse.SUPPRESS)
    p.set_defaults(no_base_why=why)


def refuse_base(a: argparse.Namespace) -> None:
    """A one-line UserError when a command without a base was given one (other than the toy world)."""
    if getattr(a, "base", None) not in (None, "toy"):
        raise UserError(f"--base {a.base}: {a.no_base_why}")


def add_out(p: argparse.ArgumentParser, help: str, metavar: str = "DIR", required: bool = True,
            default: str | None = None) -> None:
    """-o/--out: where the command writes."""
    p.add_argument("-o", "--out", required=required, default=default, metavar=metavar, help=help)


def add_deltas(p: argparse.ArgumentParser) -> None:
    """--delta FILE [FILE ...]: deltas to apply; repeatable, each occurrence one or more files (dest `deltas`)."""
    p.add_argument("--delta", dest="deltas", action="extend", nargs="+", default=None, metavar="FILE",
                   help="delta file(s) to apply (repeatable; the changes of several deltas add up)")


def add_device(p: argparse.ArgumentParser) -> None:
    """--device: where models run (None when left out: see `device`)."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def device(value: str | None) -> str:
    """The --device value (checked: this machine has it), or cuda when available and cpu otherwise."""
    from ..base import check_device

    return check_device(value)


def add_config_flags(p: argparse.ArgumentParser, cls: type, skip: Collection[str] = ()) -> None:
    """One flag per field of a config dataclass (help, choices, metavar from its metadata), except `skip`
    and fields marked cli=False. Booleans: --flag, or --no-flag when the default is True."""
    for f in fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        flag, help_ = flag_name(f.name), f.metadata.get("help", "")
        kind = field_type(cls, f.name)
        extra = {k: f.metadata[k] for k in ("metavar", "required") if k in f.metadata}
        if kind is bool:
            if f.default:
                p.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                               help=f"turn off what is on by default: {help_}")
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help_)
        elif typing.get_origin(kind) is list:
            p.add_argument(flag, dest=f.name, nargs="+", default=None, **{"metavar": "WORD", **extra}, help=help_)
        else:
            shown = "" if f.default in (None, "") or extra.get("required") else f" (default: {f.default})"
            p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_ + shown,
                           choices=f.metadata.get("choices"), **extra)


def config_from(cls: type[T], a: argparse.Namespace) -> T:
    """A config dataclass from parsed flags (a flag left out, None, keeps the field's default)."""
    given = {f.name: getattr(a, f.name) for f in fields(cls) if getattr(a, f.name, None) is not None}
    return cls(**given)
