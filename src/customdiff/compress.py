"""Low-rank compression of a delta: truncated SVD of each weight change, stored as up @ down factors."""

from __future__ import annotations

import json
import logging

import torch
from torch import Tensor

from .delta import Delta
from .errors import UserError
from .validate import warn

log = logging.getLogger(__name__)


def delta_nbytes(delta: Delta) -> int:
    """Bytes of the delta's tensors (weights and tokens) as stored."""
    tensors = [*delta.weights.values(), *delta.tokens.values(), *delta.tokens_2.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def choose_rank(s: Tensor, energy: float | None = None, rank: int | None = None) -> int:
    """Smallest rank whose cumulative singular values reach `energy` of their sum, or `rank` (clamped)."""
    if rank is not None:
        return max(1, min(int(rank), s.numel()))
    total = float(s.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(s.double(), 0) / total
    # >= energy (the reference keeps one component fewer: its loop stops at the first index exceeding it)
    return int((cum < energy - 1e-12).sum()) + 1


def compress_delta(delta: Delta, energy: float | None = None, rank: int | None = None) -> Delta:
    """Factor every 2-D weight change as up (out x r) @ down (r x in); tokens and 1-D changes stay as they are."""
    if (energy is None) == (rank is None):
        raise UserError("give exactly one of --energy F or --rank R")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UserError(f"--energy {energy}: must be in (0, 1], e.g. 0.6")
    if rank is not None and rank < 1:
        raise UserError(f"--rank {rank}: must be at least 1")
    if not any(delta.is_matrix(n) for n in delta.param_names()):
        raise UserError("the delta holds no weight matrices to compress (token rows only, as `--train tokens` "
                        "makes); use it as it is")
    weights: dict[str, Tensor] = {}
    ranks = {}
    for name in delta.param_names():
        change = delta.change(name)
        if change.ndim != 2:  # biases: nothing to factor
            weights[name] = change
            continue
        U, S, Vh = torch.linalg.svd(change.double(), full_matrices=False)
        r = choose_rank(S, energy, rank)
        dtype = change.dtype if change.dtype.is_floating_point else torch.float32
        weights[name + ".up"] = (U[:, :r] * S[:r]).to(dtype).contiguous()  # (out, r)
        weights[name + ".down"] = Vh[:r].to(dtype).contiguous()  # (r, in)
        ranks[name] = r
    out = Delta(weights=weights, tokens=dict(delta.tokens), trained=delta.trained, base=dict(delta.base),
                token_info=list(delta.token_info), config=dict(delta.config), storage="lowrank",
                tokens_2=dict(delta.tokens_2),
                extra={**delta.extra, "compression": json.dumps({"energy": energy, "rank": rank, "ranks": ranks})})
    before, after = delta_nbytes(delta), delta_nbytes(out)
    log.info("compressed %d matrices to ranks %d-%d: %.1f KiB -> %.1f KiB (%.1f%%)", len(ranks),
             min(ranks.values(), default=0), max(ranks.values(), default=0), before / 1024, after / 1024,
             100.0 * after / max(before, 1))
    if energy is not None and "merge_residuals" in delta.extra:
        warn(f"a merged delta: its change is dominated by one direction, so --energy {energy:g} kept ranks "
             f"{min(ranks.values())}-{max(ranks.values())}, which can lose its concepts (docs/MERGE.md); give "
             "--rank or a higher --energy and look at its samples")
    if after >= before:
        warn(f"the compressed delta ({after / 1024:.1f} KiB) is not smaller than the full one ({before / 1024:.1f} "
             "KiB): rank-r factors hold r x (rows + columns) numbers, more than the matrix itself at high ranks; "
             "choose a smaller --rank or --energy")
    return out
