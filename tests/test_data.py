"""Data loading, augmentation geometry and prompt prefixes, and the masked loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from customdiff.data import FAR_PREFIXES, NEAR_PREFIXES, augment, list_images, load_image
from customdiff.errors import UserError
from customdiff.model import masked_mse


def test_masked_mse_matches_hand_computation():
    pred = torch.zeros(2, 2, 2, 2)
    target = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # sample 0: unmasked elements (c, 0, 0) = 0 and 4 -> (0 + 16) / 2 = 8
    # sample 1: all 8 elements 8..15 -> mean of squares = (64+81+...+225) / 8 = 1100 / 8 = 137.5
    assert masked_mse(pred, target, mask).item() == pytest.approx((8 + 137.5) / 2)


def _grid_image(size=64):
    arr = np.zeros((size, size, 3), np.uint8)
    arr[..., 0] = np.arange(size)[None, :] * 4  # horizontal ramp shows flips
    arr[..., 1] = 200
    return Image.fromarray(arr)


def test_augment_geometry_and_prefixes():
    size, factor = 32, 4
    im = _grid_image()
    seen = {"far": 0, "near": 0, "mid": 0}
    for seed in range(300):
        rng = np.random.default_rng(seed)
        pixels, mask, prompt = augment(im, "photo of a <new1> cat", size, factor, rng)
        assert pixels.shape == (3, size, size) and mask.shape == (size // factor, size // factor)
        assert pixels.min() >= -1 and pixels.max() <= 1
        if prompt.startswith(NEAR_PREFIXES):
            seen["near"] += 1
            assert mask.all()  # zoomed in: the whole frame is the image
            assert (pixels[1] > 0).all()
        else:
            filled = (pixels.abs().sum(0) > 0).numpy()  # pasted region (the canvas is 0 = grey)
            rows, cols = np.where(filled)
            top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
            scale = bottom - top
            assert right - left == scale
            if scale == size:
                assert mask.all()
                continue
            expect = torch.zeros_like(mask)
            expect[top // factor + 1:bottom // factor - 1, left // factor + 1:right // factor - 1] = 1
            if expect.sum() == 0:
                expect[top // factor:-(-bottom // factor), left // factor:-(-right // factor)] = 1
            assert torch.equal(mask, expect), seed
            if prompt.startswith(FAR_PREFIXES):
                seen["far"] += 1
                assert scale < 0.6 * size
            else:
                seen["mid"] += 1
                assert prompt == "photo of a <new1> cat" and scale >= 0.6 * size
    assert all(v > 10 for v in seen.values()), seen
    assert seen["near"] / 300 == pytest.approx(1 / 3, abs=0.08)


def test_augment_off_gives_full_image_and_mask():
    pixels, mask, prompt = augment(_grid_image(), "p <new1> cat", 32, 4, np.random.default_rng(0), enabled=False,
                                   flip=False)
    assert mask.all() and prompt == "p <new1> cat"
    assert pixels[0, 0, 0] < pixels[0, 0, -1]  # not flipped: red ramp rises to the right


def test_load_image_modes_and_exif(tmp_path):
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("L", (8, 4), 100).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").mode == "RGB"
    Image.new("P", (8, 4)).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    im = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (4, 8)
    Image.new("RGB", (8, 8)).save(tmp_path / "w.webp")
    assert load_image(tmp_path / "w.webp").size == (8, 8)


def test_list_images_errors(tmp_path):
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(UserError, match="notes.md: not an image"):
        list_images(tmp_path)


def test_list_images_skips_what_the_system_writes(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "Icon\r"):
        (tmp_path / name).write_bytes(b"\0")
    (tmp_path / "album").mkdir()
    assert list_images(tmp_path) == [tmp_path / "x.png"]


def test_a_concepts_path_that_names_two_folders_is_refused(tmp_path, monkeypatch):
    import json

    from customdiff.data import read_concepts_file

    for root in (tmp_path / "cwd", tmp_path / "lists"):
        (root / "photos").mkdir(parents=True)
    listing = tmp_path / "lists" / "concepts.json"
    listing.write_text(json.dumps([{"instance_prompt": "a <new1> cat", "class_prompt": "cat",
                                    "instance_data_dir": "photos"}]))
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(UserError, match="photos names both .* write an absolute path"):
        read_concepts_file(listing)
    (tmp_path / "cwd" / "photos").rmdir()  # only beside the file: that one
    assert read_concepts_file(listing)[0].instance_dir == str(tmp_path / "lists" / "photos")


def test_a_photo_this_user_may_not_read_says_so(tmp_path, monkeypatch):
    """Not "not a readable image; remove or replace the file": the file is fine, its permissions are not. Root
    reads every file, so the refusal of the OS is simulated."""
    import customdiff.images

    photo = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(photo)

    def refused(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(customdiff.images.Image, "open", refused)
    with pytest.raises(UserError, match=r"p\.png: permission denied: this user may not read it"):
        load_image(photo)


def test_class_word_is_the_first_word_after_the_tokens():
    """Recorded in the delta's token info: "heart", not "<new2>", for a prompt with two tokens in a row."""
    from customdiff.data import ConceptSpec

    words = [ConceptSpec("x", p, "photo of a dog").class_word()
             for p in ("photo of a <new1> <new2> heart", "photo of a <new1> cat, on grass", "a <new1>")]
    assert words == ["heart", "cat", "dog"]
