"""Tiny Stable Diffusion pipelines and concept images built in code, for fast offline tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ["photo", "of", "a", "the", "cat", "dog", "red", "blue", "green", "on", "grass", "very", "small",
         "far", "away", "zoomed", "in", "close", "up", "and", "ktn", "pll", "ucd", "sks"]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tokenizer_files(folder: Path, words: list[str] = WORDS) -> None:
    """vocab.json + merges.txt for a CLIP BPE tokenizer whose words are single tokens."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


def make_tiny_pipeline(path: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a randomly initialised tiny StableDiffusionPipeline (32 px images, 16x16x4 latents) to `path`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = path.parent / (path.name + "_tok")
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def make_images(folder: Path, n: int, colour: tuple[int, int, int], seed: int = 0, size: int = 40) -> Path:
    """`n` PNG photos of a coloured disc at varying places on noise, standing in for a concept."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        cy, cx = rng.integers(10, size - 10, 2)
        yy, xx = np.mgrid[:size, :size]
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = colour
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def make_reg_dir(folder: Path, n: int, caption: str, seed: int = 1) -> Path:
    """Regularization images with same-stem .txt captions."""
    make_images(folder, n, (200, 200, 200), seed)
    for p in folder.glob("*.png"):
        p.with_suffix(".txt").write_text(caption)
    return folder


def make_tiny_xl_pipeline(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny StableDiffusionXLPipeline (32 px images, 16x16x4 latents) to `path`.

    As in SDXL: two CLIP text encoders (the second with a projection, pooled at argmax(input_ids) because its
    config's eos_token_id is 2), tokenizer_2 padding with "!", a text_time UNet reading the concatenated
    penultimate states (32 + 48 = 80 wide) and pooled (40) + 6 time ids. Widths differ so mix-ups fail."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = path.parent / (path.name + "_tok")
    write_tokenizer_files(tok_dir)
    files = (str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    tokenizer = CLIPTokenizer(*files, model_max_length=16)
    tokenizer_2 = CLIPTokenizer(*files, model_max_length=16, pad_token="!")
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64,
                                                eos_token_id=tokenizer.eos_token_id, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=40,
                                                                eos_token_id=2, **common))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80,
                                transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=8,
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 40)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(path)
    return path


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    """accelerate keeps one mixed-precision setting per process: reset it between runs that change it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
