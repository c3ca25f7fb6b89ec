"""Peak memory of SD 1.5's VAE encoder on a training batch: the whole batch at once vs one image at a time.

Random weights from SD 1.5's VAE config (no download); each variant runs in a fresh child process and prints how
much its peak resident memory grew while encoding (CPU). On a GPU the same activations sit in GPU memory.

    python benchmarks/vae_memory.py [--batch 4] [--resolution 512] [--dtype float32]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def child(batch: int, resolution: int, dtype_name: str, sliced: bool) -> float:
    """Encode one random batch; the growth of peak RSS during the encode, in GiB."""
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2).eval()
    dtype = getattr(torch, dtype_name)
    vae.to(dtype)
    x = torch.randn(batch, 3, resolution, resolution, dtype=dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        parts = x.split(1) if sliced else [x]
        torch.cat([vae.encode(p).latent_dist.parameters for p in parts])
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20


def main() -> None:
    """Run both variants in child processes and print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--child", choices=["batch", "sliced"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(f"{child(a.batch, a.resolution, a.dtype, a.child == 'sliced'):.3f}")
        return
    print(f"SD 1.5 VAE encoder, {a.batch} images at {a.resolution} px, {a.dtype}: growth of peak RSS while encoding")
    for mode in ("batch", "sliced"):
        out = subprocess.run([sys.executable, __file__, "--batch", str(a.batch), "--resolution", str(a.resolution),
                              "--dtype", a.dtype, "--child", mode], capture_output=True, text=True, check=True)
        label = "whole batch at once" if mode == "batch" else "one image at a time"
        print(f"  {label:22s} {float(out.stdout.split()[-1]):.2f} GiB")


if __name__ == "__main__":
    main()
