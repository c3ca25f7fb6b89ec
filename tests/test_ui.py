"""`customdiff ui` without a browser: names and paths, the train callback, and the JSON API of a real server
(queue, library operations, refusals, and a job that survives a server restart)."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ui_server import UIServer, toy_concept  # noqa: E402

from customdiff.errors import UserError  # noqa: E402
from customdiff.ui.workdir import Workdir, display_name, entry, safe_name  # noqa: E402


def test_names_never_become_paths(tmp_path):
    wd = Workdir(tmp_path / "w")
    (wd.deltas / "a.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (wd.deltas / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert entry(wd.deltas, "a.safetensors") == wd.deltas / "a.safetensors"
    for bad in ["../outside.safetensors", "..", ".hidden", "a/b", "/etc/passwd", "", "a.safetensors\x00",
                "link.safetensors", "missing.safetensors", "..\\x"]:
        with pytest.raises(UserError):
            entry(wd.deltas, bad)
    assert safe_name("../../etc/passwd") == "etc-passwd"
    assert safe_name("Mon chien Médor!") == "Mon-chien-Medor"
    assert safe_name("...") == "concept" and safe_name("") == "concept"
    assert display_name("C:\\Users\\me\\dog.jpg") == "dog.jpg" and display_name("a/b/\x1bc.png") == "c.png"


def test_a_work_folder_whose_subfolder_cannot_be_written_is_refused_at_start(tmp_path, monkeypatch):
    """Root may write anywhere, so the refusal of the OS is simulated for jobs/ alone."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "jobs" and real(p, mode))
    with pytest.raises(UserError, match="may not write in its jobs/ folder"):
        Workdir(tmp_path / "wd")
    monkeypatch.setattr(os, "access", real)
    assert Workdir(tmp_path / "wd").jobs.is_dir()


def test_gpu_tasks_wait_while_a_training_run_captures_its_cuda_graphs(tiny_base, tmp_path):
    """A capture forbids other threads' unsafe GPU calls and default-generator draws, so on a GPU the web app's
    tasks and its check of an uploaded delta hold graphs.GPU_GATE shared, which the capture holds alone; on the
    CPU they take no gate."""
    import threading

    from customdiff.graphs import GPU_GATE
    from customdiff.ui.tasks import Tasks

    tasks = Tasks(Workdir(tmp_path / "wd"), tiny_base, "cpu")
    try:
        for device, waits in (("cuda", True), ("cpu", False)):
            tasks.device = device  # only whether a task takes the gate depends on it here
            ran, checked = threading.Event(), threading.Event()

            def upload(checked=checked) -> None:  # the request thread's check of an uploaded delta
                with pytest.raises(UserError, match="not-a-delta"):
                    tasks.check_upload(tmp_path / "not-a-delta.safetensors", "not-a-delta")
                checked.set()

            with GPU_GATE.exclusive():  # as a training run's capture holds it
                task = tasks.submit("sample", lambda ran=ran: ran.set() or {})
                threading.Thread(target=upload).start()
                if waits:
                    time.sleep(0.3)
                    assert not ran.is_set() and not checked.is_set() and tasks.get(task)["state"] == "queued"
                else:
                    assert ran.wait(5) and checked.wait(5)
            assert ran.wait(5) and checked.wait(5)
            while tasks.get(task)["state"] != "done":
                time.sleep(0.01)
    finally:
        tasks.shutdown()


def test_train_callback_stops_with_a_checkpoint_and_resume_matches(tiny_base, concept_dirs, tmp_path):
    from customdiff.config import TrainConfig
    from customdiff.data import ConceptSpec
    from customdiff.delta import load_delta
    from customdiff.train import TrainingStopped, checkpoint_dir, train

    def spec() -> ConceptSpec:
        return ConceptSpec(concept_dirs["a"], "photo of a <new1> cat", "photo of a cat", reg_dir=concept_dirs["reg"])

    def cfg(out: Path, **kw) -> TrainConfig:
        return TrainConfig(base=tiny_base, out=str(out), steps=6, batch_size=2, learning_rate=1e-3, **kw)

    seen: list[tuple[int, float]] = []
    train(cfg(tmp_path / "whole.safetensors"), [spec()], progress=False,
          callback=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]

    part = tmp_path / "part.safetensors"
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg(part), [spec()], progress=False, callback=lambda step, loss: step == 3)
    assert stopped.value.step == 3 and not part.exists()
    assert (checkpoint_dir(part) / "latest.safetensors").is_file()
    train(cfg(part, resume=True), [spec()], progress=False)
    whole, resumed = load_delta(tmp_path / "whole.safetensors"), load_delta(part)
    for name in whole.param_names():
        assert (whole.change(name) - resumed.change(name)).abs().max() < 1e-6
    assert not checkpoint_dir(part).exists()


def _photos() -> tuple[list[tuple[str, str, bytes]], str]:
    photos, cls = toy_concept()
    return [("photos", p.name, p.read_bytes()) for p in sorted(photos.glob("*.png"))], cls


def _job_form(cls: str, **kw) -> dict:
    return {"class_word": cls, "steps": 12, "batch_size": 4, "learning_rate": 3e-5, "reg": "toy",
            "preview_every": 0, "checkpoint_every": 0, **kw}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    s = UIServer(root / "work", root / "server.log").start()
    yield s
    assert s.stop() == 0, (root / "server.log").read_text()


def test_requests_from_elsewhere_are_refused(server):
    status, body = server.request("POST", "/api/jobs/x/stop", b"", {"X-Customdiff": ""})
    assert status == 403 and b"not sent by the customdiff page" in body
    status, _ = server.request("GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 400  # DNS rebinding: only loopback host names on a loopback server
    status, _ = server.request("GET", "/")
    assert status == 200
    for path in ["/api/deltas/..%2F..%2Fetc%2Fpasswd/download", "/api/deltas/%2Fetc%2Fpasswd/download",
                 "/api/samples/..%2Fdeltas/x.png", "/api/jobs/..%2F..%2F/previews/job.json", "/static/../app.py",
                 "/api/exports/..%2Fdeltas%2Fa.safetensors"]:
        status, body = server.request("GET", path)
        assert status in (400, 404), (path, status, body)
        assert b"root:" not in body and b"import" not in body


def test_headers_keep_the_page_to_itself(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/") as r:
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_queue_library_merge_compress_export_sample(server):
    files, cls = _photos()
    ids = []
    for i in range(2):
        status, r = server.post_form("/api/jobs", _job_form(cls, name=f"mine {i}", seed=i), files)
        assert status == 200, r
        ids.append(r["id"])
    snap = server.get("/api/jobs")
    assert snap["queue"] and snap["queue"][-1] == ids[1]  # one worker: the second waits its turn
    assert {j["id"]: j["state"] for j in snap["jobs"]}[ids[1]] == "queued"
    for job_id in ids:
        job = server.wait_job(job_id, lambda j: j["state"] == "done")
        assert job["step"] == job["total"] == 12 and job["remaining"] == 0 and len(job["losses"]) == 12
    names = sorted(d["name"] for d in server.get("/api/deltas")["deltas"])
    assert names == ["mine-0.safetensors", "mine-1.safetensors"]
    info = server.get("/api/deltas")["deltas"][0]
    assert info["base"] == "toy" and info["tokens"] == [{"token": "<new1>", "class": cls}] and info["steps"] == 12

    merged = server.run_task("/api/deltas/merge", {"deltas": names, "name": "both"})
    assert merged["delta"] == "both.safetensors" and sorted(merged["tokens"]) == ["<new1>", "<new2>"]
    assert merged["worst"] < 1e-3 and merged["residuals"]
    assert merged["renamed"] == ["<new1> of mine-1.safetensors is <new2> in it"]  # both were trained as <new1>
    small = server.run_task("/api/deltas/both.safetensors/compress", {"energy": 0.6})
    assert small["after"] < small["before"]
    lora = server.run_task(f"/api/deltas/{names[0]}/export", {})
    status, body = server.request("GET", f"/api/exports/{lora['zip']}")
    assert status == 200
    assert any(n.endswith("pytorch_lora_weights.safetensors") for n in zipfile.ZipFile(io.BytesIO(body)).namelist())

    shots = server.run_task("/api/sample", {"deltas": [small["delta"]], "prompts": [f"photo of a <new2> {cls}"],
                                           "n": 2, "seed": 3, "steps": 4})
    assert [im["file"] for im in shots["images"]] == ["0000.png", "0001.png"] and shots["seed"] == 3
    status, body = server.request("GET", f"/api/samples/{shots['folder']}/images.zip")
    assert status == 200 and len(zipfile.ZipFile(io.BytesIO(body)).namelist()) == 4  # 2 images, grid, prompts.json
    status, r = server.post_json("/api/sample", {"deltas": [names[0]], "prompts": [f"a <new2> {cls}"], "steps": 2})
    assert status == 200, r  # <new2> is the merged delta's, not this one's: the tokenizer would split it silently
    task = server.wait_task(r["task"])
    assert task["state"] == "failed" and "<new2>, which no ticked delta defines" in task["error"], task

    status, _ = server.request("DELETE", "/api/deltas/mine-1.safetensors")
    assert status == 200
    assert "mine-1.safetensors" not in [d["name"] for d in server.get("/api/deltas")["deltas"]]
    status, r = server.post_json("/api/sample", {"deltas": ["mine-1.safetensors"], "prompts": ["x"]})
    assert status == 400 and "no such delta" in r["error"]


def test_bad_requests_are_one_line_messages(server):
    files, cls = _photos()
    cases = [
        (_job_form(cls, steps=0), files, "steps must be between 1"),
        (_job_form(cls, steps="many"), files, "steps"),
        (_job_form(cls, reg="laion"), files, "regularization 'laion'"),
        (_job_form("zebra"), files, "the toy world has class images of"),
        (_job_form(cls, token="<|endoftext|>"), files, "already in the vocabulary"),
        (_job_form(cls, token="new token"), files, "write it in angle brackets"),
        (_job_form(cls, template="a {class}"), files, "keep {token} and {class}"),
        (_job_form(cls), files[:2], "give 3 to 20 photos"),
        (_job_form(cls), files * 4, "give at most 20"),
        (_job_form(cls), [*files[:3], ("photos", "notes.txt", b"hello")], "notes.txt: not a readable image"),
        (_job_form(cls, reg="upload"), files, "upload images of the class"),
    ]
    for form, photos, want in cases:
        status, r = server.post_form("/api/jobs", form, photos)
        assert status == 400 and want in r["error"], (form, r)
        assert "\n" not in r["error"] and "Traceback" not in r["error"]
    status, r = server.post_json("/api/sample", {"prompts": ["a"], "steps": -1})
    assert status == 400 and "steps must be between" in r["error"]
    status, r = server.post_json("/api/deltas/merge", {"deltas": ["a.safetensors"]})
    assert status == 400 and "two or more" in r["error"]
    status, r = server.post_form("/api/deltas", {}, [("file", "x.safetensors", b"not a safetensors file")])
    assert status == 400 and r["error"].startswith("x.safetensors: not a readable safetensors file")
    for body, want in [({"prompts": "photo of a cat"}, "prompts must be a list of texts"),  # not one per letter
                       ({"prompts": None}, "prompts must be a list of texts"),
                       ({"prompts": ["a"], "steps": 1000}, "steps must be between 1 and 999")]:  # DDIM's last
        status, r = server.post_json("/api/sample", body)
        assert status == 400 and want in r["error"], (body, r)
    status, answer = server.request("POST", "/api/sample", b"[" * 100_000 + b"]" * 100_000,
                                    {"Content-Type": "application/json"})
    assert status == 400 and json.loads(answer)["error"] == "the request body is not JSON"
    status, r = server.post_form("/api/jobs", _job_form(cls, seed=2**40), files)
    assert status == 400 and "seed must be between 0 and 4294967295" in r["error"], r  # the trainer's own range
    status, r = server.post_form("/api/jobs", _job_form(cls), [])
    assert status == 400 and "0 photo(s): give 3 to 20" in r["error"], r


def test_fields_left_out_take_the_pages_defaults_for_this_base(server):
    files, cls = _photos()
    defaults = server.get("/api/info")["defaults"]
    status, r = server.post_form("/api/jobs", {"class_word": cls, "steps": 2, "learning_rate": "", "reg": "toy"},
                                 files)
    assert status == 200, r
    job = server.wait_job(r["id"], lambda j: j["state"] == "done")
    assert job["config"]["learning_rate"] == defaults["learning_rate"] == 1e-4  # the toy recipe's, not SD's 1e-5
    assert job["config"]["batch_size"] == defaults["batch_size"] and job["preview_every"] == defaults["preview_every"]
    assert job["config"]["token_lr_scale"] == defaults["token_lr_scale"]


def _toy_delta(tmp_path: Path, token_width: int = 0, **extra: str) -> bytes:
    """A valid (zero-change) delta for the toy base, with a token row of `token_width` (0: the base's) and
    extra metadata."""
    from customdiff.base import load_pipeline
    from customdiff.delta import Delta, base_fingerprint, save_delta

    pipe = load_pipeline("toy")
    names = [n for n, _ in pipe.unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    params = dict(pipe.unet.named_parameters())
    width = token_width or pipe.text_encoder.get_input_embeddings().weight.shape[1]
    delta = Delta(weights={n: torch.zeros_like(params[n]) for n in names}, tokens={"<new9>": torch.zeros(width)},
                  trained="crossattn_kv", base={"name": "toy", "fingerprint": base_fingerprint(pipe.unet, names)},
                  token_info=[{"token": "<new9>", "initializer": "ktn", "class": "square"}], extra=extra)
    save_delta(delta, tmp_path / "d.safetensors")
    return (tmp_path / "d.safetensors").read_bytes()


def test_library_survives_damaged_metadata_and_refuses_a_token_of_another_width(server, tmp_path):
    damaged = _toy_delta(tmp_path, merge_sources="5", merge_residuals="[" * 100_000 + "]" * 100_000,
                         compression='{"ranks": [1, 2]}')
    status, r = server.post_form("/api/deltas", {}, [("file", "odd.safetensors", damaged)])
    assert status == 200, r
    listed = {d["name"]: d for d in server.get("/api/deltas")["deltas"]}[r["delta"]]
    assert listed["merged_from"] == [] and listed["ranks"] is None and listed["worst_residual"] is None and listed["tokens"] == [{"token": "<new9>", "class": "square"}]
    status, r = server.post_form("/api/deltas", {}, [("file", "w.safetensors", _toy_delta(tmp_path, token_width=7))])
    assert status == 400 and "token <new9> has embedding width 7" in r["error"], r
    odd = _toy_delta(tmp_path, merge_residuals='{"a": {"constraint": "x"}, "b": {"constraint": 0.5}}')
    status, r = server.post_form("/api/deltas", {}, [("file", "odd2.safetensors", odd)])
    assert status == 200, r
    assert {d["name"]: d for d in server.get("/api/deltas")["deltas"]}[r["delta"]]["worst_residual"] == 0.5


def test_stop_and_resume_from_the_page(server):
    files, cls = _photos()
    status, r = server.post_form("/api/jobs", _job_form(cls, steps=400, name="long"), files)
    assert status == 200
    server.wait_job(r["id"], lambda j: j["state"] == "running" and j["step"] >= 2)
    assert server.post_json(f"/api/jobs/{r['id']}/stop", {})[0] == 200
    job = server.wait_job(r["id"], lambda j: j["state"] == "stopped")
    assert "Resume continues from its checkpoint" in job["message"]
    status, answer = server.post_json(f"/api/jobs/{r['id']}/stop", {})
    assert status == 400 and "stopped" in answer["error"]
    assert server.post_json(f"/api/jobs/{r['id']}/resume", {})[0] == 200
    resumed = server.wait_job(r["id"], lambda j: j["state"] == "running" and j["resumed_from"] is not None)
    assert resumed["resumed_from"] == job["step"]
    server.post_json(f"/api/jobs/{r['id']}/stop", {})
    server.wait_job(r["id"], lambda j: j["state"] == "stopped")


def test_stopping_the_server_keeps_a_checkpoint_the_job_resumes_from(tmp_path):
    from customdiff.delta import load_delta, read_metadata

    files, cls = _photos()
    s = UIServer(tmp_path / "work", tmp_path / "server.log").start()
    try:
        status, r = s.post_form("/api/jobs", _job_form(cls, steps=40, name="survivor"), files)
        assert status == 200
        s.wait_job(r["id"], lambda j: j["state"] == "running" and j["step"] >= 3)
    finally:
        assert s.stop() == 0, (tmp_path / "server.log").read_text()
    folder = tmp_path / "work" / "jobs" / r["id"]
    saved = json.loads((folder / "job.json").read_text())
    ckpt = folder / "delta.safetensors.ckpt" / "latest.safetensors"
    assert saved["state"] == "queued" and "the server stopped at step" in saved["message"]
    step = int(read_metadata(ckpt)["step"])
    assert step == saved["step"] >= 3  # the checkpoint is of the very step the page showed last

    s = UIServer(tmp_path / "work", tmp_path / "server.log").start()
    try:
        job = s.wait_job(r["id"], lambda j: j["state"] == "done")
    finally:
        assert s.stop() == 0
    assert job["resumed_from"] == step and job["step"] == 40 and job["message"].startswith("done")
    assert [x[0] for x in job["losses"]] == list(range(1, 41))
    assert load_delta(tmp_path / "work" / "deltas" / "survivor.safetensors").config["steps"] == 40
    assert not ckpt.exists()


def test_stopping_the_server_cancels_a_running_sample(tmp_path):
    s = UIServer(tmp_path / "work", tmp_path / "server.log").start()
    try:
        status, r = s.post_json("/api/sample", {"prompts": ["a square"], "n": 16, "steps": 999})  # minutes of work
        assert status == 200
        while s.get(f"/api/tasks/{r['task']}")["state"] != "running":
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        t0 = time.monotonic()
        assert s.stop() == 0, (tmp_path / "server.log").read_text()
    assert time.monotonic() - t0 < 60  # it stops at the next denoising step, not after all 16 images
    assert not [p for p in (tmp_path / "work" / "samples").rglob("*") if p.is_file()]
    assert "Traceback" not in (tmp_path / "server.log").read_text()  # a cancel, not a failure


def test_a_file_where_the_work_folder_keeps_a_folder_is_one_line(tmp_path):
    (tmp_path / "deltas").write_text("x")
    with pytest.raises(UserError, match="deltas is a file where the app keeps a folder"):
        Workdir(tmp_path)
