"""Speed levers keep the training semantics: prefetched batches, cached features, frozen weights in bf16,
the loss read back every N steps."""

from __future__ import annotations

import pytest
import torch
from tiny import reset_accelerate

from customdiff import model as model_module
from customdiff import train as train_module
from customdiff.base import load_pipeline
from customdiff.config import TrainConfig
from customdiff.data import ConceptSpec, TrainData, center_square, image_to_tensor, prefetch
from customdiff.delta import load_delta
from customdiff.errors import UserError
from customdiff.model import CustomDiffusion
from customdiff.surgery import freeze_except, trainable_names
from customdiff.tokens import TokenRows, add_tokens
from customdiff.train import train


def _spec(concept_dirs: dict[str, str]) -> list[ConceptSpec]:
    return [ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"])]


def _same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_yields_the_loop_batches_bit_for_bit(concept_dirs, depth):
    data = TrainData(_spec(concept_dirs), 32, 2)
    keys = range(5, 17)
    direct = [data.batch(7, k, 0, 4) for k in keys]
    ahead = list(prefetch(lambda k: data.batch(7, k, 0, 4), keys, depth))
    assert len(ahead) == len(direct)
    assert all(_same_batch(a, b) for a, b in zip(ahead, direct, strict=True))
    # regularization images are marked for the latent cache, augmented targets are not
    assert direct[0]["latent_keys"][:2] == [None, None] and all(k[0] == "reg" for k in direct[0]["latent_keys"][2:])


def test_regularization_pixels_are_prepared_once_and_unchanged(concept_dirs):
    data = TrainData(_spec(concept_dirs), 32, 2)
    batch = data.batch(3, 0, 0, 4)
    reg = [int(k[1]) for k in batch["latent_keys"] if k is not None]
    for row, i in zip(batch["pixel_values"][2:], reg, strict=True):
        assert torch.equal(row, image_to_tensor(center_square(data.reg[i][0], 32)))
    kept = dict(data._reg_squares)
    assert set(kept) == set(reg)
    data.batch(3, 0, 0, 4)
    assert all(data._reg_squares[i] is kept[i] for i in reg)  # resized once, not every step


def test_prefetch_stops_cleanly_and_passes_errors_on(concept_dirs):
    data = TrainData(_spec(concept_dirs), 32, 2)
    it = prefetch(lambda k: data.batch(0, k, 0, 2), range(1000), 2)
    first = next(it)
    it.close()  # a loop that stops early (TrainingStopped, an error) leaves no thread behind
    assert _same_batch(first, data.batch(0, 0, 0, 2))

    def broken(k: int) -> int:
        if k == 2:
            raise ValueError("bad image")
        return k

    with pytest.raises(ValueError, match="bad image"):
        list(prefetch(broken, range(5), 2))


def test_prefetch_pins_only_while_no_cuda_graph_is_being_captured(monkeypatch):
    """Pinning allocates through CUDA, which a capture on the training thread forbids; the background thread
    pins holding graphs.GPU_GATE shared (pinning itself needs a GPU, so here it only records the gate)."""
    from customdiff.graphs import GPU_GATE

    held: list[bool] = []

    def pin(self: torch.Tensor) -> torch.Tensor:
        held.append(GPU_GATE.state()[0] == 1)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    out = list(prefetch(lambda k: {"x": torch.full((2,), k), "name": str(k)}, range(4), 2, pin=True))
    assert [o["name"] for o in out] == ["0", "1", "2", "3"] and held == [True] * 4


def _tiny_model(base: str, cache: bool) -> tuple[CustomDiffusion, object]:
    pipe = load_pipeline(base)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"], ["ktn"])
    rows = TokenRows(pipe.text_encoder.get_input_embeddings(), ids)
    freeze_except(pipe.unet, trainable_names(pipe.unet, "crossattn_kv"))
    return CustomDiffusion(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, rows, cache=cache).train(), pipe


def test_feature_caches_give_the_same_loss_and_gradients(tiny_base, concept_dirs):
    data = TrainData(_spec(concept_dirs), 32, 2)
    plain, pipe = _tiny_model(tiny_base, cache=False)
    cached, _ = _tiny_model(tiny_base, cache=True)
    results = []
    for m in (plain, cached, cached):  # the second cached call reads features and posteriors from the caches
        batch = data.batch(0, 3, 0, 4)
        ids = pipe.tokenizer(batch["prompts"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        loss = m(batch["pixel_values"], ids, batch["mask"], generator=torch.Generator().manual_seed(5),
                 latent_keys=batch["latent_keys"])
        loss.backward()
        grads = [m.token_rows.rows.grad.clone()] + [p.grad.clone() for p in m.unet.parameters() if p.grad is not None]
        m.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads))
    # only the class caption is cached (its features never change), never a prompt holding <new1>
    assert len(cached.text_cache) == 1 and len(cached.latent_cache) == 2
    # the VAE's count: 4 images, then only the 2 augmented photos once the class images are cached
    assert plain.vae_images == 4 and cached.vae_images == 4 + 2
    assert all(not torch.isin(torch.tensor(k), cached._new_ids).any() for k in cached.text_cache)
    # batch-size-dependent summation order in the encoders is all that may differ: float32 rounding
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-7)
        for g, ref in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
    assert results[0][1][0].abs().sum() > 0  # the new token row does get a gradient


def test_cached_text_features_keep_each_part_in_its_own_dtype(tiny_base, concept_dirs):
    # SDXL's encoders give states and a pooled projection that may differ in dtype under autocast: a batch
    # read partly from the cache must come back in the dtypes of an uncached one (--cuda-graphs replays only
    # for the captured dtypes; the sixth GPU session's SDXL run fell back to eager after its first step)
    model, pipe = _tiny_model(tiny_base, cache=True)
    model._encode = lambda ids, ids_2: (torch.randn(len(ids), ids.shape[1], 8),
                                        torch.randn(len(ids), 4, dtype=torch.bfloat16))
    batch = TrainData(_spec(concept_dirs), 32, 2).batch(0, 3, 0, 4)
    ids = pipe.tokenizer(batch["prompts"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    first = model.encode_text(ids)
    second = model.encode_text(ids)  # the class caption's features from the cache
    assert len(model.text_cache) == 1
    assert [t.dtype for t in first] == [t.dtype for t in second] == [torch.float32, torch.bfloat16]


@pytest.fixture
def fresh_accelerate():
    """A test that changes --mixed-precision leaves accelerate as it found it."""
    reset_accelerate()
    yield
    reset_accelerate()


def _relative(d: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float(((d[k].float() - ref[k].float()) ** 2).sum()) for k in ref)
    return (num / sum(float((ref[k].float() ** 2).sum()) for k in ref)) ** 0.5


def test_bf16_frozen_weights_give_a_delta_close_to_float32(tiny_base, concept_dirs, tmp_path, monkeypatch,
                                                           fresh_accelerate):
    seen = {}
    real = train_module.store_pipeline_frozen

    def spy(pipe, dtype, names):
        real(pipe, dtype, names)
        seen["pipe"], seen["names"] = pipe, set(names)

    monkeypatch.setattr(train_module, "store_pipeline_frozen", spy)
    runs = {}
    for name, kw in [("fp32", {}), ("bf16_autocast_only", {"mixed_precision": "bf16", "frozen_weights": "float32"}),
                     ("bf16", {"mixed_precision": "bf16"})]:
        reset_accelerate()
        cfg = TrainConfig(base=tiny_base, out=str(tmp_path / f"{name}.safetensors"), steps=4, batch_size=4,
                          learning_rate=1e-3, **kw)
        runs[name] = load_delta(train(cfg, _spec(concept_dirs), progress=False))

    # storage: frozen weights in bf16 (the UNet's and VAE's norms too, which run in bf16), trained K/V and the
    # embedding table (new rows) in float32; the text encoder's norms stay float32 (its input rows are float32)
    pipe = seen["pipe"]
    for n, p in pipe.unet.named_parameters():
        want = torch.float32 if n in seen["names"] else torch.bfloat16
        assert p.dtype == want, n
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert pipe.text_encoder.get_input_embeddings().weight.dtype == torch.float32
    assert {p.dtype for n, p in pipe.text_encoder.named_parameters() if "layer_norm" in n} == {torch.float32}
    assert next(p for n, p in pipe.text_encoder.named_parameters() if "fc1" in n).dtype == torch.bfloat16

    ref = runs["fp32"]
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); under autocast every matmul rounds, and
    # AdamW's first steps move each weight by about lr * sign(gradient), so weights whose gradient is near
    # zero can step the other way: autocast alone leaves ~5% (relative L2) on these 4 steps. Storing the
    # frozen weights in bf16 must add little to that, and the delta must still point the same way.
    alone = _relative(runs["bf16_autocast_only"].weights, ref.weights)
    stored = _relative(runs["bf16"].weights, ref.weights)
    assert 0 < stored < 0.1, stored
    assert stored < alone + 0.02, (stored, alone)
    flat = torch.cat([runs["bf16"].weights[k].flatten() for k in ref.weights])
    flat_ref = torch.cat([ref.weights[k].flatten() for k in ref.weights])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.99
    # the delta is taken against float32 base values: same keys, float32, token rows close
    assert ref.weights.keys() == runs["bf16"].weights.keys()
    assert all(v.dtype == torch.float32 for v in runs["bf16"].weights.values())
    torch.testing.assert_close(runs["bf16"].tokens["<new1>"], ref.tokens["<new1>"], rtol=0, atol=5e-3)


def test_divergence_is_caught_between_loss_reads(tiny_base, concept_dirs, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = model_module.masked_mse

    def nan_from_third(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(model_module, "masked_mse", nan_from_third)
    cfg = TrainConfig(base=tiny_base, out=str(tmp_path / "d.safetensors"), steps=6, batch_size=2, log_every=50,
                      checkpoint_every=5)
    with pytest.raises(UserError, match="diverged: the loss became nan at step 3"):
        train(cfg, _spec(concept_dirs), progress=False)
    # the read before the step-5 checkpoint caught it: no checkpoint of a diverged run
    assert not (tmp_path / "d.safetensors.ckpt" / "latest.safetensors").exists()
    assert not (tmp_path / "d.safetensors").exists()


def test_timings_are_reported(tiny_base, concept_dirs, tmp_path):
    timings: dict[str, float] = {}
    train(TrainConfig(base=tiny_base, out=str(tmp_path / "t.safetensors"), steps=3, batch_size=2, log_every=1),
          _spec(concept_dirs), progress=False, timings=timings)
    assert timings["steps_after_first"] == 2 and timings["first_step_s"] >= timings["setup_s"] > 0
    assert 0 < timings["checked_at_s"] <= timings["loaded_at_s"] <= timings["prepared_at_s"] <= timings["setup_s"]
    assert timings["steps_per_s"] > 0 and 0 <= timings["data_wait_share"] < 1
    assert 3 < timings["vae_images"] <= 6  # each step's photo, and each class image once


def test_vae_encodes_one_by_one_or_all_at_once_with_the_same_result(tiny_base):
    m, _ = _tiny_model(tiny_base, cache=False)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen = []
    hook = m.vae.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    sliced = m._moments(pixels)
    hook.remove()
    assert seen == [1, 1, 1]  # the activations of one image at a time, never the batch's
    m.vae_call_pixels = 2 * 32 * 32 + 100  # two images per call, as a GPU step does with 4 at 512 px
    seen.clear()
    hook = m.vae.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    batched = m._moments(pixels)
    hook.remove()
    assert seen == [2, 1]
    torch.testing.assert_close(sliced, batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cuda", "checkpointing", "want"), [(True, False, 4), (True, True, 0),
                                                              (False, False, 0), (False, True, 0)])
def test_vae_encodes_up_to_four_512px_images_per_call_on_a_gpu_without_checkpointing(cuda, checkpointing, want):
    from customdiff.model import vae_call_pixels

    assert vae_call_pixels(cuda, checkpointing) // (512 * 512) == want


@pytest.mark.parametrize("owned", [False, True])
def test_a_pipeline_passed_in_is_stored_low_only_when_owned(tiny_base, concept_dirs, tmp_path, owned,
                                                            fresh_accelerate):
    reset_accelerate()
    pipe = load_pipeline(tiny_base)
    cfg = TrainConfig(base=tiny_base, out=str(tmp_path / "d.safetensors"), steps=2, batch_size=2,
                      mixed_precision="bf16")
    delta = load_delta(train(cfg, _spec(concept_dirs), progress=False, pipe=pipe, pipe_owned=owned))
    dtypes = {n: p.dtype for n, p in pipe.unet.named_parameters()}
    trained = set(trainable_names(pipe.unet, "crossattn_kv"))
    assert all(dtypes[n] == torch.float32 for n in trained)
    frozen = {dtypes[n] for n in dtypes if n not in trained and "norm" not in n}
    assert frozen == ({torch.bfloat16} if owned else {torch.float32})
    assert all(v.dtype == torch.float32 for v in delta.weights.values())


def test_stored_norms_run_in_their_dtype_under_autocast():
    # autocast runs norms in float32 on a GPU; stored in bf16 they run in bf16 outside it, as in a model stored
    # wholly in bf16, and give the float32 result to bf16 rounding. A norm named in `keep` stays float32.
    from customdiff.precision import store_frozen

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                              torch.nn.Flatten(2), torch.nn.LayerNorm(16), torch.nn.LayerNorm(16))
    for m in net.modules():  # non-trivial affine parameters
        if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    x = torch.randn(2, 4, 4, 4)
    ref = net(x)
    saved = store_frozen(net, torch.bfloat16, keep={"5.weight", "5.bias"}, norms=True)
    assert saved == 2 * sum(p.numel() for n, p in net.named_parameters() if not n.startswith("5."))
    assert net[1].weight.dtype == net[4].weight.dtype == torch.bfloat16
    assert net[5].weight.dtype == torch.float32 and type(net[5]) is torch.nn.LayerNorm
    assert isinstance(net[1], torch.nn.GroupNorm) and isinstance(net[4], torch.nn.LayerNorm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net[1](torch.randn(2, 8, 4, 4)).dtype == torch.bfloat16  # a float32 input is cast down
        out = net[:5](x)
        assert out.dtype == torch.bfloat16
        final = net(x)
    torch.testing.assert_close(final.float(), ref, rtol=0.05, atol=0.05)
    # without `norms` every norm stays float32 and keeps its class
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    store_frozen(plain, torch.bfloat16)
    assert plain[1].weight.dtype == torch.float32 and type(plain[1]) is torch.nn.LayerNorm



def _saved_bytes_and_grads(unet, lean: bool, autocast: bool = False):
    """Bytes of non-parameter tensors saved for backward in one forward, and the trained tensors' gradients."""
    from customdiff.activations import lean_activations
    from customdiff.surgery import freeze_except, trainable_names

    freeze_except(unet, trainable_names(unet, "crossattn_kv"))
    counts = lean_activations(unet) if lean else None
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = unet(x, torch.tensor([10, 500]), ctx).sample
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.float() for n, p in unet.named_parameters() if p.grad is not None}
    return sum(seen.values()), grads, counts


def test_lean_activations_save_less_for_the_same_gradients(tiny_base):
    from diffusers import UNet2DConditionModel

    load = lambda: UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")  # noqa: E731
    stock, g_stock, _ = _saved_bytes_and_grads(load(), lean=False)
    lean, g_lean, counts = _saved_bytes_and_grads(load(), lean=True)
    assert counts["conv"] > 0 and counts["geglu"] > 0
    assert lean < 0.85 * stock, (lean, stock)  # the frozen convolutions' inputs and the gelu outputs are gone
    assert g_lean.keys() == g_stock.keys() and g_stock
    for k in g_stock:  # the same kernels in the same order: equal in float32
        torch.testing.assert_close(g_lean[k], g_stock[k], rtol=1e-6, atol=1e-9)
    # under autocast: the low-precision conv and product, as autocast would run them
    _, a_stock, _ = _saved_bytes_and_grads(load(), lean=False, autocast=True)
    _, a_lean, _ = _saved_bytes_and_grads(load(), lean=True, autocast=True)
    for k in a_stock:
        torch.testing.assert_close(a_lean[k], a_stock[k], rtol=0.02, atol=1e-3 * float(a_stock[k].abs().max()))


def test_lean_conv_keeps_the_stock_backward_for_a_trained_weight():
    from customdiff.activations import lean_activations

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 3, padding="same"))
    ref = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(1, 3, 6, 6)
    net(x).sum().backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    assert lean_activations(net) == {"conv": 1, "geglu": 0}  # padding="same" is left alone
    assert all(torch.equal(a, b) for a, b in zip(ref, net.parameters(), strict=True))
    net(x).sum().backward()  # the weight trains: its gradient comes from the stock backward
    for p, w in zip(net.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups", "size"), [
    (1, 1, 1, 1, (8, 8)), (2, 1, 1, 1, (7, 9)), (2, 0, 1, 2, (8, 11)), ((2, 1), (1, 2), (2, 1), 1, (9, 6)),
    (3, 1, 1, 4, (10, 10))])
def test_lean_conv_input_gradient_matches_the_stock_one(stride, padding, dilation, groups, size):
    from customdiff.activations import lean_activations

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv.requires_grad_(False)
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    conv = conv.double()
    up = torch.randn_like(conv(x))
    (conv(x) * up).sum().backward()
    want, x.grad = x.grad.clone(), None
    assert lean_activations(conv) == {"conv": 1, "geglu": 0}
    out = conv(x)
    assert out.grad_fn is not None and "FrozenConv" in type(out.grad_fn).__name__
    (out * up).sum().backward()  # odd sizes under a stride: the rows a strided convolution drops come back
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("mode", "cuda", "checkpointing", "want"), [
    ("auto", True, False, True), ("auto", False, False, False), ("auto", True, True, False),
    ("on", False, True, True), ("off", True, False, False)])
def test_lean_activations_auto_is_a_gpu_without_checkpointing(mode, cuda, checkpointing, want):
    from customdiff.activations import lean_wanted

    assert lean_wanted(mode, cuda, checkpointing) is want


def test_lean_activations_train_the_same_delta(tiny_base, concept_dirs, tmp_path, monkeypatch):
    from customdiff import activations

    calls = []
    real = activations.lean_activations
    monkeypatch.setattr(train_module, "lean_activations", lambda unet: calls.append(1) or real(unet))
    deltas = {}
    for mode in ("on", "off", "auto"):  # auto: off on the CPU
        cfg = TrainConfig(base=tiny_base, out=str(tmp_path / f"{mode}.safetensors"), steps=3, batch_size=2,
                          learning_rate=1e-3, lean_activations=mode)
        deltas[mode] = load_delta(train(cfg, _spec(concept_dirs), progress=False))
    assert len(calls) == 1  # "on" alone swapped the modules
    for k, v in deltas["off"].weights.items():
        torch.testing.assert_close(deltas["on"].weights[k], v, rtol=1e-5, atol=1e-8)


def test_targets_without_augmentation_are_keyed_by_their_fixed_pixels(tiny_base, concept_dirs):
    """Under --no-augment a target photo is its centre square, mirrored or not: each (photo, mirrored) pair
    names fixed pixels, so its VAE posterior can be cached like a regularization image's. With augmentation
    targets get no key."""
    fixed = TrainData(_spec(concept_dirs), 32, 2, augment=False)
    pixels_by_key: dict = {}
    for step in range(40):
        batch = fixed.batch(0, step, 0, 4)
        for key, px in zip(batch["latent_keys"], batch["pixel_values"], strict=True):
            assert key is not None
            if key in pixels_by_key:
                assert torch.equal(pixels_by_key[key], px)
            pixels_by_key[key] = px
    targets = {k for k in pixels_by_key if k[0] == "target"}
    assert {k[2] for k in targets} == {False, True} and len(targets) <= 2 * len(fixed.instances)
    a_photo = next(k for k in targets if not k[2])
    assert torch.equal(pixels_by_key[a_photo].flip(-1), pixels_by_key[("target", a_photo[1], True)])
    # the photo's centre square at 32 px, resized once per (photo, mirrored) however often it is drawn
    assert torch.equal(pixels_by_key[a_photo], image_to_tensor(center_square(fixed.instances[a_photo[1]][0], 32)))
    assert len(fixed._target_squares) == len(targets)
    augmented = TrainData(_spec(concept_dirs), 32, 2).batch(0, 0, 0, 4)
    assert augmented["latent_keys"][:2] == [None, None]

    # training on them: the cached posteriors give the uncached loss and gradients
    plain, pipe = _tiny_model(tiny_base, cache=False)
    cached, _ = _tiny_model(tiny_base, cache=True)
    for step in range(6):
        batch = fixed.batch(0, step, 0, 4)
        ids = pipe.tokenizer(batch["prompts"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out = []
        for m in (plain, cached):
            loss = m(batch["pixel_values"], ids, batch["mask"], generator=torch.Generator().manual_seed(step),
                     latent_keys=batch["latent_keys"])
            loss.backward()
            out.append((loss.detach(), m.token_rows.rows.grad.clone()))
            m.zero_grad(set_to_none=True)
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-7)
    assert any(k[0] == "target" for k in cached.latent_cache)
