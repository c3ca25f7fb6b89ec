"""Shared fixtures: tiny pipelines and concept folders, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and several torch processes with 2 threads each on a
# 2-core machine slow down ~10x from oversubscription (the 2-process accelerate test, subprocess tests).
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(1)

from tiny import make_images, make_reg_dir, make_tiny_pipeline, make_tiny_xl_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A tiny random SD pipeline folder."""
    return str(make_tiny_pipeline(tmp_path_factory.mktemp("base") / "pipe", seed=0))


@pytest.fixture(scope="session")
def tiny_xl_base(tmp_path_factory) -> str:
    """A tiny random SDXL pipeline folder."""
    return str(make_tiny_xl_pipeline(tmp_path_factory.mktemp("xlbase") / "pipe", seed=0))


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> str:
    """Another tiny pipeline with the same architecture but different weights."""
    return str(make_tiny_pipeline(tmp_path_factory.mktemp("other") / "pipe", seed=1))


@pytest.fixture(scope="session")
def concept_dirs(tmp_path_factory) -> dict[str, str]:
    """Three concept folders and one regularization folder."""
    root = tmp_path_factory.mktemp("data")
    return {
        "a": str(make_images(root / "a", 4, (230, 40, 40), seed=10)),
        "b": str(make_images(root / "b", 4, (40, 40, 230), seed=11)),
        "c": str(make_images(root / "c", 4, (40, 230, 40), seed=12)),
        "reg": str(make_reg_dir(root / "reg", 6, "photo of a cat", seed=13)),
    }


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSTOMDIFF_CACHE", str(tmp_path / "cache"))
