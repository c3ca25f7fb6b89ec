"""CustomConcept101-style evaluation: sample each entry's prompts with deltas applied, then CLIP text
alignment, CLIP image alignment to the concept photos, and KID x1000 of class-prompt images vs real ones.

See docs/EVAL.md. The metrics themselves are pure functions in metrics.py; CLIP lives in features.py.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .data import list_images, load_image
from .dataset import EvalEntry, check_folders, class_images, read_dataset, strip_tokens
from .errors import UserError
from .eval_report import PROBE_KEYS, write_results
from .features import ClipFeatures
from .metrics import image_alignment, kid, text_alignment
from .outputs import IMAGES_DIR, METRICS_FILE, check_out, read_image_folder, staged, write_image_folder
from .sample import ChunkedSampler
from .tokens import find_tokens

log = logging.getLogger(__name__)
__all__ = ["evaluate", "read_dataset", "run_eval"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "class"


def _kid_x1000(real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    # CLIP features are unit vectors; scaling them to norm sqrt(D) makes KID's kernel (x.y/D + 1)^3 equal
    # (cos + 1)^3, independent of the CLIP's embedding width.
    d = real.shape[1]
    mean, std = kid(real * d**0.5, fake * d**0.5, subsets=subsets, subset_size=subset_size, seed=seed)
    return 1000 * mean, 1000 * std


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


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
    gen = ChunkedSampler(pipe, steps, guidance, seed, resolution, batch, bar) if img_in is None else None
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
                images, _ = read_image_folder(img_in / "class" / folder_name)
                bar.update(1)
            else:
                assert gen is not None
                images, seeds = gen(prompt, n_class)
                if img_out is not None:
                    write_image_folder(img_out / "class" / folder_name, images, [prompt] * len(images), seeds,
                                  cols=math.ceil(math.sqrt(len(images))))
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
                    ims, s = gen(strip_tokens(p) if strip else p, n)
                    images += ims
                    prompts += [p] * len(ims)
                    seeds += s
                if img_out is not None:
                    write_image_folder(img_out / "prompts" / e.name, images, prompts, seeds, cols=n)
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
    probe = [k for k in PROBE_KEYS if any(r.get(k) is not None for r in results)]  # toy judge only
    keys = ("text_alignment", "clipscore", "image_alignment", "kid_x1000", *probe)
    settings = {"n": n, "steps": steps, "guidance": guidance, "seed": seed, "resolution": resolution,
                "n_class": n_class, "class_template": class_template, "max_real": max_real,
                "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "strip_tokens": strip,
                "clip": clip.path, "images_in": str(img_in) if img_in else None}
    return {"entries": results, "mean": {k: _mean([r.get(k) for r in results]) for k in keys}, "settings": settings}


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


def run_eval(base: str, dataset: str | Path, deltas: Sequence[str], clip_path: str, out: str | Path, *,
             select: Sequence[str] | None = None, images_in: str | Path | None = None, device: str = "cpu",
             progress: bool = True, **kw: Any) -> dict[str, Any]:
    """Load everything, evaluate, and publish metrics.json, metrics.md and images/ into `out` atomically."""
    from .base import load_pipeline
    from .delta import apply_deltas, load_delta

    out = check_out(out, "eval", METRICS_FILE, replaces=[IMAGES_DIR])
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
    with staged(out, last=METRICS_FILE) as staging:
        result = evaluate(pipe, entries, clip, images_in=images_in,
                          images_out=None if images_in is not None else staging / IMAGES_DIR, progress=progress,
                          judge=judge, **kw)
        result["settings"].update(base=base, deltas=list(deltas), dataset=str(dataset), device=str(device))
        write_results(result, staging)
    return result
