"""How far apart two training runs' deltas are: the first rows of a realscale JSON-lines file with two labels.

    python benchmarks/compare_deltas.py benchmarks/results-gpu.jsonl graphs eager

Prints the relative L2 distance and the cosine similarity of the weight changes and of the new token rows."""

from __future__ import annotations

import argparse
import json

import torch

from customdiff.delta import load_delta


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Relative L2 distance of `a` from `b`, and their cosine similarity, over all tensors together."""
    x = torch.cat([a[k].double().flatten() for k in sorted(b)])
    y = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return float((x - y).norm() / y.norm()), float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def main() -> None:
    """Compare the deltas of the first row labelled A and the first labelled B."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args()
    rows = [json.loads(x) for x in open(args.jsonl) if x.strip()]
    first = {}
    for r in rows:
        first.setdefault(r.get("label"), r)
    da, db = (load_delta(first[label]["delta"]) for label in (args.a, args.b))
    rel, cos = distance(da.weights, db.weights)
    trel, tcos = distance(da.tokens, db.tokens)
    print(json.dumps({"compare": [args.a, args.b], "weights_relative_l2": rel, "weights_cosine": cos,
                      "tokens_relative_l2": trel, "tokens_cosine": tcos}))


if __name__ == "__main__":
    main()
