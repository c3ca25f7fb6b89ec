"""The `ui` subcommand: the local web app (customdiff.ui)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from .flags import add_base, add_device, device


def _cmd_ui(a: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"the web app needs the ui extra ({e.name} is missing): pip install 'customdiff[ui]'") from None
    from ..ui.app import serve

    def ready(url: str) -> None:
        print(f"customdiff ui: open {url} (work folder {a.workdir}); Ctrl-C stops, a running job keeps a "
              "checkpoint and continues at the next start", flush=True)

    try:
        serve(base=a.base, host=a.host, port=a.port, workdir=a.workdir, device=device(a.device), ready=ready)
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its clean shutdown
        pass


def register(sub: argparse._SubParsersAction) -> None:
    """Add `ui`."""
    u = sub.add_parser("ui", help="a local web app: teach, watch, sample, merge and download in the browser",
                       description="Start a local web app: upload photos and teach a concept (one training job "
                       "at a time, a queue for more, live progress and preview grids), sample with the deltas, "
                       "and manage the library (merge, compress, export as LoRA, download, delete). Files live "
                       "under --workdir; stopping the server mid-training keeps a checkpoint that the job resumes "
                       "from at the next start.")
    add_base(u, required=False, default="toy")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 exposes the app to your network, without any login)")
    u.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    u.add_argument("--workdir", default="customdiff-ui", help="folder of uploads, jobs, deltas and samples "
                   "(default: ./customdiff-ui)")
    add_device(u)
    u.set_defaults(func=_cmd_ui)
