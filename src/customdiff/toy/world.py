"""A procedural, captioned image world: one or two coloured shapes on a background, deterministic from a seed.

Objects are drawn at 4x the output size and box-filtered down, so edges are anti-aliased but the interior of
every object keeps its exact colour (tests check the pixel at a bbox centre).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # the world's native resolution
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 190, 40),
    "blue": (30, 60, 225),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 190),
    "orange": (250, 130, 15),
}
# "" is the plain studio background; the others get a phrase in the caption.
SETTINGS: dict[str, str] = {
    "plain": "",
    "grass": " on grass",
    "night": " at night",
    "sky": " in the sky",
    "beach": " on a beach",
}
STYLES: dict[str, str] = {"solid": "", "outline": " in outline style"}
RELATIONS = ("next to", "above")
TEMPLATES = ("photo of {}", "{}", "a picture of {}")
SIZE_WORDS = {"small": 11, "big": 21}  # bbox side (px at SIZE) below / above which the size is named
EXTRA_WORDS = ("left", "right", "on", "the", "far", "away", "very", "zoomed", "in", "close", "up", "with", "and",
               "of", "an", "object", "shape", "image", "photo", "picture", "white", "black", "pink", "stripe",
               "dot", "dots", "checkerboard", "pattern", "spots", "ring", "band", "two", "tone", "eye", "centre")


@dataclass
class Obj:
    """One drawn object: class word, colour name and bbox (x0, y0, x1, y1) in output pixels, x1/y1 exclusive."""

    shape: str
    colour: str
    bbox: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[int, int]:
        """Integer pixel at the middle of the bbox."""
        return (self.bbox[0] + self.bbox[2]) // 2, (self.bbox[1] + self.bbox[3]) // 2

    @property
    def side(self) -> int:
        """Side length of the (square) bbox."""
        return self.bbox[2] - self.bbox[0]


@dataclass
class Scene:
    """A world scene; `objects[0]` is the main object (named first in the caption)."""

    objects: list[Obj]
    setting: str = "plain"
    style: str = "solid"
    relation: str | None = None  # "next to" / "above" when there are two objects
    template: str = TEMPLATES[0]
    seed: int = 0  # drives background texture only
    name_position: bool = False  # say "on the left/right" for a single off-centre object


def vocabulary() -> list[str]:
    """Every word the world's captions and concept prompts use (for the tokenizer)."""
    words: set[str] = set(SHAPES) | set(COLOURS) | set(SIZE_WORDS)
    for phrase in list(SETTINGS.values()) + list(STYLES.values()) + list(RELATIONS) + list(TEMPLATES):
        words.update(w for w in phrase.replace("{}", " ").split() if w)
    words.update(EXTRA_WORDS)
    words.update({"a"})
    return sorted(words)


def _place(rng: np.random.Generator, side: int, x_range: tuple[int, int], y_range: tuple[int, int]) -> tuple:
    x0 = int(rng.integers(x_range[0], max(x_range[0] + 1, x_range[1] - side + 1)))
    y0 = int(rng.integers(y_range[0], max(y_range[0] + 1, y_range[1] - side + 1)))
    return (x0, y0, x0 + side, y0 + side)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, size: int = SIZE) -> Scene:
    """Draw a random scene: 70% one object, 30% two objects in a relation."""
    n = n_objects if n_objects is not None else (1 if rng.random() < 0.7 else 2)
    setting = str(rng.choice(list(SETTINGS)))
    style = "outline" if rng.random() < 0.15 else "solid"
    template = str(rng.choice(TEMPLATES))
    seed = int(rng.integers(2**31))
    shapes = rng.choice(SHAPES, size=n, replace=True)
    colours = rng.choice(list(COLOURS), size=n, replace=n > len(COLOURS))
    if n == 1:
        side = int(rng.integers(size * 9 // 32, size * 24 // 32 + 1))
        bbox = _place(rng, side, (1, size - 1), (1, size - 1))
        return Scene([Obj(str(shapes[0]), str(colours[0]), bbox)], setting, style, None, template, seed,
                     name_position=bool(rng.random() < 0.5))
    relation = str(rng.choice(RELATIONS))
    half = size // 2
    objs = []
    for i in range(2):
        side = int(rng.integers(size * 8 // 32, size * 14 // 32 + 1))
        if relation == "next to":  # first object on the left half
            bbox = _place(rng, side, (1 + i * half, half + i * (half - 1)), (2, size - 2))
        else:  # first object on the top half
            bbox = _place(rng, side, (2, size - 2), (1 + i * half, half + i * (half - 1)))
        objs.append(Obj(str(shapes[i]), str(colours[i]), bbox))
    return Scene(objs, setting, style, relation, template, seed)


def _size_word(obj: Obj, size: int) -> str:
    side = obj.side * SIZE / size
    if side <= SIZE_WORDS["small"]:
        return "small "
    if side >= SIZE_WORDS["big"]:
        return "big "
    return ""


def object_phrase(obj: Obj, size: int = SIZE) -> str:
    """'a small red circle' style phrase for one object."""
    words = f"{_size_word(obj, size)}{obj.colour} {obj.shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, size: int = SIZE, phrases: list[str] | None = None) -> str:
    """Plain English caption; `phrases` can replace the object phrases (used for personal concepts)."""
    names = phrases or [object_phrase(o, size) for o in scene.objects]
    if len(names) == 1:
        body = names[0]
        if scene.name_position:
            cx = scene.objects[0].centre[0] / size
            if cx < 0.35:
                body += " on the left"
            elif cx > 0.65:
                body += " on the right"
    else:
        body = f"{names[0]} {scene.relation} {names[1]}"
    return scene.template.format(body + SETTINGS[scene.setting] + STYLES[scene.style])


# ---------------------------------------------------------------------------------------------- drawing


def _background(setting: str, seed: int, s: int) -> Image.Image:
    """Background at supersampled size s; textures are random but muted so objects stay the salient colour."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (s, s), (222, 222, 218))
    d = ImageDraw.Draw(img)
    if setting == "grass":
        d.rectangle((0, 0, s, s), fill=(96, 146, 78))
        for _ in range(40):  # grass blades
            x, y = rng.integers(0, s, 2)
            d.line((x, y, x + rng.integers(-4, 5), y - rng.integers(6, 14)), fill=(70, 118, 58), width=2)
    elif setting == "night":
        d.rectangle((0, 0, s, s), fill=(18, 22, 58))
        for _ in range(12):  # stars in the sky
            x, y = rng.integers(0, s, 2)
            d.rectangle((x, y, x + 3, y + 3), fill=(235, 235, 210))
    elif setting == "sky":
        for y in range(s):  # vertical gradient
            t = y / s
            d.line((0, y, s, y), fill=(int(120 + 60 * t), int(175 + 45 * t), int(232 + 15 * t)))
        cx, cy = rng.integers(0, s, 2)
        d.ellipse((cx - 24, cy - 10, cx + 24, cy + 10), fill=(246, 248, 252))  # a cloud
    elif setting == "beach":
        horizon = int(s * rng.uniform(0.3, 0.45))
        d.rectangle((0, 0, s, horizon), fill=(72, 128, 176))
        d.rectangle((0, horizon, s, s), fill=(226, 206, 160))
        for _ in range(25):  # sand grains
            x, y = rng.integers(0, s), rng.integers(horizon, s)
            d.point((x, y), fill=(200, 180, 135))
    return img


def shape_mask(shape: str, s: int) -> Image.Image:
    """Filled mask ('L', s x s) of a class shape touching its bbox."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    e = s - 1
    if shape == "circle":
        d.ellipse((0, 0, e, e), fill=255)
    elif shape == "square":
        d.rectangle((0, 0, e, e), fill=255)
    elif shape == "triangle":
        d.polygon([(s / 2, 0), (e, e), (0, e)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = s / 2 if k % 2 == 0 else s / 4.6
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((s / 2 + r * math.cos(a), s / 2 + 0.06 * s + r * math.sin(a)))
        d.polygon(pts, fill=255)
    elif shape == "heart":
        r = s / 4
        d.ellipse((0, 0.02 * s, 2 * r, 2 * r + 0.02 * s), fill=255)
        d.ellipse((s - 2 * r - 1, 0.02 * s, e, 2 * r + 0.02 * s), fill=255)
        d.polygon([(0.02 * s, 0.34 * s), (0.98 * s, 0.34 * s), (s / 2, e)], fill=255)
    elif shape == "cross":
        w = s * 0.34
        d.rectangle(((s - w) / 2, 0, (s + w) / 2, e), fill=255)
        d.rectangle((0, (s - w) / 2, e, (s + w) / 2), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _outline(mask: Image.Image, width: int) -> Image.Image:
    """Ring of `width` px inside the mask's border (mask minus its erosion)."""
    a = np.asarray(mask) > 127
    inner = a.copy()
    for _ in range(width):  # erosion by a 3x3 cross, repeated
        inner[1:-1, 1:-1] &= a[:-2, 1:-1] & a[2:, 1:-1] & a[1:-1, :-2] & a[1:-1, 2:]
        inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
        a = inner.copy()
    ring = (np.asarray(mask) > 127) & ~inner
    return Image.fromarray((ring * 255).astype(np.uint8))


Painter = Callable[[Image.Image, Image.Image], None]  # (canvas patch, mask) -> draws in place


def paint_object(canvas: Image.Image, obj: Obj, style: str, scale: int, painter: Painter | None = None) -> None:
    """Draw one object into the supersampled canvas; `painter` overrides the fill (personal concepts)."""
    x0, y0, x1, y1 = (v * scale for v in obj.bbox)
    s = x1 - x0
    mask = shape_mask(obj.shape, s)
    if style == "outline":
        mask = _outline(mask, width=2 * scale)
    patch = Image.new("RGB", (s, s), COLOURS.get(obj.colour, (0, 0, 0)))
    if painter is not None:
        painter(patch, mask)
    canvas.paste(patch, (x0, y0), mask)


def render(scene: Scene, size: int = SIZE, painters: list[Painter | None] | None = None) -> Image.Image:
    """Render a scene to an RGB image of `size` x `size` (bboxes are in `size` pixels)."""
    s = size * SUPERSAMPLE
    canvas = _background(scene.setting, scene.seed, s)
    for i, obj in enumerate(scene.objects):
        painter = painters[i] if painters else None
        paint_object(canvas, obj, scene.style, SUPERSAMPLE, painter)
    return canvas.resize((size, size), Image.Resampling.BOX)


def sample_dataset(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n rendered scenes as a uint8 array (n, size, size, 3) with captions and scenes."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        sc = sample_scene(rng, size=size)
        images[i] = np.asarray(render(sc, size))
        captions.append(caption(sc, size))
        scenes.append(sc)
    return images, captions, scenes
