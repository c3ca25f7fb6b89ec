"""Tiny configurations of the standard Stable Diffusion and CLIP components (same classes, small sizes)."""

from __future__ import annotations

from .tokenizer import MAX_LENGTH
from .world import SIZE

LATENT_CHANNELS = 4
LATENT_SIZE = SIZE // 2  # the VAE downsamples once: 32x32x3 -> 16x16x4
TEXT_HIDDEN = 64


def make_vae():
    """AutoencoderKL 32x32x3 <-> 16x16x4."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=SIZE,
    )


def make_unet():
    """UNet2DConditionModel with cross-attention at every level (so attn2.to_k / attn2.to_v exist)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        # diffusers reads attention_head_dim as the number of heads: 2 heads of 16/32 channels. 8 heads of 4/8
        # channels made CPU attention 58% of a training step (1.7x slower per step, measured).
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=2,
    )


def text_encoder_from_clip(clip):
    """A stand-alone CLIPTextModel holding a copy of a CLIPModel's text tower (the base's starting text encoder)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    return te


def make_scheduler():
    """DDIM, v-prediction, with settings that survive a save/load round trip (others are rewritten on reload)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction",  # as Stable Diffusion 2: the toy UNet learns shapes this way (train_base)
    )


def make_clip(vocab_size: int, bos_id: int, eos_id: int, patch: int = 4, vision_width: int = 96,
              vision_layers: int = 3, text_layers: int = 3, projection: int = 64):
    """CLIPModel: ViT 32x32 (patch 4, 3 layers, 96 wide by default) and a 3-layer 64-wide text tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    vision = CLIPVisionConfig(
        image_size=SIZE, patch_size=patch, hidden_size=vision_width, intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers, num_attention_heads=4, num_channels=3,
    )
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection)
    return CLIPModel(cfg)


def make_image_processor():
    """CLIPImageProcessor for 32x32 inputs with OpenAI CLIP's normalisation."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                              do_resize=True, do_center_crop=True, do_convert_rgb=True)


def count_params(module) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in module.parameters())
