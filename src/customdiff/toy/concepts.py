"""Personal concepts: patterned instances of known classes that base training never shows, in CustomConcept101
format (dataset.json, dataset_multiconcept.json, prompt files with `{}` placeholders)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .corpus import write_class_images
from .world import SETTINGS, SIZE, Obj, Scene, render

log = logging.getLogger(__name__)

WHITE, BLACK = (250, 250, 250), (15, 15, 15)


def _checker(patch: Image.Image, mask: Image.Image) -> None:
    d, s = ImageDraw.Draw(patch), patch.size[0]
    c = s / 4
    for i in range(4):
        for j in range(4):
            if (i + j) % 2:
                d.rectangle((i * c, j * c, (i + 1) * c - 1, (j + 1) * c - 1), fill=WHITE)


def _stripe_dot(patch: Image.Image, mask: Image.Image) -> None:
    d, s = ImageDraw.Draw(patch), patch.size[0]
    d.rectangle((0, 0.40 * s, s, 0.60 * s), fill=WHITE)
    d.ellipse((0.38 * s, 0.12 * s, 0.62 * s, 0.34 * s), fill=BLACK)


def _eye_band(patch: Image.Image, mask: Image.Image) -> None:
    d, s = ImageDraw.Draw(patch), patch.size[0]
    d.rectangle((0, 0.78 * s, s, s), fill=BLACK)
    d.ellipse((0.36 * s, 0.42 * s, 0.64 * s, 0.70 * s), fill=WHITE)
    d.ellipse((0.44 * s, 0.50 * s, 0.56 * s, 0.62 * s), fill=BLACK)


def _polka(patch: Image.Image, mask: Image.Image) -> None:
    d, s = ImageDraw.Draw(patch), patch.size[0]
    for cx, cy in ((0.28, 0.28), (0.72, 0.28), (0.5, 0.55), (0.3, 0.5), (0.7, 0.5), (0.5, 0.8)):
        d.ellipse(((cx - 0.09) * s, (cy - 0.09) * s, (cx + 0.09) * s, (cy + 0.09) * s), fill=WHITE)


def _centre_ring(patch: Image.Image, mask: Image.Image) -> None:
    d, s = ImageDraw.Draw(patch), patch.size[0]
    d.ellipse((0.30 * s, 0.36 * s, 0.70 * s, 0.76 * s), fill=(220, 30, 30))
    d.ellipse((0.42 * s, 0.48 * s, 0.58 * s, 0.64 * s), fill=BLACK)


def _two_tone(patch: Image.Image, mask: Image.Image) -> None:
    d, s = ImageDraw.Draw(patch), patch.size[0]
    d.rectangle((0, s / 2, s, s), fill=(245, 215, 20))
    d.rectangle((0, 0.46 * s, s, 0.54 * s), fill=BLACK)


@dataclass(frozen=True)
class Concept:
    """A personal instance: its folder name, class word, base colour and how its surface is painted."""

    name: str
    class_word: str
    colour: str
    description: str
    painter: object

    def render(self, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
        """A new 'photo' of the instance: random placement, scale and background."""
        side = int(rng.integers(size * 13 // 32, size * 26 // 32 + 1))
        x0, y0 = (int(v) for v in rng.integers(1, size - side, 2))
        scene = Scene([Obj(self.class_word, self.colour, (x0, y0, x0 + side, y0 + side))],
                      setting=str(rng.choice(list(SETTINGS))), seed=int(rng.integers(2**31)))
        return render(scene, size, painters=[self.painter])


CONCEPTS: tuple[Concept, ...] = (
    Concept("checker_square", "square", "blue", "blue square with a white checkerboard pattern", _checker),
    Concept("striped_circle", "circle", "red", "red circle with a white stripe and a black dot", _stripe_dot),
    Concept("eyed_triangle", "triangle", "orange", "orange triangle with an eye and a black band", _eye_band),
    Concept("dotted_heart", "heart", "purple", "purple heart with white polka dots", _polka),
    Concept("ringed_star", "star", "yellow", "yellow star with a red ring and black centre", _centre_ring),
    Concept("twotone_cross", "cross", "red", "cross, red top and yellow bottom split by a black line", _two_tone),
)
PAIRS = (("checker_square", "striped_circle"), ("dotted_heart", "ringed_star"), ("eyed_triangle", "twotone_cross"))
N_PHOTOS = 6
N_CLASS_IMAGES = 200

SINGLE_PROMPTS = (
    "photo of a {}", "a {}", "photo of a {} on grass", "a {} at night", "a {} in the sky", "a {} on a beach",
    "a {} in outline style", "a {} on grass in outline style", "a small {}", "a big {} on a beach",
    "a {} next to a red circle", "a {} above a blue square", "a yellow star next to a {}",
    "a green heart above a {} at night", "photo of a {} on the left", "a {} on the right in the sky",
    "a picture of a purple {}", "photo of a green {} on grass",
)
PAIR_PROMPTS = (
    "photo of a {0} next to a {1}", "a {0} above a {1}", "a {1} next to a {0} on grass", "a {1} above a {0} at night",
    "a {0} next to a {1} in the sky", "photo of a {0} above a {1} on a beach", "a {0} next to a {1} in outline style",
    "a picture of a {1} above a {0}", "a small {0} next to a big {1}", "a {0} next to a {1} at night",
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
    descriptions = {c.name: {"class": c.class_word, "description": c.description} for c in CONCEPTS}
    (out / "concepts.json").write_text(json.dumps(descriptions, indent=2) + "\n")
    log.info("wrote %d concepts and %d pairs to %s", len(CONCEPTS), len(PAIRS), out)
    return out
