"""End to end on the tiny configuration `.test/config.yaml` (the run `make test` does).

One real run of the whole default target (small phantom, briefly trained models, a results directory
whose name holds a space and shell characters) is shared by the tests of this module: the table, the
cached maps, the NIfTI export, partial re-runs, determinism and the absence of leftovers. The quality
of the method is asserted on the full demo (`tests/test_pipeline.py`, `make test-slow`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from cldf.catalogue import Catalogue
from cldf.config import DEFAULT_CONFIG, deep_merge
from cldf.io.layouts import case_files
from cldf.plan import Plan
from cldf.registry import MAPS
from cldf.store import MapStore, SliceStore

from .workflow_utils import TEST_CONFIG, planned_jobs, run_snakemake

CONFIG = deep_merge(yaml.safe_load(DEFAULT_CONFIG.read_text()), yaml.safe_load(TEST_CONFIG.read_text()))
CAT = Catalogue(CONFIG["results_dir"])
DS = "synthetic"


def _config(work: Path, overrides: dict | None = None) -> Path:
    """The .test config (plus overrides) as <work>/config/config.yaml."""
    path = work / "config" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(TEST_CONFIG.read_text()), overrides or {})))
    return path


def _path(work: Path, name: str, **wildcards: object) -> Path:
    return work / CAT.path(name, dataset=DS, **wildcards)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directory of one full run of the default target with the .test configuration."""
    work = tmp_path_factory.mktemp("e2e")
    run_snakemake(_config(work), ["--cores", "2"], timeout=1500)
    return work


def test_table_has_every_registered_row(work: Path) -> None:
    table = pd.read_csv(_path(work, "metrics"))
    assert list(table.columns) == ["method", "cam", "n_slices", "dice_mean", "dice_std", "iou_mean", "iou_std",
                                   "hd95_mean", "hd95_std", "fp_rate_neg"]
    assert set(table.method) == set(Plan(CONFIG).table_rows(DS))
    assert {"CLDF", "LayerCAM+CL", "MG+CL", "FSL UNet (upper bound)", "GradCAM++"} <= set(table.method)
    assert table.n_slices.nunique() == 1 and table.n_slices.iloc[0] > 0
    assert table.dice_mean.between(0, 1).all() and (table.hd95_mean >= 0).all()
    per_slice = pd.read_csv(_path(work, "metrics_per_slice"))
    assert set(per_slice.method) == set(table.method)


def test_cached_maps_have_one_entry_per_slice(work: Path) -> None:
    slices = SliceStore(_path(work, "slices"))
    for method in MAPS.values():
        if method.family == "cam" and method.name not in CONFIG["cams"]["methods"]:
            continue
        store = MapStore(_path(work, "map", map=method.store))
        expected = slices.indices(split=None if method.splits is None else list(method.splits))
        assert np.array_equal(store.slice_ids, expected), method.name
        for name, array in store.group.arrays():
            assert np.isfinite(np.asarray(array[:], dtype=np.float32)).all(), f"{method.name}/{name}"


def test_nifti_masks_are_in_the_original_geometry(work: Path) -> None:
    slices = SliceStore(_path(work, "slices"))
    test_cases = {slices.cases[i]["id"] for i in np.unique(slices.case_index[slices.indices(split="test")])}
    folder = _path(work, "nifti", cam=CONFIG["cldf"]["cam"])
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in test_cases)
    ds = {**CONFIG["datasets"][DS], "root": str(work / CONFIG["datasets"][DS]["root"]), "name": DS}
    for case in test_cases:
        mask, flair = nib.load(folder / f"{case}.nii.gz"), nib.load(case_files(ds, case)["flair"])
        assert mask.shape == flair.shape and np.allclose(mask.affine, flair.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_every_job_logged_and_nothing_half_written_left(work: Path) -> None:
    results = work / CONFIG["results_dir"]
    leftovers = [p for p in results.rglob(".*") if ".tmp-" in p.name or ".buffers-" in p.name]
    assert leftovers == []
    assert not (results / DS / "shards").exists() or not any((results / DS / "shards").rglob("zarr.json"))
    logs = list((results / "logs").rglob("*.log"))
    assert len(logs) >= 40 and all(p.stat().st_size > 0 for p in logs if "train" in p.name)


def test_switching_the_cam_reuses_models_features_and_gradients(work: Path) -> None:
    jobs = planned_jobs(_config(work, {"cldf": {"cam": "gradcam"}}))
    _config(work)
    print(dict(jobs))
    for reused in ["phantom", "slices_shard", "slices", "train_model", "map_shard", "gather_map", "cdm_samples",
                   "fsl_masks", "baseline_masks", "decoder_mg", "segment_shard_mg", "masks_mg"]:
        assert jobs.get(reused, 0) == 0, f"{reused} would re-run after switching cldf.cam"
    for rerun in ["decoder_fused", "segment_shard_fused", "decoder_cam", "metrics", "figure", "nifti"]:
        assert jobs.get(rerun, 0) >= 1, f"{rerun} should re-run after switching cldf.cam"


def test_changing_feature_timesteps_reruns_features_not_cams(work: Path) -> None:
    jobs = planned_jobs(_config(work, {"features": {"timesteps": [1, 10, 50]}}))
    _config(work)
    print(dict(jobs))
    n_shards = Plan(CONFIG).n_shards(DS)
    assert jobs.get("map_shard", 0) == n_shards and jobs.get("decoder_fused", 0) == 1  # features only
    for reused in ["train_model", "baseline_masks", "fsl_masks"]:
        assert jobs.get(reused, 0) == 0, f"{reused} would re-run after changing features.timesteps"


def test_same_seed_gives_the_same_table(work: Path) -> None:
    """Re-train the decoders, re-segment and re-evaluate: the table is byte-identical."""
    before = _path(work, "metrics").read_text()
    shutil.copy(_path(work, "metrics"), work / "metrics_before.csv")
    run_snakemake(_config(work), ["--cores", "2", "--forcerun", "decoder_fused", "decoder_cam", "decoder_mg",
                                  "baseline_masks", "--", str(CAT.path("metrics", dataset=DS))])
    assert _path(work, "metrics").read_text() == before
