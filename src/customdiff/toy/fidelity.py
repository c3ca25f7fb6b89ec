"""Probe-exact measures on the toy world: does a sample show the concept, the prompted context, both concepts?

Definitions (docs/EVAL.md):
- concept_fidelity: share of samples of the concept prompts in which some object the probe reads matches all of
  the concept's attributes (shape, colour, pattern, pattern colour);
- context_fidelity: share of the samples of prompts that name a setting or another object in which the named
  setting is drawn and every other named object is drawn (by the attributes the prompt names);
- class_leakage: share of class-prompt samples (no token, delta applied) in which some object shows the
  concept's pattern in the concept's pattern colour;
- pair_fidelity: share of samples of two-concept prompts in which both concepts match, as two distinct objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .probe import Probe, Reading, load_probe, read
from .world import COLOURS, PATTERN_COLOURS, PATTERNS, RELATIONS, SETTINGS, SHAPES, Look

TOKEN = re.compile(r"<[^<>\s]+>")
_PATTERN_WORDS = {p.split()[-1]: name for name, p in PATTERNS.items() if p}  # "checks" -> "checks", ...


@dataclass
class Named:
    """An object as a prompt names it: class word, optional modifier token and the attributes it names."""

    shape: str
    token: str | None = None
    colour: str | None = None
    pattern: str | None = None
    pattern_colour: str | None = None

    def matched_by(self, look: Look) -> bool:
        """Whether a read object shows everything this phrase names."""
        return look.shape == self.shape and self.colour in (None, look.colour) and \
            self.pattern in (None, look.pattern) and self.pattern_colour in (None, look.pattern_colour)


@dataclass
class PromptSpec:
    """What a toy prompt asks for: its setting (None when it names none) and its objects."""

    setting: str | None
    objects: list[Named]


def _object(words: list[str]) -> Named | None:
    shape_at = next((i for i, w in enumerate(words) if w in SHAPES), None)
    if shape_at is None:
        return None
    before, after = words[:shape_at], words[shape_at + 1:]
    token = next((w for w in before if TOKEN.fullmatch(w)), None)
    colour = next((w for w in before if w in COLOURS), None)
    pattern = pcol = None
    if after[:1] == ["with"]:
        rest = [w for w in after[1:] if w != "a"]
        pattern = next((_PATTERN_WORDS[w] for w in rest if w in _PATTERN_WORDS), None)
        pcol = next((w for w in rest if w in PATTERN_COLOURS), None)
    return Named(words[shape_at], token, colour, pattern, pcol)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt in the toy world's grammar ("a <new1> square next to a red circle on grass")."""
    body = " ".join(text.split())
    setting = None
    for name, phrase in SETTINGS.items():
        if phrase and phrase in f" {body} ":
            setting = name
            body = f" {body} ".replace(phrase, " ", 1).strip()
    body = re.sub(r"\bon the (left|right)\b", " ", body)
    parts = re.split("|".join(rf"\b{r}\b" for r in RELATIONS), body)
    objects = [o for o in (_object(p.split()) for p in parts) if o is not None]
    return PromptSpec(setting, objects)


def _assign(objs: Sequence[Named], looks: Sequence[Look]) -> bool:
    """Whether the named objects can be matched by distinct read objects."""
    if not objs:
        return True
    first, rest = objs[0], objs[1:]
    return any(first.matched_by(lk) and _assign(rest, [x for j, x in enumerate(looks) if j != i])
               for i, lk in enumerate(looks))


def _concept_named(look: Look, token: str) -> Named:
    return Named(look.shape, token, look.colour, look.pattern, look.pattern_colour)


@dataclass
class Verdict:
    """The probe's verdict on one sample (None where a measure does not apply to its prompt)."""

    reading: Reading
    concept: bool | None
    context: bool | None

    def label(self) -> str:
        """A short caption for reports: what the probe read and the verdicts."""
        objs = "; ".join(f"{lk.colour} {lk.shape}" + (f" + {lk.pattern_colour} {lk.pattern}"
                                                       if lk.pattern != "plain" else "") for lk in self.reading.objects)
        marks = []
        if self.concept is not None:
            marks.append("concept ✓" if self.concept else "concept ✗")
        if self.context is not None:
            marks.append("context ✓" if self.context else "context ✗")
        return f"{objs} | {self.reading.setting} | {', '.join(marks)}"


def judge(readings: Sequence[Reading], prompts: Sequence[str], looks: Mapping[str, Look]) -> list[Verdict]:
    """Verdicts for samples of prompts whose modifier tokens name concepts (`looks`: token -> Look).

    The prompt may be the one the image was sampled from or, for a base-model baseline, the same prompt with
    the token: the structure (which object is the concept) comes from the token.
    """
    out = []
    for r, p in zip(readings, prompts, strict=True):
        spec = parse_prompt(p)
        concepts = [_concept_named(looks[o.token], o.token) for o in spec.objects if o.token in looks]
        others = [o for o in spec.objects if o.token not in looks]
        concept = _assign(concepts, r.objects) if concepts else None
        has_context = spec.setting is not None or bool(others)
        context = None
        if has_context:
            context = (spec.setting in (None, r.setting)) and _assign(others, r.objects)
        out.append(Verdict(r, concept, context))
    return out


def _share(values: Sequence[bool | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(verdicts: Sequence[Verdict], n_concepts: int = 1) -> dict[str, float | None]:
    """concept_fidelity and context_fidelity (and pair_fidelity for two concepts) of a list of verdicts."""
    key = "pair_fidelity" if n_concepts > 1 else "concept_fidelity"
    return {key: _share([v.concept for v in verdicts]), "context_fidelity": _share([v.context for v in verdicts])}


def shows(readings: Sequence[Reading], look: Look) -> list[bool]:
    """Per reading, whether some object has the look's shape, colour, pattern and pattern colour (what
    concept_fidelity asks of a sample)."""
    want = _concept_named(look, "")
    return [any(want.matched_by(o) for o in r.objects) for r in readings]


def leakage(readings: Sequence[Reading], look: Look) -> float:
    """Share of readings with an object in the concept's pattern and pattern colour (class-prompt samples)."""
    hits = [any(o.pattern == look.pattern and o.pattern_colour == look.pattern_colour for o in r.objects)
            for r in readings]
    return float(np.mean(hits)) if hits else 0.0


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """PIL images, uint8 arrays (0-255) or float arrays in [0, 1] -> (N, 3, H, W) in [-1, 1]."""
    def unit(im: Any) -> np.ndarray:
        if not isinstance(im, np.ndarray):
            return np.asarray(im.convert("RGB"), np.float32) / 255.0
        return im.astype(np.float32) / 255.0 if np.issubdtype(im.dtype, np.integer) else im

    arr = np.stack([unit(im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() * 2 - 1


class Judge:
    """The toy world's probe plus the personal concepts' looks: reads images and scores them."""

    def __init__(self, probe_path: str | Path, concepts_json: str | Path):
        import json

        self.probe: Probe = load_probe(probe_path)
        raw = json.loads(Path(concepts_json).read_text())
        self.looks = {name: Look(v["class"], v["colour"], v["pattern"], v["pattern_colour"], v["detail"])
                      for name, v in raw.items()}

    @classmethod
    def toy(cls) -> Judge:
        """The judge of the toy world in use (customdiff.toy.paths)."""
        from . import paths

        p = paths()
        return cls(p["probe"], Path(p["concepts"]) / "concepts.json")

    def read(self, images: Sequence, batch: int = 256) -> list[Reading]:
        """Probe readings of PIL images (32x32; others are resized)."""
        from PIL import Image

        from .world import SIZE

        ims = [im if im.size == (SIZE, SIZE) else im.resize((SIZE, SIZE), Image.Resampling.BOX) for im in images]
        out: list[Reading] = []
        for i in range(0, len(ims), batch):
            out += read(self.probe, images_to_tensor(ims[i:i + batch]))
        return out
