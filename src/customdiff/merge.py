"""Closed-form multi-concept merge (Custom Diffusion, Kumari et al. 2023, eq. 4).

Per cross-attention K/V matrix, with text features as rows:
    min_W ||(W - W0) C_reg^T||_F   subject to   W C^T = V
where C stacks each concept's prompt features and V the outputs of that concept's own fine-tuned
matrix on them (V = W_n C_n^T), and C_reg holds features of generic captions. The solution is
    W = W0 + (V - W0 C^T) (C A^-1 C^T)^-1 C A^-1,   A = C_reg^T C_reg + ridge.
Everything below runs in float64 with triangular solves (no explicit inverses): after whitening by the
Cholesky factor L of A (A = L L^T), Z = L^-1 C^T and the update is (V - W0 C^T) Z^+ L^-1, where Z^+ comes
from a QR of Z (whose condition number is the square root of C A^-1 C^T's) or, when the constraints are
rank-deficient, from an SVD pseudo-inverse (the least-squares compromise).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .conditioning import pipeline_name, states_for
from .delta import NORM_RTOL, Delta, apply_deltas, base_fingerprint, check_base, check_family, public_name
from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-6  # relative to the mean eigenvalue of C_reg^T C_reg: negligible unless it is singular
DEFAULT_REG_CAPTIONS = Path(__file__).parent / "resources" / "reg_captions.txt"
KV_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight")
PREFIX = "photo of a"  # the shared template prefix whose rows are left out of the constraints
_RANK_RTOL = 1e-10  # a QR diagonal this small relative to the largest marks dependent constraints


@dataclass
class MergeSolver:
    """The part of the merge shared by every matrix that reads the same text features."""

    C: Tensor  # (m, d) constraint features, duplicates removed
    owner: Tensor  # (m,) index of the concept each constraint row belongs to
    Y: Tensor  # (m, d) = (C A^-1 C^T)^-1 C A^-1, so W - W0 = (V - W0 C^T) Y
    A_reg: Tensor  # (d, d) = C_reg^T C_reg (no ridge, float32), for residuals on C_reg
    YAY: Tensor  # (m, m) = Y C_reg^T C_reg Y^T, for the exact change of the merged weight on C_reg
    exact: bool  # False when the constraints are dependent and only hold in least squares
    G: list[Tensor] | None = None  # per concept (d, d) = lambda P_n A^-1 for the padding-row term, or None


def _dedupe(Cs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    rows, owner, seen = [], [], set()
    for n, c in enumerate(Cs):
        for r in c:
            key = r.numpy().tobytes() if r.device.type == "cpu" else r.cpu().numpy().tobytes()
            if key in seen:  # identical features asked twice: keep the first (as the reference does)
                continue
            seen.add(key)
            rows.append(r)
            owner.append(n)
    if not rows:
        raise UserError("merge: no constraint features (every concept prompt was empty)")
    return torch.stack(rows), torch.tensor(owner, device=Cs[0].device)


def _cholesky_with_ridge(A0: Tensor, ridge: float) -> tuple[Tensor, float]:
    d = A0.shape[0]
    scale = float(torch.trace(A0)) / d or 1.0
    eye = torch.eye(d, dtype=A0.dtype, device=A0.device)
    lam = ridge * scale
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(A0 + lam * eye)
        if int(info) == 0:
            return L, lam
        # ridge 0 (or too small) with a singular C_reg^T C_reg: grow it until A is positive definite
        lam = max(lam * 100, 1e-12 * scale)
        log.warning("C_reg^T C_reg is singular; raising the ridge to %.3g x trace/d", lam / scale)
    raise UserError("merge: the regularization features are degenerate (not finite?); check the captions")


def prepare(Cs: Sequence[Tensor], C_reg: Tensor, ridge: float = DEFAULT_RIDGE,
            pads: Sequence[Tensor] | None = None, pad_weight: float = 0.0) -> MergeSolver:
    """Factor the merge for constraint features `Cs` (one (m_n, d) tensor per concept) and C_reg (k, d).

    With `pad_weight` > 0, each concept's padding rows `pads[n]` (p_n, d) join the objective as a weighted
    least-squares pull towards that concept's own outputs: min ||(W-W0) C_reg^T||^2 + lam sum ||(W-W_n) P_n^T||^2
    subject to W C^T = V, lam = pad_weight * trace(C_reg^T C_reg) / trace(sum P_n^T P_n). Still closed form:
    A = C_reg^T C_reg + lam sum P_n^T P_n, and W0 is replaced by the unconstrained optimum W0 + sum D_n lam P_n A^-1.
    """
    Cs = [c.detach().to(torch.float64) for c in Cs]
    C_reg = C_reg.detach().to(torch.float64)
    if any(c.shape[-1] != C_reg.shape[-1] for c in Cs):
        raise UserError("merge: concept and regularization features have different widths")
    C, owner = _dedupe(Cs)
    A_reg = C_reg.T @ C_reg  # (d, d)
    A0, Ps = A_reg, None
    if pad_weight > 0 and pads:
        Ps = [p.detach().to(torch.float64).T @ p.detach().to(torch.float64) for p in pads]  # (d, d) each
        lam = pad_weight * float(torch.trace(A_reg)) / max(float(sum(torch.trace(p) for p in Ps)), 1e-30)
        Ps = [lam * p for p in Ps]
        A0 = A_reg + sum(Ps)
    L, _ = _cholesky_with_ridge(A0, ridge)
    Z = torch.linalg.solve_triangular(L, C.T, upper=False)  # (d, m) = L^-1 C^T
    m, d = C.shape
    exact = m <= d
    if exact:
        Q, R = torch.linalg.qr(Z)  # (d, m), (m, m)
        diag = R.diagonal().abs()
        exact = bool(diag.min() > _RANK_RTOL * diag.max())
    if exact:
        Zp = torch.linalg.solve_triangular(R, Q.T, upper=True)  # (m, d) = Z^+
    else:
        log.warning("merge: %d constraint rows are linearly dependent in width %d; they will hold in the "
                    "least-squares sense only", m, d)
        Zp = torch.linalg.pinv(Z, rtol=_RANK_RTOL)
    Y = torch.linalg.solve_triangular(L.T, Zp.T, upper=True).T  # (m, d) = Z^+ L^-1
    G = [torch.cholesky_solve(p, L).T for p in Ps] if Ps else None  # lam P_n A^-1 (A and P_n symmetric)
    return MergeSolver(C=C, owner=owner, Y=Y, A_reg=A_reg.float(), YAY=Y @ A_reg @ Y.T, exact=exact, G=G)


def _norms_on(A: Tensor, Xs: Sequence[Tensor]) -> list[float]:
    # ||X C_reg^T||_F = sqrt(trace(X A X^T)) without the (out, k) product; one stacked float32 matmul is
    # plenty for a report and several times faster than float64 on CPUs
    X = torch.cat([x.float() for x in Xs])
    sq = ((X @ A) * X).sum(1, dtype=torch.float64)
    return [float(t.sum().clamp_min(0).sqrt()) for t in sq.split([x.shape[0] for x in Xs])]


def solve(s: MergeSolver, W0: Tensor, Ws: Sequence[Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Merged weight for base `W0` (out, d) and per-concept fine-tuned weights `Ws`, plus residuals."""
    W0 = W0.detach().to(torch.float64)
    D = [w.detach().to(torch.float64) - W0 for w in Ws]  # each concept's change
    DC = [d @ s.C.T for d in D]  # (out, m): every change on every constraint row
    want = torch.zeros_like(DC[0])  # V - W0 C^T: column i is concept owner[i]'s own change on its row i
    for n, dc in enumerate(DC):
        idx = (s.owner == n).nonzero().squeeze(1)
        want[:, idx] = dc[:, idx]
    if s.G is None:
        dW = want @ s.Y  # (out, d)
    else:  # start from the unconstrained optimum of the padding-weighted objective, then meet the constraints
        shift = sum(d @ g for d, g in zip(D, s.G, strict=True))  # (out, d)
        dW = shift + (want - shift @ s.C.T) @ s.Y
    V = W0 @ s.C.T + want
    miss = float((dW @ s.C.T - want).norm())
    want_norm = float(want.norm()) or 1.0
    base_norm, *src = _norms_on(s.A_reg, [W0, *D])
    base_norm = base_norm or 1.0
    # ||dW C_reg^T||^2 = trace(want (Y A Y^T) want^T), exact in float64 at the cost of an (out, m, m) product
    reg = (float(((want @ s.YAY) * want).sum().clamp_min(0).sqrt()) if s.G is None
           else _norms_on(s.A_reg, [dW])[0])
    res = {
        "constraint": miss / (float(V.norm()) or 1.0),  # ||W C^T - V|| / ||V||
        "constraint_of_change": miss / want_norm,  # the same, relative to the change the concepts asked for
        "average_constraint_of_change": float((sum(DC) / len(DC) - want).norm()) / want_norm,  # plain averaging
        "reg_change": reg / base_norm,  # ||(W - W0) C_reg^T|| / ||W0 C_reg^T||
        "sources_reg_change": sum(src) / len(src) / base_norm,  # the same for the sources, averaged: its scale
    }
    return W0 + dW, res


def merge(W0: Tensor, Ws: list[Tensor], Cs: list[Tensor], C_reg: Tensor,
          ridge: float = DEFAULT_RIDGE) -> tuple[Tensor, dict[str, float]]:
    """Closed-form merge of one matrix: W = W0 + (V - W0 C^T)(C A^-1 C^T)^-1 C A^-1 in float64."""
    if len(Ws) != len(Cs):
        raise ValueError("one feature tensor per concept weight")
    return solve(prepare(Cs, C_reg, ridge), W0, Ws)


# ---------------------------------------------------------------- delta level


def read_captions(path: str | Path | None = None) -> list[str]:
    """Regularization captions, one per line (default: the generic captions shipped with customdiff)."""
    from .data import read_lines

    return read_lines(path or DEFAULT_REG_CAPTIONS, "--reg-captions")


@torch.no_grad()
def text_features(pipe: Any, prompts: Sequence[tuple[str, str]], batch: int = 64) -> list[tuple[list, Tensor]]:
    """Rows of the text states the UNet reads (SD: the final states; SDXL: both encoders' penultimate states,
    concatenated) for (prefix, rest) prompts, without the start token, the prefix's rows and padding (through
    the end-of-text token), each with its key: the token-id prefix that determines the row in a causal
    text encoder."""
    tok = pipe.tokenizer
    if tok.pad_token is None:
        batch = 1  # nothing to pad with: one prompt at a time
    out: list[tuple[list, Tensor]] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        texts = [f"{p} {r}".strip() for p, r in chunk]
        # pad only to the longest: CLIP's causal mask makes rows before end-of-text independent of padding
        ids, hidden = states_for(pipe, texts)  # (B, T), (B, T, d): the states the UNet reads
        for j, (prefix, _) in enumerate(chunk):
            row_ids = ids[j].tolist()
            eos = row_ids.index(tok.eos_token_id, 1) if tok.eos_token_id in row_ids[1:] else len(row_ids) - 1
            skip = len(tok(prefix, add_special_tokens=False).input_ids) if prefix else 0
            if row_ids[1:1 + skip] != tok(prefix, add_special_tokens=False).input_ids[:skip]:
                skip = 0  # the prefix tokenised differently in context: keep every row
            start = 1 + skip
            keys = [tuple(row_ids[:k + 1]) for k in range(start, eos + 1)]
            out.append((keys, hidden[j, start:eos + 1].double()))
    return out


@torch.no_grad()
def padding_features(pipe: Any, prompts: Sequence[tuple[str, str]]) -> Tensor:
    """Rows after end-of-text of prompts padded to the tokenizer's max length, as the pipeline feeds the UNet."""
    tok = pipe.tokenizer
    texts = [f"{p} {r}".strip() for p, r in prompts]
    ids, hidden = states_for(pipe, texts, padding="max_length")  # (B, T), (B, T, d)
    rows = []
    for j in range(len(texts)):
        row_ids = ids[j].tolist()
        eos = row_ids.index(tok.eos_token_id, 1) if tok.eos_token_id in row_ids[1:] else len(row_ids) - 1
        rows.append(hidden[j, eos + 1:].double())
    return torch.cat(rows)


def _check_same_base(deltas: Sequence[Delta], sources: Sequence[str]) -> None:
    ref = deltas[0].base.get("fingerprint", {}).get("norms", {})
    for d, src in zip(deltas[1:], sources[1:], strict=True):
        norms = d.base.get("fingerprint", {}).get("norms", {})
        for n in set(ref) & set(norms):
            if abs(ref[n] - norms[n]) > NORM_RTOL * max(abs(ref[n]), 1e-12):
                raise UserError(f"{src} and {sources[0]} were trained on different bases "
                                f"({d.base.get('name', '?')} vs {deltas[0].base.get('name', '?')}: {n} differs); "
                                "only deltas of the same base can be merged")


def _rename_tokens(deltas: Sequence[Delta], vocab: set[str], sources: Sequence[str]) -> list[dict[str, str]]:
    """Per delta, old token -> new token: the first owner keeps a name; later clashes get a free <newK>."""
    originals = {t for d in deltas for t in d.tokens}
    used: set[str] = set()
    maps = []
    k = 1
    for d, src in zip(deltas, sources, strict=True):
        m = {}
        for t in d.tokens:
            new = t
            if t in used or t in vocab:
                while f"<new{k}>" in used | originals | vocab:
                    k += 1
                new = f"<new{k}>"
                log.warning("%s: token %s clashes with another delta's; renamed to %s", src, t, new)
            used.add(new)
            m[t] = new
        maps.append(m)
    return maps


def _concept_prompts(d: Delta, rename: dict[str, str]) -> list[tuple[str, str]]:
    """(prefix, rest) prompts that define one delta's concepts: '<tok> class', 'photo of a <tok> class', and
    its training prompts, each with the text before its first token as the prefix to leave out."""
    classes = {i.get("token"): i.get("class", "") for i in d.token_info}
    prompts = []
    for old, new in rename.items():
        rest = f"{new} {classes.get(old, '')}".strip()
        prompts += [("", rest), (PREFIX, rest)]
    for c in d.config.get("concepts", []) or []:
        p = str(c.get("instance_prompt", "")) if isinstance(c, dict) else ""
        if rename:  # one pass, so a renamed token is never renamed again
            p = re.sub("|".join(map(re.escape, rename)), lambda m: rename[m.group(0)], p)
        hits = [p.find(t) for t in rename.values() if t in p]
        if hits:
            at = min(hits)
            prompts.append((p[:at].strip(), p[at:].strip()))
    return list(dict.fromkeys(prompts))


def merge_deltas(deltas: Sequence[Delta], pipe: Any, reg_captions: Sequence[str],
                 sources: Sequence[str] | None = None, ridge: float = DEFAULT_RIDGE,
                 base_name: str | None = None, pad_weight: float = 0.0) -> Delta:
    """Merge separately trained deltas of one base into one delta: K/V in closed form, tokens carried over."""
    t0 = time.perf_counter()
    sources = list(sources) if sources is not None else [f"delta {i}" for i in range(len(deltas))]
    if not deltas:
        raise UserError("merge: give at least one delta")
    if not reg_captions:
        raise UserError("merge: no regularization captions")
    for d, src in zip(deltas, sources, strict=True):
        check_family(d, pipe.unet, src)  # an SD delta among SDXL ones is named as such
    _check_same_base(deltas, sources)
    for d, src in zip(deltas, sources, strict=True):
        check_base(d, pipe.unet, src)
        if not d.tokens:
            raise UserError(f"{src}: has no modifier token; the merge defines each concept by its token's prompts")
    maps = _rename_tokens(deltas, set(pipe.tokenizer.get_vocab()), sources)
    tokens = {maps[i][t]: row for i, d in enumerate(deltas) for t, row in d.tokens.items()}
    tokens_2 = {maps[i][t]: row for i, d in enumerate(deltas) for t, row in d.tokens_2.items()}

    # text features with every (renamed) token in the tokenizer(s); the UNet stays the base
    holder = Delta(weights={}, tokens=tokens, tokens_2=tokens_2, trained="", base={}, token_info=[])
    applied = apply_deltas(pipe, [holder], ["merge tokens"])
    try:
        concept = [text_features(pipe, _concept_prompts(d, maps[i])) for i, d in enumerate(deltas)]
        reg = text_features(pipe, [("", c) for c in reg_captions])
        pads = ([padding_features(pipe, _concept_prompts(d, maps[i])) for i, d in enumerate(deltas)]
                if pad_weight > 0 else None)
    finally:
        applied.remove()
    owner_of: dict[tuple, int] = {}
    Cs = []
    for n, feats in enumerate(concept):
        rows = []
        for keys, h in feats:
            for key, r in zip(keys, h, strict=True):
                if owner_of.setdefault(key, n) != n:  # same token prefix for two concepts: contradictory
                    log.warning("merge: a prompt row is shared by %s and %s; keeping the first",
                                sources[owner_of[key]], sources[n])
                    continue
                rows.append(r)
        Cs.append(torch.stack(rows))
    C_reg = torch.cat([h for _, h in reg])
    dev = C_reg.device if C_reg.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    solver = prepare([c.to(dev) for c in Cs], C_reg.to(dev), ridge,
                     pads=[p.to(dev) for p in pads] if pads else None, pad_weight=pad_weight)
    log.info("merge: %d constraint rows from %d concepts, %d regularization rows of width %d",
             solver.C.shape[0], len(deltas), C_reg.shape[0], C_reg.shape[1])

    params = dict(pipe.unet.named_parameters())
    names = sorted({n for d in deltas for n in d.param_names()})
    width = C_reg.shape[1]
    weights, residuals, averaged = {}, {}, []
    # float16 sources (SDXL's default) give a float16 merge; the solve itself runs in float64
    store = torch.float16 if all(t.dtype == torch.float16 for d in deltas for t in d.weights.values()) \
        else torch.float32
    for name in names:
        W0 = params[name].detach().to(dev, torch.float64)
        changes = [d.change(name).to(dev, torch.float64) if name in d.param_names() else None for d in deltas]
        if name.endswith(KV_SUFFIXES) and W0.ndim == 2 and W0.shape[1] == width:
            Ws = [W0 + c if c is not None else W0 for c in changes]
            W, res = solve(solver, W0, Ws)
            weights[name] = (W - W0).to(store).cpu()
            residuals[name] = {k: float(f"{v:.4g}") for k, v in res.items()}
            log.info("%s: constraint residual %.2e (averaging: %.2e of the change); change on C_reg %.3g "
                     "(sources: %.3g)", name, res["constraint"], res["average_constraint_of_change"],
                     res["reg_change"], res["sources_reg_change"])
        else:
            # to_q / to_out do not act on text features: no closed form; average over deltas that trained them
            have = [c for c in changes if c is not None]
            weights[name] = (sum(have) / len(have)).to(store).cpu()
            averaged.append(name)
    if averaged:
        log.warning("merge: %d parameters besides cross-attention K/V (e.g. %s) averaged, not merged in closed form",
                    len(averaged), averaged[0])
    trained = "crossattn" if any(d.trained == "crossattn" for d in deltas) else "crossattn_kv"
    token_info = []
    for i, d in enumerate(deltas):
        info = {x.get("token"): x for x in d.token_info}
        for t in d.tokens:
            token_info.append({**info.get(t, {"initializer": "", "class": ""}), "token": maps[i][t]})
    worst = max((r["constraint"] for r in residuals.values()), default=0.0)
    elapsed = time.perf_counter() - t0
    log.info("merged %d deltas (%d K/V matrices) in %.2f s; worst constraint residual %.2e",
             len(deltas), len(residuals), elapsed, worst)
    sources_meta = [{"source": public_name(s, True), "base": d.base.get("name", ""), "trained": d.trained,
                     "tokens": {t: maps[i][t] for t in d.tokens}} for i, (d, s) in enumerate(zip(deltas, sources,
                                                                                                   strict=True))]
    return Delta(
        weights=weights, tokens=tokens, tokens_2=tokens_2, trained=trained,
        base={"name": public_name(base_name) or deltas[0].base.get("name", ""),
              "fingerprint": base_fingerprint(pipe.unet, names), "vocab_size": len(pipe.tokenizer),
              "pipeline": pipeline_name(pipe)},
        token_info=token_info,
        config={"merge": {"ridge": ridge, "pad_weight": pad_weight, "reg_captions": len(reg_captions), "constraint_rows": solver.C.shape[0],
                          "exact": solver.exact, "seconds": round(elapsed, 3)}},
        extra={"merge_sources": json.dumps(sources_meta), "merge_residuals": json.dumps(residuals),
               "merge_averaged": json.dumps(averaged)})
