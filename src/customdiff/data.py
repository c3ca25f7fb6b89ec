"""Training data: concept folders, regularization images with captions, augmentation and 1:1 batches."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import UserError
from .graphs import GPU_GATE
from .images import open_image
from .tokens import find_tokens
from .validate import (
    CONCEPT_SCHEMA,
    check_dataset_entries,
    check_object,
    deferred_warnings,
    read_json,
    read_text,
    warn,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = {".txt"}
MIN_PHOTOS = 3  # below this a warning: the method is made for 4-20 photos (the web app refuses fewer than 3)
# files that Windows and macOS write into photo folders by themselves (hidden dot-files are skipped as well)
SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"}
FAR_PREFIXES = ("a far away ", "very small ")
NEAR_PREFIXES = ("zoomed in ", "close up ")


@dataclass
class ConceptSpec:
    """One concept: its photos and prompts, and where its regularization images come from."""

    instance_dir: str
    instance_prompt: str
    class_prompt: str
    reg_dir: str | None = None
    reg_captions: str | None = None  # a caption.txt aligned with reg_dir's images.txt (reference layout)
    initializer: str | None = None
    reg_use_captions: bool = True  # False: every regularization image is trained with the class prompt
    tokens: list[str] = field(default_factory=list)  # its modifier tokens, as validate_concepts resolves them

    def class_word(self) -> str:
        """The class word: the first word after the concept's tokens in its prompt (e.g. "cat", also in
        "a <new1> <new2> cat")."""
        words = self.instance_prompt.split()
        for i, w in enumerate(words):
            if find_tokens(w):
                after = next((x for x in words[i + 1:] if not find_tokens(x)), None)
                if after is not None:
                    return after.strip(",.")
        return self.class_prompt.split()[-1] if self.class_prompt.split() else ""


def load_image(path: Path, min_side: int = 0) -> Image.Image:
    """Open an image as RGB (see images.open_image: EXIF orientation, every mode, bombs refused)."""
    return open_image(path, min_side)


def list_images(folder: Path, allow_captions: bool = False, wanted: str = "4-20 photos of the concept") -> list[Path]:
    """Image files of a folder, sorted; any other file (except caption .txt when allowed, hidden and system
    files) is an error. `wanted` says what to add to an empty folder."""
    if folder.is_file():
        raise UserError(f"{folder}: a file, not a folder; give the folder that holds the images")
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder")
    images = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in SYSTEM_FILES or p.is_dir():
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTS:
            images.append(p)
        elif not (allow_captions and ext in CAPTION_EXTS):
            raise UserError(f"{p}: not an image (expected jpg, png, webp, bmp, gif, tiff); remove it from {folder}")
    if not images:
        raise UserError(f"{folder}: contains no images (jpg, png, webp); add {wanted}")
    return images


def read_reg_source(spec: ConceptSpec) -> list[tuple[Path, str]]:
    """Regularization (image, caption) pairs: sidecar .txt captions, the reference's images.txt +
    caption.txt, or the class prompt for every image (with a warning saying so, unless the spec asks for it
    with reg_use_captions=False)."""
    assert spec.reg_dir is not None
    src = Path(spec.reg_dir)
    images = _listed_images(src) if src.is_file() else _folder_images(src)
    if not spec.reg_use_captions:
        return [(p, spec.class_prompt) for p in images]
    if spec.reg_captions:
        caps = _caption_lines(spec, len(images))
    elif src.is_file():
        warn(f"{src}: no caption file; every regularization image is captioned {spec.class_prompt!r}")
        caps = [spec.class_prompt] * len(images)
    else:
        caps, missing = [], 0
        for p in images:
            cap = p.with_suffix(".txt")
            text = read_text(cap, "caption").strip() if cap.is_file() else ""
            missing += not text
            caps.append(text or spec.class_prompt)
        if missing:
            warn(f"--reg-dir {src}: {missing} of {len(images)} images have no caption (.txt beside the image); "
                 f"those use the class prompt {spec.class_prompt!r}")
    return list(zip(images, caps, strict=True))


def _listed_images(src: Path) -> list[Path]:
    """The reference layout: an images.txt listing one image path per line (relative to it or to the cwd)."""
    if src.suffix.lower() != ".txt":
        raise UserError(f"--reg-dir {src}: a file, not a folder; give a folder of class images or an images.txt "
                        "listing them")
    paths = []
    for n, line in enumerate(read_text(src, "--reg-dir").splitlines(), 1):
        if not line.strip():
            continue
        p = Path(line.strip())
        p = p if p.is_absolute() else (src.parent / p if (src.parent / p).exists() else p)
        if not p.is_file():
            raise UserError(f"{src}: line {n} names {line.strip()}, which does not exist; fix the list")
        paths.append(p)
    if not paths:
        raise UserError(f"{src}: lists no images; write one image path per line")
    return paths


def _folder_images(src: Path) -> list[Path]:
    """The images of a --reg-dir folder (captions may sit beside them)."""
    if not src.exists():
        raise UserError(f"--reg-dir {src}: no such folder or images.txt file")
    return list_images(src, allow_captions=True, wanted="images of the class (or leave out --reg-dir to have the "
                                                        "base generate them)")


def _caption_lines(spec: ConceptSpec, n: int) -> list[str]:
    if not spec.reg_captions:
        return [spec.class_prompt] * n
    lines = [x.strip() for x in read_text(spec.reg_captions, "captions").splitlines() if x.strip()]
    if len(lines) < n:
        raise UserError(f"{spec.reg_captions}: {len(lines)} captions for {n} regularization images; "
                        "give one caption per line, aligned with the images")
    if len(lines) > n:  # likely misaligned: a caption file of another folder, or images removed since
        warn(f"{spec.reg_captions}: {len(lines)} captions for {n} regularization images; the last "
             f"{len(lines) - n} are unused, so check that each line still matches its image")
    return lines[:n]


def read_lines(path: str | Path, label: str) -> list[str]:
    """Non-empty lines of a text file, `#` comments skipped; a UserError naming `label` if none or unreadable."""
    lines = read_text(path, label).splitlines()
    out = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    if not out:
        raise UserError(f"{label} {path}: empty; write one entry per line")
    return out


def _resolve(path: str, root: Path, where: str = "") -> str:
    """A path from a concepts file: absolute as is; relative, from the current folder (the reference's
    concept lists) or else from the file's folder, refused when both exist and differ."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    here, beside = p, root / p
    if here.exists() and beside.exists() and here.resolve() != beside.resolve():
        raise UserError(f"{where}: {path} names both {here.resolve()} (from the current folder) and {beside} (beside "
                        "the concepts file); write an absolute path")
    return str(here if here.exists() else beside)


def read_json_list(path: Path, label: str, what: str) -> list:
    """A non-empty JSON list from a UTF-8 file, or a UserError naming `label` (the flag) and the file.

    Entries of a "dataset" file are checked against the CustomConcept101 schema here."""
    items = read_json(path, label)
    if not isinstance(items, list) or not items:
        raise UserError(f"{label} {path}: expected a non-empty JSON list [...] in the {what} file")
    if what == "dataset":
        check_dataset_entries(items, path, label)
    return items


def read_concepts_file(path: str | Path) -> list[ConceptSpec]:
    """Concepts from a JSON list in the reference's concept_list.json shape; each concept its own tokens."""
    path = Path(path)
    entries = read_json_list(path, "--concepts", "concepts")
    specs: list[ConceptSpec] = []
    owner: dict[str, int] = {}
    for i, e in enumerate(entries):
        where = f"--concepts {path}: concept {i}"
        check_object(e, CONCEPT_SCHEMA, where)
        toks = find_tokens(e["instance_prompt"])
        if not toks:
            raise UserError(f"{where}: instance_prompt {e['instance_prompt']!r} has no modifier token; "
                            "write it like 'photo of a <new1> cat'")
        for t in toks:
            if t in owner:
                raise UserError(f"{where}: token {t} is also used by concept {owner[t]}; give each concept its "
                                f"own token (<new1>, <new2>, ...)")
        owner.update(dict.fromkeys(toks, i))
        class_prompt, reg_captions = e["class_prompt"], None
        cand = Path(_resolve(class_prompt, path.parent, where)) if class_prompt.endswith(".txt") else None
        if cand is not None and not cand.is_file():
            raise UserError(f"{where}: class_prompt {class_prompt!r} names no caption file (looked for {cand}); give "
                            "the file or a prompt such as 'photo of a cat'")
        if cand is not None:  # reference: class_prompt names a caption file
            reg_captions = str(cand)
            first = [x.strip() for x in read_text(cand, "class_prompt").splitlines() if x.strip()]
            if not first:
                raise UserError(f"{where}: class_prompt file {cand} is empty; one caption per line")
            class_prompt = first[0]
        reg = _resolve(e["class_data_dir"], path.parent, where) if e.get("class_data_dir") else None
        if reg is not None and not Path(reg).exists():  # named here: later it would read as a --reg-dir flag
            raise UserError(f"{where}: class_data_dir {reg}: no such folder or images.txt file; fix the path, or "
                            "leave class_data_dir out to have the base generate class images")
        inst = _resolve(e["instance_data_dir"], path.parent, where)
        if any(Path(s.instance_dir).resolve() == Path(inst).resolve() for s in specs):
            warn(f"{where}: instance_data_dir {inst} is also used by another concept")
        specs.append(ConceptSpec(
            instance_dir=inst, instance_prompt=e["instance_prompt"],
            class_prompt=class_prompt, reg_dir=reg,
            reg_captions=reg_captions, initializer=e.get("initializer_token") or e.get("initializer")))
    return specs


def validate_concepts(specs: list[ConceptSpec], min_side: int = 0,
                      cache: dict[Path, Image.Image] | None = None) -> tuple[list[ConceptSpec], list[str]]:
    """Check prompts, folders, captions and every image up front; return the specs with their tokens filled
    (copies: the given specs are not changed) and all tokens in order.

    Each image is decoded once: into `cache` when given (TrainData reads it from there)."""
    all_tokens: list[str] = []
    owner: dict[str, int] = {}
    resolved = []
    for i, s in enumerate(specs):
        s = replace(s, tokens=find_tokens(s.instance_prompt))
        resolved.append(s)
        if not s.tokens:
            raise UserError(f"instance prompt {s.instance_prompt!r} has no modifier token; "
                            "write it like 'photo of a <new1> cat'")
        if not s.class_prompt.strip():
            raise UserError(f"class prompt of {s.instance_prompt!r} is empty; give one such as 'photo of a cat'")
        held = find_tokens(s.class_prompt)
        if held:  # class images of it would pull the token toward the class
            raise UserError(f"class prompt {s.class_prompt!r} holds the modifier token {held[0]}; the class prompt "
                            "names the class alone ('photo of a cat'), the token goes in the instance prompt")
        for t in s.tokens:
            if t in owner and owner[t] != i:
                raise UserError(f"token {t} is used by two concepts ({specs[owner[t]].instance_dir} and "
                                f"{s.instance_dir}); give each concept its own token")
            owner[t] = i
            if t not in all_tokens:
                all_tokens.append(t)
        photos = list_images(Path(s.instance_dir))
        for p in photos:
            im = load_image(p, min_side)  # decode every photo now: a broken file fails before any work
            if cache is not None:
                cache[p] = im
        if len(photos) < MIN_PHOTOS:
            warn(f"{s.instance_dir}: {len(photos)} photo{'s' * (len(photos) != 1)} of the concept; Custom Diffusion "
                 "is made for 4-20, and with fewer the samples tend to repeat the photos")
        if s.reg_dir and Path(s.reg_dir).resolve() == Path(s.instance_dir).resolve():
            raise UserError(f"--reg-dir {s.reg_dir}: is the concept's own photo folder, so the class word would learn "
                            "the concept; give images of the class in general, or leave out --reg-dir")
        if s.reg_dir:
            for p, _ in read_reg_source(s):
                if cache is None or p not in cache:
                    im = load_image(p)
                    if cache is not None:
                        cache[p] = im
    return resolved, all_tokens


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def center_square(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to `size`."""
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def size_and_crop(photo: tuple[int, int], scale: int, window: tuple[int, int], size: int) -> torch.Tensor:
    """SDXL time ids (6,) of a training image: the photo's real (height, width), where the S x S training window
    starts in the photo rescaled so its centre square is `scale` wide (clamped at 0 for a pasted photo), and
    (S, S). This is SDXL's convention (crop offsets in the rescaled image), applied to our rescale/crop/paste."""
    w, h = photo
    side = min(w, h)
    top = round((h - side) / 2 * scale / side) + window[0]  # the centre-square crop, in rescaled pixels
    left = round((w - side) / 2 * scale / side) + window[1]
    return torch.tensor([h, w, max(top, 0), max(left, 0), size, size], dtype=torch.float32)


def augment(im: Image.Image, prompt: str, size: int, factor: int, rng: np.random.Generator,
            enabled: bool = True, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The reference's target-image augmentation: returns pixels (3,S,S), loss mask (S/f,S/f), prompt."""
    return augment_sized(im, prompt, size, factor, rng, enabled, flip)[:3]


def augment_sized(im: Image.Image, prompt: str, size: int, factor: int, rng: np.random.Generator,
                  enabled: bool = True, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
    """`augment` plus the image's SDXL time ids (see size_and_crop): pixels, mask, prompt, time ids (6,).

    With p=2/3 rescale to U[S/3, S] and paste at a random place on a blank (grey) canvas, the mask covering
    the pasted region shrunk by one latent pixel (prompt prefixed "a far away"/"very small" below 0.6 S);
    otherwise rescale to U[1.2 S, 1.4 S] and random-crop, full mask, prefix "zoomed in"/"close up".
    """
    flipped = _draw_mirror(rng, flip)
    if not enabled:
        return _unaugmented(im.size, prompt, size, factor, _fixed_target(im, size, flipped))
    return _augmented(im, prompt, size, factor, rng, flipped)


def _draw_mirror(rng: np.random.Generator, flip: bool) -> bool:
    """Whether to mirror a target photo: the first draw of its augmentation (none when flips are off)."""
    return bool(flip and rng.random() < 0.5)


def _square(im: Image.Image, flipped: bool) -> Image.Image:
    """The photo's centre square at its own resolution, mirrored when `flipped`."""
    im = center_square(im, im.width if im.width == im.height else min(im.size))
    return ImageOps.mirror(im) if flipped else im


def _fixed_target(im: Image.Image, size: int, flipped: bool) -> Image.Image:
    """A target photo without augmentation: its centre square, mirrored when `flipped`, resized to `size`."""
    return _square(im, flipped).resize((size, size), Image.BICUBIC)


def _unaugmented(photo: tuple[int, int], prompt: str, size: int, factor: int, square: Image.Image
                ) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
    """`augment_sized`'s result for a `_fixed_target` square of a photo of size `photo`: full mask, prompt as is."""
    m = size // factor
    return image_to_tensor(square), torch.ones(m, m), prompt, size_and_crop(photo, size, (0, 0), size)


def _augmented(im: Image.Image, prompt: str, size: int, factor: int, rng: np.random.Generator,
               flipped: bool) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
    """`augment_sized` with augmentation, after the mirroring draw."""
    photo = im.size
    im = _square(im, flipped)
    m = size // factor
    if rng.random() < 2 / 3:
        scale = int(rng.integers(size // 3, size + 1))
    else:
        scale = int(rng.integers(int(1.2 * size), int(1.4 * size) + 1))
    im = im.resize((scale, scale), Image.BICUBIC)
    mask = torch.zeros(m, m)
    if scale > size:
        top, left = (int(rng.integers(0, scale - size + 1)) for _ in range(2))
        pixels = image_to_tensor(im.crop((left, top, left + size, top + size)))
        mask[:] = 1.0
        prompt = str(rng.choice(NEAR_PREFIXES)) + prompt
        ids = size_and_crop(photo, scale, (top, left), size)
    else:
        top, left = (int(rng.integers(0, size - scale + 1)) for _ in range(2))
        pixels = torch.zeros(3, size, size)
        pixels[:, top:top + scale, left:left + scale] = image_to_tensor(im)
        if scale == size:
            mask[:] = 1.0
        else:
            r0, r1, c0, c1 = top // factor + 1, (top + scale) // factor - 1, left // factor + 1, (left + scale) // factor - 1
            if r1 <= r0 or c1 <= c0:  # tiny paste at a coarse latent grid: keep the unshrunk region
                r0, r1, c0, c1 = top // factor, -(-(top + scale) // factor), left // factor, -(-(left + scale) // factor)
            mask[r0:r1, c0:c1] = 1.0
        if scale < 0.6 * size:
            prompt = str(rng.choice(FAR_PREFIXES)) + prompt
        ids = size_and_crop(photo, scale, (-top, -left), size)
    return pixels, mask, prompt, ids


class TrainData:
    """All training images in memory; builds each step's batch from a (seed, step, rank) generator, so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, specs: list[ConceptSpec], size: int, factor: int, augment: bool = True,
                 flip: bool = True, cache: dict[Path, Image.Image] | None = None):
        self.size, self.factor, self.augment, self.flip = size, factor, augment, flip
        self.instances: list[tuple[Image.Image, str]] = []
        self.reg: list[tuple[Image.Image, str]] = []
        self._reg_squares: dict[int, Image.Image] = {}  # index -> its S x S centre square (reg images never change)
        self._target_squares: dict[tuple[int, bool], Image.Image] = {}  # without augmentation: (index, mirrored)
        cache = cache if cache is not None else {}

        def get(p: Path) -> Image.Image:
            if p not in cache:
                cache[p] = load_image(p)
            return cache[p]

        seen: set[tuple[Path, str]] = set()  # a regularization source shared by concepts counts once
        for s in specs:
            self.instances += [(get(p), s.instance_prompt) for p in list_images(Path(s.instance_dir))]
            if s.reg_dir:
                with deferred_warnings(discard=True):  # validate_concepts already warned about these
                    pairs = read_reg_source(s)
                for p, c in pairs:
                    key = (p.resolve(), c)
                    if key not in seen:
                        seen.add(key)
                        self.reg.append((get(p), c))
        log.info("training data: %d target images, %d regularization images", len(self.instances), len(self.reg))

    def batch(self, seed: int, step: int, rank: int, batch_size: int) -> dict:
        """Batch for one step: half target images, half regularization images (all target without reg).

        Keys: pixel_values (B, 3, S, S), mask (B, 1, S/f, S/f), prompts, time_ids (B, 6) (read on SDXL), and
        latent_keys: for each image, None when it is augmented (targets, unless augmentation is off), else a
        key naming its fixed pixels, under which its VAE encoding may be cached: regularization images are never
        augmented, and without augmentation a target is its centre square, mirrored or not."""
        rng = np.random.Generator(np.random.PCG64([seed, step, rank]))
        n_inst = batch_size // 2 if self.reg else batch_size
        n_reg = batch_size - n_inst if self.reg else 0
        pixels, masks, prompts, ids = [], [], [], []
        keys: list[tuple | None] = []
        for i in rng.choice(len(self.instances), n_inst, replace=n_inst > len(self.instances)):
            im, prompt = self.instances[int(i)]
            flipped = _draw_mirror(rng, self.flip)
            if self.augment:
                p, m, pr, t = _augmented(im, prompt, self.size, self.factor, rng, flipped)
                keys.append(None)
            else:  # the same pixels every time it is drawn: resized once
                key = (int(i), flipped)
                if key not in self._target_squares:
                    self._target_squares[key] = _fixed_target(im, self.size, flipped)
                p, m, pr, t = _unaugmented(im.size, prompt, self.size, self.factor, self._target_squares[key])
                keys.append(("target", *key))
            pixels.append(p)
            masks.append(m)
            prompts.append(pr)
            ids.append(t)
        for i in rng.choice(len(self.reg), n_reg, replace=n_reg > len(self.reg)) if n_reg else []:
            im, caption = self.reg[int(i)]
            pixels.append(self.reg_pixels(int(i)))
            masks.append(torch.ones(self.size // self.factor, self.size // self.factor))
            prompts.append(caption)
            ids.append(size_and_crop(im.size, self.size, (0, 0), self.size))
            keys.append(("reg", int(i)))
        return {"pixel_values": torch.stack(pixels), "mask": torch.stack(masks).unsqueeze(1), "prompts": prompts,
                "time_ids": torch.stack(ids), "latent_keys": keys}

    def reg_pixels(self, i: int) -> torch.Tensor:
        """Regularization image i as the (3, S, S) tensor of its centre square, resized once (a reg image is never
        augmented, so every step sees the same pixels)."""
        if i not in self._reg_squares:
            self._reg_squares[i] = center_square(self.reg[i][0], self.size)
        return image_to_tensor(self._reg_squares[i])


def prefetch(make: Callable[[int], T], keys: Iterable[int], depth: int = 2,
             pin: bool = False) -> Iterator[T]:
    """`make(key)` for each key, in order, prepared up to `depth` keys ahead in a background thread.

    The results are those of calling `make` in the loop (batches are a pure function of their key); only
    the waiting moves off the training step. `depth` 0 calls `make` on the caller's thread. With `pin`, the
    tensors of a dict result go to pinned memory (faster, asynchronous copies to a GPU)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    def job(key: int) -> T:
        out = make(key)
        if pin and isinstance(out, dict):
            # pinning allocates through CUDA, which a capture on the training thread forbids
            with GPU_GATE.shared():
                out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v  # type: ignore[assignment]
                       for k, v in out.items()}
        return out

    if depth <= 0:
        yield from map(job, keys)
        return
    it = iter(keys)
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="customdiff-data") as pool:
        try:
            for key in it:
                pending.append(pool.submit(job, key))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the loop stopped early (error, stop): drop what was queued
            for f in pending:
                f.cancel()
