"""Data-parallel training with `accelerate launch` on 2 CPU processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from customdiff.delta import load_delta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch(tiny_base, concept_dirs, tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "customdiff", "-q", "train", "--base", tiny_base, "--concept", concept_dirs["a"],
           "--instance-prompt", "photo of a <new1> cat", "--class-prompt", "photo of a cat",
           "--reg-dir", concept_dirs["reg"], "--steps", "3", "--batch-size", "2", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(tiny_base).parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(out)]  # only the main process reports
    d = load_delta(out)
    assert d.config["num_processes"] == 2
    assert d.config["effective_learning_rate"] == 1e-5 * 2 * 2  # scaled by batch x processes
    assert all(v.abs().sum() > 0 for v in d.weights.values())


def test_bad_input_under_two_processes_is_said_once(tiny_base, concept_dirs, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "customdiff", "train", "--base", tiny_base, "--concept", concept_dirs["a"],
           "--instance-prompt", "photo of a <new1> cat", "--class-prompt", "photo of a cat", "--steps", "0",
           "--out", str(tmp_path / "d.safetensors")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(tiny_base).parent)
    assert r.returncode != 0  # the launcher reports its children's exit code 2 its own way
    said = [x for x in r.stderr.splitlines() if x.startswith("customdiff train: error:")]
    assert said == ["customdiff train: error: --steps 0: must be at least 1"], r.stderr[-3000:]
