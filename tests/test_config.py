"""Configuration dataclasses: field checks, resume-relevance, and the CLI flags derived from them."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from customdiff.cli import build_parser
from customdiff.cli.flags import config_from
from customdiff.config import EvalConfig, TrainConfig, flag_name
from customdiff.errors import UserError
from customdiff.surgery import TRAIN_CHOICES


def _sub(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("cls, change, needle", [
    (TrainConfig, {"steps": 0}, "--steps 0: must be at least 1"),
    (TrainConfig, {"learning_rate": 0.0}, "--learning-rate 0.0: must be greater than 0"),
    (TrainConfig, {"learning_rate": float("nan")}, "must be a finite number"),
    (TrainConfig, {"resolution": 9000}, "(0 = the base's native size)"),
    (TrainConfig, {"seed": -1}, "--seed -1"),
    (TrainConfig, {"max_grad_norm": 0.0}, "--max-grad-norm 0.0"),
    (TrainConfig, {"class_image_steps": 1001}, "must be at most 1000"),
    (TrainConfig, {"train": "everything"}, "--train 'everything' is unknown; choose one of crossattn_kv"),
    (TrainConfig, {"mixed_precision": "fp8"}, "--mixed-precision 'fp8' is unknown"),
    (EvalConfig, {"n": 0}, "--n 0"),
    (EvalConfig, {"guidance": -1.0}, "--guidance"),
    (EvalConfig, {"resolution": 4}, "--resolution 4"),
    (EvalConfig, {"class_template": "photo of a cat"}, "must contain {}"),
])
def test_validate_refuses_out_of_range_fields(cls, change, needle):
    cls().validate()  # the defaults are valid
    with pytest.raises(UserError) as e:
        cls(**change).validate()
    assert needle in str(e.value)


def test_train_choices_match_the_surgery():
    choices = next(f for f in fields(TrainConfig) if f.name == "train").metadata["choices"]
    assert choices == list(TRAIN_CHOICES)


def test_resume_relevance_is_field_metadata():
    cfg = TrainConfig(initializer=["ktn"])
    saved = cfg.to_dict()
    later = TrainConfig(initializer=("ktn",), steps=500, resume=True, checkpoint_every=10, logdir="logs",
                        out="../run/./d.safetensors")
    assert later.resume_changes(saved) == []  # more steps, checkpointing, logging and --out's spelling may change
    assert TrainConfig(initializer=["ktn"], learning_rate=2e-5, seed=3).resume_changes(saved) == ["seed",
                                                                                                 "learning_rate"]


@pytest.mark.parametrize("cls, command", [(TrainConfig, "train"), (EvalConfig, "eval")])
def test_every_field_has_its_flag(cls, command):
    options = {o for a in _sub(command)._actions for o in a.option_strings}
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        spelled = {flag_name(f.name), "--no-" + flag_name(f.name)[2:], "--delta"}
        assert options & spelled, f.name


def test_flags_build_the_config():
    a = build_parser().parse_args(["train", "--base", "b", "-o", "d.safetensors", "--steps", "7", "--no-augment",
                                   "--initializer", "ktn", "pll", "--learning-rate", "2e-5"])
    cfg = config_from(TrainConfig, a)
    assert (cfg.base, cfg.out, cfg.steps, cfg.augment, cfg.initializer, cfg.learning_rate) == (
        "b", "d.safetensors", 7, False, ["ktn", "pll"], 2e-5)
    assert cfg.batch_size == TrainConfig().batch_size
    a = build_parser().parse_args(["eval", "--base", "toy", "--dataset", "ds.json", "--out", "e", "--delta", "x",
                                   "y", "--delta", "z", "--n", "2", "--strip-tokens"])
    cfg = config_from(EvalConfig, a)
    assert (cfg.deltas, cfg.n, cfg.strip_tokens, cfg.device, cfg.kid_subset_size) == (
        ["x", "y", "z"], 2, True, None, EvalConfig().kid_subset_size)
    assert set(cfg.settings()) >= {"n", "steps", "guidance", "seed", "strip_tokens"}
    assert not set(cfg.settings()) & {"base", "out", "deltas", "device", "dataset"}


def test_resume_accepts_a_checkpoint_older_than_a_new_field_left_at_its_default():
    from customdiff.config import TrainConfig

    cfg = TrainConfig(out="d.safetensors")
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("token_lr_scale", "reg_prompt")}
    assert cfg.resume_changes(saved) == []
    cfg.token_lr_scale = 30.0
    assert cfg.resume_changes(saved) == ["token_lr_scale"]
