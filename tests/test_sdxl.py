"""Stable Diffusion XL end to end on a tiny SDXL folder: loading, sampling against stock diffusers, training,
merge, compression, export and import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from customdiff.base import base_facts, base_vocabulary, load_pipeline
from customdiff.cli import main
from customdiff.conditioning import pipeline_vocabulary
from customdiff.delta import Delta, apply_deltas, base_fingerprint, load_delta, save_delta
from customdiff.errors import UserError

PROMPT = "photo of a <new1> cat"
KV = ("attn2.to_k.weight", "attn2.to_v.weight")


def _stock(base):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _by_hand(pipe, weights: dict[str, torch.Tensor], rows: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Set fine-tuned weights and add each token to both tokenizers/encoders, as a diffusers user would."""
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    for tok, (r1, r2) in rows.items():
        for tokenizer, enc, row in ((pipe.tokenizer, pipe.text_encoder, r1), (pipe.tokenizer_2, pipe.text_encoder_2, r2)):
            tokenizer.add_tokens([tok])
            enc.resize_token_embeddings(len(tokenizer))
            enc.get_input_embeddings().weight.data[tokenizer.convert_tokens_to_ids(tok)] = row
    return pipe


def _stock_images(pipe, prompt=PROMPT, n=2, steps=3, guidance=3.0, seed=0, size=32):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed)).images


def crafted_delta(base: str, seed: int = 0, token: str = "<new1>", scale: float = 0.05) -> Delta:
    """A delta with random K/V changes (float16, as SDXL stores them) and random rows for both encoders."""
    pipe = load_pipeline(base)
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in pipe.unet.named_parameters() if n.endswith(KV)]
    params = dict(pipe.unet.named_parameters())
    weights = {n: (scale * torch.randn(params[n].shape, generator=g)).half() for n in names}
    return Delta(weights=weights, tokens={token: torch.randn(32, generator=g)},
                 tokens_2={token: torch.randn(48, generator=g)}, trained="crossattn_kv",
                 base={"name": base, "fingerprint": base_fingerprint(pipe.unet, names),
                       "pipeline": "StableDiffusionXLPipeline"},
                 token_info=[{"token": token, "initializer": "ktn", "class": "cat"}],
                 config={"concepts": [{"instance_prompt": f"photo of a {token} cat"}]})


@pytest.fixture(scope="module")
def xl_delta(tiny_xl_base, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("xld") / "crafted.safetensors"
    save_delta(crafted_delta(tiny_xl_base), path)
    return str(path)


def test_sdxl_folder_loads_as_sdxl(tiny_xl_base):
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(tiny_xl_base)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert base_facts(tiny_xl_base).pipeline == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
    # the door's vocabulary (tokenizers only, no model) is the loaded pipeline's: both of SDXL's tokenizers
    assert base_vocabulary(tiny_xl_base) == pipeline_vocabulary(pipe)
    assert base_vocabulary("owner/not-here") is None  # a hub id: checked once its pipeline is loaded


def test_a_tokenizer_without_its_files_is_refused_not_read_as_empty(tiny_base, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    for f in (base / "tokenizer").iterdir():
        if f.name not in ("tokenizer_config.json", "special_tokens_map.json"):
            f.unlink()
    for read in (base_vocabulary, load_pipeline):
        with pytest.raises(UserError, match="tokenizer"):
            read(str(base))


def test_delta_format_sdxl_fields(xl_delta, tiny_xl_base):
    from safetensors import safe_open

    with safe_open(xl_delta, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["dtype"] == "float16" and json.loads(meta["base"])["pipeline"] == "StableDiffusionXLPipeline"
    assert {"tokens.<new1>", "tokens_2.<new1>"} <= keys
    d = load_delta(xl_delta)
    assert d.tokens["<new1>"].shape == (32,) and d.tokens_2["<new1>"].shape == (48,)
    assert all(t.dtype == torch.float16 for t in d.weights.values())


def test_sample_equals_stock_sdxl_with_delta_set_by_hand(tiny_xl_base, xl_delta, tmp_path):
    out = tmp_path / "imgs"
    args = ["sample", "--base", tiny_xl_base, "--delta", xl_delta, "--prompt", PROMPT, "--n", "2", "--steps", "3",
            "--guidance", "3", "--resolution", "32", "--seed", "0", "--out", str(out)]
    assert main(args) == 0
    ours = [np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(2)]

    d = load_delta(xl_delta)
    pipe = _stock(tiny_xl_base)
    base_imgs = _stock_images(pipe)
    params = dict(pipe.unet.named_parameters())
    full = {n: params[n].detach() + d.change(n).float() for n in d.param_names()}
    theirs = _stock_images(_by_hand(pipe, full, {"<new1>": (d.tokens["<new1>"], d.tokens_2["<new1>"])}))
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(ours, base_imgs, strict=True))


def test_apply_is_reversible_and_pools_like_stock(tiny_xl_base, xl_delta):
    pipe = load_pipeline(tiny_xl_base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    applied = apply_deltas(pipe, [load_delta(xl_delta)])
    # the pooling quirk, as in stock diffusers: text_encoder_2 (eos_token_id 2) pools at argmax(input_ids),
    # the added token's position, not at end-of-text
    ids = pipe.tokenizer_2([PROMPT], padding="max_length", max_length=16, return_tensors="pt").input_ids
    out = pipe.text_encoder_2(ids, output_hidden_states=True)
    pos = int((ids[0] == pipe.tokenizer_2.convert_tokens_to_ids("<new1>")).nonzero()[0])
    at_token = pipe.text_encoder_2.text_projection(out.last_hidden_state[0, pos])
    assert torch.allclose(out.text_embeds[0], at_token, atol=1e-6)
    applied.remove()
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
    assert pipe.text_encoder_2.get_input_embeddings().num_embeddings == sizes[1]
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_sd_and_sdxl_deltas_refuse_the_other_base(tiny_base, tiny_xl_base, xl_delta):
    with pytest.raises(UserError, match="another base|XL"):
        apply_deltas(load_pipeline(tiny_base), [load_delta(xl_delta)])
    one_row = load_delta(xl_delta)
    one_row.tokens_2 = {}
    with pytest.raises(UserError, match="both"):
        apply_deltas(load_pipeline(tiny_xl_base), [one_row])


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained_xl(tiny_xl_base, concept_dirs, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("xlt") / "trained.safetensors"
    assert main(["train", "--base", tiny_xl_base, "--concept", concept_dirs["a"], "--instance-prompt", PROMPT,
                 "--class-prompt", "photo of a cat", "--reg-dir", concept_dirs["reg"], "--steps", "3",
                 "--batch-size", "4", "--learning-rate", "1e-2", "-o", str(out)]) == 0
    return str(out)


def test_sdxl_training_trains_both_rows_and_kv_only(tiny_xl_base, trained_xl):
    d = load_delta(trained_xl)
    pipe = load_pipeline(tiny_xl_base)
    names = sorted(n for n, _ in pipe.unet.named_parameters() if n.endswith(KV))
    assert d.param_names() == names and len(names) == 16  # 8 attn2 layers in the tiny SDXL UNet
    assert all(t.dtype == torch.float16 and float(t.abs().max()) > 0 for t in d.weights.values())
    assert d.base["pipeline"] == "StableDiffusionXLPipeline"
    for tokenizer, enc, rows in ((pipe.tokenizer, pipe.text_encoder, d.tokens),
                                 (pipe.tokenizer_2, pipe.text_encoder_2, d.tokens_2)):
        init = enc.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("ktn")]
        assert rows["<new1>"].shape == init.shape
        assert not torch.allclose(rows["<new1>"], init)  # trained, starting from ktn in its own encoder
    # the trained delta samples like any other
    applied = apply_deltas(pipe, [d])
    applied.remove()


def test_sdxl_resume_after_a_stop_equals_uninterrupted(tiny_xl_base, concept_dirs, tmp_path):
    from customdiff.config import TrainConfig
    from customdiff.data import ConceptSpec
    from customdiff.train import TrainingStopped, train

    spec = [ConceptSpec(concept_dirs["a"], PROMPT, "photo of a cat", reg_dir=concept_dirs["reg"])]

    def cfg(out, **kw):
        return TrainConfig(base=tiny_xl_base, out=str(out), steps=3, batch_size=2, learning_rate=1e-3,
                           delta_dtype="float32", **kw)

    full = load_delta(train(cfg(tmp_path / "full.safetensors"), spec, progress=False))
    with pytest.raises(TrainingStopped):
        train(cfg(tmp_path / "r.safetensors"), spec, progress=False, callback=lambda step, loss: step == 2)
    resumed = load_delta(train(cfg(tmp_path / "r.safetensors", resume=True), spec, progress=False))
    for k in full.weights:
        torch.testing.assert_close(full.weights[k], resumed.weights[k], rtol=1e-5, atol=1e-7)
    for rows in ("tokens", "tokens_2"):  # both token rows are checkpointed
        torch.testing.assert_close(full.rows(rows)["<new1>"], resumed.rows(rows)["<new1>"], rtol=1e-5, atol=1e-7)


def test_sdxl_loss_reads_time_ids_pooled_and_both_encoders(tiny_xl_base):
    from customdiff.conditioning import tokenize
    from customdiff.model import CustomDiffusion

    pipe = load_pipeline(tiny_xl_base)
    model = CustomDiffusion(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, None, pipe.text_encoder_2)
    ids = tokenize([pipe.tokenizer, pipe.tokenizer_2], ["photo of a cat", "a red dog"])
    px, mask = torch.rand(2, 3, 32, 32) * 2 - 1, torch.ones(2, 1, 16, 16)
    t1 = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    t2 = torch.tensor([[512.0, 300, 10, 7, 32, 32]] * 2)

    def loss(**kw):
        with torch.no_grad():
            return float(model(px, ids[0], mask, generator=torch.Generator().manual_seed(0), **kw))

    base = loss(input_ids_2=ids[1], time_ids=t1)
    assert base == loss(input_ids_2=ids[1], time_ids=t1)
    assert base != loss(input_ids_2=ids[1], time_ids=t2)
    assert base != loss(input_ids_2=ids[0].flip(0), time_ids=t1)
    with pytest.raises(ValueError, match="time_ids"):
        loss(input_ids_2=ids[1])


def test_time_ids_follow_each_augmented_image():
    from customdiff.data import augment_sized, size_and_crop

    im = Image.new("RGB", (60, 40), "red")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        px, mask, prompt, ids = augment_sized(im, "p", 32, 4, rng)
        h, w, top, left, th, tw = ids.tolist()
        assert (h, w, th, tw) == (40, 60, 32, 32) and top >= 0 and left >= 0
        seen.add((top, left))
        if prompt.startswith(("zoomed", "close")):
            assert left >= 10  # at least the centre-square offset (10 px of 60 x 40), rescaled up
    assert len(seen) > 5
    # no augmentation: SDXL's centre crop of a 60 x 40 photo at 32 px starts 8 px from the left
    assert size_and_crop((60, 40), 32, (0, 0), 32).tolist() == [40, 60, 0, 8, 32, 32]


def test_train_compress_energy_and_generated_class_images(tiny_xl_base, concept_dirs, tmp_path):
    out = tmp_path / "c.safetensors"
    assert main(["train", "--base", tiny_xl_base, "--concept", concept_dirs["a"], "--instance-prompt", PROMPT,
                 "--class-prompt", "photo of a cat", "--num-class-images", "2", "--class-image-steps", "2",
                 "--steps", "1", "--batch-size", "2", "--compress-energy", "0.6", "-o", str(out)]) == 0
    d = load_delta(out)
    assert d.storage == "lowrank" and json.loads(d.extra["compression"])["energy"] == 0.6
    assert d.tokens_2 and all(k.endswith((".up", ".down")) for k in d.weights)


# ---------------------------------------------------------------- merge, compress, export


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def test_merge_two_sdxl_deltas_in_the_concatenated_space(tiny_xl_base, tmp_path):
    from customdiff.merge import merge_deltas, read_captions

    a, b = crafted_delta(tiny_xl_base, seed=1), crafted_delta(tiny_xl_base, seed=2, token="<new2>")
    b.token_info[0]["class"], b.config = "dog", {"concepts": [{"instance_prompt": "photo of a <new2> dog"}]}
    pipe = load_pipeline(tiny_xl_base)
    merged = merge_deltas([a, b], pipe, read_captions()[:60], sources=["a", "b"], base_name=tiny_xl_base)
    res = json.loads(merged.extra["merge_residuals"])
    assert len(res) == 16 and max(r["constraint_of_change"] for r in res.values()) < 1e-5  # float64 solve
    assert min(r["average_constraint_of_change"] for r in res.values()) > 0.1  # averaging would miss them
    assert set(merged.tokens_2) == {"<new1>", "<new2>"} and merged.base["pipeline"] == "StableDiffusionXLPipeline"
    path = tmp_path / "m.safetensors"
    save_delta(merged, path)
    apply_deltas(pipe, [load_delta(path)]).remove()


def test_sdxl_merge_and_compress_cli(tiny_xl_base, xl_delta, tmp_path):
    other = crafted_delta(tiny_xl_base, seed=3, token="<new2>")
    save_delta(other, tmp_path / "b.safetensors")
    cap = tmp_path / "caps.txt"
    cap.write_text("\n".join(["a red dog", "a cat on grass", "the blue cat", "a green dog and a cat"] * 3))
    assert main(["merge", xl_delta, str(tmp_path / "b.safetensors"), "--base", tiny_xl_base, "--reg-captions",
                 str(cap), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["compress", str(tmp_path / "m.safetensors"), "--rank", "2", "-o", str(tmp_path / "c.safetensors")]) == 0
    c = load_delta(tmp_path / "c.safetensors")
    assert c.storage == "lowrank" and set(c.tokens_2) == {"<new1>", "<new2>"}
    assert main(["sample", "--base", tiny_xl_base, "--delta", str(tmp_path / "c.safetensors"), "--prompt",
                 "a <new2> dog", "--n", "1", "--steps", "2", "--out", str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("storage", ["full", "lowrank"])
def test_diffusers_lora_export_reproduces_in_stock_sdxl(tiny_xl_base, xl_delta, tmp_path, storage):
    from customdiff.compress import compress_delta
    from customdiff.interop import LORA_FILE, export_delta

    delta = load_delta(xl_delta)
    if storage == "lowrank":
        delta = compress_delta(delta, rank=3)
    pipe = load_pipeline(tiny_xl_base)
    applied = apply_deltas(pipe, [delta])
    ours = _np(_stock_images(pipe))
    applied.remove()
    out = export_delta(delta, "diffusers-lora", tmp_path / "export")
    manifest = json.loads((out / "customdiff_export.json").read_text())
    assert manifest["pipeline"] == "StableDiffusionXLPipeline" and set(manifest["tokens_2"]) == {"<new1>"}
    stock = _stock(tiny_xl_base)
    stock.load_lora_weights(str(out), weight_name=LORA_FILE)
    for tok, f in manifest["tokens"].items():
        stock.load_textual_inversion(str(out / f), token=tok)
    for tok, f in manifest["tokens_2"].items():
        stock.load_textual_inversion(str(out / f), token=tok, text_encoder=stock.text_encoder_2,
                                     tokenizer=stock.tokenizer_2)
    assert np.abs(ours - _np(_stock_images(stock))).max() <= 1  # uint8 images: float rounding at most


def test_kohya_export_sdxl_names_and_clip_l_g_embedding(tiny_xl_base, xl_delta, tmp_path):
    from safetensors.torch import load_file

    from customdiff.compress import compress_delta
    from customdiff.interop import KOHYA_FILE

    delta = compress_delta(load_delta(xl_delta), rank=4)  # one rank everywhere (diffusers' kohya reader)
    save_delta(delta, tmp_path / "r4.safetensors")
    assert main(["export", str(tmp_path / "r4.safetensors"), "--to", "kohya", "--base", tiny_xl_base,
                 "-o", str(tmp_path / "k")]) == 0
    state = load_file(str(tmp_path / "k" / KOHYA_FILE))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in state  # SGM names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.alpha" in state
    from customdiff.interop import export_delta

    guessed = export_delta(delta, "kohya", tmp_path / "k_nobase")  # without --base: layout read from the names
    assert set(load_file(str(guessed / KOHYA_FILE))) == set(state)
    emb = load_file(str(tmp_path / "k" / "new1.safetensors"))
    assert set(emb) == {"clip_l", "clip_g"} and emb["clip_g"].shape == (1, 48)
    assert torch.equal(emb["clip_l"][0], delta.tokens["<new1>"])
    # stock diffusers reads the kohya SDXL LoRA and, as its docs show, the clip_l/clip_g embedding
    pipe = load_pipeline(tiny_xl_base)
    applied = apply_deltas(pipe, [delta])
    ours = _np(_stock_images(pipe))
    applied.remove()
    stock = _stock(tiny_xl_base)
    stock.load_lora_weights(str(tmp_path / "k"), weight_name=KOHYA_FILE)
    stock.load_textual_inversion(emb["clip_l"], token="<new1>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(emb["clip_g"], token="<new1>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    assert np.abs(ours - _np(_stock_images(stock))).max() <= 1


# ---------------------------------------------------------------- import


def test_import_official_sdxl_delta_bin_equals_applying_it_by_hand(tiny_xl_base, xl_delta, tmp_path):
    d = load_delta(xl_delta)
    pipe = load_pipeline(tiny_xl_base)
    params = dict(pipe.unet.named_parameters())
    full = {n: (params[n].detach() + d.change(n).float()).clone() for n in d.param_names()}
    rows = {"<new1>": [d.tokens["<new1>"].clone(), d.tokens_2["<new1>"].clone()]}
    torch.save({"unet": full, "modifier_token": rows}, tmp_path / "delta.bin")  # the reference SDXL layout
    out = tmp_path / "imported.safetensors"
    assert main(["import", str(tmp_path / "delta.bin"), "--base", tiny_xl_base, "--class-word", "cat",
                 "-o", str(out)]) == 0
    got = load_delta(out)
    assert got.base["pipeline"] == "StableDiffusionXLPipeline" and torch.equal(got.tokens_2["<new1>"], rows["<new1>"][1])
    applied = apply_deltas(pipe, [got])
    ours = _np(_stock_images(pipe))
    applied.remove()
    theirs = _np(_stock_images(_by_hand(_stock(tiny_xl_base), full, {"<new1>": tuple(rows["<new1>"])})))
    assert np.array_equal(ours, theirs)
    # one row per token (an SD delta) does not fit an SDXL base
    torch.save({"unet": full, "modifier_token": {"<new1>": rows["<new1>"][0]}}, tmp_path / "sd.bin")
    assert main(["import", str(tmp_path / "sd.bin"), "--base", tiny_xl_base, "-o", str(tmp_path / "x.safetensors")]) == 2
