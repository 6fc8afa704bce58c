"""Killed runs: kill -9 the whole workflow during slicing, feature extraction and decoder training.

After each kill the next run (`snakemake --unlock`, then the same command) cleans what the killed one
left, and the last one ends with the same `metrics.csv` as an uninterrupted run (`make test-slow`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from cldf.catalogue import Catalogue

from .workflow_utils import REPO, SNAKEMAKE, TINY, artifact, run_snakemake, tiny_config

pytestmark = pytest.mark.slow

RESULTS = "results"
LEFTOVER_TAGS = (".tmp-", ".buffers-")


def _leftovers(work: Path) -> list[Path]:
    return [p for p in (work / RESULTS).rglob(".*") if any(tag in p.name for tag in LEFTOVER_TAGS)]


def _kill_when(work: Path, config: Path, ready: Callable[[], bool], what: str, timeout: float = 900) -> None:
    """Start the workflow, SIGKILL its whole process group as soon as ``ready()``, and check it was killed."""
    env = {**os.environ, "PATH": f"{Path(SNAKEMAKE[0]).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "workflow/Snakefile"), "--directory", str(work), "--configfile",
           str(config), "--cores", "2"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the workflow ended before it could be killed during {what}"


def _any(work: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any((work / RESULTS).glob(pattern))


def _decoder_training(work: Path) -> Callable[[], bool]:
    log = work / Catalogue(RESULTS).log(Catalogue(RESULTS).path("tuning", dataset="synthetic", cam="layercam"))
    return lambda: log.exists() and "decoder epoch 1" in log.read_text(errors="replace")


def test_killed_three_times_then_resumed_gives_the_uninterrupted_table(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    run_snakemake(tiny_config(reference, {"results_dir": RESULTS}, base=TINY), ["--cores", "2"], timeout=1500)
    expected = artifact(reference, "metrics", RESULTS, dataset="synthetic").read_text()

    work = tmp_path / "killed"
    work.mkdir()
    config = tiny_config(work, {"results_dir": RESULTS}, base=TINY)
    points = [
        ("slicing", _any(work, "synthetic/shards/slices/.*.buffers-*")),
        ("feature extraction", _any(work, "synthetic/shards/features/.*.tmp-*/layer_0")),
        ("decoder training", _decoder_training(work)),
    ]
    for what, ready in points:
        _kill_when(work, config, ready, what)
        if what != "decoder training":
            assert _leftovers(work), f"a kill during {what} should leave a half-written temporary"
        run_snakemake(config, ["--unlock"])
    run_snakemake(config, ["--cores", "2"], timeout=1500)
    assert _leftovers(work) == []
    assert artifact(work, "metrics", RESULTS, dataset="synthetic").read_text() == expected
