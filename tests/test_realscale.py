"""The real-scale benchmark runs end to end: a smoke run on the CPU at 64 px for 2 steps (not timed)."""

from __future__ import annotations

import json

import torch
from tiny import load_benchmark


def test_realscale_training_benchmark_smoke(tmp_path):
    realscale = load_benchmark("realscale")
    out = tmp_path / "rows.jsonl"
    # the tiny network of SD 1.5's shape: SD 1.5 itself takes ~10 s a step here, too slow for the suite
    realscale.main(["--arch", "tiny", "--train-steps", "2", "--resolution", "64", "--batch-size", "2",
                    "--sample-steps", "2", "--work", str(tmp_path / "work"), "--json", str(out), "--phases"])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["program"] == "customdiff" and row["steps"] == 2 and row["peak_kind"] == "peak_rss"
    for key in ("first_step_s", "steps_per_s", "whole_run_s", "process_s", "peak_gb", "data_wait_share", "sample_s"):
        assert row[key] == row[key] and row[key] > 0 or key == "data_wait_share", key  # numbers, not NaN
    assert 2 < row["vae_images"] <= 4  # each step's photo; each class image once
    # the second step, by phase: each one ran, and together they are the step
    phases = row["phases_s_per_step"]
    assert row["levers"]["cuda_graphs"] == "off"  # its syncs inside the UNet's pass would fail a capture
    assert all(phases[k] > 0 for k in ("unet_forward", "backward", "vae_encode", "text_encode", "optimizer"))
    assert sum(phases.values()) > 0 and phases["other"] > -1e-3, phases
    assert len(list((tmp_path / "work").glob("tiny-64px-*/samples/*.png"))) >= 4


def test_saved_activations_benchmark_orders_the_levers():
    module = load_benchmark("saved_activations")
    runs = {v: module.child("tiny", 64, 2, v) for v in module.VARIANTS}
    saved = {v: r["saved_gib"] for v, r in runs.items()}
    # every saved byte is attributed to the module that saved it; the lean GEGLU saves no gelu output
    for r in runs.values():
        assert abs(sum(r["by_module"].values()) - r["saved_gib"]) < 1e-9
    assert any("LeanGEGLU" in k for k in runs["lean"]["by_module"])
    assert not any("GELU" in k for k in runs["lean"]["by_module"])
    # float32 norm outputs (as CUDA autocast runs them) cost bytes; the lean backward saves less again
    assert saved["lean"] < saved["norms"] < saved["before"], saved


def test_kernel_profile_reports_steps_and_ops(tmp_path):
    realscale = load_benchmark("realscale")
    prof = realscale.kernel_profiler(str(tmp_path / "p.txt"))
    a = torch.randn(64, 64)
    for _ in range(realscale.PROFILE_WAIT + realscale.PROFILE_WARMUP + realscale.PROFILE_ACTIVE + 1):
        (a @ a).relu_()
        prof.step()
    realscale.write_kernel_profile(prof, str(tmp_path / "p.txt"))
    text = (tmp_path / "p.txt").read_text()
    head = text.splitlines()[0]
    assert head.startswith(f"# {realscale.PROFILE_ACTIVE} steps profiled") and "nan" not in head
    assert "aten::mm" in text and "aten::relu_" in text


def test_step_overhead_counts_fewer_calls_for_the_batched_vae(capsys):
    module = load_benchmark("step_overhead")
    module.main(["--threads", "1", "--batch-size", "8", "--repeats", "1", "--inner", "1"])
    calls = {}
    for line in capsys.readouterr().out.splitlines():
        if "aten calls" in line:  # "  <name>   <calls> aten calls  <ms> ms (...)"
            name, count = line.split("aten calls")[0].rsplit(maxsplit=1)
            calls[name.strip()] = int(count)
    assert set(calls) == {"stock modules", "--lean-activations", "one at a time", "all at once"}
    # one photo per call against one call: the batched encode dispatches far fewer operators
    assert calls["all at once"] < 0.6 * calls["one at a time"]
    # the leaner modules add an autograd function per convolution, not a copy per convolution
    assert calls["stock modules"] <= calls["--lean-activations"] < 1.05 * calls["stock modules"]
