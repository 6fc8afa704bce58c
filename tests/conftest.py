"""Shared pytest fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SLURM_LOCAL = Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"
ETC_SLURM_CONF = Path("/etc/slurm/slurm.conf")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove what an interrupted ``make test-slow`` left of its local SLURM (tests/test_slurm.py).

    Killed while its cluster was up, it leaves /etc/slurm/slurm.conf linked to a controller that is gone,
    and snakemake-executor-plugin-slurm runs ``scontrol show config`` at the import, so every snakemake
    start then waits 9 s for it (the suite starts snakemake a few dozen times). ``slurm-local.sh stop``
    removes only what its ``start`` made (a link elsewhere is another SLURM's and stays); a cluster that
    is up is left alone.
    """
    if not ETC_SLURM_CONF.is_symlink():
        return
    if subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True).returncode == 0:
        return
    stop = subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, text=True)
    if not ETC_SLURM_CONF.is_symlink():
        print(f"conftest: {ETC_SLURM_CONF} linked to a local SLURM that is not running; "
              f"{SLURM_LOCAL.name} stop: {(stop.stdout + stop.stderr).strip()}", file=sys.stderr)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real BraTS 2018 and FLARE-like samples); skip if absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real-data tests need {data} (the shared data directory beside the repository)")
    return data


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (real-data training)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test (real data, long training or kill -9); run with --run-slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def one_thread():
    """Tiny nets run fastest on one thread, and do not stall when other jobs load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
