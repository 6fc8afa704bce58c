"""The full demo (synthetic phantom, CPU preset, the shipped config) through the whole workflow.

One real run (several minutes on 2 cores, `make test-slow`) is shared by the tests of this module: the
method's quality on the phantom is asserted on it. The mechanics (table shape, caching, re-runs,
determinism) are asserted on the tiny run of `tests/test_e2e.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from cldf.segment.features import iter_feature_batches
from cldf.store import MapStore, SliceStore, read_ground_truth

from .workflow_utils import artifact, run_snakemake, tiny_config

pytestmark = pytest.mark.slow

BASELINES_WITHOUT_CL = ["GradCAM", "GradCAM++", "ScoreCAM", "LayerCAM", "MG", "CDM saliency"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directory of one full run of the shipped default configuration."""
    workdir = tmp_path_factory.mktemp("demo")
    config = tiny_config(workdir, base={})
    run_snakemake(config, ["--cores", "2"], timeout=2400)
    return workdir


def _table(demo: Path) -> pd.DataFrame:
    table = pd.read_csv(artifact(demo, "metrics", dataset="synthetic")).set_index("method")
    print("\n" + table.round(3).to_string())
    return table


def test_table_shape(demo: Path) -> None:
    table = pd.read_csv(artifact(demo, "metrics", dataset="synthetic"))
    assert list(table.columns) == ["method", "cam", "n_slices", "dice_mean", "dice_std", "iou_mean", "iou_std",
                                   "hd95_mean", "hd95_std", "fp_rate_neg"]
    assert set(BASELINES_WITHOUT_CL + ["CLDF", "LayerCAM+CL", "MG+CL", "FSL UNet (upper bound)"]) == set(table.method)
    assert table.n_slices.nunique() == 1 and table.n_slices.iloc[0] > 10
    assert table[["dice_mean", "iou_mean", "hd95_mean"]].notna().all().all()
    per_slice = pd.read_csv(artifact(demo, "metrics_per_slice", dataset="synthetic"))
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


def test_maps_concentrate_on_the_tumour(demo: Path) -> None:
    slices = SliceStore(artifact(demo, "slices", dataset="synthetic"))
    ids = slices.indices(split="test", labels=[1])
    gt = read_ground_truth(artifact(demo, "slices", dataset="synthetic"), ids).astype(bool)
    body = slices.body(ids)
    for path, margin in [(artifact(demo, "map", dataset="synthetic", map="cams/layercam"), 2.0), (artifact(demo, "map", dataset="synthetic", map="mean_gradient"), 2.0)]:
        maps = MapStore(path).read("maps", ids).astype(np.float32)
        inside, outside = maps[gt].mean(), maps[body & ~gt].mean()
        print(f"{path.name}: mean inside tumour {inside:.3f}, outside (in the body) {outside:.3f}")
        assert inside > margin * outside, path.name


def test_features_separate_tumour_from_background(demo: Path) -> None:
    """A check of the features only (the method never uses masks): a linear probe on labelled pixels."""
    slices = SliceStore(artifact(demo, "slices", dataset="synthetic"))
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for split in ("train", "test"):
        ids = slices.indices(split=split, labels=[1])
        gt = read_ground_truth(artifact(demo, "slices", dataset="synthetic"), ids).astype(bool)
        body = slices.body(ids)
        feats = np.concatenate([f.numpy() for _, f in iter_feature_batches(
            artifact(demo, "map", dataset="synthetic", map="features"), ids, 8, slices.image_size, "cpu")])  # (B, D, H, W)
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


def test_cdm_samples_of_the_positive_class_are_brighter(demo: Path, tmp_path: Path) -> None:
    """Class-conditional samples: y=1 has more hyperintense FLAIR than y=0 (tumour-like structure)."""
    import torch

    from cldf.models.sample import save_sample_grid

    assert (artifact(demo, "cdm_samples", dataset="synthetic")).stat().st_size > 10_000
    stats = save_sample_grid(artifact(demo, "model", dataset="synthetic", model="cdm"), tmp_path / "grid.png", 16,
                             torch.device("cpu"), 1)
    print(stats)
    assert stats["bright_fraction_y1"] > stats["bright_fraction_y0"]
