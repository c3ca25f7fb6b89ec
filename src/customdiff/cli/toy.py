"""The `toy` subcommand: facts about the embedded toy world."""

from __future__ import annotations

import argparse
import json


def _cmd_toy(a: argparse.Namespace) -> None:
    from ..toy import paths

    print(json.dumps(paths()))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `toy`."""
    y = sub.add_parser("toy", help="the embedded toy world", description="The embedded toy world.")
    y.add_argument("what", choices=["paths"], help="paths: print JSON with the toy base, CLIP and concepts")
    y.set_defaults(func=_cmd_toy)
