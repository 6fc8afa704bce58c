"""End to end: the demo configuration (synthetic phantom, CPU preset) through the whole workflow.

One real run (several minutes on 2 cores) is shared by the tests of this module: the comparison
table, the cached maps, the NIfTI export, partial re-runs and determinism are all asserted on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from cldf.io.layouts import case_files
from cldf.segment.features import iter_feature_batches
from cldf.store import MapStore, SliceStore, read_ground_truth

from .workflow_utils import planned_jobs, run_snakemake, tiny_config

BASELINES_WITHOUT_CL = ["GradCAM", "GradCAM++", "ScoreCAM", "LayerCAM", "MG", "CDM saliency"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directory of one full run of the shipped default configuration."""
    workdir = tmp_path_factory.mktemp("demo")
    config = tiny_config(workdir, base={})
    run_snakemake(config, ["--cores", "2"], timeout=2400)
    return workdir


def _table(demo: Path) -> pd.DataFrame:
    table = pd.read_csv(demo / "results/synthetic/metrics.csv").set_index("method")
    print("\n" + table.round(3).to_string())
    return table


def test_table_shape(demo: Path) -> None:
    table = pd.read_csv(demo / "results/synthetic/metrics.csv")
    assert list(table.columns) == ["method", "cam", "n_slices", "dice_mean", "dice_std", "iou_mean", "iou_std",
                                   "hd95_mean", "hd95_std", "fp_rate_neg"]
    assert set(BASELINES_WITHOUT_CL + ["CLDF", "LayerCAM+CL", "MG+CL", "FSL UNet (upper bound)"]) == set(table.method)
    assert table.n_slices.nunique() == 1 and table.n_slices.iloc[0] > 10
    assert table[["dice_mean", "iou_mean", "hd95_mean"]].notna().all().all()
    per_slice = pd.read_csv(demo / "results/synthetic/metrics_per_slice.csv")
    assert len(per_slice) > len(table) * table.n_slices.iloc[0]  # negatives and ambiguous slices too


def test_cldf_beats_every_baseline_without_contrastive_learning(demo: Path) -> None:
    table = _table(demo)
    cldf = table.loc["CLDF", "dice_mean"]
    for name in BASELINES_WITHOUT_CL:
        assert cldf > table.loc[name, "dice_mean"], f"CLDF {cldf:.3f} <= {name} {table.loc[name, 'dice_mean']:.3f}"


def test_contrastive_learning_improves_the_map_it_starts_from(demo: Path) -> None:
    table = _table(demo)
    assert table.loc["LayerCAM+CL", "dice_mean"] > table.loc["LayerCAM", "dice_mean"]
    assert table.loc["MG+CL", "dice_mean"] > table.loc["MG", "dice_mean"]


def test_upper_bound_is_the_fully_supervised_unet(demo: Path) -> None:
    table = _table(demo)
    assert table.loc["FSL UNet (upper bound)", "dice_mean"] > table.loc["CLDF", "dice_mean"]


def test_cached_stores_have_one_entry_per_slice(demo: Path) -> None:
    res = demo / "results/synthetic"
    slices = SliceStore(res / "slices.zarr")
    for path in [res / "features.zarr", res / "mean_gradient.zarr", *sorted((res / "cams").glob("*.zarr"))]:
        store = MapStore(path)
        assert np.array_equal(store.slice_ids, np.arange(slices.n)), path
        for name, array in store.group.arrays():
            assert np.isfinite(np.asarray(array[:], dtype=np.float32)).all(), f"{path}/{name}"
    features = MapStore(res / "features.zarr")
    assert features.attrs["D"] == sum(features.attrs["channels"])


def test_maps_concentrate_on_the_tumour(demo: Path) -> None:
    res = demo / "results/synthetic"
    slices = SliceStore(res / "slices.zarr")
    ids = slices.indices(split="test", labels=[1])
    gt = read_ground_truth(res / "slices.zarr", ids).astype(bool)
    body = slices.body(ids)
    for path, margin in [(res / "cams/layercam.zarr", 2.0), (res / "mean_gradient.zarr", 2.0)]:
        maps = MapStore(path).read("maps", ids).astype(np.float32)
        inside, outside = maps[gt].mean(), maps[body & ~gt].mean()
        print(f"{path.name}: mean inside tumour {inside:.3f}, outside (in the body) {outside:.3f}")
        assert inside > margin * outside, path.name


def test_features_separate_tumour_from_background(demo: Path) -> None:
    """A check of the features only (the method never uses masks): a linear probe on labelled pixels."""
    res = demo / "results/synthetic"
    slices = SliceStore(res / "slices.zarr")
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for split in ("train", "test"):
        ids = slices.indices(split=split, labels=[1])
        gt = read_ground_truth(res / "slices.zarr", ids).astype(bool)
        body = slices.body(ids)
        feats = np.concatenate([f.numpy() for _, f in iter_feature_batches(
            res / "features.zarr", ids, 8, slices.image_size, "cpu")])  # (B, D, H, W)
        pix = feats.transpose(0, 2, 3, 1)
        fg, bg = np.argwhere(gt), np.argwhere(body & ~gt)
        pick_fg = fg[rng.choice(len(fg), 500, replace=len(fg) < 500)]
        pick_bg = bg[rng.choice(len(bg), 500, replace=False)]
        xs.append(np.concatenate([pix[tuple(pick_fg.T)], pix[tuple(pick_bg.T)]]))
        ys.append(np.r_[np.ones(500), np.zeros(500)])
    probe = LogisticRegression(max_iter=2000).fit(xs[0], ys[0])
    accuracy = probe.score(xs[1], ys[1])
    print(f"linear probe on test pixels: accuracy {accuracy:.3f}")
    assert accuracy > 0.8


def test_nifti_masks_are_in_the_original_geometry(demo: Path) -> None:
    res = demo / "results/synthetic"
    slices = SliceStore(res / "slices.zarr")
    test_cases = {slices.cases[i]["id"] for i in np.unique(slices.case_index[slices.indices(split="test")])}
    written = sorted(p.name for p in (res / "cldf/layercam/nifti").glob("*.nii.gz"))
    assert written == sorted(f"{c}.nii.gz" for c in test_cases)
    ds = {"layout": "synthetic", "root": str(res / "raw"), "modalities": slices.modalities, "name": "synthetic"}
    for case in test_cases:
        mask = nib.load(res / "cldf/layercam/nifti" / f"{case}.nii.gz")
        flair = nib.load(case_files(ds, case)["flair"])
        assert mask.shape == flair.shape
        assert np.allclose(mask.affine, flair.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_switching_the_cam_reuses_models_features_and_gradients(demo: Path) -> None:
    config = tiny_config(demo, {"cldf": {"cam": "gradcam"}}, base={})
    try:
        jobs = planned_jobs(config)
    finally:
        tiny_config(demo, base={})
    print(dict(jobs))
    for reused in ["phantom", "slices_shard", "slices", "train_model", "features_shard", "gradient_shard",
                   "cam_shard", "probs_shard", "saliency_shard", "gather_map", "cdm_samples", "fsl_masks",
                   "baseline_masks", "decoder_mg", "segment_shard_mg", "masks_mg"]:
        assert jobs.get(reused, 0) == 0, f"{reused} would re-run after switching cldf.cam"
    for rerun in ["decoder_fused", "segment_shard_fused", "decoder_cam", "metrics", "figure", "nifti"]:
        assert jobs.get(rerun, 0) >= 1, f"{rerun} should re-run after switching cldf.cam"


def test_changing_feature_timesteps_reruns_features_not_cams(demo: Path) -> None:
    config = tiny_config(demo, {"features": {"timesteps": [1, 10, 50]}}, base={})
    try:
        jobs = planned_jobs(config)
    finally:
        tiny_config(demo, base={})
    print(dict(jobs))
    assert jobs.get("features_shard", 0) >= 1 and jobs.get("decoder_fused", 0) == 1
    for reused in ["train_model", "cam_shard", "gradient_shard", "saliency_shard", "baseline_masks"]:
        assert jobs.get(reused, 0) == 0, f"{reused} would re-run after changing features.timesteps"


def test_same_seed_gives_the_same_table(demo: Path) -> None:
    """Re-train the decoders, re-segment and re-evaluate: the table is identical."""
    res = demo / "results/synthetic"
    before = (res / "metrics.csv").read_text()
    shutil.copy(res / "metrics.csv", demo / "metrics_before.csv")
    config = tiny_config(demo, base={})
    run_snakemake(config, ["--cores", "2", "--forcerun", "decoder_fused", "decoder_cam", "decoder_mg",
                           "baseline_masks", "--", "results/synthetic/metrics.csv"])
    assert (res / "metrics.csv").read_text() == before


def test_cdm_samples_of_the_positive_class_are_brighter(demo: Path, tmp_path: Path) -> None:
    """Class-conditional samples: y=1 has more hyperintense FLAIR than y=0 (tumour-like structure)."""
    import torch

    from cldf.models.sample import save_sample_grid

    assert (demo / "results/synthetic/models/cdm_samples.png").stat().st_size > 10_000
    stats = save_sample_grid(demo / "results/synthetic/models/cdm.pt", tmp_path / "grid.png", 16,
                             torch.device("cpu"), 1)
    print(stats)
    assert stats["bright_fraction_y1"] > stats["bright_fraction_y0"]
