"""Tests of cldf.evaluate (metrics, table, figures) and cldf.segment.baselines on tiny synthetic stores."""

from __future__ import annotations

import inspect
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import cldf.store
from cldf.evaluate.figures import choose_rows, figure_grid, grid_size_pixels
from cldf.evaluate.metrics import image_diagonal, slice_metrics
from cldf.evaluate.selection_study import COLUMNS as SELECTION_COLUMNS
from cldf.evaluate.selection_study import selection_table
from cldf.evaluate.table import TABLE_COLUMNS, bootstrap_indices, evaluate
from cldf.segment import baselines
from cldf.segment.baselines import run_threshold_baseline, threshold_map
from cldf.store import SliceStore, StoreError, TestTruth

from .fixtures_slices import write_map_store, write_slice_store, write_test_truth

SIZE = 32
# (case split, per-slice target half-widths; 0 = no target, 1 = a 2x2 target: ambiguous)
CASES = [("train", [0, 6, 8, 0]), ("test", [0, 5, 9, 7, 1, 0]), ("test", [0, 8, 6, 0, 4])]


def _square(size: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def _make_slices(path: Path) -> Path:
    """A slices with 3 cases; labels from the target fraction (1 % rule), body = central disk."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    body = (yy - SIZE / 2 + 0.5) ** 2 + (xx - SIZE / 2 + 0.5) ** 2 < (SIZE / 2 - 1) ** 2
    rows = []
    for c, (split, widths) in enumerate(CASES):
        for z, w in enumerate(widths):
            gt = _square(SIZE, SIZE // 2 - w, SIZE // 2 - w + c, 2 * w, 2 * w) if w else np.zeros((SIZE, SIZE), bool)
            fraction = gt.mean()
            label = 1 if fraction > 0.01 else (-1 if fraction > 0 else 0)
            rows.append((c, z, split, label, gt))
    images = np.stack([np.stack([np.where(body, -0.5, -1.0) + r[4], -(np.where(body, -0.5, -1.0) + r[4])])
                       for r in rows])
    cases = [{"id": f"case{c}", "index": c, "split": s, "shape": [SIZE, SIZE, len(w)], "affine": np.eye(4).tolist(),
              "spacing": [1.0, 1.0, 1.0]} for c, (s, w) in enumerate(CASES)]
    return write_slice_store(path, images, [r[3] for r in rows], [r[0] for r in rows], [s for s, _ in CASES],
                             np.stack([r[4] for r in rows]), body=np.broadcast_to(body, (len(rows), SIZE, SIZE)),
                             slice_index=[r[1] for r in rows], cases=cases)


@pytest.fixture()
def slices_path(tmp_path: Path) -> Path:
    return _make_slices(tmp_path / "slices")


# ----------------------------------------------------------------------------------------- metrics


def test_overlapping_squares_dice_iou_by_hand() -> None:
    a = _square(SIZE, 4, 4, 10, 10)
    b = _square(SIZE, 9, 4, 10, 10)  # shifted by 5 rows: |A and B| = 50
    inner = _square(SIZE, 5, 5, 8, 8)  # inside a: |A and inner| = 64
    frame = slice_metrics(np.stack([a, a]), np.stack([b, inner]))
    assert list(frame.columns) == ["dice", "iou", "hd95"]
    assert frame["dice"].tolist() == pytest.approx([2 * 50 / 200, 2 * 64 / 164])
    assert frame["iou"].tolist() == pytest.approx([50 / 150, 64 / 100])


def test_hd95_of_shifted_square_is_the_shift() -> None:
    a = _square(SIZE, 4, 4, 12, 12)
    for shift in (1, 3, 5):
        b = _square(SIZE, 4 + shift, 4, 12, 12)
        frame = slice_metrics(a[None], b[None])
        assert frame["hd95"].iloc[0] == pytest.approx(shift)
        assert slice_metrics(a[None], b[None], spacing=2.0)["hd95"].iloc[0] == pytest.approx(2 * shift)
    same = slice_metrics(a[None], a[None])
    assert same.iloc[0].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_empty_mask_conventions() -> None:
    empty = np.zeros((SIZE, SIZE), dtype=bool)
    square = _square(SIZE, 3, 3, 6, 6)
    frame = slice_metrics(np.stack([empty, empty, square]), np.stack([empty, square, empty]))
    diagonal = math.hypot(SIZE, SIZE)
    assert image_diagonal((SIZE, SIZE)) == pytest.approx(diagonal)
    assert frame.iloc[0].tolist() == pytest.approx([1.0, 1.0, 0.0])  # both empty
    assert frame.iloc[1].tolist() == pytest.approx([0.0, 0.0, diagonal])  # prediction missed the target
    assert frame.iloc[2].tolist() == pytest.approx([0.0, 0.0, diagonal])  # false positive
    assert np.isfinite(frame.to_numpy()).all()


def test_slice_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must both be"):
        slice_metrics(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 9), bool))


# ------------------------------------------------------------------------------------------- table


@pytest.fixture()
def truth(tmp_path: Path, slices_path: Path) -> Path:
    return write_test_truth(slices_path, tmp_path / "truth")


def _gt(slices_path: Path, ids: np.ndarray) -> np.ndarray:
    return np.asarray(zarr.open_group(str(slices_path), mode="r")["ground_truth/masks"][:])[ids]


def _rows(tmp: Path, slices_path: Path) -> list[dict]:
    test = SliceStore(slices_path).indices(split="test")
    gt = _gt(slices_path, test)
    stores = {"perfect": write_map_store(tmp / "perfect", test, masks=gt),
              "empty": write_map_store(tmp / "empty", test, masks=np.zeros_like(gt)),
              "full": write_map_store(tmp / "full", test[::-1].copy(), masks=np.ones_like(gt))}
    return [{"protocol": p, "method": m, "cam": "layercam" if m == "empty" else "", "masks": str(path),
             "array": "masks", "gated": m != "full"} for p in ("labelled", "unlabelled") for m, path in stores.items()]


def _evaluate(tmp: Path, slices_path: Path, truth: Path, probs: np.ndarray, gate: float = 0.5) -> pd.DataFrame:
    test = SliceStore(slices_path).indices(split="test")
    probs_path = write_map_store(tmp / "probs", test, probs=probs.astype(np.float32))
    outputs = {name: tmp / "out" / f"{name}.csv" for name in ("metrics", "per_slice", "per_case", "differences")}
    evaluate(slices_path, truth, probs_path, gate, _rows(tmp, slices_path), {"method": "perfect", "cam": ""}, outputs,
             500, seed=0)
    table = pd.read_csv(outputs["metrics"], keep_default_na=False)
    return table.replace("", np.nan).apply(lambda col: pd.to_numeric(col) if col.name in TABLE_COLUMNS[3:] else col)


def test_table_under_both_protocols(tmp_path: Path, slices_path: Path, truth: Path) -> None:
    store = SliceStore(slices_path)
    test = store.indices(split="test")
    table = _evaluate(tmp_path, slices_path, truth, np.ones(len(test)))  # the gate passes every slice
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table[["protocol", "method"]].values.tolist() == [
        [p, m] for p in ("labelled", "unlabelled") for m in ("perfect", "empty", "full")]
    n_pos = len(store.indices(split="test", labels=[1]))
    assert (table.n_slices == n_pos).all() and (table.n_cases == 2).all()
    lab = table[table.protocol == "labelled"].set_index("method")
    assert tuple(lab.loc["perfect", ["dice_mean", "iou_mean", "hd95_mean", "dice_std"]]) == (1.0, 1.0, 0.0, 0.0)
    assert tuple(lab.loc["perfect", ["dice_ci_low", "dice_ci_high"]]) == (1.0, 1.0)
    assert lab.loc["empty", "dice_mean"] == 0.0 and lab.loc["empty", "hd95_mean"] == pytest.approx(math.hypot(SIZE, SIZE))
    gt_area = _gt(slices_path, test).reshape(len(test), -1).sum(1)
    pos = store.labels[test] == 1
    expected = 2 * gt_area[pos] / (gt_area[pos] + SIZE * SIZE)
    assert lab.loc["full", "dice_mean"] == pytest.approx(expected.mean())
    assert lab.loc["full", "dice_ci_low"] <= lab.loc["full", "dice_mean"] <= lab.loc["full", "dice_ci_high"]
    assert lab.fp_rate_neg.isna().all() and lab.gate_sensitivity.isna().all()
    unl = table[table.protocol == "unlabelled"].set_index("method")
    assert unl.loc["full", "fp_rate_neg"] == 1.0 and unl.loc["perfect", "fp_rate_neg"] == 0.0
    assert (unl.loc["perfect", "gate_sensitivity"], unl.loc["perfect", "gate_specificity"]) == (1.0, 0.0)
    assert np.isnan(unl.loc["full", "gate_sensitivity"])  # an ungated row (like the fully supervised UNet)


def test_unlabelled_gate_empties_the_slices_it_rejects(tmp_path: Path, slices_path: Path, truth: Path) -> None:
    store = SliceStore(slices_path)
    test = store.indices(split="test")
    positive = store.labels[test] == 1
    probs = np.where(positive, 0.9, 0.1)
    probs[np.flatnonzero(positive)[0]] = 0.2  # one positive slice rejected by the gate
    table = _evaluate(tmp_path, slices_path, truth, probs)
    unl = table[table.protocol == "unlabelled"].set_index("method")
    assert unl.loc["perfect", "dice_mean"] == pytest.approx((positive.sum() - 1) / positive.sum())
    assert unl.loc["perfect", "gate_sensitivity"] == pytest.approx((positive.sum() - 1) / positive.sum())
    assert unl.loc["perfect", "gate_specificity"] == 1.0
    assert unl.loc["full", "dice_mean"] == table[table.protocol == "labelled"].set_index("method").loc["full", "dice_mean"]
    differences = pd.read_csv(tmp_path / "out" / "differences.csv", keep_default_na=False)
    assert len(differences) == 4 and set(differences.method) == {"perfect"}
    lab_empty = differences[(differences.protocol == "labelled") & (differences.other == "empty")].iloc[0]
    assert (lab_empty.diff_mean, lab_empty.ci_low, lab_empty.ci_high) == (1.0, 1.0, 1.0)
    per_case = pd.read_csv(tmp_path / "out" / "per_case.csv")
    assert set(per_case.case) == {"case1", "case2"} and len(per_case) == 2 * 6


def test_bootstrap_interval_is_seeded_and_covers_the_case_means() -> None:
    a, b = bootstrap_indices(5, 100, 0), bootstrap_indices(5, 100, 0)
    assert np.array_equal(a, b) and a.shape == (100, 5) and a.max() < 5
    assert not np.array_equal(a, bootstrap_indices(5, 100, 1))


def test_table_rejects_store_missing_test_slices(tmp_path: Path, slices_path: Path, truth: Path) -> None:
    test = SliceStore(slices_path).indices(split="test")
    partial = write_map_store(tmp_path / "partial", test[:-2], masks=np.zeros((len(test) - 2, SIZE, SIZE), np.uint8))
    probs = write_map_store(tmp_path / "probs", test, probs=np.ones(len(test), np.float32))
    rows = [{"protocol": "labelled", "method": "p", "cam": "", "masks": str(partial), "array": "masks", "gated": True}]
    outputs = {name: tmp_path / f"{name}.csv" for name in ("metrics", "per_slice", "per_case", "differences")}
    with pytest.raises(StoreError, match="has no entry for slice"):
        evaluate(slices_path, truth, probs, 0.5, rows, {"method": "p", "cam": ""}, outputs, 10, 0)
    assert not (tmp_path / "metrics.csv").exists()


def test_table3_names_each_selection_and_scores_it(tmp_path: Path, slices_path: Path, truth: Path) -> None:
    test = SliceStore(slices_path).indices(split="test")
    gt = _gt(slices_path, test)
    cam = write_map_store(tmp_path / "cam", test, masks=np.zeros_like(gt))
    decoders = write_map_store(tmp_path / "decoders", test, CLDF=gt, cam_cl=np.ones_like(gt), mg_cl=np.zeros_like(gt))
    rows = [{"protocol": "labelled", "method": "gradcam", "cam": "gradcam", "masks": str(cam), "array": "masks",
             "gated": True}]
    rows += [{"protocol": "labelled", "method": m, "cam": "gradcam", "masks": str(decoders), "array": m, "gated": True}
             for m in ("cam_cl", "mg_cl", "CLDF")]
    table = selection_table(slices_path, truth, rows, tmp_path / "table3.csv", 100, 0)
    assert list(table.columns) == list(SELECTION_COLUMNS)
    assert list(table.selection) == ["CAM alone", "CAM + CL", "MG + CL", "CAM ∧ MG + CL"]
    assert list(table.dice_mean.round(6)) == [0.0, round(float(table.dice_mean[1]), 6), 0.0, 1.0]
    assert 0 < table.dice_mean[1] < 1 and pd.read_csv(tmp_path / "table3.csv").equals(table)
    with pytest.raises(ValueError, match="labelled protocol only"):
        selection_table(slices_path, truth, [{**rows[0], "protocol": "unlabelled"}], tmp_path / "x.csv", 10, 0)


# --------------------------------------------------------------------------------------- baselines


def test_threshold_map_on_bimodal_map() -> None:
    rng = np.random.default_rng(0)
    body = np.zeros((SIZE, SIZE), dtype=bool)
    body[2:30, 2:30] = True
    target = _square(SIZE, 8, 10, 9, 7)
    bimodal = np.where(target, 0.85, 0.15) + rng.normal(0, 0.03, (SIZE, SIZE))
    bimodal[~body] = 1.0  # outside the body: ignored however bright
    constant = np.full((SIZE, SIZE), 0.4)
    masks = threshold_map(np.stack([bimodal, constant]).astype(np.float16), np.stack([body, body]))
    assert masks.dtype == bool and masks.shape == (2, SIZE, SIZE)
    np.testing.assert_array_equal(masks[0], target)
    assert not masks[1].any()
    np.testing.assert_array_equal(threshold_map(bimodal[None], body[None], 0.5)[0], target)
    assert threshold_map(bimodal[None], body[None], 0.05)[0].sum() == body.sum()


def test_threshold_baseline_never_reads_ground_truth(tmp_path: Path, slices_path: Path) -> None:
    assert "ground_truth" not in inspect.getsource(baselines)
    blind = tmp_path / "blind"  # the ground truth removed from the store itself: any read would fail
    shutil.copytree(slices_path, blind)
    shutil.rmtree(blind / cldf.store.GROUND_TRUTH)
    store = SliceStore(blind)
    ids = np.array([6, 5, 7, 12, 9], dtype=np.int64)  # global ids, deliberately unsorted
    body = store.body(ids)
    target = _square(SIZE, 10, 10, 8, 8)
    maps = np.where(target, 0.9, 0.1)[None].repeat(len(ids), 0).astype(np.float16)
    map_path = write_map_store(tmp_path / "map", ids, maps=maps)
    run_threshold_baseline(blind, map_path, tmp_path / "masks", ids[::-1], threshold=0.5, batch_size=2)
    out = cldf.store.open_store(tmp_path / "masks")
    np.testing.assert_array_equal(out["slice_ids"][:], ids[::-1])
    assert out["masks"].dtype == np.uint8
    np.testing.assert_array_equal(out["masks"][:].astype(bool), target[None] & body)
    run_threshold_baseline(blind, None, tmp_path / "dark", ids, intensity=(1, "dark"))
    images = store.images(ids)  # channel 1 is the negated image: its dark side is the target
    expected = threshold_map(-images[:, 1], body, "otsu")
    np.testing.assert_array_equal(cldf.store.open_store(tmp_path / "dark")["masks"][:].astype(bool), expected)


# ----------------------------------------------------------------------------------------- figures


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return height, width


def test_figure_grid(tmp_path: Path, slices_path: Path, truth: Path) -> None:
    store = SliceStore(slices_path)
    test = store.indices(split="test")
    gt = _gt(slices_path, test)
    rows = choose_rows(slices_path, TestTruth(truth), 4, seed=0)
    assert len(rows) == 4 and set(store.case_index[rows]) == {1, 2}
    assert (store.labels[rows] == 1).all()
    assert np.array_equal(rows, choose_rows(slices_path, TestTruth(truth), 4, seed=0))
    rng = np.random.default_rng(1)
    panels = {
        "CAM": write_map_store(tmp_path / "cam", test, maps=rng.random((len(test), SIZE, SIZE)).astype(np.float16)),
        "selection": write_map_store(tmp_path / "sel", test, fg=gt, bg=1 - gt),
        "MG": lambda ids: np.full((len(ids), SIZE, SIZE), 0.5, dtype=np.float32),
        "CLDF": (str(write_map_store(tmp_path / "cldf", test, CLDF=gt)), "CLDF"),
    }
    out = tmp_path / "fig" / "grid.png"
    figure_grid(slices_path, truth, panels, out, n_rows=4)
    assert _png_size(out) == grid_size_pixels(4, 2 + len(panels))
