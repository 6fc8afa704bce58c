"""The comparison table: every method's test masks against the test truth, under both protocols.

* ``labelled`` (the paper's protocol): the test slices' image-level labels are known. Dice, IoU and HD95
  per positive test slice (target above the positive fraction); no gate.
* ``unlabelled``: nothing about a test slice is known. Masks of slices the CAM classifier calls negative
  (probability below the gate chosen on validation) are emptied for every row but the fully supervised
  UNet; Dice per positive slice (an empty prediction scores 0), ``fp_rate_neg`` = share of negative test
  slices with any predicted pixel, and the gate's sensitivity / specificity on positive / negative slices.

Every row reports the mean and population std over its positive test slices, ``n_slices``, ``n_cases``
(test cases with a positive slice) and a 95 % bootstrap interval of the mean Dice over cases (``bootstrap``
resamples of the cases, seeded; a resample's mean pools the slices of its cases). The same resamples pair
the rows in ``differences.csv`` (the default CLDF row minus every other row of its protocol).
Empty-mask conventions and HD95 units: see :mod:`cldf.evaluate.metrics`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cldf.atomic import atomic_file
from cldf.evaluate.metrics import slice_metrics
from cldf.store import MapStore, SliceStore, StoreError, TestTruth

TABLE_COLUMNS = (
    "protocol", "method", "cam", "n_cases", "n_slices", "dice_mean", "dice_ci_low", "dice_ci_high", "dice_std",
    "iou_mean", "iou_std", "hd95_mean", "hd95_std", "fp_rate_neg", "gate_sensitivity", "gate_specificity",
)
PER_SLICE_COLUMNS = (
    "protocol", "method", "cam", "slice_id", "case", "slice_index", "label", "dice", "iou", "hd95", "pred_pixels",
    "gt_pixels",
)
PER_CASE_COLUMNS = ("protocol", "method", "cam", "case", "n_slices", "dice_mean", "iou_mean", "hd95_mean")
DIFFERENCE_COLUMNS = ("protocol", "method", "cam", "other", "other_cam", "diff_mean", "ci_low", "ci_high")
KEY = ["protocol", "method", "cam"]


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)


def _masks(row: Mapping[str, Any], ids: np.ndarray) -> np.ndarray:
    store = MapStore(row["masks"])
    array = row.get("array", "masks")
    if array not in store.group:
        raise StoreError(f"method {row['method']!r}: {row['masks']} holds no {array!r} array")
    return store.read(array, ids).astype(bool)


def per_slice_metrics(
    slices_path: str | os.PathLike,
    truth: TestTruth,
    rows: Sequence[Mapping[str, Any]],
    gate: np.ndarray,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Metrics of every row (``protocol``, ``method``, ``cam``, ``masks``, ``array``, ``gated``) on the test
    slices: positive slices under both protocols, negative slices under the unlabelled one.

    ``gate`` bool (M,) over ``truth.slice_ids``: the classifier passes the slice.
    """
    slices = SliceStore(slices_path)
    case_ids = np.asarray([str(c["id"]) for c in slices.cases], dtype=object)
    keep = {"labelled": truth.labels == 1, "unlabelled": truth.labels != -1}
    parts = []
    for start in range(0, len(truth.slice_ids), batch_size):
        batch = truth.slice_ids[start : start + batch_size]
        labels, passed = truth.labels[start : start + batch_size], gate[start : start + batch_size]
        gt = truth.masks(batch)
        for row in rows:
            sel = keep[row["protocol"]][start : start + batch_size]
            if not sel.any():
                continue
            pred = _masks(row, batch)
            if row["protocol"] == "unlabelled" and row["gated"]:
                pred &= passed[:, None, None]
            frame = slice_metrics(pred[sel], gt[sel])
            ids = batch[sel]
            frame = frame.assign(protocol=row["protocol"], method=row["method"], cam=row["cam"], slice_id=ids,
                                 case=case_ids[slices.case_index[ids]], slice_index=slices.slice_index[ids],
                                 label=labels[sel].astype(np.int64), pred_pixels=pred[sel].reshape(sel.sum(), -1).sum(1),
                                 gt_pixels=gt[sel].reshape(sel.sum(), -1).sum(1))
            parts.append(frame)
    order = {(r["protocol"], r["method"], r["cam"]): k for k, r in enumerate(rows)}
    out = pd.concat(parts, ignore_index=True)[list(PER_SLICE_COLUMNS)]
    out["_row"] = [order[k] for k in zip(out.protocol, out.method, out.cam)]
    return out.sort_values(["_row", "slice_id"], kind="stable").drop(columns="_row").reset_index(drop=True)


def bootstrap_indices(n_cases: int, n_resamples: int, seed: int) -> np.ndarray:
    """int (B, n_cases) case indices of ``n_resamples`` resamples with replacement, seeded."""
    return np.random.default_rng([seed, 23]).integers(0, n_cases, size=(n_resamples, n_cases))


def _case_sums(positives: pd.DataFrame, cases: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per case (in ``cases`` order): sum of slice Dice and number of positive slices."""
    grouped = positives.groupby("case")["dice"]
    sums, counts = grouped.sum().reindex(cases, fill_value=0.0), grouped.count().reindex(cases, fill_value=0)
    return sums.to_numpy(np.float64), counts.to_numpy(np.float64)


def _pooled(sums: np.ndarray, counts: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """Pooled mean Dice of each resample (B,)."""
    return sums[resamples].sum(1) / np.maximum(counts[resamples].sum(1), 1)


def summarise(per_slice: pd.DataFrame, rows: Sequence[Mapping[str, Any]], gate: Mapping[str, float], n_resamples: int,
              seed: int) -> pd.DataFrame:
    """One line per row with the :data:`TABLE_COLUMNS`; ``gate``: ``sensitivity``, ``specificity``."""
    positives = per_slice[per_slice["label"] == 1]
    cases = sorted(positives["case"].unique())
    resamples = bootstrap_indices(len(cases), n_resamples, seed)
    lines = []
    for row in rows:
        mine = per_slice[(per_slice.protocol == row["protocol"]) & (per_slice.method == row["method"])
                         & (per_slice.cam == row["cam"])]
        pos, neg = mine[mine.label == 1], mine[mine.label == 0]
        line: dict[str, Any] = {k: row[k] for k in KEY}
        line.update(n_cases=int(pos["case"].nunique()), n_slices=len(pos))
        for metric in ("dice", "iou", "hd95"):
            values = pos[metric].to_numpy(np.float64)
            line[f"{metric}_mean"] = float(values.mean()) if len(values) else np.nan
            line[f"{metric}_std"] = float(values.std()) if len(values) else np.nan
        boot = _pooled(*_case_sums(pos, cases), resamples) if len(cases) else np.array([np.nan])
        line["dice_ci_low"], line["dice_ci_high"] = (float(q) for q in np.percentile(boot, [2.5, 97.5]))
        unlabelled = row["protocol"] == "unlabelled"
        line["fp_rate_neg"] = float((neg["pred_pixels"] > 0).mean()) if unlabelled and len(neg) else np.nan
        gated = unlabelled and row["gated"]
        line["gate_sensitivity"] = gate["sensitivity"] if gated else np.nan
        line["gate_specificity"] = gate["specificity"] if gated else np.nan
        lines.append(line)
    return pd.DataFrame(lines, columns=list(TABLE_COLUMNS))


def per_case(per_slice: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice, IoU and HD95 over each test case's positive slices, per row."""
    positives = per_slice[per_slice["label"] == 1]
    grouped = positives.groupby([*KEY, "case"], sort=False)
    out = grouped.agg(n_slices=("dice", "size"), dice_mean=("dice", "mean"), iou_mean=("iou", "mean"),
                      hd95_mean=("hd95", "mean")).reset_index()
    return out[list(PER_CASE_COLUMNS)]


def differences(per_slice: pd.DataFrame, reference: Mapping[str, str], n_resamples: int, seed: int) -> pd.DataFrame:
    """The reference row (``method``, ``cam``) minus every other row of each protocol, paired by case."""
    positives = per_slice[per_slice["label"] == 1]
    cases = sorted(positives["case"].unique())
    resamples = bootstrap_indices(len(cases), n_resamples, seed)
    lines = []
    for protocol, frame in positives.groupby("protocol", sort=False):
        ref = frame[(frame.method == reference["method"]) & (frame.cam == reference["cam"])]
        if ref.empty:
            continue
        ref_sums, counts = _case_sums(ref, cases)
        for (method, cam), other in frame.groupby(["method", "cam"], sort=False):
            if (method, cam) == (reference["method"], reference["cam"]):
                continue
            other_sums, _ = _case_sums(other, cases)
            diff = _pooled(ref_sums - other_sums, counts, resamples)
            low, high = np.percentile(diff, [2.5, 97.5])
            lines.append({"protocol": protocol, "method": reference["method"], "cam": reference["cam"],
                          "other": method, "other_cam": cam,
                          "diff_mean": float((ref_sums - other_sums).sum() / max(counts.sum(), 1)),
                          "ci_low": float(low), "ci_high": float(high)})
    return pd.DataFrame(lines, columns=list(DIFFERENCE_COLUMNS))


def gate_of(truth: TestTruth, probs_path: str | os.PathLike, threshold: float) -> tuple[np.ndarray, dict[str, float]]:
    """Which test slices pass the classifier gate (bool (M,)), and its sensitivity and specificity."""
    probs = MapStore(probs_path).read("probs", truth.slice_ids)
    passed = probs >= float(threshold)
    pos, neg = truth.labels == 1, truth.labels == 0
    return passed, {"sensitivity": float(passed[pos].mean()) if pos.any() else np.nan,
                    "specificity": float((~passed[neg]).mean()) if neg.any() else np.nan}


def evaluate(
    slices_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    probs_path: str | os.PathLike,
    gate_threshold: float,
    rows: Sequence[Mapping[str, Any]],
    reference: Mapping[str, str],
    outputs: Mapping[str, str | os.PathLike],
    n_resamples: int,
    seed: int,
) -> pd.DataFrame:
    """Evaluate every row on the test split and write ``outputs``: ``metrics``, ``per_slice``, ``per_case``
    and ``differences`` (CSV paths). Returns the table."""
    if not rows:
        raise ValueError("no methods to evaluate")
    truth = TestTruth(truth_path)
    if len(truth.slice_ids) == 0:
        raise StoreError(f"{truth_path} holds no test slice")
    passed, gate = gate_of(truth, probs_path, gate_threshold)
    per_slice = per_slice_metrics(slices_path, truth, rows, passed)
    table = summarise(per_slice, rows, gate, n_resamples, seed)
    write_csv(per_slice, outputs["per_slice"])
    write_csv(per_case(per_slice), outputs["per_case"])
    write_csv(differences(per_slice, reference, n_resamples, seed), outputs["differences"])
    write_csv(table, outputs["metrics"])
    return table
