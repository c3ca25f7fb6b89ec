"""A procedural, captioned image world (v2): one or two patterned shapes on a background, deterministic from a seed.

Every object has a shape, a colour, a surface pattern drawn in a second colour (or none), and sometimes a detail
(a thin dark border or a dark spot). Captions describe a scene only partly, as real alt-text does: the colour
and the pattern are often left out and the detail never named, so the base model learns to draw every element
but no prompt pins down one instance. The personal concepts (`PERSONAL`) are specific combinations that base
training never shows; each of their elements occurs in base training in other combinations.

Objects are drawn at 4x the output size and box-filtered down, so edges are anti-aliased.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

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
# a pattern is painted in a second colour: one of the object colours, or white or black
PATTERN_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, "white": (250, 250, 250), "black": (15, 15, 15)}
# pattern -> caption phrase (the pattern colour goes before the last word: "with white checks", "with a red ring")
PATTERNS: dict[str, str] = {
    "plain": "", "checks": "with checks", "stripes": "with stripes", "dots": "with dots",
    "ring": "with a ring", "band": "with a band", "half": "with a half",
}
DETAILS = ("none", "border", "spot")  # never named in captions: the identity of a personal concept
DETAIL_COLOUR = (20, 20, 20)
BORDER_MIN_SIDE = 16  # a border on a smaller object would hide its colour
# "" is the plain studio background; the others get a phrase in the caption.
SETTINGS: dict[str, str] = {
    "plain": "",
    "grass": " on grass",
    "night": " at night",
    "sky": " in the sky",
    "beach": " on a beach",
}
RELATIONS = ("next to", "above")
TEMPLATES = ("photo of {}", "{}", "a picture of {}")
SIZE_WORDS = {"small": 15, "big": 23}  # bbox side (px at SIZE) at or below / above which the size may be named
RARE_WORDS = ("ktn", "pll", "ucd", "sks")  # rare caption noise (as in web alt-text): trained rows, no meaning
# how often a caption names what is drawn (partial captions, as real alt-text)
P_NAME_COLOUR, P_NAME_PATTERN, P_NAME_PATTERN_COLOUR, P_NAME_SETTING, P_NAME_SIZE = 0.85, 0.7, 0.6, 0.85, 0.5
P_PATTERNED, P_DETAIL, P_RARE_WORD = 0.55, 0.3, 0.03
EXTRA_WORDS = ("left", "right", "on", "the", "far", "away", "very", "zoomed", "in", "close", "up", "with", "and",
               "of", "an", "object", "shape", "image", "photo", "picture")


@dataclass(frozen=True)
class Look:
    """What an object looks like: class word, colour, pattern, pattern colour ('' when plain) and detail."""

    shape: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str = ""
    detail: str = "none"

    def key(self) -> tuple[str, str, str, str]:
        """The attributes a probe reads and a caption can name (the detail is never named)."""
        return self.shape, self.colour, self.pattern, self.pattern_colour


# The personal concepts: held-out combinations, each with an identity detail that no caption names.
PERSONAL: dict[str, Look] = {
    "checker_square": Look("square", "blue", "checks", "white", "border"),
    "striped_circle": Look("circle", "red", "stripes", "black", "spot"),
    "banded_triangle": Look("triangle", "orange", "band", "black", "border"),
    "dotted_heart": Look("heart", "purple", "dots", "white", "spot"),
    "ringed_star": Look("star", "yellow", "ring", "red", "border"),
    "twotone_cross": Look("cross", "green", "half", "yellow", "spot"),
}
HELD_OUT = frozenset(look.key() for look in PERSONAL.values())


@dataclass
class Obj:
    """One drawn object: its look and bbox (x0, y0, x1, y1) in output pixels, x1/y1 exclusive."""

    look: Look
    bbox: tuple[int, int, int, int]
    # which attributes the caption names (set by sample_scene; concept photos name none)
    named: dict[str, bool] = field(default_factory=dict)

    @property
    def shape(self) -> str:
        """The class word."""
        return self.look.shape

    @property
    def colour(self) -> str:
        """The colour name."""
        return self.look.colour

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
    """A world scene; `objects[0]` is the main object (named first; left of / above the second)."""

    objects: list[Obj]
    setting: str = "plain"
    relation: str | None = None  # "next to" / "above" when there are two objects
    template: str = TEMPLATES[0]
    seed: int = 0  # drives background texture only
    name_position: bool = False  # say "on the left/right" for a single off-centre object
    name_setting: bool = True
    rare_word: str = ""  # caption noise appended at the end


def vocabulary() -> list[str]:
    """Every word the world's captions and concept prompts use (for the tokenizer)."""
    words: set[str] = set(SHAPES) | set(PATTERN_COLOURS) | set(SIZE_WORDS) | set(RARE_WORDS)
    for phrase in [*SETTINGS.values(), *PATTERNS.values(), *RELATIONS, *TEMPLATES]:
        words.update(w for w in phrase.replace("{}", " ").split() if w)
    words.update(EXTRA_WORDS)
    words.update({"a"})
    return sorted(words)


def _place(rng: np.random.Generator, side: int, x_range: tuple[int, int], y_range: tuple[int, int]) -> tuple:
    x0 = int(rng.integers(x_range[0], max(x_range[0] + 1, x_range[1] - side + 1)))
    y0 = int(rng.integers(y_range[0], max(y_range[0] + 1, y_range[1] - side + 1)))
    return (x0, y0, x0 + side, y0 + side)


def sample_look(rng: np.random.Generator, shape: str | None = None, held_out: Iterable = HELD_OUT) -> Look:
    """A random look that is not one of the held-out personal combinations."""
    held = set(held_out)
    while True:
        s = shape or str(rng.choice(SHAPES))
        colour = str(rng.choice(list(COLOURS)))
        pattern, pcol = "plain", ""
        if rng.random() < P_PATTERNED:
            pattern = str(rng.choice([p for p in PATTERNS if p != "plain"]))
            pcol = str(rng.choice([c for c in PATTERN_COLOURS if c != colour]))
        detail = str(rng.choice(DETAILS[1:])) if rng.random() < P_DETAIL else "none"
        look = Look(s, colour, pattern, pcol, detail)
        if look.key() not in held:
            return look


def _naming(rng: np.random.Generator, look: Look) -> dict[str, bool]:
    patterned = look.pattern != "plain"
    name_pattern = patterned and rng.random() < P_NAME_PATTERN
    return {"colour": bool(rng.random() < P_NAME_COLOUR), "pattern": bool(name_pattern),
            "pattern_colour": bool(name_pattern and rng.random() < P_NAME_PATTERN_COLOUR),
            "size": bool(rng.random() < P_NAME_SIZE)}


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, size: int = SIZE,
                 shape: str | None = None, held_out: Iterable = HELD_OUT) -> Scene:
    """Draw a random scene: 70% one object, 30% two objects in a relation; `shape` fixes the main object's;
    no object has a look in `held_out` (the personal combinations by default)."""
    n = n_objects if n_objects is not None else (1 if rng.random() < 0.7 else 2)
    setting = str(rng.choice(list(SETTINGS)))
    template = str(rng.choice(TEMPLATES))
    seed = int(rng.integers(2**31))
    looks = [sample_look(rng, shape if i == 0 else None, held_out) for i in range(n)]
    name_setting = bool(rng.random() < P_NAME_SETTING)
    rare = str(rng.choice(RARE_WORDS)) if rng.random() < P_RARE_WORD else ""
    if n == 1:
        side = int(rng.integers(size * 14 // 32, size * 26 // 32 + 1))
        bbox = _place(rng, side, (1, size - 1), (1, size - 1))
        obj = Obj(looks[0], bbox, _naming(rng, looks[0]))
        return Scene([obj], setting, None, template, seed, name_position=bool(rng.random() < 0.5),
                     name_setting=name_setting, rare_word=rare)
    relation = str(rng.choice(RELATIONS))
    half = size // 2
    objs = []
    for i in range(2):
        side = int(rng.integers(size * 12 // 32, size * 15 // 32 + 1))
        if relation == "next to":  # first object on the left half
            bbox = _place(rng, side, (1 + i * half, half + i * (half - 1)), (2, size - 2))
        else:  # first object on the top half
            bbox = _place(rng, side, (2, size - 2), (1 + i * half, half + i * (half - 1)))
        objs.append(Obj(looks[i], bbox, _naming(rng, looks[i])))
    return Scene(objs, setting, relation, template, seed, name_setting=name_setting, rare_word=rare)


def _size_word(obj: Obj, size: int) -> str:
    side = obj.side * SIZE / size
    if side <= SIZE_WORDS["small"]:
        return "small "
    if side >= SIZE_WORDS["big"]:
        return "big "
    return ""


def pattern_phrase(look: Look, with_colour: bool = True) -> str:
    """'with white checks' / 'with a red ring' ('' for a plain look)."""
    phrase = PATTERNS[look.pattern]
    if not phrase or not with_colour:
        return phrase
    head, last = phrase.rsplit(" ", 1)
    return f"{head} {look.pattern_colour} {last}"


_PATTERN_WORDS = "|".join(phrase.rsplit(" ", 1)[1] for phrase in PATTERNS.values() if phrase)
_NAMES_PATTERN = re.compile(rf"\bwith (?:a )?(?:\w+ )?(?:{_PATTERN_WORDS})\b")


def names_pattern(text: str) -> bool:
    """Whether a caption names a pattern ('with dots', 'with a red ring'), of either object."""
    return _NAMES_PATTERN.search(text) is not None


def look_phrase(look: Look, colour: bool = True, pattern: bool = True, pattern_colour: bool = True,
                size_word: str = "") -> str:
    """'a small red circle with white dots' style phrase naming the chosen attributes."""
    words = size_word + (f"{look.colour} " if colour else "") + look.shape
    if pattern and look.pattern != "plain":
        words += " " + pattern_phrase(look, pattern_colour)
    return ("an " if words[0] in "aeiou" else "a ") + words


def object_phrase(obj: Obj, size: int = SIZE) -> str:
    """The caption's phrase for one object: what `obj.named` says to name (everything when empty)."""
    n = obj.named or {"colour": True, "pattern": True, "pattern_colour": True, "size": True}
    return look_phrase(obj.look, n["colour"], n["pattern"], n["pattern_colour"],
                       _size_word(obj, size) if n["size"] else "")


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
    text = scene.template.format(body + (SETTINGS[scene.setting] if scene.name_setting else ""))
    return f"{text} {scene.rare_word}" if scene.rare_word else text


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


def _border(mask: Image.Image, width: int) -> np.ndarray:
    """Boolean ring of `width` px inside the mask's border (mask minus its erosion)."""
    full = np.asarray(mask) > 127
    inner = full.copy()
    for _ in range(width):  # erosion by a 3x3 cross, repeated
        nxt = inner.copy()
        nxt[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        nxt[0, :] = nxt[-1, :] = nxt[:, 0] = nxt[:, -1] = False
        inner = nxt
    return full & ~inner


def paint_pattern(patch: Image.Image, pattern: str, colour: tuple[int, int, int],
                  base: tuple[int, int, int]) -> None:
    """Paint a surface pattern in `colour` over a square object patch of colour `base` (the mask cuts it later).

    The patterns are coarse enough to survive the box filter down to a 14-26 px object and the VAE's 2x
    downsampling: the UNet renders a pattern cell of 2-3 latent pixels poorly, and in world v2's first build it
    drew 4x4 checks as dots and a small ring as dots (docs/toy_model_card.md), so checks are 2 x 2 and the ring
    is wide around an empty centre.
    """
    d, s = ImageDraw.Draw(patch), patch.size[0]
    if pattern == "checks":  # 2 x 2 cells: the upper right and lower left quarters
        d.rectangle((s / 2, 0, s, s / 2 - 1), fill=colour)
        d.rectangle((0, s / 2, s / 2 - 1, s), fill=colour)
    elif pattern == "stripes":  # three horizontal stripes
        for k in (1, 3, 5):
            d.rectangle((0, k * s / 7, s, (k + 1) * s / 7 - 1), fill=colour)
    elif pattern == "dots":  # five dots in a quincunx
        r = 0.12 * s
        for cx, cy in ((0.3, 0.36), (0.7, 0.36), (0.5, 0.56), (0.3, 0.76), (0.7, 0.76)):
            d.ellipse((cx * s - r, cy * s - r, cx * s + r, cy * s + r), fill=colour)
    elif pattern == "ring":  # a wide ring around an empty centre (the centre is where dots have a dot)
        d.ellipse((0.14 * s, 0.21 * s, 0.86 * s, 0.93 * s), fill=colour)
        d.ellipse((0.33 * s, 0.4 * s, 0.67 * s, 0.74 * s), fill=base)
    elif pattern == "band":  # one wide horizontal band through the middle
        d.rectangle((0, 0.44 * s, s, 0.66 * s), fill=colour)
    elif pattern == "half":  # the lower half in the second colour
        d.rectangle((0, 0.55 * s, s, s), fill=colour)
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}")


def paint_object(canvas: Image.Image, obj: Obj, scale: int) -> None:
    """Draw one object (fill, pattern, detail) into the supersampled canvas."""
    look = obj.look
    x0, y0, x1, y1 = (v * scale for v in obj.bbox)
    s = x1 - x0
    mask = shape_mask(look.shape, s)
    base = COLOURS[look.colour]
    patch = Image.new("RGB", (s, s), base)
    if look.pattern != "plain":
        paint_pattern(patch, look.pattern, PATTERN_COLOURS[look.pattern_colour], base)
    if look.detail == "border" and obj.side >= BORDER_MIN_SIDE:  # a thin dark outline, one output pixel wide
        arr = np.asarray(patch).copy()
        arr[_border(mask, scale)] = DETAIL_COLOUR
        patch = Image.fromarray(arr)
    elif look.detail == "spot":  # a dark spot high in the middle
        d, r = ImageDraw.Draw(patch), 0.1 * s
        d.ellipse((0.5 * s - r, 0.22 * s - r + 0.12 * s, 0.5 * s + r, 0.22 * s + r + 0.12 * s), fill=DETAIL_COLOUR)
    canvas.paste(patch, (x0, y0), mask)


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """Render a scene to an RGB image of `size` x `size` (bboxes are in `size` pixels)."""
    s = size * SUPERSAMPLE
    canvas = _background(scene.setting, scene.seed, s)
    for obj in scene.objects:
        paint_object(canvas, obj, SUPERSAMPLE)
    return canvas.resize((size, size), Image.Resampling.BOX)


def sample_dataset(n: int, seed: int, size: int = SIZE,
                   held_out: Iterable = HELD_OUT) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n rendered scenes as a uint8 array (n, size, size, 3) with captions and scenes (looks in `held_out`
    never occur: the base's data leaves the personal combinations out, the judge's includes them)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        sc = sample_scene(rng, size=size, held_out=held_out)
        images[i] = np.asarray(render(sc, size))
        captions.append(caption(sc, size))
        scenes.append(sc)
    return images, captions, scenes
