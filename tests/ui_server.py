"""Helpers of the UI tests: start `customdiff ui` as a real process, talk to its JSON API, pick a toy concept."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UIServer:
    """`customdiff ui --base BASE` (toy unless given) in a subprocess, on a free port, over `workdir`."""

    def __init__(self, workdir: Path, log: Path, base: str = "toy"):
        self.workdir, self.log_path, self.port, self.base = workdir, log, free_port(), base
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> UIServer:
        """Start the server and wait until it answers."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
        self.log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "customdiff", "ui", "--base", self.base, "--port", str(self.port),
             "--workdir", str(self.workdir)], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"customdiff ui exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.get("/api/health").get("ok"):
                    return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"customdiff ui did not answer in {timeout} s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 120.0) -> int:
        """Ctrl-C the server (a running job checkpoints) and wait for it to exit; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                ) -> tuple[int, bytes]:
        """Status and body of one request (errors included, not raised)."""
        h = {"X-Customdiff": "1", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str) -> Any:
        """GET JSON."""
        status, body = self.request("GET", path)
        assert status == 200, (status, body)
        return json.loads(body)

    def post_json(self, path: str, obj: Any) -> tuple[int, Any]:
        """POST JSON; status and decoded answer."""
        status, body = self.request("POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})
        return status, json.loads(body)

    def post_form(self, path: str, fields: dict[str, Any], files: list[tuple[str, str, bytes]]) -> tuple[int, Any]:
        """POST multipart/form-data: `files` as (field, file name, bytes)."""
        boundary = uuid.uuid4().hex
        parts = []
        for k, v in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        for field, name, data in files:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, answer = self.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(answer)

    def wait_job(self, job_id: str, until: Any, timeout: float = 300.0) -> dict[str, Any]:
        """Poll the job until `until(job)` holds; the job."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            job = next(j for j in self.get("/api/jobs")["jobs"] if j["id"] == job_id)
            if until(job):
                return job
            if job["state"] == "failed":
                raise AssertionError(f"job failed: {job['error']}")
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not reach the state in {timeout} s: {job}")

    def wait_task(self, task_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll a library task until it is done or failed; its record."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            t = self.get(f"/api/tasks/{task_id}")
            if t["state"] in ("done", "failed"):
                return t
            time.sleep(0.1)
        raise AssertionError(f"task {task_id} did not finish in {timeout} s")

    def run_task(self, path: str, body: dict[str, Any], timeout: float = 120.0) -> Any:
        """POST a library task (merge, compress, export, sample), wait for it to succeed; its result."""
        status, r = self.post_json(path, body)
        assert status == 200, r
        t = self.wait_task(r["task"], timeout)
        assert t["state"] == "done", t["error"]
        return t["result"]


def toy_concept() -> tuple[Path, str]:
    """A toy concept with at least 3 photos and toy class images: its photo folder and class word."""
    from customdiff.toy import paths

    root = Path(paths()["concepts"])
    for e in json.loads((root / "dataset.json").read_text()):
        photos = root / e["instance_data_dir"]
        cls = e["class_prompt"].split()[-1]
        if len([p for p in photos.iterdir() if p.suffix == ".png"]) >= 3 and (root / "class_images" / cls).is_dir():
            return photos, cls
    raise AssertionError("no toy concept with 3 photos and class images")
