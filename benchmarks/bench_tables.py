"""The tables of docs/benchmarks.md from one or more finished `customdiff bench` folders.

    python benchmarks/bench_tables.py A B [--json benchmarks/results/toy-bench-DATE.json]

A bench split over two processes (`--concepts ... --out A` beside `--concepts ... --out B`) writes two
results.json files; this joins their rows and prints, per method, each measure as the mean over entries within
a seed, then mean ± std over seeds (as `customdiff bench` does for one folder), and each entry's concept or
pair fidelity per seed. `--json` keeps every row and the folders' configs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from customdiff.bench import METRICS, cell, summarize


def read_rows(folders: list[Path]) -> tuple[list[dict], list[dict]]:
    """Every row and config of the folders' results.json; a clear error when one is missing or rows repeat."""
    rows, configs = [], []
    for f in folders:
        src = f / "results.json"
        if not src.is_file():
            raise SystemExit(f"{src}: not found; pass folders written by a finished `customdiff bench`")
        summary = json.loads(src.read_text())
        rows += summary["rows"]
        configs.append(summary["config"])
    keys = [(r["method"], r["entry"], r["seed"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit("the folders share runs (same method, entry and seed); pass each run once")
    return rows, configs


def tables(rows: list[dict]) -> str:
    """Markdown: means per method (± std over seeds), then per-entry fidelity (mean, then each seed)."""
    cols = [k for k in METRICS if any(r.get(k) is not None for r in rows)]
    out = ["| method | entries | seeds | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
           "|---|---:|---:|" + "---:|" * len(cols)]
    for m in summarize(rows):
        out.append(f"| {m['method']} | {m['entries']} | {m['seeds']} | " + " | ".join(cell(m, c) for c in cols) + " |")
    for key in ("concept_fidelity", "pair_fidelity"):
        sel = [r for r in rows if r.get(key) is not None]
        if not sel:
            continue
        entries = sorted({r["entry"] for r in sel})
        seeds = sorted({r["seed"] for r in sel})
        out += ["", f"{key.replace('_', ' ')} per entry: mean ({' / '.join(f'seed {s}' for s in seeds)})", "",
                "| method | " + " | ".join(entries) + " |", "|---|" + "---:|" * len(entries)]
        for m in dict.fromkeys(r["method"] for r in sel):
            cells = []
            for e in entries:
                vals = {r["seed"]: r[key] for r in sel if r["method"] == m and r["entry"] == e}
                if not vals:
                    cells.append("")
                    continue
                mean = sum(vals.values()) / len(vals)
                cells.append(f"{mean:.2f} (" + " / ".join(f"{vals[s]:.2f}" if s in vals else "-" for s in seeds) + ")")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    """Print the tables; with --json, also write the joined rows."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="folders written by `customdiff bench --out`")
    p.add_argument("--json", type=Path, default=None, help="write every row and the folders' configs here")
    args = p.parse_args()
    rows, configs = read_rows(args.folders)
    print(tables(rows), end="")
    if args.json:
        args.json.write_text(json.dumps({"configs": configs, "rows": rows, "means": summarize(rows)}, indent=1))


if __name__ == "__main__":
    main()
