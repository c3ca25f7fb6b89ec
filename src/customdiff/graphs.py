"""CUDA graphs for the UNet's training pass: its forward and backward replayed as two graphs instead of the
UNet's ~11,000 operator calls a step, launched one by one from Python, which bound a step on a GPU
(docs/performance.md)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


class GpuGate:
    """Other GPU work in the process (shared, by any number of threads) against a graph capture (exclusive).

    During a capture, torch's global capture mode makes another thread's unsafe CUDA calls (allocation, host
    sync, event queries) fail and void the capture, and another thread's random draw with the default CUDA
    generators raises (they are marked as capturing). So the capture waits for shared holders to finish and
    holds the gate alone; work that arrives meanwhile waits for it, including shared work that arrives while a
    capture waits (the capture is not starved by a stream of short holders). Shared holds may not nest.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # captures waiting for the shared holders to finish

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the gate beside other shared holders, not during a capture."""
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the gate alone (a capture)."""
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def state(self) -> tuple[int, bool, int]:
        """(shared holders, whether a capture holds it, captures waiting)."""
        with self._cond:
            return self._shared, self._exclusive, self._waiting


# held exclusively while the UNet is captured; on a GPU, the web app's tasks, its check of an uploaded delta and
# the prefetch thread's pinning hold it shared
GPU_GATE = GpuGate()

# (callable, sample args) -> the graphed callable; torch.cuda.make_graphed_callables, or a stand-in in tests
Capture = Callable[[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]], Callable[..., torch.Tensor]]


def graphs_unusable(cuda: bool, compiled: bool, accumulation: int, processes: int,
                    checkpoint_reads_rng: bool = False) -> str | None:
    """Why `--cuda-graphs` cannot apply to a run, or None when it can."""
    if not cuda:
        return "needs a CUDA GPU"
    if checkpoint_reads_rng:
        # the recomputation restores the RNG state the forward pass stashed; a capture forbids reading it
        return "not with --gradient-checkpointing on a UNet with dropout"
    if compiled:
        return "not with --compile"
    if accumulation > 1:
        # the graph hands back the same gradient buffers every replay; a second micro-batch would overwrite
        # the first one's gradients before they are summed
        return "not with --gradient-accumulation above 1"
    if processes > 1:
        return "not with several processes"
    return None


def _end_rng_capture() -> None:
    """Give each CUDA generator a fresh copy of its state after a failed capture.

    A capture marks the generators' states as capturing and unmarks them only when it ends well; after a failed
    one, every later random draw on the GPU in the process (sampling after training, in the web app) raises
    "Offset increment outside graph capture". A copy keeps the seed and offset, unmarked.
    """
    for gen in torch.cuda.default_generators:  # empty until CUDA is initialised
        try:
            gen.graphsafe_set_state(gen.clone_state())
        except RuntimeError as e:
            log.warning("--cuda-graphs: could not reset the GPU's random generator after the failed capture "
                        "(%s); random draws on the GPU may fail in this process", e)


def _signature(args: Sequence[torch.Tensor]) -> tuple:
    return tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args)


class GraphedUNet:
    """`unet(sample, t, states, added_cond_kwargs=added).sample` with gradients, replayed from CUDA graphs.

    The first call with gradients enabled captures the forward and backward pass (torch's
    make_graphed_callables: a few eager warm-up passes, then one capture each) under the autocast settings of
    that call, with autocast's weight cache off as capture requires. That also keeps the eager pass's rounding:
    the graph's text-feature input is a leaf, which the cache would cast to the low dtype once for all its uses,
    summing their gradients in that dtype; the eager pass casts it at each use and sums in float32. Later calls
    copy their inputs into the graph's buffers and replay. The trained tensors (`params`) are the graph's inputs
    too, so their gradients flow to them as in the eager pass; the frozen weights are read in place. A call whose
    inputs differ from the captured ones in shape, dtype, device or requires_grad, or one without gradients,
    runs eagerly.
    The trained tensors must keep their storage (in-place updates only, as the optimizers make).
    """

    def __init__(self, unet: nn.Module, params: Sequence[nn.Parameter], capture: Capture | None = None):
        self.unet = unet
        self.params = tuple(params)
        self.capture = capture
        self.graphed: Callable[..., torch.Tensor] | None = None
        self.signature: tuple | None = None
        self.failed = False
        self.eager_calls = 0

    def eager(self, sample: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
              added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The plain UNet call."""
        return self.unet(sample, t, states, added_cond_kwargs=added).sample

    def _function(self, n_args: int) -> Callable[..., torch.Tensor]:
        def run(*tensors: torch.Tensor) -> torch.Tensor:  # the trained tensors follow the inputs, unused by name
            added = {"text_embeds": tensors[3], "time_ids": tensors[4]} if n_args == 5 else None
            return self.eager(tensors[0], tensors[1], tensors[2], added)

        return run

    def _capture(self, args: tuple[torch.Tensor, ...]) -> None:
        device = args[0].device.type
        # fresh leaf inputs: the graph reads its inputs from these buffers for its whole life
        static = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        # The capture's warm-up passes make the trained tensors' gradient-accumulation nodes on a side stream and
        # keep them alive, so torch warns once a run that a gradient reached them from another stream (in the
        # capture's backward pass, or in every replay). Made on the training stream before the capture instead,
        # they fail the capture: its backward pass then waits on a stream outside it (fifteenth session, on a
        # GPU). The replayed runs reach 8.2 steps/s with the warning (docs/performance.md)
        t0 = time.perf_counter()
        with GPU_GATE.exclusive():
            try:
                with torch.autocast(device, dtype=torch.get_autocast_dtype(device),
                                    enabled=torch.is_autocast_enabled(device), cache_enabled=False):
                    capture = self.capture or torch.cuda.make_graphed_callables
                    self.graphed = capture(self._function(len(args)), static + self.params)
            except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager pass, which is correct
                self.failed = True
                _end_rng_capture()
                log.warning("--cuda-graphs: capturing the UNet failed (%s: %s); it runs eagerly",
                            type(e).__name__, e)
                return
        self.signature = _signature(args)
        log.info("--cuda-graphs: captured the UNet's forward and backward pass in %.1f s",
                 time.perf_counter() - t0)

    def __call__(self, sample: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
                 added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The UNet's prediction, from the graphs when the inputs match the captured ones."""
        args = (sample, t, states) + ((added["text_embeds"], added["time_ids"]) if added else ())
        if torch.is_grad_enabled():
            if self.graphed is None and not self.failed:
                self._capture(args)
            if self.graphed is not None:
                if _signature(args) == self.signature:
                    return self.graphed(*args, *self.params)
                if not self.eager_calls:
                    log.warning("--cuda-graphs: inputs %s differ from the captured ones; such calls run eagerly",
                                [tuple(a.shape) for a in args])
                self.eager_calls += 1
        return self.eager(sample, t, states, added)
