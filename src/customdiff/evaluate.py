"""CustomConcept101-style evaluation: sample each entry's prompts with deltas applied, then CLIP text
alignment, CLIP image alignment to the concept photos, and KID x1000 of class-prompt images vs real ones.

See docs/EVAL.md. The metrics themselves are pure functions in metrics.py; CLIP lives in features.py.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Container, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .conditioning import pipeline_vocabulary
from .config import EvalConfig
from .data import list_images, load_image
from .dataset import EvalEntry, check_folders, class_images, read_dataset, strip_tokens, warn_conceptless
from .errors import UserError
from .eval_report import PROBE_KEYS, write_results
from .features import ClipFeatures, resolve_clip
from .metrics import image_alignment, kid, text_alignment
from .outputs import (
    IMAGES_DIR,
    INDEX_FILE,
    METRICS_FILE,
    check_out,
    read_image_folder,
    staged,
    write_image_folder,
)
from .sample import ChunkedSampler
from .tokens import find_tokens, undefined_tokens
from .validate import warn

log = logging.getLogger(__name__)
__all__ = ["evaluate", "read_dataset", "run_eval"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "class"


def _class_prompts(entries: Sequence[EvalEntry], template: str) -> list[str]:
    """The class prompts KID samples, once each: `template` around every concept's class that has real images."""
    return list(dict.fromkeys(template.replace("{}", c.class_prompt)
                              for e in entries for c in e.concepts if c.class_dir is not None))


def check_images_in(images: Path, entries: Sequence[EvalEntry], class_template: str) -> None:
    """Refuse an --images folder that lacks a folder `evaluate` will read (before CLIP loads)."""
    need = [images / "prompts" / e.name for e in entries]
    need += [images / "class" / _slug(p) for p in _class_prompts(entries, class_template)]
    for folder in need:
        if not (folder / INDEX_FILE).is_file():
            raise UserError(f"--images {images}: it has no {folder.relative_to(images) / INDEX_FILE}; give the "
                            "images folder an earlier `customdiff eval` wrote with this --dataset (its --out/images)")


def _kid_x1000(real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    # CLIP features are unit vectors; scaling them to norm sqrt(D) makes KID's kernel (x.y/D + 1)^3 equal
    # (cos + 1)^3, independent of the CLIP's embedding width.
    d = real.shape[1]
    mean, std = kid(real * d**0.5, fake * d**0.5, subsets=subsets, subset_size=subset_size, seed=seed)
    return 1000 * mean, 1000 * std


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def check_tokens(entries: Sequence[EvalEntry], known: Container[str]) -> None:
    """Fail early when a prompt uses a modifier token that `known` (a vocabulary and the deltas' tokens) lacks."""
    for e in entries:
        missing = undefined_tokens(e.prompts, known)
        if missing:
            raise UserError(f"entry {e.name} uses {missing[0]}, which no --delta defines; pass the concept's delta, "
                            "choose entries with --entries, or use --strip-tokens for a base-model baseline")


def evaluate(pipe: Any, entries: Sequence[EvalEntry], clip: ClipFeatures, cfg: EvalConfig | None = None, *,
             images_out: str | Path | None = None, images_in: str | Path | None = None, progress: bool = False,
             judge: Any = None, **settings: Any) -> dict[str, Any]:
    """Sample (or read from `images_in`) every entry's prompts and class prompts and compute the metrics.

    `cfg` holds the sampling and scoring settings (`settings` override single fields, e.g. `n=2`).

    `pipe` has the deltas applied already (None with `images_in`). With a `judge` (the toy world's probe,
    `customdiff.toy.fidelity.Judge`), entries whose concepts it knows also get concept/pair fidelity, context
    fidelity and class leakage, and every image a verdict. Returns {"entries": [...], "mean": {...},
    "settings": {...}}; with `images_out`, images are written as images/prompts/<entry>/ and
    images/class/<class>/ (`{index:04d}.png` + prompts.json + grid.png), the layout `images_in` reads.
    """
    cfg = replace(cfg or EvalConfig(), **settings)
    if images_in is None and pipe is None:
        raise ValueError("evaluate needs a pipeline unless images_in is given")
    if images_in is None and not cfg.strip_tokens:
        check_tokens(entries, pipeline_vocabulary(pipe))
    img_in = Path(images_in) if images_in is not None else None
    img_out = Path(images_out) if images_out is not None else None
    class_prompts = _class_prompts(entries, cfg.class_template)
    if img_in is None:  # the bar counts sampling calls, or folders read
        total = (sum(len(e.prompts) * math.ceil(cfg.n / cfg.batch) for e in entries)
                 + len(class_prompts) * math.ceil(cfg.n_class / cfg.batch))
    else:
        total = len(entries) + len(class_prompts)
    bar = tqdm(total=total, desc="eval", disable=not progress)
    gen = None if img_in is not None else ChunkedSampler(pipe, cfg.steps, cfg.guidance, cfg.seed, cfg.resolution,
                                                         cfg.batch, bar)
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
            real_cache[folder] = clip.image_features([load_image(p) for p in class_images(folder, cfg.max_real)])
        return real_cache[folder]

    def fake_feats(prompt: str) -> Tensor:
        if prompt not in fake_cache:
            folder_name = _slug(prompt)
            if img_in is not None:
                images, _ = read_image_folder(img_in / "class" / folder_name)
                bar.update(1)
            else:
                assert gen is not None
                images, seeds = gen(prompt, cfg.n_class)
                if img_out is not None:
                    write_image_folder(img_out / "class" / folder_name, images, [prompt] * len(images), seeds)
            fake_cache[prompt] = clip.image_features(images)
            fake_images[prompt] = images
        return fake_cache[prompt]

    results = []
    try:
        for e in entries:
            if img_in is not None:
                images, prompts = read_image_folder(img_in / "prompts" / e.name)
                bar.update(1)
            else:
                assert gen is not None
                images, prompts, seeds = [], [], []
                for p in e.prompts:
                    ims, s = gen(strip_tokens(p) if cfg.strip_tokens else p, cfg.n)
                    images += ims
                    prompts += [p] * len(ims)
                    seeds += s
                if img_out is not None:
                    write_image_folder(img_out / "prompts" / e.name, images, prompts, seeds, cols=cfg.n)
            feats = clip.image_features(images)  # (N, D)
            ta = text_alignment(feats, clip.text_features([strip_tokens(p) for p in prompts]))
            ia = {c.phrase(): image_alignment(feats, target_feats(c.instance_dir)) for c in e.concepts}
            kids: dict[str, dict[str, Any]] = {}
            for c in e.concepts:
                if c.class_dir is None:
                    continue
                cp = cfg.class_template.replace("{}", c.class_prompt)
                real, fake = real_feats(c.class_dir), fake_feats(cp)
                mean, std = _kid_x1000(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
                kids[c.phrase()] = {"class_prompt": cp, "kid_x1000": mean, "kid_x1000_std": std,
                                    "n_real": real.shape[0], "n_generated": fake.shape[0]}
            results.append({
                "name": e.name, "concepts": [c.phrase() for c in e.concepts], "prompts": len(set(prompts)),
                "images": len(images), "text_alignment": ta["cosine"], "clipscore": ta["clipscore"],
                "image_alignment": _mean(list(ia.values())), "image_alignment_per_concept": ia,
                "kid_x1000": _mean([k["kid_x1000"] for k in kids.values()]),
                "kid_x1000_std": _mean([k["kid_x1000_std"] for k in kids.values()]), "kid_per_concept": kids,
                **_probe_metrics(judge, e, images, prompts, fake_feats, fake_images, cfg.class_template),
            })
            log.info("%s: text %.4f, image %.4f, KID x1000 %s", e.name, ta["cosine"], results[-1]["image_alignment"],
                     "n/a" if results[-1]["kid_x1000"] is None else f"{results[-1]['kid_x1000']:.3f}")
    finally:
        bar.close()
    probe = [k for k in PROBE_KEYS if any(r.get(k) is not None for r in results)]  # toy judge only
    keys = ("text_alignment", "clipscore", "image_alignment", "kid_x1000", *probe)
    return {"entries": results, "mean": {k: _mean([r.get(k) for r in results]) for k in keys},
            "settings": {**cfg.settings(), "clip": clip.path, "images_in": str(img_in) if img_in else None}}


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


_MAKING = ("n", "n_class", "steps", "guidance", "resolution", "seed", "strip_tokens", "class_template", "base",
           "pipeline", "deltas")


def made_by(images: Path) -> dict[str, Any]:
    """The sampling settings of the eval that wrote `images` (its metrics.json beside them), each None where
    that file is missing or lacks it."""
    try:
        made = json.loads((images.parent / METRICS_FILE).read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        made = {}
    made = made if isinstance(made, dict) else {}
    return {k: made.get(k) for k in _MAKING}


def _class_template_of(images: Path, given: str) -> str:
    """With --images, the template that made its class images (the earlier run's metrics.json), which names
    their folders; `given` (this command's --class-template) where that file does not say."""
    made = made_by(images).get("class_template")
    if not isinstance(made, str) or "{}" not in made or made == given:
        return given
    if given != EvalConfig.class_template:
        warn(f"--class-template {given!r} ignored: the class images in {images} were made with {made!r} "
             "(their metrics.json)")
    return made


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Load everything, evaluate, and publish metrics.json, metrics.md and images/ into `cfg.out` atomically."""
    from .base import (
        SAMPLING_MULTIPLE_WHY,
        STEPS_WHY,
        base_facts,
        base_vocabulary,
        check_device,
        load_pipeline,
        sampling_multiple,
    )
    from .conditioning import pipeline_name
    from .delta import apply_deltas, load_delta
    from .validate import check_multiple, check_number

    cfg.validate()
    device = check_device(cfg.device)
    facts = base_facts(cfg.base)
    if facts is not None and cfg.images is None:
        check_number("--steps", cfg.steps, 1, facts.max_sampling_steps, why=STEPS_WHY)
        check_multiple("--resolution", cfg.resolution, sampling_multiple(facts), SAMPLING_MULTIPLE_WHY)
    out = check_out(cfg.out, "eval", METRICS_FILE, replaces=[IMAGES_DIR])
    entries = read_dataset(cfg.dataset, cfg.entries)
    check_folders(entries, cfg.max_real)
    if cfg.images is None and not cfg.strip_tokens:
        warn_conceptless(entries)
    if cfg.images is not None:
        if not Path(cfg.images).is_dir():
            raise UserError(f"--images {cfg.images}: no such folder")
        cfg = replace(cfg, class_template=_class_template_of(Path(cfg.images), cfg.class_template))
        check_images_in(Path(cfg.images), entries, cfg.class_template)
    loaded = [load_delta(p) for p in cfg.deltas]  # validate every file before the slow loads
    defined = {t for d in loaded for t in d.tokens}
    if cfg.images is None and not cfg.strip_tokens and any(undefined_tokens(e.prompts, defined) for e in entries):
        vocab = base_vocabulary(cfg.base)  # the tokenizers alone; a hub id's are checked by `evaluate`, loaded
        if vocab is not None:
            check_tokens(entries, vocab | defined)
    clip = ClipFeatures(resolve_clip(cfg.clip, cfg.base), device=device)
    pipe = None
    if cfg.images is None:
        pipe = load_pipeline(cfg.base, device=device)
        apply_deltas(pipe, loaded, list(cfg.deltas))
    elif cfg.deltas:
        log.warning("--images given: the images are read, not generated, so --delta has no effect")
    judge = None
    if cfg.base == "toy":  # the toy world's probe reads every attribute: probe-exact measures beside CLIP's
        from .toy.fidelity import Judge

        judge = Judge.toy()
    with staged(out, last=METRICS_FILE) as staging:
        result = evaluate(pipe, entries, clip, cfg, images_in=cfg.images,
                          images_out=None if cfg.images is not None else staging / IMAGES_DIR, progress=progress,
                          judge=judge)
        result["settings"].update(base=cfg.base, pipeline=None if pipe is None else pipeline_name(pipe),
                                  deltas=list(cfg.deltas), dataset=str(cfg.dataset), device=str(device))
        if cfg.images is not None:  # how the images were made is the earlier run's to say, not these flags'
            result["settings"].update(made_by(Path(cfg.images)))
        write_results(result, staging)
    return result
