"""Personal concepts: held-out combinations of world attributes, each with a detail no caption names, in
CustomConcept101 format (dataset.json, dataset_multiconcept.json, prompt files with `{}` placeholders)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .corpus import write_class_images
from .world import PERSONAL, SETTINGS, SIZE, Look, Obj, Scene, look_phrase, render

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Concept:
    """A personal instance: its folder name and look (a held-out combination of world attributes)."""

    name: str
    look: Look

    @property
    def class_word(self) -> str:
        """The class word ("square")."""
        return self.look.shape

    @property
    def description(self) -> str:
        """Plain words for people (the detail included, which no caption ever names)."""
        lk = self.look
        detail = {"border": " and a thin dark border", "spot": " and a dark spot", "none": ""}[lk.detail]
        return look_phrase(lk).split(" ", 1)[1] + detail

    def render(self, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
        """A new 'photo' of the instance: random placement, scale and background."""
        side = int(rng.integers(size * 17 // 32, size * 26 // 32 + 1))
        x0, y0 = (int(v) for v in rng.integers(1, size - side, 2))
        scene = Scene([Obj(self.look, (x0, y0, x0 + side, y0 + side))],
                      setting=str(rng.choice(list(SETTINGS))), seed=int(rng.integers(2**31)))
        return render(scene, size)


CONCEPTS: tuple[Concept, ...] = tuple(Concept(name, look) for name, look in PERSONAL.items())
PAIRS = (("checker_square", "striped_circle"), ("dotted_heart", "ringed_star"), ("banded_triangle", "twotone_cross"))
N_PHOTOS = 8
N_CLASS_IMAGES = 200

# held-out prompts: new settings and new neighbours (the colour and pattern of a concept are its own)
SINGLE_PROMPTS = (
    "photo of a {} on grass", "a {} at night", "a {} in the sky", "photo of a {} on a beach",
    "a {} next to a red circle", "a yellow star above a {}", "a {} above a blue square at night",
    "photo of a green heart next to a {} on grass", "a picture of a {} on a beach", "a small {} in the sky",
    "photo of a {}", "a big {} at night", "a {} next to a purple triangle in the sky",
    "a white cross above a {}", "photo of a {} on the left on grass", "a picture of a {} at night",
)
PAIR_PROMPTS = (
    "photo of a {0} next to a {1}", "a {0} above a {1}", "a {1} next to a {0} on grass", "a {1} above a {0} at night",
    "a {0} next to a {1} in the sky", "photo of a {0} above a {1} on a beach", "a picture of a {1} above a {0}",
    "a {0} next to a {1} at night",
)


def write_concepts(out_dir: str | Path, seed: int = 7, n_class_images: int = N_CLASS_IMAGES) -> Path:
    """Write instance photos, class images, prompt files, dataset.json and dataset_multiconcept.json."""
    out = Path(out_dir)
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    entries = {}
    for k, c in enumerate(CONCEPTS):
        rng = np.random.default_rng(seed * 1000 + k)
        inst = out / "instances" / c.name
        inst.mkdir(parents=True, exist_ok=True)
        for i in range(N_PHOTOS):
            c.render(rng).save(inst / f"{i:02d}.png")
        cls = f"class_images/{c.class_word}"
        if not (out / cls / f"{n_class_images - 1:06d}.txt").exists():
            write_class_images(out / cls, c.class_word, n_class_images, seed=seed * 1000 + 500 + k)
        (out / "prompts" / f"{c.name}.txt").write_text("\n".join(SINGLE_PROMPTS) + "\n")
        entries[c.name] = {
            "instance_prompt": f"<new1> {c.class_word}", "class_prompt": c.class_word,
            "instance_data_dir": f"instances/{c.name}", "class_data_dir": cls,
            "prompt_filename": f"prompts/{c.name}.txt",
        }
    (out / "dataset.json").write_text(json.dumps(list(entries.values()), indent=2) + "\n")
    multi = []
    for a, b in PAIRS:
        pf = f"prompts/{a}+{b}.txt"
        (out / pf).write_text("\n".join(PAIR_PROMPTS) + "\n")
        second = dict(entries[b], instance_prompt=entries[b]["instance_prompt"].replace("<new1>", "<new2>"))
        # CustomConcept101's layout: [concept, concept, {"prompt_filename_compose": ...}]
        multi.append([entries[a], second, {"prompt_filename_compose": pf, "prompt_filename": pf}])
    (out / "dataset_multiconcept.json").write_text(json.dumps(multi, indent=2) + "\n")
    descriptions = {c.name: {"class": c.class_word, "colour": c.look.colour, "pattern": c.look.pattern,
                             "pattern_colour": c.look.pattern_colour, "detail": c.look.detail,
                             "description": c.description} for c in CONCEPTS}
    (out / "concepts.json").write_text(json.dumps(descriptions, indent=2) + "\n")
    log.info("wrote %d concepts and %d pairs to %s", len(CONCEPTS), len(PAIRS), out)
    return out
