"""Subcommands on delta files: `merge`, `compress`, `export` and `import`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..validate import (
    check_in_file,
    check_number,
    check_out_dir,
    check_out_file,
    deferred_warnings,
    human_bytes,
)
from .flags import add_base, add_device, add_out, device


def _out_file(path: str, need_bytes: int = 0) -> Path:
    return check_out_file("-o", path, ".safetensors", need_bytes)


def _sizes(paths: list[str]) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


def _cmd_merge(a: argparse.Namespace) -> None:
    from ..base import base_facts, load_pipeline
    from ..delta import load_delta, save_delta
    from ..merge import merge_deltas, read_captions

    with deferred_warnings():
        if len(a.deltas) < 2:
            raise UserError("merge needs at least two delta files")
        check_number("--ridge", a.ridge, 0, 1e6)
        check_number("--pad-weight", a.pad_weight, 0, 1e6)
        if len({str(Path(p).resolve()) for p in a.deltas}) < len(a.deltas):
            raise UserError("the same delta file is given twice; merge distinct deltas")
        out = _out_file(a.out, need_bytes=_sizes(a.deltas))
        if out.resolve() in {Path(p).resolve() for p in a.deltas}:
            raise UserError(f"-o {a.out}: is one of the input deltas; write the merged delta to a new file")
        deltas = [load_delta(p) for p in a.deltas]  # validate every input before the slow base load
        captions = read_captions(a.reg_captions)
        base_facts(a.base)
    pipe = load_pipeline(a.base, device=device(a.device))
    merged = merge_deltas(deltas, pipe, captions, sources=a.deltas, ridge=a.ridge, base_name=a.base,
                          pad_weight=a.pad_weight)
    save_delta(merged, out)
    print(out)


def _cmd_compress(a: argparse.Namespace) -> None:
    from ..compress import compress_delta
    from ..delta import load_delta, save_delta

    with deferred_warnings():
        check_number("--energy", a.energy, 0, 1, lo_open=True, why=" (a fraction of the singular values)")
        check_number("--rank", a.rank, 1, 100_000)
        out = _out_file(a.out, need_bytes=_sizes([a.delta]))
        if Path(a.delta).resolve() == out.resolve():
            raise UserError(f"-o {a.out}: is the input delta itself; write the compressed delta to a new file")
        delta = load_delta(a.delta)
    small = compress_delta(delta, energy=a.energy, rank=a.rank)
    save_delta(small, out)
    before, after = Path(a.delta).stat().st_size, out.stat().st_size
    print(f"{a.delta}: {human_bytes(before)} -> {out}: {human_bytes(after)} ({100.0 * after / max(before, 1):.1f}%)")


def _cmd_export(a: argparse.Namespace) -> None:
    from ..delta import check_base, load_delta
    from ..interop import MANIFEST, export_delta
    from ..outputs import check_out

    with deferred_warnings():
        check_out_dir("-o", a.out, need_bytes=2 * _sizes([a.delta]))
        out = check_out(a.out, "export", MANIFEST, flag="-o")  # replaced whole: no user files, no stale tokens
        if out.resolve() in Path(a.delta).resolve().parents:
            raise UserError(f"-o {a.out}: holds the input delta {a.delta}, which the export would replace; "
                            "export to another folder")
        delta = load_delta(a.delta)
    unet_config = None
    if a.base:  # optional: confirm the delta belongs to this base before handing it to other tools
        from ..base import load_pipeline
        from ..delta import apply_deltas

        pipe = load_pipeline(a.base)
        check_base(delta, pipe.unet, a.delta)
        apply_deltas(pipe, [delta], [a.delta]).remove()  # token rows and pipeline kind fit this base too
        unet_config = pipe.unet.config
    print(export_delta(delta, a.to, a.out, unet_config=unet_config))


def _cmd_import(a: argparse.Namespace) -> None:
    from ..base import base_facts, load_pipeline
    from ..delta import save_delta
    from ..interop import import_reference, read_reference

    with deferred_warnings():
        for f in a.file:
            if not Path(f).is_dir():
                check_in_file("FILE", f, "Custom Diffusion delta (delta.ckpt, delta.bin or diffusers' example "
                              "output)")
            elif len(a.file) > 1:
                raise UserError(f"FILE {f}: a folder; give the folder alone, or the files themselves")
        inputs = [p for f in a.file for p in (Path(f).iterdir() if Path(f).is_dir() else [Path(f)])]
        out = _out_file(a.out, need_bytes=2 * _sizes([str(p) for p in inputs]))
        if out.resolve() in {p.resolve() for p in inputs}:
            raise UserError(f"-o {a.out}: is one of the files to import; write the delta to a new file")
        for w in a.class_word or []:
            if not w.strip() or len(w.split()) != 1:
                raise UserError(f"--class-word {w!r}: give one word, such as cat")
        base_facts(a.base)
        loaded = read_reference(a.file)
    pipe = load_pipeline(a.base)
    save_delta(import_reference(a.file, pipe, a.base, a.class_word, loaded), out)
    print(out)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `merge`, `compress`, `export` and `import`."""
    from ..interop import EXPORT_FORMATS
    from ..merge import DEFAULT_RIDGE

    m = sub.add_parser("merge", help="closed-form merge of separately trained deltas into one",
                       description="Merge deltas of one base: each cross-attention K/V matrix is solved in closed "
                       "form so every concept's prompts keep their fine-tuned outputs while generic captions change "
                       "as little as possible (docs/MERGE.md). Clashing token names are renamed (<new2>, ...); "
                       "residuals are logged and stored in the merged delta.")
    m.add_argument("deltas", nargs="+", metavar="DELTA", help="delta files (two or more)")
    add_base(m, note=" (the one the deltas were trained on)")
    m.add_argument("--reg-captions", metavar="FILE", default=None,
                   help="generic captions, one per line (default: the 460 shipped with customdiff)")
    m.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                   help=f"ridge added to C_reg^T C_reg, relative to its mean eigenvalue (default: {DEFAULT_RIDGE})")
    m.add_argument("--pad-weight", type=float, default=0.0,
                   help="also pull each concept's padding rows (after end-of-text) towards its own outputs, with "
                   "this weight relative to the captions (default: 0, the reference's merge; see docs/MERGE.md)")
    add_device(m)
    add_out(m, "output delta file", metavar="OUT.safetensors")
    m.set_defaults(func=_cmd_merge)

    c = sub.add_parser("compress", help="low-rank compression of a delta",
                       description="Replace each weight change by a truncated SVD (up @ down). Prints the size "
                       "before and after. Sampling reads compressed deltas like any other.")
    c.add_argument("delta", metavar="DELTA", help="delta file")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--energy", type=float, help="keep the smallest rank whose singular values sum to this fraction "
                   "of the total (the reference uses 0.6)")
    g.add_argument("--rank", type=int, help="keep this rank in every matrix")
    add_out(c, "output delta file", metavar="OUT.safetensors")
    c.set_defaults(func=_cmd_compress)

    e = sub.add_parser("export", help="export a delta as a LoRA plus embeddings for other tools",
                       description="diffusers-lora: pytorch_lora_weights.safetensors (load with "
                       "pipe.load_lora_weights(DIR, weight_name='pytorch_lora_weights.safetensors')) and one "
                       "{token: row} file per token (pipe.load_textual_inversion(FILE, token=TOKEN)); exact at "
                       "full rank. kohya: lora_unet_* keys with alpha = rank, for AUTOMATIC1111 and ComfyUI, plus "
                       "emb_params embeddings. The folder also gets customdiff_export.json.")
    e.add_argument("delta", metavar="DELTA", help="delta file")
    e.add_argument("--to", required=True, choices=list(EXPORT_FORMATS), help="target format")
    add_base(e, required=False, note=" (optional: check the delta against this base first)")
    add_out(e, "output folder")
    e.set_defaults(func=_cmd_export)

    i = sub.add_parser("import", help="import a Custom Diffusion delta: the reference repo's delta.ckpt/delta.bin "
                       "(SD and SDXL) or diffusers' example output",
                       description="Read the reference Custom Diffusion repo's CompVis delta.ckpt or diffusers "
                       "delta.bin (SD 1.x/2.x, or SDXL with a 768- and a 1280-wide row per token), or what diffusers' "
                       "Custom Diffusion example writes: its output folder, or pytorch_custom_diffusion_weights."
                       "safetensors/.bin (token files <token>.safetensors/.bin beside it are read too) optionally "
                       "followed by its token files. Pickles are read with torch.load(weights_only=True): no code "
                       "in a file is run; anything but tensors and plain containers is refused. The changes are "
                       "stored against --base.")
    i.add_argument("file", metavar="FILE", nargs="+", help="delta.ckpt, delta.bin, a diffusers-example folder, or "
                   "its weights file [and token files]")
    add_base(i, note=" (the one it was trained from)")
    i.add_argument("--class-word", action="append", metavar="WORD",
                   help="class word of each token in order (e.g. cat), used by a later merge (repeatable)")
    add_out(i, "output delta file", metavar="OUT.safetensors")
    i.set_defaults(func=_cmd_import)
