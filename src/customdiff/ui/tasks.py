"""Short tasks of the UI (sample, merge, compress, export): one at a time on a shared base pipeline, beside
the training worker, each tracked by id so the page can poll it."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..graphs import GPU_GATE
from ..sample import SamplingCancelled
from .jobs import _page_message
from .workdir import Workdir, entry, safe_name

log = logging.getLogger(__name__)


class Tasks:
    """The base pipeline used for sampling and merging, and a one-thread executor for the tasks using it."""

    def __init__(self, wd: Workdir, base: str, device: str = "cpu"):
        from ..base import load_pipeline
        from ..conditioning import pipeline_vocabulary

        self.wd, self.base, self.device = wd, base, device
        self.pipe = load_pipeline(base, device=device)
        self.vocab = pipeline_vocabulary(self.pipe)  # a new token must be new to every tokenizer (SDXL has two)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="customdiff-task")
        self.tasks: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.pipe_lock = threading.Lock()  # held while deltas are applied to (or checked against) the pipeline
        self.cancel = threading.Event()  # set at shutdown: a running sample stops at its next denoising step

    def submit(self, kind: str, fn: Callable[[], dict[str, Any]]) -> str:
        """Run `fn` in the task thread; its dict result (or error message) is kept under the returned id."""
        task_id = f"{kind}-{int(time.time())}-{secrets.token_hex(3)}"
        with self.lock:
            self.tasks[task_id] = {"id": task_id, "kind": kind, "state": "queued", "result": None, "error": ""}

        def run() -> None:
            try:
                with self.gpu():  # queued, not running, while a job's capture holds the GPU
                    with self.lock:
                        self.tasks[task_id]["state"] = "running"
                    result = fn()
                with self.lock:
                    self.tasks[task_id].update(state="done", result=result)
            except SamplingCancelled:
                with self.lock:
                    self.tasks[task_id].update(state="failed", error="cancelled: the server is stopping")
            except Exception as e:  # noqa: BLE001 - shown in the page
                if not isinstance(e, UserError):
                    log.exception("ui: task %s failed", task_id)
                with self.lock:
                    self.tasks[task_id].update(state="failed", error=_page_message(e, self.wd.root))

        self.pool.submit(run)
        return task_id

    def gpu(self) -> AbstractContextManager:
        """Around work on the base pipeline: on a GPU, never during a job's capture (graphs.GpuGate)."""
        return GPU_GATE.shared() if self.device.startswith("cuda") else nullcontext()

    def check_upload(self, path: Path, shown: str) -> Any:
        """check_file for an uploaded delta, from a request thread (tasks hold the gate already)."""
        with self.gpu():
            return self.check_file(path, shown)

    def get(self, task_id: str) -> dict[str, Any]:
        """A task's state, result or error."""
        with self.lock:
            if task_id not in self.tasks:
                raise UserError(f"no such task: {task_id!r}")
            return dict(self.tasks[task_id])

    def shutdown(self) -> None:
        """Stop a running sample at its next step (it leaves no images) and let other tasks finish; drop queued
        ones."""
        self.cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ the tasks

    def check_file(self, path: Path, shown: str) -> Any:
        """Load a delta file and check it belongs to the base; errors name it `shown`, not its path."""
        from ..delta import check_pipeline, load_delta

        try:
            d = load_delta(path)
            with self.pipe_lock:  # the UNet, and each token row's name and width against the text encoders
                check_pipeline(d, self.pipe, shown)
        except UserError as e:
            raise UserError(str(e).replace(str(path), shown)) from None
        return d

    def load(self, names: list[str]) -> list[Any]:
        """Library deltas by name, each checked against the base (a UserError for another base)."""
        return [self.check_file(entry(self.wd.deltas, n, "delta"), n) for n in names]

    def sample(self, names: list[str], prompts: list[str], n: int, seed: int, steps: int,
               guidance: float) -> dict[str, Any]:
        """Images of each prompt with the chosen deltas applied; written to samples/<id>/."""
        from ..delta import apply_deltas
        from ..sample import sample_to_dir
        from ..tokens import undefined_tokens

        deltas = self.load(names)
        missing = undefined_tokens(prompts, self.vocab | {t for d in deltas for t in d.tokens})
        if missing:  # the tokenizer would split it into pieces, and the concept would be silently left out
            raise UserError(f"a prompt uses {missing[0]}, which no ticked delta defines; tick the delta that "
                            f"teaches {missing[0]}, or leave it out of the prompt")
        folder = self.wd.unique(self.wd.samples, time.strftime("%Y%m%d-%H%M%S"), "")
        with self.pipe_lock:
            applied = apply_deltas(self.pipe, deltas, names)
            try:
                t0 = time.perf_counter()
                paths = sample_to_dir(self.pipe, prompts, folder, n=n, seed=seed, steps=steps, guidance=guidance,
                                      progress=False, cancel=self.cancel)
                seconds = time.perf_counter() - t0
            finally:
                applied.remove()
        index = json.loads((folder / "prompts.json").read_text())
        return {"folder": folder.name, "images": [{"file": p.name, "prompt": x["prompt"], "seed": x["seed"]}
                                                  for p, x in zip(paths, index, strict=True)],
                "grid": "grid.png", "seed": seed, "steps": steps, "guidance": guidance, "deltas": names,
                "seconds": round(seconds, 2)}

    def merge(self, names: list[str], name: str) -> dict[str, Any]:
        """Closed-form merge of library deltas into a new library delta; its residuals returned."""
        from ..delta import save_delta
        from ..merge import merge_deltas, read_captions

        if len(names) < 2:
            raise UserError("select two or more deltas to merge")
        if len(set(names)) < len(names):
            raise UserError("the same delta is selected twice")
        deltas = self.load(names)
        with self.pipe_lock:
            merged = merge_deltas(deltas, self.pipe, read_captions(None), sources=names, base_name=self.base)
        dest = self.wd.unique(self.wd.deltas, safe_name(name, "merged"), ".safetensors")
        save_delta(merged, dest)
        residuals = json.loads(merged.extra["merge_residuals"])
        renamed = [f"{old} of {src['source']} is {new} in it" for src in json.loads(merged.extra["merge_sources"])
                   for old, new in src["tokens"].items() if old != new]  # the merge records each source's renames
        return {"delta": dest.name, "tokens": [t["token"] for t in merged.token_info], "renamed": renamed,
                "residuals": {k: v["constraint"] for k, v in residuals.items()},
                "worst": max((v["constraint"] for v in residuals.values()), default=0.0)}

    def compress(self, name: str, energy: float | None, rank: int | None) -> dict[str, Any]:
        """A low-rank copy of a library delta."""
        from ..compress import compress_delta
        from ..delta import load_delta, save_delta

        path = entry(self.wd.deltas, name, "delta")
        small = compress_delta(load_delta(path), energy=energy, rank=rank)
        tag = f"r{rank}" if rank else f"e{energy:g}".replace(".", "")
        dest = self.wd.unique(self.wd.deltas, f"{path.stem}-{tag}", ".safetensors")
        save_delta(small, dest)
        before, after = path.stat().st_size, dest.stat().st_size
        return {"delta": dest.name, "before": before, "after": after}

    def export(self, name: str) -> dict[str, Any]:
        """A library delta as a diffusers LoRA plus embeddings, zipped for download."""
        import tempfile

        from ..delta import load_delta
        from ..interop import export_delta

        path = entry(self.wd.deltas, name, "delta")
        delta = load_delta(path)
        dest = self.wd.unique(self.wd.exports, f"{path.stem}-lora", ".zip")
        with tempfile.TemporaryDirectory(dir=self.wd.tmp) as tmp:
            folder = export_delta(delta, "diffusers-lora", Path(tmp) / "lora")
            part = dest.with_name("." + dest.name + ".tmp")
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(folder.iterdir()):
                    z.write(f, f"{path.stem}-lora/{f.name}")
            part.replace(dest)
        return {"zip": dest.name, "bytes": dest.stat().st_size}
