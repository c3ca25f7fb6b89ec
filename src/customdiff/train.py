"""The Custom Diffusion training loop on accelerate, with resumable checkpoints and the delta as output."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .activations import enable_checkpointing, lean_activations, lean_wanted
from .base import STEPS_WHY, base_facts, load_pipeline, resolve_base, trainable_bytes
from .classimages import check_cache, default_cache_dir, ensure_class_images
from .compress import compress_delta
from .conditioning import XL_PIPELINE, is_xl, pipeline_name, sides, tokenize
from .config import TrainConfig
from .data import ConceptSpec, TrainData, list_images, prefetch, validate_concepts
from .delta import (
    Delta,
    atomic_save,
    base_fingerprint,
    check_finite,
    public_name,
    read_metadata,
    read_tensors,
    save_delta,
)
from .errors import UserError
from .graphs import GraphedUNet, graphs_unusable
from .model import CustomDiffusion, vae_call_pixels
from .outputs import final_path, make_dirs
from .precision import frozen_dtype, read_kept, restore_kept, store_pipeline_frozen
from .surgery import detach_start_token, freeze_except, trainable_names
from .tokens import TokenRows, add_tokens, default_initializers, token_position
from .validate import (
    check_free_space,
    check_multiple,
    check_number,
    check_out_dir,
    check_out_file,
    deferred_warnings,
    human_bytes,
    warn,
)

log = logging.getLogger(__name__)

# called after every optimizer step with (steps done, loss); returning True stops the run at that step
StepCallback = Callable[[int, float], "bool | None"]


class TrainingStopped(Exception):
    """A step callback asked the run to stop; a checkpoint of the last step was saved (resume continues it)."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}; checkpoint in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class StopRequest:
    """Lets a signal handler ask a running `train` to stop after its current step, saving a checkpoint there.
    `in_loop` says whether the training loop runs (before it, there is no step to finish)."""

    requested: bool = False
    in_loop: bool = False


def _public_spec(spec: ConceptSpec) -> dict[str, Any]:
    """A concept as its delta records it: prompts, and its folders and files by name only (see public_name)."""
    return {**asdict(spec), **{k: public_name(getattr(spec, k), True)
                               for k in ("instance_dir", "reg_dir", "reg_captions")}}


def _check_token_positions(pipe: Any, specs: list[ConceptSpec], augment: bool) -> None:
    """Refuse an instance prompt whose modifier token lands past the tokenizer's length (with the longest
    augmentation prefix in front): the text encoder would never see it and its row would never train."""
    from .data import FAR_PREFIXES, NEAR_PREFIXES

    for side in sides(pipe):
        tok = getattr(pipe, side.tokenizer)
        extra = max((len(tok(p, add_special_tokens=False)["input_ids"]) for p in FAR_PREFIXES + NEAR_PREFIXES),
                    default=0) if augment else 0
        for s in specs:
            for t in s.tokens:
                at = extra + token_position(tok, s.instance_prompt, t)
                if at >= tok.model_max_length - 1:  # the last place holds the end token
                    raise UserError(f"instance prompt {s.instance_prompt[:80]!r}: {t} comes at token {at}, past the "
                                    f"{tok.model_max_length} tokens the text encoder reads"
                                    f"{' (with an augmentation prefix)' if extra else ''}; shorten the words "
                                    "before it")


def storage_dtype(cfg: TrainConfig, pipe: Any) -> torch.dtype:
    """The dtype the weight changes are stored in: --delta-dtype, or by default float16 on SDXL (a full K/V
    delta is 1.36 GB in float32 there) and float32 otherwise."""
    if cfg.delta_dtype == "auto":
        return torch.float16 if is_xl(pipe) else torch.float32
    return getattr(torch, cfg.delta_dtype)


def checkpoint_dir(out: str | Path) -> Path:
    """Folder of resumable checkpoints for the run writing `out`."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _check_config(cfg: TrainConfig, specs: list[ConceptSpec],
                  cache: dict[Path, Any] | None = None) -> tuple[list[ConceptSpec], list[str]]:
    """Everything checkable before the base loads: flags, output path and space, concepts and their images.
    Returns the concepts with their tokens resolved, and all tokens."""
    with deferred_warnings():
        cfg.validate()
        if not cfg.out:
            raise UserError("--out: give an output file ending in .safetensors")
        if cfg.mixed_precision == "fp16" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            raise UserError("--mixed-precision fp16: needs a GPU and this machine has none; use no (the fastest "
                            "on a CPU) or bf16")
        if cfg.logdir:
            check_out_dir("--logdir", cfg.logdir)
            check_out_dir("--logdir", Path(cfg.logdir) / "customdiff")  # where TensorBoard's files go
        facts = base_facts(cfg.base)
        if facts is not None:
            check_multiple("--resolution", cfg.resolution, facts.factor, " (the VAE's factor)")
            check_number("--class-image-steps", cfg.class_image_steps, 1, facts.max_sampling_steps, why=STEPS_WHY)
        out = Path(cfg.out)
        if not _resumes_onto(cfg):  # that output is checked once the run knows it has something to write
            check_out_file("--out", out, ".safetensors")
        ckpt = checkpoint_dir(out)
        if ckpt.exists() and not ckpt.is_dir():
            raise UserError(f"--out {cfg.out}: {ckpt} (its checkpoint folder) is a file; remove or rename it")
        if cfg.checkpoint_every and ckpt.is_dir() and not os.access(ckpt, os.W_OK | os.X_OK):
            raise UserError(f"--out {cfg.out}: this user may not write in {ckpt} (its checkpoint folder); change "
                            "its permissions, or remove it")
        if facts is not None:
            size = trainable_bytes(facts, cfg.train)
            # the delta, plus params and two AdamW moments in a checkpoint when checkpointing
            check_free_space("--out", out, size * (4 if cfg.checkpoint_every else 1))
        if cfg.resume and (ckpt / "latest.safetensors").is_file():
            check_checkpoint(ckpt, cfg)
        specs, tokens = validate_concepts(specs, cfg.resolution or (facts.native_resolution if facts else 0), cache)
        for s in specs:
            if not s.reg_dir and cfg.num_class_images > 0:
                check_cache(cfg.base, s.class_prompt, cfg.num_class_images)
        if cfg.initializer and len(cfg.initializer) != len(tokens):
            raise UserError(f"--initializer gives {len(cfg.initializer)} words for {len(tokens)} tokens {tokens}")
    return specs, tokens


def _photos_digest(specs: list[ConceptSpec]) -> str:
    """SHA-256 of every concept photo's bytes, in order: a checkpoint records it, so a resume can tell."""
    digest = hashlib.sha256()
    for s in specs:
        for p in list_images(Path(s.instance_dir)):
            digest.update(os.fsencode(p.name) + b"\0" + p.read_bytes())  # a name's bytes, UTF-8 or not
    return digest.hexdigest()


def _run_digest(cfg: TrainConfig, specs: list[ConceptSpec], photos: str) -> str:
    """SHA-256 of what sets a run's delta: its settings (but those marked result=False), the concepts, the photos'
    digest, the regularization images and captions (names, sizes, times) and the base (its files, the same way)."""
    kept = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("result", True)}
    files = []
    base = Path(resolve_base(cfg.base))
    for root in [base if base.is_dir() else None, *(s.reg_dir for s in specs),
                 *(s.reg_captions for s in specs)]:
        if root is not None:
            p = Path(root)
            stats = ((f, f.stat()) for f in sorted([p] if p.is_file() else p.rglob("*")) if f.is_file())
            files += [(str(f), st.st_size, st.st_mtime_ns) for f, st in stats]
    text = json.dumps([kept, [asdict(s) for s in specs], photos, files], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _resumes_onto(cfg: TrainConfig) -> bool:
    """Whether the run resumes onto an existing output, which may be its own finished (even read-only) delta."""
    return cfg.resume and Path(cfg.out).is_file()


def _made_by(out: Path, run: str) -> bool:
    """Whether `out` is a delta that the run with this digest finished."""
    try:
        return out.is_file() and read_metadata(out).get("run") == run
    except UserError:  # not a readable delta: the run writes a new one
        return False


def _save_checkpoint(path: Path, step: int, cfg: TrainConfig, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer, photos: str = "", scaler: Any = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach().cpu().contiguous()
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"opt.{name}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {"step": str(step), "config": json.dumps(cfg.to_dict()), "photos": photos}
    if scaler is not None and scaler.is_enabled():
        # fp16's loss scale: resumed at its initial value instead, a step could overflow (and be skipped) where
        # the uninterrupted run's did not
        meta["scaler"] = json.dumps(scaler.state_dict())
    make_dirs(path.parent)
    made = not path.is_dir()
    path.mkdir(exist_ok=True)
    try:
        atomic_save(tensors, meta, path / "latest.safetensors")
    except BaseException:
        if made:  # a first checkpoint that failed (a full disk) leaves no empty folder behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    log.info("checkpoint at step %d in %s", step, path)


def check_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Read a resumable checkpoint: readable, finite, made with the same settings; its tensors."""
    file = path / "latest.safetensors"
    meta = read_metadata(file)
    try:
        saved, step = json.loads(meta["config"]), int(meta["step"])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{file}: not a customdiff checkpoint (bad metadata: {e}); delete {path} to start over") from e
    if not isinstance(saved, dict) or step < 0:
        raise UserError(f"{file}: not a customdiff checkpoint; delete {path} to start over")
    if step > cfg.steps:  # the delta would say --steps and hold more training than that
        raise UserError(f"--steps {cfg.steps}: the checkpoint in {path} is at step {step}, past it; give "
                        f"--steps {step} or more to go on from it, or train afresh without --resume")
    tensors = read_tensors(file)
    check_finite(tensors, file)
    differ = cfg.resume_changes(saved)
    if differ:
        raise UserError(f"{file}: the checkpoint was made with other settings ({', '.join(differ)}); "
                        "resume with the same flags or start a new --out")
    return tensors


def _load_checkpoint(path: Path, cfg: TrainConfig, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer, scaler: Any = None) -> int:
    file = path / "latest.safetensors"
    tensors = check_checkpoint(path, cfg)
    with torch.no_grad():
        for name, p in params.items():
            if f"param.{name}" not in tensors or tensors[f"param.{name}"].shape != p.shape:
                raise UserError(f"{file}: does not match this model ({name}); delete {path} to start over")
            p.copy_(tensors[f"param.{name}"].to(p))
            state = {k.rsplit(".", 1)[1]: v.to(p.device) for k, v in tensors.items()
                     if k.startswith(f"opt.{name}.") and k.count(".") == name.count(".") + 2}
            if state:
                optimizer.state[p] = state
    meta = read_metadata(file)
    if scaler is not None and scaler.is_enabled() and meta.get("scaler"):
        try:
            scaler.load_state_dict(json.loads(meta["scaler"]))
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise UserError(f"{file}: its fp16 loss-scaler state is damaged ({e}); delete {path} to start "
                            "over") from e
    return int(meta["step"])


def _reg_sources(cfg: TrainConfig, specs: list[ConceptSpec], pipe: Any, is_main: bool, accelerator: Any,
                 progress: bool) -> list[ConceptSpec]:
    """The concepts with a regularization source each: generated (and cached) class images for those without."""
    resolved = []
    for s in specs:
        if not s.reg_dir and cfg.num_class_images > 0:
            folder = default_cache_dir(cfg.base, s.class_prompt)
            if is_main:
                ensure_class_images(pipe, s.class_prompt, folder, cfg.num_class_images, seed=cfg.seed,
                                    steps=cfg.class_image_steps, progress=progress)
            accelerator.wait_for_everyone()
            s = replace(s, reg_dir=str(folder))
        resolved.append(s)
    if cfg.num_class_images <= 0 and not any(s.reg_dir for s in resolved):
        log.warning("training without regularization images: the class word may drift")
    return resolved


def train(cfg: TrainConfig, specs: list[ConceptSpec], progress: bool = True, pipe: Any = None,
          callback: StepCallback | None = None, timings: dict[str, float] | None = None,
          pipe_owned: bool = False, interrupt: StopRequest | None = None, device: str | None = None) -> Path:
    """Fine-tune cross-attention (and new token rows) on the concepts; write the delta to cfg.out.

    `pipe` may be an already loaded float32 base pipeline (it is modified in place: trained weights, new tokens).
    With `pipe_owned` (the caller loaded it for this run alone) its frozen weights are also stored in the
    mixed-precision dtype, as in a pipeline `train` loads itself; otherwise they keep their dtypes.
    `callback(step, loss)` runs after each step; while it runs, `pipe` samples with the weights and token rows
    trained so far. When it returns True, a checkpoint of that step is saved and TrainingStopped is raised; so
    when `interrupt.requested` is set before the last step.
    `timings`, when given, receives the loop's clock readings (see _Clock: first step, steady rate, data wait)
    and vae_images, the images the VAE encoded (those the cache held are not counted).
    `device` ("cpu", "cuda", "cuda:1"; one process) is where to train; by default the GPU when there is one,
    where a pipeline passed in is moved.
    """
    from accelerate import Accelerator

    clock = _Clock(timings)
    images: dict[Path, Any] = {}
    specs, tokens = _check_config(cfg, specs, images)  # resolved copies: the caller's specs stay as given
    out = Path(cfg.out)
    ckpt = checkpoint_dir(out)
    photos = _photos_digest(specs)  # recorded in checkpoints, so a resume can tell
    run = _run_digest(cfg, specs, photos)  # recorded in the delta, so a resume of a finished run can tell
    if cfg.resume and (ckpt / "latest.safetensors").is_file():
        saved = read_metadata(ckpt / "latest.safetensors").get("photos")
        if saved and saved != photos:
            warn(f"{ckpt}: the concept photos changed since this checkpoint; the run goes on with the new ones")
    elif cfg.resume and _made_by(out, run):
        warn(f"--resume: {out} is already the finished delta of this run (same settings and photos); nothing to "
             "do. Leave out --resume to train it again")
        return out
    if _resumes_onto(cfg):
        check_out_file("--out", out, ".safetensors")
    # without a GPU, accelerate only forms a multi-process (gloo) group when told it runs on the CPU
    where = torch.device(device) if device else None
    on_cpu = (where.type == "cpu" if where is not None
              else not torch.cuda.is_available() and not torch.backends.mps.is_available())
    if where is not None and where.type == "cuda" and where.index is not None:
        torch.cuda.set_device(where)  # this thread's current GPU, which accelerate's "cuda" device means
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation,
                              log_with="tensorboard" if cfg.logdir else None,
                              project_dir=cfg.logdir or None)
    is_main = accelerator.is_main_process
    cuda = accelerator.device.type == "cuda"
    # frozen weights in the mixed-precision dtype, only in a pipeline of our own (a caller's keeps its dtypes)
    low = frozen_dtype(cfg.mixed_precision, cfg.frozen_weights) if pipe is None or pipe_owned else None
    facts = base_facts(cfg.base) if low and pipe is None else None  # a float32 pipeline passed in needs no files
    kept = read_kept(cfg.base, cfg.train, facts.pipeline == XL_PIPELINE) if facts is not None else None
    clock.mark("checked")
    if pipe is None:
        pipe = load_pipeline(cfg.base, dtype=low if kept else torch.float32, device=accelerator.device)
    clock.mark("loaded")
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    factor = pipe.vae_scale_factor
    size = cfg.resolution or unet.config.sample_size * factor
    if size % factor:
        raise UserError(f"--resolution {size} must be a multiple of the VAE's factor {factor}")
    _check_token_positions(pipe, specs, cfg.augment)  # before class images are generated
    specs = _reg_sources(cfg, specs, pipe, is_main, accelerator, progress)
    if cfg.reg_prompt == "class":
        specs = [replace(s, reg_use_captions=False) for s in specs]
    data = TrainData(specs, size, factor, augment=cfg.augment, flip=cfg.flip, cache=images)
    if kept is not None and not restore_kept(pipe, kept):  # cannot happen with a consistent folder
        raise UserError(f"--base {cfg.base}: its weight files do not match its configs; re-save the pipeline")

    # new tokens, each initialised from a rare word (or the user's initializer)
    inits = list(cfg.initializer) if cfg.initializer else [
        next((s.initializer for s in specs if t in s.tokens and s.initializer), None) for t in tokens]
    defaults = iter(default_initializers(tokenizer, sum(w is None for w in inits)))
    inits = [w if w is not None else next(defaults) for w in inits]
    vae.requires_grad_(False)
    # one trainable row per token and text encoder (SDXL: both), each started from the word in its own encoder
    rows_by_side: dict[str, TokenRows] = {}
    for side in sides(pipe):
        enc = getattr(pipe, side.encoder)
        enc.requires_grad_(False)
        ids = add_tokens(getattr(pipe, side.tokenizer), enc, tokens, inits)
        rows_by_side[side.prefix] = TokenRows(enc.get_input_embeddings(), ids)
    token_rows, token_rows_2 = rows_by_side["tokens"], rows_by_side.get("tokens_2")
    text_encoder_2 = getattr(pipe, "text_encoder_2", None) if token_rows_2 is not None else None

    names = trainable_names(unet, cfg.train)
    base_values = {n: p.detach().float().cpu().clone() for n, p in unet.named_parameters() if n in set(names)}
    fingerprint = base_fingerprint(unet, names)
    trainable = freeze_except(unet, names)
    # the reference detaches the start token's K/V for Custom Diffusion only, not for its baselines
    hooks = detach_start_token(unet) if cfg.train in ("crossattn_kv", "crossattn") else []
    if low is not None:
        store_pipeline_frozen(pipe, low, names)
    if lean_wanted(cfg.lean_activations, cuda, cfg.gradient_checkpointing):
        lean_activations(unet)
    checkpoint_reads_rng = False
    if cfg.gradient_checkpointing:
        checkpoint_reads_rng = not enable_checkpointing(unet)
        for enc in (text_encoder, text_encoder_2) if text_encoder_2 is not None else (text_encoder,):
            enable = getattr(enc, "activation_checkpointing_enable", None) or enc.gradient_checkpointing_enable
            enable()  # transformers 5 renamed it
    if cfg.channels_last and cuda:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if cfg.compile:
        unet.compile()  # in place: parameter names, hooks and the delta's keys stay as they are
    model = CustomDiffusion(unet, text_encoder, vae, pipe.scheduler, token_rows, text_encoder_2, token_rows_2,
                            cache=cfg.cache, vae_call_pixels=vae_call_pixels(cuda, cfg.gradient_checkpointing)
                            ).to(accelerator.device)
    model.train()
    if cfg.cuda_graphs != "off":
        why = graphs_unusable(cuda, cfg.compile, cfg.gradient_accumulation, accelerator.num_processes,
                              checkpoint_reads_rng)
        if why is None:
            model.graphed_unet = GraphedUNet(unet, list(trainable.values()))
        elif cfg.cuda_graphs == "on":
            log.warning("--cuda-graphs %s; the UNet runs eagerly", why)
    params = {**trainable, **{f"<{prefix}>": r.rows for prefix, r in rows_by_side.items()}}

    world = accelerator.num_processes
    lr = cfg.learning_rate * (cfg.batch_size * cfg.gradient_accumulation * world if cfg.scale_lr else 1)
    # fused: one kernel for all tensors on a GPU (the trained tensors are float32 there, as it needs)
    rows = [p for n, p in params.items() if n.startswith("<")]
    groups = [{"params": [p for n, p in params.items() if not n.startswith("<")]},
              {"params": rows, "lr": lr * cfg.token_lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if cuda else {}))
    start = 0
    if cfg.resume:
        if (ckpt / "latest.safetensors").is_file():
            start = _load_checkpoint(ckpt, cfg, params, optimizer, accelerator.scaler)
            log.info("resuming %s from step %d", out, start)
        else:
            log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt)
    log.info("training %d token(s) %s initialised from %s; lr %.2e; %d steps at batch %d x %d process(es)",
             len(tokens), tokens, inits, lr, cfg.steps, cfg.batch_size, world)
    model, optimizer = accelerator.prepare(model, optimizer)
    clock.mark("prepared")
    if cfg.logdir:
        accelerator.init_trackers("customdiff", config={k: str(v) for k, v in cfg.to_dict().items()})

    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not (progress and is_main))
    rank = accelerator.process_index
    ga = cfg.gradient_accumulation
    keys = range(start * ga, cfg.steps * ga)
    batches = prefetch(lambda key: data.batch(cfg.seed, key, rank, cfg.batch_size), keys, cfg.prefetch, pin=cuda)
    losses: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not yet read back
    clock.loop()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark or (cuda and cfg.cudnn_benchmark)
    if interrupt is not None:
        interrupt.in_loop = True
    try:
        for step in range(start, cfg.steps):
            for micro in range(ga):
                key = step * ga + micro
                with clock.waiting():
                    batch = next(batches)
                    ids = tokenize([getattr(pipe, side.tokenizer) for side in sides(pipe)], batch["prompts"])
                    pixels = batch["pixel_values"].to(accelerator.device, non_blocking=True)
                    mask = batch["mask"].to(accelerator.device, non_blocking=True)
                xl = {"input_ids_2": ids[1], "time_ids": batch["time_ids"].to(accelerator.device)} if len(ids) > 1 else {}
                gen = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + key * 7919 + rank)
                with accelerator.accumulate(model):
                    # ids stay on the CPU: the text cache reads them there, the model moves them
                    loss = model(pixels, ids[0], mask, generator=gen, latent_keys=batch["latent_keys"], **xl)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            losses.append((step + 1, loss.detach()))
            checkpoint = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
            # reading the loss waits for the device: only on the first and last step, every --log-every steps,
            # before a checkpoint (never one of a diverged run), and at each step when a callback wants it
            if (callback is not None or step == start or step + 1 == cfg.steps or checkpoint
                    or (step + 1) % cfg.log_every == 0):
                last = _read_losses(losses, cfg, bar, accelerator, lr)
                clock.read(step + 1 - start)
            stop = bool(callback(step + 1, last)) if callback is not None else False
            stop = stop or bool(interrupt is not None and interrupt.requested and step + 1 < cfg.steps)
            if stop or checkpoint:
                if is_main:
                    _save_checkpoint(ckpt, step + 1, cfg, params, getattr(optimizer, "optimizer", optimizer),
                                     photos, accelerator.scaler)
                accelerator.wait_for_everyone()
            if stop:
                bar.close()
                raise TrainingStopped(step + 1, ckpt)
    finally:
        if interrupt is not None:
            interrupt.in_loop = False
        batches.close()
        torch.backends.cudnn.benchmark = benchmark
        clock.done()
        if timings is not None:
            timings["vae_images"] = float(model.vae_images)
    bar.close()
    for h in hooks:
        h.remove()
    for side in sides(pipe):
        rows_by_side[side.prefix].remove()
        rows_by_side[side.prefix].write_back(getattr(pipe, side.encoder).get_input_embeddings())
    if cfg.logdir:
        accelerator.end_training()

    if is_main:
        store = storage_dtype(cfg, pipe)
        final = {prefix: r.rows.detach().float().cpu() for prefix, r in rows_by_side.items()}
        delta = Delta(
            weights={n: (p.detach().float().cpu() - base_values[n]).to(store) for n, p in trainable.items()},
            tokens={t: final["tokens"][i] for i, t in enumerate(tokens)},
            tokens_2={t: final["tokens_2"][i] for i, t in enumerate(tokens)} if "tokens_2" in final else {},
            trained=cfg.train,
            base={"name": public_name(cfg.base), "fingerprint": fingerprint,
                  "vocab_size": len(tokenizer) - len(tokens), "pipeline": pipeline_name(pipe)},
            token_info=[{"token": t, "initializer": w, "class": next(s.class_word() for s in specs if t in s.tokens)}
                        for t, w in zip(tokens, inits, strict=True)],
            config={**cfg.to_dict(), "base": public_name(cfg.base), "out": public_name(cfg.out, True),
                    "logdir": public_name(cfg.logdir, True), "concepts": [_public_spec(s) for s in specs],
                    "resolution": size, "effective_learning_rate": lr, "num_processes": world},
            extra={"run": run})
        if cfg.compress_energy:
            delta = compress_delta(delta, energy=cfg.compress_energy)
        save_delta(delta, out)
        log.info("delta: %s of %s weight changes, %s", delta.storage, str(store).removeprefix("torch."),
                 human_bytes(out.stat().st_size))
        try:
            shutil.rmtree(ckpt)
        except FileNotFoundError:
            pass
        except OSError as e:  # a later --resume would start from it
            warn(f"{ckpt}: the finished run's checkpoint could not be removed ({e.strerror}); delete it")
        log.info("wrote %s", final_path(out))
    accelerator.wait_for_everyone()
    return out


class _Clock:
    """Wall-clock readings of a training run, taken where the loss is read back (a device sync), into `out`.

    Keys: checked_at_s, loaded_at_s and prepared_at_s (the end of each setup phase: inputs checked, pipeline
    loaded, model and optimizer ready), setup_s (start to the loop), first_step_s (start to the first step's
    loss), steps_after_first and steady_s (the steps after the first and their time), steps_per_s, data_wait_s
    (the loop's wait for its batches after the first step: batch, tokens, copy to the device) and
    data_wait_share (of steady_s)."""

    def __init__(self, out: dict[str, float] | None):
        self.out, self.t0 = out, time.perf_counter()
        self.t_loop = self.t_first = self.t_last = 0.0
        self.steps = self.first_steps = 0
        self.wait = self.wait_first = 0.0
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """A setup phase ended: `{name}_at_s` (seconds since the start) goes into `out`."""
        self.marks[f"{name}_at_s"] = time.perf_counter() - self.t0

    def loop(self) -> None:
        """The training loop starts."""
        self.t_loop = time.perf_counter()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the time inside as waiting for data."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.wait += time.perf_counter() - t

    def read(self, steps: int) -> None:
        """The loss of `steps` steps (of this run) was just read back."""
        self.t_last, self.steps = time.perf_counter(), steps
        if not self.t_first:
            self.t_first, self.first_steps, self.wait_first = self.t_last, steps, self.wait

    def done(self) -> None:
        """Write the readings into `out`."""
        if self.out is None or not self.t_first:
            return
        steady = self.t_last - self.t_first
        after = self.steps - self.first_steps
        self.out.update(self.marks)
        self.out.update(setup_s=self.t_loop - self.t0, first_step_s=self.t_first - self.t0,
                        steps_after_first=float(after), steady_s=steady,
                        steps_per_s=after / steady if steady > 0 else float("nan"),
                        data_wait_s=self.wait - self.wait_first,
                        data_wait_share=(self.wait - self.wait_first) / steady if steady > 0 else float("nan"))
        log.info("training: first step after %.1f s, then %.2f steps/s; %.0f%% of a step waiting for data",
                 self.out["first_step_s"], self.out["steps_per_s"], 100 * self.out["data_wait_share"])


def _read_losses(losses: list[tuple[int, torch.Tensor]], cfg: TrainConfig, bar: Any, accelerator: Any,
                 lr: float) -> float:
    """Read the pending losses back in one device sync: stop a diverged run, show and log them; the last one."""
    values = torch.stack([v.float() for _, v in losses]).tolist()
    for (step, _), v in zip(losses, values, strict=True):
        if not math.isfinite(v):
            raise UserError(f"training diverged: the loss became {v} at step {step}; lower "
                            f"--learning-rate (now {cfg.learning_rate:g}) or use --mixed-precision no")
        if cfg.logdir:
            accelerator.log({"loss": v, "lr": lr}, step=step - 1)
    losses.clear()
    bar.set_postfix(loss=f"{values[-1]:.4f}")
    return values[-1]
