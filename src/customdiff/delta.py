"""The delta file (format version 1): the change a fine-tune makes to a base, and applying it reversibly.

See docs/FORMAT.md. Tensors are keyed by module path and token name, never by position:
`unet.<path>.weight` (full change), `unet.<path>.weight.up`/`.down` (low-rank change = up @ down),
`tokens.<token>` (the token's input-embedding row), and on SDXL `tokens_2.<token>` (its row in the second text
encoder). Metadata is string-valued, JSON where structured.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .conditioning import SD_PIPELINE, XL_PIPELINE, TextSide, is_xl, pipeline_name, sides
from .errors import UserError
from .outputs import atomic_path
from .tokens import add_token_rows, in_vocabulary
from .validate import check_readable, check_utf8

log = logging.getLogger(__name__)

FORMAT = "customdiff.delta"
FORMAT_VERSION = "1"
UNET_PREFIX = "unet."
TOKEN_PREFIX = "tokens."
TOKEN2_PREFIX = "tokens_2."  # SDXL: the token's row in text_encoder_2
NORM_RTOL = 2e-3  # base tensors stored in another precision (fp16 vs fp32) still match within this


@dataclass
class Delta:
    """An in-memory delta: UNet weight changes, new token rows and metadata."""

    weights: dict[str, torch.Tensor]  # parameter name (no "unet." prefix) -> full change, or .up/.down factors
    tokens: dict[str, torch.Tensor]  # token -> embedding row [hidden]
    trained: str
    base: dict[str, Any]
    token_info: list[dict[str, str]]
    config: dict[str, Any] = field(default_factory=dict)
    storage: str = "full"
    extra: dict[str, str] = field(default_factory=dict)  # more metadata (merge sources, residuals, ...)
    tokens_2: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: token -> row of text_encoder_2

    def rows(self, prefix: str) -> dict[str, torch.Tensor]:
        """Token rows for one text side: `tokens` (text_encoder) or `tokens_2` (text_encoder_2)."""
        return self.tokens if prefix == "tokens" else self.tokens_2

    def param_names(self) -> list[str]:
        """Names of the UNet parameters this delta changes."""
        names = {k.removesuffix(".up").removesuffix(".down") for k in self.weights}
        return sorted(names)

    def is_matrix(self, name: str) -> bool:
        """Whether the change of `name` is a 2-D weight matrix (low-rank factors always are), without forming it."""
        return name + ".up" in self.weights or self.weights[name].ndim == 2

    def change(self, name: str) -> torch.Tensor:
        """The full change W_tuned - W_base of one parameter, whatever the storage."""
        if name in self.weights:
            return self.weights[name]
        up, down = self.weights.get(name + ".up"), self.weights.get(name + ".down")
        if up is None or down is None:
            raise KeyError(name)
        return up.float() @ down.float()


def base_fingerprint(unet: torch.nn.Module, names: Sequence[str]) -> dict[str, Any]:
    """Identify the base tensors a delta touches: an exact hash plus per-tensor norms for tolerant matching."""
    params = dict(unet.named_parameters())
    h = hashlib.sha256()
    norms = {}
    for n in sorted(names):
        t = params[n].detach().float().cpu().contiguous()
        h.update(n.encode())
        h.update(t.numpy().tobytes())
        norms[n] = round(float(t.double().norm()), 6)
    return {"sha256": h.hexdigest(), "norms": norms}


def check_family(delta: Delta, unet: torch.nn.Module, source: str) -> None:
    """Fail naming both families when an SD delta meets an SDXL UNet or the reverse (not as a missing layer)."""
    # files from before SDXL support record no pipeline: their token rows say it (no rows: nothing to say)
    made_for = delta.base.get("pipeline") or (XL_PIPELINE if delta.tokens_2 else SD_PIPELINE if delta.tokens else None)
    if made_for is None:
        return
    text_time = getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"
    base_is = XL_PIPELINE if text_time else SD_PIPELINE
    if made_for != base_is:
        raise UserError(f"{source}: made for a {made_for} base, this base is a {base_is}; use the base it was "
                        "trained on")


def check_base(delta: Delta, unet: torch.nn.Module, source: str) -> None:
    """Fail with a clear error when `delta` was trained on another base than `unet`."""
    check_family(delta, unet, source)
    params = dict(unet.named_parameters())
    missing = [n for n in delta.param_names() if n not in params]
    if missing:
        raise UserError(f"{source}: made for another base (it changes {missing[0]}, which this UNet lacks); "
                        "use the base it was trained on")
    for n in delta.param_names():
        shape = tuple(delta.change(n).shape)
        if shape != tuple(params[n].shape):
            raise UserError(f"{source}: made for another base ({n} has shape {shape}, this base "
                            f"{tuple(params[n].shape)}); use the base it was trained on")
    want = delta.base.get("fingerprint", {})
    if not want:
        return
    got = base_fingerprint(unet, delta.param_names())
    if got["sha256"] == want.get("sha256"):
        return
    for n, norm in want.get("norms", {}).items():
        if n not in got["norms"]:  # a tensor taken out of the delta (by hand): its base weight is not its concern
            continue
        if abs(got["norms"][n] - norm) > NORM_RTOL * max(norm, 1e-12):
            raise UserError(f"{source}: made for another base ({delta.base.get('name', '?')}; weights of {n} "
                            "differ); use the base it was trained on")
    log.info("%s: base matches within tolerance (different precision)", source)


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> None:
    """Write a safetensors file under a temporary name and rename it, so no partial file is ever seen; a full
    disk or any other failed write is an OSError naming `path`, as Python's own writes give."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # its I/O failures carry the OS error only in the text: "(os error 28)", or
            code = re.search(r"\(os error (\d+)\)|\bcode: (\d+)", str(e))  # "Os { code: 28, ..." before 0.6
            if code is None:
                raise
            number = int(code.group(1) or code.group(2))
            raise OSError(number, os.strerror(number), str(path)) from e


def public_name(value: str | None, is_path: bool = False) -> str:
    """What a delta records of a local path: its last component, since deltas are shared and the folders of the
    machine that made them are nobody's business. A base that is no local path ('toy', a hub id) stays as is;
    with `is_path`, the value is a path whether it exists or not."""
    if not value:
        return ""
    p = Path(value)
    return p.name if (is_path or p.exists()) and p.name else value


def save_delta(delta: Delta, path: str | Path) -> None:
    """Write a delta atomically as safetensors with self-describing metadata."""
    tensors = {UNET_PREFIX + k: v.detach().contiguous().cpu() for k, v in delta.weights.items()}
    tensors.update({TOKEN_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in delta.tokens.items()})
    tensors.update({TOKEN2_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in delta.tokens_2.items()})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "storage": delta.storage,
        "trained": delta.trained,
        "base": json.dumps(delta.base),
        "tokens": json.dumps(delta.token_info),
        "config": json.dumps(delta.config, default=str),
    }
    meta.update(delta.extra)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in delta.weights.values()})
    meta["dtype"] = ",".join(dtypes) or "float32"  # of the weight changes (SDXL stores float16 by default)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"{path}: not written: {bad[0]} holds NaN or infinite values (a diverged or broken "
                        "computation); check the inputs")
    atomic_save(tensors, meta, Path(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a file, or a UserError naming the file."""
    from safetensors import safe_open

    check_utf8("", path)
    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or a UserError naming the file."""
    check_utf8("", path)
    check_readable(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from e


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse NaN or infinite values in any floating-point tensor, naming the file and the tensor."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{source}: tensor {k} holds {bad} NaN or infinite value(s); the file is damaged "
                            "(or its training diverged): retrain or use another file")


def load_delta(path: str | Path) -> Delta:
    """Read a delta file, validating its format and version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such delta file")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a customdiff delta (format={meta.get('format')!r}); "
                        "use `customdiff import` for other formats")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: delta format version {meta.get('format_version')} is not supported "
                        f"(this customdiff reads version {FORMAT_VERSION}); upgrade customdiff")
    tensors = read_tensors(path)
    check_finite(tensors, path)
    other = [k for k in tensors if not k.startswith((UNET_PREFIX, TOKEN_PREFIX, TOKEN2_PREFIX))]
    if other:
        raise UserError(f"{path}: unexpected tensor {other[0]!r} (a delta holds only unet.*, tokens.* and tokens_2.*)")
    if not tensors:
        raise UserError(f"{path}: holds no tensors; nothing to apply")
    weights = {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    tokens = {k[len(TOKEN_PREFIX):]: v for k, v in tensors.items() if k.startswith(TOKEN_PREFIX)}
    tokens_2 = {k[len(TOKEN2_PREFIX):]: v for k, v in tensors.items() if k.startswith(TOKEN2_PREFIX)}
    known = {"format", "format_version", "storage", "trained", "base", "tokens", "config", "dtype"}
    try:
        base, token_info, config = (json.loads(meta.get(k, d)) for k, d in
                                    (("base", "{}"), ("tokens", "[]"), ("config", "{}")))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: corrupt delta metadata ({str(e)[:120]})") from e
    delta = Delta(weights=weights, tokens=tokens, trained=meta.get("trained", ""), base=base,
                  token_info=token_info, config=config, storage=meta.get("storage", "full"),
                  extra={k: v for k, v in meta.items() if k not in known}, tokens_2=tokens_2)
    _check_structure(delta, path)
    return delta


def _check_structure(d: Delta, path: Path) -> None:
    """Metadata types, token rows and low-rank factor pairs as docs/FORMAT.md describes them."""
    if d.storage not in ("full", "lowrank"):
        raise UserError(f"{path}: storage {d.storage!r} is unknown (full or lowrank)")
    if not isinstance(d.base, dict) or not isinstance(d.config, dict):
        raise UserError(f"{path}: corrupt delta metadata (base and config must be JSON objects)")
    if not isinstance(d.token_info, list) or not all(
            isinstance(x, dict) and isinstance(x.get("token"), str) for x in d.token_info):
        raise UserError(f"{path}: corrupt delta metadata (tokens must be a list of {{\"token\": ...}} objects)")
    listed = [x["token"] for x in d.token_info]
    if len(set(listed)) != len(listed) or (listed and set(listed) != set(d.tokens)):
        raise UserError(f"{path}: token metadata {listed} does not match its token rows {list(d.tokens)}")
    if not isinstance(d.base.get("fingerprint", {}), dict) or not all(
            isinstance(v, (int, float)) for v in d.base.get("fingerprint", {}).get("norms", {}).values()):
        raise UserError(f"{path}: corrupt delta metadata (base fingerprint)")
    if d.tokens_2 and set(d.tokens_2) != set(d.tokens):
        raise UserError(f"{path}: tokens_2 rows {list(d.tokens_2)} do not match its token rows {list(d.tokens)} "
                        "(an SDXL delta has both rows of every token)")
    for tok, row in [*d.tokens.items(), *d.tokens_2.items()]:
        if not tok.strip():
            raise UserError(f"{path}: a token row has an empty name (key 'tokens.'); every row needs its token, "
                            "such as <new1>")
        if row.dim() != 1 or not row.is_floating_point():
            raise UserError(f"{path}: token row {tok!r} must be a 1-D float tensor, got shape {tuple(row.shape)}")
    for k, t in d.weights.items():
        if not t.is_floating_point():
            raise UserError(f"{path}: unet.{k} is not a floating-point tensor ({t.dtype})")
        if k.endswith(".up") or k.endswith(".down"):
            name = k.removesuffix(".up").removesuffix(".down")
            up, down = d.weights.get(name + ".up"), d.weights.get(name + ".down")
            if up is None or down is None:
                raise UserError(f"{path}: unet.{k} has no {'down' if k.endswith('.up') else 'up'} factor")
            if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
                raise UserError(f"{path}: unet.{name} factors have shapes {tuple(up.shape)} and "
                                f"{tuple(down.shape)}, which do not multiply")
            if name in d.weights:
                raise UserError(f"{path}: unet.{name} is stored both full and as factors")


class AppliedDeltas:
    """Deltas applied to a pipeline; `remove()` restores the base exactly (weights, embeddings, tokenizers)."""

    def __init__(self, pipe: Any, saved: dict[str, torch.Tensor], vocab: list[tuple[TextSide, Any, int]]):
        self.pipe, self._saved, self._vocab = pipe, saved, vocab

    @torch.no_grad()
    def remove(self) -> None:
        """Undo the deltas: original weights, tokenizers and embedding sizes."""
        params = dict(self.pipe.unet.named_parameters())
        for n, t in self._saved.items():
            params[n].data = t
        for side, tokenizer, rows in self._vocab:
            getattr(self.pipe, side.encoder).resize_token_embeddings(rows, mean_resizing=False)
            setattr(self.pipe, side.tokenizer, tokenizer)


def _check_tokens(d: Delta, src: str, pipe: Any, owner: dict[str, str]) -> None:
    """Token names free, one row per text encoder of the pipeline, each of its encoder's width."""
    xl = is_xl(pipe)
    if d.tokens_2 and not xl:
        raise UserError(f"{src}: made for Stable Diffusion XL (it has tokens_2 rows); this base is "
                        f"{pipeline_name(pipe)}; use the base it was trained on")
    made_for = d.base.get("pipeline")
    if made_for and made_for != pipeline_name(pipe):
        raise UserError(f"{src}: made for a {made_for}, this base is a {pipeline_name(pipe)}; use the base it was "
                        "trained on")
    if xl and d.tokens and not d.tokens_2:
        raise UserError(f"{src}: has token rows for one text encoder only ({', '.join(d.tokens)}); an SDXL base "
                        "needs both (tokens_2.*); use an SDXL delta")
    for tok in d.tokens:
        if tok in owner and owner[tok] == src:
            raise UserError(f"{src}: given twice; apply each delta once")
        if tok in owner:
            raise UserError(f"{src}: token {tok} is also defined by {owner[tok]}; merge them first "
                            "(`customdiff merge`; in the web app, Library, Merge selected), which renames clashing "
                            "tokens")
        owner[tok] = src
        for side in sides(pipe):
            if in_vocabulary(getattr(pipe, side.tokenizer), tok):
                raise UserError(f"{src}: token {tok} already exists in the base vocabulary; rename it")
            width = getattr(pipe, side.encoder).get_input_embeddings().weight.shape[1]
            row = d.rows(side.prefix)[tok]
            if row.shape[-1] != width:
                raise UserError(f"{src}: token {tok} has embedding width {row.shape[-1]} for {side.encoder}, the "
                                f"base {width}; use the base it was trained on")


def check_pipeline(delta: Delta, pipe: Any, source: str) -> None:
    """Everything `apply_deltas` checks of one delta against a loaded pipeline: its UNet and its token rows."""
    check_base(delta, pipe.unet, source)
    _check_tokens(delta, source, pipe, {})


@torch.no_grad()
def apply_deltas(pipe: Any, deltas: Sequence[Delta], sources: Sequence[str] | None = None) -> AppliedDeltas:
    """Add each delta's weight change and tokens to `pipe` (changes of several deltas sum); on SDXL each token
    goes into both tokenizers and both text encoders."""
    sources = list(sources) if sources is not None else [f"delta {i}" for i in range(len(deltas))]
    owner: dict[str, str] = {}
    for d, src in zip(deltas, sources, strict=True):
        check_base(d, pipe.unet, src)
        _check_tokens(d, src, pipe, owner)
    params = dict(pipe.unet.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    vocab = [(side, copy.deepcopy(getattr(pipe, side.tokenizer)),
              getattr(pipe, side.encoder).get_input_embeddings().num_embeddings) for side in sides(pipe)]
    for d in deltas:
        for n in d.param_names():
            p = params[n]
            saved.setdefault(n, p.data)
            p.data = (p.data.float() + d.change(n).to(p.device).float()).to(p.dtype)
    for side in sides(pipe):
        new_tokens = {tok: row for d in deltas for tok, row in d.rows(side.prefix).items()}
        if new_tokens:
            add_token_rows(getattr(pipe, side.tokenizer), getattr(pipe, side.encoder), new_tokens)
    return AppliedDeltas(pipe, saved, vocab)
