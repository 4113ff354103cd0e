"""Settings shared by every suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.startup import free_port  # noqa: F401 (the suites import it from here)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"

# The embedder and the demo weights are local files; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT
