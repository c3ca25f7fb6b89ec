"""The command line: end-to-end train/sample, and bad input giving exit 2, one line, no partial output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from customdiff.cli import main


def _train_args(base, concept, out, *extra, prompt="photo of a <new1> cat", reg=None):
    args = ["train", "--base", base, "--concept", concept, "--instance-prompt", prompt,
            "--class-prompt", "photo of a cat", "--steps", "2", "--batch-size", "2", "--out", str(out)]
    if reg:
        args += ["--reg-dir", reg]
    return args + list(extra)


def _expect_usage_error(capsys, argv, needle, out: Path):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not out.with_name(out.name + ".ckpt").exists()
    assert not list(out.parent.glob("*.tmp"))


def test_empty_concept_folder(tiny_base, concept_dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "d.safetensors"
    _expect_usage_error(capsys, _train_args(tiny_base, str(tmp_path / "empty"), out, reg=concept_dirs["reg"]),
                        "contains no images", out)


def test_non_image_among_images(tiny_base, concept_dirs, tmp_path, capsys):
    d = shutil.copytree(concept_dirs["a"], tmp_path / "c")
    (d / "readme.doc").write_text("not a picture")
    out = tmp_path / "d.safetensors"
    _expect_usage_error(capsys, _train_args(tiny_base, str(d), out, reg=concept_dirs["reg"]), "readme.doc", out)


def test_truncated_jpeg(tiny_base, concept_dirs, tmp_path, capsys):
    d = shutil.copytree(concept_dirs["a"], tmp_path / "c")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(d / "broken.jpg", quality=95)
    data = (d / "broken.jpg").read_bytes()
    (d / "broken.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "d.safetensors"
    _expect_usage_error(capsys, _train_args(tiny_base, str(d), out, reg=concept_dirs["reg"]), "broken.jpg", out)


def test_instance_prompt_without_token(tiny_base, concept_dirs, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    _expect_usage_error(capsys, _train_args(tiny_base, concept_dirs["a"], out, prompt="photo of a cat",
                                            reg=concept_dirs["reg"]), "no modifier token", out)


def test_unknown_train_value(tiny_base, concept_dirs, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    with pytest.raises(SystemExit) as e:
        main(_train_args(tiny_base, concept_dirs["a"], out, "--train", "everything", reg=concept_dirs["reg"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "everything" in err
    assert not out.exists()


def test_delta_for_another_base(tiny_base, other_base, concept_dirs, tmp_path, capsys):
    delta = tmp_path / "d.safetensors"
    assert main(["-q"] + _train_args(tiny_base, concept_dirs["a"], delta, reg=concept_dirs["reg"])) == 0
    capsys.readouterr()
    out = tmp_path / "samples"
    code = main(["sample", "--base", other_base, "--delta", str(delta), "--prompt", "photo of a <new1> cat",
                 "--steps", "2", "--n", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another base" in err, err
    assert not out.exists()


def test_train_and_sample_end_to_end_subprocess(tiny_base, concept_dirs, tmp_path):
    """The installed console command runs train then sample; images, grid and index are written."""
    exe = [sys.executable, "-m", "customdiff"]
    delta = tmp_path / "d.safetensors"
    r = subprocess.run(exe + ["-q"] + _train_args(tiny_base, concept_dirs["a"], delta, "--num-class-images", "3"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert delta.is_file()
    out = tmp_path / "s"
    r = subprocess.run(exe + ["-q", "sample", "--base", tiny_base, "--delta", str(delta), "--prompt", "a <new1> cat",
                              "--prompt", "a dog", "--n", "2", "--steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png",
                                                     "prompts.json"]


def _subparsers():
    import argparse

    from customdiff.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


WRITERS = ("train", "sample", "merge", "compress", "export", "import", "retrieve", "eval", "bench", "demo")


def test_out_is_one_flag_on_every_writing_command():
    """-o and --out name the same option on every command that writes something."""
    sub = _subparsers()
    for cmd in WRITERS:
        spellings = {tuple(a.option_strings) for a in sub[cmd]._actions if a.dest == "out"}
        assert spellings == {("-o", "--out")}, cmd


def test_base_and_delta_mean_the_same_everywhere():
    from customdiff.config import BASE_HELP

    sub = _subparsers()
    for cmd in (*WRITERS, "toy"):
        parser = sub[cmd]
        for a in parser._actions:
            if "--base" in a.option_strings and a.help != "==SUPPRESS==":  # hidden: refused (demo, bench, retrieve)
                assert a.help.startswith(BASE_HELP), cmd
            if "--delta" in a.option_strings:  # repeatable, each occurrence one or more files
                args = ["--base", "b", "--delta", "x", "y", "--delta", "z", "-o", "out"]
                args += ["--prompt", "p"] if cmd == "sample" else ["--dataset", "d.json"]
                assert parser.parse_args(args).deltas == ["x", "y", "z"], cmd
    assert {c for c in WRITERS if any("--delta" in a.option_strings for a in sub[c]._actions)} == {"sample", "eval"}


def test_device_left_out_means_the_default_device():
    from customdiff.cli.flags import device

    a = _subparsers()["sample"].parse_args(["--base", "b", "--prompt", "p", "-o", "s"])
    assert a.device is None and device(None) in ("cpu", "cuda") and device("cpu") == "cpu"


def test_ctrl_c_while_training_keeps_a_checkpoint_that_resume_continues(tiny_base, concept_dirs, tmp_path, capsys,
                                                                         monkeypatch):
    import os
    import signal

    import torch

    import customdiff.train as tr
    from customdiff.delta import load_delta

    handler = signal.getsignal(signal.SIGINT)
    full, out = tmp_path / "full.safetensors", tmp_path / "d.safetensors"
    args = ["--steps", "4", "--learning-rate", "1e-3"]
    assert main(["-q", *_train_args(tiny_base, concept_dirs["a"], full, *args, reg=concept_dirs["reg"])]) == 0
    real = tr.train

    def ctrl_c_after_step_2(*a, **k):  # the signal arrives while the loop runs, as from a terminal
        return real(*a, callback=lambda step, loss: step == 2 and os.kill(os.getpid(), signal.SIGINT), **k)

    monkeypatch.setattr(tr, "train", ctrl_c_after_step_2)
    capsys.readouterr()
    assert main(["-q", *_train_args(tiny_base, concept_dirs["a"], out, *args, reg=concept_dirs["reg"])]) == 130
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert "saving a checkpoint after this step" in err[0]
    assert err[-1].startswith("customdiff: interrupted: stopped at step 2 of 4; checkpoint in"), err
    assert not out.exists() and (tr.checkpoint_dir(out) / "latest.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is handler
    monkeypatch.setattr(tr, "train", real)
    assert main(["-q", *_train_args(tiny_base, concept_dirs["a"], out, *args, "--resume",
                                    reg=concept_dirs["reg"])]) == 0
    a, b = load_delta(full), load_delta(out)
    for k in a.weights:
        torch.testing.assert_close(a.weights[k], b.weights[k], rtol=1e-5, atol=1e-7)


def test_ctrl_c_outside_the_training_loop_or_twice_quits_at_once():
    import os
    import signal

    from customdiff.cli.training import _first_interrupt_stops
    from customdiff.train import StopRequest

    stop = StopRequest()
    with _first_interrupt_stops(stop):
        with pytest.raises(KeyboardInterrupt):  # loading, checking: nothing to finish
            os.kill(os.getpid(), signal.SIGINT)
        stop.in_loop = True
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_version_is_the_package_version(capsys):
    import re

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"', pyproject, re.M)[1]
    assert capsys.readouterr().out.strip() == f"customdiff {version}"


def test_resume_warns_when_the_photos_changed(tiny_base, concept_dirs, tmp_path, capsys):
    from customdiff.config import TrainConfig
    from customdiff.data import ConceptSpec
    from customdiff.train import TrainingStopped, train

    photos = tmp_path / "photos"
    shutil.copytree(concept_dirs["a"], photos)
    out = tmp_path / "d.safetensors"
    spec = ConceptSpec(str(photos), "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"])
    with pytest.raises(TrainingStopped):
        train(TrainConfig(base=tiny_base, out=str(out), steps=4, batch_size=2), [spec], progress=False,
              callback=lambda step, loss: step == 2)
    args = _train_args(tiny_base, str(photos), out, "--steps", "4", "--resume", reg=concept_dirs["reg"])
    first = sorted(photos.glob("*.png"))[0]
    Image.open(first).rotate(90).save(first)
    capsys.readouterr()
    assert main(["-q", *args]) == 0
    assert "the concept photos changed since this checkpoint" in capsys.readouterr().err


def test_sigterm_stops_as_ctrl_c_does_and_leaves_no_staging_folder(tmp_path, capsys, monkeypatch):
    """kill, a CI timeout or docker stop mid-demo: exit 143, nothing of the run left (its staging folder was)."""
    import os
    import signal

    import customdiff.train as tr

    handler = signal.getsignal(signal.SIGTERM)
    real = tr.train

    def killed_at_step_2(*a, **k):
        return real(*a, callback=lambda step, loss: step == 2 and os.kill(os.getpid(), signal.SIGTERM), **k)

    monkeypatch.setattr(tr, "train", killed_at_step_2)
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--quick", "--out", str(out)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "customdiff: terminated"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is handler


def test_quiet_goes_before_or_after_the_command():
    from customdiff.cli import parse

    rest = ["--base", "toy", "--prompt", "a cat", "-o", "s"]
    assert parse(["-q", "sample", *rest]).quiet and parse(["sample", "-q", *rest]).quiet
    assert parse(["sample", *rest, "--quiet"]).quiet and not parse(["sample", *rest]).quiet
