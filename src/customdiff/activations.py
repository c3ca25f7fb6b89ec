"""Fewer activations saved for the backward pass of a UNet whose convolutions are frozen.

Custom Diffusion trains cross-attention K/V only, so the backward pass needs gradients with respect to
activations, never to a convolution's weight. Two of the tensors autograd keeps are then dead weight:
- a convolution saves its input even when its weight is frozen (torch's convolution backward always keeps it);
  the input is only needed for the weight's gradient, so a frozen convolution here keeps its weight alone and
  computes the input's gradient from it (the same backward-data kernel autograd calls);
- GEGLU's `h * gelu(gate)` saves gelu(gate), a new tensor as large as `h`, beside the projection it came from;
  here the product keeps only `h` and `gate` (views of the projection, kept anyway) and recomputes gelu(gate)
  in the backward pass.
Both give the same values and gradients as the modules they replace (tested); the classes swap in place, so
parameter names, hooks and state dicts are unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

log = logging.getLogger(__name__)


class _FrozenConvFn(torch.autograd.Function):
    """conv2d whose backward gives the input's gradient only, from the saved weight (not the input).

    The convolution runs under the caller's autocast state, so it casts exactly as a stock conv2d would; the
    backward pass computes in the dtype the forward ran in and returns the gradient in the input's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
                padding: Any, dilation: Any, groups: int) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.meta = (x.shape, x.dtype, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.meta
        if weight.dtype != grad.dtype:
            weight = weight.to(grad.dtype)
        # the input's gradient is the transposed convolution of the output's gradient (cuDNN runs both with the
        # same backward-data kernel); output_padding restores the rows a strided convolution dropped. Unlike
        # aten.convolution_backward it needs no input tensor: that one makes a full-size contiguous input from
        # an expanded placeholder on every call (a copy per convolution, measured in benchmarks/step_overhead.py)
        extra = tuple(shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                      + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(2))
        gx = F.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation)
        return gx if gx.dtype == dtype else gx.to(dtype), None, None, None, None, None, None


class _LeanConv2d(nn.Conv2d):
    """A Conv2d that, while its weight is frozen, saves only the weight for the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad) or not torch.is_grad_enabled():
            return super().forward(x)
        return _FrozenConvFn.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class _GeluGateFn(torch.autograd.Function):
    """h * gelu(gate), saving h and gate only: gelu(gate) is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, gate)
        return h * F.gelu(gate)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h, gate = ctx.saved_tensors
        gh = grad * F.gelu(gate) if ctx.needs_input_grad[0] else None
        gg = torch.ops.aten.gelu_backward(grad * h, gate) if ctx.needs_input_grad[1] else None
        return gh, gg


def _lean_geglu_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    h, gate = self.proj(hidden_states).chunk(2, dim=-1)
    if not torch.is_grad_enabled():
        return h * F.gelu(gate)
    return _GeluGateFn.apply(h, gate)


@functools.cache
def _lean_geglu_class() -> type:
    """diffusers' GEGLU with the leaner product (built on first use: diffusers is imported lazily)."""
    from diffusers.models.activations import GEGLU

    return type("LeanGEGLU", (GEGLU,), {"forward": _lean_geglu_forward,
                                        "__doc__": "GEGLU saving no gelu output (activations.py)."})


def lean_wanted(mode: str, cuda: bool, checkpointing: bool) -> bool:
    """Whether `--lean-activations MODE` swaps the modules: `auto` means on a GPU without gradient checkpointing.

    On the CPU it costs time and peak memory there is set by loading. Under gradient checkpointing the blocks keep
    almost nothing anyway, and on H100s both together ran at 0.65x the diffusers example's rate, checkpointing
    alone at 0.84x (two machines; benchmarks/results/gpu-h100-2026-11-26-session*.jsonl, docs/performance.md)."""
    return mode == "on" or (mode == "auto" and cuda and not checkpointing)


def lean_activations(unet: nn.Module) -> dict[str, int]:
    """Swap `unet`'s frozen Conv2d and its GEGLU modules for the leaner ones in place; how many of each.

    Call after freezing: a convolution whose weight trains keeps the stock backward (checked at each call)."""
    from diffusers.models.activations import GEGLU

    counts = {"conv": 0, "geglu": 0}
    for mod in unet.modules():
        if type(mod) is nn.Conv2d and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
            mod.__class__ = _LeanConv2d
            counts["conv"] += 1
        elif type(mod) is GEGLU:
            mod.__class__ = _lean_geglu_class()
            counts["geglu"] += 1
    log.info("leaner backward: %d frozen convolutions keep no input, %d GEGLU keep no gelu output",
             counts["conv"], counts["geglu"])
    return counts


def draws_random_numbers(module: nn.Module) -> bool:
    """Whether a training pass of `module` draws random numbers: a dropout layer with p > 0."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def _checkpoint_without_rng(block: nn.Module, *args: Any) -> Any:
    """torch's non-reentrant checkpoint of one block, without stashing and restoring the RNG states."""
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def enable_checkpointing(unet: nn.Module) -> bool:
    """Gradient checkpointing for `unet`'s blocks; whether its recomputation is free of RNG state reads.

    diffusers' default checkpoint stashes the CPU and GPU RNG states at every block and restores them for the
    recomputation, so that dropout draws the same mask twice. A UNet without active dropout (Stable
    Diffusion's, whose dropout rates are 0) draws nothing, so the states are not read: that saves host work,
    and a CUDA graph capture, which forbids reading them, can then hold the checkpointed pass (graphs.py)."""
    if draws_random_numbers(unet):
        unet.enable_gradient_checkpointing()
        return False
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_without_rng)
    return True
