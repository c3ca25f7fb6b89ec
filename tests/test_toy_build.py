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
    # --set reaches the second lane too: the probe redone below in this process must give the same bytes
    args = ["--quick", "--work", str(work), "--out", str(out), "--threads", "1", "--set", "probe_steps=12"]
    main(args)  # two lanes (the default): the probe trains in a second process
    assert "stage probe: done" in (work / "probe_lane.log").read_text()
    report = json.loads((out / "build_report.json").read_text())
    assert set(report["stage_seconds"]) == set(STAGES) and report["run_wall_seconds"] > 0
    quality = report["quality"]
    for key in ("probe_real_1obj", "probe_vae_roundtrip_1obj", "probe_vae_roundtrip_2obj",
                "base_prompt_following_1obj", "clip_zero_shot_real_1obj"):
        assert 0 <= quality[key]["shape"] <= 1, key
    balanced = quality["base_pattern_following_balanced"]  # 2 captions for each of the 6 patterns
    assert sum(sum(row.values()) for row in balanced["confusion"].values()) == 12
    assert (work / "judge.npz").is_file() and (out / "base" / "model_index.json").is_file()
    assert (work / "judge_roundtrip.npy").is_file()  # kept for a resumed probe stage
    probe = (out / "probe.safetensors").read_bytes()

    caplog.clear()
    with caplog.at_level("INFO", logger="customdiff.toy.build"):
        main(args)  # everything is done: nothing reruns
    assert sum("already done" in r.getMessage() for r in caplog.records) == len(STAGES)

    (work / "probe.pt").unlink()  # trained again from scratch in this process: the second lane's weights
    main([*args, "--stages", "probe", "--redo", "probe"])
    assert (out / "probe.safetensors").read_bytes() == probe

    main([*args, "--stages", "data", "--redo", "data"])  # new images: the probe's round trips are made again
    assert not (work / "judge_roundtrip.npy").exists()


@pytest.mark.parametrize(("setting", "message"), [("unet_lr=fast", "takes a number"),
                                                  ("unet_steps=2.5", "takes a whole number"),
                                                  ("no_such=1", "unknown build setting")])
def test_a_bad_build_setting_stops_before_any_work(tmp_path: Path, restore_threads, capsys, setting, message):
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--work", str(work), "--out", str(tmp_path / "assets"), "--set", setting])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not work.exists()  # nothing written


def test_build_settings_keep_their_types(tmp_path: Path, restore_threads, monkeypatch):
    from customdiff.toy import build

    seen = {}
    monkeypatch.setattr(build.Builder, "run", lambda self, stages: seen.update(cfg=self.cfg))
    main(["--quick", "--lanes", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "a"), "--set", "unet_lr=2e-3",
          "--set", "unet_steps=30"])
    assert seen["cfg"].unet_lr == 2e-3 and isinstance(seen["cfg"].unet_lr, float) and seen["cfg"].unet_steps == 30
