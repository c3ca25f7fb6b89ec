"""Checks at the door: numeric ranges, output paths and free space, UTF-8 text, JSON against small schemas.

Every check raises `UserError` with one line naming the flag or file and the fix. Warnings raised while
checking are held back by `deferred_warnings()` and logged only when every check passed, so a refused run
prints its error alone. docs/INPUTS.md lists every input kind and what the tool does with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger("customdiff")

_pending: ContextVar[list[str] | None] = ContextVar("customdiff_pending_warnings", default=None)
_handed: ContextVar[list[str] | None] = ContextVar("customdiff_handed_warnings", default=None)

# errno values of a full or unwritable disk: turned into one line by the CLI
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def warn(message: str) -> None:
    """Log a one-line warning now, or after the checks when inside `deferred_warnings()`."""
    pending = _pending.get()
    if pending is None:
        log.warning("warning: %s", message)
    elif message not in pending:
        pending.append(message)


@contextlib.contextmanager
def deferred_warnings(discard: bool = False, hand_on: bool = False) -> Iterator[None]:
    """Hold `warn()` messages until the block ends without an error (then log them, unless `discard`:
    for a second pass over inputs already checked; or, with `hand_on`, pass them to the next such block, for
    checks split over two places); drop them when it raises."""
    pending: list[str] = _handed.get() or []
    _handed.set(None)
    token = _pending.set(pending)
    try:
        yield
    finally:
        _pending.reset(token)
    if hand_on:  # reached only when the block did not raise
        _handed.set(pending)
        return
    for m in [] if discard else pending:
        log.warning("warning: %s", m)


# ---------------------------------------------------------------- numbers


def check_number(flag: str, value: float | int | None, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, why: str = "") -> None:
    """Refuse a non-finite value or one outside [lo, hi] (or (lo, hi] with lo_open); None passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} {value}: must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = f"greater than {number_text(lo)}" if lo_open else f"at least {number_text(lo)}"
        raise UserError(f"{flag} {value}: must be {bound}{why}")
    if hi is not None and value > hi:
        raise UserError(f"{flag} {value}: must be at most {number_text(hi)}{why}")


def number_text(x: float) -> str:
    """A range bound as people write it: 18446744073709551615 rather than 1.84467e+19, 1e-06 as is."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_multiple(flag: str, value: int | None, factor: int, why: str = "") -> None:
    """Refuse a positive value that is not a multiple of `factor` (0 and None pass: they mean a default)."""
    if value and value % factor:
        raise UserError(f"{flag} {value}: must be a multiple of {factor}{why}, e.g. "
                        f"{max(factor, value // factor * factor)}")


SEED_MAX = 2**32 - 1  # training seeds: numpy's SeedSequence refuses negatives; derived seeds need headroom


# ---------------------------------------------------------------- output paths


_SIBLING_EXTRA = 16  # ".NAME.xxxxxxxx.tmp" staging names and the "NAME.ckpt" checkpoint folder


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def _check_parent_chain(flag: str, path: Path) -> bool:
    """Refuse when a file sits where a folder must be; return whether the parent folder must be created."""
    anc = _existing_ancestor(path.parent)
    if not anc.is_dir():
        raise UserError(f"{flag} {path}: {anc} is a file, not a folder; choose another output path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {anc} (permission denied); choose another output path")
    return anc != path.parent.absolute()


def _sticky_blocked(p: Path) -> bool:
    """Whether a sticky parent folder (such as /tmp) keeps this user from replacing `p`, another user's."""
    try:
        parent, own = p.absolute().parent.stat(), p.lstat()  # a link is replaced itself, not what it points to
    except OSError:
        return False
    if not parent.st_mode & stat.S_ISVTX or not hasattr(os, "geteuid"):  # no sticky folders on Windows
        return False
    return os.geteuid() not in (0, own.st_uid, parent.st_uid)


def check_replaceable(flag: str, path: str | Path, whole: bool = True) -> Path:
    """An output made beside itself and renamed into place (every file, and folders written whole): the folder
    it goes in must be writable (or creatable), and, when it is replaced `whole`, no sticky folder may keep it as
    another user's."""
    p = Path(path)
    _check_parent_chain(flag, p)
    if whole and p.exists() and _sticky_blocked(p):
        raise UserError(f"{flag} {path}: belongs to another user, in a folder where only owners may replace their "
                        "files (sticky, as /tmp); choose another output path")
    return p


def check_free_space(flag: str, path: Path, need_bytes: int) -> None:
    """Refuse when the disk holding `path` has less than `need_bytes` free (with 10% headroom)."""
    if need_bytes <= 0:
        return
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < need_bytes * 1.1:
        raise UserError(f"{flag} {path}: needs about {human_bytes(need_bytes)} but only {human_bytes(free)} are "
                        "free on that disk; free some space or choose another disk")


def check_utf8(flag: str, path: str | Path) -> None:
    """Refuse a path that is not valid UTF-8 (bytes the file system holds but no text encodes): safetensors
    cannot open it, and it cannot be written into JSON, logs or a web page as the name it is."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(f"{flag + ' ' if flag else ''}{shown}: the path is not valid UTF-8; rename it") from None


def _check_name_length(flag: str, p: Path) -> None:
    """Refuse a name too long to leave room for the temporary and checkpoint names made beside it (and one that
    is not UTF-8)."""
    check_utf8(flag, p)
    try:
        limit = os.pathconf(_existing_ancestor(p.parent), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(p.name.encode())  # UTF-8, checked above
    if size + _SIBLING_EXTRA > limit:
        raise UserError(f"{flag} {path_text(p)}: the name is {size} bytes; the temporary and checkpoint "
                        f"files beside it need it at most {limit - _SIBLING_EXTRA}: choose a shorter name")


def path_text(p: Path) -> str:
    """A path for a message, its name cut to 60 characters."""
    return str(p) if len(p.name) <= 60 else str(p.parent / (p.name[:57] + "..."))


def check_out_file(flag: str, path: str | Path, suffix: str | None = None, need_bytes: int = 0) -> Path:
    """An output file: right suffix, a name short enough, not a folder, parent a (creatable, writable) folder,
    space for it."""
    p = Path(path)
    if not str(path).strip():
        raise UserError(f"{flag}: empty output path")
    _check_name_length(flag, p)
    if suffix and p.suffix != suffix:
        raise UserError(f"{flag} {path}: the output file must end in {suffix}")
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name such as {p / ('out' + (suffix or ''))}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path}: exists and is read-only; choose another output path")
    check_replaceable(flag, p)  # a missing folder is created (with a warning) when the file is written
    check_free_space(flag, p, need_bytes)
    return p


def check_out_dir(flag: str, path: str | Path, need_bytes: int = 0) -> Path:
    """An output folder: a name short enough, not an existing file, parent writable, space for the expected
    output."""
    p = Path(path)
    if not str(path).strip():
        raise UserError(f"{flag}: empty output path")
    _check_name_length(flag, p)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: exists and is a file, not a folder; choose a folder name")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: cannot write in this folder (permission denied)")
    else:
        _check_parent_chain(flag, p)  # created (with a warning) when the first file is written
    check_free_space(flag, p, need_bytes)
    return p


def check_in_file(flag: str, path: str | Path, what: str = "file") -> Path:
    """An input file that must exist and be a readable regular file."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give the {what} itself")
    if not p.is_file():
        raise UserError(f"{flag} {path}: no such {what}")
    check_readable(p, flag)
    return p


def unreadable(path: str | Path, flag: str = "") -> UserError:
    """The error for a file or folder this user may not read (`flag`: the option that named it)."""
    return UserError(f"{flag + ' ' if flag else ''}{path}: permission denied: this user may not read it; change its "
                     "permissions (chmod a+r) or run as its owner")


def check_readable(path: str | Path, flag: str = "") -> None:
    """Refuse a file this user may not read, naming it: libraries report that as a missing file, or worse."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise unreadable(path, flag) from None
    except OSError:  # missing, a folder, ...: the caller says what it expected
        pass


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------- text and JSON


TEXT_MAX = 64 * 2**20  # text inputs (prompts, captions, listings, JSON) are far smaller


def read_text(path: str | Path, label: str) -> str:
    """A UTF-8 text file (a BOM is dropped) of at most TEXT_MAX bytes; a UserError naming the file and the
    offending byte otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:  # read one byte past the cap: /dev/zero or a mistaken video must not fill memory
            data = f.read(TEXT_MAX + 1)
    except IsADirectoryError as e:
        raise UserError(f"{label} {path}: is a folder, not a text file") from e
    except FileNotFoundError as e:
        raise UserError(f"{label} {path}: no such file") from e
    except OSError as e:
        raise UserError(f"{label} {path}: cannot read it ({e.strerror or e})") from e
    if len(data) > TEXT_MAX:
        raise UserError(f"{label} {path}: larger than {TEXT_MAX // 2**20} MB; not a prompt, caption or listing "
                        "file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{label} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "re-save the file as UTF-8") from e
    if "\x00" in text:
        raise UserError(f"{label} {path}: not a text file (NUL byte at offset {data.index(0)})")
    return text.removeprefix("\ufeff")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in one object")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(path: str | Path, label: str) -> Any:
    """Parse a UTF-8 JSON file strictly: no duplicate keys, no NaN/Infinity; errors name the line and column."""
    text = read_text(path, label)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"{label} {path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    except (ValueError, RecursionError) as e:
        raise UserError(f"{label} {path}: invalid JSON ({str(e)[:120]})") from e


@dataclass(frozen=True)
class Field:
    """One key of a JSON object schema: its accepted types and whether it must be present."""

    types: tuple[type, ...]
    required: bool = False
    nonempty: bool = False  # strings must contain something besides spaces


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true/false", list: "a list",
             dict: "an object", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def check_object(obj: Any, schema: Mapping[str, Field], where: str, warn_unknown: bool = True) -> dict[str, Any]:
    """Check a JSON object against `schema`: an object, required keys present, every known key's type."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object {{...}}, got {_json_kind(obj)}")
    missing = [k for k, f in schema.items() if f.required and k not in obj]
    if missing:
        raise UserError(f"{where}: lacks {', '.join(missing)}")
    for k, f in schema.items():
        if k not in obj:
            continue
        v = obj[k]
        ok = isinstance(v, f.types) and not (isinstance(v, bool) and bool not in f.types)
        if not ok:
            raise UserError(f"{where}: {k} must be {_type_name(f.types)}, got {_json_kind(v)}")
        if f.nonempty and isinstance(v, str) and not v.strip():
            raise UserError(f"{where}: {k} is empty")
    unknown = [k for k in obj if k not in schema]
    if unknown and warn_unknown:
        warn(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} ignored (known: {', '.join(schema)})")
    return obj


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(v), type(v).__name__)


STR = (str,)
OPT_STR = (str, type(None))

# the fields every concept entry has, in both file kinds
_CONCEPT_FIELDS: dict[str, Field] = {
    "instance_prompt": Field(STR, required=True, nonempty=True),
    "class_prompt": Field(STR, required=True, nonempty=True),
    "instance_data_dir": Field(STR, required=True, nonempty=True),
    "class_data_dir": Field(OPT_STR),
}
# the reference's concept_list.json (train --concepts)
CONCEPT_SCHEMA: dict[str, Field] = {**_CONCEPT_FIELDS, "initializer_token": Field(OPT_STR),
                                    "initializer": Field(OPT_STR)}
# CustomConcept101's dataset.json entries (eval --dataset): a concept, or a list of concepts plus a dict
# holding the prompt file of the composition
DATASET_EXTRA_SCHEMA: dict[str, Field] = {
    "prompt_filename": Field(OPT_STR),
    "prompt_filename_compose": Field(OPT_STR),
}
DATASET_CONCEPT_SCHEMA: dict[str, Field] = {**_CONCEPT_FIELDS, **DATASET_EXTRA_SCHEMA}


def check_dataset_entries(items: list, path: Path, label: str = "--dataset") -> None:
    """Check each dataset.json entry's shape and types (eval's reader then resolves paths and prompts)."""
    for i, item in enumerate(items):
        where = f"{label} {path}: entry {i}"
        if isinstance(item, dict):
            check_object(item, DATASET_CONCEPT_SCHEMA, where, warn_unknown=False)
        elif isinstance(item, list):
            for j, x in enumerate(item):
                if isinstance(x, dict) and "instance_prompt" in x:
                    check_object(x, DATASET_CONCEPT_SCHEMA, f"{where}, concept {j}", warn_unknown=False)
                else:
                    check_object(x, DATASET_EXTRA_SCHEMA, f"{where}, item {j}", warn_unknown=False)
        else:
            raise UserError(f"{where}: expected an object or a list of objects, got {_json_kind(item)}")
