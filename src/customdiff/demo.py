"""`customdiff demo`: teach one toy concept, sample held-out prompts before and after, write an HTML report.

A thin client of `customdiff.evaluate`: the same sampling and metrics as `customdiff eval`, with the toy
world's probe reading every image (concept fidelity, context fidelity, class leakage).
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .eval_report import verdict_class

log = logging.getLogger(__name__)
METRIC_KEYS = ("concept_fidelity", "context_fidelity", "class_leakage", "text_alignment", "image_alignment",
               "kid_x1000")


@dataclass
class DemoConfig:
    """Settings of the demo run (training settings from customdiff.toy.recipes)."""

    out: str = "out/demo"
    concept: str = "dotted_heart"  # learned best with striped_circle, and judged right at night (docs/benchmarks.md)
    steps: int | None = None  # None: the Custom Diffusion recipe's
    prompts: int = 0  # 0 = all held-out prompts of the concept
    n: int = 4  # images per prompt
    n_class: int = 32  # class-prompt samples (class leakage, KID)
    sample_steps: int = 25
    guidance: float = 5.0
    seed: int = 0

    def validate(self, names: list[str]) -> None:
        """The concept (one of the toy world's `names`), steps and seed, before any slow work."""
        from .validate import SEED_MAX, check_number

        if self.concept not in names:
            raise UserError(f"--concept {self.concept!r} is not a toy concept; choose one of {', '.join(names)}")
        check_number("--steps", self.steps, 1, 100_000)  # None passes: the recipe's own
        check_number("--seed", self.seed, 0, SEED_MAX)


def _cells(folder: str, labels: list[str], start: int, n: int) -> str:
    cells = []
    for i in range(start, start + n):
        lab = labels[i] if labels else ""
        cells.append(f'<figure class="{verdict_class(lab)}"><img src="{folder}/{i:04d}.png" '
                     f'title="{html.escape(lab)}"><figcaption>{html.escape(lab.split(" | ")[-1])}</figcaption>'
                     "</figure>")
    return "".join(cells)


def _report(out: Path, cfg: DemoConfig, recipe: Any, entry: Any, n_targets: int, res: dict, timing: dict) -> Path:
    css = ("body{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}"
           "img{width:72px;height:72px;image-rendering:pixelated;display:block}"
           "figure{display:inline-block;margin:2px;padding:2px;border:3px solid #ccc;font-size:9px;width:72px}"
           "figcaption{height:2.4em;overflow:hidden}"
           "figure.good{border-color:#2a2}figure.half{border-color:#e90}figure.bad{border-color:#d22}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
           ".t img{width:96px;height:96px;display:inline-block;margin:2px}")
    phrase = entry.concepts[0].phrase()
    body = [f"<h1>customdiff demo: {html.escape(phrase)}</h1>",
            f"<p>Custom Diffusion on the embedded toy world: {timing['steps']} steps at batch 8, learning rate "
            f"{recipe.learning_rate:g} per image ({recipe.token_lr_scale:g}x that for the new token's embedding), "
            f"half target photos, half real class images "
            f"{'with their captions' if recipe.reg_prompt == 'captions' else 'prompted with the bare class prompt'}"
            f"{'' if recipe.augment else ', no rescale augmentation'}; "
            f"cross-attention K/V plus the new token <code>&lt;new1&gt;</code>. Training took "
            f"{timing['train_s']:.0f} s, the whole demo {timing['total_s']:.0f} s.</p>",
            f"<p>The concept: {html.escape(res['description'])}.</p>",
            "<h2>Target photos</h2><div class='t'>",
            "".join(f'<img src="targets/{i:02d}.png">' for i in range(n_targets)), "</div>",
            f"<p>The probe reads {res['judge_ceiling']['targets']:.0%} of these photos as the concept, and "
            f"{res['judge_ceiling']['targets_vae_roundtrip']:.0%} of them after a round trip through the VAE "
            "(every sample is a decoded latent): a learner that redrew them exactly would score about that.</p>",
            "<h2>Metrics</h2><table><tr><th></th>", "".join(f"<th>{k.replace('_', ' ')}</th>" for k in METRIC_KEYS),
            "</tr>"]
    for k in ("before", "after"):
        vals = "".join(f"<td>{'n/a' if res[k].get(m) is None else format(res[k][m], '.3f')}</td>"
                       for m in METRIC_KEYS)
        body.append(f"<tr><td>{k}</td>{vals}</tr>")
    body.append("</table><p><b>Before</b>: the base model prompted with the class word; <b>after</b>: with the "
                "delta and <code>&lt;new1&gt;</code>. The probe (a classifier that reads shape, colours, pattern "
                "and setting of toy images) decides: <i>concept fidelity</i> is the share of samples that show "
                "the concept's shape, colour, pattern and pattern colour; <i>context fidelity</i> the share that "
                "draw the setting and other objects the prompt names; <i>class leakage</i> the share of "
                "samples of the plain class prompt that show the concept's pattern. CLIP text/image alignment "
                "and KID x1000 use the toy CLIP (docs/EVAL.md). Frames: green = concept and context right, "
                "orange = concept right, context wrong, red = concept not drawn; hover for the probe's "
                "reading.</p>")
    body.append("<h2>Held-out prompts</h2><table><tr><th>prompt</th><th>before (base, class word)</th>"
                "<th>after (delta, token)</th></tr>")
    for i, prompt in enumerate(res["prompts"]):
        body.append(f"<tr><td>{html.escape(prompt)}</td>"
                    f"<td>{_cells('before', res['before_verdicts'], i * cfg.n, cfg.n)}</td>"
                    f"<td>{_cells('after', res['after_verdicts'], i * cfg.n, cfg.n)}</td></tr>")
    cls = f"photo of a {entry.concepts[0].class_prompt}"
    body.append(f"<tr><td>{html.escape(cls)} (class prompt: should not show the concept)</td>"
                f"<td>{_cells('before_class', res['leaks']['before'], 0, min(cfg.n_class, 8))}</td>"
                f"<td>{_cells('after_class', res['leaks']['after'], 0, min(cfg.n_class, 8))}</td></tr>")
    body.append("</table>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>customdiff demo</title><style>{css}</style>" \
           f"</head><body>{''.join(body)}</body></html>"
    path = out / "report.html"
    path.write_text(page)
    return path


def run_demo(cfg: DemoConfig, progress: bool = True) -> Path:
    """Train the concept, sample before/after, score with the probe and CLIP, write report.html; return its path."""
    from .dataset import read_dataset
    from .outputs import check_out, staged
    from .toy import paths

    t0 = time.perf_counter()
    toy = paths()
    concepts_dir = Path(toy["concepts"])
    names = json.loads((concepts_dir / "concepts.json").read_text())
    cfg.validate(names)
    entry = read_dataset(concepts_dir / "dataset.json", [cfg.concept])[0]
    if cfg.prompts:
        entry.prompts = entry.prompts[:cfg.prompts]
    out = check_out(cfg.out, "demo", ("report.html", "concept.safetensors"))  # before any slow work
    with staged(out, replace=True, last="report.html") as stage:
        _run(cfg, entry, names, stage, t0, progress)
    return out / "report.html"


def _run(cfg: DemoConfig, entry: Any, names: dict, out: Path, t0: float, progress: bool) -> None:
    """Train, sample, score and write the report into the staging folder `out`."""
    from .base import load_pipeline
    from .config import EvalConfig, TrainConfig
    from .data import list_images, load_image
    from .delta import apply_deltas, load_delta
    from .evaluate import evaluate
    from .features import ClipFeatures
    from .toy import paths
    from .toy.fidelity import Judge, leakage
    from .toy.quality import target_hits
    from .toy.recipes import DEMO_RECIPE, RECIPES, concept_spec
    from .train import train

    toy = paths()
    recipe = RECIPES[DEMO_RECIPE]
    steps = cfg.steps or recipe.steps  # validated: None or >= 1
    delta_path = out / "concept.safetensors"
    t1 = time.perf_counter()
    train(TrainConfig(**recipe.train_kwargs(out=str(delta_path), steps=steps, seed=cfg.seed)),
          [concept_spec(entry.concepts[0], "<new1>")], progress=progress)
    train_s = time.perf_counter() - t1

    clip, judge = ClipFeatures(toy["clip"]), Judge.toy()
    ecfg = EvalConfig(n=cfg.n, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed, n_class=cfg.n_class,
                      class_template="photo of a {}", kid_subsets=50, kid_subset_size=cfg.n_class)
    pipe = load_pipeline("toy")
    work = out / ".images"
    before = evaluate(pipe, [entry], clip, replace(ecfg, strip_tokens=True), images_out=work / "before",
                      judge=judge, progress=progress)
    handle = apply_deltas(pipe, [load_delta(delta_path)], [str(delta_path)])
    after = evaluate(pipe, [entry], clip, ecfg, images_out=work / "after", judge=judge, progress=progress)
    handle.remove()
    for side in ("before", "after"):
        os.replace(work / side / "prompts" / entry.name, out / side)
        os.replace(next((work / side / "class").iterdir()), out / f"{side}_class")
    shutil.rmtree(work)
    (out / "targets").mkdir()
    photos = [load_image(p) for p in list_images(entry.concepts[0].instance_dir)]
    for i, im in enumerate(photos):
        im.save(out / "targets" / f"{i:02d}.png")

    look = judge.looks[cfg.concept]
    # the judge's ceiling: the share of target photos it reads as the concept, as rendered and as the VAE can
    # express them (every sample is a decoded latent), so a perfect learner scores at most the latter
    hits = target_hits(judge, pipe.vae, photos, look)
    ceiling = {"targets": sum(hits["rendered"]) / len(photos),
               "targets_vae_roundtrip": sum(hits["vae_roundtrip"]) / len(photos)}
    leaks = {}
    for side in ("before", "after"):  # mark the class-prompt samples that show the concept's pattern
        ims = [load_image(out / f"{side}_class" / f"{i:04d}.png") for i in range(min(cfg.n_class, 8))]
        leaks[side] = ["leaks the pattern" if leakage([r], look) else "no leak" for r in judge.read(ims)]
    b, a = before["entries"][0], after["entries"][0]
    res: dict[str, Any] = {"concept": cfg.concept, "description": names[cfg.concept]["description"],
                           "before": {k: b.get(k) for k in METRIC_KEYS}, "after": {k: a.get(k) for k in METRIC_KEYS},
                           "prompts": list(dict.fromkeys(entry.prompts)), "judge_ceiling": ceiling}
    timing = {"steps": steps, "train_s": train_s, "total_s": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps({**res, **timing}, indent=1) + "\n")
    res.update(before_verdicts=b.get("verdicts", []), after_verdicts=a.get("verdicts", []), leaks=leaks)
    _report(out, cfg, recipe, entry, len(photos), res, timing)
    log.info("before: %s  after: %s", res["before"], res["after"])
