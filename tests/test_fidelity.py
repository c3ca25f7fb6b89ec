"""Probe-exact measures on the toy world: prompt parsing, verdicts, summaries, leakage, probe labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from customdiff.toy.fidelity import images_to_tensor, judge, leakage, parse_prompt, summarize
from customdiff.toy.probe import HEADS, Reading, scene_targets
from customdiff.toy.world import PERSONAL, Look, sample_scene

CHECKER = PERSONAL["checker_square"]  # blue square, white checks
CIRCLE = PERSONAL["striped_circle"]  # red circle, black stripes
RED_CIRCLE = Look("circle", "red")


@pytest.mark.parametrize("objects, setting, concept, context", [
    ([CHECKER, RED_CIRCLE], "grass", True, True),
    ([RED_CIRCLE, CHECKER], "grass", True, True),  # order does not matter
    ([CHECKER, RED_CIRCLE], "night", True, False),  # wrong setting
    ([CHECKER], "grass", True, False),  # the other object is missing
    ([Look("square", "blue", "checks", "black"), RED_CIRCLE], "grass", False, True),  # wrong pattern colour
    ([Look("square", "blue"), RED_CIRCLE], "grass", False, True),  # no pattern
    ([Look("circle", "blue", "checks", "white"), RED_CIRCLE], "grass", False, True),  # wrong shape
])
def test_verdicts(objects, setting, concept, context):
    prompt = "a <new1> square next to a red circle on grass"
    (v,) = judge([Reading(setting, objects)], [prompt], {"<new1>": CHECKER})
    assert (v.concept, v.context) == (concept, context)


def test_context_is_not_applicable_without_context_and_pairs_need_two_objects():
    looks = {"<new1>": CHECKER, "<new2>": CIRCLE}
    plain, pair_ok, pair_one = judge(
        [Reading("night", [CHECKER]), Reading("plain", [CHECKER, CIRCLE]), Reading("plain", [CHECKER])],
        ["photo of a <new1> square", "a <new1> square next to a <new2> circle",
         "a <new1> square next to a <new2> circle"], looks)
    assert plain.context is None and plain.concept
    assert pair_ok.concept and not pair_one.concept
    s = summarize([pair_ok, pair_one], n_concepts=2)
    assert s == {"pair_fidelity": 0.5, "context_fidelity": None}
    assert summarize([plain]) == {"concept_fidelity": 1.0, "context_fidelity": None}


def test_leakage_counts_the_concepts_pattern_in_its_colour():
    readings = [Reading("plain", [Look("square", "red", "checks", "white")]),  # leaks
                Reading("plain", [Look("square", "blue", "checks", "black")]),  # other pattern colour
                Reading("plain", [Look("square", "blue")]), Reading("grass", [])]
    assert leakage(readings, CHECKER) == 0.25


def test_parse_prompt_reads_every_named_attribute():
    spec = parse_prompt("a picture of a small <new2> heart on the left next to a green star with a white ring "
                        "at night sks")
    assert spec.setting == "night"
    heart, star = spec.objects
    assert (heart.token, heart.shape, heart.colour) == ("<new2>", "heart", None)
    assert (star.shape, star.colour, star.pattern, star.pattern_colour) == ("star", "green", "ring", "white")


def test_probe_targets_follow_reading_order():
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, n_objects=k) for k in (1, 2) for _ in range(20)]
    y = scene_targets(scenes)
    cols = list(HEADS)
    for sc, row in zip(scenes, y, strict=True):
        assert HEADS["setting"][row[cols.index("setting")]] == sc.setting
        assert HEADS["shape0"][row[cols.index("shape0")]] == sc.objects[0].shape
        second = HEADS["shape1"][row[cols.index("shape1")]]
        assert second == (sc.objects[1].shape if len(sc.objects) == 2 else "absent")
        plain = sc.objects[0].look.pattern == "plain"
        assert (row[cols.index("pattern_colour0")] == -1) == plain


def test_images_to_tensor_reads_pil_uint8_and_float_images_alike():
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = images_to_tensor([Image.fromarray(arr), arr, arr.astype(np.float32) / 255.0])
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[1], x[0])
    torch.testing.assert_close(x[2], x[0])
