"""Distributed training: two CPU processes (Gloo) launched by torchrun; only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from cldf.models.checkpoint import load_checkpoint, load_model
from cldf.models.train import resume_path
from tests.fixtures_slices import make_slices


def test_torchrun_two_cpu_processes(tmp_path):
    slices = make_slices(tmp_path / "slices", n_cases=6, slices_per_case=12, splits=("train",) * 4 + ("val", "test"))
    settings = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
                "steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 3, "ema_decay": 0.9, "class_dropout": 0.1}
    out = tmp_path / "models" / "cdm.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cldf.cli", "train", "--kind", "cdm", "--slices", str(slices), "--out", str(out),
           "--settings", json.dumps(settings), "--device", "cpu", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6 and metrics["val_eps_mse"] > 0
    assert not resume_path(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["cdm.json", "cdm.loss.csv", "cdm.loss.png", "cdm.pt"]
    assert load_checkpoint(out)["step"] == 6
    model = load_model(out, torch.device("cpu"))
    x = torch.zeros(2, 2, 16, 16)
    assert model(x, timesteps=torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).shape == x.shape
