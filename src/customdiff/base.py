"""Loading a base text-to-image pipeline: a local diffusers folder, a hub id, or the embedded toy world."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .conditioning import SD_PIPELINE, XL_PIPELINE
from .errors import UserError
from .validate import warn

log = logging.getLogger(__name__)

_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_XL_COMPONENTS = _COMPONENTS + ("text_encoder_2", "tokenizer_2")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; ./x, ../x, /x and a/b/c are paths


def default_device() -> str:
    """cuda when available, else cpu (what --device means when left out)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(value: str | None) -> str:
    """The --device value, refused in one line unless this machine has it; left out (None), the default."""
    if value is None:
        return default_device()
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {value}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise UserError(f"--device {value}: this machine has {count or 'no'} CUDA GPU{'s' * (count != 1)}; "
                            "use cpu or leave --device out")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {value}: this machine has no Apple GPU (mps); use cpu or leave --device out")
    elif dev.type != "cpu":
        raise UserError(f"--device {value}: not supported; use cpu, cuda or cuda:N")
    return value


def resolve_base(base: str) -> str:
    """Map `toy` to the shipped toy pipeline folder; return local folders and hub ids unchanged; refuse a path
    that neither exists nor reads as a hub id (owner/name), before anything tries the network."""
    if base == "toy":
        from .toy import paths

        return paths()["base"]
    if not Path(base).exists() and not _HUB_ID.fullmatch(base):
        raise UserError(f"--base {base}: no such folder; give a pipeline folder, a hub id (owner/name) or 'toy'")
    return base


def _check_local_folder(path: Path) -> str:
    """Check a pipeline folder's layout; return the pipeline class it names (SD or SDXL)."""
    if not (path / "model_index.json").is_file():
        raise UserError(f"--base {path}: no model_index.json; give a diffusers Stable Diffusion pipeline folder or 'toy'")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--base {path}/model_index.json is not valid JSON ({e}); re-save the pipeline") from e
    if not isinstance(index, dict):
        raise UserError(f"--base {path}/model_index.json is not a JSON object; re-save the pipeline")
    class_name = str(index.get("_class_name") or "")
    wanted = _XL_COMPONENTS if class_name.startswith("StableDiffusionXL") else _COMPONENTS
    missing = [c for c in wanted if not isinstance(index.get(c), list) or index[c][0] is None
               or not (path / c).is_dir()]
    if missing and class_name and not class_name.startswith("StableDiffusion"):
        raise UserError(f"--base {path}: a {class_name}, which customdiff does not train; give a Stable Diffusion "
                        "1.x/2.x or SDXL pipeline folder")
    if missing:
        raise UserError(f"--base {path}: missing pipeline components {', '.join(missing)}; save it with save_pretrained")
    return _family(class_name, path)


@functools.cache  # once per folder: a command reads model_index.json at its checks and again as it loads
def _loading_as(where: str, class_name: str, family: str) -> None:
    warn(f"--base {where}: a {class_name}; loading it as {family}")


def _family(class_name: str, where: Any) -> str:
    """StableDiffusionXLPipeline for SDXL text-to-image folders, StableDiffusionPipeline for the rest."""
    if class_name.startswith("StableDiffusionXL"):
        if class_name != XL_PIPELINE:
            _loading_as(str(where), class_name, XL_PIPELINE)
        return XL_PIPELINE
    if class_name and not class_name.startswith("StableDiffusion"):
        _loading_as(str(where), class_name, SD_PIPELINE)
    return SD_PIPELINE


def pipeline_class(base: str) -> str:
    """The pipeline family of a base, read from its model_index.json (hub ids: the hub's copy)."""
    path = Path(resolve_base(base))
    if path.exists():
        return _check_local_folder(path)
    from diffusers import DiffusionPipeline

    try:
        return _family(str(DiffusionPipeline.load_config(str(path)).get("_class_name", "")), base)
    except (OSError, ValueError) as e:
        if _offline(e):
            raise UserError(f"--base {base}: no such folder, and the hub copy is neither cached nor reachable; "
                            "download the pipeline where there is a network and give its folder") from e
        raise UserError(f"--base {base}: cannot read its model_index.json ({str(e).splitlines()[0]})") from e


def _offline(e: BaseException) -> bool:
    """Whether a hub download failed for want of a network (any exception in its chain says so)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)) or \
                type(seen).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_pipeline(base: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load a Stable Diffusion (1.x/2.x) or SDXL pipeline from a local folder, a hub id or `toy`; the class
    comes from the folder's model_index.json, so every command takes either kind of base."""
    import diffusers

    resolved = resolve_base(base)
    path = Path(resolved)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if path.exists():
        kwargs["local_files_only"] = True  # a local path never touches the network
    elif os.sep in resolved and resolved.count("/") != 1:
        raise UserError(f"--base {base}: no such folder; give a pipeline folder, a hub id (owner/name) or 'toy'")
    name = pipeline_class(base)
    if name == SD_PIPELINE:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype; older releases only know it
            warnings.simplefilter("ignore", FutureWarning)
            pipe = getattr(diffusers, name).from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:  # KeyError: a damaged tokenizer.json (measured)
        raise UserError(f"--base {base}: cannot load a {name} ({_first_line(e)}); re-save the pipeline") from e
    for attr in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, attr, None) is not None:
            _check_vocabulary(base, attr, getattr(pipe, attr))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    log.debug("loaded base %s (%s, prediction %s)", base, resolved, pipe.scheduler.config.get("prediction_type"))
    return pipe


def base_vocabulary(base: str) -> set[str] | None:
    """Every token the base's tokenizers know (both of SDXL's), read without loading a model; None for a hub id."""
    import transformers

    path = Path(resolve_base(base))
    if not path.exists():
        return None
    sides = ("tokenizer", "tokenizer_2") if _check_local_folder(path) == XL_PIPELINE else ("tokenizer",)
    index = _read_config(path / "model_index.json")
    vocab: set[str] = set()
    for side in sides:
        cls = getattr(transformers, str(index[side][-1]), transformers.AutoTokenizer)
        try:
            tok = cls.from_pretrained(str(path / side), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:  # KeyError: a damaged tokenizer.json (measured)
            raise UserError(f"--base {base}: cannot load its {side} ({_first_line(e)}); re-save the pipeline") from e
        vocab.update(_check_vocabulary(base, side, tok).get_vocab())
    return vocab


def _first_line(e: BaseException) -> str:
    """An exception in a few words: its message's first line, or its type and message (a KeyError's is a key)."""
    text = str(e).strip()
    if isinstance(e, KeyError) or not text:
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text.splitlines()[0]


def _check_vocabulary(base: str, side: str, tokenizer: Any) -> Any:
    """The tokenizer, refused when empty: transformers 5 silently builds a 2-token one when its files are missing
    (measured)."""
    if len(tokenizer) <= 2:
        raise UserError(f"--base {base}: the {side} has no vocabulary; the folder lacks tokenizer files")
    return tokenizer


@dataclass
class BaseFacts:
    """What the checks at the door need from a base, read from its config files without loading weights."""

    factor: int  # VAE downsampling: image pixels per latent pixel
    native_resolution: int  # the UNet's sample size in pixels
    num_train_timesteps: int
    unet_config: dict[str, Any]
    pipeline: str = SD_PIPELINE  # StableDiffusionPipeline or StableDiffusionXLPipeline
    # the most denoising steps the scheduler can take: with "leading" spacing its last timestep is
    # (steps - 1) * (num_train_timesteps // steps) + steps_offset, which must stay below num_train_timesteps
    max_sampling_steps: int = 999


STEPS_WHY = " (the scheduler's training steps less its steps_offset)"
SAMPLING_MULTIPLE_WHY = " (diffusers samples sizes divisible by 8, and by the VAE's factor)"


def sampling_multiple(facts: BaseFacts) -> int:
    """What a sampling size must be a multiple of: 8 (diffusers' pipelines refuse others) and the VAE factor."""
    return math.lcm(8, facts.factor)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--base {path}: unreadable config ({str(e)[:120]}); re-save the pipeline") from e
    if not isinstance(cfg, dict):
        raise UserError(f"--base {path}: not a config object; re-save the pipeline")
    return cfg


def base_facts(base: str) -> BaseFacts | None:
    """Facts of a local pipeline folder (or `toy`) from its config files; None for a hub id."""
    try:
        path = Path(resolve_base(base))
    except ImportError:
        return None
    if not path.exists():  # a hub id (resolve_base refused anything else)
        return None
    name = _check_local_folder(path)
    unet = _read_config(path / "unet" / "config.json")
    vae = _read_config(path / "vae" / "config.json")
    sched = next((p for p in (path / "scheduler").glob("scheduler_config.json")), None)
    sched_cfg = _read_config(sched) if sched else {}
    steps = int(sched_cfg.get("num_train_timesteps", 1000))
    offset = int(sched_cfg.get("steps_offset", 0) or 0)
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    size = unet.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    return BaseFacts(factor=factor, native_resolution=size * factor, num_train_timesteps=steps, unet_config=unet,
                     pipeline=name, max_sampling_steps=max(1, steps - offset))


def trainable_bytes(facts: BaseFacts, train: str) -> int:
    """Bytes of a float32 delta of `train` on this UNet, counted on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    from .surgery import trainable_names

    cfg = {k: v for k, v in facts.unet_config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - an unusual UNet: skip the estimate, loading reports real problems
        log.debug("no size estimate for this UNet (%s)", e)
        return 0
    names = set(trainable_names(unet, train)) if train != "tokens" else set()
    return 4 * sum(p.numel() for n, p in unet.named_parameters() if n in names)
