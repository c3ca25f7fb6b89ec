"""Real-scale architectures with random weights: SD 1.5, SD 2.1 and SDXL built from their configs (no download),
saved as diffusers folders that every customdiff command takes as --base, with their sizes and optional step times.

    python benchmarks/realscale.py --arch sdxl --out /tmp/sdxl-random            # build, save, print sizes
    python benchmarks/realscale.py --arch sdxl --steps 3 --resolution 256        # + training-step timings

The images are noise (random weights); this measures sizes, memory and speed, never quality. Expected sizes:
UNet SD1.5 859.5M, SD2.1 865.9M, SDXL 2,567M parameters; attn2 K/V SD1.5 19,169,280 (16 layers), SD2.1
25,559,040, SDXL 340,787,200 (70 layers: 1.36 GB as a float32 delta, 0.68 GB in float16).
Tokenizer: the real 49,408-token CLIP BPE when open_clip_torch is installed (its bpe_simple_vocab_16e6.txt.gz is
read without importing it), else a byte-level vocabulary of the same size (prompts tokenise into characters).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 49408
EXPECTED = {"sd15": (859_520_964, 19_169_280), "sd21": (865_910_724, 25_559_040), "sdxl": (2_567_463_684, 340_787_200)}


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

    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
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
    text = clip(1024, 23, 16, "gelu") if sd21 else clip(768, 12, 12, "quick_gelu")
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False,
                                    prediction_type="v_prediction" if sd21 else "epsilon", **kw)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sizes(unet: torch.nn.Module, arch: str) -> None:
    """Print UNet and attn2 K/V parameter counts against the expected ones, and the delta sizes."""
    total = sum(p.numel() for p in unet.parameters())
    kv = [p.numel() for n, p in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    want_total, want_kv = EXPECTED[arch]
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


def main(argv: list[str] | None = None) -> None:
    """Build the chosen architecture, print its sizes, optionally save it and time training steps."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=list(EXPECTED), default="sdxl")
    ap.add_argument("--out", help="save the pipeline here (a --base for every customdiff command)")
    ap.add_argument("--steps", type=int, default=0, help="time this many training steps (0: none)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    a = ap.parse_args(argv)
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
