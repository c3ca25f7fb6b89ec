"""Real-scale architectures with random weights: SD 1.5, SD 2.1 and SDXL built from their configs (no download),
saved as diffusers folders that every customdiff command takes as --base, with their sizes, step times and the
whole `customdiff train` + `customdiff sample` run measured.

    python benchmarks/realscale.py --arch sdxl --out /tmp/sdxl-random            # build, save, print sizes
    python benchmarks/realscale.py --arch sdxl --steps 3 --resolution 256        # + training-step timings
    python benchmarks/realscale.py --arch sd15 --train-steps 250 --resolution 512 --batch-size 8 \
        --mixed-precision fp16 [--gradient-checkpointing] [--work /tmp/realscale]  # the training benchmark

The training benchmark builds (once, cached under --work) the pipeline and synthetic photo and class folders,
then runs `customdiff train` in a fresh child process (so peak memory is that run's alone) and prints: time to
first step, steps/s after it, whole-run time, peak memory (torch.cuda.max_memory_allocated on a GPU, peak RSS
on the CPU), the share of a step spent waiting for data, and the time of `customdiff sample` for 4 images at
50 steps; `--json FILE` appends the numbers as one JSON line (with vae_images, the images the VAE encoded, and
with `--phases` the seconds per step of the UNet's forward, the backward, the VAE, the text encoders and the
optimizer). `--arch tiny` is a small network of SD 1.5's shape with CLIP's vocabulary size, for smoke tests.
`--example SCRIPT` runs diffusers' examples/custom_diffusion/train_custom_diffusion.py on the same data and
settings instead (whole run, and peak GPU memory from nvidia-smi).

The images are noise (random weights); this measures sizes, memory and speed, never quality. Expected sizes:
UNet SD1.5 859.5M, SD2.1 865.9M, SDXL 2,567M parameters; attn2 K/V SD1.5 19,169,280 (16 layers), SD2.1
25,559,040, SDXL 340,787,200 (70 layers: 1.36 GB as a float32 delta, 0.68 GB in float16).
Tokenizer: the real 49,408-token CLIP BPE when open_clip_torch is installed (its bpe_simple_vocab_16e6.txt.gz is
read without importing it), else a byte-level vocabulary of the same size (prompts tokenise into characters).
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STARTED = time.perf_counter()  # before torch and diffusers load: a child's process_s counts their import

import numpy as np  # noqa: E402 (after STARTED, on purpose)
import torch  # noqa: E402

VOCAB = 49408
EXPECTED = {"sd15": (859_520_964, 19_169_280), "sd21": (865_910_724, 25_559_040), "sdxl": (2_567_463_684, 340_787_200)}
ARCHS = [*EXPECTED, "tiny"]
INSTANCE_PROMPT, CLASS_PROMPT = "photo of a <new1> dog", "photo of a dog"


def _byte_symbols() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path) -> bool:
    """vocab.json + merges.txt of CLIP's BPE (True), or of a byte-level stand-in of the same size (False)."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    spec = importlib.util.find_spec("open_clip")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec and spec.origin else None
    real = bool(bpe and bpe.is_file())
    if real:
        lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
        merges = lines
        vocab += ["".join(m.split()) for m in merges]
    else:  # filler symbols so the embedding has CLIP's 49,408 rows
        vocab += [f"<filler{i}>" for i in range(VOCAB - 2 - len(vocab))]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return real


def make_unet(arch: str) -> torch.nn.Module:
    """The UNet of `arch` with random weights (on the current default device: `meta` costs no memory)."""
    from diffusers import UNet2DConditionModel

    if arch == "sdxl":
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    if arch == "tiny":  # SD 1.5's block layout at a fraction of its width, for smoke tests
        return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                    attention_head_dim=8, cross_attention_dim=32)
    sd21 = arch == "sd21"
    return UNet2DConditionModel(
        sample_size=96 if sd21 else 64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        attention_head_dim=[5, 10, 20, 20] if sd21 else 8, cross_attention_dim=1024 if sd21 else 768,
        use_linear_projection=sd21, upcast_attention=sd21)


def build(arch: str, work: Path) -> object:
    """A pipeline of `arch` (sd15, sd21, sdxl) with random weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    real = write_clip_tokenizer(work / "tok")
    tok = CLIPTokenizer(str(work / "tok" / "vocab.json"), str(work / "tok" / "merges.txt"), model_max_length=77)
    print(f"tokenizer: {'CLIP BPE' if real else 'byte-level stand-in'}, {len(tok)} tokens")

    def clip(width: int, layers: int, heads: int, act: str, proj: int | None = None):
        cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                             num_attention_heads=heads, hidden_act=act, max_position_embeddings=77,
                             projection_dim=proj or width, bos_token_id=49406, eos_token_id=2, pad_token_id=1)
        return CLIPTextModelWithProjection(cfg) if proj else CLIPTextModel(cfg)

    tiny = arch == "tiny"
    vae = diffusers.AutoencoderKL(block_out_channels=(32,) * 4 if tiny else (128, 256, 512, 512),
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1 if tiny else 2,
                                  latent_channels=4,
                                  sample_size=1024 if arch == "sdxl" else 512,
                                  scaling_factor=0.13025 if arch == "sdxl" else 0.18215)
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    unet = make_unet(arch)
    if arch == "sdxl":
        tok2 = CLIPTokenizer(str(work / "tok" / "vocab.json"), str(work / "tok" / "merges.txt"), model_max_length=77,
                             pad_token="!")
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=clip(768, 12, 12, "quick_gelu"), text_encoder_2=clip(1280, 32, 20, "gelu", 1280),
            tokenizer=tok, tokenizer_2=tok2, unet=unet, add_watermarker=False,
            scheduler=diffusers.EulerDiscreteScheduler(timestep_spacing="leading", **kw))
    sd21 = arch == "sd21"
    text = clip(1024, 23, 16, "gelu") if sd21 else clip(32, 2, 2, "quick_gelu") if tiny else clip(768, 12, 12, "quick_gelu")
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False,
                                    prediction_type="v_prediction" if sd21 else "epsilon", **kw)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sizes(unet: torch.nn.Module, arch: str) -> None:
    """Print UNet and attn2 K/V parameter counts against the expected ones, and the delta sizes."""
    total = sum(p.numel() for p in unet.parameters())
    kv = [p.numel() for n, p in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    want_total, want_kv = EXPECTED.get(arch, (total, sum(kv)))
    print(f"UNet {total:,} parameters (expected {want_total:,}); attn2 K/V {sum(kv):,} in {len(kv) // 2} layers "
          f"(expected {want_kv:,}); K/V delta {4 * sum(kv) / 1e9:.2f} GB float32, {2 * sum(kv) / 1e9:.2f} GB float16")


def time_steps(pipe: object, steps: int, resolution: int, batch: int) -> None:
    """Median time of customdiff training steps (K/V + token rows) on random images."""
    from customdiff.conditioning import sides, time_ids, tokenize
    from customdiff.model import CustomDiffusion
    from customdiff.surgery import detach_start_token, freeze_except, trainable_names
    from customdiff.tokens import TokenRows, add_tokens

    rows = []
    for side in sides(pipe):
        enc = getattr(pipe, side.encoder).requires_grad_(False)
        ids = add_tokens(getattr(pipe, side.tokenizer), enc, ["<new1>"], ["a"])
        rows.append(TokenRows(enc.get_input_embeddings(), ids))
    pipe.vae.requires_grad_(False)
    trainable = freeze_except(pipe.unet, trainable_names(pipe.unet, "crossattn_kv"))
    detach_start_token(pipe.unet)
    model = CustomDiffusion(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, rows[0],
                            getattr(pipe, "text_encoder_2", None), rows[1] if len(rows) > 1 else None).train()
    opt = torch.optim.AdamW([*trainable.values(), *(r.rows for r in rows)], lr=1e-5)
    f = pipe.vae_scale_factor
    pixels, mask = torch.rand(batch, 3, resolution, resolution) * 2 - 1, torch.ones(batch, 1, resolution // f, resolution // f)
    ids = tokenize([getattr(pipe, s.tokenizer) for s in sides(pipe)], ["photo of a <new1> dog"] * batch)
    extra = {"input_ids_2": ids[1], "time_ids": time_ids((resolution,) * 2, (0, 0), (resolution,) * 2).expand(batch, 6)
             } if len(ids) > 1 else {}
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(pixels, ids[0], mask, generator=torch.Generator().manual_seed(i), **extra)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"step {i}: {times[-1]:.2f} s, loss {loss.item():.4f}")
    print(f"median step after the first: {statistics.median(times[1:]):.2f} s at {resolution} px, batch {batch}")


def pipeline_folder(arch: str, work: Path) -> Path:
    """The saved random-weight pipeline of `arch` under `work`, built and saved on first use."""
    folder = work / arch
    if not (folder / "model_index.json").is_file():
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pipe = build(arch, Path(tmp))
            print(f"built {arch} in {time.perf_counter() - t0:.1f} s")
            sizes(pipe.unet, arch)
            pipe.save_pretrained(folder)
        del pipe
    return folder


def make_data(work: Path, resolution: int, photos: int = 8, classes: int = 16) -> tuple[Path, Path]:
    """Synthetic photo and class folders at 1.25x `resolution`: coloured boxes on noise (class captions: the
    class prompt, as generated class images have)."""
    root = work / f"data{resolution}"
    dirs = root / "photos", root / "class"
    if (root / "done").is_file():
        return dirs
    from PIL import Image

    rng = np.random.default_rng(0)
    side = resolution * 5 // 4
    for folder, n in zip(dirs, (photos, classes), strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
            y, x = rng.integers(0, side // 2, 2)
            arr[y:y + side // 2, x:x + side // 2] = rng.integers(100, 255, 3, dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{i:03d}.png")
            if folder.name == "class":
                (folder / f"{i:03d}.txt").write_text(CLASS_PROMPT)
    (root / "done").write_text("")
    return dirs


def initializer(base: Path) -> str:
    """A word that is one token in the base's vocabulary: pll (CLIP's BPE), else 'a' (the byte-level stand-in)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    return "pll" if len(tok("pll", add_special_tokens=False).input_ids) == 1 else "a"


class GpuPeak:
    """Peak memory.used of GPU 0 seen by nvidia-smi (every 0.2 s) while the block runs; None without it."""

    def __enter__(self) -> GpuPeak:
        self.peak: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak or 0.0, float(out.split()[0]) / 1024)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _rss_gb() -> float:
    """The process's resident set size now (VmRSS), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


PROFILE_WAIT, PROFILE_WARMUP, PROFILE_ACTIVE = 12, 3, 5


def kernel_profiler(path: str | None):
    """A started torch.profiler that records steps 16-20 (CPU and, on a GPU, CUDA), or None without a path."""
    if not path:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=acts, schedule=schedule(wait=PROFILE_WAIT, warmup=PROFILE_WARMUP,
                                                       active=PROFILE_ACTIVE, repeat=1))
    prof.start()
    return prof


def write_kernel_profile(prof, path: str) -> None:
    """Stop `prof`; write its op table sorted by device time and the per-step wall and kernel totals."""
    prof.stop()
    events = prof.key_averages()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    key = f"self_{'device' if dev == 'cuda' else 'cpu'}_time_total"
    # kernels only: an operator's self device time is its kernels' time, listed again under the kernels' names
    kind = torch.autograd.DeviceType.CUDA if dev == "cuda" else torch.autograd.DeviceType.CPU
    busy = sum(getattr(e, key) for e in events if e.device_type == kind and not e.key.startswith("ProfilerStep")
               ) / PROFILE_ACTIVE / 1e3
    steps = [e for e in events if e.key.startswith("ProfilerStep")]
    wall = steps[0].cpu_time_total / steps[0].count / 1e3 if steps else float("nan")
    what = "kernel time on the GPU" if dev == "cuda" else "operators' self CPU time"
    head = f"# {PROFILE_ACTIVE} steps profiled; per step: wall {wall:.1f} ms, {what} {busy:.1f} ms\n"
    Path(path).write_text(head + events.table(sort_by=key, row_limit=60, max_name_column_width=70) + "\n")


class Phases:
    """Where a training step's time goes, by phase: the UNet's forward pass, the backward pass, the VAE's
    encoder, the text encoders and the optimizer, timed around each call (synchronising a GPU at each edge, so
    not a run to read the rate from; under CUDA graphs the replayed UNet is not a module call and goes
    uncounted). Seconds per step over the steps after the first, and the rest of a step as `other`."""

    NAMES = ("unet_forward", "backward", "vae_encode", "text_encode", "optimizer")
    MODULES = {"UNet2DConditionModel": "unet_forward", "Encoder": "vae_encode", "CLIPTextModel": "text_encode",
               "CLIPTextModelWithProjection": "text_encode"}

    def __init__(self) -> None:
        self.total = dict.fromkeys(self.NAMES, 0.0)
        self.open: dict[int, float] = {}
        self.handles: list = []
        self.backward = torch.Tensor.backward  # the original, which `remove` puts back
        self.t_first = self.t_last = 0.0
        self.steps = 0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _phase(self, module: torch.nn.Module) -> str | None:
        name = type(module).__name__
        if name == "Encoder" and not type(module).__module__.startswith("diffusers"):
            return None
        return self.MODULES.get(name)

    def install(self) -> None:
        """Hook every module call, every backward pass and every optimizer step of this process."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(module, args):
            if self._phase(module):
                self.open[id(module)] = self._now()

        def post(module, args, out):
            phase = self._phase(module)
            if phase and id(module) in self.open:
                self.total[phase] += self._now() - self.open.pop(id(module))

        self.handles = [
            register_module_forward_pre_hook(pre), register_module_forward_hook(post),
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: self.open.__setitem__(id(opt), self._now())),
            register_optimizer_step_post_hook(
                lambda opt, args, kwargs: self.total.__setitem__(
                    "optimizer", self.total["optimizer"] + self._now() - self.open.pop(id(opt))))]
        backward = self.backward

        def timed(tensor, *args, **kwargs):
            t = self._now()
            out = backward(tensor, *args, **kwargs)
            self.total["backward"] += self._now() - t
            return out

        torch.Tensor.backward = timed

    def remove(self) -> None:
        """Undo `install` (sampling after training is not counted)."""
        for h in self.handles:
            h.remove()
        torch.Tensor.backward = self.backward

    def step(self, step: int) -> None:
        """Step `step` ended: the first one starts the count."""
        self.t_last, self.steps = self._now(), step
        if step == 1:
            self.t_first = self.t_last
            self.total = dict.fromkeys(self.total, 0.0)

    def per_step(self) -> dict[str, float]:
        """Seconds per step of each phase, and of the rest (`other`), over the steps after the first."""
        n = self.steps - 1
        if n < 1:
            return {}
        out = {k: v / n for k, v in self.total.items()}
        out["other"] = (self.t_last - self.t_first) / n - sum(out.values())
        return out


def child(spec: dict) -> dict:
    """In this process: `customdiff train` with the spec's settings, then `customdiff sample`; the numbers."""
    from customdiff.cli import main as cli
    from customdiff.config import TrainConfig
    from customdiff.data import ConceptSpec
    from customdiff.train import train

    cuda = torch.cuda.is_available()
    cfg = TrainConfig(**spec["config"])
    concept = ConceptSpec(spec["photos"], INSTANCE_PROMPT, CLASS_PROMPT, reg_dir=spec["class"])
    timings: dict[str, float] = {}
    resident: list[float] = []

    def after_step(step: int, loss: float) -> None:
        """Resident memory after each step (CPU only: the callback reads the loss, a sync on a GPU)."""
        resident.append(_rss_gb())

    graph_log: list[str] = []  # what --cuda-graphs did (captured, fell back), for the row

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            graph_log.append(record.getMessage())

    logging.getLogger("customdiff.graphs").addHandler(_Keep(logging.INFO))
    logging.getLogger("customdiff.graphs").setLevel(logging.INFO)
    callback = None if cuda else after_step
    prof = kernel_profiler(spec.get("profile"))
    if prof is not None:
        def callback(step: int, loss: float) -> None:
            """Advance the profiler's schedule (reading the loss syncs, as the window needs)."""
            prof.step()
    phases = Phases() if spec.get("phases") else None
    if phases is not None:
        phases.install()
        inner = callback

        def callback(step: int, loss: float) -> None:
            """Count the phases from the first step on."""
            if inner is not None:
                inner(step, loss)
            phases.step(step)
    setup = cProfile.Profile() if spec.get("cprofile") else None
    t0 = time.perf_counter()
    if setup is not None:
        setup.enable()
    train(cfg, [concept], progress=False, timings=timings, callback=callback)
    trained = time.perf_counter()
    if phases is not None:
        phases.remove()
    if setup is not None:
        setup.disable()
        setup.dump_stats(spec["cprofile"])
    if prof is not None:
        write_kernel_profile(prof, spec["profile"])
    whole = trained - t0
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_rss"
    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(cfg.mixed_precision, "float32") if cuda else "float32"
    t1 = time.perf_counter()
    rc = cli(["sample", "--base", cfg.base, "--delta", cfg.out, "--prompt", INSTANCE_PROMPT, "--n", "4",
              "--steps", str(spec["sample_steps"]), "--resolution", str(cfg.resolution), "--dtype", dtype,
              "--out", spec["samples"]])
    return {**timings, "whole_run_s": whole, "process_s": trained - STARTED, "peak_gb": peak, "peak_kind": kind,
            "rss_after_steps_gb": max(resident) if resident else None, "cuda_graphs_log": graph_log,
            **({"phases_s_per_step": phases.per_step()} if phases is not None else {}),
            "sample_s": time.perf_counter() - t1 if rc == 0 else float("nan"), "sample_dtype": dtype}


# Runs diffusers' example in this interpreter, stamping each backward pass (one per step, whether or not the fp16
# scaler then skips the optimizer) and printing at exit the steady rate after the first step, as a customdiff run
# counts it, and torch's allocated peak.
EXAMPLE_WRAPPER = """
import atexit, json, os, runpy, sys, time
import torch
stamps = []
backward = torch.Tensor.backward
prof = None
if os.environ.get("REALSCALE_PROFILE"):
    sys.path.insert(0, os.environ["REALSCALE_DIR"])
    import realscale
    prof = realscale.kernel_profiler(os.environ["REALSCALE_PROFILE"])
def timed(self, *args, **kwargs):
    out = backward(self, *args, **kwargs)
    stamps.append(time.perf_counter())
    if prof is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.step()
    return out
torch.Tensor.backward = timed
def report():
    if prof is not None and len(stamps) > realscale.PROFILE_WAIT + realscale.PROFILE_WARMUP + realscale.PROFILE_ACTIVE:
        realscale.write_kernel_profile(prof, os.environ["REALSCALE_PROFILE"])
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print("EXAMPLE " + json.dumps({"steps_timed": len(stamps), "steady_steps_per_s": steady, "peak_gb": peak,
                                   "peak_kind": "cuda_max_allocated"}), flush=True)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_example(script: str, a: argparse.Namespace, base: Path, photos: Path, classes: Path, out: Path) -> dict:
    """diffusers' train_custom_diffusion.py on the same data and settings: whole run, steady rate after its first
    step, torch's and nvidia-smi's memory peaks."""
    images = classes.parent / "class_images"  # the example reads every file of its class folder as an image
    if not images.is_dir():
        images.mkdir()
        for png in classes.glob("*.png"):
            os.link(png, images / png.name)
    classes = images
    cmd = [sys.executable, "-c", EXAMPLE_WRAPPER, script, "--pretrained_model_name_or_path", str(base),
           "--instance_data_dir", str(photos), "--class_data_dir", str(classes), "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
           "--with_prior_preservation", "--prior_loss_weight", "1.0", "--num_class_images",
           str(len(list(classes.glob("*.png")))), "--resolution", str(a.resolution), "--train_batch_size",
           str(a.batch_size // 2), "--max_train_steps", str(a.train_steps), "--learning_rate", "1e-5", "--scale_lr",
           "--modifier_token", "<new1>", "--initializer_token", initializer(base), "--freeze_model", "crossattn_kv",
           "--mixed_precision", a.mixed_precision, "--hflip", "--seed", "0", "--checkpointing_steps", "1000000",
           "--output_dir", str(out)] + (["--gradient_checkpointing"] if a.gradient_checkpointing else [])
    shown = [sys.executable, *cmd[3:]]
    print("$ " + " ".join(f"'{c}'" if " " in c or "<" in c else c for c in shown), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "REALSCALE_DIR": str(Path(__file__).resolve().parent)}
    if a.profile:
        env["REALSCALE_PROFILE"] = str(Path(a.profile).resolve())
    with GpuPeak() as gpu:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    sys.stdout.write(proc.stdout)
    whole = time.perf_counter() - t0  # the example's whole process: its whole run and its process time alike
    found = [json.loads(x[8:]) for x in proc.stdout.splitlines() if x.startswith("EXAMPLE ")]
    # without a GPU: the example's peak RSS (this process's only waited-for child)
    rss = {} if torch.cuda.is_available() else {
        "peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, "peak_kind": "peak_rss"}
    return {"whole_run_s": whole, "process_s": whole, "rc": proc.returncode, **(found[-1] if found else {}), **rss,
            "nvidia_smi_peak_gb": gpu.peak}


def bench(a: argparse.Namespace) -> dict:
    """Build (or reuse) the pipeline and data, run one configuration in a child process, print its numbers."""
    work = Path(a.work)
    base = pipeline_folder(a.arch, work)
    photos, classes = make_data(work, a.resolution)
    tag = f"{a.arch}-{a.resolution}px-b{a.batch_size}-{a.mixed_precision}{'-gc' if a.gradient_checkpointing else ''}"
    run_dir = Path(tempfile.mkdtemp(prefix=tag + "-", dir=work))
    settings = {"arch": a.arch, "resolution": a.resolution, "batch_size": a.batch_size, "steps": a.train_steps,
                "mixed_precision": a.mixed_precision, "gradient_checkpointing": a.gradient_checkpointing,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
                "torch": torch.__version__}
    if a.example:
        result = {"program": "diffusers example", **run_example(a.example, a, base, photos, classes, run_dir)}
    else:
        config = {"base": str(base), "out": str(run_dir / "delta.safetensors"), "steps": a.train_steps,
                  "batch_size": a.batch_size, "resolution": a.resolution, "mixed_precision": a.mixed_precision,
                  "gradient_checkpointing": a.gradient_checkpointing, "seed": 0, "num_class_images": 0,
                  "initializer": [initializer(base)], "frozen_weights": a.frozen_weights, "cache": a.cache,
                  "prefetch": a.prefetch, "lean_activations": a.lean_activations, "compile": a.compile,
                  "channels_last": a.channels_last, "cudnn_benchmark": a.cudnn_benchmark, "log_every": a.log_every,
                  "cuda_graphs": a.cuda_graphs, "augment": a.augment}
        spec = {"config": config, "photos": str(photos), "class": str(classes), "sample_steps": a.sample_steps,
                "samples": str(run_dir / "samples"),
                "profile": str(Path(a.profile).resolve()) if a.profile else None,
                "cprofile": str(Path(a.cprofile).resolve()) if a.cprofile else None, "phases": a.phases}
        print("$ customdiff train --base {base} --concept {photos} --reg-dir {classes} --instance-prompt '{ip}' "
              "--class-prompt '{cp}' --steps {steps} --batch-size {b} --resolution {r} --mixed-precision {mp}{gc} "
              "--out {out}".format(base=base, photos=photos, classes=classes, ip=INSTANCE_PROMPT, cp=CLASS_PROMPT,
                                   steps=a.train_steps, b=a.batch_size, r=a.resolution, mp=a.mixed_precision,
                                   gc=" --gradient-checkpointing" if a.gradient_checkpointing else "",
                                   out=config["out"]), flush=True)
        with GpuPeak() as gpu:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"the training run failed (exit {proc.returncode})")
        result = {"program": "customdiff", **json.loads(lines[-1][7:]), "nvidia_smi_peak_gb": gpu.peak,
                  "levers": {k: config[k] for k in ("frozen_weights", "cache", "prefetch", "lean_activations",
                                                    "compile", "channels_last", "cudnn_benchmark", "log_every",
                                                    "cuda_graphs", "augment")},
                  "delta": config["out"]}
        # a capture that fails leaves a correct but eager run: say so where nobody reads the log list (the
        # fifteenth session found every capture failing since the twelfth)
        log_lines = result.get("cuda_graphs_log", [])
        eager = [m.splitlines()[0] for m in log_lines if "failed" in m or "differ" in m]
        if eager:
            print("WARNING: --cuda-graphs did not replay every step: " + "; ".join(eager), file=sys.stderr)
        elif torch.cuda.is_available() and a.cuda_graphs != "off" and not any("captured" in m for m in log_lines):
            print("WARNING: --cuda-graphs: nothing was captured (see graphs_unusable for the settings it skips)",
                  file=sys.stderr)
    row = {**settings, **result, **({"label": a.label} if a.label else {})}
    print(json.dumps(row))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main(argv: list[str] | None = None) -> None:
    """Build the chosen architecture, print its sizes, optionally save it, time training steps or whole runs."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, default="sdxl")
    ap.add_argument("--out", help="save the pipeline here (a --base for every customdiff command)")
    ap.add_argument("--steps", type=int, default=0, help="time this many bare training steps (0: none)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    g = ap.add_argument_group("the training benchmark (customdiff train + sample in a child process)")
    g.add_argument("--train-steps", type=int, default=0, help="run `customdiff train` this many steps (0: no)")
    g.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "realscale"),
                   help="cache of built pipelines, synthetic data and run outputs")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--sample-steps", type=int, default=50, help="steps of the 4 sampled images")
    g.add_argument("--frozen-weights", choices=["auto", "float32"], default="auto")
    g.add_argument("--no-cache", dest="cache", action="store_false")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="customdiff's --no-augment (targets: centre square, mirrored or not); not with --example")
    g.add_argument("--prefetch", type=int, default=2)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--lean-activations", choices=["auto", "on", "off"], default="auto")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--label", default="", help="a name for this run, stored in its JSON line")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--cudnn-benchmark", action="store_true")
    g.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    g.add_argument("--example", metavar="SCRIPT", help="run diffusers' train_custom_diffusion.py instead")
    g.add_argument("--json", metavar="FILE", help="append the numbers as a JSON line")
    g.add_argument("--profile", metavar="FILE", help="write a torch.profiler op table of 5 steady steps (16-20; "
                   "reading each step's loss syncs the device, so the run's own rate is not a benchmark)")
    g.add_argument("--cprofile", metavar="FILE", help="write a cProfile of the whole train() call (its setup: "
                   "imports, loading, checks); not with the example")
    g.add_argument("--phases", action="store_true", help="time each phase of a step (UNet forward, backward, VAE "
                   "encoder, text encoders, optimizer; a GPU is synchronised at each edge, so the run's own rate is "
                   "not a benchmark); not with the example, nor with --cuda-graphs on (its syncs would fail "
                   "the capture; it runs eagerly: --cuda-graphs off)")
    g.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return
    if a.train_steps:
        if a.example and not a.augment:
            ap.error("--no-augment applies to customdiff only; diffusers' example has no such switch")
        if a.example and a.phases:
            ap.error("--phases times customdiff's steps only")
        if a.phases:
            if a.cuda_graphs == "on":
                ap.error("--phases synchronises the GPU inside the UNet's pass, which a capture forbids")
            a.cuda_graphs = "off"  # one replay has no phases to time
        bench(a)
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipe = build(a.arch, Path(tmp))
        print(f"built {a.arch} in {time.perf_counter() - t0:.1f} s")
        sizes(pipe.unet, a.arch)
        if a.out:
            pipe.save_pretrained(a.out)
            print(f"saved to {a.out}")
    if a.steps:
        time_steps(pipe, a.steps, a.resolution, a.batch_size)


if __name__ == "__main__":
    main()
