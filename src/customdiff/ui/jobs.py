"""Training jobs of the UI: one background worker, a queue, live progress, previews, and resumable checkpoints.

Each job lives in `jobs/<id>/` (photos/, reg/, previews/, job.json, and while it runs delta.safetensors.ckpt/).
job.json is rewritten on every change of state and about once a second while training, so a page reload, a
second tab or a restarted server sees the same job. A job that was queued or running when the server stopped
is queued again when it starts, and continues from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from .workdir import Workdir, write_json

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
PREVIEW_IMAGES = 4


@dataclass
class Job:
    """One training job as stored in job.json and shown in the page."""

    id: str
    name: str
    token: str
    class_word: str
    instance_prompt: str
    class_prompt: str
    reg: str  # toy | generated | upload | none
    config: dict[str, Any]  # TrainConfig fields besides base and out
    preview_every: int = 10
    preview_steps: int = 20
    guidance: float = 5.0
    photos: int = 0
    state: str = "queued"  # queued | running | done | failed | stopped
    phase: str = "waiting for the worker"
    created: float = field(default_factory=time.time)
    step: int = 0
    total: int = 0
    loss: float | None = None
    losses: list[list[float]] = field(default_factory=list)  # [step, loss]
    elapsed: float = 0.0  # seconds of work, summed over runs
    remaining: float | None = None
    resumed_from: int | None = None
    previews: list[dict[str, Any]] = field(default_factory=list)  # {"step": s, "file": name}
    delta: str = ""  # library file name once done
    error: str = ""
    message: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        """A job from job.json (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def public(self) -> dict[str, Any]:
        """What the page needs: everything, with the loss curve thinned to at most 300 points."""
        d = asdict(self)
        if len(self.losses) > 300:
            k = len(self.losses) / 300
            d["losses"] = [self.losses[int(i * k)] for i in range(300)] + [self.losses[-1]]
        return d


def new_job_id() -> str:
    """A fresh job id: time-ordered and safe as a folder name."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class Trainer:
    """The one background training worker and its queue."""

    def __init__(self, wd: Workdir, base: str, device: str = "cpu"):
        self.wd, self.base, self.device = wd, base, device
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.cancel: set[str] = set()
        self.current: str | None = None
        self.thread: threading.Thread | None = None
        self._load_jobs()

    # ------------------------------------------------------------------ bookkeeping

    def job_dir(self, job_id: str) -> Path:
        """Folder of one job."""
        return self.wd.jobs / job_id

    def _load_jobs(self) -> None:
        """Read every job.json; queue again the jobs a stopped server left queued or running."""
        import json

        for p in sorted(self.wd.jobs.glob("*/job.json")):
            try:
                job = Job.from_dict(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ui: skipping unreadable %s (%s)", p, e)
                continue
            if job.id != p.parent.name:
                continue
            if job.state in ACTIVE:
                job.state, job.phase, job.remaining = "queued", "waiting for the worker", None
                job.message = (f"the server stopped at step {job.step}; continues from its checkpoint"
                               if job.step else job.message)
                self.queue.append(job.id)
            self.jobs[job.id] = job
        if self.queue:
            log.info("ui: %d unfinished job(s) queued again", len(self.queue))

    def save(self, job: Job) -> None:
        """Write job.json of `job`."""
        write_json(self.job_dir(job.id) / "job.json", asdict(job))

    def snapshot(self) -> dict[str, Any]:
        """All jobs, newest first, and which one runs."""
        with self.lock:
            jobs = sorted(self.jobs.values(), key=lambda j: -j.created)
            return {"current": self.current, "queue": list(self.queue), "jobs": [j.public() for j in jobs]}

    def get(self, job_id: str) -> Job:
        """A job by id, or a UserError."""
        job = self.jobs.get(job_id)
        if job is None:
            raise UserError(f"no such job: {job_id!r}")
        return job

    # ------------------------------------------------------------------ commands from the page

    def submit(self, job: Job) -> None:
        """Queue a new job (its folder already holds photos/ and, if any, reg/)."""
        job.total = int(job.config["steps"])
        with self.lock:
            self.jobs[job.id] = job
            self.save(job)
            self.queue.append(job.id)
            self.wake.notify_all()

    def stop_job(self, job_id: str) -> None:
        """Stop a running job at its next step (checkpoint kept) or take a queued one off the queue."""
        with self.lock:
            job = self.get(job_id)
            if job.state == "queued":
                self.queue.remove(job_id)
                job.state, job.phase, job.message = "stopped", "", "taken off the queue"
                self.save(job)
            elif job.state == "running":
                self.cancel.add(job_id)
            else:
                raise UserError(f"job {job.name} is {job.state}, not running or queued")

    def resume_job(self, job_id: str) -> None:
        """Queue a stopped or failed job again; it continues from its checkpoint when it has one."""
        with self.lock:
            job = self.get(job_id)
            if job.state not in ("stopped", "failed"):
                raise UserError(f"job {job.name} is {job.state}; only stopped or failed jobs resume")
            job.state, job.phase, job.error = "queued", "waiting for the worker", ""
            self.save(job)
            self.queue.append(job_id)
            self.wake.notify_all()

    # ------------------------------------------------------------------ the worker

    def start(self) -> None:
        """Start the worker thread."""
        self.thread = threading.Thread(target=self._loop, name="customdiff-trainer", daemon=True)
        self.thread.start()

    def shutdown(self, timeout: float = 120.0) -> None:
        """Stop the worker: a running job saves a checkpoint at its next step and stays queued for the next start."""
        self.stopping.set()
        with self.lock:
            self.wake.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("ui: the training worker did not stop within %.0f s", timeout)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                while not self.queue and not self.stopping.is_set():
                    self.wake.wait(1.0)
                if self.stopping.is_set():
                    return
                job = self.jobs[self.queue.popleft()]
                self.current = job.id
                job.state, job.phase, job.error = "running", "loading the base model", ""
                self.save(job)
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - the worker reports every failure in the page and goes on
                from ..train import TrainingStopped

                with self.lock:
                    if isinstance(e, TrainingStopped):
                        self._stopped(job, e.step)
                    else:
                        if not isinstance(e, UserError):
                            log.exception("ui: job %s failed", job.id)
                        job.state, job.phase, job.remaining = "failed", "", None
                        job.error = _page_message(e, self.wd.root)
            finally:
                with self.lock:
                    self.cancel.discard(job.id)
                    self.current = None
                    self.save(job)

    def _stopped(self, job: Job, step: int) -> None:
        job.phase, job.remaining = "", None
        if self.stopping.is_set():  # the server stops: queued again at its next start
            job.state = "queued"
            job.message = f"the server stopped at step {step}; continues from its checkpoint"
        else:
            job.state = "stopped"
            job.message = f"stopped at step {step}; Resume continues from its checkpoint"

    def _run(self, job: Job) -> None:
        from ..base import load_pipeline
        from ..classimages import default_cache_dir, ensure_class_images
        from ..config import TrainConfig
        from ..data import ConceptSpec
        from ..train import checkpoint_dir, train

        folder = self.job_dir(job.id)
        out = folder / "delta.safetensors"
        ckpt = checkpoint_dir(out)
        cfg = TrainConfig(**{**job.config, "base": self.base, "out": str(out)})
        cfg.resume = (ckpt / "latest.safetensors").is_file()
        pipe = load_pipeline(self.base, device=self.device)
        reg_dir: str | None = None
        if job.reg == "toy":
            from ..toy import paths

            reg_dir = str(Path(paths()["concepts"]) / "class_images" / job.class_word)
        elif job.reg == "upload":
            reg_dir = str(folder / "reg")
        elif job.reg == "generated" and cfg.num_class_images > 0:
            self._phase(job, f"generating {cfg.num_class_images} class images of {job.class_prompt!r} (cached)")
            cache = default_cache_dir(self.base, job.class_prompt)
            ensure_class_images(pipe, job.class_prompt, cache, cfg.num_class_images, seed=cfg.seed,
                                steps=cfg.class_image_steps, progress=False)
            reg_dir = str(cache)
        if job.reg != "generated":
            cfg.num_class_images = 0
        spec = ConceptSpec(str(folder / "photos"), job.instance_prompt, job.class_prompt, reg_dir=reg_dir)
        self._phase(job, "resuming from the checkpoint" if cfg.resume else "preparing the data")
        clock = _Clock(job)

        def on_step(step: int, loss: float) -> bool:
            with self.lock:
                if clock.first_step is None:
                    job.resumed_from = step - 1 if cfg.resume else None
                    if cfg.resume:
                        job.message = f"resumed from step {step - 1}"
                clock.tick(step)
                job.phase, job.step, job.loss = "training", step, round(loss, 6)
                job.losses.append([step, round(loss, 6)])
                stop = self.stopping.is_set() or job.id in self.cancel
                if clock.due_save():
                    self.save(job)
            if not stop and job.preview_every and (step % job.preview_every == 0 or step == job.total):
                self._preview(pipe, job, step)
            return stop

        job.losses = [x for x in job.losses if x[0] <= _checkpoint_step(ckpt)] if cfg.resume else []
        # the job's own pipeline: its frozen weights may be stored in the mixed-precision dtype
        written = train(cfg, [spec], progress=False, pipe=pipe, callback=on_step, pipe_owned=True,
                            device=self.device)
        with self.lock:
            job.phase = "adding the delta to the library"
        dest = self.wd.unique(self.wd.deltas, job.name, ".safetensors")
        os.replace(written, dest)
        with self.lock:
            clock.tick(job.total)
            job.state, job.phase, job.remaining, job.step, job.delta = "done", "", 0.0, job.total, dest.name
            job.message = f"done: {dest.name} is in the library"
        log.info("ui: job %s wrote %s", job.id, dest)

    def _phase(self, job: Job, text: str) -> None:
        with self.lock:
            job.phase = text
            self.save(job)

    def _preview(self, pipe: Any, job: Job, step: int) -> None:
        """A grid of the instance prompt sampled with the weights trained so far."""
        from ..sample import generate, make_grid

        trained = (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))  # SDXL: its rows train too
        modes = [(m, m.training) for m in trained if m is not None]
        for m, _ in modes:
            m.eval()
        try:
            images = generate(pipe, job.instance_prompt, n=PREVIEW_IMAGES, seed=0, steps=job.preview_steps,
                              guidance=job.guidance)
        finally:
            for m, was in modes:
                m.train(was)
        folder = self.job_dir(job.id) / "previews"
        folder.mkdir(exist_ok=True)
        name = f"step_{step:05d}.png"
        make_grid(images, cols=PREVIEW_IMAGES).save(folder / name)
        with self.lock:
            job.previews = [p for p in job.previews if p["step"] != step] + [{"step": step, "file": name}]
            self.save(job)


class _Clock:
    """Elapsed and remaining time of a job, from the pace of the steps of this run."""

    def __init__(self, job: Job):
        self.job, self.start, self.before = job, time.monotonic(), job.elapsed
        self.first_step: int | None = None
        self.first_time = 0.0
        self.last_save = 0.0

    def tick(self, step: int) -> None:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step, self.first_time = step, now
        self.job.elapsed = round(self.before + now - self.start, 2)
        done = step - self.first_step
        if done > 0:
            pace = (now - self.first_time) / done
            self.job.remaining = round(max(self.job.total - step, 0) * pace, 1)

    def due_save(self) -> bool:
        now = time.monotonic()
        if now - self.last_save >= 1.0:
            self.last_save = now
            return True
        return False


def _checkpoint_step(ckpt: Path) -> int:
    from ..delta import read_metadata

    try:
        return int(read_metadata(ckpt / "latest.safetensors").get("step", 0))
    except (UserError, ValueError):
        return 0


def _page_message(e: BaseException, root: Path) -> str:
    """An error as one line for the page: server paths shortened to the work folder."""
    text = str(e).strip() or type(e).__name__
    text = text.replace(str(root) + os.sep, "").replace(str(root), "work folder")
    if not isinstance(e, UserError):
        text = f"internal error ({type(e).__name__}): {text[:300]}; see the server log"
    return " ".join(text.split())
