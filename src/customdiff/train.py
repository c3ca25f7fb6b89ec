"""The Custom Diffusion training loop on accelerate, with resumable checkpoints and the delta as output."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .base import base_facts, load_pipeline, trainable_bytes
from .classimages import default_cache_dir, ensure_class_images
from .compress import compress_delta
from .conditioning import is_xl, pipeline_name, sides, tokenize
from .config import TrainConfig
from .data import ConceptSpec, TrainData, validate_concepts
from .delta import Delta, atomic_save, base_fingerprint, check_finite, read_metadata, read_tensors, save_delta
from .errors import UserError
from .model import CustomDiffusion
from .outputs import make_dirs
from .surgery import detach_start_token, freeze_except, trainable_names
from .tokens import TokenRows, add_tokens, default_initializers
from .validate import check_free_space, check_multiple, check_out_file, deferred_warnings, human_bytes

log = logging.getLogger(__name__)

# called after every optimizer step with (steps done, loss); returning True stops the run at that step
StepCallback = Callable[[int, float], "bool | None"]


class TrainingStopped(Exception):
    """A step callback asked the run to stop; a checkpoint of the last step was saved (resume continues it)."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}; checkpoint in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


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
        facts = base_facts(cfg.base)
        if facts is not None:
            check_multiple("--resolution", cfg.resolution, facts.factor, " (the VAE's factor)")
        out = check_out_file("--out", cfg.out, ".safetensors")
        ckpt = checkpoint_dir(out)
        if ckpt.exists() and not ckpt.is_dir():
            raise UserError(f"--out {cfg.out}: {ckpt} (its checkpoint folder) is a file; remove or rename it")
        if facts is not None:
            size = trainable_bytes(facts, cfg.train)
            # the delta, plus params and two AdamW moments in a checkpoint when checkpointing
            check_free_space("--out", out, size * (4 if cfg.checkpoint_every else 1))
        if cfg.resume and (ckpt / "latest.safetensors").is_file():
            check_checkpoint(ckpt, cfg)
        specs, tokens = validate_concepts(specs, cfg.resolution or (facts.native_resolution if facts else 0), cache)
        if cfg.initializer and len(cfg.initializer) != len(tokens):
            raise UserError(f"--initializer gives {len(cfg.initializer)} words for {len(tokens)} tokens {tokens}")
    return specs, tokens


def _save_checkpoint(path: Path, step: int, cfg: TrainConfig, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach().cpu().contiguous()
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"opt.{name}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {"step": str(step), "config": json.dumps(cfg.to_dict())}
    make_dirs(path.parent)
    path.mkdir(exist_ok=True)
    atomic_save(tensors, meta, path / "latest.safetensors")
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
    tensors = read_tensors(file)
    check_finite(tensors, file)
    differ = cfg.resume_changes(saved)
    if differ:
        raise UserError(f"{file}: the checkpoint was made with other settings ({', '.join(differ)}); "
                        "resume with the same flags or start a new --out")
    return tensors


def _load_checkpoint(path: Path, cfg: TrainConfig, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer) -> int:
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
    return int(read_metadata(file)["step"])


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
          callback: StepCallback | None = None) -> Path:
    """Fine-tune cross-attention (and new token rows) on the concepts; write the delta to cfg.out.

    `pipe` may be an already loaded base pipeline (it is modified in place: trained weights, new tokens).
    `callback(step, loss)` runs after each step; while it runs, `pipe` samples with the weights and token rows
    trained so far. When it returns True, a checkpoint of that step is saved and TrainingStopped is raised.
    """
    from accelerate import Accelerator

    images: dict[Path, Any] = {}
    specs, tokens = _check_config(cfg, specs, images)  # resolved copies: the caller's specs stay as given
    out = Path(cfg.out)
    ckpt = checkpoint_dir(out)
    # without a GPU, accelerate only forms a multi-process (gloo) group when told it runs on the CPU
    on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation,
                              log_with="tensorboard" if cfg.logdir else None,
                              project_dir=cfg.logdir or None)
    is_main = accelerator.is_main_process
    pipe = pipe if pipe is not None else load_pipeline(cfg.base, device=accelerator.device)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    factor = pipe.vae_scale_factor
    size = cfg.resolution or unet.config.sample_size * factor
    if size % factor:
        raise UserError(f"--resolution {size} must be a multiple of the VAE's factor {factor}")
    specs = _reg_sources(cfg, specs, pipe, is_main, accelerator, progress)
    data = TrainData(specs, size, factor, augment=cfg.augment, flip=cfg.flip, cache=images)

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
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for enc in (text_encoder, text_encoder_2) if text_encoder_2 is not None else (text_encoder,):
            enable = getattr(enc, "activation_checkpointing_enable", None) or enc.gradient_checkpointing_enable
            enable()  # transformers 5 renamed it
    model = CustomDiffusion(unet, text_encoder, vae, pipe.scheduler, token_rows, text_encoder_2,
                            token_rows_2).to(accelerator.device)
    model.train()
    params = {**trainable, **{f"<{prefix}>": r.rows for prefix, r in rows_by_side.items()}}

    world = accelerator.num_processes
    lr = cfg.learning_rate * (cfg.batch_size * cfg.gradient_accumulation * world if cfg.scale_lr else 1)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:
        if (ckpt / "latest.safetensors").is_file():
            start = _load_checkpoint(ckpt, cfg, params, optimizer)
            log.info("resuming %s from step %d", out, start)
        else:
            log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt)
    log.info("training %d token(s) %s initialised from %s; lr %.2e; %d steps at batch %d x %d process(es)",
             len(tokens), tokens, inits, lr, cfg.steps, cfg.batch_size, world)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.logdir:
        accelerator.init_trackers("customdiff", config={k: str(v) for k, v in cfg.to_dict().items()})

    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not (progress and is_main))
    rank = accelerator.process_index
    for step in range(start, cfg.steps):
        for micro in range(cfg.gradient_accumulation):
            key = step * cfg.gradient_accumulation + micro
            batch = data.batch(cfg.seed, key, rank, cfg.batch_size)
            ids = tokenize([getattr(pipe, side.tokenizer) for side in sides(pipe)], batch["prompts"])
            xl = {"input_ids_2": ids[1].to(accelerator.device), "time_ids": batch["time_ids"].to(accelerator.device)
                  } if len(ids) > 1 else {}
            gen = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + key * 7919 + rank)
            with accelerator.accumulate(model):
                loss = model(batch["pixel_values"].to(accelerator.device), ids[0].to(accelerator.device),
                             batch["mask"].to(accelerator.device), generator=gen, **xl)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise UserError(f"training diverged: the loss became {loss.item()} at step {step + 1}; lower "
                            f"--learning-rate (now {cfg.learning_rate:g}) or use --mixed-precision no")
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.logdir:
            accelerator.log({"loss": loss.item(), "lr": lr}, step=step)
        stop = bool(callback(step + 1, loss.item())) if callback is not None else False
        if stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps):
            if is_main:
                _save_checkpoint(ckpt, step + 1, cfg, params, getattr(optimizer, "optimizer", optimizer))
            accelerator.wait_for_everyone()
        if stop:
            bar.close()
            raise TrainingStopped(step + 1, ckpt)
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
            base={"name": cfg.base, "fingerprint": fingerprint, "vocab_size": len(tokenizer) - len(tokens),
                  "pipeline": pipeline_name(pipe)},
            token_info=[{"token": t, "initializer": w, "class": next(s.class_word() for s in specs if t in s.tokens)}
                        for t, w in zip(tokens, inits, strict=True)],
            config={**cfg.to_dict(), "concepts": [asdict(s) for s in specs], "resolution": size,
                    "effective_learning_rate": lr, "num_processes": world})
        if cfg.compress_energy:
            delta = compress_delta(delta, energy=cfg.compress_energy)
        save_delta(delta, out)
        log.info("delta: %s of %s weight changes, %s", delta.storage, str(store).removeprefix("torch."),
                 human_bytes(out.stat().st_size))
        shutil.rmtree(ckpt, ignore_errors=True)
        log.info("wrote %s", out)
    accelerator.wait_for_everyone()
    return out
