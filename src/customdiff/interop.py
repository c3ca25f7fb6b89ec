"""Other ecosystems' formats: export to diffusers LoRA / kohya LoRA + embeddings, import the reference repo's deltas.

Export writes a LoRA whose B @ A equals the delta's change (exactly, at full rank) plus embedding files per
token (SDXL: one row per text encoder). Import reads the reference repo's `delta.ckpt` (CompVis) and `delta.bin`
(diffusers, SD and SDXL) files and the output of diffusers' Custom Diffusion example (a folder with
`pytorch_custom_diffusion_weights.safetensors`/`.bin` and one `<token>.safetensors`/`.bin` per token), with
safetensors or `torch.load(weights_only=True)` only, and turns their fine-tuned weights into changes against a
base.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .conditioning import SD_PIPELINE, XL_PIPELINE, is_xl, pipeline_name, sides
from .delta import Delta, atomic_save, base_fingerprint, public_name
from .errors import UserError
from .outputs import check_out, staged
from .tokens import in_vocabulary
from .validate import check_readable

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
MANIFEST = "customdiff_export.json"
EXPORT_FORMATS = ("diffusers-lora", "kohya")
EXAMPLE_WEIGHTS = "pytorch_custom_diffusion_weights"  # diffusers' Custom Diffusion example: + .safetensors / .bin


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


def kohya_lora_state(delta: Delta, unet_config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """`lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (= rank, so the scale is 1).

    With `unet_config` (SDXL), modules are named as kohya's sd-scripts name SDXL ones, after the original
    (SGM) layout: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`."""
    state = {}
    for n in delta.param_names():
        if n.endswith(".bias"):
            raise UserError(f"kohya LoRA files hold no bias changes ({n}); export --to diffusers-lora instead")
        B, A = lora_factors(delta, n)
        module = _module(n)
        if unet_config is not None:
            sgm = diffusers_to_compvis(n, unet_config)
            if sgm is None:
                raise UserError(f"{n}: no kohya (SGM) name for this module")
            module = _module(sgm.removeprefix("model.diffusion_model."))
        key = "lora_unet_" + module.replace(".", "_")
        state[key + ".lora_down.weight"] = A.contiguous()
        state[key + ".lora_up.weight"] = B.contiguous()
        state[key + ".alpha"] = torch.tensor(float(A.shape[0]))
    return state


def _write_dir(files: Mapping[str, tuple[dict[str, Tensor], dict[str, str]]], manifest: dict, out: Path) -> None:
    """Stage every file beside `out` and move them in at the end: no half-written export on failure. `out` is
    replaced whole, so it must be new, empty or an earlier export (the command checks that at its door too)."""
    check_out(out, "export", MANIFEST, flag="-o")
    with staged(out, replace=True, last=MANIFEST) as tmp:  # an earlier export's files go with it
        for fname, (tensors, meta) in files.items():
            atomic_save(tensors, meta, tmp / fname)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _xl_unet_config(delta: Delta) -> dict[str, Any]:
    """The block layout of an SDXL delta's UNet, read from its module names (for SGM names in kohya files)."""
    names = delta.param_names()
    blocks = {int(n.split(".")[1]) for n in names if n.startswith(("down_blocks.", "up_blocks."))}
    n_blocks = max(blocks, default=2) + 1
    # SDXL-style layouts: attention in all but the first down block; two resnets per block (SDXL's own) unless
    # the names show another count
    layers = max((int(n.split(".")[3]) for n in names if n.startswith("down_blocks.")), default=1) + 1
    return {"down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n_blocks - 1),
            "up_block_types": ["CrossAttnUpBlock2D"] * (n_blocks - 1) + ["UpBlock2D"], "layers_per_block": layers}


def export_delta(delta: Delta, to: str, out: str | Path, unet_config: Mapping[str, Any] | None = None) -> Path:
    """Write `delta` as a diffusers or kohya LoRA plus embedding files per token into folder `out`.

    SDXL deltas (token rows for both encoders) get, for diffusers, a second `{token: row}` file per token for
    text_encoder_2, and for kohya one `{"clip_l": row, "clip_g": row}` file per token and SGM module names
    (`unet_config`, when given, is the base UNet's config; else the layout is read from the names)."""
    out = Path(out)
    if to not in EXPORT_FORMATS:
        raise UserError(f"--to {to!r} is unknown; choose one of {', '.join(EXPORT_FORMATS)}")
    if not delta.param_names() and not delta.tokens:
        raise UserError("the delta is empty; nothing to export")
    beyond = [n for n in delta.param_names() if not n.endswith(".bias") and not delta.is_matrix(n)]
    if beyond:
        raise UserError(f"the delta changes {len(beyond)} tensors that a LoRA of linear layers cannot hold (e.g. "
                        f"{beyond[0]}: convolutions and norms, as `--train unet` changes); export takes crossattn_kv "
                        "and crossattn deltas, and `customdiff sample` uses this one as it is")
    meta = {"customdiff_base": json.dumps(delta.base.get("name", "")), "customdiff_trained": delta.trained}
    xl = bool(delta.tokens_2) or delta.base.get("pipeline") == XL_PIPELINE
    files: dict[str, tuple[dict[str, Tensor], dict[str, str]]] = {}
    tokens, tokens_2 = {}, {}
    if to == "diffusers-lora":
        lora_name = LORA_FILE
        files[lora_name] = (diffusers_lora_state(delta), meta)
        for i, (tok, row) in enumerate(delta.tokens.items()):
            fname = _token_filename(tok, i)
            files[fname] = ({tok: row.float().contiguous()}, {})
            tokens[tok] = fname
            if tok in delta.tokens_2:  # SDXL: the row of text_encoder_2 in its own file
                fname_2 = fname.removesuffix(".safetensors") + "_2.safetensors"
                files[fname_2] = ({tok: delta.tokens_2[tok].float().contiguous()}, {})
                tokens_2[tok] = fname_2
        how = [f'pipe.load_lora_weights(DIR, weight_name="{lora_name}")'] + [
            f'pipe.load_textual_inversion("DIR/{f}", token="{t}")' for t, f in tokens.items()] + [
            f'pipe.load_textual_inversion("DIR/{f}", token="{t}", text_encoder=pipe.text_encoder_2, '
            'tokenizer=pipe.tokenizer_2)' for t, f in tokens_2.items()]
    else:
        lora_name = KOHYA_FILE
        config = (unet_config or _xl_unet_config(delta)) if xl else None
        files[lora_name] = (kohya_lora_state(delta, config), {**meta, "ss_network_module": "networks.lora"})
        for i, (tok, row) in enumerate(delta.tokens.items()):
            fname = _token_filename(tok, i)  # A1111 and ComfyUI name the embedding after the file
            if xl:  # the SDXL embedding layout of A1111, ComfyUI and diffusers' docs
                files[fname] = ({"clip_l": row.float().reshape(1, -1).contiguous(),
                                 "clip_g": delta.tokens_2[tok].float().reshape(1, -1).contiguous()}, {})
            else:
                files[fname] = ({"emb_params": row.float().reshape(1, -1).contiguous()}, {})
            tokens[tok] = fname
        how = ["AUTOMATIC1111/ComfyUI: put the LoRA in models/Lora and each embedding in embeddings/; write "
               "<lora:lora_kohya:1> and the embedding's file name (e.g. new1) in the prompt"]
    ranks = sorted({int(t.shape[0]) for k, t in files[lora_name][0].items() if "lora_A" in k or "lora_down" in k})
    manifest = {"format": to, "lora": lora_name, "tokens": tokens, **({"tokens_2": tokens_2} if tokens_2 else {}),
                "pipeline": XL_PIPELINE if xl else SD_PIPELINE, "base": delta.base.get("name", ""),
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
    """A file's content: safetensors (whatever its name: diffusers' example writes safetensors as `<token>.bin`)
    or a torch pickle read with weights_only=True (tensors and plain containers only; nothing in it runs)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    check_readable(path)
    meta = _safetensors_metadata(path)
    if meta is not None:
        if meta.get("format") == "customdiff.delta":
            raise UserError(f"{path}: already a customdiff delta; use it directly")
        from .delta import read_tensors

        return read_tensors(path)
    try:
        # weights_only: tensors and plain containers only; any other pickled object is refused, never run
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read; the error says it
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means the file is not a safe reference delta
        raise UserError(f"{path}: refused: {_unpickling_problem(path, e)}; only reference deltas of plain tensors are "
                        "imported, and nothing in a file is ever run") from e


def _unpickling_problem(path: Path, e: Exception) -> str:
    """What torch's weights-only loader refused, in a few words (its message also suggests weights_only=False)."""
    if zipfile.is_zipfile(path):  # torch.save's format: torch lists the code it would load
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (RuntimeError, ValueError):
            return "a damaged or foreign zip archive, not a PyTorch checkpoint"
        if unsafe:
            more = f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else ""
            return f"it asks to load {', '.join(unsafe[:3])}{more}, which is code, not a tensor or a plain container"
    text = str(e)
    named = re.search(r"GLOBAL ([\w.]+)", text)  # the legacy format: only torch's message names it
    if named:
        return f"it asks to load {named.group(1)}, which is code, not a tensor or a plain container"
    if "Unsupported operand" in text or isinstance(e, EOFError):
        return "not a PyTorch tensor file"
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Weights only load failed")]
    return lines[0][:200] if lines else type(e).__name__


_TOKEN_FILE_MAX = 64 << 20  # a token file holds one row (KBs); bigger files beside the weights are not looked at


def _token_file(path: Path, strict: bool) -> tuple[str, Tensor] | None:
    """The (token, row) of a diffusers-example token file `{token: row}`; None (or, if `strict`, an error)
    for anything else; a file this user may not read is an error either way (it may be the token)."""
    check_readable(path)
    try:
        if not strict and path.stat().st_size > _TOKEN_FILE_MAX:
            return None
        obj = _safe_load(path)
    except UserError:
        if strict:
            raise
        return None
    ok = isinstance(obj, Mapping) and len(obj) == 1
    tok, row = next(iter(obj.items())) if ok else (None, None)
    if not (ok and isinstance(tok, str) and isinstance(row, Tensor) and row.is_floating_point()
            and row.numel() == row.shape[-1] and row.numel() > 1):
        if strict:
            raise UserError(f"{path}: not a token file (one {{token: row}} entry, as diffusers' example writes)")
        return None
    return tok, _tensor(row, f"token {tok}", path).float().reshape(-1)


def _inputs(given: str | Path | Sequence[str | Path]) -> tuple[Path, list[Path], bool]:
    """(main file, token files, whether the token files were named by the user) of what `import` was given:
    a reference delta file; a diffusers-example folder; or its weights file (token files found beside it)
    with, optionally, its token files."""
    paths = [Path(given)] if isinstance(given, (str, Path)) else [Path(p) for p in given]
    if not paths:
        raise UserError("import: give a file or folder")
    if paths[0].is_dir():
        if len(paths) > 1:
            raise UserError(f"{paths[0]}: a folder; give the folder alone, or the files themselves")
        folder = paths[0]
        names = [f"{EXAMPLE_WEIGHTS}.safetensors", f"{EXAMPLE_WEIGHTS}.bin", "delta.bin", "delta.ckpt"]
        main = next((folder / n for n in names if (folder / n).is_file()), None)
        if main is None:
            raise UserError(f"{folder}: is a folder without {', '.join(names)}; give a Custom Diffusion output "
                            "folder or file")
        paths = [main]
    main, rest = paths[0], paths[1:]
    if any(p.is_dir() for p in rest):
        raise UserError(f"{next(p for p in rest if p.is_dir())}: a folder; give the folder alone, or files")
    if rest or not main.name.startswith(EXAMPLE_WEIGHTS):
        return main, rest, True
    found = sorted(p for p in main.parent.iterdir() if p.is_file() and not p.name.startswith((".", EXAMPLE_WEIGHTS))
                   and p.suffix in (".bin", ".safetensors"))
    return main, found, False


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


def _rows(value: Any, where: str, path: Path) -> list[Tensor]:
    """A modifier token's rows: one tensor (SD), or a list of one row per text encoder (the SDXL delta.bin)."""
    if isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= 2:
            raise UserError(f"{path}: {where} holds {len(value)} rows; expected one per text encoder (1 or 2)")
        return [_tensor(v, where, path).float().reshape(-1) for v in value]
    return [_tensor(value, where, path).float().reshape(-1)]


def read_reference(path: str | Path | Sequence[str | Path]) -> tuple[dict[str, Any], Any, str]:
    """Load and check a Custom Diffusion delta without a base: (UNet entries, tokens, format); every tensor
    finite. `path`: a reference delta.ckpt/delta.bin, or diffusers' example output (its folder, its weights
    file, or the weights file and its token files). Run at the door, before the base loads."""
    main, token_files, named = _inputs(path)
    unet_entries, embed, fmt = _parse(_safe_load(main), main)
    for key, value in unet_entries.items():
        _tensor(value, str(key), main)
    if isinstance(embed, Mapping):
        for tok, row in embed.items():
            _rows(row, f"modifier_token {tok}", main)
    elif embed is not None:
        _tensor(embed, "embed", main)
    if token_files:
        if fmt != "diffusers-attn-procs":
            raise UserError(f"{main}: token files go with diffusers' {EXAMPLE_WEIGHTS} file only; a reference "
                            "delta holds its tokens")
        found = [t for t in (_token_file(p, strict=named) for p in token_files) if t is not None]
        embed = dict(found)
        if len(embed) < len(found):
            raise UserError(f"{main.parent}: two token files hold the same token; keep one")
        fmt = "diffusers-example"
        log.info("%s: token files %s", main, [p.name for p in token_files if named] or sorted(embed))
    if fmt.startswith("diffusers-") and not embed:
        log.warning("%s: no token files (<token>.safetensors or .bin) found; the imported delta has no modifier "
                    "token", main)
    return unet_entries, embed, fmt


@torch.no_grad()
def import_reference(path: str | Path | Sequence[str | Path], pipe: Any, base_name: str,
                     class_words: Sequence[str] | None = None,
                     loaded: tuple[dict[str, Any], Any, str] | None = None) -> Delta:
    """Read a Custom Diffusion delta (see read_reference) as changes against `pipe`'s base (SD or SDXL).

    Changes are stored in float32, so the imported delta reproduces the file's weights exactly."""
    unet_entries, embed, fmt = loaded if loaded is not None else read_reference(path)
    path = _inputs(path)[0]
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
            hint = (" (this base is SDXL; diffusers' Custom Diffusion example trains SD 1.x/2.x only)"
                    if fmt.startswith("diffusers-") and is_xl(pipe) else f" (this base is a {pipeline_name(pipe)})")
            raise UserError(f"{path}: {key} has no counterpart in the base UNet ({name}); is --base the model "
                            f"it was trained from?{hint}")
        base = params[name].detach().float().cpu()
        if tuple(t.shape) != tuple(base.shape):
            raise UserError(f"{path}: {key} has shape {tuple(t.shape)}, the base {tuple(base.shape)}; "
                            "use the base it was trained from")
        compressed = isinstance(value, Mapping)  # compressed files store the change itself, not the weight
        weights[name] = t.float() if compressed else t.float() - base
    if not weights:
        n = len(skipped)
        held = f" (it holds {n} other {'entry' if n == 1 else 'entries'}, e.g. {skipped[0]})" if skipped else ""
        raise UserError(f"{path}: no cross-attention (attn2) weights found{held}; give a Custom Diffusion "
                        "delta.ckpt or delta.bin, or the folder diffusers' Custom Diffusion example wrote")
    if skipped:
        log.warning("%s: ignored %d non-cross-attention entries (e.g. %s)", path, len(skipped), skipped[0])
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    tokens: dict[str, Tensor] = {}
    tokens_2: dict[str, Tensor] = {}
    n_sides = len(sides(pipe))
    if isinstance(embed, Mapping):
        for tok, row in embed.items():
            rows = _rows(row, f"modifier_token {tok}", path)
            if len(rows) != n_sides:
                raise UserError(f"{path}: token {tok} has {len(rows)} row(s), the base ({pipeline_name(pipe)}) "
                                f"has {n_sides} text encoder(s); use the base it was trained from")
            tokens[str(tok)] = rows[0]
            if n_sides == 2:
                tokens_2[str(tok)] = rows[1]
    elif embed is not None:
        if is_xl(pipe):
            raise UserError(f"{path}: a CompVis (SD 1.x/2.x) delta; this base is SDXL")
        e = _tensor(embed, "embed", path).float()
        if e.numel() % width:
            raise UserError(f"{path}: embed has {e.numel()} values, not a multiple of the base width {width}")
        rows = e.reshape(-1, width)
        tokens = {f"<new{i + 1}>": rows[i] for i in range(rows.shape[0])}  # the reference names them in order
    for side in sides(pipe):
        width = getattr(pipe, side.encoder).get_input_embeddings().weight.shape[1]
        for tok, row in (tokens_2 if side.prefix == "tokens_2" else tokens).items():
            if row.numel() != width:
                raise UserError(f"{path}: token {tok} has width {row.numel()}, the base's {side.encoder} {width}; "
                                "use the base it was trained from")
            if in_vocabulary(getattr(pipe, side.tokenizer), tok):
                raise UserError(f"{path}: token {tok} already exists in the base vocabulary; rename it (its file "
                                "names it in diffusers' example output: <new1>.safetensors)")
    classes = list(class_words or [])
    if classes and len(classes) != len(tokens):
        raise UserError(f"--class-word given {len(classes)} times for {len(tokens)} tokens ({', '.join(tokens)})")
    kv = all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in weights)
    names = sorted(weights)
    log.info("imported %s (%s): %d matrices, tokens %s", path, fmt, len(weights), list(tokens))
    return Delta(
        weights=weights, tokens=tokens, tokens_2=tokens_2, trained="crossattn_kv" if kv else "crossattn",
        base={"name": public_name(base_name), "fingerprint": base_fingerprint(pipe.unet, names),
              "vocab_size": len(pipe.tokenizer), "pipeline": pipeline_name(pipe)},
        token_info=[{"token": t, "initializer": "", "class": classes[i] if classes else ""}
                    for i, t in enumerate(tokens)],
        config={"imported_from": public_name(str(path), True), "import_format": fmt},
        extra={"import_source": json.dumps({"file": path.name, "format": fmt})})
