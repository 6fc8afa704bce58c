"""Table 3 of the paper (``table3.csv``): which pixels the decoder learns from, per CAM.

For each CAM of ``table3.cams``: the CAM alone (thresholded, the threshold chosen on validation), the
decoder trained on the CAM's pixels (CAM + CL), on the mean-gradient map's (MG + CL), and on both
(CAM ∧ MG + CL, which is CLDF). Labelled protocol: the positive test slices, Dice with its 95 % bootstrap
interval over cases.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cldf.evaluate.table import per_slice_metrics, summarise, write_csv
from cldf.registry import MAPS
from cldf.store import StoreError, TestTruth

SELECTIONS = {"cam_cl": "CAM + CL", "mg_cl": "MG + CL", "CLDF": "CAM ∧ MG + CL"}
"""Segmenter → the row's name in Table 3 (a thresholded CAM is ``CAM alone``)."""
COLUMNS = ("cam", "selection", "method", "n_cases", "n_slices", "dice_mean", "dice_ci_low", "dice_ci_high", "dice_std")


def selection_name(method: str) -> str:
    """Table 3's name of a row of ``method`` (a CAM, or a CLDF decoder)."""
    return "CAM alone" if method in MAPS else SELECTIONS[method]


def selection_table(slices_path: str | os.PathLike, truth_path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                    out: str | os.PathLike, n_resamples: int, seed: int) -> pd.DataFrame:
    """Evaluate the labelled-protocol ``rows`` (:meth:`cldf.plan.Plan.table3_rows`) and write :data:`COLUMNS`."""
    if any(r["protocol"] != "labelled" for r in rows):
        raise ValueError("Table 3 is measured under the labelled protocol only")
    truth = TestTruth(truth_path)
    if not (truth.labels == 1).any():
        raise StoreError(f"{truth_path} holds no positive test slice")
    per_slice = per_slice_metrics(slices_path, truth, rows, np.ones(len(truth.slice_ids), dtype=bool))
    table = summarise(per_slice, rows, {"sensitivity": np.nan, "specificity": np.nan}, n_resamples, seed)
    table["selection"] = [selection_name(m) for m in table.method]
    table = table[list(COLUMNS)]
    write_csv(table, out)
    return table
