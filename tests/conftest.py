"""Shared fixtures: the real data of ../shared/data, and one tiny ingested dataset that the
training, evaluation and registry tests reuse (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (tests use the real data beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def teacher():
    from clipgs.models.teacher import Teacher

    return Teacher()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, teacher) -> Path:
    """Primitives (4 per class) ingested into shards, with the default teacher."""
    from clipgs.config import IngestConfig
    from clipgs.data.ingest import ingest
    from clipgs.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny")
    src = generate(root / "primitives", per_class=6, gaussians=1024)
    ingest(str(src), str(root / "shards"), IngestConfig(shard_size=12), teacher=teacher)
    return root / "shards"
