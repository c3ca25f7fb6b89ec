"""What one training step keeps for its backward pass: the bytes of activations autograd saves in one forward of
a real-size UNet (random weights from its config, no download), under each memory lever. Device-independent,
so it runs on the CPU, and it predicts the GPU's peak: a step's peak is the weights plus these bytes.

    python benchmarks/saved_activations.py [--arch sd15] [--resolution 512] [--batch-size 8] [--by-module]

Each variant runs in a fresh child process under bf16 autocast (fp16 costs the same bytes), with the K/V of
cross-attention trained and the start token's K/V detached, as `customdiff train` runs it:
  before   frozen weights bf16, norms float32 and run in float32 (what CUDA autocast does with norms; the CPU's
           autocast does not, so this variant runs them that way explicitly): customdiff before its norms
           were stored in the low dtype
  norms    norms stored in bf16 and run in it (`--frozen-weights auto`)
  lean     norms as above, and `--lean-activations on`
Saved tensors are counted once per storage; parameters are not counted. Validated against one GPU measurement
(docs/performance.md): `before` -> `norms` predicts 1.79 GiB at SD 1.5, 512 px, batch 8; the H100's peak
allocated memory fell by 1.78 GiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = ("before", "norms", "lean")


def child(arch: str, resolution: int, batch: int, variant: str) -> dict:
    """One forward of `variant`: GiB of saved activations, the forward's seconds, and the GiB by the module
    (parent/innermost class) that saved them."""
    import time

    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(Path(__file__).parent))
    from realscale import make_unet

    from customdiff.activations import lean_activations
    from customdiff.precision import store_frozen
    from customdiff.surgery import detach_start_token, freeze_except, trainable_names

    class Float32GroupNorm(nn.GroupNorm):
        """A GroupNorm as CUDA autocast runs it: float32 input and output."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)

    class Float32LayerNorm(nn.LayerNorm):
        """A LayerNorm as CUDA autocast runs it: float32 input and output."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                    self.eps)

    torch.manual_seed(0)
    unet = make_unet(arch)
    names = trainable_names(unet, "crossattn_kv")
    freeze_except(unet, names)
    detach_start_token(unet)
    store_frozen(unet, torch.bfloat16, set(names), norms=variant != "before")
    if variant == "before":
        swap = {nn.GroupNorm: Float32GroupNorm, nn.LayerNorm: Float32LayerNorm}
        for m in unet.modules():
            if type(m) in swap:
                m.__class__ = swap[type(m)]
    if variant == "lean":
        lean_activations(unet)
    cfg = unet.config
    latent = resolution // 8
    x = torch.randn(batch, cfg.in_channels, latent, latent)
    text = torch.randn(batch, 77, cfg.cross_attention_dim)
    extra = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and size ids
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)}}
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}
    by_module: dict[str, float] = {}
    stack: list[str] = []  # the classes of the modules running now, outermost first

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage.nbytes()
            where = "/".join(stack[-2:])
            by_module[where] = by_module.get(where, 0.0) + storage.nbytes() / 2**30
        return t

    def enter(module: nn.Module, args: object) -> None:
        stack.append(type(module).__name__)

    def leave(module: nn.Module, args: object, out: object) -> None:
        stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
             nn.modules.module.register_module_forward_hook(leave)]
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        unet(x, torch.full((batch,), 500), text, **extra)
    for h in hooks:
        h.remove()
    return {"variant": variant, "saved_gib": sum(seen.values()) / 2**30, "forward_s": time.perf_counter() - t0,
            "by_module": dict(sorted(by_module.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    """Run each variant in a child process and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["sd15", "sd21", "sdxl", "tiny"], default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--by-module", action="store_true", help="also print where the bytes are saved (GiB by "
                   "parent/module class, largest first)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.arch, a.resolution, a.batch_size, a.child)), flush=True)
        return
    print(f"{a.arch}, {a.resolution} px, batch {a.batch_size}, bf16 autocast: activations saved for backward")
    print(f"| variant | saved | vs {a.variants[0]} | forward (CPU) |")
    print("|---|---:|---:|---:|")
    first = None
    rows = []
    for v in a.variants:
        proc = subprocess.run([sys.executable, __file__, "--arch", a.arch, "--resolution", str(a.resolution),
                               "--batch-size", str(a.batch_size), "--child", v], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"variant {v} failed (exit {proc.returncode})")
        r = json.loads(lines[0][7:])
        first = r["saved_gib"] if first is None else first
        print(f"| {v} | {r['saved_gib']:.3f} GiB | {r['saved_gib'] - first:+.3f} GiB | {r['forward_s']:.0f} s |",
              flush=True)
        rows.append(r)
    if a.by_module:
        for r in rows:
            top = list(r["by_module"].items())[:8]
            print(f"{r['variant']}: " + ", ".join(f"{k} {v:.3f}" for k, v in top))


if __name__ == "__main__":
    main()
