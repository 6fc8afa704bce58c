"""How a labels table (``labels_csv``) compares with the masks, where a dataset has both.

Slicing records per case how its listed slices' labels compare with those the mask gives
(:func:`cldf.data.slices.labels_check`); this turns them into ``labels_check.csv``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

COUNTS = ("listed", "agree", "table_1_mask_0", "table_0_mask_1", "mask_ambiguous")


def labels_check_table(cases: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per case with a mask and a table entry (``case``, :data:`COUNTS`, ``disagree_fraction``), then
    the total (case ``all``). ``mask_ambiguous``: listed slices whose target is present but below
    ``positive_min_fraction`` (neither label is wrong there)."""
    rows = [{"case": m["id"], **{k: int(m["labels_check"][k]) for k in COUNTS}} for m in cases if "labels_check" in m]
    total = {"case": "all", **{k: sum(r[k] for r in rows) for k in COUNTS}}
    frame = pd.DataFrame([*rows, total], columns=["case", *COUNTS])
    frame["disagree_fraction"] = (frame["listed"] - frame["agree"]) / frame["listed"].where(frame["listed"] > 0)
    return frame
