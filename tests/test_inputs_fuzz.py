"""Image modes decode to the right RGB, and property-based fuzzing of the delta, concepts and dataset readers:
whatever the bytes, a reader returns a value or raises UserError (never another exception)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from customdiff.data import read_concepts_file
from customdiff.delta import load_delta
from customdiff.errors import UserError
from customdiff.evaluate import read_dataset
from customdiff.images import open_image

GREY = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # a ramp 0..252


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(open_image(path)).astype(np.float64)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "I;16", "I", "F", "P", "CMYK", "RGBA", "RGB", "YCbCr"])
def test_every_mode_keeps_the_picture(mode, tmp_path):
    """A grey ramp saved in each mode comes back as the same ramp (16-bit grey is not white)."""
    if mode == "1":
        im, want = Image.fromarray(GREY).convert("1", dither=Image.Dither.NONE), np.where(GREY >= 128, 255, 0)
    elif mode == "I;16":
        im, want = Image.fromarray(GREY.astype(np.uint16) * 257), GREY
    elif mode == "I":
        im, want = Image.fromarray(GREY.astype(np.int32) * 257), GREY
    elif mode == "F":
        im, want = Image.fromarray(GREY.astype(np.float32) / 255.0), GREY
    else:
        im, want = Image.fromarray(GREY).convert(mode), GREY
    ext = {"CMYK": "jpg", "I": "tif", "F": "tif", "YCbCr": "jpg"}.get(mode, "png")
    path = tmp_path / f"x.{ext}"
    if ext == "jpg":
        im.save(path, quality=100)
    else:
        im.save(path)
    got = _rgb(path)
    assert got.shape == (64, 64, 3)
    tol = 4.0 if ext == "jpg" else 1.0
    assert np.abs(got - np.asarray(want, dtype=np.float64)[..., None]).mean() < tol, (mode, got.mean())


def test_sixteen_bit_png_is_not_white(tmp_path):
    Image.fromarray(np.full((8, 8), 20000, dtype=np.uint16)).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    assert abs(_rgb(tmp_path / "g.png").mean() - 20000 / 257) < 1


@pytest.mark.parametrize("mode", ["PA", "La", "RGBa"])
def test_in_memory_alpha_modes(mode):
    """Modes no file format stores but PIL can hand over: transparency still becomes white."""
    from customdiff.images import to_rgb

    base = {"PA": Image.new("PA", (4, 4)), "La": Image.new("LA", (4, 4), (0, 0)),
            "RGBa": Image.new("RGBA", (4, 4), (0, 0, 0, 0))}[mode]
    im = base if mode == "PA" else base.convert(mode)
    assert (np.asarray(to_rgb(im, Path("mem"))) == 255).all()


@pytest.mark.parametrize("kind", ["P-transparency", "L-transparency", "RGB-transparency", "LA", "RGBA"])
def test_transparent_pixels_become_white(kind, tmp_path):
    arr = np.zeros((4, 4), dtype=np.uint8)
    if kind == "P-transparency":
        im = Image.fromarray(arr, "L").convert("P")
        im.info["transparency"] = 0
    elif kind == "L-transparency":
        im = Image.fromarray(arr, "L")
        im.info["transparency"] = 0
    elif kind == "RGB-transparency":
        im = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
        im.info["transparency"] = (0, 0, 0)
    else:
        im = Image.new(kind, (4, 4))  # fully transparent black
    kw = {"transparency": im.info["transparency"]} if "transparency" in im.info else {}
    im.save(tmp_path / "t.png", **kw)
    assert (_rgb(tmp_path / "t.png") == 255).all(), kind


def test_float_image_with_nan_is_refused(tmp_path):
    a = np.zeros((4, 4), np.float32)
    a[1, 1] = np.nan
    Image.fromarray(a).save(tmp_path / "n.tif")
    with pytest.raises(UserError, match="NaN"):
        open_image(tmp_path / "n.tif")


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (8, 4), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90
    im.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (4, 8)


# ---------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir",
                         "prompt_filename", "prompt_filename_compose", "initializer_token", "x"]) | st.text(max_size=5),
        inner, max_size=5),
    max_leaves=12)

concept_like = st.fixed_dictionaries(
    {"instance_prompt": st.sampled_from(["a <new1> cat", "a <new2> dog", "cat", ""]) | json_values,
     "class_prompt": st.sampled_from(["photo of a cat", "caps.txt", ""]) | json_values,
     "instance_data_dir": st.sampled_from(["imgs", "none", ""]) | json_values},
    optional={"class_data_dir": st.sampled_from(["imgs", None, "list.txt"]) | json_values,
              "prompt_filename": st.sampled_from(["prompts.txt", "missing.txt", ""]) | json_values})

documents = (st.lists(concept_like | st.lists(concept_like, max_size=3), max_size=3).map(json.dumps)
             | json_values.map(json.dumps)
             | st.text(max_size=40)
             | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _workspace(root: Path) -> None:
    (root / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "imgs" / "a.png")
    (root / "prompts.txt").write_text("a {} on grass\n")
    (root / "caps.txt").write_text("a cat\n")
    (root / "list.txt").write_text("imgs/a.png\n")


@FUZZ
@given(doc=documents)
def test_fuzz_concepts_reader(doc, tmp_path):
    _workspace(tmp_path)
    f = tmp_path / "c.json"
    f.write_bytes(doc.encode("utf-8", "replace"))
    try:
        specs = read_concepts_file(f)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert specs and all(isinstance(s.instance_prompt, str) for s in specs)


@FUZZ
@given(doc=documents)
def test_fuzz_dataset_reader(doc, tmp_path):
    _workspace(tmp_path)
    f = tmp_path / "dataset.json"
    f.write_bytes(doc.encode("utf-8", "replace"))
    try:
        entries = read_dataset(f)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert entries and all(isinstance(p, str) for e in entries for p in e.prompts)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_raw_bytes_as_delta(data, tmp_path):
    f = tmp_path / "d.safetensors"
    f.write_bytes(data)
    with pytest.raises(UserError):
        load_delta(f)


keys = st.sampled_from(["unet.a.weight", "unet.a.weight.up", "unet.a.weight.down", "unet.b.bias",
                        "tokens.<new1>", "tokens.", "other", "unet."])
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3)
values = st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf")])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])
meta_values = st.sampled_from(["", "1", "2", "full", "lowrank", "crossattn_kv", "[]", "{}", "[{", "null", "3",
                               '[{"token": "<new1>"}]', '[{"token": 5}]', '{"fingerprint": {"norms": {"a": "x"}}}',
                               '{"fingerprint": []}', "customdiff.delta"])
metas = st.fixed_dictionaries({"format": st.sampled_from(["customdiff.delta", "other"]),
                               "format_version": st.sampled_from(["1", "2"])},
                              optional={k: meta_values for k in ("storage", "trained", "base", "tokens", "config")})


@FUZZ
@given(tensors=st.dictionaries(keys, st.tuples(shapes, values, dtypes), max_size=5), meta=metas)
def test_fuzz_delta_reader(tensors, meta, tmp_path):
    f = tmp_path / "d.safetensors"
    built = {}
    for k, (shape, v, dtype) in tensors.items():
        t = torch.full(shape, v) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        built[k] = t.to(dtype)
    save_file(built, str(f), metadata=meta)
    try:
        d = load_delta(f)
    except UserError as e:
        assert "\n" not in str(e)
        return
    # what loads is usable: every change computes and every value is finite
    for name in d.param_names():
        assert torch.isfinite(d.change(name)).all()
    assert all(torch.isfinite(r).all() for r in d.tokens.values())
