"""A sharded map step killed with SIGKILL leaves no store; re-running it gives the uninterrupted result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cldf.models.builders import build_model
from cldf.models.checkpoint import save_checkpoint
from cldf.store import MapStore, StoreError, open_store

from .fixtures_slices import make_slices

CDM = {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1, "num_head_channels": 8}


@pytest.mark.slow  # 22 s: make test-slow, with the workflow's other kill tests
def test_killed_feature_shard_is_never_consumed_and_rerun_matches(tmp_path: Path) -> None:
    slices = make_slices(tmp_path / "slices", n_cases=4, slices_per_case=40, size=32)
    cdm = build_model("cdm", CDM, 2)
    save_checkpoint(tmp_path / "cdm.pt", {"kind": "cdm", "settings": CDM, "in_channels": 2, "image_size": 32,
                                          "state_dict": cdm.state_dict()})
    settings = {"timesteps": [1, 10, 50, 100], "layers": ["up_blocks.0", "up_blocks.1"], "batch_size": 2,
                "rows": "all", "max_train_slices": 1000}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "cldf.cli", "map", "--map", "features", "--slices", str(slices), "--model",
                str(tmp_path / "cdm.pt"), "--settings", json.dumps(settings), "--cases", "0,1,2,3",
                "--out", str(out), "--device", "cpu", "--seed", "0", "--threads", "1"]

    out = tmp_path / "shard"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".shard.tmp-*/layer_0/c/*")) and time.time() < deadline:
        time.sleep(0.05)  # wait until rows are being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the step finished before it could be killed"
    assert not out.exists()
    try:
        open_store(out)
        raise AssertionError("a killed step's output was readable")
    except StoreError:
        pass

    subprocess.run(cmd(out), check=True, capture_output=True)
    reference = tmp_path / "reference"
    subprocess.run(cmd(reference), check=True, capture_output=True)
    assert not list(tmp_path.glob(".*.tmp-*")), "temporary stores left behind"
    a, b = MapStore(out), MapStore(reference)
    assert np.array_equal(a.slice_ids, b.slice_ids) and len(a.slice_ids) == 160
    for name in ("layer_0", "layer_1"):
        assert np.array_equal(a.group[name][:], b.group[name][:])
