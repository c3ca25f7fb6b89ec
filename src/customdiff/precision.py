"""Frozen weights in the mixed-precision dtype, trained weights in float32 (master weights).

Under --mixed-precision fp16/bf16 the forward runs under autocast anyway, so a float32 copy of the frozen UNet,
VAE and text encoders only costs memory (3.4 GB for SD 1.5's UNet) and the time to load and move it. We store
them in the low dtype and keep in float32 what the optimizer updates: the trained UNet tensors and the text
encoders' input embeddings (the new token rows are initialised from them and written back into them).

A local base with safetensors weights loads directly in the low dtype, and the float32 values of those kept
tensors are read back from its files (header + the few tensors needed), so the delta is taken against the
exact float32 base. Anything else loads in float32 and is cast in place after the trainable set is known.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import resolve_base
from .conditioning import sides
from .surgery import TRAIN_CHOICES

log = logging.getLogger(__name__)

LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# the default (non-variant) weight files diffusers and transformers load, plain or sharded
_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors$")
_EMBEDDING = "token_embedding.weight"


def frozen_dtype(mixed_precision: str, frozen_weights: str) -> torch.dtype | None:
    """The dtype frozen weights are stored in: the mixed-precision dtype under `auto`, None (unchanged) else."""
    return LOW_DTYPES.get(mixed_precision) if frozen_weights == "auto" else None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if _WEIGHTS.match(p.name)) if folder.is_dir() else []


def _read(files: list[Path], want: Any) -> dict[str, torch.Tensor]:
    """Tensors of the files whose key satisfies `want(key)`, as float32 on the CPU."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                if want(k):
                    out[k] = st.get_tensor(k).float()
    return out


def read_kept(base: str, train: str, xl: bool) -> dict[str, dict[str, torch.Tensor]] | None:
    """The float32 tensors kept in float32 under mixed precision, read from a local base's safetensors files:
    {"unet": {trained name: tensor}, "text_encoder": {"embedding": tensor}, ...}; None when they cannot all be
    read (a hub id, pickled weights, an unusual layout) or when the whole UNet trains (nothing to gain)."""
    if train not in TRAIN_CHOICES or train == "unet":
        return None
    try:
        root = Path(resolve_base(base))
    except ImportError:
        return None
    frags = TRAIN_CHOICES[train]
    kept: dict[str, dict[str, torch.Tensor]] = {}
    unet_files = _weight_files(root / "unet")
    if not unet_files:
        return None
    kept["unet"] = _read(unet_files, lambda k: any(f in k for f in frags)) if frags else {}
    if frags and not kept["unet"]:
        return None
    for enc in ("text_encoder", "text_encoder_2") if xl else ("text_encoder",):
        rows = _read(_weight_files(root / enc), lambda k: k.endswith(_EMBEDDING))
        if len(rows) != 1:
            return None
        kept[enc] = {"embedding": next(iter(rows.values()))}
    return kept


def restore_kept(pipe: Any, kept: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Put the float32 tensors of `read_kept` into a pipeline loaded in a low dtype; False (nothing changed)
    when a name or shape does not match."""
    unet_params = dict(pipe.unet.named_parameters())
    plan: list[tuple[nn.Parameter, torch.Tensor]] = []
    for name, t in kept["unet"].items():
        p = unet_params.get(name)
        if p is None or p.shape != t.shape:
            return False
        plan.append((p, t))
    for side in sides(pipe):
        emb = getattr(pipe, side.encoder).get_input_embeddings()
        t = kept.get(side.encoder, {}).get("embedding")
        if t is None or emb.weight.shape != t.shape:
            return False
        plan.append((emb.weight, t))
    with torch.no_grad():
        for p, t in plan:
            p.data = t.to(p.device)
    return True


_NORMS = (nn.LayerNorm, nn.GroupNorm)


class _StoredGroupNorm(nn.GroupNorm):
    """A GroupNorm that runs in the dtype it is stored in, outside autocast (which would upcast it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


class _StoredLayerNorm(nn.LayerNorm):
    """A LayerNorm that runs in the dtype it is stored in, outside autocast (which would upcast it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


_STORED_NORMS: dict[type, type] = {nn.GroupNorm: _StoredGroupNorm, nn.LayerNorm: _StoredLayerNorm}


def store_frozen(module: nn.Module, dtype: torch.dtype, keep: Collection[str] = (), norms: bool = False) -> int:
    """Cast every floating-point parameter of `module` not named in `keep` to `dtype`; bytes saved.

    With `norms`, its normalisation layers (plain LayerNorm/GroupNorm with weights, none kept) are cast too and
    run in `dtype` outside autocast, as in a model stored wholly in that dtype: autocast would run them in
    float32, and a float32 norm output feeds a float32 activation into every following op that saves its input
    for the backward pass (GPU kernels accumulate a low-precision norm's statistics in float32). Otherwise they
    stay float32 (a few kB): on the CPU a float32 input (from a float32 embedding) into a low-precision LayerNorm
    is an error, which is why a text encoder keeps them."""
    kept_norms: set[str] = set()
    for m, mod in module.named_modules():
        if not isinstance(mod, _NORMS):
            continue
        names = [f"{m}.{n}" if m else n for n, _ in mod.named_parameters(recurse=False)]
        if (norms and type(mod) in _STORED_NORMS and getattr(mod, "weight", None) is not None
                and not any(n in keep for n in names)):
            mod.__class__ = _STORED_NORMS[type(mod)]
        else:
            kept_norms.update(names)
    saved = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in kept_norms and p.dtype != torch.float32:  # loaded in the low dtype: back to float32
                p.data = p.data.float()
                continue
            if name in keep or name in kept_norms or not p.is_floating_point() or p.dtype == dtype:
                continue
            saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
            p.data = p.data.to(dtype)
    return saved


def embedding_name(encoder: nn.Module) -> str:
    """The parameter name of a text encoder's input embedding table."""
    weight = encoder.get_input_embeddings().weight
    return next(n for n, p in encoder.named_parameters() if p is weight)


def store_pipeline_frozen(pipe: Any, dtype: torch.dtype, trained: Iterable[str]) -> None:
    """Frozen UNet, VAE and text encoders of a pipeline in `dtype`; trained UNet tensors and input embeddings
    stay float32; the UNet's and VAE's normalisation layers run in `dtype` (store_frozen). A float16 VAE that asks
    for upcasting (SDXL's overflows) stays float32."""
    saved = store_frozen(pipe.unet, dtype, set(trained), norms=True)
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)
        log.info("the VAE stays float32 (its config asks for upcasting in float16)")
    else:
        saved += store_frozen(pipe.vae, dtype, norms=True)
    for side in sides(pipe):
        enc = getattr(pipe, side.encoder)
        saved += store_frozen(enc, dtype, {embedding_name(enc)})
    log.info("frozen weights stored in %s (%.2f GB less than float32); trained tensors stay float32",
             str(dtype).removeprefix("torch."), saved / 1e9)
