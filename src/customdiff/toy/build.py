"""Rebuild every shipped toy asset from scratch: `python -m customdiff.toy.build [--out DIR] [--quick]`.

Stages (each checkpointed under the work dir; a rerun skips finished stages and resumes training):
data -> vae -> clip -> unet+text -> probe -> concepts -> export (fp16 assets) -> quality.
The base's text encoder starts from the CLIP's text tower, so the unet stage waits for clip; the probe learns
from its own draw of the world (every combination, the personal ones included) and from the VAE's round trips
of those images, so it waits for vae. A full build on two cores runs in two lanes (`--lanes 2`, the
default): data, vae and clip at 1 thread in this process while a second process trains the probe at 1 thread;
then the unet stage at `--threads`, and the rest once the probe lane has finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import ASSETS

log = logging.getLogger("customdiff.toy.build")
STAGES = ("data", "vae", "clip", "unet", "probe", "concepts", "export", "quality")


@dataclass
class BuildConfig:
    """Sizes of the build; `quick` shrinks everything to check the stages end to end."""

    n_images: int = 40000
    vae_steps: int = 600
    unet_steps: int = 16000
    unet_lr: float = 1e-3  # peak of the UNet stage's cosine schedule
    unet_batch: int = 32
    pattern_weight: float = 3.0  # UNet stage: sampling weight of images whose caption names a pattern (1: uniform)
    clip_steps: int = 4000
    probe_steps: int = 6000
    n_class_images: int = 200
    n_eval: int = 200
    n_per_pattern: int = 24  # captions per pattern in the quality stage's balanced pattern test

    @classmethod
    def quick(cls) -> BuildConfig:
        """A few steps per stage."""
        return cls(n_images=600, vae_steps=10, unet_steps=10, clip_steps=10, probe_steps=10, n_class_images=4,
                   n_eval=10, n_per_pattern=2)


class Builder:
    """Runs the stages in order; each stage's wall time goes into its done-marker, its notes into notes/."""

    def __init__(self, out: Path, work: Path, cfg: BuildConfig):
        self.out, self.work, self.cfg = out, work, cfg
        self.t_start = time.time()
        (work / "notes").mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        from .tokenizer import make_tokenizer

        self.tok_dir = work / "tokenizer"
        self.tokenizer = make_tokenizer(self.tok_dir)

    def stage(self, name: str, fn) -> None:
        """Run fn unless its done-marker exists."""
        marker = self.work / f"{name}.done"
        if marker.exists():
            log.info("stage %s: already done", name)
            return
        log.info("stage %s: start", name)
        t0 = time.time()
        fn()
        marker.write_text(f"{time.time() - t0:.1f}\n")  # seconds of this (last) run of the stage
        log.info("stage %s: done in %.0f s", name, time.time() - t0)

    # -------------------------------------------------------------------------------------- stages
    def data(self) -> None:
        from .probe import scene_targets
        from .train_clip import clip_targets
        from .world import sample_dataset

        images, captions, scenes = sample_dataset(self.cfg.n_images, seed=0)
        clip_y, named = clip_targets(scenes)
        np.savez_compressed(self.work / "world.npz", images=images, targets=scene_targets(scenes), clip_y=clip_y,
                            clip_named=named)
        (self.work / "captions.json").write_text(json.dumps(captions))
        # the judge's own draw of the world: every combination, the personal ones included (the base never sees
        # them; a probe that never saw them misreads them, e.g. ringed_star's photos as a red star)
        images, _, scenes = sample_dataset(self.cfg.n_images, seed=5, held_out=())
        np.savez_compressed(self.work / "judge.npz", images=images, targets=scene_targets(scenes))

    def _world(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        d = np.load(self.work / "world.npz")
        return d["images"], d["targets"], json.loads((self.work / "captions.json").read_text())

    def vae(self) -> None:
        from .train_base import encode_all, train_vae

        images, _, _ = self._world()
        vae, losses = train_vae(images, self.work / "vae.pt", self.cfg.vae_steps)
        mean, scaling = encode_all(vae, images)
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(self.work / "vae_final")
        torch.save({"mean": mean.half(), "scaling": float(scaling)}, self.work / "latents.pt")
        self._note("vae", {"final_loss": float(np.mean(losses[-100:])), "scaling_factor": scaling})

    def unet(self) -> None:
        from transformers import CLIPModel

        from .models import text_encoder_from_clip
        from .train_base import tokenize, train_unet_text

        self.wait_for("vae")
        self.wait_for("clip")
        _, _, captions = self._world()
        lat = torch.load(self.work / "latents.pt", weights_only=True)
        ids = tokenize(self.tokenizer, captions)
        empty = tokenize(self.tokenizer, [""])[0]
        te = text_encoder_from_clip(CLIPModel.from_pretrained(self.work / "clip_final"))
        weights = None
        if self.cfg.pattern_weight != 1.0:
            from .world import names_pattern

            named = np.array([names_pattern(c) for c in captions])
            weights = np.where(named, self.cfg.pattern_weight, 1.0)
            weights /= weights.sum()
            log.info("unet: captions naming a pattern drawn with weight %g: %.1f%% of the images seen (uniform: "
                     "%.1f%%)", self.cfg.pattern_weight, 100 * weights[named].sum(), 100 * named.mean())
        unet, te, losses = train_unet_text(lat["mean"].float(), lat["scaling"], ids, empty, te,
                                           self.work / "unet.pt", self.cfg.unet_steps, batch=self.cfg.unet_batch,
                                           lr=self.cfg.unet_lr, sample_p=weights)
        unet.save_pretrained(self.work / "unet_final")
        te.save_pretrained(self.work / "te_final")
        self._note("unet+text", {"final_loss": float(np.mean(losses[-100:])), "first_loss": losses[0]})

    def clip(self) -> None:
        from .train_base import tokenize
        from .train_clip import train_clip

        images, _, captions = self._world()
        d = np.load(self.work / "world.npz")
        ids = tokenize(self.tokenizer, captions)
        caption_ids = np.unique(np.array(captions), return_inverse=True)[1]
        model, losses = train_clip(images, ids, caption_ids, d["clip_y"], d["clip_named"], self.tokenizer,
                                   self.work / "clip.pt", self.cfg.clip_steps)
        model.save_pretrained(self.work / "clip_final")
        self._note("clip", {"final_loss": float(np.mean(losses[-100:])), "first_loss": losses[0]})

    def probe(self) -> None:
        from diffusers import AutoencoderKL

        from ..delta import atomic_save
        from .probe import train_probe
        from .train_base import roundtrip_all

        self.wait_for("vae")
        d = np.load(self.work / "judge.npz")
        cache = self.work / "judge_roundtrip.npy"  # a resumed stage skips the round trips (minutes)
        if not cache.exists():
            vae = AutoencoderKL.from_pretrained(self.work / "vae_final").eval()
            np.save(cache.with_suffix(".tmp.npy"), roundtrip_all(vae, d["images"]))
            cache.with_suffix(".tmp.npy").replace(cache)
        probe, losses = train_probe(d["images"], d["targets"], self.work / "probe.pt", self.cfg.probe_steps,
                                    decoded=np.load(cache))
        atomic_save({k: v.half().contiguous() for k, v in probe.state_dict().items()}, {},
                    self.out / "probe.safetensors")
        self._note("probe", {"final_loss": float(np.mean(losses[-100:]))})

    def concepts(self) -> None:
        from .concepts import write_concepts

        write_concepts(self.out / "concepts", n_class_images=self.cfg.n_class_images)

    def export(self) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPModel, CLIPTextModel

        from .export import folder_mb, load_clip, load_pipeline, save_clip, save_pipeline
        from .models import make_image_processor
        from .tokenizer import make_tokenizer

        vae = AutoencoderKL.from_pretrained(self.work / "vae_final")
        unet = UNet2DConditionModel.from_pretrained(self.work / "unet_final")
        te = CLIPTextModel.from_pretrained(self.work / "te_final")
        # a fresh tokenizer: one used for batch tokenizing carries padding/truncation state into tokenizer.json
        tokenizer = make_tokenizer(self.tok_dir)
        save_pipeline(vae, unet, te, tokenizer, self.out / "base", self.tok_dir)
        clip = CLIPModel.from_pretrained(self.work / "clip_final")
        save_clip(clip, tokenizer, make_image_processor(), self.out / "clip", self.tok_dir)
        # the shipped files must load back in float32 with the real tokenizer and generate
        pipe = load_pipeline(self.out / "base")
        assert next(pipe.unet.parameters()).dtype == torch.float32
        img = pipe("photo of a red circle", num_inference_steps=4, output_type="np").images
        assert img.shape == (1, 32, 32, 3), img.shape
        load_clip(self.out / "clip")
        self._note("assets_mb", {"base": folder_mb(self.out / "base"), "clip": folder_mb(self.out / "clip"),
                                 "concepts": folder_mb(self.out / "concepts")})

    def quality(self) -> None:
        from .quality import evaluate

        res = evaluate(self.out / "base", self.out / "clip", self.out / "probe.safetensors", self.cfg.n_eval,
                       samples_png=self.work / "samples.png", per_pattern=self.cfg.n_per_pattern)
        self._note("quality", res)

    # -------------------------------------------------------------------------------------- notes
    def _note(self, key: str, value) -> None:
        # one file per note: stages running in two processes never write the same file
        (self.work / "notes" / f"{key}.json").write_text(json.dumps(value, indent=2))

    def redo(self, first: str) -> None:
        """Forget that `first` and every later stage finished (training resumes from its checkpoint)."""
        for name in STAGES[STAGES.index(first):]:
            (self.work / f"{name}.done").unlink(missing_ok=True)
        if STAGES.index(first) <= STAGES.index("vae"):  # new images or a new VAE: new round trips
            (self.work / "judge_roundtrip.npy").unlink(missing_ok=True)

    def wait_for(self, stage: str, timeout_s: float = 600.0) -> None:
        """Wait for a parallel build process to finish `stage`; a clear error if none does in time.

        The time limit restarts whenever that stage's checkpoint changes (a long training stage in progress).
        """
        marker = self.work / f"{stage}.done"
        if marker.exists():
            return
        log.info("waiting for the %s stage (run by another build process)", stage)
        ckpt = self.work / f"{stage}.pt"
        seen, t0 = None, time.time()
        while not marker.exists():
            stamp = ckpt.stat().st_mtime if ckpt.exists() else None
            if stamp != seen:
                seen, t0 = stamp, time.time()
            if time.time() - t0 > timeout_s:
                raise SystemExit(f"{self.work}: the {stage} stage has not run; start a build whose --stages "
                                 f"include {stage} (see --help)")
            time.sleep(5)

    def run(self, stages: tuple[str, ...] = STAGES) -> None:
        """The given stages (all by default); after the last one, a build report next to the assets."""
        if "data" not in stages:
            self.wait_for("data")
        for name in stages:
            self.stage(name, getattr(self, name))
        if not all((self.work / f"{n}.done").exists() for n in STAGES):
            return
        notes = {p.stem: json.loads(p.read_text()) for p in sorted((self.work / "notes").glob("*.json"))}
        times = {n: float((self.work / f"{n}.done").read_text()) for n in STAGES}
        # the wall time of this invocation only: a resumed build's earlier runs are not in it
        report = {"config": asdict(self.cfg), "stage_seconds": times,
                  "run_wall_seconds": round(time.time() - self.t_start, 1), **notes}
        (self.out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        log.info("build finished: %s", json.dumps(report))


def run_two_lanes(builder: Builder, child_args: list[str], threads: int) -> None:
    """Every stage, with the probe in a second 1-thread process beside data, vae and clip (1 thread here).

    The UNet then trains at `threads`. Each stage runs at the thread count of a one-lane build with
    `--threads 1` except the UNet, so with `threads` 1 both builds should give the same files (the quick-build
    test checks the probe's).
    """
    lane_log = builder.work / "probe_lane.log"
    cmd = [sys.executable, "-m", "customdiff.toy.build", *child_args, "--stages", "probe", "--threads", "1",
           "--lanes", "1"]
    log.info("probe stage: second process, log in %s", lane_log)
    with open(lane_log, "w") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        torch.set_num_threads(1)
        builder.run(("data", "vae", "clip"))
        torch.set_num_threads(threads)
        builder.run(("unet",))
        if child.wait() != 0:
            raise SystemExit(f"the probe stage failed (exit {child.returncode}): see {lane_log}")
        builder.run(STAGES[STAGES.index("probe"):])
    finally:
        if child.poll() is None:
            child.terminate()


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write (default: the shipped one)")
    p.add_argument("--work", type=Path, default=None, help="checkpoint folder (default .toy_build[_quick])")
    p.add_argument("--quick", action="store_true", help="a few steps per stage, to check the pipeline")
    p.add_argument("--threads", type=int, default=2, help="threads of the unet stage (and of every stage with "
                   "--lanes 1)")
    p.add_argument("--lanes", type=int, choices=(1, 2), default=2,
                   help="a full build runs the probe in a second 1-thread process beside data, vae and clip "
                   "(default 2); 1: every stage in turn in this process")
    p.add_argument("--redo", choices=STAGES, help="rerun this stage and all later ones; with --set *_steps=N "
                   "a training stage continues from its checkpoint to the new step count")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages to run (default: all; see the module docstring for two cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=N",
                   help="override a BuildConfig setting, e.g. --set unet_steps=2000 or --set unet_lr=2e-3")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    work = args.work or Path(".toy_build_quick" if args.quick else ".toy_build")
    cfg = BuildConfig.quick() if args.quick else BuildConfig()
    for item in args.set:
        key, value = item.split("=", 1)
        if not hasattr(cfg, key):
            p.error(f"unknown build setting {key!r}")
        try:
            setattr(cfg, key, type(getattr(cfg, key))(value))
        except ValueError:
            kind = "a whole number" if isinstance(getattr(cfg, key), int) else "a number"
            p.error(f"build setting {key!r} takes {kind}, not {value!r}")
    stages = tuple(args.stages.split(","))
    if unknown := set(stages) - set(STAGES):
        p.error(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    builder = Builder(args.out.resolve(), work.resolve(), cfg)
    if args.redo:
        builder.redo(args.redo)
    if args.lanes == 2 and stages == STAGES:
        child = ["--work", str(builder.work), "--out", str(builder.out), *(["--quick"] if args.quick else []),
                 *[a for item in args.set for a in ("--set", item)]]
        run_two_lanes(builder, child, args.threads)
    else:
        builder.run(stages)


if __name__ == "__main__":
    main()
