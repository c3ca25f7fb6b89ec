"""Closed-form merge (pure tensors and deltas), compression, and their CLI commands on tiny pipelines."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from customdiff.base import load_pipeline
from customdiff.cli import main
from customdiff.compress import choose_rank, compress_delta
from customdiff.config import TrainConfig
from customdiff.data import ConceptSpec
from customdiff.delta import apply_deltas, load_delta, save_delta
from customdiff.errors import UserError
from customdiff.merge import merge, merge_deltas, prepare, read_captions, text_features
from customdiff.train import train

# ---------------------------------------------------------------- pure tensor merge


def _problem(d=32, out=24, concepts=2, rows=5, k=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    Ws = [W0 + 0.3 * torch.randn(out, d, generator=g, dtype=torch.float64) for _ in range(concepts)]
    Cs = [torch.randn(rows, d, generator=g, dtype=torch.float64) for _ in range(concepts)]
    C_reg = torch.randn(k, d, generator=g, dtype=torch.float64)
    return W0, Ws, Cs, C_reg


def _constraint_gap(W, Ws, Cs):
    V = torch.cat([w @ c.T for w, c in zip(Ws, Cs, strict=True)], 1)
    return float((W @ torch.cat(Cs).T - V).norm() / V.norm())


def _reg_obj(W, W0, C_reg):
    return float(((W - W0) @ C_reg.T).norm())


@pytest.mark.parametrize("d,out,k", [(32, 24, 400), (64, 16, 3000), (48, 96, 48)])
def test_constraints_hold_and_match_textbook_formula(d, out, k):
    W0, Ws, Cs, C_reg = _problem(d=d, out=out, k=k)
    W, res = merge(W0, Ws, Cs, C_reg, ridge=0.0)
    assert res["constraint"] < 1e-6 and _constraint_gap(W, Ws, Cs) < 1e-6
    # the paper's formula with explicit inverses (fine for this well-conditioned problem)
    C, A = torch.cat(Cs), C_reg.T @ C_reg
    V = torch.cat([w @ c.T for w, c in zip(Ws, Cs, strict=True)], 1)
    Ai = torch.linalg.inv(A)
    ref = W0 + (V - W0 @ C.T) @ torch.linalg.inv(C @ Ai @ C.T) @ C @ Ai
    assert torch.allclose(W, ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))
    assert abs(res["reg_change"] - _reg_obj(W, W0, C_reg) / float((W0 @ C_reg.T).norm())) < 1e-6


def test_one_concept_with_spanning_prompts_returns_its_weights():
    W0, Ws, _, C_reg = _problem(concepts=1)
    C = torch.randn(32, 32, dtype=torch.float64)  # constraint rows spanning the whole feature space
    W, res = merge(W0, Ws, [C], C_reg)
    assert torch.allclose(W, Ws[0], atol=1e-9 * float(Ws[0].abs().max()))
    # and with fewer prompts it still reproduces the concept's outputs on its own prompts
    W, res = merge(W0, Ws, [C[:6]], C_reg)
    assert torch.allclose(W @ C[:6].T, Ws[0] @ C[:6].T, atol=1e-9)
    assert res["constraint"] < 1e-12


def test_beats_averaging_and_is_the_cheapest_feasible_weight():
    W0, Ws, Cs, C_reg = _problem()
    W, res = merge(W0, Ws, Cs, C_reg)
    avg = W0 + sum(w - W0 for w in Ws) / len(Ws)
    assert _constraint_gap(W, Ws, Cs) < 1e-9
    assert _constraint_gap(avg, Ws, Cs) > 0.05  # averaging loses both concepts' outputs
    assert res["average_constraint_of_change"] > 0.3
    # every other weight meeting the constraints changes the generic captions more
    C = torch.cat(Cs)
    V = torch.cat([w @ c.T for w, c in zip(Ws, Cs, strict=True)], 1)
    projected = avg + (V - avg @ C.T) @ torch.linalg.solve(C @ C.T, C)  # averaging, then forced onto the constraints
    assert _constraint_gap(projected, Ws, Cs) < 1e-9
    assert _reg_obj(W, W0, C_reg) < _reg_obj(projected, W0, C_reg)
    null = torch.eye(32, dtype=torch.float64) - C.T @ torch.linalg.solve(C @ C.T, C)  # keeps W C^T fixed
    for seed in range(5):
        other = W + 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(seed), dtype=W.dtype) @ null
        assert _constraint_gap(other, Ws, Cs) < 1e-9
        assert _reg_obj(W, W0, C_reg) < _reg_obj(other, W0, C_reg)


@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_stable_when_reg_features_are_singular(ridge):
    W0, Ws, Cs, _ = _problem(d=64)
    C_reg = torch.randn(10, 64, dtype=torch.float64)  # 10 captions, width 64: C_reg^T C_reg has rank 10
    W, res = merge(W0, Ws, Cs, C_reg, ridge=ridge)
    assert torch.isfinite(W).all()
    assert res["constraint"] < 1e-6


def test_dependent_constraints_fall_back_to_least_squares():
    W0, Ws, Cs, C_reg = _problem()
    Cs[1] = torch.cat([Cs[1], Cs[0][:1] + 1e-13 * torch.randn(1, 32, dtype=torch.float64)])  # nearly shared row
    solver = prepare(Cs, C_reg)
    assert not solver.exact
    W, _ = merge(W0, Ws, Cs, C_reg)
    assert torch.isfinite(W).all() and float(W.abs().max()) < 1e3 * float(Ws[0].abs().max())
    # exact duplicates are removed (the first concept keeps the row), so the rest still holds exactly
    Cs[1] = torch.cat([Cs[1][:-1], Cs[0][:1]])
    solver = prepare(Cs, C_reg)
    assert solver.exact and solver.C.shape[0] == 10


def test_float32_inputs_and_other_widths():
    W0, Ws, Cs, C_reg = _problem(d=20, out=40)
    W, res = merge(W0.float(), [w.float() for w in Ws], [c.float() for c in Cs], C_reg.float())
    assert W.dtype == torch.float64 and res["constraint"] < 1e-6


# ---------------------------------------------------------------- compression (pure)


def test_energy_and_rank_selection():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative: 0.4, 0.7, 0.9, 1.0
    assert [choose_rank(s, energy=e) for e in (0.3, 0.4, 0.6, 0.7, 0.71, 0.95, 1.0)] == [1, 1, 2, 2, 3, 4, 4]
    assert choose_rank(s, rank=3) == 3 and choose_rank(s, rank=99) == 4


# ---------------------------------------------------------------- deltas on tiny pipelines


def _train(base, out, concept_dir, reg_dir, token="<new1>", cls="cat", **kw):
    cfg = TrainConfig(base=base, out=str(out), steps=kw.pop("steps", 4), batch_size=4,
                      learning_rate=kw.pop("learning_rate", 5e-3), **kw)
    return load_delta(train(cfg, [ConceptSpec(concept_dir, f"photo of a {token} {cls}", f"photo of a {cls}",
                                              reg_dir=reg_dir)], progress=False))


@pytest.fixture(scope="module")
def pair(tiny_base, concept_dirs, tmp_path_factory):
    """Two separately trained deltas that both call their token <new1> (a cat and a dog)."""
    root = tmp_path_factory.mktemp("pair")
    a = _train(tiny_base, root / "a.safetensors", concept_dirs["a"], concept_dirs["reg"], cls="cat")
    b = _train(tiny_base, root / "b.safetensors", concept_dirs["b"], concept_dirs["reg"], cls="dog")
    return {"a": a, "b": b, "paths": [str(root / "a.safetensors"), str(root / "b.safetensors")]}


@pytest.fixture(scope="module")
def merged(pair, tiny_base):
    pipe = load_pipeline(tiny_base)
    return merge_deltas([pair["a"], pair["b"]], pipe, read_captions(), sources=pair["paths"], base_name=tiny_base)


def test_default_captions_ship_with_the_package():
    caps = read_captions()
    assert len(caps) >= 400 and len(set(caps)) == len(caps)


def test_merged_pair_keeps_each_concepts_outputs(pair, merged, tiny_base):
    assert sorted(merged.tokens) == ["<new1>", "<new2>"]  # the clash was renamed
    assert torch.equal(merged.tokens["<new1>"], pair["a"].tokens["<new1>"])
    assert torch.equal(merged.tokens["<new2>"], pair["b"].tokens["<new1>"])
    assert {i["token"]: i["class"] for i in merged.token_info} == {"<new1>": "cat", "<new2>": "dog"}
    sources = json.loads(merged.extra["merge_sources"])
    assert sources[1]["tokens"] == {"<new1>": "<new2>"}
    residuals = json.loads(merged.extra["merge_residuals"])
    assert set(residuals) == set(pair["a"].param_names()) and len(residuals) == 8
    assert max(r["constraint"] for r in residuals.values()) < 1e-6

    # independent check: the merged K/V give each concept's own outputs on its prompts (renamed token for b)
    pipe = load_pipeline(tiny_base)
    params = dict(pipe.unet.named_parameters())
    for delta, tok, cls in ((pair["a"], "<new1>", "cat"), (pair["b"], "<new2>", "dog")):
        token_only = type(delta)(weights={}, tokens={tok: next(iter(delta.tokens.values()))}, trained="", base={},
                                 token_info=[])
        applied = apply_deltas(pipe, [token_only])
        ids = pipe.tokenizer(f"photo of a {tok} {cls}", padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0][0].double()  # (T, d), as the pipeline computes it
        start = ids[0].tolist().index(pipe.tokenizer.convert_tokens_to_ids(tok))
        feats = hidden[start:start + 3]  # the token, the class word, end-of-text
        assert torch.allclose(feats, text_features(pipe, [("photo of a", f"{tok} {cls}")])[0][1], atol=1e-5)
        applied.remove()
        for name in residuals:
            W0 = params[name].detach().double()
            want = (W0 + delta.change(name).double()) @ feats.T
            got = (W0 + merged.change(name).double()) @ feats.T
            assert float((got - want).norm() / want.norm()) < 1e-5, name  # stored in float32


def test_merged_delta_samples_both_tokens(merged, tiny_base, tmp_path):
    save_delta(merged, tmp_path / "m.safetensors")
    loaded = load_delta(tmp_path / "m.safetensors")
    assert json.loads(loaded.extra["merge_residuals"]) == json.loads(merged.extra["merge_residuals"])
    pipe = load_pipeline(tiny_base)
    prompt = "photo of a <new1> cat and <new2> dog"
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np")
    base_img = pipe(prompt, generator=torch.Generator("cpu").manual_seed(0), **kw).images
    applied = apply_deltas(pipe, [loaded])
    ids = pipe.tokenizer(prompt).input_ids
    assert pipe.tokenizer.convert_tokens_to_ids("<new1>") in ids
    assert pipe.tokenizer.convert_tokens_to_ids("<new2>") in ids
    img = pipe(prompt, generator=torch.Generator("cpu").manual_seed(0), **kw).images
    applied.remove()
    assert np.abs(img - base_img).max() > 1e-3


def test_different_bases_are_refused(pair, tiny_base, other_base, concept_dirs, tmp_path):
    other = _train(other_base, tmp_path / "o.safetensors", concept_dirs["c"], concept_dirs["reg"], steps=2)
    with pytest.raises(UserError, match="different bases"):
        merge_deltas([pair["a"], other], load_pipeline(tiny_base), ["a cat"], sources=["a", "o"])


def test_crossattn_matrices_other_than_kv_are_averaged(tiny_base, concept_dirs, tmp_path):
    a = _train(tiny_base, tmp_path / "a.safetensors", concept_dirs["a"], concept_dirs["reg"], train="crossattn",
               steps=2)
    b = _train(tiny_base, tmp_path / "b.safetensors", concept_dirs["b"], concept_dirs["reg"], train="crossattn",
               steps=2, cls="dog", token="<new2>")
    m = merge_deltas([a, b], load_pipeline(tiny_base), read_captions()[:50])
    assert m.trained == "crossattn" and sorted(m.tokens) == ["<new1>", "<new2>"]
    averaged = json.loads(m.extra["merge_averaged"])
    assert averaged and all("to_q" in n or "to_out" in n for n in averaged)
    for n in averaged:
        assert torch.allclose(m.change(n), (a.change(n) + b.change(n)) / 2, atol=1e-7)
    assert all(n.endswith(("to_k.weight", "to_v.weight")) for n in json.loads(m.extra["merge_residuals"]))


# ---------------------------------------------------------------- compression of deltas


def test_compress_round_trip_and_sampling(pair, tiny_base, tmp_path):
    d = pair["a"]
    full = compress_delta(d, rank=10_000)  # full rank: the same change
    for n in d.param_names():
        assert torch.allclose(full.change(n), d.change(n), atol=1e-6)
        assert full.weights[n + ".up"].shape[1] == min(d.change(n).shape)
    small = compress_delta(d, energy=0.6)
    save_delta(small, tmp_path / "s.safetensors")
    back = load_delta(tmp_path / "s.safetensors")
    assert back.storage == "lowrank" and torch.equal(back.tokens["<new1>"], d.tokens["<new1>"])
    for n in d.param_names():
        s = torch.linalg.svdvals(d.change(n).double())
        r = back.weights[n + ".up"].shape[1]
        assert r == choose_rank(s, energy=0.6)
        assert float(s[:r].sum() / s.sum()) >= 0.6 > float(s[:r - 1].sum() / s.sum())
        assert torch.allclose(back.change(n), small.change(n))
    r1 = compress_delta(d, rank=1)
    assert all(r1.weights[n + ".down"].shape[0] == 1 for n in d.param_names())
    # a full-rank lowrank delta samples like the original
    pipe = load_pipeline(tiny_base)
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    imgs = []
    for delta in (d, full):
        applied = apply_deltas(pipe, [delta])
        imgs.append(pipe("photo of a <new1> cat", generator=torch.Generator("cpu").manual_seed(0), **kw).images)
        applied.remove()
    assert np.abs(imgs[0] - imgs[1]).max() < 1e-4


def test_compressing_a_merged_delta_by_energy_warns(pair, merged, caplog):
    """A merged delta's change is one dominant direction, so an energy keeps rank 1-2 of it (docs/MERGE.md); by
    rank, or a trained delta by energy, nothing to say."""
    with caplog.at_level(logging.WARNING):
        compress_delta(pair["a"], energy=0.6)
        compress_delta(merged, rank=2)
        assert "a merged delta" not in caplog.text
        compress_delta(merged, energy=0.6)
    assert "a merged delta: its change is dominated by one direction, so --energy 0.6 kept ranks" in caplog.text


def test_compress_rejects_bad_arguments(pair):
    for kw in ({}, {"energy": 0.5, "rank": 2}, {"energy": 1.5}, {"rank": 0}):
        with pytest.raises(UserError):
            compress_delta(pair["a"], **kw)


# ---------------------------------------------------------------- CLI




def test_cli_merge_and_compress(pair, tiny_base, tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("a red cat on grass\n\n# comment\nthe blue dog\nphoto of a green car\n")
    out = tmp_path / "m.safetensors"
    assert main(["merge", *pair["paths"], "--base", tiny_base, "--reg-captions", str(caps), "-o", str(out)]) == 0
    m = load_delta(out)
    assert m.config["merge"]["reg_captions"] == 3 and sorted(m.tokens) == ["<new1>", "<new2>"]
    small = tmp_path / "c.safetensors"
    assert main(["compress", str(out), "--rank", "2", "-o", str(small)]) == 0
    assert "->" in capsys.readouterr().out and load_delta(small).storage == "lowrank"
    # bad input: one delta, a missing captions file, wrong suffix; nothing is written
    bad = tmp_path / "bad.safetensors"
    assert main(["merge", pair["paths"][0], "--base", tiny_base, "-o", str(bad)]) == 2
    assert main(["merge", *pair["paths"], "--base", tiny_base, "--reg-captions", str(tmp_path / "nope"),
                 "-o", str(bad)]) == 2
    assert main(["compress", str(out), "--energy", "2", "-o", str(bad)]) == 2
    assert main(["compress", str(out), "--rank", "2", "-o", str(tmp_path / "x.bin")]) == 2
    assert not bad.exists() and not (tmp_path / "x.bin").exists()
    with pytest.raises(SystemExit) as e:
        main(["compress", str(out), "-o", str(bad)])  # neither --energy nor --rank
    assert e.value.code == 2


def test_merge_flags_checked_before_the_base_loads(pair, tiny_base, tmp_path, capsys, monkeypatch):
    """--pad-weight, --ridge and the output are refused (exit 2, one line) without loading the base."""
    import customdiff.base

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded before the flags were checked")

    monkeypatch.setattr(customdiff.base, "load_pipeline", no_load)
    out = tmp_path / "m.safetensors"
    for extra, needle in ((["--pad-weight", "-1"], "--pad-weight -1.0: must be at least 0"),
                          (["--pad-weight", "inf"], "--pad-weight inf: must be a finite number"),
                          (["--ridge", "-0.5"], "--ridge -0.5"),
                          (["-o", str(tmp_path / "m.bin")], "must end in .safetensors")):
        argv = ["merge", *pair["paths"], "--base", tiny_base, *extra]
        code = main(argv if "-o" in extra else [*argv, "--out", str(out)])
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists() and not (tmp_path / "m.bin").exists()


def test_padding_weight_keeps_constraints_and_pulls_padding_rows(pair, merged, tiny_base):
    """--pad-weight: constraints still exact; each concept's padding rows move towards its own outputs."""
    from customdiff.merge import padding_features

    pipe = load_pipeline(tiny_base)
    padded = merge_deltas([pair["a"], pair["b"]], pipe, read_captions(), sources=pair["paths"], pad_weight=1.0)
    residuals = json.loads(padded.extra["merge_residuals"])
    assert max(r["constraint"] for r in residuals.values()) < 1e-6
    assert padded.config["merge"]["pad_weight"] == 1.0
    params = dict(pipe.unet.named_parameters())
    errors = {0.0: 0.0, 1.0: 0.0}
    for delta, tok, cls in ((pair["a"], "<new1>", "cat"), (pair["b"], "<new2>", "dog")):
        token_only = type(delta)(weights={}, tokens={tok: next(iter(delta.tokens.values()))}, trained="", base={},
                                 token_info=[])
        applied = apply_deltas(pipe, [token_only])
        pads = padding_features(pipe, [("photo of a", f"{tok} {cls}")])  # (p, d)
        applied.remove()
        assert pads.shape[0] > 0
        for name in residuals:
            W0 = params[name].detach().double()
            want = (W0 + delta.change(name).double()) @ pads.T
            for w, m in ((0.0, merged), (1.0, padded)):
                errors[w] += float(((W0 + m.change(name).double()) @ pads.T - want).norm() / want.norm())
    assert errors[1.0] < 0.5 * errors[0.0], errors
