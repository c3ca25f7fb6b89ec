"""A reduced demo on the shipped toy world writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from customdiff.cli import main
from customdiff.toy import paths

pytestmark = pytest.mark.skipif(not (Path(paths()["base"]) / "model_index.json").is_file(),
                                reason="toy assets not built")


def test_quick_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert "&lt;new1&gt;" in page and page.count("<img") >= 6 + 2 * 2 * 2
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("before", "after"):
        assert -1 <= metrics[k]["text_alignment"] <= 1 and -1 <= metrics[k]["image_alignment"] <= 1
    assert (out / "concept.safetensors").is_file()
    assert len(list((out / "after").glob("*.png"))) == 4


def test_demo_unknown_concept(tmp_path, capsys):
    assert main(["demo", "--concept", "unicorn", "--out", str(tmp_path / "d")]) == 2
    assert "not a toy concept" in capsys.readouterr().err
