"""The host-side cost of a training step: SD 1.5's module graph at a negligible width, so that what is timed is
Python, dispatch and (on a GPU) kernel launches, not arithmetic.

On the H100 hosts of docs/performance.md a real SD 1.5 step at 512 px and batch 8 keeps the GPU busy only about
half of its wall time (torch.profiler, `realscale.py --profile`): the step is bound by the host, so fewer
operator calls make it faster and cheaper kernels do not. This script measures the two host-side choices of
customdiff's step, side by side in one process, interleaved:
- the leaner saved activations (`--lean-activations`): one UNet forward and backward, stock modules against the
  leaner ones (K/V trained, everything else frozen in the low dtype, under autocast, as `customdiff train`);
- the VAE encoding the batch's photos one at a time (as on the CPU) against all at once (as on a GPU).

    python benchmarks/step_overhead.py                  # CPU, bf16 autocast, 2 threads
    python benchmarks/step_overhead.py --device cuda    # fp16 autocast; prints the same rows

Each row gives the operator calls torch dispatches (torch.profiler's aten:: count) and the median wall time
over interleaved repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch


def narrow_unet() -> torch.nn.Module:
    """SD 1.5's UNet layout (4 levels, 2 layers each, 16 transformer blocks, conv proj_in/out) at width 32."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=2,
                                attention_head_dim=8, cross_attention_dim=32)


def narrow_vae() -> torch.nn.Module:
    """SD 1.5's VAE layout (4 levels, 2 layers each, attention in the middle) at width 32."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)


def aten_calls(fn: Callable[[], object]) -> int:
    """How many aten operators one call of `fn` dispatches (nested calls included)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def compare(variants: dict[str, Callable[[], object]], repeats: int, inner: int, sync: Callable[[], None]) -> None:
    """Print aten calls and the median time per call of each variant, timed in interleaved rounds."""
    for fn in variants.values():  # warm-up: allocator, kernels, caches
        for _ in range(3):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    base = None
    for name, fn in variants.items():
        med = statistics.median(times[name])
        base = base or med
        print(f"  {name:<34} {aten_calls(fn):>6} aten calls  {med:8.2f} ms (x{med / base:.2f}; "
              f"min {min(times[name]):.2f}, max {max(times[name]):.2f})")


def main(argv: list[str] | None = None) -> None:
    """Time the stock and leaner UNet step and the VAE's two encoding orders on the narrow SD 1.5 graph."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="images per step (half of them photos)")
    ap.add_argument("--latent", type=int, default=8, help="latent side (the image is 8x larger)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=5)
    a = ap.parse_args(argv)
    from customdiff.activations import lean_activations

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    low = torch.float16 if dev.type == "cuda" else torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    stock = narrow_unet().to(dev)
    for n, p in stock.named_parameters():  # as customdiff train: K/V float32 and trained, the rest frozen low
        kv = n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
        p.requires_grad_(kv)
        if not kv:
            p.data = p.data.to(low)
    lean = copy.deepcopy(stock)
    counts = lean_activations(lean)
    b, s = a.batch_size, a.latent
    x = torch.randn(b, 4, s, s, device=dev)
    t = torch.randint(0, 1000, (b,), device=dev)
    text = torch.randn(b, 77, 32, device=dev)

    def step(unet: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(dev.type, dtype=low):
                out = unet(x, t, text).sample
            out.float().square().mean().backward()
        return run

    print(f"{dev.type}, {a.threads} threads, batch {b}, latent {s}x{s}, {low} autocast; "
          f"leaner modules: {counts['conv']} convolutions, {counts['geglu']} GEGLU")
    print("UNet forward + backward:")
    compare({"stock modules": step(stock), "--lean-activations": step(lean)}, a.repeats, a.inner, sync)

    vae = narrow_vae().to(dev).eval()
    photos = torch.randn(b // 2, 3, 8 * s, 8 * s, device=dev)

    @torch.no_grad()
    def one_by_one() -> torch.Tensor:
        return torch.cat([vae.encode(p).latent_dist.parameters for p in photos.split(1)])

    @torch.no_grad()
    def batched() -> torch.Tensor:
        return vae.encode(photos).latent_dist.parameters

    print(f"VAE encoding {b // 2} photos (float32):")
    compare({"one at a time": one_by_one, "all at once": batched}, a.repeats, a.inner, sync)


if __name__ == "__main__":
    main()
