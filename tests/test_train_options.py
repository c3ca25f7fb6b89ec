"""Training options: v-prediction bases, concept files in the reference's shape, checkpointing, baselines."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_pipeline

from customdiff.base import load_pipeline
from customdiff.config import TrainConfig
from customdiff.data import read_concepts_file
from customdiff.delta import load_delta
from customdiff.errors import UserError
from customdiff.tokens import default_initializers
from customdiff.train import train


def test_v_prediction_base_trains(concept_dirs, tmp_path):
    base = str(make_tiny_pipeline(tmp_path / "v", seed=2, prediction_type="v_prediction"))
    from customdiff.data import ConceptSpec

    out = train(TrainConfig(base=base, out=str(tmp_path / "d.safetensors"), steps=2, batch_size=2,
                            gradient_checkpointing=True),
                [ConceptSpec(concept_dirs["a"], "photo of a <new1> dog", "photo of a dog", reg_dir=concept_dirs["reg"])],
                progress=False)
    d = load_delta(out)
    assert d.token_info[0]["class"] == "dog"
    assert all(torch.isfinite(v).all() for v in d.weights.values())


def test_reference_concept_list_shape(tiny_base, concept_dirs, tmp_path):
    # the reference's real_reg layout: class_data_dir is images.txt, class_prompt is caption.txt
    reg = tmp_path / "real_reg"
    reg.mkdir()
    imgs = [str(p) for p in sorted(Path(concept_dirs["reg"]).glob("*.png"))]
    (reg / "images.txt").write_text("\n".join(imgs) + "\n")
    (reg / "caption.txt").write_text("\n".join(f"a cat number {i}" for i in range(len(imgs))) + "\n")
    concepts = [
        {"instance_prompt": "photo of a <new1> cat", "class_prompt": str(reg / "caption.txt"),
         "instance_data_dir": concept_dirs["a"], "class_data_dir": str(reg / "images.txt")},
        {"instance_prompt": "photo of a <new2> dog", "class_prompt": "photo of a dog",
         "instance_data_dir": concept_dirs["b"], "class_data_dir": concept_dirs["reg"]},
    ]
    f = tmp_path / "concepts.json"
    f.write_text(json.dumps(concepts))
    specs = read_concepts_file(f)
    assert specs[0].reg_captions == str(reg / "caption.txt") and specs[0].class_prompt == "a cat number 0"
    logdir = tmp_path / "tb"
    out = train(TrainConfig(base=tiny_base, out=str(tmp_path / "j.safetensors"), steps=2, batch_size=4,
                            logdir=str(logdir)), specs, progress=False)
    d = load_delta(out)
    assert [t["token"] for t in d.token_info] == ["<new1>", "<new2>"]
    assert [t["class"] for t in d.token_info] == ["cat", "dog"]
    assert any(logdir.rglob("events.out.tfevents*"))


def test_textual_inversion_baseline_changes_only_tokens(tiny_base, concept_dirs, tmp_path):
    from customdiff.data import ConceptSpec

    out = train(TrainConfig(base=tiny_base, out=str(tmp_path / "ti.safetensors"), steps=2, batch_size=2,
                            train="tokens", learning_rate=1e-3),
                [ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"])],
                progress=False)
    d = load_delta(out)
    assert d.weights == {} and list(d.tokens) == ["<new1>"]


def test_initializer_fallback_and_errors(tiny_base):
    pipe = load_pipeline(tiny_base)
    assert default_initializers(pipe.tokenizer, 3) == ["ktn", "pll", "ucd"]
    assert default_initializers(pipe.tokenizer, 6)[4:] == ["a", "a"]  # fallback once rare words run out


def test_bad_concepts_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps([{"instance_prompt": "x <new1> cat"}]))
    with pytest.raises(UserError, match="lacks class_prompt, instance_data_dir"):
        read_concepts_file(f)
    f.write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        read_concepts_file(f)


def test_gradient_accumulation_scales_lr_and_trains(tiny_base, concept_dirs, tmp_path):
    from customdiff.data import ConceptSpec

    out = train(TrainConfig(base=tiny_base, out=str(tmp_path / "ga.safetensors"), steps=2, batch_size=2,
                            gradient_accumulation=2),
                [ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"])],
                progress=False)
    d = load_delta(out)
    assert d.config["effective_learning_rate"] == pytest.approx(1e-5 * 2 * 2)
    assert all(v.abs().sum() > 0 for v in d.weights.values())


def test_callers_specs_are_not_changed(tiny_base, concept_dirs, tmp_path, monkeypatch):
    """train resolves tokens and generated regularization folders into copies; the delta records the copies."""
    import copy

    from customdiff.data import ConceptSpec

    monkeypatch.setenv("CUSTOMDIFF_CACHE", str(tmp_path / "cache"))
    spec = ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat")
    given = copy.deepcopy(spec)
    out = train(TrainConfig(base=tiny_base, out=str(tmp_path / "d.safetensors"), steps=1, batch_size=2,
                            num_class_images=2, class_image_steps=2), [spec], progress=False)
    assert spec == given
    recorded = load_delta(out).config["concepts"][0]
    generated = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_dir()]
    assert recorded["tokens"] == ["<new1>"] and recorded["reg_dir"] in generated  # by name: see public_name


def test_token_lr_scale_multiplies_only_the_token_rows_step(tiny_base, concept_dirs, tmp_path):
    """AdamW's first step moves each coordinate by about its rate: the token row's by lr x scale, the K/V's by lr."""
    from customdiff.data import ConceptSpec

    pipe = load_pipeline(tiny_base)
    ktn = pipe.text_encoder.get_input_embeddings().weight.detach()[pipe.tokenizer.convert_tokens_to_ids("ktn</w>")]
    moved = {}
    for scale in (1.0, 10.0):
        out = train(TrainConfig(base=tiny_base, out=str(tmp_path / f"s{scale:g}.safetensors"), steps=1, batch_size=2,
                                learning_rate=1e-4, token_lr_scale=scale, initializer=["ktn"]),
                    [ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat",
                                 reg_dir=concept_dirs["reg"])], progress=False)
        d = load_delta(out)
        moved[scale] = ((d.tokens["<new1>"] - ktn).abs().max().item(), d.weights)
    lr = 1e-4 * 2
    assert moved[1.0][0] == pytest.approx(lr, rel=0.05) and moved[10.0][0] == pytest.approx(10 * lr, rel=0.05)
    for name, w in moved[1.0][1].items():  # the first step's weight update does not depend on the token's rate
        torch.testing.assert_close(moved[10.0][1][name], w)


def test_reg_prompt_class_trains_class_images_with_the_class_prompt(concept_dirs, tmp_path):
    from tiny import make_reg_dir

    from customdiff.data import ConceptSpec, read_reg_source

    reg = make_reg_dir(tmp_path / "reg", 3, "a red cat on grass")
    spec = ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=str(reg))
    assert {c for _, c in read_reg_source(spec)} == {"a red cat on grass"}
    pairs = read_reg_source(replace(spec, reg_use_captions=False))
    assert len(pairs) == 3 and {c for _, c in pairs} == {"photo of a cat"}
    with pytest.raises(UserError, match="reg-prompt"):
        TrainConfig(reg_prompt="bare").validate()


def test_reg_prompt_class_reaches_the_trained_concepts(tiny_base, concept_dirs, tmp_path):
    from customdiff.data import ConceptSpec

    out = train(TrainConfig(base=tiny_base, out=str(tmp_path / "d.safetensors"), steps=1, batch_size=2,
                            reg_prompt="class"),
                [ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"])],
                progress=False)
    d = load_delta(out)
    assert d.config["reg_prompt"] == "class" and d.config["concepts"][0]["reg_use_captions"] is False
