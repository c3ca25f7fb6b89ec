"""Reporting of evaluation results: metrics.json and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .outputs import METRICS_FILE, REPORT_FILE

PROBE_KEYS = ("concept_fidelity", "pair_fidelity", "context_fidelity", "class_leakage")


def verdict_class(label: str) -> str:
    """CSS class of a sample's frame from its probe label: good (concept and context right), half (concept
    right, context wrong), bad (concept not drawn, or the class prompt leaks it), '' when there is no verdict."""
    if not label:
        return ""
    if "leaks" in label or "concept ✗" in label:
        return "bad"
    return "half" if "context ✗" in label else ("" if label == "no leak" else "good")


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
    notes += [f"{k}: {s[k]}" for k in ("base", "pipeline", "deltas", "dataset") if s.get(k) is not None]
    if probe:
        notes.append("Fidelity, context and leakage are read by the toy world's probe (docs/EVAL.md).")
    return "\n".join(["# Evaluation", "", *lines, "", *(f"- {x}" for x in notes), "",
                      "Text alignment: mean CLIP cosine of each image with its prompt without modifier tokens "
                      "(CLIPScore = 2.5 * max(cos, 0)); image alignment: mean CLIP cosine with the concept photos; "
                      "KID x1000 on CLIP features (see docs/EVAL.md).", ""])


def write_results(result: dict[str, Any], staging: Path) -> None:
    """Write metrics.json and metrics.md into the staging folder."""
    (staging / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (staging / REPORT_FILE).write_text(markdown_report(result))
