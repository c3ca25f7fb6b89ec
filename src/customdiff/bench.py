"""`customdiff bench`: the paper's comparisons on the toy world, every method through the same trainer.

Single concepts: Custom Diffusion (K/V + token, with real regularization images and augmentation), its
ablations without regularization and without augmentation, DreamBooth-style (whole UNet + token) and
Textual Inversion (token only), each with its calibrated recipe (customdiff.toy.recipes). Concept pairs: joint
training, the closed-form merge of separately trained deltas (as the reference, and with `pad_weight=1`), and
simply loading the two deltas at once. Every run is evaluated by `customdiff.evaluate` with the toy world's
probe (concept/pair fidelity, context fidelity, class leakage) and the toy CLIP (text and image alignment, KID),
for every seed; the tables give the mean and the spread over seeds.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .eval_report import verdict_class

log = logging.getLogger(__name__)
METRICS = ("concept_fidelity", "pair_fidelity", "context_fidelity", "class_leakage", "text_alignment",
           "image_alignment", "kid_x1000")
SINGLE_METHODS = ("custom_diffusion", "cd_no_reg", "cd_no_aug", "dreambooth", "textual_inversion")
PAIR_METHODS = ("joint", "merge", "merge_pad", "two_deltas")


@dataclass
class BenchConfig:
    """Sizes of a bench run; `quick()` fits about 10 minutes on 2 CPU cores."""

    concepts: list[str] = field(default_factory=list)  # empty = all toy concepts
    pairs: int = 3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(SINGLE_METHODS))
    steps: int | None = None  # None: each recipe's own
    n: int = 2  # images per prompt
    prompts: int = 0  # 0 = all prompts of each entry
    n_class: int = 24  # class-prompt samples (class leakage, KID)
    sample_steps: int = 20
    guidance: float = 5.0

    def validate(self) -> None:
        """Concept names, pair count, steps and seeds against the toy world, before any slow work."""
        from .dataset import read_dataset
        from .toy import paths
        from .validate import SEED_MAX, check_number

        root = Path(paths()["concepts"])
        names = json.loads((root / "concepts.json").read_text())
        unknown = [c for c in self.concepts if c not in names]
        if unknown:
            raise UserError(f"--concepts {' '.join(unknown)}: not a toy concept; choose from {', '.join(names)}")
        available = len(read_dataset(root / "dataset_multiconcept.json"))
        check_number("--pairs", self.pairs, 0, available, why=f" (the toy world has {available} concept pairs)")
        check_number("--steps", self.steps, 1, 100_000)  # None passes: each recipe's own
        for seed in self.seeds:
            check_number("--seeds", seed, 0, SEED_MAX)
        for flag, values in (("--concepts", self.concepts), ("--seeds", self.seeds), ("--methods", self.methods)):
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:  # it would run twice and count twice in the means
                raise UserError(f"{flag}: {twice} is given twice; give each once")

    @classmethod
    def quick(cls) -> BenchConfig:
        """One concept and one pair, one seed, fewer samples."""
        return cls(concepts=["checker_square"], pairs=1, seeds=[0], prompts=8, n_class=16, sample_steps=15)


def _name(entry: Any) -> str:
    return "+".join(c.instance_dir.name for c in entry.concepts)


class Runner:
    """Trains and evaluates one run at a time into a work folder."""

    def __init__(self, cfg: BenchConfig, work: Path):
        from .dataset import read_dataset
        from .features import ClipFeatures
        from .toy import paths
        from .toy.fidelity import Judge

        self.cfg, self.work = cfg, work
        toy = paths()
        root = Path(toy["concepts"])
        self.singles = read_dataset(root / "dataset.json", cfg.concepts or None)
        self.pairs = read_dataset(root / "dataset_multiconcept.json")[:cfg.pairs]
        self.clip, self.judge = ClipFeatures(toy["clip"]), Judge.toy()
        self.rows: list[dict[str, Any]] = []

    def train(self, recipe_name: str, entry: Any, seed: int, out: Path, steps_factor: int = 1,
              concepts: list | None = None, **overrides: Any) -> dict[str, Any]:
        """Train one run of a recipe (`overrides`: other TrainConfig values, e.g. a learning rate to sweep);
        size and time of its delta."""
        from .config import TrainConfig
        from .delta import load_delta
        from .toy.recipes import RECIPES, concept_spec
        from .train import train

        r = RECIPES[recipe_name]
        concepts = concepts if concepts is not None else list(enumerate(entry.concepts))
        specs = [concept_spec(c, f"<new{i + 1}>", r.reg) for i, c in concepts]
        out.parent.mkdir(parents=True, exist_ok=True)  # the bench's own folder: no "created" warning per run
        t0 = time.perf_counter()
        steps = (overrides.pop("steps", None) or self.cfg.steps or r.steps) * steps_factor
        train(TrainConfig(**r.train_kwargs(out=str(out), steps=steps, seed=seed, **overrides)), specs, progress=False)
        d = load_delta(out)
        return {"train_s": time.perf_counter() - t0, "delta_mb": out.stat().st_size / 2**20,
                "trainable": sum(v.numel() for v in d.weights.values()) + sum(v.numel() for v in d.tokens.values())}

    def evaluate(self, entry: Any, deltas: list[Path], seed: int, images_out: Path | None = None,
                 images_in: Path | None = None) -> dict[str, Any]:
        """Score an entry (probe and CLIP measures): sampled with the deltas applied, or, with `images_in`, its
        saved samples read back (no pipeline)."""
        from .base import load_pipeline
        from .config import EvalConfig
        from .delta import apply_deltas, load_delta
        from .evaluate import evaluate

        cfg = self.cfg
        pipe = None
        if images_in is None:
            pipe = load_pipeline("toy")
            apply_deltas(pipe, [load_delta(p) for p in deltas], [str(p) for p in deltas])
            if cfg.prompts:
                entry = type(entry)(entry.name, entry.concepts, entry.prompts[:cfg.prompts], entry.index)
        ecfg = EvalConfig(n=cfg.n, steps=cfg.sample_steps, guidance=cfg.guidance, seed=seed, n_class=cfg.n_class,
                          class_template="photo of a {}", kid_subsets=50, kid_subset_size=cfg.n_class)
        r = evaluate(pipe, [entry], self.clip, ecfg, images_out=images_out, images_in=images_in, judge=self.judge)
        return {**{k: r["entries"][0].get(k) for k in METRICS}, "verdicts": r["entries"][0].get("verdicts")}

    def record(self, method: str, entry: Any, seed: int, stats: dict, metrics: dict) -> None:
        """Keep one result row (and log it)."""
        self.rows.append({"method": method, "entry": _name(entry), "seed": seed, **stats, **metrics})
        log.info("%s %s seed %d: %s", method, _name(entry), seed,
                 {k: round(v, 4) for k, v in {**stats, **metrics}.items() if isinstance(v, float)})


def run_bench(cfg: BenchConfig, out: str | Path, progress: bool = True) -> Path:
    """Train and evaluate every method for every seed; write results.json, results.md and report.html."""
    from .outputs import check_out, staged

    cfg.validate()
    out = check_out(out, "bench", "results.json")  # before any slow work
    with staged(out, replace=True, last="results.json") as work:
        _run_all(cfg, work, progress)
    return out


def rescore_bench(folder: str | Path, progress: bool = True) -> Path:
    """Score a finished bench's saved samples again with the current judge and CLIP, without training or
    sampling (for instance after the toy world's probe changed); rewrites its results.json, results.md and
    report.html, keeping each run's training time and delta size."""
    from tqdm.auto import tqdm


    folder = Path(folder)
    src = folder / "results.json"
    if not src.is_file():
        raise UserError(f"{src}: not found; with --rescore, --out must be a folder written by `customdiff bench`")
    summary = json.loads(src.read_text())
    run = Runner(BenchConfig(**summary["config"]), folder)
    entries = {_name(e): e for e in (*run.singles, *run.pairs)}
    jobs = []
    for r in summary["rows"]:  # every run's samples must be there before any scoring
        images = folder / "images" / f"s{r['seed']}" / r["method"] / r["entry"]
        if r["entry"] not in entries or not (images / "prompts").is_dir():
            raise UserError(f"{images}: samples of this run are missing; rescore needs the folder of a finished "
                            "bench as it was written")
        jobs.append((r, entries[r["entry"]], images))
    for r, entry, images in tqdm(jobs, desc="rescore", disable=not progress):
        run.record(r["method"], entry, r["seed"], {k: r[k] for k in ("train_s", "delta_mb", "trainable")},
                   run.evaluate(entry, [], r["seed"], images_in=images))
    summary.update(rows=run.rows, means=summarize(run.rows), rescored=time.strftime("%Y-%m-%d %H:%M:%S"))
    _write_results(summary, folder)
    return folder


def _run_all(cfg: BenchConfig, work: Path, progress: bool) -> None:
    """Every run of the bench, with its results and report written into `work`."""
    from tqdm.auto import tqdm

    from .base import load_pipeline
    from .delta import load_delta, save_delta
    from .merge import merge_deltas, read_captions
    from .toy.recipes import DEMO_RECIPE

    run = Runner(cfg, work)
    total = len(cfg.seeds) * (len(run.singles) * len(cfg.methods) + len(run.pairs) * len(PAIR_METHODS))
    bar = tqdm(total=total, desc="bench", disable=not progress)
    t_start = time.perf_counter()
    for seed in cfg.seeds:
        # (concept, token) -> Custom Diffusion delta (the toy's tuned recipe, as the demo), reused by the pairs
        deltas: dict[tuple[str, str], Path] = {}
        for e in run.singles:
            name = _name(e)
            for m in cfg.methods:
                d = work / "deltas" / f"s{seed}" / f"{name}.{m}.safetensors"
                stats = run.train(m, e, seed, d)
                if m == DEMO_RECIPE:
                    deltas[(name, "<new1>")] = d
                run.record(m, e, seed, stats, run.evaluate(e, [d], seed, work / "images" / f"s{seed}" / m / name))
                bar.update(1)
        for e in run.pairs:
            tag, parts = _name(e), []
            for i, c in enumerate(e.concepts):
                tok = f"<new{i + 1}>"
                if (c.instance_dir.name, tok) not in deltas:
                    p = work / "deltas" / f"s{seed}" / f"{c.instance_dir.name}.{tok[1:-1]}.safetensors"
                    run.train(DEMO_RECIPE, e, seed, p, concepts=[(i, c)])
                    deltas[(c.instance_dir.name, tok)] = p
                parts.append(deltas[(c.instance_dir.name, tok)])
            joint = work / "deltas" / f"s{seed}" / f"{tag}.joint.safetensors"
            stats = run.train(DEMO_RECIPE, e, seed, joint, steps_factor=2)
            run.record("joint", e, seed, stats, run.evaluate(e, [joint], seed, work / "images" / f"s{seed}" / "joint" / tag))
            bar.update(1)
            for method, pad_weight in (("merge", 0.0), ("merge_pad", 1.0)):  # the reference's merge; with padding
                t0 = time.perf_counter()
                merged = merge_deltas([load_delta(p) for p in parts], load_pipeline("toy"), read_captions(),
                                      [str(p) for p in parts], pad_weight=pad_weight)
                mpath = work / "deltas" / f"s{seed}" / f"{tag}.{method}.safetensors"
                save_delta(merged, mpath)
                mstats = {"train_s": time.perf_counter() - t0, "delta_mb": mpath.stat().st_size / 2**20,
                          "trainable": sum(v.numel() for v in merged.weights.values())}
                run.record(method, e, seed, mstats,
                           run.evaluate(e, [mpath], seed, work / "images" / f"s{seed}" / method / tag))
                bar.update(1)
            two = {"train_s": 0.0, "delta_mb": sum(p.stat().st_size for p in parts) / 2**20, "trainable": 0}
            run.record("two_deltas", e, seed, two,
                       run.evaluate(e, parts, seed, work / "images" / f"s{seed}" / "two_deltas" / tag))
            bar.update(1)
    bar.close()
    summary = {"config": asdict(cfg), "rows": run.rows, "total_s": time.perf_counter() - t_start,
               "means": summarize(run.rows)}
    _write_results(summary, work)


def _write_results(summary: dict, folder: Path) -> None:
    """results.md, report.html and results.json (last: it marks a finished bench), each replaced atomically."""
    from .outputs import atomic_path

    for name, text in (("results.md", markdown(summary)), ("report.html", _html(summary, folder)),
                       ("results.json", json.dumps(summary, indent=1, default=str))):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text)


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: each metric averaged over entries within a seed, then mean and std over seeds."""
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == m]
        seeds = sorted({r["seed"] for r in sel})
        res: dict[str, Any] = {"method": m, "entries": len({r["entry"] for r in sel}), "seeds": len(seeds)}
        for k in (*METRICS, "train_s", "delta_mb", "trainable"):
            per_seed = []
            for s in seeds:
                vals = [r[k] for r in sel if r["seed"] == s and r.get(k) is not None]
                if vals:
                    per_seed.append(float(np.mean(vals)))
            res[k] = float(np.mean(per_seed)) if per_seed else None
            res[f"{k}_std"] = float(np.std(per_seed)) if len(per_seed) > 1 else None
        out.append(res)
    return out


def cell(m: dict, k: str) -> str:
    """One table cell of a summarized method: mean ± std over seeds (KID with 1 decimal, the rest 3)."""
    digits = 1 if k == "kid_x1000" else 3
    if m.get(k) is None:
        return "n/a"
    std = m.get(f"{k}_std")
    return f"{m[k]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _tables(summary: dict) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]:
    """The two tables of every report, as (head, rows) of cell strings: per-method means (± std over seeds),
    then every run."""
    names = [c.replace("_", " ") for c in METRICS]
    means = (["method", "entries", "seeds", *names, "trainable params", "delta MB", "train s"],
             [[m["method"], str(m["entries"]), str(m["seeds"]), *(cell(m, c) for c in METRICS),
               f"{m['trainable']:.0f}", f"{m['delta_mb']:.3f}", f"{m['train_s']:.0f}"] for m in summary["means"]])
    runs = (["method", "entry", "seed", *names],
            [[r["method"], r["entry"], str(r["seed"]),
              *("n/a" if r.get(c) is None else f"{r[c]:.3f}" for c in METRICS)] for r in summary["rows"]])
    return means, runs


def _md_table(head: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    align = ["---"] * text_columns + ["---:"] * (len(head) - text_columns)
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(summary: dict) -> str:
    """Markdown tables: per-method means (± std over seeds), then every run."""
    means, runs = _tables(summary)
    return "\n".join(["## Means per method (± std over seeds)", "", *_md_table(*means), "", "## Every run", "",
                      *_md_table(*runs, text_columns=2)]) + "\n"


def _table(head: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _targets(entry: str) -> str:
    """The entry's target photos inline (they live in the toy assets, outside the bench folder)."""
    from .toy import paths

    imgs = []
    for name in entry.split("+"):
        folder = Path(paths()["concepts"]) / "instances" / name
        for f in sorted(folder.glob("*.png"))[:8]:
            imgs.append(f"<img class='t' title='{html.escape(name)}' "
                        f"src='data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}'>")
    return "".join(imgs)


def _samples(row: dict, work: Path) -> str:
    """One run's first sample of each prompt, framed by the probe's verdict (hover: prompt and reading)."""
    folder = work / "images" / f"s{row['seed']}" / row["method"] / row["entry"] / "prompts"
    index = next(folder.glob("*/prompts.json"), None) if folder.is_dir() else None
    if index is None:
        return "(no samples)"
    labels = row.get("verdicts") or []
    cells, seen = [], set()
    for i, item in enumerate(json.loads(index.read_text())):
        if item["prompt"] in seen:
            continue
        seen.add(item["prompt"])
        lab = labels[i] if i < len(labels) else ""
        src = html.escape(str((index.parent / item["file"]).relative_to(work)))
        cells.append(f"<img class='s {verdict_class(lab)}' src='{src}' "
                     f"title='{html.escape(item['prompt'] + (' | ' + lab if lab else ''))}'>")
    return "".join(cells)


def _html(summary: dict, work: Path) -> str:
    """report.html: the tables, then per entry its target photos and each method's samples of the first seed."""
    css = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}"
           "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}"
           "table{border-collapse:collapse;margin:.5em 0}img{image-rendering:pixelated}"
           "img.t{width:64px;height:64px;margin:1px}img.s{width:64px;height:64px;margin:1px;border:3px solid #ccc}"
           "img.good{border-color:#2a2}img.half{border-color:#e90}img.bad{border-color:#d22}")
    means, runs = (_table(*tab) for tab in _tables(summary))
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>customdiff bench</title>",
             f"<style>{css}</style></head><body><h1>customdiff bench (toy world)</h1>",
             "<h2>Means per method (± std over seeds)</h2>", means,
             "<p>Concept fidelity: share of the held-out prompts' samples in which the toy probe reads the "
             "concept's shape, colours and pattern; pair fidelity: both concepts in one image; context fidelity: "
             "the prompted setting and other objects drawn; class leakage: class-prompt samples showing the "
             "concept's pattern (docs/EVAL.md).</p>",
             f"<details><summary>Every run ({len(summary['rows'])})</summary>{runs}</details>"]
    first = summary["rows"][0]["seed"] if summary["rows"] else 0
    parts.append(f"<h2>Samples (seed {first}): the first image of each held-out prompt</h2><p>Frames: green = "
                 "concept and context right, orange = concept right, context wrong, red = concept not drawn; "
                 "hover for the prompt and the probe's reading.</p>")
    for entry in dict.fromkeys(r["entry"] for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["entry"] == entry and r["seed"] == first]
        parts.append(f"<h3>{html.escape(entry)}</h3><div>{_targets(entry)}</div>")
        parts.append("<table>" + "".join(f"<tr><td>{html.escape(r['method'])}</td><td>{_samples(r, work)}</td></tr>"
                                         for r in rows) + "</table>")
    parts.append("</body></html>")
    return "".join(parts)
