"""Every command that takes --base, on a tiny SDXL folder: `eval` (samples like `sample`, scores with a CLIP),
the web UI's jobs and tasks, refusals of deltas and files of the other family, and the toy-only commands'
one-line refusal of a base."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import make_tiny_clip
from test_import_example import _example_state, _write
from test_sdxl import crafted_delta
from tiny import make_reg_dir

from customdiff.base import load_pipeline
from customdiff.cli import main
from customdiff.delta import Delta, base_fingerprint, save_delta

XL = "StableDiffusionXLPipeline"
PROMPT = "photo of a <new1> cat"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """A tiny random CLIP folder (the toy CLIP's stand-in)."""
    return str(make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


@pytest.fixture(scope="module")
def xl_delta(tiny_xl_base, tmp_path_factory) -> str:
    """A crafted SDXL delta (random K/V changes, rows for both encoders) of <new1>."""
    path = tmp_path_factory.mktemp("xld") / "xl.safetensors"
    save_delta(crafted_delta(tiny_xl_base), path)
    return str(path)


@pytest.fixture(scope="module")
def sd_delta(tiny_base, tmp_path_factory) -> str:
    """A crafted SD delta (one token row) of <new1>."""
    pipe = load_pipeline(tiny_base)
    g = torch.Generator().manual_seed(0)
    params = dict(pipe.unet.named_parameters())
    names = [n for n in params if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    delta = Delta(weights={n: 0.05 * torch.randn(params[n].shape, generator=g) for n in names},
                  tokens={"<new1>": torch.randn(width, generator=g)}, trained="crossattn_kv",
                  base={"name": tiny_base, "fingerprint": base_fingerprint(pipe.unet, names),
                        "pipeline": "StableDiffusionPipeline"},
                  token_info=[{"token": "<new1>", "initializer": "ktn", "class": "cat"}])
    path = tmp_path_factory.mktemp("sdd") / "sd.safetensors"
    save_delta(delta, path)
    return str(path)


def _dataset(root: Path, instance_dir: str) -> Path:
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "cat.txt").write_text("photo of a {}\n{} on grass\n")
    make_reg_dir(root / "real" / "cat", 6, "photo of a cat", seed=21)
    entry = {"instance_prompt": PROMPT, "class_prompt": "cat", "instance_data_dir": instance_dir,
             "class_data_dir": "real/cat", "prompt_filename": "prompts/cat.txt"}
    (root / "dataset.json").write_text(json.dumps([entry]))
    return root / "dataset.json"


def _pixels(folder: Path, n: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"{i:04d}.png")) for i in range(n)]


def _one_line_error(capsys, code: int, *want: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and all(w in last for w in want), err
    return last


# ---------------------------------------------------------------- eval


def test_eval_on_sdxl_samples_like_sample_and_scores(tiny_xl_base, xl_delta, clip, concept_dirs, tmp_path, capsys):
    dataset = _dataset(tmp_path / "ds", concept_dirs["a"])
    out = tmp_path / "eval"
    assert main(["-q", "eval", "--base", tiny_xl_base, "--dataset", str(dataset), "--delta", xl_delta,
                 "--clip", clip, "--out", str(out), "--n", "2", "--steps", "2", "--guidance", "3",
                 "--n-class", "4", "--kid-subsets", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "metrics.json")
    result = json.loads((out / "metrics.json").read_text())
    (entry,) = result["entries"]
    assert (entry["prompts"], entry["images"]) == (2, 4)
    for k in ("text_alignment", "clipscore", "image_alignment", "kid_x1000"):
        assert math.isfinite(entry[k]) and math.isfinite(result["mean"][k]), k
    assert result["settings"]["pipeline"] == XL and result["settings"]["deltas"] == [xl_delta]
    assert f"pipeline: {XL}" in (out / "metrics.md").read_text()

    # the images are those of `customdiff sample` with the same delta, seed, steps and guidance
    shots = tmp_path / "sample"
    assert main(["-q", "sample", "--base", tiny_xl_base, "--delta", xl_delta, "--prompt", PROMPT, "--n", "2",
                 "--steps", "2", "--guidance", "3", "--seed", "0", "--out", str(shots)]) == 0
    index = json.loads((out / "images" / "prompts" / "00_a" / "prompts.json").read_text())
    assert [x["prompt"] for x in index[:2]] == [PROMPT] * 2
    evaluated = _pixels(out / "images" / "prompts" / "00_a", 2)
    for a, b in zip(evaluated, _pixels(shots, 2), strict=True):
        assert np.array_equal(a, b)
    # and the delta was applied: the base alone gives other images
    bare = tmp_path / "bare"
    assert main(["-q", "sample", "--base", tiny_xl_base, "--prompt", "photo of a cat", "--n", "2", "--steps", "2",
                 "--guidance", "3", "--out", str(bare)]) == 0
    assert any(not np.array_equal(a, b) for a, b in zip(evaluated, _pixels(bare, 2), strict=True))


# ---------------------------------------------------------------- the other family, refused in one line


def test_sd_files_on_an_sdxl_base_and_back_are_refused_naming_the_family(tiny_base, tiny_xl_base, sd_delta,
                                                                        xl_delta, clip, concept_dirs, tmp_path,
                                                                        capsys):
    sd_family = "made for a StableDiffusionPipeline base, this base is a StableDiffusionXLPipeline"
    o = str(tmp_path / "o")
    runs = [
        ["sample", "--base", tiny_xl_base, "--delta", sd_delta, "--prompt", "a cat", "--n", "1", "--steps", "1",
         "--out", o],
        ["export", sd_delta, "--to", "diffusers-lora", "--base", tiny_xl_base, "-o", o],
        ["merge", sd_delta, xl_delta, "--base", tiny_xl_base, "-o", o + ".safetensors"],
        ["eval", "--base", tiny_xl_base, "--dataset", str(_dataset(tmp_path / "ds", concept_dirs["a"])),
         "--delta", sd_delta, "--clip", clip, "--out", o, "--device", "cpu"],
    ]
    for args in runs:
        _one_line_error(capsys, main(["-q", *args]), sd_family)
    code = main(["-q", "sample", "--base", tiny_base, "--delta", xl_delta, "--prompt", "a cat", "--n", "1",
                 "--steps", "1", "--out", o])
    _one_line_error(capsys, code, "made for a StableDiffusionXLPipeline base, this base is a StableDiffusionPipeline")
    # diffusers' Custom Diffusion example only trains SD: its files on an SDXL base say so
    state, row = _example_state(tiny_base)
    folder = _write(tmp_path / "example", state, row, ".safetensors", "safetensors")
    code = main(["-q", "import", str(folder), "--base", tiny_xl_base, "-o", o + ".safetensors"])
    _one_line_error(capsys, code, "this base is SDXL", "SD 1.x/2.x only")
    assert not list(tmp_path.glob("o*"))


@pytest.mark.parametrize("command,args,want", [
    ("demo", [], "embedded toy world only"),
    ("bench", ["--quick"], "embedded toy world only"),
    ("retrieve", ["--corpus", "CORPUS", "--class-prompt", "photo of a cat", "-n", "2"], "takes no base"),
])
def test_toy_only_commands_refuse_a_base_in_one_line(tiny_xl_base, concept_dirs, tmp_path, capsys, command, args,
                                                     want):
    out = tmp_path / "out"
    args = [a.replace("CORPUS", concept_dirs["reg"]) for a in args]
    code = main(["-q", command, *args, "--base", tiny_xl_base, "--out", str(out)])
    line = _one_line_error(capsys, code, f"customdiff {command}: error: --base {tiny_xl_base}: ", want)
    assert "SDXL" in line and not out.exists()


# ---------------------------------------------------------------- the web UI


def test_ui_on_an_sdxl_base_trains_samples_merges_compresses_exports(tiny_xl_base, concept_dirs, sd_delta,
                                                                     tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from ui_server import UIServer

    other = tmp_path / "other.safetensors"
    save_delta(crafted_delta(tiny_xl_base, seed=3, token="<new2>"), other)
    server = UIServer(tmp_path / "work", tmp_path / "server.log", base=tiny_xl_base).start()
    try:
        info = server.get("/api/info")
        assert info["pipeline"] == XL and not info["toy"] and info["resolution"] == 32

        # a training job with class images generated by the SDXL base, and previews on the way
        photos = [("photos", p.name, p.read_bytes()) for p in sorted(Path(concept_dirs["a"]).glob("*.png"))]
        form = {"class_word": "cat", "steps": 3, "batch_size": 2, "learning_rate": 1e-3, "reg": "generated",
                "num_class_images": 2, "preview_every": 2, "preview_steps": 2, "checkpoint_every": 0, "name": "xl"}
        status, r = server.post_form("/api/jobs", form, photos)
        assert status == 200, r
        job = server.wait_job(r["id"], lambda j: j["state"] == "done")
        assert job["delta"] == "xl.safetensors" and [p["step"] for p in job["previews"]] == [2, 3]
        (lib,) = server.get("/api/deltas")["deltas"]
        assert lib["tokens"] == [{"token": "<new1>", "class": "cat"}] and lib["steps"] == 3
        status, r = server.post_form("/api/jobs", {**form, "token": "<|endoftext|>"}, photos)
        assert status == 400 and "already in the vocabulary" in r["error"]

        # the library takes SDXL deltas and refuses SD ones
        status, r = server.post_form("/api/deltas", {}, [("file", "other.safetensors", other.read_bytes())])
        assert status == 200, r
        status, r = server.post_form("/api/deltas", {}, [("file", "sd.safetensors", Path(sd_delta).read_bytes())])
        assert status == 400 and "StableDiffusionPipeline base" in r["error"] and str(tmp_path) not in r["error"]

        # sampling in the page gives `customdiff sample`'s images
        shots = server.run_task("/api/sample", {"deltas": ["xl.safetensors"], "prompts": [PROMPT], "n": 2, "seed": 1,
                                     "steps": 2, "guidance": 3})
        cli = tmp_path / "cli"
        assert main(["-q", "sample", "--base", tiny_xl_base, "--delta", str(tmp_path / "work" / "deltas" /
                     "xl.safetensors"), "--prompt", PROMPT, "--n", "2", "--seed", "1", "--steps", "2",
                     "--guidance", "3", "--out", str(cli)]) == 0
        for a, b in zip(_pixels(tmp_path / "work" / "samples" / shots["folder"], 2), _pixels(cli, 2), strict=True):
            assert np.array_equal(a, b)

        merged = server.run_task("/api/deltas/merge", {"deltas": ["xl.safetensors", "other.safetensors"], "name": "both"})
        assert sorted(merged["tokens"]) == ["<new1>", "<new2>"] and merged["worst"] < 1e-6
        small = server.run_task("/api/deltas/both.safetensors/compress", {"rank": 2})
        assert small["after"] < small["before"]
        lora = server.run_task("/api/deltas/both.safetensors/export", {})
        status, body = server.request("GET", f"/api/exports/{lora['zip']}")
        names = {Path(n).name for n in zipfile.ZipFile(io.BytesIO(body)).namelist()}
        assert status == 200 and {"pytorch_lora_weights.safetensors", "new1_2.safetensors",
                                  "new2_2.safetensors"} <= names  # the text_encoder_2 rows travel too
        server.run_task("/api/sample", {"deltas": [small["delta"]], "prompts": ["a <new2> cat"], "n": 1, "steps": 1})
    finally:
        assert server.stop() == 0, (tmp_path / "server.log").read_text()
