"""The UI's HTTP side: a FastAPI app serving one static page and a small JSON API, and `serve()` to run it.

Every failure the user can cause comes back as {"error": "..."} with status 400 and is shown in the page.
Mutating requests must carry the header X-Customdiff: 1 (a page on another site cannot add it without a CORS
preflight, which this app never grants); when bound to a loopback address, only loopback Host headers are served.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..data import MIN_PHOTOS
from ..errors import UserError
from ..validate import SEED_MAX, check_out_dir, number_text
from .jobs import Job, Trainer, new_job_id
from .tasks import Tasks
from .workdir import (
    MAX_PHOTOS,
    MAX_REG_IMAGES,
    MAX_REG_UPLOAD,
    MAX_UPLOAD_BYTES,
    Workdir,
    display_name,
    entry,
    list_deltas,
    safe_name,
    save_image_upload,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
CLASS_RE = r"^[A-Za-z][A-Za-z0-9-]{0,31}$"
TOKEN_RE = r"^<[A-Za-z0-9_-]{1,32}>$"


class Settings:
    """What the page's forms start with, per base (the toy world needs larger learning rates)."""

    def __init__(self, base: str):
        from ..base import base_facts, resolve_base
        from ..toy import paths

        toy = paths()
        self.is_toy = Path(resolve_base(base)).resolve() == Path(toy["base"]).resolve()
        facts = base_facts(base)
        self.resolution = facts.native_resolution if facts else 512
        self.max_sampling_steps = facts.max_sampling_steps if facts else 999
        self.toy_classes = sorted(p.name for p in (Path(toy["concepts"]) / "class_images").iterdir()
                                  if p.is_dir()) if self.is_toy else []
        from ..toy.recipes import DEMO_RECIPE, RECIPES

        toy_cd = RECIPES[DEMO_RECIPE]  # the toy's calibrated recipe lives in one place
        self.defaults: dict[str, Any] = {
            "token": "<new1>", "steps": toy_cd.steps if self.is_toy else 250,
            "learning_rate": toy_cd.learning_rate if self.is_toy else 1e-5, "seed": 0,
            "token_lr_scale": toy_cd.token_lr_scale if self.is_toy else 1.0,
            "reg_prompt": toy_cd.reg_prompt if self.is_toy else "captions",
            "augment": toy_cd.augment if self.is_toy else True,
            "batch_size": 8, "reg": "toy" if self.is_toy else "generated", "num_class_images": 200,
            "preview_every": 25 if self.is_toy else 50, "preview_steps": 20, "checkpoint_every": 25,
            "guidance": 5.0 if self.is_toy else 7.5, "template": "photo of a {token} {class}",
            "sample_steps": 25 if self.is_toy else 50, "n": 4}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def _number(name: str, value: float, lo: float, hi: float) -> None:
    _check(lo <= value <= hi, f"{name} must be between {number_text(lo)} and {number_text(hi)} (got "
           f"{number_text(value)})")


def create_app(wd: Workdir, trainer: Trainer, tasks: Tasks, base: str, loopback: bool = True) -> Any:
    """The FastAPI application over a work folder, a training worker and a task runner."""
    from ..conditioning import pipeline_name

    settings = Settings(base)
    pipeline = pipeline_name(tasks.pipe)  # StableDiffusionPipeline or StableDiffusionXLPipeline

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        trainer.start()
        yield
        import asyncio

        # a running sample stops first: a job's capture may be waiting for it. A running job checkpoints at its
        # next step; waiting for it must not block the event loop
        tasks.cancel.set()
        await asyncio.to_thread(trainer.shutdown)
        await asyncio.to_thread(tasks.shutdown)

    app = FastAPI(title="customdiff", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if loopback:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"])

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if request.method not in ("GET", "HEAD") and request.headers.get("x-customdiff") != "1":
            return JSONResponse({"error": "request refused: not sent by the customdiff page"}, status_code=403)
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; frame-ancestors 'none'")
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(e).split())}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_form(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:3]:
            where = str(err.get("loc", ["", "?"])[-1]).replace("_", " ")
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # e.g. the form parser's own limits ("Too many files"): in the field the page shows
        return JSONResponse({"error": str(e.detail), "detail": e.detail}, status_code=e.status_code, headers=e.headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"base": base, "pipeline": pipeline, "toy": settings.is_toy, "toy_classes": settings.toy_classes,
                "resolution": settings.resolution, "defaults": settings.defaults, "workdir": str(wd.root),
                "min_photos": MIN_PHOTOS, "max_photos": MAX_PHOTOS}

    # ------------------------------------------------------------------ teach

    @app.get("/api/jobs")
    def jobs() -> dict[str, Any]:
        return trainer.snapshot()

    @app.post("/api/jobs")
    async def submit(
        class_word: Annotated[str, Form()],
        photos: Annotated[list[UploadFile] | None, File()] = None,
        token: Annotated[str | None, Form()] = None,
        name: Annotated[str, Form()] = "",
        template: Annotated[str | None, Form()] = None,
        steps: Annotated[int | None, Form()] = None,
        learning_rate: Annotated[float | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        batch_size: Annotated[int | None, Form()] = None,
        reg: Annotated[str | None, Form()] = None,
        num_class_images: Annotated[int | None, Form()] = None,
        preview_every: Annotated[int | None, Form()] = None,
        preview_steps: Annotated[int | None, Form()] = None,
        checkpoint_every: Annotated[int | None, Form()] = None,
        reg_files: Annotated[list[UploadFile] | None, File()] = None,
    ) -> dict[str, Any]:
        # a field left out (or empty) takes the value the page starts with for this base
        given = {"token": token, "template": template, "steps": steps, "learning_rate": learning_rate, "seed": seed,
                 "batch_size": batch_size, "reg": reg, "num_class_images": num_class_images,
                 "preview_every": preview_every, "preview_steps": preview_steps, "checkpoint_every": checkpoint_every}
        (token, template, steps, learning_rate, seed, batch_size, reg, num_class_images, preview_every, preview_steps,
         checkpoint_every) = (settings.defaults[k] if v is None else v for k, v in given.items())
        class_word, token, template = class_word.strip(), token.strip(), " ".join(template.split())
        _check(bool(re.match(CLASS_RE, class_word)), f"class word {display_name(class_word)!r}: give one word "
               "such as dog, mug or square (letters, digits, '-')")
        bare = token.strip("<>")
        if token in tasks.vocab or bare in tasks.vocab or bare + "</w>" in tasks.vocab:
            raise UserError(f"token {display_name(token)!r} is already in the vocabulary; a new concept needs a "
                            "new token such as <new1> or <my-dog>")
        _check(bool(re.match(TOKEN_RE, token)), f"token {token[:40]!r}: write it in angle brackets, "
               "like <new1> (letters, digits, '-', '_')")
        _check("{token}" in template and "{class}" in template and "<" not in template.replace("{token}", ""),
               "prompt template: keep {token} and {class} in it, e.g. 'photo of a {token} {class}'")
        _number("steps", steps, 1, 100_000)
        _number("learning rate", learning_rate, 1e-8, 1.0)
        _number("seed", seed, 0, SEED_MAX)
        _number("batch size", batch_size, 1, 256)
        _number("class images", num_class_images, 0, MAX_REG_IMAGES)
        _number("preview every", preview_every, 0, 100_000)
        _number("preview sampling steps", preview_steps, 1, settings.max_sampling_steps)
        _number("checkpoint every", checkpoint_every, 0, 100_000)
        _check(reg in ("toy", "generated", "upload", "none"), f"regularization {reg!r}: choose toy, generated, "
               "upload or none")
        if reg == "toy":
            _check(settings.is_toy, "the toy class images only go with the toy base; choose generated or upload")
            _check(class_word in settings.toy_classes, f"the toy world has class images of "
                   f"{', '.join(settings.toy_classes)}, not {class_word!r}; choose generated or upload")
        photos = [p for p in photos or [] if p.filename or p.size]
        _check(len(photos) >= MIN_PHOTOS, f"{len(photos)} photo(s): give {MIN_PHOTOS} to {MAX_PHOTOS} photos of "
               "the concept")
        _check(len(photos) <= MAX_PHOTOS, f"{len(photos)} photos: give at most {MAX_PHOTOS} (pick the best)")
        regs = [f for f in reg_files or [] if f.filename or f.size]
        if reg == "upload":
            _check(bool(regs), "regularization: upload images of the class (with .txt captions if you have them)")
            _check(len(regs) <= 2 * MAX_REG_UPLOAD, f"regularization: upload at most {MAX_REG_UPLOAD} images (and "
                   "their captions)")

        job_id = new_job_id()
        folder = trainer.job_dir(job_id)
        try:
            (folder / "photos").mkdir(parents=True)
            for i, f in enumerate(photos):
                save_image_upload(await _read(f), f.filename or "", folder / "photos", f"{i:02d}", wd.tmp)
            if reg == "upload":
                await _save_reg(regs, folder / "reg", wd)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        prompt = template.replace("{token}", token).replace("{class}", class_word)
        class_prompt = " ".join(template.replace("{token}", "").replace("{class}", class_word).split())
        config = {"steps": steps, "learning_rate": learning_rate, "seed": seed, "batch_size": batch_size,
                  "num_class_images": num_class_images if reg == "generated" else 0,
                  "checkpoint_every": checkpoint_every,
                  "token_lr_scale": float(settings.defaults["token_lr_scale"]),
                  "augment": bool(settings.defaults["augment"]),
                  "reg_prompt": str(settings.defaults["reg_prompt"]) if reg == "toy" else "captions"}
        job = Job(id=job_id, name=safe_name(name or f"{class_word}-{bare}"), token=token, class_word=class_word,
                  instance_prompt=prompt, class_prompt=class_prompt, reg=reg, config=config,
                  preview_every=preview_every, preview_steps=preview_steps,
                  guidance=float(settings.defaults["guidance"]), photos=len(photos))
        trainer.submit(job)
        return {"id": job_id}

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: str) -> dict[str, Any]:
        trainer.stop_job(job_id)
        return {"ok": True}

    @app.post("/api/jobs/{job_id}/resume")
    def resume(job_id: str) -> dict[str, Any]:
        trainer.resume_job(job_id)
        return {"ok": True}

    @app.get("/api/jobs/{job_id}/previews/{file}")
    def preview(job_id: str, file: str) -> FileResponse:
        folder = entry(wd.jobs, job_id, "job", is_dir=True)
        return FileResponse(entry(folder / "previews", file, "preview"), media_type="image/png")

    # ------------------------------------------------------------------ sample

    @app.post("/api/sample")
    async def sample(request: Request) -> dict[str, Any]:
        body = await _json(request)
        given = body.get("prompts", [])
        _check(isinstance(given, list) and all(isinstance(p, str) for p in given), "prompts must be a list of texts")
        prompts = [" ".join(p.split()) for p in given if p.strip()]
        _check(bool(prompts), "write at least one prompt")
        _check(len(prompts) <= 32, "at most 32 prompts at a time")
        _check(all(len(p) <= 500 for p in prompts), "prompts: at most 500 characters each")
        names = _names(body.get("deltas", []))
        n, seed, steps = _int(body, "n", 4), _int(body, "seed", 0), _int(body, "steps", 25)
        guidance = _float(body, "guidance", float(settings.defaults["guidance"]))
        _number("images per prompt", n, 1, 16)
        _number("seed", seed, 0, 2**63 - 1)
        _number("steps", steps, 1, settings.max_sampling_steps)
        _number("guidance", guidance, 0, 50)
        for nm in names:
            entry(wd.deltas, nm, "delta")
        return {"task": tasks.submit("sample", lambda: tasks.sample(names, prompts, n, seed, steps, guidance))}

    @app.get("/api/samples/{folder}/{file}")
    def sample_file(folder: str, file: str, download: int = 0) -> Any:
        where = entry(wd.samples, folder, "sample folder", is_dir=True)
        if file == "images.zip":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
                for p in sorted(where.iterdir()):
                    if p.is_file() and not p.name.startswith("."):
                        z.write(p, f"{folder}/{p.name}")
            return Response(buf.getvalue(), media_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="samples-{folder}.zip"'})
        path = entry(where, file, "image")
        if download:
            return FileResponse(path, filename=f"{folder}-{file}")
        return FileResponse(path)

    @app.get("/api/tasks/{task_id}")
    def task(task_id: str) -> dict[str, Any]:
        return tasks.get(task_id)

    # ------------------------------------------------------------------ library

    @app.get("/api/deltas")
    def deltas() -> dict[str, Any]:
        return {"deltas": list_deltas(wd)}

    @app.post("/api/deltas")
    async def upload_delta(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        shown = display_name(file.filename or "delta.safetensors")
        _check(shown.lower().endswith(".safetensors"), f"{shown}: a delta is a .safetensors file")
        data = await _read(file, limit=2**31)
        part = wd.unique(wd.tmp, "upload", ".safetensors")
        part.write_bytes(data)
        try:
            import asyncio

            await asyncio.to_thread(tasks.check_upload, part, shown)
            dest = wd.unique(wd.deltas, safe_name(Path(shown).stem, "delta"), ".safetensors")
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)
        return {"delta": dest.name}

    @app.get("/api/deltas/{name}/download")
    def download_delta(name: str) -> FileResponse:
        return FileResponse(entry(wd.deltas, name, "delta"), filename=name,
                            media_type="application/octet-stream")

    @app.delete("/api/deltas/{name}")
    def delete_delta(name: str) -> dict[str, Any]:
        entry(wd.deltas, name, "delta").unlink()
        return {"ok": True}

    @app.post("/api/deltas/merge")
    async def merge(request: Request) -> dict[str, Any]:
        body = await _json(request)
        names = _names(body.get("deltas", []))
        _check(len(names) >= 2, "select two or more deltas to merge")
        for nm in names:
            entry(wd.deltas, nm, "delta")
        name = str(body.get("name") or "merged")
        return {"task": tasks.submit("merge", lambda: tasks.merge(names, name))}

    @app.post("/api/deltas/{name}/compress")
    async def compress(name: str, request: Request) -> dict[str, Any]:
        body = await _json(request)
        entry(wd.deltas, name, "delta")
        rank = body.get("rank")
        energy = None if rank else _float(body, "energy", 0.6)
        if rank is not None:
            rank = _int(body, "rank", 4)
            _number("rank", rank, 1, 100_000)
        else:
            _check(energy is not None and 0 < energy <= 1, "energy must be in (0, 1], e.g. 0.6")
        return {"task": tasks.submit("compress", lambda: tasks.compress(name, energy, rank))}

    @app.post("/api/deltas/{name}/export")
    def export(name: str) -> dict[str, Any]:
        entry(wd.deltas, name, "delta")
        return {"task": tasks.submit("export", lambda: tasks.export(name))}

    @app.get("/api/exports/{name}")
    def download_export(name: str) -> FileResponse:
        return FileResponse(entry(wd.exports, name, "export"), filename=name, media_type="application/zip")

    return app


async def _read(f: Any, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    data = await f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{display_name(f.filename or '')}: larger than {limit // 2**20} MB")
    return data


async def _save_reg(files: list[Any], folder: Path, wd: Workdir) -> None:
    """Regularization uploads: images, and captions as .txt files named like their image."""
    folder.mkdir()
    captions: dict[str, str] = {}
    images: list[tuple[str, bytes]] = []
    for f in files:
        name = display_name(f.filename or "")
        data = await _read(f)
        if name.lower().endswith(".txt"):
            try:
                captions[Path(name).stem] = " ".join(data.decode("utf-8").split())[:500]
            except UnicodeDecodeError:
                raise UserError(f"{name}: captions must be UTF-8 text") from None
        else:
            images.append((name, data))
    _check(bool(images), "regularization: the upload holds captions but no images")
    for i, (name, data) in enumerate(images):
        saved = save_image_upload(data, name, folder, f"{i:05d}", wd.tmp)
        if captions.get(Path(name).stem):
            saved.with_suffix(".txt").write_text(captions[Path(name).stem] + "\n", encoding="utf-8")


async def _json(request: Any) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser follows
        raise UserError("the request body is not JSON") from None
    _check(isinstance(body, dict), "the request body must be a JSON object")
    return body


def _names(value: Any) -> list[str]:
    _check(isinstance(value, list) and all(isinstance(v, str) for v in value), "deltas must be a list of names")
    return list(value)


def _int(body: dict[str, Any], key: str, default: int) -> int:
    v = body.get(key, default)
    try:
        if isinstance(v, bool) or float(v) != int(float(v)):
            raise ValueError
        return int(float(v))
    except (TypeError, ValueError):
        raise UserError(f"{key}: give a whole number (got {str(v)[:20]!r})") from None


def _float(body: dict[str, Any], key: str, default: float) -> float:
    v = body.get(key, default)
    try:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{key}: give a number (got {str(v)[:20]!r})") from None
    _check(x == x and abs(x) != float("inf"), f"{key}: give a finite number")
    return x


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse a port that is in use before the slow model load."""
    _number("--port", port, 1, 65535)
    if not host.strip():  # uvicorn would listen on every interface, and the loopback-only Host check would be off
        raise UserError("--host '': empty; give 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            fix = "another --port" if e.errno == errno.EADDRINUSE else "an address of this machine for --host"
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose {fix}") from None


def serve(base: str = "toy", host: str = "127.0.0.1", port: int = 7860, workdir: str | Path = "customdiff-ui",
          device: str = "cpu", ready: Any = None) -> None:
    """Run the UI until interrupted; a running training job checkpoints and resumes at the next start."""
    import uvicorn

    check_out_dir("--workdir", workdir)
    check_port(host, port)
    wd = Workdir(Path(workdir))
    # uploads larger than 1 MB are spooled to a temporary file while the request is read: keep those under the
    # work folder too (this process is the server, so the process-wide setting is ours to make)
    shutil.rmtree(wd.tmp, ignore_errors=True)  # what a crashed server left half-uploaded
    wd.tmp.mkdir()
    tempfile.tempdir = str(wd.tmp)
    # generated class images too (unless CUSTOMDIFF_CACHE names a cache shared with the command line)
    os.environ.setdefault("CUSTOMDIFF_CACHE", str(wd.root / "cache"))
    t0 = time.perf_counter()
    tasks = Tasks(wd, base, device)
    trainer = Trainer(wd, base, device)
    app = create_app(wd, trainer, tasks, base, loopback=_is_loopback(host))
    log.info("loaded base %s in %.1f s; work folder %s", base, time.perf_counter() - t0, wd.root)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    shown = f"[{host}]" if ":" in host else host
    if ready is not None:
        ready(f"http://{shown}:{port}/")
    server.run()
