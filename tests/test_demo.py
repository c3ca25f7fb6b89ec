"""A reduced demo and a tiny bench on the toy world write their reports with probe-exact measures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from customdiff.cli import main
from customdiff.toy import paths

pytestmark = pytest.mark.skipif(not (Path(paths()["base"]) / "model_index.json").is_file(),
                                reason="toy assets not built")
PROBE_KEYS = ("concept_fidelity", "context_fidelity", "class_leakage")


def test_quick_demo_writes_report(tmp_path, capsys):
    from customdiff.delta import load_delta

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # not -q: its log is read
    said = capsys.readouterr()
    wrote = [line for line in said.err.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {out / 'concept.safetensors'}"]  # where it is now, not the staging folder's name
    printed = said.out.strip()
    assert printed == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert "&lt;new1&gt;" in page and "concept fidelity" in page
    metrics = json.loads((out / "metrics.json").read_text())
    # the shipped judge reads the concept's own photos as the concept, also as the VAE can express them
    assert metrics["judge_ceiling"]["targets"] >= 0.75 and metrics["judge_ceiling"]["targets_vae_roundtrip"] >= 0.75
    assert "after a round trip through the VAE" in page
    for k in ("before", "after"):
        assert -1 <= metrics[k]["text_alignment"] <= 1 and -1 <= metrics[k]["image_alignment"] <= 1
        for key in PROBE_KEYS:
            assert 0 <= metrics[k][key] <= 1
    # every generated image carries the probe's verdict in the page
    after = sorted((out / "after").glob("0*.png"))
    assert len(after) == 4
    assert page.count("| concept ✓") + page.count("| concept ✗") == 2 * len(after)  # one verdict per image
    delta = load_delta(out / "concept.safetensors")
    assert any(float(w.abs().max()) > 0 for w in delta.weights.values())
    # the delta changes what the model draws: after differs from before
    diff = [np.abs(np.asarray(Image.open(a), float) - np.asarray(Image.open(out / "before" / a.name), float)).mean()
            for a in after]
    assert min(diff) > 1.0


def test_demo_unknown_concept(tmp_path, capsys):
    assert main(["demo", "--concept", "unicorn", "--out", str(tmp_path / "d")]) == 2
    assert "not a toy concept" in capsys.readouterr().err


def test_tiny_bench_end_to_end(tmp_path):
    from customdiff.bench import BenchConfig, run_bench

    cfg = BenchConfig(concepts=["checker_square"], pairs=1, seeds=[0, 1], methods=["custom_diffusion"], steps=2,
                      n=1, prompts=2, n_class=4, sample_steps=2)
    out = run_bench(cfg, tmp_path / "bench", progress=False)
    summary = json.loads((out / "results.json").read_text())
    methods = [m["method"] for m in summary["means"]]
    assert methods == ["custom_diffusion", "joint", "merge", "merge_pad", "two_deltas"]
    assert len(summary["rows"]) == 2 * 5 and {r["seed"] for r in summary["rows"]} == {0, 1}
    cd = summary["means"][0]
    assert cd["seeds"] == 2 and cd["concept_fidelity_std"] is not None and 0 <= cd["class_leakage"] <= 1
    assert summary["means"][1]["pair_fidelity"] is not None
    assert "± " in (out / "results.md").read_text()
    # the report: tables, the target photos inline and each run's samples framed by the probe's verdict
    report = (out / "report.html").read_text()
    assert "<table>" in report and report.count("data:image/png;base64") >= 8
    run = summary["rows"][0]
    assert len(run["verdicts"]) == 2 and all("concept" in v for v in run["verdicts"])
    assert "images/s0/custom_diffusion/checker_square/prompts/" in report
    assert report.count("<img class='s ") == 2 + 4 * 2  # first seed: 2 prompts of the single, 2 of each pair run
    assert not (tmp_path / "bench.partial").exists()

    # rescoring the saved samples reproduces every measure; a run whose samples are gone is refused up front
    from customdiff.bench import rescore_bench
    from customdiff.errors import UserError

    rescore_bench(out, progress=False)
    again = json.loads((out / "results.json").read_text())
    assert "rescored" in again and [r["seed"] for r in again["rows"]] == [r["seed"] for r in summary["rows"]]
    for old, new in zip(summary["rows"], again["rows"], strict=True):
        assert new["verdicts"] == old["verdicts"]
        assert {k: v for k, v in new.items() if k != "verdicts"} == pytest.approx(
            {k: v for k, v in old.items() if k != "verdicts"})
    shutil.rmtree(out / "images" / "s1" / "merge")
    before = (out / "results.json").read_text()
    with pytest.raises(UserError, match="s1/merge"):
        rescore_bench(out, progress=False)
    assert (out / "results.json").read_text() == before


def test_bench_rescore_needs_a_bench_folder(tmp_path, capsys):
    assert main(["bench", "--rescore", "-o", str(tmp_path)]) == 2
    assert "results.json: not found" in capsys.readouterr().err
