"""Shared fixtures. The real data lives beside the repo in ``../shared/data`` (override: PANCLS_DATA)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    return Path(os.environ.get("PANCLS_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; fails (not skips) with a clear message when it is missing."""
    root = _shared_data_dir()
    if not (root / "SOURCES.md").exists():
        pytest.fail(f"real test data not found at {root}; set PANCLS_DATA to the shared/data folder")
    return root


@pytest.fixture(scope="session")
def ct_data(shared_data: Path) -> Path:
    return shared_data / "ct"


@pytest.fixture(scope="session")
def cifar10_npz(shared_data: Path) -> Path:
    return shared_data / "cifar10.npz"
