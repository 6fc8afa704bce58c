"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real BraTS 2018 and FLARE-like samples); skip if absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real-data tests need {data} (the shared data directory beside the repository)")
    return data
