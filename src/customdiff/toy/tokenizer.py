"""A CLIP BPE vocabulary built from the world's words, so every caption word is one whole token."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .world import RARE_WORDS, vocabulary

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32


def byte_alphabet() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    chars = []
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:  # unprintable bytes are shifted above 255, in order
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE as CLIP does it: merge the lowest-ranked adjacent pair until none is known."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
        best, _ = min(pairs)
        if best == 1 << 30:
            break
        pair = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best)
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges: bytes, bytes + '</w>', whole words (world + rare words), then BOS/EOS."""
    words = sorted(set(words or vocabulary()) | set(RARE_WORDS))
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        assert word.isascii() and word.isalpha(), word
        while True:
            # a new merge has the lowest priority, so it never changes how earlier words split
            pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(out_dir: str | Path) -> Path:
    """Write vocab.json and merges.txt ('#version: 0.2' header) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}
    for name, text in files.items():
        path = out / name
        # unchanged files stay untouched: a second build process (the probe lane) may be reading them
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return out


def make_tokenizer(work_dir: str | Path):
    """A transformers CLIPTokenizer over the world vocabulary, checked to keep each world word whole."""
    from transformers import CLIPTokenizer

    d = write_tokenizer_files(work_dir)
    tok = CLIPTokenizer.from_pretrained(str(d), model_max_length=MAX_LENGTH)
    if len(tok) <= 2:
        raise RuntimeError("tokenizer came out empty")
    for word in list(vocabulary()) + list(RARE_WORDS):
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"world word {word!r} splits into {tok.convert_ids_to_tokens(ids)}")
    log.info("tokenizer: %d tokens", len(tok))
    return tok
