"""How well the toy world's probe judges: the ceiling of concept fidelity, and accuracy on what generation yields.

    python benchmarks/judge_check.py [--probe FILE ...]

For each probe (default: the shipped one) it prints
- per personal concept, how many of its own target photos the probe reads as the concept (shape, colour,
  pattern and pattern colour all right), as rendered and after a VAE round trip: a perfect generator that only
  ever redrew the targets would score the round-trip share, so that is the judge's ceiling for the concept;
- on 200 held-out one- and two-object scenes, the probe's per-attribute accuracy on the renders and on their VAE
  round trips (every generated image is a decoded latent).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from customdiff.data import list_images
from customdiff.toy import paths
from customdiff.toy.export import load_pipeline
from customdiff.toy.fidelity import Judge, images_to_tensor
from customdiff.toy.probe import read
from customdiff.toy.quality import held_out, probe_accuracy, roundtrip, target_hits


def main() -> None:
    """Print one JSON object per probe."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", nargs="+", default=None, help="probe files (default: the shipped probe)")
    args = p.parse_args()
    torch.manual_seed(0)
    toy = paths()
    concepts = Path(toy["concepts"])
    vae = load_pipeline(toy["base"]).vae
    scenes = {k: held_out(200, k) for k in (1, 2)}
    for probe in args.probe or [str(Path(toy["base"]).parent / "probe.safetensors")]:
        judge = Judge(probe, concepts / "concepts.json")
        res: dict = {"probe": probe, "targets_read_as_concept": {}}
        for name, look in judge.looks.items():
            ims = [Image.open(f).convert("RGB") for f in list_images(concepts / "instances" / name, True)]
            hits = target_hits(judge, vae, ims, look)
            res["targets_read_as_concept"][name] = {k: f"{sum(v)}/{len(ims)}" for k, v in hits.items()}
        for k, (ims, _, sc) in scenes.items():
            with torch.no_grad():
                res[f"held_out_{k}obj_rendered"] = probe_accuracy(read(judge.probe, images_to_tensor(ims)), sc)
                res[f"held_out_{k}obj_vae_roundtrip"] = probe_accuracy(read(judge.probe, roundtrip(vae, ims)), sc)
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
