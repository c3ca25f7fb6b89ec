"""Modifier tokens: adding `<new1>`-style tokens and training only their embedding rows."""

from __future__ import annotations

import logging
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

TOKEN_RE = re.compile(r"<[^<>\s]+>")
# Rare words in CLIP's vocabulary that the reference initialises new tokens from.
RARE_INITIALIZERS = ("ktn", "pll", "ucd", "sks", "zxq", "vbn")


def find_tokens(prompt: str) -> list[str]:
    """Modifier tokens such as `<new1>` appearing in a prompt, in order."""
    return TOKEN_RE.findall(prompt)


def undefined_tokens(texts: Iterable[str], known: Container[str]) -> list[str]:
    """Modifier tokens of `texts` that `known` (a vocabulary and the deltas' tokens) lacks, once each, in order:
    a tokenizer splits such a token into pieces, so the concept it names would be silently left out."""
    return [t for t in dict.fromkeys(t for x in texts for t in find_tokens(x)) if t not in known]


def in_vocabulary(tokenizer: Any, token: str) -> bool:
    """Whether the tokenizer already has `token`, also as a whole word (CLIP's BPE keeps "heart" as "heart</w>"):
    adding it again would make every use of that word, even inside "hearth", the new token's row."""
    vocab = tokenizer.get_vocab()
    return token in vocab or f"{token}</w>" in vocab


def token_position(tokenizer: Any, prompt: str, token: str) -> int:
    """Where the first `token` of `prompt` lands in its encoding: the start token, then the ids of the text
    before it. At `tokenizer.model_max_length - 1` or later the text encoder never reads it."""
    return 1 + len(tokenizer(prompt[:prompt.index(token)], add_special_tokens=False)["input_ids"])


def _single_id(tokenizer, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def default_initializers(tokenizer, n: int) -> list[str]:
    """Pick `n` rare single-token words of the vocabulary, falling back to any single-token word."""
    found = [w for w in RARE_INITIALIZERS if _single_id(tokenizer, w) is not None]
    if len(found) < n:
        fallback = [w for w in ("a", "the", "thing", "object") if _single_id(tokenizer, w) is not None]
        if not fallback:
            raise UserError("the tokenizer has neither rare words (ktn, pll, ucd) nor 'a'; pass --initializer WORD")
        log.warning("vocabulary lacks rare initializer words; initialising new tokens from %r", fallback[0])
        found += [fallback[0]] * (n - len(found))
    return found[:n]


def add_token_rows(tokenizer, text_encoder, rows: Mapping[str, torch.Tensor]) -> list[int]:
    """Add each token to the tokenizer, grow the text encoder's input embedding and set the token's row;
    return the new ids (in the order of `rows`)."""
    tokens = list(rows)
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise UserError(f"could not add tokens {tokens} to the tokenizer")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = text_encoder.get_input_embeddings()
    ids = [tokenizer.convert_tokens_to_ids(tok) for tok in tokens]
    for tid, row in zip(ids, rows.values(), strict=True):
        emb.weight.data[tid] = row.to(emb.weight)
    return ids


def add_tokens(tokenizer, text_encoder, tokens: Sequence[str], initializers: Sequence[str]) -> list[int]:
    """Add tokens to the tokenizer, grow the embedding, and copy each initializer word's row; return ids."""
    emb = text_encoder.get_input_embeddings()
    init_rows = {}
    for tok, word in zip(tokens, initializers, strict=True):
        if in_vocabulary(tokenizer, tok):
            raise UserError(f"token {tok} already exists in the vocabulary; choose another modifier token name")
        word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not word_ids:
            raise UserError(f"initializer word {word!r} for {tok} maps to no token; choose another word")
        if len(word_ids) > 1:
            log.warning("initializer %r for %s spans %d tokens; using their mean", word, tok, len(word_ids))
        init_rows[tok] = emb.weight.data[word_ids].float().mean(0)
    return add_token_rows(tokenizer, text_encoder, init_rows)


class TokenRows(nn.Module):
    """Trainable rows for new tokens, substituted into a frozen embedding's output by a forward hook.

    The embedding matrix itself stays frozen, so every other row is bit-identical after training and
    optimizer weight decay can only reach the new rows (the diffusers example decays all rows).
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        self.token_ids = list(token_ids)
        self.rows = nn.Parameter(embedding.weight.data[self.token_ids].detach().clone().float())
        lookup = torch.full((embedding.num_embeddings,), -1, dtype=torch.long)
        lookup[self.token_ids] = torch.arange(len(self.token_ids))
        self.register_buffer("lookup", lookup, persistent=False)
        self._handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        index = self.lookup.to(ids.device)[ids]  # (B, T): row index or -1
        new = self.rows.to(output.dtype)[index.clamp(min=0)]  # (B, T, H)
        return torch.where((index >= 0).unsqueeze(-1), new, output)

    def remove(self) -> None:
        """Detach the hook from the embedding."""
        self._handle.remove()

    @torch.no_grad()
    def write_back(self, embedding: nn.Embedding) -> None:
        """Copy the trained rows into the embedding matrix (for sampling without the hook)."""
        embedding.weight.data[self.token_ids] = self.rows.to(embedding.weight.dtype)
