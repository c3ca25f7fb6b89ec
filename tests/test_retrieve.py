"""Retrieval of regularization images: ranking, output layout, the incremental embedding cache, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import test_eval as shared
import torch
from PIL import Image

from customdiff.data import ConceptSpec, load_image, read_reg_source
from customdiff.errors import UserError
from customdiff.features import ClipFeatures
from customdiff.retrieve import INDEX_FILE, MARKER, build_index, retrieve, scan_corpus, top_k

PROMPT = "photo of a red cat"
make_tiny_clip = shared.make_tiny_clip
tiny_clip, main, _one_thread = shared.tiny_clip, shared.main, shared._one_thread  # fixtures shared with test_eval


def _corpus(folder: Path, n: int = 20) -> Path:
    """A captioned corpus: the toy world's when it is there, else random images with captions."""
    try:
        from customdiff.toy.corpus import write_corpus
    except ImportError:
        write_corpus = None
    if write_corpus is not None:
        return write_corpus(folder, n, seed=3)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"photo of a {['red', 'blue'][i % 2]} cat\n")
    return folder


class _Counting(ClipFeatures):
    """ClipFeatures that counts the images it embeds."""

    embedded = 0

    def image_features(self, images):
        type(self).embedded += len(images)
        return super().image_features(images)


def test_ranking_and_layout(tmp_path, tiny_clip):
    corpus = _corpus(tmp_path / "corpus")
    Image.new("RGB", (32, 32), "red").save(corpus / "uncaptioned.png")  # skipped: no caption
    clip = ClipFeatures(tiny_clip)
    out = tmp_path / "reg"
    items = retrieve(corpus, PROMPT, 5, out, clip)

    # similarities computed independently of the index
    names = sorted(p.name for p in corpus.glob("*.png") if p.with_suffix(".txt").exists())
    feats = clip.image_features([load_image(corpus / n) for n in names])
    scores = feats @ clip.text_features([PROMPT])[0]
    best = [names[i] for i in torch.argsort(scores, descending=True)[:5].tolist()]
    assert items[0]["source"] == names[int(scores.argmax())]
    assert [x["source"] for x in items] == best
    assert [x["score"] for x in items] == pytest.approx(sorted(scores.tolist(), reverse=True)[:5], abs=1e-5)

    files = sorted(p.name for p in out.iterdir())
    assert files == [MARKER] + [f"{i:06d}.{e}" for i in range(5) for e in ("png", "txt")]
    for x in items:
        assert (out / x["file"]).read_bytes() == (corpus / x["source"]).read_bytes()
        caption = (corpus / x["source"]).with_suffix(".txt").read_text().strip()
        assert (out / x["file"]).with_suffix(".txt").read_text() == caption + "\n"
    # the trainer reads the folder as regularization images with their own captions
    pairs = read_reg_source(ConceptSpec(str(corpus), "<new1> cat", "cat", reg_dir=str(out)))
    assert [c for _, c in pairs] == [x["caption"] for x in items]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_index_is_cached_and_incremental(tmp_path, tiny_clip):
    corpus = _corpus(tmp_path / "corpus", 12)
    clip = _Counting(tiny_clip)
    _Counting.embedded = 0
    names, feats = build_index(corpus, clip)
    assert len(names) == 12 and _Counting.embedded == 12 and (corpus / INDEX_FILE).is_file()
    names2, feats2 = build_index(corpus, clip)
    assert _Counting.embedded == 12 and names2 == names and torch.equal(feats2, feats)  # all from the cache

    # one changed, one new, one deleted: only two embedded again
    Image.new("RGB", (32, 32), "blue").save(corpus / "000001.png")
    os.utime(corpus / "000001.png", ns=(1, 1))  # another mtime even on coarse file-system clocks
    Image.new("RGB", (32, 32), "green").save(corpus / "extra.png")
    (corpus / "extra.txt").write_text("a green square\n")
    (corpus / "000002.png").unlink()
    names3, feats3 = build_index(corpus, clip)
    assert _Counting.embedded == 14
    assert names3 == [n for n, _, _ in scan_corpus(corpus)] and "000002.png" not in names3
    fresh = ClipFeatures(tiny_clip).image_features([load_image(corpus / n) for n in names3])
    assert torch.allclose(feats3, fresh, atol=1e-5)  # cached rows belong to the right files

    # another CLIP (different weights) does not reuse the index
    other = _Counting(make_tiny_clip(tmp_path / "other_clip", seed=1))
    _Counting.embedded = 0
    build_index(corpus, other)
    assert _Counting.embedded == 12


def test_top_k_is_exact():
    """Whichever backend is active (faiss when installed, else torch), top_k equals a full sort."""
    feats = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    q = feats[7] + 0.1
    s, i = top_k(feats, q, 4)
    assert i.tolist() == torch.argsort(feats @ q, descending=True)[:4].tolist()
    assert i[0] == 7 and s.tolist() == pytest.approx(sorted((feats @ q).tolist(), reverse=True)[:4], abs=1e-6)


def test_outputs_replaced_only_when_ours(tmp_path, tiny_clip):
    corpus = _corpus(tmp_path / "corpus", 8)
    clip = ClipFeatures(tiny_clip)
    out = tmp_path / "reg"
    retrieve(corpus, PROMPT, 6, out, clip)
    retrieve(corpus, PROMPT, 3, out, clip)  # an earlier retrieval is replaced, not merged
    assert len(list(out.glob("*.png"))) == 3
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not from `customdiff retrieve`"):
        retrieve(corpus, PROMPT, 3, mine, clip)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="only 8 captioned images"):
        retrieve(corpus, PROMPT, 9, tmp_path / "too_many", clip)
    with pytest.raises(UserError, match="inside the corpus"):
        retrieve(corpus, PROMPT, 2, corpus / "reg", clip)
    assert not (tmp_path / "too_many").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_jpeg_corpus_converted_to_png(tmp_path, tiny_clip):
    corpus = tmp_path / "jpg" / "shard0"
    corpus.mkdir(parents=True)
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (40, 30), colour).save(corpus / f"{i}.jpg")
        (corpus / f"{i}.txt").write_text(f"a {colour} thing")
    items = retrieve(tmp_path / "jpg", PROMPT, 2, tmp_path / "reg", ClipFeatures(tiny_clip))
    assert all(x["source"].startswith("shard0/") for x in items)  # searched recursively
    with Image.open(tmp_path / "reg" / "000000.png") as im:
        assert im.format == "PNG" and im.size == (40, 30)


def test_cli(tmp_path, tiny_clip, main, capsys):
    corpus = _corpus(tmp_path / "corpus", 10)
    out = tmp_path / "reg"
    assert main(["-q", "retrieve", "--corpus", str(corpus), "--class-prompt", PROMPT, "-n", "4", "--out", str(out),
                 "--clip", tiny_clip, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / MARKER).read_text())
    assert meta["class_prompt"] == PROMPT and len(meta["items"]) == 4
    assert main(["-q", "retrieve", "--corpus", str(tmp_path / "nope"), "--class-prompt", PROMPT, "-n", "4",
                 "--out", str(tmp_path / "x"), "--clip", tiny_clip]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and len(err.strip().splitlines()) == 1


def test_a_read_only_index_is_left_as_it_is(tmp_path, tiny_clip, monkeypatch):
    """A rename would replace a read-only index all the same; it is a cache, so the run goes on without
    updating it. Root may write anything, so the refusal is simulated."""
    import customdiff.retrieve

    corpus = _corpus(tmp_path / "corpus", 6)
    build_index(corpus, ClipFeatures(tiny_clip))
    index = corpus / INDEX_FILE
    before = index.read_bytes()
    Image.new("RGB", (32, 32), "green").save(corpus / "extra.png")
    (corpus / "extra.txt").write_text("a green square\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not (Path(p) == index and mode & os.W_OK) and real(p, mode))
    said: list[str] = []
    monkeypatch.setattr(customdiff.retrieve, "warn", said.append)
    names, _ = build_index(corpus, ClipFeatures(tiny_clip))
    assert "extra.png" in names and index.read_bytes() == before
    assert said and "(the file is read-only); embeddings will be recomputed next time" in said[-1], said


def test_a_broken_link_in_the_corpus_is_left_out_with_a_warning(tmp_path, tiny_clip, monkeypatch):
    """A captioned image whose link points nowhere is skipped and named once, and the rest is still retrieved."""
    import customdiff.retrieve

    corpus = _corpus(tmp_path / "corpus", 6)
    (corpus / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (corpus / "gone.txt").write_text("a cat that is not there\n")
    said: list[str] = []
    monkeypatch.setattr(customdiff.retrieve, "warn", said.append)
    names = [n for n, _, _ in scan_corpus(corpus)]
    assert "gone.png" not in names and len(names) == 6
    assert len(said) == 1 and "skipped 1 images whose files are gone" in said[0] and "gone.png" in said[0], said
    items = retrieve(corpus, PROMPT, 3, tmp_path / "reg", ClipFeatures(tiny_clip))
    assert len(items) == 3 and all(x["source"] != "gone.png" for x in items)
