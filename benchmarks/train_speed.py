"""Training-speed benchmark: steps per second and peak memory of a Custom Diffusion training step.

    python benchmarks/train_speed.py --base toy --batch-size 8 --steps 20 [--train crossattn_kv] [--device cpu]

Prints numbers only (no pass/fail). Peak memory is CUDA's max_memory_allocated on a GPU, and the process's
peak resident set size (ru_maxrss) on the CPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> None:
    """Time `--steps` optimizer steps after `--warmup` steps and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="toy", help="pipeline folder, hub id or 'toy'")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train", default="crossattn_kv", help="crossattn_kv, crossattn, unet or tokens")
    ap.add_argument("--resolution", type=int, default=0, help="0 = the base's native size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args(argv)

    from customdiff.base import load_pipeline
    from customdiff.model import CustomDiffusion
    from customdiff.surgery import detach_start_token, freeze_except, trainable_names
    from customdiff.tokens import TokenRows, add_tokens, default_initializers

    pipe = load_pipeline(a.base, device=a.device)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"], default_initializers(pipe.tokenizer, 1))
    rows = TokenRows(pipe.text_encoder.get_input_embeddings(), ids)
    trainable = freeze_except(pipe.unet, trainable_names(pipe.unet, a.train))
    detach_start_token(pipe.unet)
    if a.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    model = CustomDiffusion(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, rows).to(a.device).train()
    params = [*trainable.values(), rows.rows]
    opt = torch.optim.AdamW(params, lr=1e-5)
    size = a.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    b = a.batch_size
    pixels = torch.rand(b, 3, size, size, device=a.device) * 2 - 1
    mask = torch.ones(b, 1, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor, device=a.device)
    tok = pipe.tokenizer(["photo of a <new1> thing"] * b, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(a.device)
    gen = torch.Generator("cpu").manual_seed(0)
    times = []
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(pixels, tok, mask, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    if a.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda_max_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        kind = "process_max_rss"
    n_train = sum(p.numel() for p in params)
    print(f"base={a.base} train={a.train} device={a.device} batch={b} resolution={size} "
          f"trainable={n_train} threads={torch.get_num_threads()}")
    print(f"step_time_median_s={med:.4f} step_time_min_s={min(times):.4f} steps_per_s={1 / med:.2f} "
          f"images_per_s={b / med:.1f} peak_memory_mb={peak:.0f} ({kind})")


if __name__ == "__main__":
    main(sys.argv[1:])
