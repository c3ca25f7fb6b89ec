"""The toy world's build runs end to end at --quick size, skips finished stages on a rerun, and is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from customdiff.toy.build import STAGES, main


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_build_end_to_end_resumable_and_deterministic(tmp_path: Path, restore_threads, caplog):
    work, out = tmp_path / "work", tmp_path / "assets"
    args = ["--quick", "--work", str(work), "--out", str(out), "--threads", "1"]
    main(args)
    report = json.loads((out / "build_report.json").read_text())
    assert set(report["stage_seconds"]) == set(STAGES)
    quality = report["quality"]
    for key in ("probe_real_1obj", "probe_vae_roundtrip_1obj", "probe_vae_roundtrip_2obj",
                "base_prompt_following_1obj", "clip_zero_shot_real_1obj"):
        assert 0 <= quality[key]["shape"] <= 1, key
    assert (work / "judge.npz").is_file() and (out / "base" / "model_index.json").is_file()
    assert (work / "judge_roundtrip.npy").is_file()  # kept for a resumed probe stage
    probe = (out / "probe.safetensors").read_bytes()

    caplog.clear()
    with caplog.at_level("INFO", logger="customdiff.toy.build"):
        main(args)  # everything is done: nothing reruns
    assert sum("already done" in r.getMessage() for r in caplog.records) == len(STAGES)

    (work / "probe.pt").unlink()  # a stage trained again from scratch gives the same weights
    main([*args, "--stages", "probe", "--redo", "probe"])
    assert (out / "probe.safetensors").read_bytes() == probe

    main([*args, "--stages", "data", "--redo", "data"])  # new images: the probe's round trips are made again
    assert not (work / "judge_roundtrip.npy").exists()
