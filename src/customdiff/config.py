"""Training configuration: one typed dataclass; the CLI's `train` flags are derived from its fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its command-line help."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in the delta's metadata)."""

    base: str = opt("toy", "base pipeline: a local diffusers folder, a hub id, or 'toy'")
    out: str = opt("", "output delta file (.safetensors)")
    train: str = opt("crossattn_kv", "what to fine-tune besides the new tokens: crossattn_kv (attn2 to_k/to_v, "
                     "Custom Diffusion), crossattn (all of attn2); baselines: unet (DreamBooth-style, whole UNet), "
                     "tokens (Textual Inversion, token embeddings only)",
                     choices=["crossattn_kv", "crossattn", "unet", "tokens"])
    steps: int = opt(250, "optimizer steps (about 250 for one concept, 500 for two, at batch 8)")
    batch_size: int = opt(8, "images per step and process, half targets and half regularization images")
    resolution: int = opt(0, "training resolution in pixels; 0 = the base's native size")
    seed: int = opt(0, "random seed for data order, augmentation, noise and timesteps")
    learning_rate: float = opt(1e-5, "learning rate per image; scaled by batch x accumulation x processes "
                                     "unless --no-scale-lr (1e-5 gives 8e-5 at batch 8, as the reference)")
    scale_lr: bool = opt(True, "scale the learning rate by the total batch size")
    weight_decay: float = opt(1e-2, "AdamW weight decay (reaches only trained tensors and new token rows)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    gradient_accumulation: int = opt(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet")
    mixed_precision: str = opt("no", "no, fp16 or bf16 (GPU; fp32 is fastest on CPU)", choices=["no", "fp16", "bf16"])
    num_class_images: int = opt(200, "regularization images to generate per concept when it has no --reg-dir "
                                      "(0 = train without regularization)")
    augment: bool = opt(True, "rescale/paste/crop augmentation with prompt prefixes and loss mask")
    flip: bool = opt(True, "random horizontal flips of target images")
    initializer: list[str] = opt(None, "initializer word for each new token, in order (default: rare words)")
    checkpoint_every: int = opt(0, "save a resumable checkpoint every N steps (0 = never)")
    resume: bool = opt(False, "continue the run writing the same --out from its latest checkpoint")
    logdir: str = opt("", "write TensorBoard logs to this folder")
    class_image_steps: int = opt(50, "sampling steps for generated regularization images")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
