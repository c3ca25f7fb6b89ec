"""The delta file (format version 1): the change a fine-tune makes to a base, and applying it reversibly.

See docs/FORMAT.md. Tensors are keyed by module path and token name, never by position:
`unet.<path>.weight` (full change), `unet.<path>.weight.up`/`.down` (low-rank change = up @ down),
`tokens.<token>` (the token's input-embedding row). Metadata is string-valued, JSON where structured.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError

log = logging.getLogger(__name__)

FORMAT = "customdiff.delta"
FORMAT_VERSION = "1"
UNET_PREFIX = "unet."
TOKEN_PREFIX = "tokens."
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

    def param_names(self) -> list[str]:
        """Names of the UNet parameters this delta changes."""
        names = {k.removesuffix(".up").removesuffix(".down") for k in self.weights}
        return sorted(names)

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


def check_base(delta: Delta, unet: torch.nn.Module, source: str) -> None:
    """Fail with a clear error when `delta` was trained on another base than `unet`."""
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
        if abs(got["norms"].get(n, -1.0) - norm) > NORM_RTOL * max(norm, 1e-12):
            raise UserError(f"{source}: made for another base ({delta.base.get('name', '?')}; weights of {n} "
                            "differ); use the base it was trained on")
    log.info("%s: base matches within tolerance (different precision)", source)


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file under a temporary name and rename it, so no partial file is ever seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_delta(delta: Delta, path: str | Path) -> None:
    """Write a delta atomically as safetensors with self-describing metadata."""
    tensors = {UNET_PREFIX + k: v.detach().contiguous().cpu() for k, v in delta.weights.items()}
    tensors.update({TOKEN_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in delta.tokens.items()})
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
    atomic_save(tensors, meta, Path(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a file, or a UserError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e


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
    tensors = load_file(str(path))
    weights = {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    tokens = {k[len(TOKEN_PREFIX):]: v for k, v in tensors.items() if k.startswith(TOKEN_PREFIX)}
    known = {"format", "format_version", "storage", "trained", "base", "tokens", "config"}
    try:
        return Delta(weights=weights, tokens=tokens, trained=meta.get("trained", ""),
                     base=json.loads(meta.get("base", "{}")), token_info=json.loads(meta.get("tokens", "[]")),
                     config=json.loads(meta.get("config", "{}")), storage=meta.get("storage", "full"),
                     extra={k: v for k, v in meta.items() if k not in known})
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt delta metadata ({e})") from e


class AppliedDeltas:
    """Deltas applied to a pipeline; `remove()` restores the base exactly (weights, embedding, tokenizer)."""

    def __init__(self, pipe: Any, saved: dict[str, torch.Tensor], tokenizer: Any, vocab_rows: int):
        self.pipe, self._saved, self._tokenizer, self._rows = pipe, saved, tokenizer, vocab_rows

    @torch.no_grad()
    def remove(self) -> None:
        """Undo the deltas: original weights, tokenizer and embedding size."""
        params = dict(self.pipe.unet.named_parameters())
        for n, t in self._saved.items():
            params[n].data = t
        self.pipe.text_encoder.resize_token_embeddings(self._rows, mean_resizing=False)
        self.pipe.tokenizer = self._tokenizer


@torch.no_grad()
def apply_deltas(pipe: Any, deltas: Sequence[Delta], sources: Sequence[str] | None = None) -> AppliedDeltas:
    """Add each delta's weight change and tokens to `pipe` (changes of several deltas sum)."""
    sources = list(sources) if sources is not None else [f"delta {i}" for i in range(len(deltas))]
    owner: dict[str, str] = {}
    for d, src in zip(deltas, sources, strict=True):
        check_base(d, pipe.unet, src)
        for tok in d.tokens:
            if tok in owner:
                raise UserError(f"{src}: token {tok} is also defined by {owner[tok]}; merge them with "
                                "`customdiff merge`, which renames clashing tokens")
            if tok in pipe.tokenizer.get_vocab():
                raise UserError(f"{src}: token {tok} already exists in the base vocabulary; rename it")
            width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
            if d.tokens[tok].shape[-1] != width:
                raise UserError(f"{src}: token {tok} has embedding width {d.tokens[tok].shape[-1]}, the base "
                                f"{width}; use the base it was trained on")
            owner[tok] = src
    params = dict(pipe.unet.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    tokenizer, rows = copy.deepcopy(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().num_embeddings
    for d in deltas:
        for n in d.param_names():
            p = params[n]
            saved.setdefault(n, p.data)
            p.data = (p.data.float() + d.change(n).to(p.device).float()).to(p.dtype)
    new_tokens = [(tok, row) for d in deltas for tok, row in d.tokens.items()]
    if new_tokens:
        pipe.tokenizer.add_tokens([t for t, _ in new_tokens])
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        emb = pipe.text_encoder.get_input_embeddings()
        for tok, row in new_tokens:
            emb.weight.data[pipe.tokenizer.convert_tokens_to_ids(tok)] = row.to(emb.weight)
    return AppliedDeltas(pipe, saved, tokenizer, rows)
