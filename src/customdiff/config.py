"""Configuration: typed dataclasses whose fields carry their help, choices and ranges; the CLI's `train` and
`eval` flags are derived from them, and `validate()` checks a config whoever built it (CLI, library, UI)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UserError
from .validate import SEED_MAX, check_number

BASE_HELP = "base pipeline: a local diffusers folder, a hub id, or 'toy'"


def opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
        why: str = "", choices: list[str] | None = None, resume: bool = True, result: bool = True, cli: bool = True,
        **kw: Any) -> Any:
    """A dataclass field carrying its command-line help and its checks.

    `lo`/`hi` (with `lo_open`, `why`): the allowed range; `choices`: the allowed values; `resume=False`: a
    resumed training run may change it; `result=False`: it leaves a run's delta as it is (where it goes, how the
    run is watched, saved or sped up); `cli=False`: no flag; more keys (`metavar`, `required`) go to argparse.
    """
    meta = {"help": help, "cli": cli, "resume": resume, "result": result, **kw}
    if choices is not None:
        meta["choices"] = choices
    if lo is not None or hi is not None:
        meta["range"] = (lo, hi, lo_open, why)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The command-line spelling of a field: learning_rate -> --learning-rate."""
    return "--" + name.replace("_", "-")


def field_type(cls: type, name: str) -> Any:
    """A field's type without `| None`: int for `int | None`, list[str] for `list[str] | None`."""
    kind = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if type(None) in typing.get_args(kind) and len(args) == 1:
        return args[0]
    return kind


def check_fields(cfg: Any) -> None:
    """Every field with choices or a range in bounds (a UserError naming the flag otherwise)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise UserError(f"{flag_name(f.name)} {value!r} is unknown; choose one of {', '.join(choices)}")
        if "range" in f.metadata:
            lo, hi, lo_open, why = f.metadata["range"]
            check_number(flag_name(f.name), value, lo, hi, lo_open=lo_open, why=why)


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in the delta's metadata)."""

    base: str = opt("toy", BASE_HELP)
    # the checkpoint is found beside --out, so how its path is spelled (or whether the folder moved) is no change
    out: str = opt("", "output delta file (.safetensors)", resume=False, result=False)
    train: str = opt("crossattn_kv", "what to fine-tune besides the new tokens: crossattn_kv (attn2 to_k/to_v, "
                     "Custom Diffusion), crossattn (all of attn2); baselines: unet (DreamBooth-style, whole UNet), "
                     "tokens (Textual Inversion, token embeddings only)",
                     choices=["crossattn_kv", "crossattn", "unet", "tokens"])
    steps: int = opt(250, "optimizer steps (about 250 for one concept, 500 for two, at batch 8)", lo=1,
                     resume=False)
    # above 1024 is a typo (SD 1.5 at 512 px takes about 0.5 GiB an image): refused before minutes of loading
    batch_size: int = opt(8, "images per step and process (up to 1024), half targets and half regularization images", lo=1,
                          hi=1024, why=" (images per step on each process; a larger batch: --gradient-accumulation)")
    resolution: int = opt(0, "training resolution in pixels; 0 = the base's native size", lo=0, hi=8192,
                          why=" (0 = the base's native size)")
    seed: int = opt(0, "random seed for data order, augmentation, noise and timesteps", lo=0, hi=SEED_MAX)
    learning_rate: float = opt(1e-5, "learning rate per image; scaled by batch x accumulation x processes "
                                     "unless --no-scale-lr (1e-5 gives 8e-5 at batch 8, as the reference)",
                               lo=0, hi=1.0, lo_open=True)
    scale_lr: bool = opt(True, "scale the learning rate by the total batch size")
    token_lr_scale: float = opt(1.0, "learning rate of the new token rows as a multiple of the weights' (1 = the "
                                     "reference: one rate for all; the toy world's recipe uses more, see "
                                     "docs/benchmarks.md)", lo=0, hi=1e4, lo_open=True)
    weight_decay: float = opt(1e-2, "AdamW weight decay (reaches only trained tensors and new token rows)",
                              lo=0, hi=1.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", lo=0, lo_open=True)
    gradient_accumulation: int = opt(1, "micro-batches per optimizer step", lo=1)
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet")
    mixed_precision: str = opt("no", "no, fp16 or bf16 (GPU; fp32 is fastest on CPU)", choices=["no", "fp16", "bf16"])
    frozen_weights: str = opt("auto", "storage of the frozen UNet, VAE and text encoders under --mixed-precision "
                              "fp16/bf16: auto (that dtype; trained tensors stay float32) or float32",
                              choices=["auto", "float32"], resume=False)
    prefetch: int = opt(2, "batches prepared ahead in a background thread (0 = on the training thread)",
                        lo=0, hi=64, resume=False, result=False)
    cache: bool = opt(True, "reuse what never changes: text features of prompts without a new token, VAE "
                      "encodings of the (never augmented) regularization images and, under --no-augment, of the "
                      "target photos", resume=False, result=False)
    log_every: int = opt(10, "read the loss back (progress bar, divergence check, TensorBoard) every N steps; "
                         "each read waits for the GPU", lo=1, resume=False, result=False)
    lean_activations: str = opt("auto", "save less for the backward pass: frozen convolutions keep their weight, "
                                "not their input, and GEGLU recomputes gelu (same values, less memory, about a "
                                "tenth slower on an H100): auto (on a GPU without --gradient-checkpointing), on or off",
                                choices=["auto", "on", "off"], resume=False, result=False)
    channels_last: bool = opt(False, "channels-last memory format for the UNet and VAE (CUDA only)", resume=False,
                              result=False)
    cudnn_benchmark: bool = opt(False, "let cuDNN time its kernels for each new shape (CUDA only): slower first step, "
                                "and its trial workspaces count in the peak memory", resume=False, result=False)
    compile: bool = opt(False, "torch.compile the UNet (minutes of compilation before the first step)",
                        resume=False, result=False)
    cuda_graphs: str = opt("auto", "replay the UNet's forward and backward pass as CUDA graphs instead of thousands "
                           "of separate kernel launches (captured on the first step; same values): auto (on a CUDA "
                           "GPU with one process, without --compile or --gradient-accumulation; with "
                           "--gradient-checkpointing too, unless the UNet has dropout), on (the same, but "
                           "warns where it cannot apply) or off",
                           choices=["auto", "on", "off"], resume=False, result=False)
    num_class_images: int = opt(200, "regularization images to generate per concept when it has no --reg-dir "
                                      "(0 = train without regularization)", lo=0, hi=100_000)
    reg_prompt: str = opt("captions", "what regularization images are trained with: captions (each image's .txt "
                          "or caption file, else the class prompt) or class (the class prompt for every image, "
                          "as with generated class images)", choices=["captions", "class"])
    augment: bool = opt(True, "rescale/paste/crop augmentation with prompt prefixes and loss mask")
    flip: bool = opt(True, "random horizontal flips of target images")
    initializer: list[str] = opt(None, "initializer word for each new token, in order (default: rare words)")
    checkpoint_every: int = opt(0, "save a resumable checkpoint every N steps (0 = never)", lo=0, resume=False,
                                result=False)
    resume: bool = opt(False, "continue the run writing the same --out from its latest checkpoint", resume=False,
                       result=False)
    logdir: str = opt("", "write TensorBoard logs to this folder", resume=False, result=False)
    class_image_steps: int = opt(50, "sampling steps for generated regularization images", lo=1, hi=1000)
    delta_dtype: str = opt("auto", "precision of the stored weight changes: auto (float16 on SDXL, whose full "
                           "K/V delta is 1.36 GB in float32; float32 otherwise), float32 or float16",
                           choices=["auto", "float32", "float16"], resume=False)
    compress_energy: float = opt(0.0, "compress the delta right after training: keep the smallest rank reaching "
                                      "this fraction of the singular values (0 = store the full change; the "
                                      "reference uses 0.6)", lo=0, hi=1.0, resume=False)

    def validate(self) -> None:
        """Choices and numeric ranges of every field, and no blank --initializer word (before anything loads)."""
        check_fields(self)
        if self.initializer and not all(str(w).strip() for w in self.initializer):
            raise UserError("--initializer: a word is empty; give one word per new token, such as dog")

    def resume_changes(self, saved: dict[str, Any]) -> list[str]:
        """Fields that differ from a checkpoint's saved config and must not change on resume."""
        # a field newer than the checkpoint counts as unchanged while it keeps its default
        return [f.name for f in fields(self) if f.metadata.get("resume", True)
                and not (f.name not in saved and getattr(self, f.name) == f.default)
                and not _same(saved.get(f.name), getattr(self, f.name))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _same(saved: Any, value: Any) -> bool:
    return saved == value or (isinstance(value, (list, tuple)) and saved == list(value))


@dataclass
class EvalConfig:
    """Everything that determines an evaluation (saved in metrics.json's settings)."""

    base: str = opt("toy", BASE_HELP)
    dataset: str = opt("", "CustomConcept101-style dataset.json", metavar="FILE", required=True)
    deltas: list[str] = opt([], "delta files to apply")
    clip: str | None = opt(None, "CLIP folder in transformers format (default with --base toy: the toy CLIP)",
                           metavar="PATH")
    out: str = opt("", "output folder")
    entries: list[str] | None = opt(None, "evaluate only these entries (index, or instance folder name such as "
                                          "cat1, or full name such as 00_cat1)", metavar="NAME")
    images: str | None = opt(None, "score images an earlier eval wrote (its --out/images) instead of sampling",
                             metavar="DIR")
    n: int = opt(4, "images per prompt", lo=1, hi=100_000, metavar="N")
    n_class: int = opt(50, "class-prompt images per class for KID", lo=2, hi=100_000, metavar="N",
                       why=" (KID compares at least 2 images on each side)")
    max_real: int = opt(200, "real class images used for KID", lo=2, hi=100_000, metavar="N",
                        why=" (KID compares at least 2 images on each side)")
    class_template: str = opt("{}", "class-prompt template for KID sampling, e.g. 'photo of a {}' ({} = the "
                                    "class prompt as is)", metavar="TEXT")
    kid_subsets: int = opt(100, "random subsets averaged by KID", lo=1, hi=100_000, metavar="N")
    kid_subset_size: int = opt(1000, "images per KID subset (capped by the smaller set)", lo=1, cli=False)
    steps: int = opt(50, "denoising steps", lo=1, hi=100_000, metavar="N")
    guidance: float = opt(6.0, "classifier-free guidance (the reference samples with 6)", lo=0, hi=100,
                          metavar="G")
    resolution: int | None = opt(None, "image size (default: the base's)", lo=8, hi=8192, metavar="N")
    seed: int = opt(0, "seed of the CPU generator", lo=0, hi=2**64 - 1, metavar="N")
    strip_tokens: bool = opt(False, "sample prompts without their modifier tokens (a base-model baseline)")
    batch: int = opt(8, "images per sampling call", lo=1, cli=False)
    device: str | None = opt(None, "cpu or cuda (default: cuda when available)")

    def validate(self) -> None:
        """Choices, numeric ranges and the class template (before anything loads)."""
        check_fields(self)
        if "{}" not in self.class_template:
            raise UserError("--class-template must contain {} (where the class prompt goes), e.g. 'photo of a {}'")

    def settings(self) -> dict[str, Any]:
        """The sampling and scoring settings (what `evaluate` reads), without inputs and outputs."""
        io = {"base", "dataset", "deltas", "clip", "out", "entries", "images", "device"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in io}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
