"""CustomConcept101-style evaluation: sample each entry's prompts with deltas applied, then CLIP text
alignment, CLIP image alignment to the concept photos, and KID x1000 of class-prompt images vs real ones.

See docs/EVAL.md. The metrics themselves are pure functions in metrics.py; CLIP lives in features.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .data import list_images, load_image, read_json_list
from .errors import UserError
from .features import ClipFeatures
from .metrics import image_alignment, kid, text_alignment
from .sample import generate, make_grid, read_prompts
from .tokens import TOKEN_RE, find_tokens

log = logging.getLogger(__name__)

METRICS_FILE, REPORT_FILE, IMAGES_DIR = "metrics.json", "metrics.md", "images"


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
        paths = list_images(folder, allow_captions=True)
    return paths[:limit]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "class"


def _write_images(folder: Path, images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
                  cols: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (im, prompt, s) in enumerate(zip(images, prompts, seeds, strict=True)):
        im.save(folder / f"{i:04d}.png")
        index.append({"file": f"{i:04d}.png", "prompt": prompt, "seed": s})
    make_grid(images, cols=cols).save(folder / "grid.png")
    (folder / "prompts.json").write_text(json.dumps(index, indent=1))


def _read_images(folder: Path) -> tuple[list[Image.Image], list[str]]:
    index_file = folder / "prompts.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--images: {index_file} is missing or broken ({e}); give the images folder a "
                        "previous `customdiff eval` wrote") from e
    return [load_image(folder / x["file"]) for x in index], [x["prompt"] for x in index]


class _Generator:
    """Samples with a shared progress bar; chunk k of one prompt uses seed + k (chunk 0 = `customdiff sample`)."""

    def __init__(self, pipe: Any, steps: int, guidance: float, seed: int, resolution: int | None, batch: int,
                 bar: Any):
        self.pipe, self.steps, self.guidance, self.seed = pipe, steps, guidance, seed
        self.resolution, self.batch, self.bar = resolution, batch, bar

    def __call__(self, prompt: str, n: int) -> tuple[list[Image.Image], list[int]]:
        images, seeds = [], []
        for k in range(math.ceil(n / self.batch)):
            m = min(self.batch, n - k * self.batch)
            images += generate(self.pipe, prompt, m, self.seed + k, self.steps, self.guidance, self.resolution)
            seeds += [self.seed + k] * m
            self.bar.update(1)
        return images, seeds


def _kid_x1000(real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    # CLIP features are unit vectors; scaling them to norm sqrt(D) makes KID's kernel (x.y/D + 1)^3 equal
    # (cos + 1)^3, independent of the CLIP's embedding width.
    d = real.shape[1]
    mean, std = kid(real * d**0.5, fake * d**0.5, subsets=subsets, subset_size=subset_size, seed=seed)
    return 1000 * mean, 1000 * std


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def check_folders(entries: Sequence[EvalEntry]) -> None:
    """Fail before any sampling when a concept's photo folder or class image folder is missing."""
    for e in entries:
        for c in e.concepts:
            if not c.instance_dir.is_dir():
                raise UserError(f"entry {e.name}: instance_data_dir {c.instance_dir} is not a folder")
            if c.class_dir is not None and not c.class_dir.is_dir():
                raise UserError(f"entry {e.name}: class_data_dir {c.class_dir} is not a folder")


def check_tokens(pipe: Any, entries: Sequence[EvalEntry]) -> None:
    """Fail early when a prompt uses a modifier token that the pipeline's tokenizer does not know."""
    vocab = pipe.tokenizer.get_vocab()
    for e in entries:
        for tok in dict.fromkeys(t for p in e.prompts for t in find_tokens(p)):
            if tok not in vocab:
                raise UserError(f"entry {e.name} uses {tok}, which no --delta defines; pass the concept's delta, "
                                "choose entries with --entries, or use --strip-tokens for a base-model baseline")


def evaluate(pipe: Any, entries: Sequence[EvalEntry], clip: ClipFeatures, *, n: int = 4, steps: int = 50,
             guidance: float = 6.0, seed: int = 0, resolution: int | None = None, n_class: int = 50,
             class_template: str = "{}", max_real: int = 200, kid_subsets: int = 100, kid_subset_size: int = 1000,
             strip: bool = False, batch: int = 8, images_out: str | Path | None = None,
             images_in: str | Path | None = None, progress: bool = False, judge: Any = None) -> dict[str, Any]:
    """Sample (or read from `images_in`) every entry's prompts and class prompts and compute the metrics.

    `pipe` has the deltas applied already (None with `images_in`). With a `judge` (the toy world's probe,
    `customdiff.toy.fidelity.Judge`), entries whose concepts it knows also get concept/pair fidelity, context
    fidelity and class leakage, and every image a verdict. Returns {"entries": [...], "mean": {...},
    "settings": {...}}; with `images_out`, images are written as images/prompts/<entry>/ and
    images/class/<class>/ (`{index:04d}.png` + prompts.json + grid.png), the layout `images_in` reads.
    """
    if images_in is None and pipe is None:
        raise ValueError("evaluate needs a pipeline unless images_in is given")
    if images_in is None and not strip:
        check_tokens(pipe, entries)
    img_in = Path(images_in) if images_in is not None else None
    img_out = Path(images_out) if images_out is not None else None
    class_prompts = list(dict.fromkeys(class_template.replace("{}", c.class_prompt)
                                       for e in entries for c in e.concepts if c.class_dir is not None))
    if img_in is None:  # the bar counts sampling calls, or folders read
        total = sum(len(e.prompts) * math.ceil(n / batch) for e in entries) + len(class_prompts) * math.ceil(
            n_class / batch)
    else:
        total = len(entries) + len(class_prompts)
    bar = tqdm(total=total, desc="eval", disable=not progress)
    gen = _Generator(pipe, steps, guidance, seed, resolution, batch, bar) if img_in is None else None
    target_cache: dict[Path, Tensor] = {}
    real_cache: dict[Path, Tensor] = {}
    fake_cache: dict[str, Tensor] = {}
    fake_images: dict[str, list[Image.Image]] = {}

    def target_feats(folder: Path) -> Tensor:
        if folder not in target_cache:
            target_cache[folder] = clip.image_features([load_image(p) for p in list_images(folder, True)])
        return target_cache[folder]

    def real_feats(folder: Path) -> Tensor:
        if folder not in real_cache:
            real_cache[folder] = clip.image_features([load_image(p) for p in class_images(folder, max_real)])
        return real_cache[folder]

    def fake_feats(prompt: str) -> Tensor:
        if prompt not in fake_cache:
            folder_name = _slug(prompt)
            if img_in is not None:
                images, _ = _read_images(img_in / "class" / folder_name)
                bar.update(1)
            else:
                assert gen is not None
                images, seeds = gen(prompt, n_class)
                if img_out is not None:
                    _write_images(img_out / "class" / folder_name, images, [prompt] * len(images), seeds,
                                  cols=math.ceil(math.sqrt(len(images))))
            fake_cache[prompt] = clip.image_features(images)
            fake_images[prompt] = images
        return fake_cache[prompt]

    results = []
    try:
        for e in entries:
            if img_in is not None:
                images, prompts = _read_images(img_in / "prompts" / e.name)
                bar.update(1)
            else:
                assert gen is not None
                images, prompts, seeds = [], [], []
                for p in e.prompts:
                    ims, s = gen(strip_tokens(p) if strip else p, n)
                    images += ims
                    prompts += [p] * len(ims)
                    seeds += s
                if img_out is not None:
                    _write_images(img_out / "prompts" / e.name, images, prompts, seeds, cols=n)
            feats = clip.image_features(images)  # (N, D)
            ta = text_alignment(feats, clip.text_features([strip_tokens(p) for p in prompts]))
            ia = {c.phrase(): image_alignment(feats, target_feats(c.instance_dir)) for c in e.concepts}
            kids: dict[str, dict[str, Any]] = {}
            for c in e.concepts:
                if c.class_dir is None:
                    continue
                cp = class_template.replace("{}", c.class_prompt)
                real, fake = real_feats(c.class_dir), fake_feats(cp)
                mean, std = _kid_x1000(real, fake, kid_subsets, kid_subset_size, seed)
                kids[c.phrase()] = {"class_prompt": cp, "kid_x1000": mean, "kid_x1000_std": std,
                                    "n_real": real.shape[0], "n_generated": fake.shape[0]}
            results.append({
                "name": e.name, "concepts": [c.phrase() for c in e.concepts], "prompts": len(set(prompts)),
                "images": len(images), "text_alignment": ta["cosine"], "clipscore": ta["clipscore"],
                "image_alignment": _mean(list(ia.values())), "image_alignment_per_concept": ia,
                "kid_x1000": _mean([k["kid_x1000"] for k in kids.values()]),
                "kid_x1000_std": _mean([k["kid_x1000_std"] for k in kids.values()]), "kid_per_concept": kids,
                **_probe_metrics(judge, e, images, prompts, fake_feats, fake_images, class_template),
            })
            log.info("%s: text %.4f, image %.4f, KID x1000 %s", e.name, ta["cosine"], results[-1]["image_alignment"],
                     "n/a" if results[-1]["kid_x1000"] is None else f"{results[-1]['kid_x1000']:.3f}")
    finally:
        bar.close()
    keys = ("text_alignment", "clipscore", "image_alignment", "kid_x1000", *PROBE_KEYS)
    settings = {"n": n, "steps": steps, "guidance": guidance, "seed": seed, "resolution": resolution,
                "n_class": n_class, "class_template": class_template, "max_real": max_real,
                "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "strip_tokens": strip,
                "clip": clip.path, "images_in": str(img_in) if img_in else None}
    return {"entries": results, "mean": {k: _mean([r.get(k) for r in results]) for k in keys}, "settings": settings}


PROBE_KEYS = ("concept_fidelity", "pair_fidelity", "context_fidelity", "class_leakage")


def _probe_metrics(judge: Any, e: EvalEntry, images: list[Image.Image], prompts: list[str], fake_feats: Any,
                   fake_images: dict[str, list[Image.Image]], class_template: str) -> dict[str, Any]:
    """The toy judge's measures for one entry ({} without a judge or for concepts it does not know)."""
    if judge is None or any(c.instance_dir.name not in judge.looks for c in e.concepts):
        return {}
    from .toy.fidelity import judge as verdicts_of
    from .toy.fidelity import leakage, summarize

    looks = {find_tokens(c.phrase())[0]: judge.looks[c.instance_dir.name] for c in e.concepts}
    verdicts = verdicts_of(judge.read(images), prompts, looks)
    leaks = []
    for c in e.concepts:
        cp = class_template.replace("{}", c.class_prompt)
        fake_feats(cp)  # samples the class prompt if KID has not
        leaks.append(leakage(judge.read(fake_images[cp]), judge.looks[c.instance_dir.name]))
    return {**summarize(verdicts, len(e.concepts)), "class_leakage": _mean(leaks),
            "verdicts": [v.label() for v in verdicts]}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_report(result: dict[str, Any]) -> str:
    """A markdown table of the per-entry metrics and their mean (probe columns when a toy judge scored them)."""
    probe = [k for k in PROBE_KEYS if any(r.get(k) is not None for r in result["entries"])]
    lines = ["| entry | prompts | images | text alignment | CLIPScore | image alignment | KID x1000 |"
             + "".join(f" {k.replace('_', ' ')} |" for k in probe),
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(probe)]
    for r in result["entries"]:
        kid_cell = _fmt(r["kid_x1000"], 3) + ("" if r["kid_x1000_std"] is None else f" ± {r['kid_x1000_std']:.3f}")
        lines.append(f"| {r['name']} | {r['prompts']} | {r['images']} | {_fmt(r['text_alignment'])} | "
                     f"{_fmt(r['clipscore'])} | {_fmt(r['image_alignment'])} | {kid_cell} |"
                     + "".join(f" {_fmt(r.get(k), 3)} |" for k in probe))
    m = result["mean"]
    lines.append(f"| **mean** | | | {_fmt(m['text_alignment'])} | {_fmt(m['clipscore'])} | "
                 f"{_fmt(m['image_alignment'])} | {_fmt(m['kid_x1000'], 3)} |"
                 + "".join(f" {_fmt(m.get(k), 3)} |" for k in probe))
    s = result["settings"]
    kids = {k["class_prompt"]: (k["n_generated"], k["n_real"]) for r in result["entries"]
            for k in r["kid_per_concept"].values()}
    notes = [f"Settings: {s['n']} images per prompt, {s['steps']} steps, guidance {s['guidance']}, seed {s['seed']}; "
             f"CLIP {s['clip']}; KID over {s['kid_subsets']} subsets."]
    notes += [f"KID '{cp}': {g} generated vs {r} real images" for cp, (g, r) in kids.items()]
    notes += [f"{k}: {s[k]}" for k in ("base", "deltas", "dataset") if k in s]
    if probe:
        notes.append("Fidelity, context and leakage are read by the toy world's probe (docs/EVAL.md).")
    return "\n".join(["# Evaluation", "", *lines, "", *(f"- {x}" for x in notes), "",
                      "Text alignment: mean CLIP cosine of each image with its prompt without modifier tokens "
                      "(CLIPScore = 2.5 * max(cos, 0)); image alignment: mean CLIP cosine with the concept photos; "
                      "KID x1000 on CLIP features (see docs/EVAL.md).", ""])


def check_out(out: Path) -> None:
    """Refuse an --out that holds an `images` folder not written by a previous evaluation."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if (out / IMAGES_DIR).exists() and not (out / METRICS_FILE).exists():
        raise UserError(f"--out {out}: has an images/ folder that is not from `customdiff eval`; choose another --out")


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside `out` (same file system, so publishing is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def publish(staging: Path, out: Path) -> None:
    """Move the staged items into `out`, replacing same-named ones; metrics.json last, so it marks completion."""
    out.mkdir(parents=True, exist_ok=True)
    items = sorted(staging.iterdir(), key=lambda p: p.name == METRICS_FILE)
    for item in items:
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            old = staging / (".old." + item.name)
            os.replace(dest, old)  # swap out first, so a failure leaves either the old or the new item
            os.replace(item, dest)
            shutil.rmtree(old)
        else:
            os.replace(item, dest)
    staging.rmdir()


def write_results(result: dict[str, Any], staging: Path) -> None:
    """Write metrics.json and metrics.md into the staging folder."""
    (staging / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (staging / REPORT_FILE).write_text(markdown_report(result))


def run_eval(base: str, dataset: str | Path, deltas: Sequence[str], clip_path: str, out: str | Path, *,
             select: Sequence[str] | None = None, images_in: str | Path | None = None, device: str = "cpu",
             progress: bool = True, **kw: Any) -> dict[str, Any]:
    """Load everything, evaluate, and publish metrics.json, metrics.md and images/ into `out` atomically."""
    from .base import load_pipeline
    from .delta import apply_deltas, load_delta

    out = Path(out)
    check_out(out)
    entries = read_dataset(dataset, select)
    check_folders(entries)
    if images_in is not None and not Path(images_in).is_dir():
        raise UserError(f"--images {images_in}: no such folder")
    loaded = [load_delta(p) for p in deltas]  # validate every file before the slow loads
    clip = ClipFeatures(clip_path, device=device)
    pipe = None
    if images_in is None:
        pipe = load_pipeline(base, device=device)
        apply_deltas(pipe, loaded, list(deltas))
    elif deltas:
        log.warning("--images given: the images are read, not generated, so --delta has no effect")
    judge = None
    if base == "toy":  # the toy world's probe reads every attribute: probe-exact measures beside CLIP's
        from .toy.fidelity import Judge

        judge = Judge.toy()
    staging = staging_dir(out)
    try:
        result = evaluate(pipe, entries, clip, images_in=images_in,
                          images_out=None if images_in is not None else staging / IMAGES_DIR, progress=progress,
                          judge=judge, **kw)
        result["settings"].update(base=base, deltas=list(deltas), dataset=str(dataset), device=str(device))
        write_results(result, staging)
        publish(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return result
