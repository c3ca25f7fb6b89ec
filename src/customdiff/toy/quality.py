"""Measured quality of the shipped toy models: CLIP zero-shot recognition and base-model prompt following.

Run again with `python -m customdiff.toy.quality [--n 200]` (uses the shipped assets and probe).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .probe import Probe, predict
from .world import COLOURS, SETTINGS, SHAPES, Scene, caption, render, sample_scene

log = logging.getLogger(__name__)
HELD_OUT_SEED = 20231  # never used for training data (those use seeds 0..9)


def held_out(n: int, n_objects: int, seed: int = HELD_OUT_SEED) -> tuple[list, list[str], list[Scene]]:
    """n fresh scenes with a fixed number of objects: PIL images, captions, scenes."""
    rng = np.random.default_rng(seed + n_objects)
    scenes = [sample_scene(rng, n_objects=n_objects) for _ in range(n)]
    return [render(s) for s in scenes], [caption(s) for s in scenes], scenes


def _features(out) -> torch.Tensor:
    # transformers may return a tensor or a model output holding the projected features
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_zero_shot(model, processor, images: list, scenes: list[Scene]) -> dict[str, float]:
    """Classify colour x shape of the main object by CLIP similarity to prompt-ensembled class texts."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    text_feats = []
    for c, s in combos:  # ensemble over the background phrases, as CLIP's zero-shot recipe does
        art = "an" if c[0] in "aeiou" else "a"
        texts = [f"photo of {art} {c} {s}{phrase}" for phrase in SETTINGS.values()]
        tok = processor.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        f = _features(model.get_text_features(**tok))
        text_feats.append(torch.nn.functional.normalize(f, dim=-1).mean(0))
    t = torch.nn.functional.normalize(torch.stack(text_feats), dim=-1)  # (36, D)
    px = processor.image_processor(images=images, return_tensors="pt").pixel_values
    im = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=px)), dim=-1)
    best = (im @ t.T).argmax(1).tolist()
    shape_ok = [combos[b][1] == sc.objects[0].shape for b, sc in zip(best, scenes, strict=True)]
    colour_ok = [combos[b][0] == sc.objects[0].colour for b, sc in zip(best, scenes, strict=True)]
    return {"shape": float(np.mean(shape_ok)), "colour": float(np.mean(colour_ok)),
            "both": float(np.mean(np.array(shape_ok) & np.array(colour_ok))), "n": len(scenes)}


def images_to_tensor(images: list | np.ndarray) -> torch.Tensor:
    """PIL images or float arrays in [0, 1] -> (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, np.float32) / 255.0 if not isinstance(im, np.ndarray) else im for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() * 2 - 1


def probe_accuracy(probe: Probe, x: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Fraction of images whose named shapes (colours) are exactly the probe's top-ranked ones."""
    shapes, colours = predict(probe, x, k=2)  # ranked lists; compare the top |named set|
    want_s = [{o.shape for o in sc.objects} for sc in scenes]
    want_c = [{o.colour for o in sc.objects} for sc in scenes]
    s_ok = np.array([set(p[:len(w)]) == w for p, w in zip(shapes, want_s, strict=True)])
    c_ok = np.array([set(p[:len(w)]) == w for p, w in zip(colours, want_c, strict=True)])
    return {"shape": float(s_ok.mean()), "colour": float(c_ok.mean()), "both": float((s_ok & c_ok).mean()),
            "n": len(scenes)}


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 25, guidance: float = 5.0, seed: int = 0,
             batch: int = 50) -> np.ndarray:
    """Generate one image per prompt: float (N, H, W, 3) in [0, 1]."""
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator("cpu").manual_seed(seed + i)
        res = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                   output_type="np")
        out.append(res.images)
    return np.concatenate(out)


def load_probe(path: str | Path) -> Probe:
    """Load the evaluation probe from a safetensors file."""
    from safetensors.torch import load_file

    probe = Probe()
    probe.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return probe.eval()


def evaluate(base: str | Path, clip: str | Path, probe_path: str | Path, n: int = 200,
             samples_png: str | Path | None = None, guidance: float = 5.0, steps: int = 25) -> dict:
    """All quality numbers on held-out scenes; optionally save a grid of generated samples."""
    from .export import load_clip, load_pipeline

    probe = load_probe(probe_path)
    model, proc = load_clip(clip)
    pipe = load_pipeline(base)
    res: dict = {"sampler": {"scheduler": type(pipe.scheduler).__name__, "steps": steps, "guidance": guidance}}
    for k in (1, 2):
        imgs, caps, scenes = held_out(n, k)
        res[f"clip_zero_shot_real_{k}obj"] = clip_zero_shot(model, proc, imgs, scenes)
        res[f"probe_real_{k}obj"] = probe_accuracy(probe, images_to_tensor(imgs), scenes)
        gen = generate(pipe, caps, steps=steps, guidance=guidance)
        res[f"base_prompt_following_{k}obj"] = probe_accuracy(probe, images_to_tensor(gen), scenes)
        # second opinion: the toy CLIP's zero-shot reading of the main (first-named) object
        gen_pil = [Image.fromarray((g * 255).round().astype(np.uint8)) for g in gen]
        res[f"base_prompt_following_clip_main_{k}obj"] = clip_zero_shot(model, proc, gen_pil, scenes)
        log.info("%d object(s): %s", k, {key: v for key, v in res.items() if key.endswith(f"{k}obj")})
        if samples_png is not None:
            tiles = (gen[:64] * 255).round().astype(np.uint8)
            rows = [np.concatenate(list(tiles[r:r + 8]), 1) for r in range(0, len(tiles) - 7, 8)] or [
                np.concatenate(list(tiles), 1)]
            Image.fromarray(np.concatenate(rows, 0)).save(Path(samples_png).with_suffix(f".{k}obj.png"))
            Path(samples_png).with_suffix(f".{k}obj.txt").write_text("\n".join(caps[:64]) + "\n")
    return res


def main() -> None:
    """CLI: re-run the evaluation on the shipped assets and print JSON."""
    from . import paths

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    a = paths()
    res = evaluate(a["base"], a["clip"], Path(a["base"]).parent / "probe.safetensors", args.n,
                   guidance=args.guidance, steps=args.steps)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
