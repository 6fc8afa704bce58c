"""Training resumes after a crash or a SIGKILL and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cldf.models.checkpoint import load_checkpoint
from cldf.models.train import resume_path, train_model
from tests.fixtures_slices import make_slices

CPU = torch.device("cpu")
NET = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8}
SETTINGS = {
    "cdm": {**NET, "steps": 12, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 4, "ema_decay": 0.9,
            "class_dropout": 0.3},
    "noisy_classifier": {**NET, "steps": 12, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 4},
}


class Crash(RuntimeError):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    return make_slices(tmp_path_factory.mktemp("slices") / "slices", n_cases=6, slices_per_case=16,
                       splits=("train",) * 4 + ("val", "test"))


def assert_same_weights(a: Path, b: Path) -> None:
    pa, pb = load_checkpoint(a), load_checkpoint(b)
    for key in ("state_dict", "ema_state_dict"):
        if pa[key] is None:
            assert pb[key] is None
            continue
        assert pa[key].keys() == pb[key].keys()
        for name in pa[key]:
            torch.testing.assert_close(pa[key][name], pb[key][name], rtol=0, atol=1e-6, msg=f"{key}.{name}")


@pytest.mark.parametrize("kind", ["cdm", "noisy_classifier"])
def test_resume_after_crash_matches_uninterrupted(kind, slices, tmp_path):
    settings = SETTINGS[kind]
    train_model(kind, slices, settings, tmp_path / "full.pt", CPU, seed=3)

    def crash_at_10(step: int, loss: float) -> None:
        if step == 10:
            raise Crash("simulated crash")

    out = tmp_path / "resumed.pt"
    with pytest.raises(Crash):
        train_model(kind, slices, settings, out, CPU, seed=3, on_step=crash_at_10)
    assert not out.exists()
    assert load_checkpoint(resume_path(out))["step"] == 8
    metrics = train_model(kind, slices, settings, out, CPU, seed=3)
    assert metrics["resumed_from_step"] == 8
    assert not resume_path(out).exists()
    assert_same_weights(tmp_path / "full.pt", out)
    assert out.with_suffix(".loss.csv").read_text() == (tmp_path / "full.loss.csv").read_text()


def test_resume_file_of_another_run_is_ignored(slices, tmp_path):
    settings = SETTINGS["noisy_classifier"]
    out = tmp_path / "m.pt"

    def crash_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        train_model("noisy_classifier", slices, settings, out, CPU, seed=1, on_step=crash_at_5)
    assert resume_path(out).exists()
    with pytest.warns(UserWarning, match="different run"):
        metrics = train_model("noisy_classifier", slices, settings, out, CPU, seed=2)
    assert metrics["resumed_from_step"] == 0
    train_model("noisy_classifier", slices, settings, tmp_path / "fresh.pt", CPU, seed=2)
    assert_same_weights(out, tmp_path / "fresh.pt")


@pytest.mark.slow  # 17 s: make test-slow (resume after a crash is tested above)
def test_resume_after_sigkill(slices, tmp_path):
    settings = {"widen_factor": 0.25, "steps": 200, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 10}
    out = tmp_path / "killed.pt"
    cmd = [sys.executable, "-m", "cldf.cli", "train", "--kind", "cam_classifier", "--slices", str(slices),
           "--out", str(out), "--settings", json.dumps(settings), "--device", "cpu", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not resume_path(out).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not out.exists()
    killed_at = load_checkpoint(resume_path(out))["step"]
    assert 0 < killed_at < settings["steps"]
    metrics = train_model("cam_classifier", slices, settings, out, CPU, seed=5)
    assert metrics["resumed_from_step"] == killed_at
    train_model("cam_classifier", slices, settings, tmp_path / "full.pt", CPU, seed=5)
    assert_same_weights(tmp_path / "full.pt", out)
