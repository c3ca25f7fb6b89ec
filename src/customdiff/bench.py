"""`customdiff bench`: the paper's comparisons on the toy world, every method through the same trainer.

Single concepts: Custom Diffusion (K/V + token, with real regularization images and augmentation), its
ablations without regularization and without augmentation, DreamBooth-style (whole UNet + token) and
Textual Inversion (token only). Concept pairs: joint training, the closed-form merge of separately trained
deltas (as the reference, and with `pad_weight=1`), and simply loading the two deltas at once. Each is evaluated with the toy CLIP (text alignment,
image alignment) and KID x1000 of class-prompt samples against real class images.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Method:
    """A single-concept training recipe."""

    name: str
    train: str = "crossattn_kv"
    reg: bool = True
    augment: bool = True
    lr_factor: float = 1.0  # times the Custom Diffusion learning rate


METHODS = (
    Method("custom_diffusion"),
    Method("cd_no_reg", reg=False),
    Method("cd_no_aug", augment=False),
    Method("dreambooth", train="unet", lr_factor=0.3),
    Method("textual_inversion", train="tokens", lr_factor=10.0),
)


@dataclass
class BenchConfig:
    """Sizes of a bench run; `quick()` fits 15 minutes on 2 CPU cores."""

    concepts: list[str] = field(default_factory=lambda: [])  # empty = all toy concepts
    pairs: int = 3
    steps: int = 250
    batch_size: int = 8
    learning_rate: float = 3e-5  # per image; the toy needs 3x SD's 1e-5 (measured in demo.py)
    n: int = 2  # images per prompt
    prompts: int = 0  # 0 = all prompts of each entry
    n_class: int = 30  # class-prompt samples for KID
    sample_steps: int = 20
    guidance: float = 5.0
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchConfig:
        """One concept and one pair, fewer samples."""
        return cls(concepts=["checker_square"], pairs=1, steps=150, n=2, prompts=6, n_class=20, sample_steps=15)


def _entry_dirs(entry: Any) -> list[str]:
    return [c.instance_dir.name for c in entry.concepts]


def _spec(concept: Any, token: str, reg: bool) -> Any:
    from .data import ConceptSpec

    cls = concept.class_prompt
    return ConceptSpec(str(concept.instance_dir), f"photo of a {token} {cls}", f"photo of a {cls}",
                       reg_dir=str(concept.class_dir) if reg and concept.class_dir else None)


def _train(cfg: BenchConfig, specs: list, out: Path, method: Method, steps: int) -> dict[str, Any]:
    from .config import TrainConfig
    from .delta import load_delta
    from .train import train

    t0 = time.perf_counter()
    train(TrainConfig(base="toy", out=str(out), train=method.train, steps=steps, batch_size=cfg.batch_size,
                      learning_rate=cfg.learning_rate * method.lr_factor, augment=method.augment,
                      num_class_images=0, seed=cfg.seed), specs, progress=False)
    d = load_delta(out)
    return {"train_s": time.perf_counter() - t0, "delta_mb": out.stat().st_size / 2**20,
            "trainable": sum(v.numel() for v in d.weights.values()) + sum(v.numel() for v in d.tokens.values())}


def _evaluate(cfg: BenchConfig, entry: Any, deltas: list[Path], clip: Any, images_out: Path) -> dict[str, Any]:
    from .base import load_pipeline
    from .delta import apply_deltas, load_delta
    from .evaluate import evaluate

    pipe = load_pipeline("toy")
    apply_deltas(pipe, [load_delta(p) for p in deltas], [str(p) for p in deltas])
    if cfg.prompts:
        entry = type(entry)(entry.name, entry.concepts, entry.prompts[:cfg.prompts], entry.index)
    r = evaluate(pipe, [entry], clip, n=cfg.n, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed,
                 n_class=cfg.n_class, class_template="photo of a {}", kid_subsets=50,
                 kid_subset_size=min(cfg.n_class, 50), images_out=images_out)
    e = r["entries"][0]
    return {k: e[k] for k in ("text_alignment", "clipscore", "image_alignment", "kid_x1000")}


def run_bench(cfg: BenchConfig, out: str | Path, progress: bool = True) -> Path:
    """Train and evaluate every method; write results.json, results.md and report.html into `out`."""
    from tqdm.auto import tqdm

    from .base import load_pipeline
    from .delta import load_delta, save_delta
    from .evaluate import read_dataset
    from .features import ClipFeatures
    from .merge import merge_deltas, read_captions
    from .toy import paths

    out = Path(out)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    toy = paths()
    root = Path(toy["concepts"])
    singles = read_dataset(root / "dataset.json")
    if cfg.concepts:
        singles = [e for e in singles if _entry_dirs(e)[0] in cfg.concepts]
    pairs = read_dataset(root / "dataset_multiconcept.json")[:cfg.pairs]
    clip = ClipFeatures(toy["clip"])
    rows: list[dict[str, Any]] = []
    total = len(singles) * len(METHODS) + len(pairs) * 4
    bar = tqdm(total=total, desc="bench", disable=not progress)
    t_start = time.perf_counter()
    deltas: dict[tuple[str, str], Path] = {}  # (concept, token) -> Custom Diffusion delta, reused by pairs

    def record(method: str, entry: Any, stats: dict, metrics: dict) -> None:
        rows.append({"method": method, "entry": entry.name, "concepts": _entry_dirs(entry), **stats, **metrics})
        log.info("%s %s: %s", method, entry.name, {k: round(v, 4) if isinstance(v, float) else v
                                                    for k, v in {**stats, **metrics}.items()})
        bar.update(1)

    for e in singles:
        name = _entry_dirs(e)[0]
        for m in METHODS:
            d = work / "deltas" / f"{name}.{m.name}.safetensors"
            stats = _train(cfg, [_spec(e.concepts[0], "<new1>", m.reg)], d, m, cfg.steps)
            if m.name == "custom_diffusion":
                deltas[(name, "<new1>")] = d
            record(m.name, e, stats, _evaluate(cfg, e, [d], clip, work / "images" / m.name / e.name))

    cd = METHODS[0]
    for e in pairs:
        names = _entry_dirs(e)
        parts = []
        for i, (c, nm) in enumerate(zip(e.concepts, names, strict=True)):
            tok = f"<new{i + 1}>"
            if (nm, tok) not in deltas:
                p = work / "deltas" / f"{nm}.{tok[1:-1]}.custom_diffusion.safetensors"
                _train(cfg, [_spec(c, tok, True)], p, cd, cfg.steps)
                deltas[(nm, tok)] = p
            parts.append(deltas[(nm, tok)])
        tag = "+".join(names)
        joint = work / "deltas" / f"{tag}.joint.safetensors"
        stats = _train(cfg, [_spec(c, f"<new{i + 1}>", True) for i, c in enumerate(e.concepts)], joint, cd,
                       2 * cfg.steps)
        record("joint", e, stats, _evaluate(cfg, e, [joint], clip, work / "images" / "joint" / e.name))
        for method, pad_weight in (("merge", 0.0), ("merge_pad", 1.0)):  # the reference's merge; with padding rows
            t0 = time.perf_counter()
            pipe = load_pipeline("toy")
            merged = merge_deltas([load_delta(p) for p in parts], pipe, read_captions(), [str(p) for p in parts],
                                  pad_weight=pad_weight)
            mpath = work / "deltas" / f"{tag}.{method}.safetensors"
            save_delta(merged, mpath)
            mstats = {"train_s": time.perf_counter() - t0, "delta_mb": mpath.stat().st_size / 2**20,
                      "trainable": sum(v.numel() for v in merged.weights.values())}
            record(method, e, mstats, _evaluate(cfg, e, [mpath], clip, work / "images" / method / e.name))
        two = {"train_s": 0.0, "delta_mb": sum(p.stat().st_size for p in parts) / 2**20, "trainable": 0}
        record("two_deltas", e, two, _evaluate(cfg, e, parts, clip, work / "images" / "two_deltas" / e.name))
    bar.close()
    summary = {"config": cfg.__dict__, "rows": rows, "total_s": time.perf_counter() - t_start,
               "means": _means(rows)}
    (work / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (work / "results.md").write_text(markdown(summary))
    (work / "report.html").write_text(_html(summary, work))
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return out


def _means(rows: list[dict]) -> list[dict]:
    keys = ("text_alignment", "image_alignment", "kid_x1000", "train_s", "delta_mb", "trainable")
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == m]
        mean = {k: sum(r[k] for r in sel if r[k] is not None) / max(1, sum(r[k] is not None for r in sel))
                for k in keys}
        out.append({"method": m, "entries": len(sel), **mean})
    return out


def markdown(summary: dict) -> str:
    """Markdown tables: per-method means, then every row."""
    head = ("| method | entries | text alignment | image alignment | KID x1000 | trainable params | delta MB "
            "| train s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = ["## Means per method", "", head]
    for m in summary["means"]:
        lines.append(f"| {m['method']} | {m['entries']} | {m['text_alignment']:.4f} | {m['image_alignment']:.4f} | "
                     f"{m['kid_x1000']:.2f} | {m['trainable']:.0f} | {m['delta_mb']:.3f} | {m['train_s']:.0f} |")
    lines += ["", "## Every run", "", head.replace("| entries |", "| entry |")]
    for r in summary["rows"]:
        kid = "n/a" if r["kid_x1000"] is None else f"{r['kid_x1000']:.2f}"
        lines.append(f"| {r['method']} | {r['entry']} | {r['text_alignment']:.4f} | {r['image_alignment']:.4f} | "
                     f"{kid} | {r['trainable']} | {r['delta_mb']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _html(summary: dict, work: Path) -> str:
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}td,th{border:1px solid #ccc;padding:3px 6px}"
           "table{border-collapse:collapse}img{image-rendering:pixelated;height:192px}")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>customdiff bench</title>",
             f"<style>{css}</style></head><body><h1>customdiff bench (toy world)</h1><pre>",
             html.escape(markdown(summary)), "</pre><h2>Sample grids</h2>"]
    for r in summary["rows"]:
        grid = work / "images" / r["method"] / r["entry"] / "prompts" / r["entry"] / "grid.png"
        rel = grid.relative_to(work) if grid.exists() else None
        parts.append(f"<h3>{html.escape(r['method'])}: {html.escape(r['entry'])}</h3>")
        parts.append(f"<img src='{html.escape(str(rel))}'>" if rel else "<p>(no grid)</p>")
    parts.append("</body></html>")
    return "".join(parts)
