"""The output module: atomic files, staged folders (published whole or not at all), the foreign-output
check and image folders."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from customdiff.errors import UserError
from customdiff.outputs import (
    check_out,
    final_path,
    read_image_folder,
    staged,
    write_image_folder,
    write_text,
)


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (30 * i, 200, 10)) for i in range(n)]


def test_staged_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), staged(out) as s:
        (s / "a.txt").write_text("a")
        raise RuntimeError("fails halfway")
    assert not out.exists() and list((tmp_path / "new").iterdir()) == []  # no staging folder left either
    with staged(out) as s:
        (s / "a.txt").write_text("a")
    assert [p.name for p in out.iterdir()] == ["a.txt"]


def test_final_path_names_where_a_staged_file_will_be(tmp_path):
    """Logs inside a staged block name the published place, through nested blocks; outside one, paths pass."""
    outer, inner = tmp_path / "bench", "deltas"
    with staged(outer) as s:
        with staged(s / inner) as t:
            assert final_path(t / "a.safetensors") == outer / inner / "a.safetensors"
            assert final_path(t) == outer / inner
        assert final_path(s / "results.json") == outer / "results.json"
    assert final_path(tmp_path / "x") == tmp_path / "x"


def test_staged_replace_and_merge_modes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "images").mkdir()
    (out / "images" / "old.png").write_text("old")
    with staged(out) as s:  # merge: same-named items replaced, others kept
        (s / "images").mkdir()
        (s / "images" / "new.png").write_text("new")
        (s / "metrics.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["images", "keep.txt", "metrics.json"]
    assert [p.name for p in (out / "images").iterdir()] == ["new.png"]
    with staged(out, replace=True) as s:  # replace: the folder becomes exactly the staged one
        (s / "only.txt").write_text("x")
    assert [p.name for p in out.iterdir()] == ["only.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_out_refuses_foreign_folders(tmp_path):
    assert check_out(tmp_path / "missing", "retrieve", ".retrieval.json") == tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "retrieve", ".retrieval.json")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="holds files not from `customdiff retrieve`"):
        check_out(photos, "retrieve", ".retrieval.json")
    (photos / ".retrieval.json").write_text("{}")
    check_out(photos, "retrieve", ".retrieval.json")  # an earlier retrieval: replaced
    # eval replaces only images/: other files do not count, an images/ folder without metrics.json does
    check_out(photos, "eval", "metrics.json", replaces=["images"])
    (photos / "images").mkdir()
    with pytest.raises(UserError, match="has images/ not from `customdiff eval`"):
        check_out(photos, "eval", "metrics.json", replaces=["images"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_out(tmp_path / "file", "eval", "metrics.json")


def test_image_folder_round_trip_and_no_partial_folder(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    paths = write_image_folder(folder, _images(3), ["a", "a", "b"], [0, 0, 1], cols=2)
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png",
                                                         "prompts.json"]
    assert json.loads((folder / "prompts.json").read_text())[2] == {"file": "0002.png", "prompt": "b", "seed": 1}
    assert Image.open(folder / "grid.png").size == (16, 16)
    images, prompts = read_image_folder(folder)
    assert prompts == ["a", "a", "b"] and images[1].getpixel((0, 0)) == (30, 200, 10)

    import customdiff.outputs as outputs

    def full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_text", full)  # prompts.json is written last
    broken = tmp_path / "broken"
    with pytest.raises(OSError):
        write_image_folder(broken, _images(2), ["a", "b"], [0, 0])
    assert list(broken.iterdir()) == []


def test_atomic_text_leaves_no_temporary_file(tmp_path):
    write_text(tmp_path / "a.txt", "héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
