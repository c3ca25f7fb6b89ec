"""The training objective: a frozen pipeline wrapped with its trainable parts, whose forward is the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import encode
from .tokens import TokenRows


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
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, scheduler,
                 token_rows: TokenRows | None = None, text_encoder_2: nn.Module | None = None,
                 token_rows_2: TokenRows | None = None):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.text_encoder_2 = text_encoder_2
        self.token_rows, self.token_rows_2 = token_rows, token_rows_2
        self.scheduler = scheduler

    def encode_text(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text features (B, T, D) for the UNet's cross-attention, and the pooled embedding (B, P) on SDXL."""
        if self.text_encoder_2 is None:
            return encode([self.text_encoder], [input_ids])
        return encode([self.text_encoder, self.text_encoder_2], [input_ids, input_ids_2])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Latents (B, 4, h, w) of images in [-1, 1], sampled from the VAE posterior and scaled."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.sample(generator=generator).float() * self.vae.config.scaling_factor

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None, input_ids_2: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Masked MSE of the UNet's prediction (noise, or v for v-prediction) at random timesteps.

        SDXL also takes `input_ids_2` (B, T) of the second tokenizer and `time_ids` (B, 6)."""
        latents = self.encode_images(pixel_values, generator)  # (B, 4, h, w)
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
        pred = self.unet(noisy, t, states, added_cond_kwargs=added).sample
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction type {kind}")
        return masked_mse(pred, target, mask)
