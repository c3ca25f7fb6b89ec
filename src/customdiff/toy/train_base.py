"""Training of the toy Stable Diffusion: the VAE, then the UNet and the text encoder (started from the toy CLIP's
text tower) jointly on VAE latents."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import run_loop
from .models import make_scheduler, make_unet, make_vae

log = logging.getLogger(__name__)
CAPTION_DROPOUT = 0.1  # empty captions, so classifier-free guidance has an unconditional model


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range the SD VAE expects."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(images: np.ndarray, ckpt: Path, steps: int, batch: int = 32, seed: int = 1):
    """AutoencoderKL with L1+L2 reconstruction and a tiny KL term (the latent is bigger than the image)."""
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def step(i: int, rng: np.random.Generator, gen: torch.Generator) -> float:
        x = to_tensor(images[rng.integers(0, len(images), batch)])  # (B, 3, 32, 32)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    losses = run_loop(ckpt, {"vae": vae}, opt, steps, 1e-3, step, seed, name="vae")
    return vae.eval(), losses


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 500) -> tuple[torch.Tensor, float]:
    """Posterior mean of every image, and the scaling factor 1/std of those means.

    The UNet is trained on posterior means (see `train_unet_text`), so their spread sets the scale.
    """
    mean = torch.cat([vae.encode(to_tensor(images[i:i + batch])).latent_dist.mean
                      for i in range(0, len(images), batch)])  # (N, 4, 16, 16)
    return mean, float(1.0 / mean[:2000].std())


@torch.no_grad()
def roundtrip_all(vae, images: np.ndarray) -> np.ndarray:
    """uint8 images after a VAE round trip (posterior mean, decoded): as generated images can show them."""
    return decode_all(vae, encode_all(vae, images)[0])


@torch.no_grad()
def decode_all(vae, mean: torch.Tensor, batch: int = 500) -> np.ndarray:
    """uint8 (N, H, W, 3) images decoded from posterior means: renders as the autoencoder can express them."""
    out = [vae.decode(mean[i:i + batch].float()).sample.clamp(-1, 1) for i in range(0, len(mean), batch)]
    x = torch.cat(out).add(1.0).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, as the pipeline does it."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet_text(
    mean: torch.Tensor, scaling: float, ids: torch.Tensor, empty_ids: torch.Tensor,
    text_encoder, ckpt: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 2,
    sample_p: np.ndarray | None = None,
):
    """Joint v-prediction training of the UNet and `text_encoder`; returns EMA copies and the losses.

    The text encoder starts from the toy CLIP's text tower (`models.text_encoder_from_clip`), whose words already
    mean something visual. Started from random weights (builds up to 2026-11-25) it bound the pattern word slowly:
    at 3,000 steps the base drew the named pattern in 1.5% of samples, against 16.4% when started from the CLIP
    tower and 10.4% on the frozen tower; the frozen tower cost two-object shape later (docs/toy_model_card.md).

    The first build (epsilon prediction on sampled latents, 3,000 steps) drew coloured blobs: 23% of shapes
    right. Diagnosis: started from a real image noised to strength 0.3-0.5 it redrew the right shape (84-94%),
    from 0.9 only blobs, so the shape was never decided at the noisy timesteps. The epsilon loss weights the
    clean-image error by the signal-to-noise ratio, which is ~0.1 there; v-prediction (as Stable Diffusion 2)
    weights it by SNR + 1, ten times more where layout and shape are decided. The UNet is also trained on
    posterior means (the VAE's posterior noise is a third of the latent spread in channel 0), with lr 1e-3 for
    12,000 steps: 100% of shapes right. Which change mattered most was not isolated (docs/toy_model_card.md).
    """
    torch.manual_seed(seed)
    unet = make_unet()
    te = text_encoder.train()
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    # no weight decay: unused rows (the rare initializer words) must stay as initialised. The fused kernel and
    # the one foreach EMA update save about 8% of the step (benchmarks/toy_base_step.py); builds before
    # 2026-11-27 looped over the tensors.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    sched = make_scheduler()
    acp = sched.alphas_cumprod
    v_pred = sched.config.prediction_type == "v_prediction"

    def step(i: int, rng: np.random.Generator, gen: torch.Generator) -> float:
        # uniform over the images, or drawn with the probabilities `sample_p` (one per image)
        idx = torch.from_numpy(rng.integers(0, len(mean), batch) if sample_p is None
                               else rng.choice(len(mean), batch, p=sample_p))
        z0 = mean[idx] * scaling  # (B, 4, 16, 16)
        tok = ids[idx].clone()
        drop = torch.from_numpy(rng.random(batch) < CAPTION_DROPOUT)
        tok[drop] = empty_ids
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        h = te(tok).last_hidden_state  # (B, 32, 64)
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if v_pred else noise
        loss = F.mse_loss(unet(zt, t, h).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + i) / (10 + i))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        return loss.item()

    modules = {"unet": unet, "te": te, "ema_unet": ema_unet, "ema_te": ema_te}
    losses = run_loop(ckpt, modules, opt, steps, lr, step, seed, name="unet+text")
    return ema_unet.eval(), ema_te.eval(), losses
