"""Slow, real-data checks of the models on 4 BraTS 2018 cases (../shared): run with `make test-slow`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldf.config import dataset_settings, load_config, model_settings
from cldf.data.slices import build_shard, gather
from cldf.io.layouts import list_cases
from cldf.models.sample import save_sample_grid
from cldf.models.train import train_model

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def brats_slices(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config()
    ds = dataset_settings(cfg, "brats18_shared")
    ds["root"] = str(shared_data / "brats18")
    ds["max_cases"] = 4
    cases = list_cases(ds)
    ds["split"] = {"val_fraction": 0, "test_fraction": 0, "seed": 0, "val_cases": [cases[-1]], "test_cases": []}
    tmp = tmp_path_factory.mktemp("brats")
    build_shard(ds, cases, cases, tmp / "shard")
    gather([tmp / "shard"], tmp / "slices", tmp / "truth", tmp / "slices.csv", tmp / "skipped.csv", ds["split"])
    return tmp / "slices"


def _settings(kind: str) -> dict:
    return {**model_settings(load_config(), kind), "image_size": 64}


def test_cam_classifier_reaches_auc_09(brats_slices: Path, tmp_path: Path) -> None:
    metrics = train_model("cam_classifier", brats_slices, _settings("cam_classifier"), tmp_path / "cam.pt", CPU, 0)
    print(metrics)
    assert metrics["val_auc"] >= 0.9


def test_noisy_classifier_beats_chance_at_low_noise(brats_slices: Path, tmp_path: Path) -> None:
    metrics = train_model("noisy_classifier", brats_slices, _settings("noisy_classifier"), tmp_path / "nc.pt", CPU, 0)
    print(metrics)
    assert metrics["val_auc_t_le_200"] >= 0.75


def test_cdm_samples_differ_by_class(brats_slices: Path, tmp_path: Path) -> None:
    train_model("cdm", brats_slices, _settings("cdm"), tmp_path / "cdm.pt", CPU, 0)
    stats = save_sample_grid(tmp_path / "cdm.pt", tmp_path / "samples.png", 8, CPU, 0)
    print(stats)
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert stats["bright_fraction_y1"] > stats["bright_fraction_y0"]
