"""The training objective: a frozen pipeline wrapped with its trainable parts, whose forward is the loss."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import encode
from .graphs import GraphedUNet
from .tokens import TokenRows

# what the feature caches may hold; beyond it, new entries are computed each time (nothing is evicted)
CACHE_BYTES = 512 * 2**20


VAE_CALL_PIXELS = 4 * 512 * 512  # images per VAE call on a GPU: as many as fit in 4 at 512 px


def vae_call_pixels(cuda: bool, checkpointing: bool) -> int:
    """How many pixels training encodes per VAE call: 4 images at 512 px on a GPU without gradient
    checkpointing, else 0 (one image per call).

    An H100 step of SD 1.5 (512 px, batch 8) keeps the GPU busy about half its wall time: the host's operator
    calls bound it (docs/performance.md), and one call for 4 photos makes 580 operator calls against 2,598. The
    cap keeps the encoder's activations at what 4 photos at 512 px take in float32 (2.5 GiB; one at a time
    0.8 GiB), also on the first step, which encodes the class images too, and with `--no-cache`. They are freed
    before the UNet runs, so without checkpointing they should stay under the step's peak (about 2.6 GiB of
    weights + 2.5 GiB against 6.9 GiB at SD 1.5, 512 px, batch 8; projected, not measured on a GPU). With
    checkpointing (a 3.8-4.2 GiB peak) they would set it, and on the CPU peak RSS is the measure."""
    return VAE_CALL_PIXELS if cuda and not checkpointing else 0


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample sum(mask * err^2) / sum(mask) over all elements, averaged over the batch.

    `mask` is (B, 1, h, w) and is broadcast over channels, so each sample's loss is a true mean over its
    unmasked elements (the reference divides by the single-channel mask sum, scaling the loss by C).
    """
    err = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B, C, h, w)
    mask = mask.to(err).expand_as(err)
    return ((err * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1.0)).mean()


class CustomDiffusion(nn.Module):
    """UNet + text encoder(s) + VAE + noise scheduler; `forward(batch)` returns the masked denoising loss.

    Wrapping the whole objective in one module lets accelerate/DDP synchronise the gradients of every
    trainable tensor (UNet K/V and the new token rows) in one place. With `text_encoder_2` (SDXL) the UNet
    reads both encoders' penultimate states, the pooled projection of the second, and per-image time ids.

    Two caches skip work whose result never changes (`cache=True`): the text features of prompts without a
    new token (the encoders are frozen except the new rows; off when an encoder has active dropout), and the
    VAE posterior of images the batch marks with a latent key (regularization images, and targets under
    --no-augment: pixels that never change). The posterior is cached, not a latent: each step still samples it
    with the step's generator, as without cache.

    The VAE encodes the photos one at a time by default: the encoder's full-resolution activations are the
    largest tensors of a step (SD 1.5, 4 images at 512 px in float32: 2.5 GiB at once, 0.8 GiB one by one;
    benchmarks/vae_memory.py). `vae_call_pixels=N` encodes as many images per call as fit in N pixels, with a
    quarter of the operator calls for 4 photos in one call (benchmarks/step_overhead.py): what pays where the
    host's calls bound the step (a GPU) and memory is not the priority (see `vae_call_pixels`).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, scheduler,
                 token_rows: TokenRows | None = None, text_encoder_2: nn.Module | None = None,
                 token_rows_2: TokenRows | None = None, cache: bool = False, vae_call_pixels: int = 0):
        super().__init__()
        self.vae_call_pixels = vae_call_pixels
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.text_encoder_2 = text_encoder_2
        self.token_rows, self.token_rows_2 = token_rows, token_rows_2
        self.scheduler = scheduler
        encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
        self.cache_text = cache and not any(_has_dropout(e) for e in encoders)
        self.cache_latents = cache
        self.text_cache: dict[Hashable, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.latent_cache: dict[Hashable, torch.Tensor] = {}
        self._cached_bytes = 0
        self.vae_images = 0  # images the VAE encoded (a cached posterior is not counted)
        new = [i for r in (token_rows, token_rows_2) if r is not None for i in r.token_ids]
        self._new_ids = torch.tensor(sorted(set(new)), dtype=torch.long)
        self.graphed_unet: GraphedUNet | None = None  # set by training under --cuda-graphs

    def _encode(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text_encoder_2 is None:
            return encode([self.text_encoder], [input_ids])
        return encode([self.text_encoder, self.text_encoder_2], [input_ids, input_ids_2])

    def _room(self, t: torch.Tensor) -> bool:
        """Count `t` against CACHE_BYTES; False when it no longer fits."""
        size = t.numel() * t.element_size()
        if self._cached_bytes + size > CACHE_BYTES:
            return False
        self._cached_bytes += size
        return True

    def encode_text(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text features (B, T, D) for the UNet's cross-attention, and the pooled embedding (B, P) on SDXL.

        Ids may live on the CPU (the cache reads them there without a device sync); they move to the
        text encoder's device."""
        device = self.text_encoder.get_input_embeddings().weight.device
        if not self.cache_text:
            return self._encode(input_ids.to(device), None if input_ids_2 is None else input_ids_2.to(device))
        ids = input_ids.cpu()
        ids_2 = None if input_ids_2 is None else input_ids_2.cpu()
        both = ids if ids_2 is None else torch.cat([ids, ids_2], dim=1)  # (B, T or 2T)
        fixed = (~torch.isin(both, self._new_ids).any(dim=1)).tolist()  # no new token: features never change
        keys = [tuple(row) for row in both.tolist()]
        todo = [i for i, k in enumerate(keys) if not (fixed[i] and k in self.text_cache)]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if todo:
            sel = torch.tensor(todo)
            states, pooled = self._encode(ids[sel].to(device), None if ids_2 is None else ids_2[sel].to(device))
            for j, i in enumerate(todo):
                fresh[i] = (states[j], None if pooled is None else pooled[j])
                if fixed[i] and keys[i] not in self.text_cache and self._room(states[j]):
                    # a copy: a view would keep the whole batch's features alive
                    self.text_cache[keys[i]] = (states[j].detach().clone(),
                                                None if pooled is None else pooled[j].detach().clone())
        if len(fresh) == len(keys):  # nothing from the cache: the encoder's batch as is
            return states, pooled
        rows = [fresh[i] if i in fresh else self.text_cache[k] for i, k in enumerate(keys)]
        # each part in the encoder's own dtype for it, as an uncached batch has it (SDXL's pooled projection
        # may differ from its states under autocast); --cuda-graphs replays only for the captured dtypes
        like = next(iter(fresh.values())) if fresh else rows[0]
        states = torch.stack([r[0].to(like[0].dtype) for r in rows])
        pooled = None if like[1] is None else torch.stack([r[1].to(like[1].dtype) for r in rows])
        return states, pooled

    @torch.no_grad()
    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (B, 2 * 4, h, w): mean and log-variance."""
        self.vae_images += pixels.shape[0]
        # a float32 VAE that asks for upcasting (SDXL's overflows in float16) encodes outside fp16 autocast
        upcast = self.vae.dtype == torch.float32 and getattr(self.vae.config, "force_upcast", False)
        per_call = max(1, self.vae_call_pixels // (pixels.shape[-2] * pixels.shape[-1]))
        with torch.autocast(pixels.device.type, enabled=False) if upcast else nullcontext():
            return torch.cat([self.vae.encode(part.to(self.vae.dtype)).latent_dist.parameters
                              for part in pixels.split(per_call)])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None,
                      keys: Sequence[Hashable | None] | None = None) -> torch.Tensor:
        """Latents (B, 4, h, w) of images in [-1, 1], sampled from the VAE posterior and scaled.

        `keys[i]` (not None) marks image i as fixed: its posterior is cached under that key."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if not self.cache_latents or keys is None or not any(k is not None for k in keys):
            moments = self._moments(pixels)
        else:
            todo = [i for i, k in enumerate(keys) if k is None or k not in self.latent_cache]
            fresh = dict(zip(todo, self._moments(pixels[torch.tensor(todo)]), strict=True)) if todo else {}
            for i in todo:
                if keys[i] is not None and self._room(fresh[i]):
                    self.latent_cache[keys[i]] = fresh[i].clone()
            moments = torch.stack([fresh[i] if i in fresh else self.latent_cache[k] for i, k in enumerate(keys)])
        # the posterior's own sampling: the same draws from `generator` with or without the cache
        latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
        return latents.float() * self.vae.config.scaling_factor

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None, input_ids_2: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, latent_keys: Sequence[Hashable | None] | None = None
                ) -> torch.Tensor:
        """Masked MSE of the UNet's prediction (noise, or v for v-prediction) at random timesteps.

        SDXL also takes `input_ids_2` (B, T) of the second tokenizer and `time_ids` (B, 6). `latent_keys`
        marks images whose VAE posterior may be cached (see the class)."""
        latents = self.encode_images(pixel_values, generator, latent_keys)  # (B, 4, h, w)
        b = latents.shape[0]
        # drawn on the generator's device (CPU) and moved, so seeds give the same batch on any accelerator
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        states, pooled = self.encode_text(input_ids, input_ids_2)  # (B, T, D), (B, P) or None
        added = None
        if pooled is not None:
            if time_ids is None:
                raise ValueError("an SDXL UNet needs time_ids (B, 6)")
            added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled)}
        if self.graphed_unet is not None:
            pred = self.graphed_unet(noisy, t, states, added)
        else:
            pred = self.unet(noisy, t, states, added_cond_kwargs=added).sample
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction type {kind}")
        return masked_mse(pred, target, mask)


def _has_dropout(module: nn.Module) -> bool:
    """True when a module holds a dropout with p > 0 (then its outputs vary from call to call in training)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()):
        return True
    cfg = getattr(module, "config", None)
    return any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "dropout", "hidden_dropout"))

