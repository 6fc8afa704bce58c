"""The comparison table: every method's masks against the ground truth on the test split.

Protocol (the predecessors' one, plus two additions):

* positive test slices (label 1): Dice, IoU and HD95 per slice, reported as mean and standard deviation
  (population std, ``ddof=0``) over those slices; ``n_slices`` is their number;
* negative test slices (label 0): ``fp_rate_neg`` = fraction of them with at least one predicted
  foreground pixel (NaN when the test split has no negative slice);
* ambiguous test slices (label -1, target below the positive fraction) appear in the per-slice CSV only.

Empty-mask conventions and HD95 units: see :mod:`cldf.evaluate.metrics`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cldf.evaluate.metrics import slice_metrics
from cldf.store import MapStore, SliceStore, StoreError, read_ground_truth

TABLE_COLUMNS = (
    "method", "cam", "n_slices", "dice_mean", "dice_std", "iou_mean", "iou_std",
    "hd95_mean", "hd95_std", "fp_rate_neg",
)
PER_SLICE_COLUMNS = (
    "method", "slice_id", "case", "slice_index", "label", "dice", "iou", "hd95", "pred_pixels", "gt_pixels",
)


def _open_masks(method: str, path: str | os.PathLike, test_ids: np.ndarray, size: int) -> MapStore:
    store = MapStore(path)
    if "masks" not in store.group:
        raise StoreError(f"method {method!r}: {path} holds no 'masks' array")
    shape = tuple(store.group["masks"].shape[1:])
    if shape != (size, size):
        raise StoreError(f"method {method!r}: masks in {path} are {shape}, the slices are {(size, size)}")
    missing = np.setdiff1d(test_ids, store.slice_ids)
    if len(missing):
        raise StoreError(
            f"method {method!r}: {path} lacks {len(missing)} of {len(test_ids)} test slices "
            f"(e.g. slice ids {missing[:5].tolist()}); segment the whole test split"
        )
    return store


def _write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summarise(per_slice: pd.DataFrame, methods: dict[str, dict]) -> pd.DataFrame:
    """One row per method (in ``methods`` order) with the :data:`TABLE_COLUMNS` from per-slice metrics."""
    rows = []
    for name, spec in methods.items():
        mine = per_slice[per_slice["method"] == name]
        pos = mine[mine["label"] == 1]
        neg = mine[mine["label"] == 0]
        row: dict[str, object] = {"method": name, "cam": spec.get("cam", ""), "n_slices": len(pos)}
        for metric in ("dice", "iou", "hd95"):
            values = pos[metric].to_numpy(dtype=np.float64)
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = float(values.std()) if len(values) else float("nan")
        row["fp_rate_neg"] = float((neg["pred_pixels"] > 0).mean()) if len(neg) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def evaluate_methods(
    slices_path: str | os.PathLike,
    methods: dict[str, dict],
    out_csv: str | os.PathLike,
    out_per_slice_csv: str | os.PathLike,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Evaluate every method's masks store on the test split and write both CSVs atomically.

    Parameters
    ----------
    slices_path
        the slice store; its ground truth is read here (evaluation is allowed to).
    methods
        ``{method name: {"masks": path of a masks store (slice_ids, masks uint8 (N, H, W)),
        "cam": CAM name or ""}}``; table rows keep this order.
    out_csv
        ``metrics.csv``: one row per method, columns :data:`TABLE_COLUMNS`.
    out_per_slice_csv
        ``metrics_per_slice.csv``: one row per (method, test slice), columns :data:`PER_SLICE_COLUMNS`.
    batch_size
        Test slices read at a time (ground truth once per batch, shared by all methods).

    Returns
    -------
    The table written to ``out_csv``.
    """
    if not methods:
        raise ValueError("no methods to evaluate")
    slices = SliceStore(slices_path)
    test_ids = slices.indices(split="test")
    if len(test_ids) == 0:
        raise StoreError(f"{slices_path} has no test slices")
    stores = {name: _open_masks(name, spec["masks"], test_ids, slices.image_size) for name, spec in methods.items()}
    case_ids = np.asarray([str(case["id"]) for case in slices.cases], dtype=object)

    parts: list[pd.DataFrame] = []
    for start in range(0, len(test_ids), batch_size):
        batch = test_ids[start : start + batch_size]
        gt = read_ground_truth(slices_path, batch).astype(bool)
        for name, store in stores.items():
            pred = store.read("masks", batch).astype(bool)
            frame = slice_metrics(pred, gt)
            frame.insert(0, "method", name)
            frame.insert(1, "slice_id", batch)
            frame.insert(2, "case", case_ids[slices.case_index[batch]])
            frame.insert(3, "slice_index", slices.slice_index[batch])
            frame.insert(4, "label", slices.labels[batch].astype(np.int64))
            frame["pred_pixels"] = pred.reshape(len(batch), -1).sum(axis=1)
            frame["gt_pixels"] = gt.reshape(len(batch), -1).sum(axis=1)
            parts.append(frame)

    order = {name: k for k, name in enumerate(methods)}
    per_slice = pd.concat(parts, ignore_index=True)
    per_slice = per_slice.sort_values(
        ["method", "slice_id"], key=lambda col: col.map(order) if col.name == "method" else col, kind="stable"
    ).reset_index(drop=True)[list(PER_SLICE_COLUMNS)]
    table = summarise(per_slice, methods)
    _write_csv_atomic(per_slice, out_per_slice_csv)
    _write_csv_atomic(table, out_csv)
    return table
