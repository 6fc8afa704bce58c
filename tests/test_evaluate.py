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

import cldf.store
from cldf.evaluate.figures import choose_rows, figure_grid, grid_size_pixels
from cldf.evaluate.metrics import image_diagonal, slice_metrics
from cldf.evaluate.table import PER_SLICE_COLUMNS, TABLE_COLUMNS, evaluate_methods
from cldf.segment import baselines
from cldf.segment.baselines import POSITIVE_PROBABILITY, run_threshold_baseline, threshold_map
from cldf.store import SliceStore, StoreError, read_ground_truth

from .fixtures_slices import write_map_store, write_slice_store

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


def _method_stores(tmp: Path, slices_path: Path) -> dict[str, dict]:
    store = SliceStore(slices_path)
    test = store.indices(split="test")
    gt = read_ground_truth(slices_path, test)
    return {
        "perfect": {"masks": write_map_store(tmp / "perfect", test, masks=gt), "cam": ""},
        "empty": {"masks": write_map_store(tmp / "empty", test, masks=np.zeros_like(gt)), "cam": "layercam"},
        "full": {"masks": write_map_store(tmp / "full", test[::-1].copy(), masks=np.ones_like(gt)), "cam": ""},
    }


def test_table_aggregation(tmp_path: Path, slices_path: Path) -> None:
    methods = _method_stores(tmp_path, slices_path)
    out, per = tmp_path / "out" / "metrics.csv", tmp_path / "out" / "metrics_per_slice.csv"
    returned = evaluate_methods(slices_path, methods, out, per, batch_size=4)
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["method"].tolist() == ["perfect", "empty", "full"]
    assert table["cam"].tolist() == ["", "layercam", ""]
    store = SliceStore(slices_path)
    n_pos = len(store.indices(split="test", labels=[1]))
    assert (table["n_slices"] == n_pos).all()
    perfect, empty, full = (table.iloc[k] for k in range(3))
    assert (perfect["dice_mean"], perfect["iou_mean"], perfect["hd95_mean"]) == (1.0, 1.0, 0.0)
    assert (perfect["dice_std"], perfect["fp_rate_neg"]) == (0.0, 0.0)
    assert (empty["dice_mean"], empty["iou_mean"], empty["fp_rate_neg"]) == (0.0, 0.0, 0.0)
    assert empty["hd95_mean"] == pytest.approx(math.hypot(SIZE, SIZE))
    assert full["fp_rate_neg"] == 1.0
    test = store.indices(split="test")
    gt_area = read_ground_truth(slices_path, test).reshape(len(test), -1).sum(1)
    pos = store.labels[test] == 1
    expected_dice = 2 * gt_area[pos] / (gt_area[pos] + SIZE * SIZE)
    assert full["dice_mean"] == pytest.approx(expected_dice.mean())
    assert full["dice_std"] == pytest.approx(expected_dice.std())
    pd.testing.assert_frame_equal(returned, table, check_dtype=False)

    rows = pd.read_csv(per)
    assert list(rows.columns) == list(PER_SLICE_COLUMNS)
    assert len(rows) == 3 * len(test)
    assert set(rows["label"]) == {-1, 0, 1}  # ambiguous slices are listed
    assert rows[rows["method"] == "full"]["slice_id"].tolist() == test.tolist()
    assert (rows[rows["method"] == "full"]["pred_pixels"] == SIZE * SIZE).all()
    assert rows["gt_pixels"].tolist() == np.tile(gt_area, 3).tolist()
    assert set(rows["case"]) == {"case1", "case2"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.csv", "metrics_per_slice.csv"]


def test_table_rejects_store_missing_test_slices(tmp_path: Path, slices_path: Path) -> None:
    test = SliceStore(slices_path).indices(split="test")
    partial = write_map_store(tmp_path / "partial", test[:-2], masks=np.zeros((len(test) - 2, SIZE, SIZE), np.uint8))
    with pytest.raises(StoreError, match="lacks 2 of"):
        evaluate_methods(slices_path, {"p": {"masks": partial, "cam": ""}}, tmp_path / "m.csv", tmp_path / "s.csv")
    assert not (tmp_path / "m.csv").exists()


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
    with pytest.raises(ValueError, match="unknown threshold rule"):
        threshold_map(constant[None], body[None], rule="magic")


def test_threshold_baseline_never_reads_ground_truth(
    tmp_path: Path, slices_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("baseline code read the ground truth")

    monkeypatch.setattr(cldf.store, "read_ground_truth", forbidden)
    assert "read_ground_truth" not in inspect.getsource(baselines)
    # Remove the ground truth from the store itself: any read would fail.
    blind = tmp_path / "blind"
    shutil.copytree(slices_path, blind)
    shutil.rmtree(blind / cldf.store.GROUND_TRUTH)

    store = SliceStore(blind)
    ids = np.array([6, 5, 7, 12, 9], dtype=np.int64)  # global ids, deliberately unsorted
    body = store.body(ids)
    target = _square(SIZE, 10, 10, 8, 8)
    maps = np.where(target, 0.9, 0.1)[None].repeat(len(ids), 0).astype(np.float16)
    map_path = write_map_store(tmp_path / "map", ids, maps=maps)
    probs = np.array([0.9, 0.2, POSITIVE_PROBABILITY, 0.7, 0.1], dtype=np.float32)
    cam_path = write_map_store(tmp_path / "cam", ids, maps=maps, probs=probs)

    run_threshold_baseline(blind, map_path, tmp_path / "masks", batch_size=2)
    out = cldf.store.open_store(tmp_path / "masks")
    np.testing.assert_array_equal(out["slice_ids"][:], ids)
    assert out["masks"].dtype == np.uint8
    np.testing.assert_array_equal(out["masks"][:].astype(bool), target[None] & body)

    run_threshold_baseline(blind, cam_path, tmp_path / "gated", slice_ids=ids[::-1], probs_path=cam_path)
    gated = cldf.store.open_store(tmp_path / "gated")
    np.testing.assert_array_equal(gated["slice_ids"][:], ids[::-1])
    kept = gated["masks"][:].reshape(len(ids), -1).any(1)
    np.testing.assert_array_equal(kept, (probs >= POSITIVE_PROBABILITY)[::-1])


# ----------------------------------------------------------------------------------------- figures


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return height, width


def test_figure_grid(tmp_path: Path, slices_path: Path) -> None:
    store = SliceStore(slices_path)
    test = store.indices(split="test")
    gt = read_ground_truth(slices_path, test)
    rows = choose_rows(slices_path, 4, seed=0)
    assert len(rows) == 4 and set(store.case_index[rows]) == {1, 2}
    assert (store.labels[rows] == 1).all()
    assert np.array_equal(rows, choose_rows(slices_path, 4, seed=0))
    rng = np.random.default_rng(1)
    panels = {
        "CAM": write_map_store(tmp_path / "cam", test, maps=rng.random((len(test), SIZE, SIZE)).astype(np.float16)),
        "selection": write_map_store(tmp_path / "sel", test, fg=gt, bg=1 - gt),
        "MG": lambda ids: np.full((len(ids), SIZE, SIZE), 0.5, dtype=np.float32),
        "CLDF": write_map_store(tmp_path / "cldf", test, masks=gt),
    }
    out = tmp_path / "fig" / "grid.png"
    figure_grid(slices_path, panels, out, n_rows=4)
    assert _png_size(out) == grid_size_pixels(4, 2 + len(panels))
