"""CustomConcept101-style dataset files: concepts, entries, prompt files and class image folders."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import list_images, read_json_list
from .errors import UserError
from .sample import read_prompts
from .tokens import TOKEN_RE
from .validate import check_readable, unreadable, warn


@dataclass
class Concept:
    """One concept of an entry: its prompt with the modifier token, class, photos and real class images."""

    instance_prompt: str
    class_prompt: str
    instance_dir: Path
    class_dir: Path | None = None

    def phrase(self) -> str:
        """What fills a prompt's `{}`: the instance prompt from its first modifier token on ("<new1> cat")."""
        m = TOKEN_RE.search(self.instance_prompt)
        return self.instance_prompt[m.start():] if m else self.instance_prompt


@dataclass
class EvalEntry:
    """One dataset entry: one concept, or several composed by a prompt file with `{0}`, `{1}` placeholders."""

    name: str  # "<index>_<instance folder names>", unique within the file
    concepts: list[Concept]
    prompts: list[str]  # placeholders already filled with the concepts' phrases
    index: int = 0

    def matches(self, key: str) -> bool:
        """Whether `key` names this entry: its index, its full name, or its instance folder name(s)."""
        return key in (self.name, self.name.split("_", 1)[1], str(self.index))


def strip_tokens(prompt: str) -> str:
    """The prompt with modifier tokens removed: "photo of a <new1> cat on grass" -> "photo of a cat on grass"."""
    return re.sub(r"\s+", " ", TOKEN_RE.sub(" ", prompt)).strip()


def fill_prompt(template: str, phrases: Sequence[str]) -> str:
    """Replace `{0}`, `{1}`, ... with the concepts' phrases and `{}` with the first."""
    for i, p in enumerate(phrases):
        template = template.replace("{" + str(i) + "}", p)
    return template.replace("{}", phrases[0])


def _resolve(root: Path, p: str | None) -> Path | None:
    if not p:
        return None
    path = Path(p)
    return path if path.is_absolute() else (root / path)


def _concept(e: dict[str, Any], root: Path, where: str) -> Concept:
    missing = [k for k in ("instance_prompt", "class_prompt", "instance_data_dir") if k not in e]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}")
    inst = _resolve(root, e["instance_data_dir"])
    assert inst is not None
    return Concept(e["instance_prompt"], e["class_prompt"], inst, _resolve(root, e.get("class_data_dir")))


def _stem(concepts: Sequence[Concept]) -> str:
    return "+".join(re.sub(r"[^\w.-]+", "_", c.instance_dir.name) for c in concepts)


def read_dataset(path: str | Path, select: Sequence[str] | None = None) -> list[EvalEntry]:
    """Entries of a CustomConcept101-style dataset.json (single entries, or lists of concepts plus a dict with
    `prompt_filename_compose`/`prompt_filename`); paths are relative to the file's folder. `select` keeps
    entries by index or name."""
    path = Path(path)
    raw = read_json_list(path, "--dataset", "dataset")
    root, entries = path.parent, []
    for i, item in enumerate(raw):
        where = f"--dataset {path}: entry {i}"
        if isinstance(item, dict):
            concepts, prompt_file = [_concept(item, root, where)], item.get("prompt_filename")
        elif isinstance(item, list) and all(isinstance(x, dict) for x in item):
            concepts = [_concept(x, root, f"{where}, concept {j}") for j, x in enumerate(item) if "instance_prompt" in x]
            extra = [x for x in item if "instance_prompt" not in x]
            prompt_file = next((x.get("prompt_filename_compose") or x.get("prompt_filename") for x in extra), None)
            if not concepts:
                raise UserError(f"{where} has no concept (no instance_prompt)")
        else:
            raise UserError(f"{where} is neither a concept object nor a list of them")
        if not prompt_file:
            raise UserError(f"{where} has no prompt_filename")
        pf = _resolve(root, prompt_file)
        assert pf is not None
        phrases = [c.phrase() for c in concepts]
        prompts = [fill_prompt(t, phrases) for t in read_prompts(pf)]
        entries.append(EvalEntry(f"{i:02d}_{_stem(concepts)}", concepts, prompts, i))
    if select:
        chosen = [e for e in entries if any(e.matches(s) for s in select)]
        unknown = [s for s in select if not any(e.matches(s) for e in entries)]
        if unknown:
            raise UserError(f"--entries {unknown[0]}: no such entry in {path}; entries are "
                            + ", ".join(e.name for e in entries))
        entries = chosen
    return entries


def class_images(folder: Path, limit: int) -> list[Path]:
    """Real class images of a folder: its images (captions allowed), an `images/` subfolder, or the paths
    listed in the reference's `images.txt`; the first `limit` in sorted order."""
    if (folder / "images").is_dir():
        folder = folder / "images"
    listing = folder / "images.txt"
    if listing.is_file() and not any(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in folder.iterdir()):
        paths = [Path(x.strip()) for x in listing.read_text().splitlines() if x.strip()]
        paths = [p if p.is_absolute() else folder / p for p in paths]
    else:
        paths = list_images(folder, allow_captions=True, wanted="real images of the class (at least 2, for KID)")
    return paths[:limit]


def warn_conceptless(entries: Sequence[EvalEntry]) -> None:
    """Warn of prompts that name none of their entry's concepts (a prompt-file line without `{}`): they are
    sampled without the concept, and their images lower its scores without saying why."""
    for e in entries:
        phrases = [c.phrase() for c in e.concepts]
        bare = [p for p in e.prompts if not any(ph in p for ph in phrases)]
        if bare:
            warn(f"entry {e.name}: {len(bare)} of its {len(e.prompts)} prompts name no concept (a prompt-file line "
                 f"without {{}}), e.g. {bare[0]!r}; they are sampled without it")


def check_folders(entries: Sequence[EvalEntry], max_real: int) -> None:
    """Fail before any sampling when a concept's photo folder or class image folder, or an image that scoring
    will read from them (the first `max_real` class images), is missing or unreadable."""
    for e in entries:
        for c in e.concepts:
            for key, folder in (("instance_data_dir", c.instance_dir), ("class_data_dir", c.class_dir)):
                if folder is None:
                    continue
                if not folder.is_dir():
                    raise UserError(f"entry {e.name}: {key} {folder} is not a folder")
                if not os.access(folder, os.R_OK | os.X_OK):
                    raise unreadable(folder, f"entry {e.name}: {key}")
                try:
                    photos = key == "instance_data_dir"
                    read = list_images(folder, True) if photos else class_images(folder, max_real)
                    if not photos and len(read) < 2:
                        raise UserError(f"entry {e.name}: {key} {folder}: {len(read)} class image(s); KID needs at "
                                        "least 2 real images of the class: add more, or leave class_data_dir out")
                    for p in read:
                        if not p.is_file():
                            listing = folder / "images.txt"
                            raise UserError(f"entry {e.name}: {key} {p}: no such image (a broken link, or a "
                                            f"line of {listing} naming a missing file); remove or fix it")
                        check_readable(p, f"entry {e.name}: {key}")
                except PermissionError as denied:  # images/, images.txt, or the folder of a listed file
                    raise unreadable(denied.filename or folder, f"entry {e.name}: {key}") from None


