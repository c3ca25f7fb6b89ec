"""A corpus of bad and unusual inputs: each is refused with exit 2 and one line on stderr before any work
(no traceback, no partial output), or accepted with the one warning docs/INPUTS.md documents."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from customdiff.cli import main

PROMPT = "photo of a <new1> cat"


@dataclass
class Env:
    """What a case needs: the tiny base, concept folders, a valid delta and a scratch folder."""

    base: str
    concept: str
    reg: str
    delta: Path
    tmp: Path


def _train(env: Env, *extra: str, concept: str | None = None, out: str | None = None,
           reg: str | None = "default") -> list[str]:
    args = ["train", "--base", env.base, "--concept", concept or env.concept, "--instance-prompt", PROMPT,
            "--class-prompt", "photo of a cat", "--steps", "1", "--batch-size", "2",
            "--out", out or str(env.tmp / "d.safetensors")]
    if reg:
        args += ["--reg-dir", env.reg if reg == "default" else reg]
    return args + list(extra)


def _sample(env: Env, *extra: str, out: str | None = None, delta: Path | None = None) -> list[str]:
    args = ["sample", "--base", env.base, "--prompt", PROMPT if delta is not None else "photo of a cat", "--n", "1",
            "--steps", "2", "--out", out or str(env.tmp / "s")]
    if delta is not None:
        args += ["--delta", str(delta)]
    return args + list(extra)


def _copy_concept(env: Env, name: str = "c") -> Path:
    d = env.tmp / name
    d.mkdir()
    for p in sorted(Path(env.concept).iterdir()):
        (d / p.name).write_bytes(p.read_bytes())
    return d


def _with_file(env: Env, fname: str, data: bytes) -> str:
    d = _copy_concept(env)
    (d / fname).write_bytes(data)
    return str(d)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _concepts_file(env: Env, content: str | bytes | list) -> str:
    f = env.tmp / "concepts.json"
    if isinstance(content, list):
        content = json.dumps(content)
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(f)


def _concept_entry(env: Env, **kw: object) -> dict:
    return {"instance_prompt": PROMPT, "class_prompt": "photo of a cat", "instance_data_dir": env.concept,
            "class_data_dir": env.reg, **kw}


def _train_concepts(env: Env, content: str | bytes | list) -> list[str]:
    return ["train", "--base", env.base, "--concepts", _concepts_file(env, content), "--steps", "1",
            "--batch-size", "2", "--out", str(env.tmp / "out" / "d.safetensors")]


def _delta_variant(env: Env, change: Callable[[dict, dict], None], name: str = "bad.safetensors") -> Path:
    from safetensors import safe_open

    with safe_open(str(env.delta), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    change(tensors, meta)
    out = env.tmp / name
    save_file(tensors, str(out), metadata=meta)
    return out


def _conv_change(t: dict, m: dict) -> None:  # what a --train unet delta holds beside linear layers
    t["unet.conv_in.weight"] = torch.zeros(4, 4, 3, 3)


def _tokens_only(t: dict, m: dict) -> None:  # what a --train tokens delta holds
    for k in [k for k in t if k.startswith("unet.")]:
        del t[k]


def _nan_weight(t: dict, m: dict) -> None:
    k = next(k for k in t if k.startswith("unet."))
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")


def _nameless_token(t: dict, m: dict) -> None:  # consistent with its metadata: the name alone is wrong
    t["tokens."] = t.pop("tokens.<new1>")
    m["tokens"] = m["tokens"].replace('"<new1>"', '""')


def _inf_token(t: dict, m: dict) -> None:
    t["tokens.<new1>"] = t["tokens.<new1>"].clone()
    t["tokens.<new1>"][3] = float("inf")


def _half_lowrank(t: dict, m: dict) -> None:
    k = next(k for k in t if k.startswith("unet."))
    w = t.pop(k)
    t[k + ".up"] = w[:, :2].contiguous()
    m["storage"] = "lowrank"


def _reg_latin1(env: Env) -> list[str]:
    reg = env.tmp / "reg"
    reg.mkdir()
    for p in sorted(Path(env.reg).glob("*.png")):
        (reg / p.name).write_bytes(p.read_bytes())
    (reg / sorted(reg.glob("*.png"))[0].with_suffix(".txt").name).write_bytes("photo of a caf\xe9 cat".encode("latin-1"))
    return _train(env, reg=str(reg))


def _reg_no_captions(env: Env) -> list[str]:
    reg = env.tmp / "reg"
    reg.mkdir()
    for p in sorted(Path(env.reg).glob("*.png")):
        (reg / p.name).write_bytes(p.read_bytes())
    return _train(env, reg=str(reg))


def _prompts(env: Env, data: bytes) -> list[str]:
    f = env.tmp / "prompts.txt"
    f.write_bytes(data)
    return ["sample", "--base", env.base, "--prompts-file", str(f), "--n", "1", "--steps", "2",
            "--out", str(env.tmp / "out" / "s")]


def _file_as_parent(env: Env) -> list[str]:
    (env.tmp / "afile").write_text("x")
    return _train(env, out=str(env.tmp / "afile" / "d.safetensors"))


def _out_is_folder(env: Env) -> list[str]:
    (env.tmp / "d.safetensors").mkdir(parents=True)
    return _train(env)


def _base_of_class(env: Env, class_name: str, sd_parts: bool) -> str:
    """A copy of the tiny base whose model_index.json names `class_name`, with or without SD's components."""
    base = env.tmp / "b"
    shutil.copytree(env.base, base)
    index = json.loads((base / "model_index.json").read_text())
    index["_class_name"] = class_name
    if not sd_parts:
        index = {k: v for k, v in index.items() if k.startswith("_")} | {"transformer": ["diffusers", "X"]}
    (base / "model_index.json").write_text(json.dumps(index))
    return str(base)


def _sample_out_is_file(env: Env) -> list[str]:
    (env.tmp / "s").write_text("x")
    return _sample(env)


def _animated(env: Env) -> str:
    frames = [Image.new("RGB", (40, 40), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    d = _copy_concept(env)
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return str(d)


def _tiny_photo(env: Env) -> str:
    d = _copy_concept(env)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(d / "dot.png")
    return str(d)


def _checkpoint_nan(env: Env) -> list[str]:
    out = env.tmp / "d.safetensors"
    ck = out.with_name(out.name + ".ckpt")
    ck.mkdir(parents=True)
    save_file({"param.x": torch.tensor([float("nan")])}, str(ck / "latest.safetensors"),
              metadata={"step": "1", "config": "{}"})
    return _train(env, "--resume", out=str(out))


def _import_nan(env: Env) -> list[str]:
    f = env.tmp / "delta.bin"
    torch.save({"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight":
                         torch.full((16, 32), float("nan"))}, "modifier_token": {"<new1>": torch.zeros(32)}}, f)
    return ["import", str(f), "--base", env.base, "-o", str(env.tmp / "out" / "i.safetensors")]


class _RunsCode:
    """Pickles as a call of os.system that makes `path`: what a hostile .ckpt holds (loading must refuse, not run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _import_code(env: Env) -> list[str]:
    f = env.tmp / "delta.ckpt"
    torch.save({"state_dict": _RunsCode(env.tmp / "PWNED")}, f)  # the left-behind-files check would see it
    return ["import", str(f), "--base", env.base, "-o", str(env.tmp / "out" / "i.safetensors")]


def _import_legacy_code(env: Env) -> list[str]:
    f = env.tmp / "delta.ckpt"  # torch's pre-1.6 format, not a zip: only the loader's message names the code
    torch.save({"state_dict": _RunsCode(env.tmp / "PWNED")}, f, _use_new_zipfile_serialization=False)
    return ["import", str(f), "--base", env.base, "-o", str(env.tmp / "out" / "i.safetensors")]


def _import_foreign_zip(env: Env) -> list[str]:
    f = env.tmp / "delta.ckpt"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    return ["import", str(f), "--base", env.base, "-o", str(env.tmp / "out" / "i.safetensors")]


def _import_no_attn2(env: Env) -> list[str]:
    f = env.tmp / "delta.ckpt"  # a checkpoint of something else: said in the one error line, no warning first
    torch.save({"state_dict": {"model.foo.weight": torch.zeros(3)}}, f)
    return ["import", str(f), "--base", env.base, "-o", str(env.tmp / "out" / "i.safetensors")]


def _merge_onto_input(env: Env) -> list[str]:
    other = env.tmp / "other.safetensors"
    other.write_bytes(env.delta.read_bytes())
    return ["merge", str(env.delta), str(other), "--base", env.base, "-o", str(other)]


def _one_photo(env: Env) -> str:
    d = _copy_concept(env)
    for p in sorted(d.iterdir())[1:]:
        p.unlink()
    return str(d)


def _toy_clip() -> str:
    from customdiff.toy import paths

    return paths()["clip"]


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _one_image(folder: str, to: Path) -> Path:
    """A class folder holding a single image of `folder`."""
    to.mkdir()
    first = next(p for p in sorted(Path(folder).iterdir()) if p.suffix == ".png")
    shutil.copy(first, to / first.name)
    return to


def _dataset(env: Env, entries: list) -> list[str]:
    f = env.tmp / "dataset.json"
    f.write_text(json.dumps(entries))
    return ["eval", "--base", env.base, "--dataset", str(f), "--out", str(env.tmp / "out" / "e")]


# (id, argv builder, expected exit code, needle in the single stderr line); code 0 = accepted with a warning
CASES: list[tuple[str, Callable[[Env], list[str]], int, str]] = [
    # numbers, checked before the base loads
    ("steps-zero", lambda e: _train(e, "--steps", "0"), 2, "--steps 0: must be at least 1"),
    ("batch-negative", lambda e: _train(e, "--batch-size", "-1"), 2, "--batch-size -1"),
    ("batch-huge", lambda e: _train(e, "--batch-size", "100000"), 2, "--batch-size 100000: must be at most 1024"),
    ("lr-negative-space", lambda e: _train(e, "--learning-rate", "-1e-4"), 2, "--learning-rate -0.0001: must be greater than 0"),
    ("lr-negative-equals", lambda e: _train(e, "--learning-rate=-1e-4"), 2, "--learning-rate -0.0001"),
    ("lr-nan", lambda e: _train(e, "--learning-rate", "nan"), 2, "must be a finite number"),
    ("lr-minus-inf", lambda e: _train(e, "--learning-rate", "-inf"), 2, "must be a finite number"),
    ("lr-not-a-number", lambda e: _train(e, "--learning-rate", "fast"), 2, "invalid float value"),
    ("resolution-negative", lambda e: _train(e, "--resolution", "-64"), 2, "--resolution -64"),
    ("resolution-not-multiple", lambda e: _train(e, "--resolution", "31"), 2, "must be a multiple of 2"),
    ("seed-negative", lambda e: _train(e, "--seed", "-1"), 2, "--seed -1"),
    ("weight-decay-negative", lambda e: _train(e, "--weight-decay", "-0.1"), 2, "--weight-decay"),
    ("grad-norm-zero", lambda e: _train(e, "--max-grad-norm", "0"), 2, "--max-grad-norm 0.0"),
    ("accumulation-zero", lambda e: _train(e, "--gradient-accumulation", "0"), 2, "--gradient-accumulation"),
    ("class-images-negative", lambda e: _train(e, "--num-class-images", "-5"), 2, "--num-class-images"),
    ("sample-n-zero", lambda e: _sample(e, "--n", "0"), 2, "--n 0"),
    ("sample-guidance-nan", lambda e: _sample(e, "--guidance", "nan"), 2, "finite"),
    ("sample-resolution-odd", lambda e: _sample(e, "--resolution", "33"), 2, "multiple of"),
    ("sample-token-without-its-delta", lambda e: _sample(e, "--prompt", PROMPT), 2,
     "the prompt uses <new1>, which no --delta defines"),
    ("retrieve-index-is-a-delta", lambda e: ["retrieve", "--corpus", e.reg, "--class-prompt", "cat", "-n", "2",
                                             "--index", str(e.delta), "-o", str(e.tmp / "r")], 2,
     "exists and is not a retrieval index (format 'customdiff.delta')"),
    ("out-name-too-long", lambda e: _train(e, out=str(e.tmp / ("a" * 245 + ".safetensors"))), 2,
     "choose a shorter name"),
    ("token-past-the-text-encoder", lambda e: _train(e, "--instance-prompt", "a very " * 80 + "<new1> cat"), 2,
     "tokens the text encoder reads (with an augmentation prefix)"),
    ("initializer-blank", lambda e: _train(e, "--initializer", " "), 2, "--initializer: a word is empty"),
    ("compress-token-rows-only", lambda e: ["compress", str(_delta_variant(e, _tokens_only)), "--rank", "1", "-o",
                                            str(e.tmp / "c.safetensors")], 2, "holds no weight matrices to compress"),
    ("sample-steps-beyond-the-solver", lambda e: _sample(e, "--scheduler", "dpm++", "--steps", "999"), 2,
     "DPMSolverMultistepScheduler places timestep 1000 beyond its 1000 training steps"),
    ("sample-steps-beyond-schedule", lambda e: _sample(e, "--steps", "5000"), 2, "scheduler's training steps"),
    ("merge-ridge-negative", lambda e: ["merge", str(e.delta), str(e.delta), "--base", e.base, "--ridge", "-1",
                                        "-o", str(e.tmp / "out" / "m.safetensors")], 2, "--ridge"),
    ("merge-same-delta-twice", lambda e: ["merge", str(e.delta), str(e.delta), "--base", e.base,
                                          "-o", str(e.tmp / "out" / "m.safetensors")], 2, "given twice"),
    ("compress-energy-above-one", lambda e: ["compress", str(e.delta), "--energy", "1.5",
                                             "-o", str(e.tmp / "out" / "c.safetensors")], 2, "--energy"),
    ("compress-rank-zero", lambda e: ["compress", str(e.delta), "--rank", "0",
                                      "-o", str(e.tmp / "out" / "c.safetensors")], 2, "--rank 0"),
    # output paths
    ("out-is-folder", _out_is_folder, 2, "is a folder"),
    ("out-under-a-file", _file_as_parent, 2, "is a file, not a folder"),
    ("out-wrong-suffix", lambda e: _train(e, out=str(e.tmp / "d.pt")), 2, "must end in .safetensors"),
    ("sample-out-is-file", _sample_out_is_file, 2, "exists and is a file"),
    ("compress-onto-itself", lambda e: ["compress", str(e.delta), "--rank", "1", "-o", str(e.delta)], 2,
     "is the input delta itself"),
    # images
    ("decompression-bomb", lambda e: _train(e, concept=_with_file(e, "huge.png", _png_claiming(30000, 30000))), 2,
     "too many pixels"),
    ("truncated-png", lambda e: _train(e, concept=_with_file(e, "cut.png", (Path(e.concept) / "img0.png").read_bytes()[:60])),
     2, "cut.png: not a readable image"),
    ("text-named-png", lambda e: _train(e, concept=_with_file(e, "fake.png", b"hello, not a picture")), 2,
     "fake.png: not a readable image"),
    ("empty-jpg", lambda e: _train(e, concept=_with_file(e, "empty.jpg", b"")), 2, "empty.jpg: not a readable image"),
    ("non-image-file", lambda e: _train(e, concept=_with_file(e, "notes.doc", b"x")), 2, "notes.doc: not an image"),
    ("reg-dir-empty", lambda e: (e.tmp / "noreg").mkdir() or _train(e, reg=str(e.tmp / "noreg")), 2,
     "add images of the class (or leave out --reg-dir"),
    ("reg-dir-is-the-concept", lambda e: _train(e, reg=e.concept), 2, "is the concept's own photo folder"),
    ("logdir-is-a-file", lambda e: (e.tmp / "logs").write_text("x") and _train(e, "--logdir", str(e.tmp / "logs")),
     2, "exists and is a file"),
    ("device-unknown", lambda e: _sample(e, "--device", "tpu"), 2, "--device tpu: not a device"),
    ("merge-onto-an-input", _merge_onto_input, 2, "is one of the input deltas"),
    ("export-a-convolution", lambda e: ["export", str(_delta_variant(e, _conv_change)), "--to", "kohya", "-o",
                                        str(e.tmp / "ex")], 2, "a LoRA of linear layers cannot hold"),
    ("import-pickled-code", _import_code, 2, "which is code, not a tensor"),
    ("import-legacy-pickled-code", _import_legacy_code, 2, "which is code, not a tensor"),
    ("import-foreign-zip", _import_foreign_zip, 2, "a damaged or foreign zip archive, not a PyTorch checkpoint"),
    ("base-another-kind-of-pipeline", lambda e: _sample(e, "--base", _base_of_class(e, "FluxPipeline", False)), 2,
     "a FluxPipeline, which customdiff does not train; give a Stable Diffusion 1.x/2.x or SDXL pipeline folder"),
    ("base-neither-folder-nor-hub-id", lambda e: _sample(e, "--base", "nowhere"), 2,
     "--base nowhere: no such folder; give a pipeline folder, a hub id (owner/name) or 'toy'"),
    ("ui-workdir-a-file", lambda e: (e.tmp / "wd").write_text("x") and ["ui", "--workdir", str(e.tmp / "wd")], 2,
     "exists and is a file"),
    ("bench-unknown-concept", lambda e: ["bench", "--concepts", "nope", "-o", str(e.tmp / "b")], 2,
     "--concepts nope: not a toy concept"),
    ("export-into-a-folder-of-other-files",
     lambda e: (e.tmp / "x").mkdir() or shutil.copy(e.delta, e.tmp / "x" / "new1.safetensors") and
     ["export", str(e.tmp / "x" / "new1.safetensors"), "--to", "diffusers-lora", "-o", str(e.tmp / "x")], 2,
     "holds files not from `customdiff export`"),
    ("import-onto-its-input", lambda e: ["import", str(e.delta), "--base", e.base, "-o", str(e.delta)], 2,
     "is one of the files to import; write the delta to a new file"),
    ("sample-pndm-too-few-steps", lambda e: ["sample", "--base", e.base, "--prompt", "a cat", "--scheduler", "pndm",
                                              "--steps", "1", "--n", "1", "-o", str(e.tmp / "s")], 2,
     "PNDMScheduler cannot schedule 1 steps"),
    ("out-name-not-utf8", lambda e: _sample(e, out=str(e.tmp / "o\udce9")), 2,  # the byte 0xe9 alone
     "o\\xe9: the path is not valid UTF-8; rename it"),
    ("delta-name-not-utf8", lambda e: shutil.copy(e.delta, e.tmp / "d\udce9.safetensors") and _sample(
        e, delta=e.tmp / "d\udce9.safetensors"), 2, "d\\xe9.safetensors: the path is not valid UTF-8; rename it"),
    ("sample-into-a-folder-of-other-files", lambda e: _sample(e, out=e.concept), 2,  # the photos stay photos
     "holds files not from `customdiff sample`"),
    ("concepts-and-instance-prompt", lambda e: _train_concepts(e, [_concept_entry(e)]) + ["--instance-prompt",
                                                                                         PROMPT], 2,
     "give either --concepts FILE or --instance-prompt, not both"),
    ("reg-captions-without-reg-dir", lambda e: _train(e, "--reg-captions", str(e.tmp / "none.txt"), reg=None), 2,
     "no --reg-dir is given; add --reg-dir DIR or leave --reg-captions out"),
    ("class-prompt-with-the-token", lambda e: ["train", "--base", e.base, "--concept", e.concept, "--instance-prompt",
                                               PROMPT, "--class-prompt", PROMPT, "--steps", "1", "-o",
                                               str(e.tmp / "d.safetensors")], 2,
     "holds the modifier token <new1>; the class prompt names the class alone"),
    ("ui-host-empty", lambda e: ["ui", "--host", "", "--workdir", str(e.tmp / "wd")], 2,
     "--host '': empty; give 127.0.0.1"),
    ("ui-host-not-here", lambda e: ["ui", "--host", "999.1.1.1", "--workdir", str(e.tmp / "wd")], 2,
     "choose an address of this machine for --host"),
    ("bench-seed-twice", lambda e: ["bench", "--seeds", "0", "0", "-o", str(e.tmp / "b")], 2,
     "--seeds: 0 is given twice; give each once"),
    ("sample-token-past-the-text-encoder", lambda e: ["sample", "--base", e.base, "--delta", str(e.delta), "--prompt",
                                                      "a very " * 80 + "<new1> cat", "--steps", "2", "--n", "1",
                                                      "-o", str(e.tmp / "s")], 2,
     "tokens the text encoder reads, so its concept would be left out"),
    ("concept-a-photo-not-its-folder", lambda e: _train(e, concept=str(next(Path(e.concept).glob("*.png")))), 2,
     "a file, not a folder; give the folder that holds the images"),
    ("reg-dir-a-delta-file", lambda e: _train(e, reg=str(e.delta)), 2,
     "a file, not a folder; give a folder of class images or an images.txt listing them"),
    ("prompts-file-endless", lambda e: ["sample", "--base", e.base, "--prompts-file", "/dev/zero", "--steps", "2",
                                        "-o", str(e.tmp / "s")], 2, "/dev/zero: larger than 64 MB"),
    ("concepts-class-dir-missing", lambda e: _train_concepts(e, [_concept_entry(e, class_data_dir=str(
        e.tmp / "nowhere"))]), 2, "concept 0: class_data_dir"),
    ("delta-nameless-token", lambda e: _sample(e, delta=_delta_variant(e, _nameless_token)), 2,
     "a token row has an empty name (key 'tokens.')"),
    ("unknown-flag-named-by-its-command", lambda e: [*_train(e), "--bogus"], 2,
     "customdiff train: error: unrecognized arguments: --bogus"),
    ("demo-steps-zero", lambda e: ["demo", "--steps", "0", "-o", str(e.tmp / "d")], 2,
     "--steps 0: must be at least 1"),  # left out, the recipe's; 0 is not a way to say so
    ("bench-steps-negative", lambda e: ["bench", "--steps", "-1", "-o", str(e.tmp / "b")], 2,
     "--steps -1: must be at least 1"),
    ("bench-too-many-pairs", lambda e: ["bench", "--pairs", "9", "-o", str(e.tmp / "b")], 2,
     "must be at most 3 (the toy world has 3 concept pairs)"),
    ("concept-folder-missing", lambda e: _train(e, concept=str(e.tmp / "nope")), 2, "no such image folder"),
    ("concept-folder-empty", lambda e: (e.tmp / "empty").mkdir() or _train(e, concept=str(e.tmp / "empty")), 2,
     "contains no images"),
    # text files
    ("caption-latin-1", _reg_latin1, 2, "not UTF-8 text (byte 0xe9 at offset 14)"),
    ("prompts-latin-1", lambda e: _prompts(e, "caf\xe9 <new1> cat\n".encode("latin-1")), 2, "byte 0xe9 at offset 3"),
    ("prompts-binary", lambda e: _prompts(e, b"photo\x00\x01\x02"), 2, "NUL byte"),
    ("prompts-empty", lambda e: _prompts(e, b"\n# only a comment\n"), 2, "empty"),
    ("prompts-missing", lambda e: ["sample", "--base", e.base, "--prompts-file", str(e.tmp / "none.txt"),
                                   "--out", str(e.tmp / "out" / "s")], 2, "no such file"),
    ("reg-captions-too-few", lambda e: (e.tmp / "caps.txt").write_text("one caption\n") and _train(
        e, "--reg-captions", str(e.tmp / "caps.txt")), 2, "1 captions for 6"),
    # JSON files
    ("concepts-invalid-json", lambda e: _train_concepts(e, "[{"), 2, "invalid JSON at line 1"),
    ("concepts-not-a-list", lambda e: _train_concepts(e, "{}"), 2, "expected a non-empty JSON list"),
    ("concepts-empty-list", lambda e: _train_concepts(e, "[]"), 2, "expected a non-empty JSON list"),
    ("concepts-missing-key", lambda e: _train_concepts(e, [{"instance_prompt": PROMPT}]), 2,
     "lacks class_prompt, instance_data_dir"),
    ("concepts-wrong-type", lambda e: _train_concepts(e, [_concept_entry(e, instance_prompt=5)]), 2,
     "instance_prompt must be a string, got a number"),
    ("concepts-entry-not-object", lambda e: _train_concepts(e, ["photo"]), 2, "expected an object"),
    ("concepts-duplicate-token", lambda e: _train_concepts(e, [_concept_entry(e), _concept_entry(e)]), 2,
     "token <new1> is also used by concept 0"),
    ("concepts-duplicate-key", lambda e: _train_concepts(
        e, '[{"instance_prompt": "a <new1> cat", "instance_prompt": "b", "class_prompt": "c", "instance_data_dir": "d"}]'),
     2, "duplicate key 'instance_prompt'"),
    ("concepts-nan-literal", lambda e: _train_concepts(e, '[{"instance_prompt": NaN}]'), 2, "NaN is not valid JSON"),
    ("concepts-latin-1", lambda e: _train_concepts(e, '[{"instance_prompt": "caf\xe9"}]'.encode("latin-1")), 2,
     "not UTF-8"),
    ("concepts-no-token", lambda e: _train_concepts(e, [_concept_entry(e, instance_prompt="photo of a cat")]), 2,
     "no modifier token"),
    ("concepts-caption-file-missing", lambda e: _train_concepts(e, [_concept_entry(e, class_prompt="caps/none.txt")]),
     2, "class_prompt 'caps/none.txt' names no caption file"),
    ("concepts-warning-then-error", lambda e: _train_concepts(e, [_concept_entry(
        e, colour="red", instance_data_dir=str(e.tmp / "gone"))]), 2, "no such image folder"),  # the error alone
    ("concepts-and-concept", lambda e: _train_concepts(e, [_concept_entry(e)]) + ["--concept", e.concept], 2,
     "not both"),
    ("dataset-wrong-type", lambda e: _dataset(e, [{"instance_prompt": PROMPT, "class_prompt": ["cat"],
                                                   "instance_data_dir": "x"}]), 2, "class_prompt must be a string"),
    ("dataset-entry-number", lambda e: _dataset(e, [3]), 2, "expected an object or a list"),
    ("eval-n-class-one", lambda e: _dataset(e, []) + ["--n-class", "1"], 2,
     "--n-class 1: must be at least 2 (KID compares at least 2 images on each side)"),
    ("eval-one-real-class-image", lambda e: _dataset(e, [{
        "instance_prompt": PROMPT, "class_prompt": "cat", "instance_data_dir": e.concept,
        "class_data_dir": str(_one_image(e.reg, e.tmp / "one")),
        "prompt_filename": str(_written(e.tmp / "p.txt", "photo of a {} cat\n"))}]) + ["--delta", str(e.delta), "--clip", _toy_clip()], 2,
     "1 class image(s); KID needs at least 2 real images of the class"),
    # tensor files
    ("delta-nan-weight", lambda e: _sample(e, delta=_delta_variant(e, _nan_weight)), 2, "NaN or infinite"),
    ("delta-inf-token", lambda e: _sample(e, delta=_delta_variant(e, _inf_token)), 2, "tokens.<new1> holds 1 NaN"),
    ("delta-not-safetensors", lambda e: (e.tmp / "x.safetensors").write_bytes(os.urandom(64)) and _sample(
        e, delta=e.tmp / "x.safetensors"), 2, "not a readable safetensors file"),
    ("delta-foreign-safetensors", lambda e: save_file({"w": torch.zeros(2)}, str(e.tmp / "f.safetensors")) or _sample(
        e, delta=e.tmp / "f.safetensors"), 2, "not a customdiff delta"),
    ("delta-future-version", lambda e: _sample(e, delta=_delta_variant(
        e, lambda t, m: m.update(format_version="2"))), 2, "version 2 is not supported"),
    ("delta-corrupt-metadata", lambda e: _sample(e, delta=_delta_variant(
        e, lambda t, m: m.update(tokens="[{"))), 2, "corrupt delta metadata"),
    ("delta-lowrank-half", lambda e: _sample(e, delta=_delta_variant(e, _half_lowrank)), 2, "has no down factor"),
    ("delta-missing", lambda e: _sample(e, delta=e.tmp / "gone.safetensors"), 2, "no such delta file"),
    ("checkpoint-nan", _checkpoint_nan, 2, "param.x holds 1 NaN"),
    ("import-nan", _import_nan, 2, "holds NaN or infinite values"),
    ("import-no-attn2", _import_no_attn2, 2, "no cross-attention (attn2) weights found (it holds 1 other entry"),
    ("import-folder", lambda e: ["import", str(e.tmp), "--base", e.base, "-o", str(e.tmp / "out" / "i.safetensors")],
     2, "is a folder"),
    # accepted, with one warning
    ("sample-prompt-cut-off", lambda e: (e.tmp / "s").mkdir() or [
        "sample", "--base", e.base, "--prompt", "photo of a cat " + "very " * 80 + "on grass", "--n", "1",
        "--steps", "2", "--out", str(e.tmp / "s")], 0, "is cut off and left out of the images"),
    ("base-another-class-with-sd-parts", lambda e: (e.tmp / "s").mkdir() or _sample(
        e, "--base", _base_of_class(e, "KandinskyPipeline", True)),
     0, "a KandinskyPipeline; loading it as StableDiffusionPipeline"),
    ("tiny-photo", lambda e: _train(e, concept=_tiny_photo(e)), 0, "1x1 is smaller than the training resolution 32"),
    ("reg-without-captions", _reg_no_captions, 0, "6 of 6 images have no caption"),
    ("one-photo", lambda e: _train(e, concept=_one_photo(e)), 0, "1 photo of the concept; Custom Diffusion is made for"),
    ("compress-grows", lambda e: ["compress", str(e.delta), "--rank", "1000", "-o", str(e.tmp / "c.safetensors")], 0,
     "is not smaller than the full one"),
    ("concepts-unknown-key", lambda e: (e.tmp / "out").mkdir() or _train_concepts(e, [_concept_entry(e, colour="red")]), 0,
     "unknown key(s) 'colour'"),
    ("animated-gif", lambda e: _train(e, concept=_animated(e)), 0, "animated (3 frames); using the first frame"),
    ("out-folder-created", lambda e: _train(e, out=str(e.tmp / "new" / "deeper" / "d.safetensors")), 0,
     "created the output folder"),
    ("reg-captions-too-many", lambda e: (e.tmp / "caps.txt").write_text("a cat\n" * 7) and _train(
        e, "--reg-captions", str(e.tmp / "caps.txt")), 0, "7 captions for 6 regularization images; the last 1 are unused"),
    ("sample-out-created", lambda e: _sample(e, out=str(e.tmp / "new" / "s")), 0, "created the output folder"),
]


@pytest.fixture(scope="module")
def valid_delta(tiny_base, tmp_path_factory) -> Path:
    """A small valid delta for the tiny base, built by hand (no training)."""
    from customdiff.base import load_pipeline
    from customdiff.delta import Delta, base_fingerprint, save_delta

    unet = load_pipeline(tiny_base).unet
    names = [n for n, _ in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    params = dict(unet.named_parameters())
    delta = Delta(weights={n: 0.01 * torch.randn_like(params[n]) for n in names},
                  tokens={"<new1>": torch.randn(32)}, trained="crossattn_kv",
                  base={"name": tiny_base, "fingerprint": base_fingerprint(unet, names)},
                  token_info=[{"token": "<new1>", "initializer": "ktn", "class": "cat"}])
    path = tmp_path_factory.mktemp("delta") / "d.safetensors"
    save_delta(delta, path)
    return path


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_corpus_has_at_least_40_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize(("case", "build", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, build, code, needle, tiny_base, concept_dirs, valid_delta, tmp_path, capsys):
    env = Env(tiny_base, concept_dirs["a"], concept_dirs["reg"], valid_delta, tmp_path)
    argv = build(env)
    before = _files(tmp_path)
    try:
        got = main(["-q", *argv])
    except SystemExit as e:  # argparse's own usage errors
        got = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err
    assert got == code, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    if code == 0:
        assert "warning" in lines[0]
        return
    assert "error" in lines[0]
    assert _files(tmp_path) == before, "a refused run left files behind"
    assert not (tmp_path / "out").exists() or not any(p for p in (tmp_path / "out").rglob("*") if p.is_file()
                                                      and p not in before)


def test_free_space_checked_before_work(tiny_base, concept_dirs, tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    env = Env(tiny_base, concept_dirs["a"], concept_dirs["reg"], tmp_path / "none", tmp_path)
    assert main(["-q", *_sample(env, "--n", "4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 1000 B are free" in err[0], err
    assert not (tmp_path / "out").exists()


def _file_size_cap(limit: int) -> Callable[[], None]:
    """A child's set-up: files it writes may not grow past `limit` bytes (a write past it fails, as on a full disk)."""
    import resource  # POSIX only: this module stays importable elsewhere

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the failed write returns EFBIG instead of killing the child
    return cap


@pytest.mark.parametrize("command", ["compress", "export"])
def test_a_write_that_runs_out_of_space_is_one_line(command, valid_delta, tmp_path):
    """safetensors reports a failed write as its own error with the OS error in the text; it is the one-line
    disk-full message, and neither the output nor a temporary file stays."""
    out = tmp_path / "o"
    argv = {"compress": ["compress", str(valid_delta), "--rank", "1", "-o", f"{out}.safetensors"],
            "export": ["export", str(valid_delta), "--to", "diffusers-lora", "-o", str(out)]}[command]
    r = subprocess.run([sys.executable, "-m", "customdiff", "-q", *argv], capture_output=True, text=True,
                       timeout=300, preexec_fn=_file_size_cap(2048))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "the disk is full writing" in lines[0] and "File too large" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_error_is_the_last_line_even_without_quiet(tiny_base, concept_dirs, valid_delta, tmp_path, capsys):
    env = Env(tiny_base, concept_dirs["a"], concept_dirs["reg"], valid_delta, tmp_path)
    assert main(_sample(env, delta=_delta_variant(env, _nan_weight))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "NaN or infinite" in lines[-1]


def test_sampling_guard_refuses_nan_latents(tiny_base, tmp_path):
    from customdiff.base import load_pipeline
    from customdiff.errors import NonFiniteError
    from customdiff.sample import sample_to_dir

    pipe = load_pipeline(tiny_base)
    with torch.no_grad():
        next(p for n, p in pipe.unet.named_parameters() if "conv_out.weight" in n).fill_(float("nan"))
    out = tmp_path / "s"
    with pytest.raises(NonFiniteError, match="NaN or infinite latents at step 1"):
        sample_to_dir(pipe, ["a cat", "a dog"], out, n=1, steps=2, progress=False)
    assert not out.exists()  # no black images left behind


@pytest.mark.parametrize(("argv", "needle"), [
    (["sample", "--device", "cuda"], "--device cuda: this machine has no CUDA GPUs; use cpu"),
    (["sample", "--device", "cuda:1"], "--device cuda:1: this machine has no CUDA GPUs"),
    (["train", "--mixed-precision", "fp16"], "--mixed-precision fp16: needs a GPU and this machine has none"),
])
def test_what_this_machine_lacks_is_refused(argv, needle, tiny_base, concept_dirs, valid_delta, tmp_path, capsys,
                                            monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    env = Env(tiny_base, concept_dirs["a"], concept_dirs["reg"], valid_delta, tmp_path)
    full = _sample(env, *argv[1:]) if argv[0] == "sample" else _train(env, *argv[1:])
    assert main(["-q", *full]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not _files(tmp_path)


def test_sampling_matches_stock_pipeline(tiny_base):
    from customdiff.base import load_pipeline
    from customdiff.sample import generate

    pipe = load_pipeline(tiny_base)
    ours = generate(pipe, "a red cat", n=2, seed=3, steps=3, guidance=4.0)
    stock = pipe("a red cat", num_inference_steps=3, guidance_scale=4.0, num_images_per_prompt=2,
                 generator=torch.Generator("cpu").manual_seed(3)).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, stock, strict=True))


def test_a_delta_this_user_may_not_read_is_named_as_such(valid_delta, tmp_path, capsys, monkeypatch):
    """safetensors reports a permission error as a missing file; the message says what is wrong. Root reads
    every file, so the refusal of the OS is simulated."""
    import builtins

    import customdiff.validate

    def guarded_open(file, *args, **kwargs):
        if Path(file) == Path(valid_delta):
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(customdiff.validate, "open", guarded_open, raising=False)
    assert main(["-q", "compress", str(valid_delta), "--rank", "1", "-o", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{valid_delta}: permission denied: this user may not read it" in err[0], err


def test_a_class_image_cache_that_cannot_be_written_is_refused_before_the_base_loads(tiny_base, concept_dirs,
                                                                                      valid_delta, tmp_path, capsys,
                                                                                      monkeypatch):
    import customdiff.train

    env = Env(tiny_base, concept_dirs["a"], concept_dirs["reg"], valid_delta, tmp_path)
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("CUSTOMDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(customdiff.train, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    assert main(["-q", *_train(env, "--num-class-images", "2", reg=None)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("customdiff train: error: class-image cache ")
    assert "set CUSTOMDIFF_CACHE to a folder you can write" in err[0], err
    assert not (tmp_path / "d.safetensors").exists()


def test_another_users_output_in_a_sticky_folder_is_refused_before_work(tmp_path, monkeypatch):
    """In /tmp-like folders only owners may replace their files; the output is replaced by a rename at the end,
    so this is checked first. Root may replace anything, so another user is simulated."""
    from customdiff.errors import UserError
    from customdiff.outputs import check_out
    from customdiff.validate import check_out_file

    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "d.safetensors").write_bytes(b"")
    (sticky / "report").mkdir()
    (sticky / "report" / "results.json").write_text("{}")
    check_out_file("--out", sticky / "d.safetensors", ".safetensors")  # as its owner: fine
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    with pytest.raises(UserError, match="belongs to another user, in a folder where only owners may replace"):
        check_out_file("--out", sticky / "d.safetensors", ".safetensors")
    with pytest.raises(UserError, match="belongs to another user"):
        check_out(sticky / "report", "bench", "results.json")
    check_out_file("--out", sticky / "new.safetensors", ".safetensors")  # a new name is this user's to make


@pytest.mark.parametrize("prompt", ["a <new1> square", "a square"])  # read at the door, and by the pipeline
def test_a_damaged_tokenizer_json_is_one_line(prompt, tmp_path, capsys):
    import shutil

    from customdiff.toy import paths

    base = tmp_path / "base"
    shutil.copytree(paths()["base"], base)
    (base / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    assert main(["-q", "sample", "--base", str(base), "--prompt", prompt, "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(KeyError: 'added_tokens'); re-save the pipeline" in err[0], err
    assert not (tmp_path / "s").exists()


def test_a_photo_name_that_is_not_utf8_trains(tiny_base, concept_dirs, tmp_path):
    """A photo whose name holds a byte that is not UTF-8 is an ordinary photo (its digest hashed the name as
    text, which raised a UnicodeEncodeError traceback)."""
    photos = tmp_path / "photos"
    shutil.copytree(concept_dirs["a"], photos)
    first = next(p for p in sorted(photos.iterdir()) if p.suffix == ".png")
    first.rename(photos / "caf\udce9.png")
    out = tmp_path / "d.safetensors"
    env = Env(tiny_base, str(photos), concept_dirs["reg"], out, tmp_path)
    assert main(["-q", *_train(env, out=str(out))]) == 0 and out.is_file()


def test_sampling_again_into_a_sample_folder_replaces_it_whole(tiny_base, concept_dirs, valid_delta, tmp_path):
    """Four images, then one, into the same folder: one image and its index, no stale 0001-0003.png."""
    env = Env(tiny_base, concept_dirs["a"], concept_dirs["reg"], valid_delta, tmp_path)
    out = tmp_path / "s"
    assert main(["-q", *_sample(env, out=str(out)), "--n", "4"]) == 0
    assert len(list(out.glob("0*.png"))) == 4
    assert main(["-q", *_sample(env, out=str(out))]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "grid.png", "prompts.json"]
