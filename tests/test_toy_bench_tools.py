"""The toy benchmarks' reading tools: pair_shares reads saved pair samples, words_ceiling words its prompts."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import load_benchmark


def test_pair_shares_reads_each_concept_of_saved_pair_samples(tmp_path):
    from customdiff.toy.concepts import CONCEPTS
    from customdiff.toy.fidelity import Judge

    pair_shares = load_benchmark("pair_shares")
    looks = {c.name: c for c in CONCEPTS}
    rng = np.random.default_rng(0)
    # a fake bench folder: seed 0, joint, the first pair; its "samples" are photos of the first concept only
    d = tmp_path / "images" / "s0" / "joint" / "checker_square+striped_circle" / "prompts" / "00_x"
    d.mkdir(parents=True)
    for i in range(8):
        looks["checker_square"].render(rng).save(d / f"{i:04d}.png")
    looks["striped_circle"].render(rng).save(d / "grid.png")  # not a sample: must be skipped
    judge = Judge.toy()
    rows = pair_shares.pair_rows([tmp_path], judge)
    assert len(rows) == 1
    row = rows[0]
    assert (row["seed"], row["method"], row["n"]) == (0, "joint", 8)
    assert row["shows_checker_square"] >= 0.75  # the judge reads 7-8 of 8 of its photos as the concept
    assert row["shows_striped_circle"] == 0.0 and row["both"] == 0.0
    with pytest.raises(SystemExit, match="no pair samples"):
        pair_shares.pair_rows([tmp_path / "missing"], judge)


def test_words_ceiling_names_the_concept_in_words():
    from customdiff.toy.concepts import CONCEPTS, PAIR_PROMPTS, SINGLE_PROMPTS

    words_ceiling = load_benchmark("words_ceiling")
    looks = {c.name: c.look for c in CONCEPTS}
    prompts = words_ceiling.worded_prompts(looks["banded_triangle"])
    assert len(prompts) == len(SINGLE_PROMPTS)
    assert prompts[1] == "an orange triangle with a black band at night"
    assert "<new1>" not in " ".join(prompts)
    pair = words_ceiling.worded_pair_prompts(looks["checker_square"], looks["striped_circle"])
    assert len(pair) == len(PAIR_PROMPTS)
    assert pair[0] == "photo of a blue square with white checks next to a red circle with black stripes"
