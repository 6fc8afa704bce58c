"""3-D results in the scan's own geometry: masks put back into each test case's original volume.

Per test case and row, the slice masks are written back into the original voxel grid (size, affine,
orientation; :func:`cldf.data.geometry.to_original`) and compared with the case's original mask file:
Dice over the volume and HD95 in millimetres (MONAI, with the file's voxel spacing). Under the labelled
protocol the slices labelled negative get empty masks (their label is known); under the unlabelled one the
classifier gate empties slices as in :mod:`cldf.evaluate.table`. Slices the pipeline dropped (too little
body) are empty.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from cldf.data.geometry import to_original
from cldf.evaluate.metrics import volume_metrics
from cldf.evaluate.table import write_csv
from cldf.io.nifti import read_target
from cldf.store import MapStore, SliceStore

COLUMNS = ("protocol", "method", "cam", "case", "dice_3d", "hd95_mm")


def _case_masks(row: Mapping[str, Any], slices: SliceStore, ids: np.ndarray, passed: np.ndarray) -> np.ndarray:
    masks = MapStore(row["masks"]).read(row.get("array", "masks"), ids).astype(np.uint8)
    if row["protocol"] == "labelled":
        masks[slices.labels[ids] == 0] = 0
    elif row["gated"]:
        masks[~passed] = 0
    return masks


def volume_table(
    slices_path: str | os.PathLike,
    ds: Mapping[str, Any],
    probs_path: str | os.PathLike,
    gate_threshold: float,
    rows: Sequence[Mapping[str, Any]],
    out: str | os.PathLike,
) -> pd.DataFrame:
    """Write ``metrics_3d.csv``: one line per protocol, row and test case (:data:`COLUMNS`)."""
    slices = SliceStore(slices_path)
    probs = MapStore(probs_path)
    lines = []
    test_cases = np.unique(slices.case_index[slices.indices(split="test")])
    for ci in tqdm(test_cases, desc="3-D metrics", unit="case"):
        meta = slices.cases[int(ci)]
        ids = slices.indices(split="test", cases=[int(ci)])
        target, spacing = read_target(ds, meta["id"])
        passed = probs.read("probs", ids) >= float(gate_threshold)
        for row in rows:
            volume = to_original(_case_masks(row, slices, ids, passed), slices.slice_index[ids], meta)
            dice, hd95 = volume_metrics(np.asarray(volume.dataobj) > 0, target, spacing)
            lines.append({"protocol": row["protocol"], "method": row["method"], "cam": row["cam"], "case": meta["id"],
                          "dice_3d": dice, "hd95_mm": hd95})
    frame = pd.DataFrame(lines, columns=list(COLUMNS))
    write_csv(frame, out)
    return frame
