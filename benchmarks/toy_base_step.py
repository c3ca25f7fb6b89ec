"""Time one step of the toy base's UNet + text-encoder training (the build's longest stage) in variants.

    python benchmarks/toy_base_step.py                       # the variants below, interleaved, 3 rounds
    python benchmarks/toy_base_step.py --profile             # where the default step's time goes

Variants (combine with '+'): `base` is the build's step as it is (AdamW looping over tensors, EMA one tensor at
a time); `fused` uses AdamW's fused kernel; `fe` updates the EMA copies with one foreach call; `bf16` runs the
forward pass under bf16 autocast. Random weights and latents of the toy sizes, batch 32, 2 threads; medians of
the steps after 5 warm-up steps per run. Nothing else should run on the cores meanwhile.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from customdiff.toy.models import make_clip, make_scheduler, make_unet, text_encoder_from_clip


class Step:
    """The build's training step (train_base.train_unet_text) with the variant's optimizer, EMA and autocast."""

    def __init__(self, variant: str, clip: torch.nn.Module, batch: int):
        parts = set(variant.split("+"))
        torch.manual_seed(0)
        self.unet, self.te = make_unet(), text_encoder_from_clip(clip).train()
        self.ema = [copy.deepcopy(m).requires_grad_(False) for m in (self.unet, self.te)]
        self.params = list(self.unet.parameters()) + list(self.te.parameters())
        self.ema_params = [q for m in self.ema for q in m.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.0, **({"fused": True} if "fused" in parts
                                                                                else {}))
        self.foreach_ema, self.bf16 = "fe" in parts, "bf16" in parts
        self.acp = make_scheduler().alphas_cumprod
        self.gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(2, clip.config.text_config.vocab_size, (batch, 32), generator=self.gen)
        self.z0 = torch.randn(batch, 4, 16, 16, generator=self.gen)

    def __call__(self) -> None:
        """One training step."""
        t = torch.randint(0, 1000, (len(self.z0),), generator=self.gen)
        noise = torch.randn(self.z0.shape, generator=self.gen)
        a = self.acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * self.z0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext():
            pred = self.unet(zt, t, self.te(self.tokens).last_hidden_state).sample
        loss = F.mse_loss(pred.float(), a.sqrt() * noise - (1 - a).sqrt() * self.z0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            if self.foreach_ema:
                torch._foreach_lerp_(self.ema_params, self.params, 0.001)
            else:
                for p, q in zip(self.params, self.ema_params, strict=True):
                    q.lerp_(p, 0.001)


def main() -> None:
    """Time the variants interleaved (or profile the default step) and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=["base", "fused", "fused+fe", "fused+fe+bf16"])
    ap.add_argument("--steps", type=int, default=25, help="steps per run (the first 5 are not timed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of 10 base steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    clip = make_clip(1000, 0, 1)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        step = Step("base", clip, a.batch)
        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    times: dict[str, list[float]] = {v: [] for v in a.variants}
    for _ in range(a.rounds):
        for v in a.variants:
            step = Step(v, clip, a.batch)
            for i in range(a.steps):
                t0 = time.perf_counter()
                step()
                if i >= 5:
                    times[v].append(time.perf_counter() - t0)
    base = statistics.median(times[a.variants[0]])
    for v in a.variants:
        m = statistics.median(times[v])
        print(f"{v:16s} {m * 1000:7.1f} ms/step  x{m / base:.3f}  ({len(times[v])} steps)")


if __name__ == "__main__":
    main()
