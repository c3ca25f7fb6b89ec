"""--cuda-graphs: the UNet's forward and backward replayed from graphs train the same delta as the eager pass."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import pytest
import torch
from tiny import load_benchmark, reset_accelerate

from customdiff import train as train_module
from customdiff.base import load_pipeline
from customdiff.config import TrainConfig
from customdiff.data import ConceptSpec
from customdiff.delta import load_delta
from customdiff.graphs import GraphedUNet, graphs_unusable
from customdiff.surgery import freeze_except, trainable_names
from customdiff.train import train


def _spec(concept_dirs: dict[str, str]) -> list[ConceptSpec]:
    return [ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"])]


class FakeCapture:
    """make_graphed_callables' contract, on the CPU: the inputs are copied into static buffers that the replay
    reads, and the output and every input gradient come back in buffers that each replay overwrites (as a CUDA
    graph's do). A replay runs under the autocast settings of the capture, as a graph replays the kernels
    captured under them. Counts captures and replays."""

    def __init__(self, during: Callable[[], AbstractContextManager] = nullcontext):
        self.captures = self.forwards = self.backwards = 0
        self.during = during  # a context around every pass the graphs hold, forward and backward

    def __call__(self, fn, sample_args):
        self.captures += 1
        static = sample_args
        autocast = {"device_type": "cpu", "dtype": torch.get_autocast_dtype("cpu"),
                    "enabled": torch.is_autocast_enabled("cpu"), "cache_enabled": torch.is_autocast_cache_enabled()}
        needs = [s.requires_grad for s in static]
        out_buf: list[torch.Tensor] = []
        grad_bufs: list[torch.Tensor | None] = [None] * len(static)
        fake = self

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                fake.forwards += 1
                for s, x in zip(static, inputs, strict=True):
                    if s.data_ptr() != x.data_ptr():
                        s.copy_(x)
                with torch.enable_grad(), torch.autocast(**autocast), fake.during():
                    out = fn(*static)
                ctx.out = out
                if not out_buf:
                    out_buf.append(torch.empty_like(out))
                out_buf[0].copy_(out.detach())
                return out_buf[0].detach()

            @staticmethod
            def backward(ctx, grad):
                fake.backwards += 1
                wanted = [s for s, n in zip(static, needs, strict=True) if n]
                with fake.during():
                    grads = iter(torch.autograd.grad(ctx.out, wanted, grad))
                result = []
                for i, n in enumerate(needs):
                    if not n:
                        result.append(None)
                        continue
                    g = next(grads)
                    if grad_bufs[i] is None:
                        grad_bufs[i] = torch.empty_like(g)
                    grad_bufs[i].copy_(g)
                    result.append(grad_bufs[i].detach())
                return tuple(result)

        return lambda *args: Replay.apply(*args)


@pytest.mark.parametrize(("kw", "reason"), [
    ({"cuda": False}, "needs a CUDA GPU"), ({"checkpoint_reads_rng": True}, "--gradient-checkpointing"),
    ({"compiled": True}, "--compile"), ({"accumulation": 2}, "--gradient-accumulation"),
    ({"processes": 2}, "several processes"), ({}, None)])
def test_graphs_apply_only_where_they_are_safe(kw, reason):
    args = {"cuda": True, "compiled": False, "accumulation": 1, "processes": 1, **kw}
    why = graphs_unusable(**args)
    assert why == reason if reason is None else reason in why


def test_graphed_training_gives_the_eager_delta(tiny_base, concept_dirs, tmp_path, monkeypatch):
    fake = FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake)
    deltas = {}
    for name, extra in [("eager", {"cuda_graphs": "off"}), ("graphs", {"cuda_graphs": "on"})]:
        if name == "graphs":  # the CPU has no CUDA graphs: let the stand-in run where the GPU would
            monkeypatch.setattr(train_module, "graphs_unusable", lambda *a: None)
        cfg = TrainConfig(base=tiny_base, out=str(tmp_path / f"{name}.safetensors"), steps=4, batch_size=2,
                          learning_rate=1e-3, **extra)
        deltas[name] = load_delta(train(cfg, _spec(concept_dirs), progress=False))
    assert (fake.captures, fake.forwards, fake.backwards) == (1, 4, 4)  # captured once, replayed every step
    ref, got = deltas["eager"], deltas["graphs"]
    assert ref.weights.keys() == got.weights.keys()
    assert any(v.abs().sum() > 0 for v in ref.weights.values())
    for k, v in ref.weights.items():
        torch.testing.assert_close(got.weights[k], v, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got.tokens["<new1>"], ref.tokens["<new1>"], rtol=1e-5, atol=1e-8)


def test_graphs_hold_a_checkpointed_pass_that_reads_no_rng_state(tiny_base, concept_dirs, tmp_path, monkeypatch):
    """Under --gradient-checkpointing the backward graph holds the blocks' recomputation. A capture forbids
    reading the RNG state, so the recomputation must not stash or restore it: the stand-in fails the run if it
    does. The delta is the eager checkpointed one; `auto` captures the checkpointed pass too (since the
    fifteenth session's GPU run: 5.81 steps/s against 2.94 eager, docs/performance.md)."""
    from diffusers.models.resnet import ResnetBlock2D

    capturing = {"now": False}
    real_get_rng_state = torch.get_rng_state

    def get_rng_state() -> torch.Tensor:
        if capturing["now"]:
            raise RuntimeError("the RNG state was read during a capture")
        return real_get_rng_state()

    @contextmanager
    def capture_rules() -> Iterator[None]:
        capturing["now"] = True
        try:
            yield
        finally:
            capturing["now"] = False

    monkeypatch.setattr(torch, "get_rng_state", get_rng_state)
    fake = FakeCapture(during=capture_rules)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake)
    calls = {"resnet": 0}
    real_forward = ResnetBlock2D.forward

    def counted(self, *args, **kwargs):
        calls["resnet"] += torch.is_grad_enabled()  # the UNet's, not the frozen VAE's (encoded without grad)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(ResnetBlock2D, "forward", counted)
    deltas, resnet_calls = {}, {}
    for name, extra in [("plain", {}), ("eager", {"gradient_checkpointing": True, "cuda_graphs": "off"}),
                        ("auto", {"gradient_checkpointing": True, "cuda_graphs": "auto"}),
                        ("graphs", {"gradient_checkpointing": True, "cuda_graphs": "on"})]:
        if name == "auto":
            monkeypatch.setattr(train_module, "graphs_unusable", lambda *a: None)
        calls["resnet"] = 0
        cfg = TrainConfig(base=tiny_base, out=str(tmp_path / f"{name}.safetensors"), steps=3, batch_size=2,
                          learning_rate=1e-3, **extra)
        deltas[name] = load_delta(train(cfg, _spec(concept_dirs), progress=False))
        resnet_calls[name] = calls["resnet"]
        if name == "auto":
            assert fake.captures == 1  # auto: under checkpointing too
    assert (fake.captures, fake.forwards, fake.backwards) == (2, 6, 6)
    # checkpointing recomputes blocks in the backward pass, inside the backward graph as in the eager pass
    assert resnet_calls["eager"] == resnet_calls["auto"] == resnet_calls["graphs"] > resnet_calls["plain"] > 0
    ref = deltas["eager"]
    for name in ("plain", "auto", "graphs"):
        for k, v in ref.weights.items():
            torch.testing.assert_close(deltas[name].weights[k], v, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(deltas[name].tokens["<new1>"], ref.tokens["<new1>"], rtol=1e-5, atol=1e-8)


def test_a_unet_with_dropout_keeps_the_rng_stashing_checkpoint(tiny_base):
    from customdiff.activations import draws_random_numbers, enable_checkpointing

    unet, _, _ = _tiny_unet(tiny_base)
    assert not draws_random_numbers(unet) and enable_checkpointing(unet)
    unet.down_blocks[0].resnets[0].dropout.p = 0.1  # as a UNet trained with dropout would be configured
    assert draws_random_numbers(unet) and not enable_checkpointing(unet)


def test_cuda_graphs_on_the_cpu_train_eagerly_and_on_warns(tiny_base, concept_dirs, tmp_path, caplog):
    deltas = {}
    for mode in ("off", "auto", "on"):
        cfg = TrainConfig(base=tiny_base, out=str(tmp_path / f"{mode}.safetensors"), steps=2, batch_size=2,
                          learning_rate=1e-3, cuda_graphs=mode)
        with caplog.at_level(logging.WARNING, logger="customdiff.train"):
            deltas[mode] = load_delta(train(cfg, _spec(concept_dirs), progress=False))
    assert caplog.text.count("--cuda-graphs needs a CUDA GPU") == 1  # from "on" alone; "auto" stays quiet
    for mode in ("auto", "on"):
        for k, v in deltas["off"].weights.items():
            assert torch.equal(deltas[mode].weights[k], v)


def _tiny_unet(tiny_base: str):
    pipe = load_pipeline(tiny_base)
    unet = pipe.unet
    trainable = freeze_except(unet, trainable_names(unet, "crossattn_kv"))
    return unet, list(trainable.values()), pipe.text_encoder.config.hidden_size


def test_inputs_unlike_the_captured_ones_run_eagerly(tiny_base, monkeypatch, caplog):
    unet, params, width = _tiny_unet(tiny_base)
    fake = FakeCapture()
    graphed = GraphedUNet(unet, params, capture=fake)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(0)

    def inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, 4, size, size, generator=gen), torch.randint(0, 1000, (b,), generator=gen),
                torch.randn(b, 7, width, generator=gen, requires_grad=True))

    first, other = inputs(2), inputs(3)
    with caplog.at_level(logging.WARNING, logger="customdiff.graphs"):
        out = graphed(*first)
        out_other = graphed(*other)  # another batch size: eager, with one warning
        with torch.no_grad():
            graphed(*first)  # no gradients: eager, silently
    assert (fake.captures, fake.forwards, graphed.eager_calls) == (1, 1, 1)
    assert caplog.text.count("differ from the captured ones") == 1
    torch.testing.assert_close(out, graphed.eager(*first))
    torch.testing.assert_close(out_other, graphed.eager(*other))
    # the gradient reaches the trained tensors and the text features, as in the eager pass
    out.square().mean().backward()
    grads = [p.grad.clone() for p in params] + [first[2].grad.clone()]
    for p in params:
        p.grad = None
    first[2].grad = None
    graphed.eager(*first).square().mean().backward()
    for g, p in zip(grads, params + [first[2]], strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


def test_a_failed_capture_resets_the_gpu_random_generators(tiny_base, monkeypatch):
    """A failed capture leaves the CUDA generators marked as capturing; each gets a fresh copy of its state (the
    real failure is in the GPU test below)."""
    unet, params, width = _tiny_unet(tiny_base)

    class Generator:
        def __init__(self):
            self.state = "capturing"

        def clone_state(self):
            copy = Generator()
            copy.state = "fresh"
            return copy

        def graphsafe_set_state(self, other):
            self.state = other.state

    gens = (Generator(), Generator())
    monkeypatch.setattr(torch.cuda, "default_generators", gens)

    def broken(fn, args):
        raise RuntimeError("operation failed due to a previous error during capture")

    x = (torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size), torch.tensor([10]),
         torch.randn(1, 7, width))
    GraphedUNet(unet, params, capture=broken)(*x)
    assert [g.state for g in gens] == ["fresh", "fresh"]


def test_the_capture_holds_the_gpu_gate_alone(tiny_base):
    from customdiff.graphs import GPU_GATE

    unet, params, width = _tiny_unet(tiny_base)
    fake = FakeCapture()
    held: list[tuple[int, bool, int]] = []

    def capture(fn, args):
        held.append(GPU_GATE.state())
        return fake(fn, args)

    graphed = GraphedUNet(unet, params, capture=capture)
    x = (torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size), torch.tensor([10]),
         torch.randn(1, 7, width))
    graphed(*x)
    assert held == [(0, True, 0)] and GPU_GATE.state() == (0, False, 0) and fake.forwards == 1


def test_the_gpu_gate_lets_shared_work_overlap_and_a_capture_wait_for_it():
    """Shared holders (the web app's tasks, pinning) run together; a capture waits for them and holds the gate
    alone; shared work that arrives while a capture waits goes after it (no waiting on timing: what the gate
    forbids cannot have happened)."""
    import threading

    from customdiff.graphs import GpuGate

    gate = GpuGate()
    events: list[str] = []
    release = threading.Event()

    def holder() -> None:  # a second shared holder beside the main thread's
        with gate.shared():
            events.append("shared")
            release.wait(5)

    def capture() -> None:
        with gate.exclusive():
            events.append("capture")

    def late() -> None:
        with gate.shared():
            events.append("late")

    threads = [threading.Thread(target=f) for f in (holder, capture, late)]
    with gate.shared():
        threads[0].start()
        while gate.state() != (2, False, 0):  # both shared holders in at once
            time.sleep(0.01)
        threads[1].start()
        while gate.state()[2] == 0:  # the capture waits for them
            time.sleep(0.01)
        threads[2].start()
        time.sleep(0.2)
        assert events == ["shared"]
    release.set()
    for t in threads:
        t.join(5)
    assert events == ["shared", "capture", "late"] and gate.state() == (0, False, 0)


def test_a_failed_capture_falls_back_to_the_eager_pass(tiny_base, caplog):
    unet, params, width = _tiny_unet(tiny_base)

    def broken(fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed = GraphedUNet(unet, params, capture=broken)
    x = (torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size), torch.tensor([10]),
         torch.randn(1, 7, width))
    with caplog.at_level(logging.WARNING, logger="customdiff.graphs"):
        out = graphed(*x)
        graphed(*x)
    assert graphed.failed and caplog.text.count("capturing the UNet failed") == 1
    torch.testing.assert_close(out, graphed.eager(*x))


def _change(delta, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What training did to each weight: the delta's weights less the base's."""
    return {k: v.double() - base[k].double() for k, v in delta.weights.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_real_cuda_graphs_train_the_eager_delta(tiny_base, concept_dirs, tmp_path, caplog):
    distance = load_benchmark("compare_deltas").distance
    deltas = {}
    for run, mode in (("eager", "off"), ("eager again", "off"), ("graphs", "on")):
        cfg = TrainConfig(base=tiny_base, out=str(tmp_path / f"{run}.safetensors"), steps=6, batch_size=2,
                          learning_rate=1e-3, cuda_graphs=mode)
        caplog.clear()
        with caplog.at_level(logging.INFO, "customdiff.graphs"):
            deltas[run] = load_delta(train(cfg, _spec(concept_dirs), progress=False))
        # the graphs were used: a capture that fails leaves a correct, eager delta (the twelfth session's change
        # failed every capture, and this test did not see it until it asked)
        assert ("captured the UNet" in caplog.text) == (mode == "on") and "failed" not in caplog.text
        assert "differ from the captured ones" not in caplog.text  # every step replayed
    base = load_pipeline(tiny_base).unet.state_dict()
    ref = _change(deltas["eager"], base)
    got, again = (distance(_change(deltas[run], base), ref) for run in ("graphs", "eager again"))
    tokens = distance(deltas["graphs"].tokens, deltas["eager"].tokens)
    print(f"graphs vs eager: weight changes {got}, token rows {tokens}; eager vs eager: {again}")
    # Not bit for bit: the GPU's backward kernels sum in an order that varies, and AdamW's first steps move a
    # weight by about lr * sign(gradient), so a near-zero gradient can step the other way: a single element can
    # differ by up to 2 * lr. Per element, this test asked for 5e-5 and failed on an H200 (sixteenth session's
    # call: 2 of 1024 elements off by up to 5.4e-5, one by 12% of its own change). So it compares what training
    # changed, as a whole. On an H100 (seventeenth session) graphs against eager gave 2.4e-5 relative L2 (token
    # rows 4.4e-5), and eager against eager 2.2e-5: the graphs are as close to eager as eager is to itself. SD 1.5
    # at 512 px, fp16, 150 steps: 8.6e-4, cosine 0.9999996. A capture that replays stale inputs or gradients is
    # off by the order of the change itself (relative L2 ~1).
    assert got[0] < 1e-2 and got[1] > 0.9999
    assert tokens[0] < 1e-2 and tokens[1] > 0.9999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_failed_real_capture_leaves_random_draws_on_the_gpu_working(tiny_base):
    unet, params, width = _tiny_unet(tiny_base)

    def broken(fn, args):
        graph, x = torch.cuda.CUDAGraph(), torch.zeros(1, device="cuda")
        with torch.cuda.graph(graph):
            torch.rand(1, device="cuda")
            (x + 1).item()  # a host sync, which a capture forbids

    graphed = GraphedUNet(unet, params, capture=broken)
    x = (torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size), torch.tensor([10]),
         torch.randn(1, 7, width))
    graphed(*x)
    assert graphed.failed
    # raised "Offset increment outside graph capture encountered unexpectedly" before the reset
    assert torch.rand(4, device="cuda").shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_gpu_work_in_another_thread_under_the_gate_leaves_a_real_capture_whole(tiny_base, caplog):
    """A thread drawing random numbers and allocating on the GPU all along, each time under GPU_GATE.shared() as
    the web app's tasks do, while the UNet is captured: no draw fails and the capture holds."""
    import threading

    from customdiff.graphs import GPU_GATE

    unet, params, width = _tiny_unet(tiny_base)
    unet.cuda()
    stop, errors, draws = threading.Event(), [], [0]

    def beside() -> None:
        while not stop.is_set():
            try:
                with GPU_GATE.shared():
                    torch.rand(64, 64, device="cuda").sum().item()
                    draws[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    graphed = GraphedUNet(unet, params)
    size = unet.config.sample_size
    x = (torch.randn(2, 4, size, size, device="cuda"), torch.tensor([10, 20], device="cuda"),
         torch.randn(2, 7, width, device="cuda"))
    thread = threading.Thread(target=beside)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, "customdiff.graphs"):
            graphed(*x).square().mean().backward()
    finally:
        stop.set()
        thread.join(10)
    assert not errors and draws[0] > 0
    assert "captured the UNet" in caplog.text and not graphed.failed


def test_sdxl_steps_all_replay_under_autocast_with_the_cache(tiny_xl_base, concept_dirs, tmp_path, monkeypatch):
    """SDXL's UNet takes the pooled text projection and time ids too. With bf16 autocast and the text cache
    (the regularization captions' features read back from it from the second step on), every step's inputs must
    match the captured ones, so no step falls back to the eager pass (the eighth GPU session's SDXL run did,
    after its first step); the delta is the eager one."""
    fake = FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake)
    made: list[GraphedUNet] = []

    class Recorded(GraphedUNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(train_module, "GraphedUNet", Recorded)
    deltas = {}
    for name, mode in [("eager", "off"), ("graphs", "on")]:
        if name == "graphs":
            monkeypatch.setattr(train_module, "graphs_unusable", lambda *a: None)
        reset_accelerate()
        cfg = TrainConfig(base=tiny_xl_base, out=str(tmp_path / f"{name}.safetensors"), steps=4, batch_size=2,
                          learning_rate=1e-3, mixed_precision="bf16", cuda_graphs=mode)
        deltas[name] = load_delta(train(cfg, _spec(concept_dirs), progress=False))
    reset_accelerate()
    assert len(made) == 1 and made[0].eager_calls == 0
    assert (fake.captures, fake.forwards, fake.backwards) == (1, 4, 4)
    ref, got = deltas["eager"], deltas["graphs"]
    assert any(v.abs().sum() > 0 for v in ref.weights.values())
    for k, v in ref.weights.items():
        torch.testing.assert_close(got.weights[k], v, rtol=1e-5, atol=1e-8)
    for token, row in ref.tokens.items():
        torch.testing.assert_close(got.tokens[token], row, rtol=1e-5, atol=1e-8)
