"""Other ecosystems' formats: export to diffusers LoRA / kohya LoRA + embeddings, import the reference repo's deltas.

Export writes a LoRA whose B @ A equals the delta's change (exactly, at full rank) plus one embedding file per
token. Import reads the reference repo's `delta.ckpt` (CompVis) and `delta.bin` (diffusers) files with
`torch.load(weights_only=True)` only, and turns their fine-tuned weights into changes against a base.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .delta import Delta, base_fingerprint
from .errors import UserError
from .outputs import staged

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
MANIFEST = "customdiff_export.json"
EXPORT_FORMATS = ("diffusers-lora", "kohya")


# ---------------------------------------------------------------- export


def lora_factors(delta: Delta, name: str) -> tuple[Tensor, Tensor]:
    """(B, A) with B @ A equal to the change of `name`: the stored factors, or an exact rank-min(out, in) split."""
    if name + ".up" in delta.weights:
        return delta.weights[name + ".up"].float(), delta.weights[name + ".down"].float()
    change = delta.weights[name].float()
    out_dim, in_dim = change.shape
    # An identity on the smaller side makes B @ A reproduce the change bit for bit (no SVD rounding).
    if in_dim <= out_dim:
        return change.clone(), torch.eye(in_dim)
    return torch.eye(out_dim), change.clone()


def _module(name: str) -> str:
    return name.removesuffix(".weight").removesuffix(".bias")


def _token_filename(token: str, i: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "", token)
    return f"{stem or f'token{i}'}.safetensors"


def diffusers_lora_state(delta: Delta) -> dict[str, Tensor]:
    """`unet.<module>.lora_A.weight` (r x in) / `.lora_B.weight` (out x r), with `lora_B.bias` for bias changes."""
    names = delta.param_names()
    biases = {_module(n): delta.change(n).float() for n in names if n.endswith(".bias")}
    with_bias = bool(biases)
    state = {}
    for n in names:
        if n.endswith(".bias"):
            continue
        B, A = lora_factors(delta, n)
        m = _module(n)
        state[f"unet.{m}.lora_A.weight"] = A.contiguous()
        state[f"unet.{m}.lora_B.weight"] = B.contiguous()
        if with_bias:  # PEFT's lora_bias is all-or-nothing: modules without a bias change get zeros
            state[f"unet.{m}.lora_B.bias"] = biases.pop(m, torch.zeros(B.shape[0]))
    if biases:
        raise UserError(f"a bias change without its weight change ({next(iter(biases))}) cannot be exported as LoRA")
    return state


def kohya_lora_state(delta: Delta) -> dict[str, Tensor]:
    """`lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (= rank, so the scale is 1)."""
    state = {}
    for n in delta.param_names():
        if n.endswith(".bias"):
            raise UserError(f"kohya LoRA files hold no bias changes ({n}); export --to diffusers-lora instead")
        B, A = lora_factors(delta, n)
        key = "lora_unet_" + _module(n).replace(".", "_")
        state[key + ".lora_down.weight"] = A.contiguous()
        state[key + ".lora_up.weight"] = B.contiguous()
        state[key + ".alpha"] = torch.tensor(float(A.shape[0]))
    return state


def _write_dir(files: Mapping[str, tuple[dict[str, Tensor], dict[str, str]]], manifest: dict, out: Path) -> None:
    """Stage every file beside `out` and move them in at the end: no half-written export on failure."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a folder")
    with staged(out, last=MANIFEST) as tmp:
        for fname, (tensors, meta) in files.items():
            save_file(tensors, str(tmp / fname), metadata=meta)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def export_delta(delta: Delta, to: str, out: str | Path) -> Path:
    """Write `delta` as a diffusers or kohya LoRA plus one embedding file per token into folder `out`."""
    out = Path(out)
    if to not in EXPORT_FORMATS:
        raise UserError(f"--to {to!r} is unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    if not delta.param_names() and not delta.tokens:
        raise UserError("the delta is empty; nothing to export")
    meta = {"customdiff_base": json.dumps(delta.base.get("name", "")), "customdiff_trained": delta.trained}
    files: dict[str, tuple[dict[str, Tensor], dict[str, str]]] = {}
    tokens = {}
    if to == "diffusers-lora":
        lora_name = LORA_FILE
        files[lora_name] = (diffusers_lora_state(delta), meta)
        for i, (tok, row) in enumerate(delta.tokens.items()):
            fname = _token_filename(tok, i)
            files[fname] = ({tok: row.float().contiguous()}, {})
            tokens[tok] = fname
        how = [f'pipe.load_lora_weights(DIR, weight_name="{lora_name}")'] + [
            f'pipe.load_textual_inversion("DIR/{f}", token="{t}")' for t, f in tokens.items()]
    else:
        lora_name = KOHYA_FILE
        files[lora_name] = (kohya_lora_state(delta), {**meta, "ss_network_module": "networks.lora"})
        for i, (tok, row) in enumerate(delta.tokens.items()):
            fname = _token_filename(tok, i)  # A1111 and ComfyUI name the embedding after the file
            files[fname] = ({"emb_params": row.float().reshape(1, -1).contiguous()}, {})
            tokens[tok] = fname
        how = ["AUTOMATIC1111/ComfyUI: put the LoRA in models/Lora and each embedding in embeddings/; write "
               "<lora:lora_kohya:1> and the embedding's file name (e.g. new1) in the prompt"]
    ranks = sorted({int(t.shape[0]) for k, t in files[lora_name][0].items() if "lora_A" in k or "lora_down" in k})
    manifest = {"format": to, "lora": lora_name, "tokens": tokens, "base": delta.base.get("name", ""),
                "trained": delta.trained, "ranks": ranks, "scale": 1.0, "how_to_load": how}
    _write_dir(files, manifest, out)
    log.info("exported %d LoRA tensors (ranks %s) and %d embeddings to %s", len(files[lora_name][0]), ranks,
             len(tokens), out)
    return out


# ---------------------------------------------------------------- CompVis <-> diffusers UNet names


def _per_block(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def compvis_block_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """CompVis UNet block prefixes (input_blocks.I.1, middle_block.1, output_blocks.I.1) -> diffusers attention
    prefixes (down_blocks.B.attentions.J, mid_block.attentions.0, up_blocks.B.attentions.J), for SD 1.x/2.x."""
    n_down = len(unet_config["down_block_types"])
    n_up = len(unet_config["up_block_types"])
    layers = _per_block(unet_config["layers_per_block"], n_down)
    m = {"middle_block.1": "mid_block.attentions.0"}
    i = 1  # input_blocks.0 is conv_in
    for b in range(n_down):
        for j in range(layers[b]):
            m[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
            i += 1
        if b < n_down - 1:
            i += 1  # the downsampler occupies its own input block
    i = 0
    up_layers = list(reversed(layers))[:n_up]
    for b in range(n_up):
        for j in range(up_layers[b] + 1):  # up blocks have one more layer; the upsampler shares the last
            m[f"output_blocks.{i}.1"] = f"up_blocks.{b}.attentions.{j}"
            i += 1
    return m


_CV_RE = re.compile(r"^(?:model\.diffusion_model\.)?((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.(.+)$")
_DF_RE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.(.+)$")


def compvis_to_diffusers(key: str, unet_config: Mapping[str, Any]) -> str | None:
    """`model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight` -> diffusers name."""
    m = _CV_RE.match(key)
    if not m:
        return None
    block = compvis_block_map(unet_config).get(m.group(1))
    return f"{block}.{m.group(2)}" if block else None


def diffusers_to_compvis(name: str, unet_config: Mapping[str, Any]) -> str | None:
    """The inverse of `compvis_to_diffusers` (with the `model.diffusion_model.` prefix)."""
    m = _DF_RE.match(name)
    if not m:
        return None
    inverse = {v: k for k, v in compvis_block_map(unet_config).items()}
    block = inverse.get(m.group(1))
    return f"model.diffusion_model.{block}.{m.group(2)}" if block else None


# ---------------------------------------------------------------- import


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file: the reference formats are torch pickles
        return None


def _safe_load(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    meta = _safetensors_metadata(path)
    if meta is not None:
        if meta.get("format") == "customdiff.delta":
            raise UserError(f"{path}: already a customdiff delta; use it directly")
        raise UserError(f"{path}: a safetensors file, not a reference delta (delta.ckpt or delta.bin)")
    try:
        # weights_only: tensors and plain containers only; any other pickled object is refused, never run
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means the file is not a safe reference delta
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused: not a reference delta that loads with weights_only=True "
                        f"(tensors and plain containers only): {first[:200]}") from e


def _tensor(value: Any, where: str, path: Path) -> Tensor:
    if isinstance(value, Mapping) and set(value) == {"u", "v"}:  # the reference's compressed change
        return _tensor(value["u"], where, path).float() @ _tensor(value["v"], where, path).float()
    if not isinstance(value, Tensor):
        raise UserError(f"{path}: {where} is a {type(value).__name__}, not a tensor; not a reference delta")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise UserError(f"{path}: {where} holds NaN or infinite values; the file is damaged, refused")
    return value


_PROC_RE = re.compile(r"\.processor\.(to_[kqv]|to_out)_custom_diffusion(\.\d+)?\.")


def _unet_name(key: str, unet_config: Mapping[str, Any]) -> str | None:
    if key.startswith(("model.diffusion_model.", "input_blocks.", "middle_block.", "output_blocks.")):
        return compvis_to_diffusers(key, unet_config)
    # the diffusers example's attention-processor keys: ...attn2.processor.to_k_custom_diffusion.weight
    return _PROC_RE.sub(lambda m: f".{m.group(1)}{m.group(2) or ''}.", key)


def _parse(obj: Any, path: Path) -> tuple[dict[str, Any], dict[str, Tensor] | Tensor | None, str]:
    """(UNet entries, tokens as a dict or a tensor of rows, format name) of a loaded reference file."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a reference delta dict")
    if "state_dict" in obj:  # CompVis delta.ckpt; get_deltas.py stores `embed` inside state_dict
        sd = obj["state_dict"]
        if not isinstance(sd, Mapping):
            raise UserError(f"{path}: state_dict is not a dict")
        embed = sd.get("embed", obj.get("embed"))
        unet = {k: v for k, v in sd.items() if k != "embed"}
        return unet, embed, "compvis"
    if "unet" in obj:  # the reference repo's diffusers delta.bin
        if not isinstance(obj["unet"], Mapping):
            raise UserError(f"{path}: unet is not a dict")
        return dict(obj["unet"]), obj.get("modifier_token"), "diffusers"
    if any("custom_diffusion" in str(k) for k in obj):  # diffusers' example: attention processors only
        return dict(obj), None, "diffusers-attn-procs"
    raise UserError(f"{path}: no 'state_dict' (CompVis delta.ckpt) or 'unet' (delta.bin) entry; "
                    "not a reference Custom Diffusion delta")


def read_reference(path: str | Path) -> tuple[dict[str, Any], Any, str]:
    """Load and check a reference-repo delta without a base: (UNet entries, tokens, format); every tensor
    finite. Run at the door, before the base loads."""
    path = Path(path)
    unet_entries, embed, fmt = _parse(_safe_load(path), path)
    for key, value in unet_entries.items():
        _tensor(value, str(key), path)
    if isinstance(embed, Mapping):
        for tok, row in embed.items():
            _tensor(row, f"modifier_token {tok}", path)
    elif embed is not None:
        _tensor(embed, "embed", path)
    return unet_entries, embed, fmt


@torch.no_grad()
def import_reference(path: str | Path, pipe: Any, base_name: str,
                     class_words: Sequence[str] | None = None,
                     loaded: tuple[dict[str, Any], Any, str] | None = None) -> Delta:
    """Read a reference-repo delta (`delta.ckpt` or `delta.bin`) as changes against `pipe`'s base."""
    path = Path(path)
    unet_entries, embed, fmt = loaded if loaded is not None else read_reference(path)
    params = dict(pipe.unet.named_parameters())
    weights: dict[str, Tensor] = {}
    skipped = []
    for key, value in unet_entries.items():
        t = _tensor(value, str(key), path)
        if "attn2" not in str(key):
            if "token_embedding" in str(key):
                if embed is None:  # an older layout: the whole embedding matrix, new rows at its end
                    embed = t[pipe.text_encoder.get_input_embeddings().num_embeddings:]
                continue
            skipped.append(str(key))
            continue
        name = _unet_name(str(key), pipe.unet.config)
        if name is None or name not in params:
            raise UserError(f"{path}: {key} has no counterpart in the base UNet ({name}); is --base the model "
                            "it was trained from (SD 1.x/2.x layout)?")
        base = params[name].detach().float().cpu()
        if tuple(t.shape) != tuple(base.shape):
            raise UserError(f"{path}: {key} has shape {tuple(t.shape)}, the base {tuple(base.shape)}; "
                            "use the base it was trained from")
        compressed = isinstance(value, Mapping)  # compressed files store the change itself, not the weight
        weights[name] = t.float() if compressed else t.float() - base
    if skipped:
        log.warning("%s: ignored %d non-cross-attention entries (e.g. %s)", path, len(skipped), skipped[0])
    if not weights:
        raise UserError(f"{path}: no cross-attention (attn2) weights found")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    tokens: dict[str, Tensor] = {}
    if isinstance(embed, Mapping):
        for tok, row in embed.items():
            tokens[str(tok)] = _tensor(row, f"modifier_token {tok}", path).float().reshape(-1)
    elif embed is not None:
        e = _tensor(embed, "embed", path).float()
        if e.numel() % width:
            raise UserError(f"{path}: embed has {e.numel()} values, not a multiple of the base width {width}")
        rows = e.reshape(-1, width)
        tokens = {f"<new{i + 1}>": rows[i] for i in range(rows.shape[0])}  # the reference names them in order
    for tok, row in tokens.items():
        if row.numel() != width:
            raise UserError(f"{path}: token {tok} has width {row.numel()}, the base {width}; use the base it "
                            "was trained from")
        if tok in pipe.tokenizer.get_vocab():
            raise UserError(f"{path}: token {tok} already exists in the base vocabulary")
    classes = list(class_words or [])
    if classes and len(classes) != len(tokens):
        raise UserError(f"--class-word given {len(classes)} times for {len(tokens)} tokens ({', '.join(tokens)})")
    kv = all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in weights)
    names = sorted(weights)
    log.info("imported %s (%s): %d matrices, tokens %s", path, fmt, len(weights), list(tokens))
    return Delta(
        weights=weights, tokens=tokens, trained="crossattn_kv" if kv else "crossattn",
        base={"name": base_name, "fingerprint": base_fingerprint(pipe.unet, names), "vocab_size": len(pipe.tokenizer)},
        token_info=[{"token": t, "initializer": "", "class": classes[i] if classes else ""}
                    for i, t in enumerate(tokens)],
        config={"imported_from": str(path), "import_format": fmt},
        extra={"import_source": json.dumps({"file": path.name, "format": fmt})})
