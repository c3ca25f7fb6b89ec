"""CLIP features, the dataset reader, and `customdiff eval` end to end on a tiny pipeline and a tiny CLIP."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_images, make_reg_dir, write_tokenizer_files

from customdiff.config import EvalConfig
from customdiff.dataset import fill_prompt, read_dataset, strip_tokens
from customdiff.errors import UserError
from customdiff.features import ClipFeatures

CLIP_WORDS = ["photo", "of", "a", "the", "cat", "dog", "red", "blue", "on", "grass", "and", "at", "night"]


def make_tiny_clip(path: Path, seed: int = 0, image_size: int = 32, processor: bool = True) -> Path:
    """Save a random tiny CLIPModel with a local BPE tokenizer (and an image processor config) to `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tokenizer_files(path, CLIP_WORDS)
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    if processor:
        ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                "width": image_size})
        CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    else:
        tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on these shared 2-core machines tiny models run 10x faster than with 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIP folder in transformers format."""
    return str(make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


@pytest.fixture
def main() -> Callable[[list[str]], int]:
    """`customdiff.cli.main`."""
    import customdiff.cli as cli

    return cli.main


def _image(seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def test_clip_features_normalised_batched(tiny_clip):
    clip = ClipFeatures(tiny_clip, batch_size=2)
    images = [_image(i) for i in range(5)]
    f = clip.image_features(images)
    assert f.shape == (5, 16) and f.dtype == torch.float32
    assert torch.allclose(f.norm(dim=-1), torch.ones(5), atol=1e-5)
    one_batch = ClipFeatures(tiny_clip, batch_size=64)
    assert torch.allclose(f, one_batch.image_features(images), atol=1e-5)  # batching does not change results
    t = clip.text_features(["photo of a cat", "a dog on grass at night", "a red cat and a blue dog on grass"])
    assert t.shape == (3, 16) and torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t[1], one_batch.text_features(["a dog on grass at night"])[0], atol=1e-5)  # padding
    assert clip.image_features([]).shape == (0, 16)
    # the same as transformers' own CLIPModel path (features before normalisation)
    with torch.no_grad():
        ref = clip.model(**clip.tokenizer(["photo of a cat"], return_tensors="pt"),
                         pixel_values=clip.processor(images=images[:1], return_tensors="pt")["pixel_values"])
    assert torch.allclose(t[0], ref.text_embeds[0] / ref.text_embeds[0].norm(), atol=1e-5)
    assert torch.allclose(f[0], ref.image_embeds[0] / ref.image_embeds[0].norm(), atol=1e-5)
    assert clip.fingerprint() == one_batch.fingerprint()


def test_clip_without_processor_config_and_bad_paths(tmp_path, tiny_clip):
    bare = make_tiny_clip(tmp_path / "bare", processor=False)
    clip = ClipFeatures(bare)
    assert clip.image_features([_image(0)]).shape == (1, 16)
    assert clip.fingerprint() != ClipFeatures(tiny_clip).fingerprint()  # different random weights
    with pytest.raises(UserError, match="no such folder"):
        ClipFeatures(tmp_path / "missing" / "clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        ClipFeatures(tmp_path / "empty")


def test_prompt_helpers():
    assert strip_tokens("photo of a <new1> cat on grass") == "photo of a cat on grass"
    assert strip_tokens("<new1> cat and <new2> dog.") == "cat and dog."
    assert fill_prompt("photo of a {}", ["<new1> cat"]) == "photo of a <new1> cat"
    assert fill_prompt("the {1} and {0}", ["<new1> cat", "<new2> dog"]) == "the <new2> dog and <new1> cat"


def _dataset(root: Path, concept_dirs: dict[str, str]) -> Path:
    """A tiny dataset.json: one single-concept entry (reference-style prompt) and one two-concept entry."""
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "cat.txt").write_text("photo of a {}\n{} on grass\n")
    (root / "prompts" / "pair.txt").write_text("photo of the {0} and {1}\n")
    make_reg_dir(root / "real" / "cat", 12, "photo of a cat", seed=21)
    make_images(root / "real" / "dog", 10, (40, 40, 230), seed=22)
    cat = {"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat", "instance_data_dir": concept_dirs["a"],
           "class_data_dir": "real/cat", "prompt_filename": "prompts/cat.txt"}
    dog = {"instance_prompt": "<new2> dog", "class_prompt": "dog", "instance_data_dir": concept_dirs["b"],
           "class_data_dir": "real/dog", "prompt_filename": "prompts/cat.txt"}
    path = root / "dataset.json"
    path.write_text(json.dumps([cat, [cat, dog, {"prompt_filename_compose": "prompts/pair.txt"}]]))
    return path


def test_a_prompt_line_without_a_placeholder_is_named(tmp_path, concept_dirs, monkeypatch):
    """A prompt-file line without {} is sampled without the concept: said once per entry, with an example."""
    import customdiff.dataset
    from customdiff.dataset import warn_conceptless

    path = _dataset(tmp_path, concept_dirs)
    said: list[str] = []
    monkeypatch.setattr(customdiff.dataset, "warn", said.append)
    warn_conceptless(read_dataset(path))
    assert said == []
    (tmp_path / "prompts" / "cat.txt").write_text("photo of a {}\na red thing\n")
    warn_conceptless(read_dataset(path))
    assert len(said) == 1 and "entry 00_a: 1 of its 2 prompts name no concept" in said[0] and "'a red thing'" in said[0]


def test_read_dataset(tmp_path, concept_dirs):
    path = _dataset(tmp_path, concept_dirs)
    entries = read_dataset(path)
    assert [e.name for e in entries] == ["00_a", "01_a+b"]
    assert entries[0].prompts == ["photo of a <new1> cat", "<new1> cat on grass"]
    assert entries[1].prompts == ["photo of the <new1> cat and <new2> dog"]
    assert entries[1].concepts[1].class_dir == tmp_path / "real" / "dog"
    assert [e.name for e in read_dataset(path, ["1"])] == ["01_a+b"]
    assert [e.name for e in read_dataset(path, ["a"])] == ["00_a"]
    with pytest.raises(UserError, match="no such entry"):
        read_dataset(path, ["zebra"])
    (tmp_path / "bad.json").write_text(json.dumps([{"instance_prompt": "<new1> cat"}]))
    with pytest.raises(UserError, match="lacks"):
        read_dataset(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def two_token_delta(tiny_base, concept_dirs, tmp_path_factory) -> str:
    """A jointly trained delta with <new1> (cat) and <new2> (dog), 2 steps."""
    from customdiff.config import TrainConfig
    from customdiff.data import ConceptSpec
    from customdiff.train import train

    out = tmp_path_factory.mktemp("delta") / "d.safetensors"
    specs = [ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"]),
             ConceptSpec(concept_dirs["b"], "photo of a <new2> dog", "photo of a dog", reg_dir=concept_dirs["reg"])]
    return str(train(TrainConfig(base=tiny_base, out=str(out), steps=2, batch_size=4, learning_rate=1e-3), specs,
                     progress=False))


def test_eval_end_to_end(tiny_base, tiny_clip, concept_dirs, two_token_delta, tmp_path, capsys, main):
    dataset = _dataset(tmp_path / "ds", concept_dirs)
    out = tmp_path / "eval"
    args = ["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--delta", two_token_delta,
            "--clip", tiny_clip, "--out", str(out), "--n", "2", "--steps", "2", "--n-class", "6",
            "--kid-subsets", "10", "--device", "cpu", "--class-template", "photo of a {}"]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert set(result) == {"entries", "mean", "settings"}
    assert set(result["mean"]) == {"text_alignment", "clipscore", "image_alignment", "kid_x1000"}
    single, pair = result["entries"]
    assert (single["prompts"], single["images"], pair["images"]) == (2, 4, 2)
    assert set(pair["image_alignment_per_concept"]) == {"<new1> cat", "<new2> dog"}
    assert {k["class_prompt"] for k in pair["kid_per_concept"].values()} == {"photo of a cat", "photo of a dog"}
    for r in result["entries"]:
        for k in ("text_alignment", "clipscore", "image_alignment", "kid_x1000", "kid_x1000_std"):
            assert math.isfinite(r[k]), (r["name"], k)
        assert -1 <= r["text_alignment"] <= 1 and 0 <= r["clipscore"] <= 2.5 and -1 <= r["image_alignment"] <= 1
    assert single["kid_x1000"] == pair["kid_per_concept"]["<new1> cat"]["kid_x1000"]  # same class images
    assert "| 00_a | 2 | 4 |" in (out / "metrics.md").read_text()
    index = json.loads((out / "images" / "prompts" / "00_a" / "prompts.json").read_text())
    assert [x["prompt"] for x in index] == ["photo of a <new1> cat"] * 2 + ["<new1> cat on grass"] * 2
    assert len(list((out / "images" / "class" / "photo_of_a_dog").glob("0*.png"))) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert capsys.readouterr().out.strip() == str(out / "metrics.json")

    # scoring the written images again (no sampling) gives the same numbers; the class images are found under
    # the template that made them, which this command need not repeat
    again = tmp_path / "again"
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--clip", tiny_clip,
                 "--images", str(out / "images"), "--out", str(again), "--kid-subsets", "10",
                 "--device", "cpu"]) == 0
    rescored = json.loads((again / "metrics.json").read_text())
    for r0, r1 in zip(result["entries"], rescored["entries"], strict=True):
        for k in ("text_alignment", "image_alignment", "kid_x1000"):
            assert r1[k] == pytest.approx(r0[k], abs=1e-4), k  # PNG round trip of the same pixels
    assert not (again / "images").exists()
    made, scored = result["settings"], rescored["settings"]  # the images' making, not the rescoring's flags
    assert {k: scored[k] for k in ("n", "n_class", "steps", "deltas")} == {k: made[k] for k in ("n", "n_class",
                                                                                                "steps", "deltas")}
    assert scored["n"] != EvalConfig().n and scored["deltas"] and scored["kid_subsets"] == 10
    assert scored["class_template"] == "photo of a {}"
    capsys.readouterr()
    # another template given explicitly names folders that are not there: the images' own is used, with a warning
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--clip", tiny_clip,
                 "--images", str(out / "images"), "--out", str(tmp_path / "third"), "--kid-subsets", "10",
                 "--device", "cpu", "--class-template", "a {}"]) == 0
    assert "--class-template 'a {}' ignored" in capsys.readouterr().err
    third = json.loads((tmp_path / "third" / "metrics.json").read_text())
    assert [r["kid_x1000"] for r in third["entries"]] == [r["kid_x1000"] for r in rescored["entries"]]


def test_eval_library_matches_direct_metrics(tiny_base, tiny_clip, concept_dirs, two_token_delta, tmp_path):
    """evaluate() on one entry equals the metrics computed by hand from the images it wrote."""
    from customdiff.base import load_pipeline
    from customdiff.data import list_images, load_image
    from customdiff.delta import apply_deltas, load_delta
    from customdiff.evaluate import evaluate
    from customdiff.metrics import image_alignment, text_alignment
    from customdiff.sample import generate

    entries = read_dataset(_dataset(tmp_path / "ds", concept_dirs), ["0"])
    pipe = load_pipeline(tiny_base)
    handle = apply_deltas(pipe, [load_delta(two_token_delta)])
    clip = ClipFeatures(tiny_clip)
    res = evaluate(pipe, entries, clip, n=1, steps=2, n_class=4, kid_subsets=5, images_out=tmp_path / "img")
    folder = tmp_path / "img" / "prompts" / "00_a"
    index = json.loads((folder / "prompts.json").read_text())
    # the images are `customdiff sample`'s for the same seed, steps and guidance
    same = generate(pipe, "photo of a <new1> cat", n=1, seed=0, steps=2, guidance=6.0)[0]
    assert np.array_equal(np.asarray(same), np.asarray(load_image(folder / index[0]["file"])))
    handle.remove()
    feats = clip.image_features([load_image(folder / x["file"]) for x in index])
    ta = text_alignment(feats, clip.text_features(["photo of a cat", "cat on grass"]))
    target = clip.image_features([load_image(p) for p in list_images(Path(concept_dirs["a"]))])
    r = res["entries"][0]
    assert r["text_alignment"] == pytest.approx(ta["cosine"], abs=1e-4)
    assert r["image_alignment"] == pytest.approx(image_alignment(feats, target), abs=1e-4)


def test_eval_bad_input(tiny_base, tiny_clip, concept_dirs, tmp_path, capsys, main, monkeypatch):
    import customdiff.base

    dataset = _dataset(tmp_path / "ds", concept_dirs)
    out = tmp_path / "eval"
    # no delta defines <new1>: a one-line error, exit code 2, nothing written, refused before the base loads
    monkeypatch.setattr(customdiff.base, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    code = main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--clip", tiny_clip,
                 "--out", str(out), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "<new1>" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(tmp_path / "nope.json"), "--clip", tiny_clip,
                 "--out", str(out), "--device", "cpu"]) == 2
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--out", str(out),
                 "--device", "cpu"]) == 2  # --clip needed for a non-toy base
    assert "--clip" in capsys.readouterr().err


def test_class_image_layouts(tmp_path):
    from customdiff.dataset import class_images

    flat = make_reg_dir(tmp_path / "flat", 5, "photo of a cat")  # images with caption sidecars
    assert [p.name for p in class_images(flat, 3)] == ["img0.png", "img1.png", "img2.png"]
    ref = tmp_path / "ref"  # the reference's retrieval layout: images/ plus images.txt, caption.txt, urls.txt
    make_images(ref / "images", 4, (1, 2, 3))
    for name in ("images.txt", "caption.txt", "urls.txt"):
        (ref / name).write_text("/elsewhere/0.jpg\n")
    assert [p.parent.name for p in class_images(ref, 10)] == ["images"] * 4
    listed = tmp_path / "listed"  # only a listing of paths relative to the folder
    make_images(listed / "pics", 3, (1, 2, 3))
    (listed / "images.txt").write_text("pics/img2.png\npics/img0.png\n")
    assert class_images(listed, 10) == [listed / "pics" / "img2.png", listed / "pics" / "img0.png"]


def test_images_of_another_kind_are_refused_before_clip_loads(tiny_base, tiny_clip, concept_dirs, tmp_path, main,
                                                             capsys, monkeypatch):
    """--images given a folder of photos (not an earlier eval's images/): named at the door, as the folder it
    lacks, before CLIP loads (it failed after loading CLIP, with the progress bar under way)."""
    dataset = _dataset(tmp_path / "ds", concept_dirs)

    def no_clip(*a, **k):
        raise AssertionError("CLIP loaded before --images was checked")

    monkeypatch.setattr("customdiff.evaluate.ClipFeatures", no_clip)
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--clip", tiny_clip,
                 "--out", str(tmp_path / "o"), "--images", concept_dirs["a"], "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--images {concept_dirs['a']}: it has no prompts/" in err and "prompts.json" in err
    assert not (tmp_path / "o").exists()


def test_eval_refuses_foreign_out(tiny_base, tiny_clip, concept_dirs, tmp_path, main, capsys):
    dataset = _dataset(tmp_path / "ds", concept_dirs)
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "images" / "holiday.png").write_bytes(b"x")
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--clip", tiny_clip, "--out", str(out),
                 "--strip-tokens", "--device", "cpu"]) == 2
    assert "not from `customdiff eval`" in capsys.readouterr().err
    assert (out / "images" / "holiday.png").read_bytes() == b"x"
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--clip", tiny_clip,
                 "--out", str(tmp_path / "o"), "--images", str(tmp_path / "none"), "--device", "cpu"]) == 2
    (tmp_path / "ds" / "real" / "dog").rename(tmp_path / "ds" / "real" / "gone")
    assert main(["-q", "eval", "--base", tiny_base, "--dataset", str(dataset), "--clip", tiny_clip,
                 "--out", str(tmp_path / "o"), "--strip-tokens", "--device", "cpu"]) == 2
    assert "class_data_dir" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_an_unreadable_class_folder_is_refused_before_sampling(concept_dirs, tmp_path, monkeypatch):
    """Before, every prompt was sampled first, and the message then named a path that does not exist."""
    import os

    from customdiff.dataset import check_folders, read_dataset

    entries = read_dataset(_dataset(tmp_path / "ds", concept_dirs))
    real = os.access
    locked = entries[0].concepts[0].class_dir
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    with pytest.raises(UserError, match="class_data_dir .*: permission denied: this user may not read it"):
        check_folders(entries, 200)


def test_an_unreadable_or_missing_class_image_is_refused_before_sampling(concept_dirs, tmp_path, monkeypatch):
    """Before, such an image was found while scoring, after every prompt was sampled."""
    import builtins

    import customdiff.validate
    from customdiff.dataset import check_folders, class_images, read_dataset

    entries = read_dataset(_dataset(tmp_path / "ds", concept_dirs))
    folder = entries[0].concepts[0].class_dir
    real = class_images(folder, 200)
    assert len(real) > 2
    last = real[-1]

    def guarded_open(file, *args, **kwargs):  # root reads every file: the OS's refusal is simulated
        if Path(file) == last:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(customdiff.validate, "open", guarded_open, raising=False)
    with pytest.raises(UserError, match=f"class_data_dir {last}: permission denied"):
        check_folders(entries, 200)
    check_folders(entries, 2)  # only the first max_real images are read
    monkeypatch.undo()
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "images.txt").write_text(f"{real[0]}\n{real[1]}\n{folder / 'gone.png'}\n")
    entries[0].concepts[0].class_dir = listed
    with pytest.raises(UserError, match="gone.png: no such image .a broken link, or a line of .*images.txt"):
        check_folders(entries, 200)
    check_folders(entries, 2)
