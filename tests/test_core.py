"""Training, the delta format and sampling on tiny pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from customdiff.base import load_pipeline
from customdiff.config import TrainConfig
from customdiff.data import ConceptSpec
from customdiff.delta import apply_deltas, check_base, load_delta, save_delta
from customdiff.errors import UserError
from customdiff.sample import generate
from customdiff.train import train


def _cfg(base: str, out, **kw) -> TrainConfig:
    kw.setdefault("steps", 4)
    kw.setdefault("batch_size", 4)
    return TrainConfig(base=base, out=str(out), **kw)


def _spec(d: dict, key: str = "a", token: str = "<new1>") -> ConceptSpec:
    return ConceptSpec(d[key], f"photo of a {token} cat", "photo of a cat", reg_dir=d["reg"])


@pytest.mark.parametrize("mode", ["crossattn_kv", "crossattn"])
def test_only_trained_set_and_new_rows_change(tiny_base, concept_dirs, tmp_path, mode):
    base = load_pipeline(tiny_base)
    pipe = load_pipeline(tiny_base)
    vocab = len(pipe.tokenizer)
    out = train(_cfg(tiny_base, tmp_path / "d.safetensors", train=mode, learning_rate=1e-3),
                [_spec(concept_dirs)], progress=False, pipe=pipe)
    frag = ("attn2.to_k.", "attn2.to_v.") if mode == "crossattn_kv" else ("attn2.",)
    base_unet = dict(base.unet.named_parameters())
    changed = []
    for n, p in pipe.unet.named_parameters():
        if any(f in n for f in frag):
            changed.append(not torch.equal(p, base_unet[n]))
        else:
            assert torch.equal(p, base_unet[n]), n  # bitwise frozen
    assert all(changed) and changed
    for n, p in pipe.vae.named_parameters():
        assert torch.equal(p, dict(base.vae.named_parameters())[n]), n
    base_te = dict(base.text_encoder.named_parameters())
    for n, p in pipe.text_encoder.named_parameters():
        if p.shape[0] == vocab + 1 and "token_embedding" in n:
            assert torch.equal(p[:vocab], base_te[n]), "old embedding rows must be bit-identical"
        else:
            assert torch.equal(p, base_te[n]), n
    delta = load_delta(out)
    init = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("ktn")]
    assert not torch.equal(delta.tokens["<new1>"], init)
    assert delta.trained == mode
    assert set(delta.param_names()) == {n for n in base_unet if any(f in n for f in frag)}


def test_three_joint_tokens_all_change(tiny_base, concept_dirs, tmp_path):
    specs = [_spec(concept_dirs, k, t) for k, t in (("a", "<new1>"), ("b", "<new2>"), ("c", "<new3>"))]
    base = load_pipeline(tiny_base)
    out = train(_cfg(tiny_base, tmp_path / "d.safetensors", steps=6, batch_size=6, learning_rate=1e-3), specs,
                progress=False)
    delta = load_delta(out)
    assert sorted(delta.tokens) == ["<new1>", "<new2>", "<new3>"]
    emb = base.text_encoder.get_input_embeddings().weight
    inits = {i["token"]: i["initializer"] for i in delta.token_info}
    assert len(set(inits.values())) == 3  # distinct rare initializers
    for tok, row in delta.tokens.items():
        assert not torch.equal(row, emb[base.tokenizer.convert_tokens_to_ids(inits[tok])]), tok


def test_device_cpu_trains_on_the_cpu_where_there_is_a_gpu(tiny_base, concept_dirs, tmp_path, monkeypatch):
    """The web app's --device cpu on a machine with a GPU: accelerate would have moved its pipeline to the GPU
    (the GPU is simulated: only whether accelerate is told to stay on the CPU is checked)."""
    import accelerate
    from tiny import reset_accelerate

    told: list[bool | None] = []
    real = accelerate.Accelerator

    def spy(*a, **k):
        told.append(k.get("cpu"))
        return real(*a, **k)

    reset_accelerate()
    monkeypatch.setattr(accelerate, "Accelerator", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pipe = load_pipeline(tiny_base)
    cfg = _cfg(tiny_base, tmp_path / "d.safetensors", steps=1)
    train(cfg, [_spec(concept_dirs)], progress=False, pipe=pipe, device="cpu")
    assert told == [True] and pipe.unet.device.type == "cpu"
    reset_accelerate()


def test_resume_of_a_finished_read_only_delta_does_nothing(tiny_base, concept_dirs, tmp_path, monkeypatch):
    """Before, the output check refused the read-only delta before the run could see it had nothing to do.
    (Root may write anything, so the OS's refusal is simulated for the delta alone.)"""
    import os

    from customdiff.errors import UserError

    out = tmp_path / "d.safetensors"
    cfg = _cfg(tiny_base, out, steps=2)
    train(cfg, [_spec(concept_dirs)], progress=False)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not (Path(p) == out and mode & os.W_OK) and real(p, mode))
    cfg.resume = True
    assert train(cfg, [_spec(concept_dirs)], progress=False) == out
    cfg.steps = 3  # another run: it would replace the delta, which it may not
    with pytest.raises(UserError, match="read-only"):
        train(cfg, [_spec(concept_dirs)], progress=False)


def test_a_checkpoint_keeps_the_fp16_loss_scale(tiny_base, tmp_path):
    """Resumed at its initial scale, an fp16 run could overflow (and skip) a step the uninterrupted run did not.
    (accelerate makes no scaler on the CPU; torch's own CPU scaler has the same state.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import customdiff.train as tr
    from customdiff.errors import UserError

    cfg = _cfg(tiny_base, tmp_path / "d.safetensors", steps=6)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    scaler.update(new_scale=128.0)  # as after overflows
    tr._save_checkpoint(tmp_path / "ck", 3, cfg, {"w": w}, opt, "", scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert tr._load_checkpoint(tmp_path / "ck", cfg, {"w": w}, opt, fresh) == 3
    assert fresh.get_scale() == 128.0
    file = tmp_path / "ck" / "latest.safetensors"
    with safe_open(str(file), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(file), {**meta, "scaler": '{"scale": 128.0}'})  # a field missing
    with pytest.raises(UserError, match="loss-scaler state is damaged"):
        tr._load_checkpoint(tmp_path / "ck", cfg, {"w": w}, opt, torch.amp.GradScaler("cpu"))
    tr._save_checkpoint(tmp_path / "ck", 3, cfg, {"w": w}, opt, "")  # bf16 or float32: no scaler
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    tr._load_checkpoint(tmp_path / "ck", cfg, {"w": w}, opt, fresh)
    assert fresh.get_scale() == 1024.0


def test_resume_equals_uninterrupted(tiny_base, concept_dirs, tmp_path, monkeypatch):
    import customdiff.train as tr

    full = train(_cfg(tiny_base, tmp_path / "full.safetensors", steps=6, learning_rate=1e-3),
                 [_spec(concept_dirs)], progress=False)
    original = tr._save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(*a, **k):
        original(*a, **k)
        raise Killed

    monkeypatch.setattr(tr, "_save_checkpoint", save_then_die)
    out = tmp_path / "resumed.safetensors"
    cfg = _cfg(tiny_base, out, steps=6, learning_rate=1e-3, checkpoint_every=3)
    with pytest.raises(Killed):
        train(cfg, [_spec(concept_dirs)], progress=False)
    assert not out.exists() and tr.checkpoint_dir(out).is_dir()
    monkeypatch.setattr(tr, "_save_checkpoint", original)
    cfg.resume = True
    cfg.steps = 2  # fewer steps than the checkpoint holds: the delta would say 2 and hold 3
    with monkeypatch.context() as m, pytest.raises(UserError, match="is at step 3, past it; give --steps 3 or more"):
        m.setattr(tr, "load_pipeline", lambda *a, **k: pytest.fail("the base loaded before the step was checked"))
        train(cfg, [_spec(concept_dirs)], progress=False)
    assert not out.exists() and tr.checkpoint_dir(out).is_dir()
    cfg.steps = 6
    train(cfg, [_spec(concept_dirs)], progress=False)
    a, b = load_delta(full), load_delta(out)
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        torch.testing.assert_close(a.weights[k], b.weights[k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.tokens["<new1>"], b.tokens["<new1>"], rtol=1e-5, atol=1e-7)
    assert not tr.checkpoint_dir(out).exists()
    # --resume once the run has finished: nothing to do, the delta stays as it is; other settings train again
    before = out.read_bytes()
    monkeypatch.setattr(tr, "load_pipeline", lambda *a, **k: pytest.fail("the finished run was trained again"))
    assert train(cfg, [_spec(concept_dirs)], progress=False) == out and out.read_bytes() == before
    cfg.steps = 7
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        train(cfg, [_spec(concept_dirs)], progress=False)


def test_a_delta_names_no_folder_of_the_machine_that_made_it(trained_delta, tiny_base, concept_dirs):
    from customdiff.delta import read_metadata

    meta = read_metadata(trained_delta)
    folders = {str(Path(p).parent) for p in (tiny_base, trained_delta, *concept_dirs.values())}
    assert not [(k, f) for k, v in meta.items() for f in folders if f in v]
    config = json.loads(meta["config"])
    assert config["concepts"][0]["instance_dir"] == Path(concept_dirs["a"]).name
    assert config["concepts"][0]["instance_prompt"] == "photo of a <new1> cat"  # what merge reads
    assert json.loads(meta["base"])["name"] == Path(tiny_base).name and config["out"] == Path(trained_delta).name


@pytest.fixture(scope="module")
def trained_delta(tiny_base, concept_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("delta") / "d.safetensors"
    return str(train(_cfg(tiny_base, out, steps=4, learning_rate=5e-3), [_spec(concept_dirs)], progress=False))


def _images(pipe, prompt="photo of a <new1> cat"):
    return np.stack([np.asarray(im) for im in generate(pipe, prompt, n=2, seed=3, steps=3, guidance=3.0)])


def test_delta_roundtrip_apply_and_remove_exact(tiny_base, trained_delta, tmp_path):
    d = load_delta(trained_delta)
    save_delta(d, tmp_path / "copy.safetensors")
    d2 = load_delta(tmp_path / "copy.safetensors")
    assert d2.weights.keys() == d.weights.keys() and d2.token_info == d.token_info and d2.base == d.base
    for k in d.weights:
        assert torch.equal(d.weights[k], d2.weights[k])
    pipe = load_pipeline(tiny_base)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    emb_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    base_img = _images(pipe, "photo of a cat")
    handle = apply_deltas(pipe, [d2])
    for n in d.param_names():
        torch.testing.assert_close(dict(pipe.unet.named_parameters())[n], before[n] + d.change(n), rtol=0, atol=1e-7)
    handle.remove()
    for n, p in pipe.unet.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, emb_before)
    assert "<new1>" not in pipe.tokenizer.get_vocab()
    assert np.array_equal(_images(pipe, "photo of a cat"), base_img)


def test_sampling_with_delta_equals_weights_set_by_hand(tiny_base, trained_delta):
    d = load_delta(trained_delta)
    pipe = load_pipeline(tiny_base)
    base_img = _images(pipe)
    apply_deltas(pipe, [d])
    with_delta = _images(pipe)
    assert not np.array_equal(with_delta, base_img)

    manual = load_pipeline(tiny_base)
    params = dict(manual.unet.named_parameters())
    with torch.no_grad():
        for n in d.param_names():
            params[n].add_(d.weights[n])
        manual.tokenizer.add_tokens(["<new1>"])
        manual.text_encoder.resize_token_embeddings(len(manual.tokenizer), mean_resizing=False)
        manual.text_encoder.get_input_embeddings().weight[manual.tokenizer.convert_tokens_to_ids("<new1>")] = \
            d.tokens["<new1>"]
    assert np.array_equal(_images(manual), with_delta)


def test_delta_metadata_is_self_describing(trained_delta):
    from safetensors import safe_open

    with safe_open(trained_delta, framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["format"] == "customdiff.delta" and meta["format_version"] == "1" and meta["storage"] == "full"
    assert "tokens.<new1>" in keys
    assert all(k.startswith(("unet.", "tokens.")) for k in keys)
    assert any(k.endswith("attn2.to_k.weight") for k in keys)
    import json

    tokens = json.loads(meta["tokens"])
    assert tokens == [{"token": "<new1>", "initializer": "ktn", "class": "cat"}]
    assert json.loads(meta["config"])["train"] == "crossattn_kv"
    assert "sha256" in json.loads(meta["base"])["fingerprint"]


def test_a_finished_run_is_recognised_by_what_sets_its_result(tiny_base, concept_dirs, tmp_path):
    """The digest a delta records for `--resume`: the settings that change the result, the regularization images
    and the base count; where the delta goes and how fast it is made do not."""
    import os
    import shutil
    from dataclasses import replace

    from customdiff.train import _run_digest

    reg = tmp_path / "reg"
    shutil.copytree(concept_dirs["reg"], reg)
    spec = ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=str(reg))
    cfg = _cfg(tiny_base, tmp_path / "a.safetensors")
    first = _run_digest(cfg, [spec], "photos")
    assert _run_digest(replace(cfg, out=str(tmp_path / "b.safetensors"), cuda_graphs="off", prefetch=0,
                               checkpoint_every=5, log_every=1), [spec], "photos") == first
    assert _run_digest(replace(cfg, steps=5), [spec], "photos") != first
    assert _run_digest(cfg, [spec], "other photos") != first
    image = next(p for p in sorted(reg.iterdir()) if p.suffix == ".png")
    os.utime(image, ns=(0, 0))  # a regularization image replaced
    assert _run_digest(cfg, [spec], "photos") != first


def test_a_tensor_taken_out_of_a_delta_leaves_the_base_check_to_the_rest(trained_delta, tiny_base, other_base):
    """A delta with one change removed by hand still records that tensor's base norm in its fingerprint: the check
    of its base looks only at what it changes (it said the weights of the removed tensor "differ")."""
    from dataclasses import replace

    d = load_delta(trained_delta)
    gone = d.param_names()[0]
    fewer = replace(d, weights={k: v for k, v in d.weights.items() if k != gone})
    check_base(fewer, load_pipeline(tiny_base).unet, "fewer.safetensors")
    with pytest.raises(UserError, match="made for another base"):  # another base is still told apart
        check_base(fewer, load_pipeline(other_base).unet, "fewer.safetensors")
