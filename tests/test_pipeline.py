"""The full demo (synthetic phantom, CPU preset, the shipped config) through the whole workflow.

Two fresh runs (several minutes each on 2 cores, `make test-slow`): the second must give byte-identical
tables, the README's demo tables must be what `cldf tables` prints for the first (its default target plus
the levers and Tables 2 and 3), and the method's
behaviour on the phantom is asserted on it. The mechanics (table shape, caching, re-runs) are asserted on
the tiny run of `tests/test_e2e.py`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from cldf.evaluate.readme import machine, read_block, shape
from cldf.segment.features import StoredFeatures
from cldf.store import MapStore, SliceStore, TestTruth, read_ground_truth

from .workflow_utils import REPO, artifact, run_snakemake, tiny_config

pytestmark = pytest.mark.slow

DS = "synthetic"
TABLES = ["metrics", "metrics_per_case", "differences", "selection", "metrics_3d"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directory of one full run of the shipped default configuration."""
    workdir = tmp_path_factory.mktemp("demo")
    config = tiny_config(workdir, base={})
    run_snakemake(config, ["--cores", "2"], timeout=3000)
    run_snakemake(config, ["--cores", "2", "--", *(str(artifact(workdir, name, dataset=DS).relative_to(workdir))
                                                   for name in ("ablation", "table2", "table3", "cdm_samples"))],
                  timeout=3000)
    return workdir


def _table(demo: Path, protocol: str = "labelled") -> pd.DataFrame:
    table = pd.read_csv(artifact(demo, "metrics", dataset=DS), keep_default_na=False)
    # CLDF and its ablations from the default CAM (LayerCAM); the rows from AME-CAM (cldf.extra_cams) aside
    other_cam = table.method.isin(["CLDF", "cam_cl", "mg_cl"]) & (table.cam != "layercam")
    table = table[(table.protocol == protocol) & ~other_cam].set_index("method")
    print("\n" + table[["cam", "dice_mean", "dice_ci_low", "dice_ci_high"]].to_string())
    return table


def _tables(demo: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "cldf.cli", "tables", str(artifact(demo, "metrics", dataset=DS).parent)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return res.stdout


def test_a_second_fresh_run_gives_byte_identical_tables(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    again = tmp_path_factory.mktemp("again")
    run_snakemake(tiny_config(again, base={}), ["--cores", "2", "--", *(
        str(artifact(again, name, dataset=DS).relative_to(again)) for name in TABLES)], timeout=3000)
    for name in TABLES:
        assert artifact(again, name, dataset=DS).read_bytes() == artifact(demo, name, dataset=DS).read_bytes(), name


def test_readme_shows_the_tables_of_a_fresh_demo(demo: Path) -> None:
    """Number for number on the machine the README's demo tables name; elsewhere their shape only (floats
    round differently on other CPUs, see cldf/evaluate/readme.py)."""
    block, fresh = read_block((REPO / "README.md").read_text(), "demo"), _tables(demo).strip()
    redo = "run `cldf readme-tables results/synthetic --tag demo` after `make demo`"
    assert shape(block.body) == shape(fresh), f"the README's demo tables have another shape: {redo}"
    if block.machine != machine():
        pytest.skip(f"the README's demo numbers come from {block.machine}, this is {machine()}: shape checked only")
    assert block.body == fresh, f"the README's demo tables differ from a fresh demo's: {redo}"


def test_phantom_test_split_has_at_least_eight_tumour_cases(demo: Path) -> None:
    table = _table(demo)
    assert (table.n_cases >= 8).all()


def test_cldf_clears_the_maps_it_learns_from_and_the_intensity_floor(demo: Path) -> None:
    for protocol in ("labelled", "unlabelled"):
        table = _table(demo, protocol)
        for row in ("layercam", "mean_gradient", "intensity", "cdm_saliency"):
            assert table.loc["CLDF", "dice_mean"] > table.loc[row, "dice_mean"], (protocol, row)
    labelled = _table(demo)
    cams = ["gradcam", "gradcampp", "scorecam", "layercam", "amecam"]
    assert (labelled.loc["fsl_unet", "dice_mean"] > labelled.loc[cams, "dice_mean"]).all()  # the upper bound


def test_maps_concentrate_on_the_tumour(demo: Path) -> None:
    slices = SliceStore(artifact(demo, "slices", dataset=DS))
    truth = TestTruth(artifact(demo, "test_truth", dataset=DS))
    ids = truth.slice_ids[truth.labels == 1]
    gt, body = truth.masks(ids), slices.body(ids)
    for name in ("cams/layercam", "mean_gradient"):
        maps = MapStore(artifact(demo, "map", dataset=DS, map=name)).read("maps", ids).astype(np.float32)
        inside, outside = maps[gt].mean(), maps[body & ~gt].mean()
        print(f"{name}: mean inside tumour {inside:.3f}, outside (in the body) {outside:.3f}")
        assert inside > 2.0 * outside, name


def test_features_separate_tumour_from_background(demo: Path) -> None:
    """A check of the features only (the method never uses masks): a linear probe on labelled pixels,
    fitted on training slices and scored on validation slices (the cached ones)."""
    slices = SliceStore(artifact(demo, "slices", dataset=DS))
    features = StoredFeatures(artifact(demo, "map", dataset=DS, map="features"), slices.image_size, "cpu")
    cached = MapStore(artifact(demo, "map", dataset=DS, map="features")).slice_ids
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for split in ("train", "val"):
        ids = np.intersect1d(slices.indices(split=split, labels=[1]), cached)
        gt = read_ground_truth(artifact(demo, "slices", dataset=DS), ids).astype(bool)
        body = slices.body(ids)
        pix = np.concatenate([f.numpy() for _, f in features.batches(ids, 8)]).transpose(0, 2, 3, 1)
        fg, bg = np.argwhere(gt), np.argwhere(body & ~gt)
        pick_fg = fg[rng.choice(len(fg), 500, replace=len(fg) < 500)]
        pick_bg = bg[rng.choice(len(bg), 500, replace=False)]
        xs.append(np.concatenate([pix[tuple(pick_fg.T)], pix[tuple(pick_bg.T)]]))
        ys.append(np.r_[np.ones(500), np.zeros(500)])
    accuracy = LogisticRegression(max_iter=2000).fit(xs[0], ys[0]).score(xs[1], ys[1])
    print(f"linear probe on validation pixels: accuracy {accuracy:.3f}")
    assert accuracy > 0.8


def test_cdm_samples_of_the_positive_class_are_brighter(demo: Path, tmp_path: Path) -> None:
    """Class-conditional samples: y=1 has more hyperintense FLAIR than y=0 (tumour-like structure)."""
    import torch

    from cldf.models.sample import save_sample_grid

    assert artifact(demo, "cdm_samples", dataset=DS).stat().st_size > 10_000
    stats = save_sample_grid(artifact(demo, "model", dataset=DS, model="cdm"), tmp_path / "grid.png", 16,
                             torch.device("cpu"), 1)
    print(stats)
    assert stats["bright_fraction_y1"] > stats["bright_fraction_y0"]
