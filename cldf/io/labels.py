"""Image-level labels from a table: a dataset's ``labels_csv`` (header ``case,slice,label``).

``slice`` is the 0-based index along the scan's third voxel axis as stored; ``label`` is 0 (target absent)
or 1 (target present). Slices not listed are unlabelled: no network is trained on them, and they are
segmented under the unlabelled protocol. With the table, masks are optional
(:func:`cldf.io.layouts.masks_optional`).

Every problem of the table is a one-line :class:`~cldf.io.errors.DataError` naming the file, the line
(header = line 1) and the problem: a missing column, a label other than 0/1, a slice that is not an
integer or lies outside the scan, an unknown case, a (case, slice) listed twice.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations

from cldf.io.errors import DataError
from cldf.io.layouts import case_files

COLUMNS = ("case", "slice", "label")
LABELS = {"0": 0, "1": 1}


@dataclass(frozen=True)
class ScanAxis:
    """The third voxel axis of a scan: its length, the canonical (RAS+) axis it becomes, and whether it flips."""

    depth: int
    axis: int
    flipped: bool

    def canonical(self, index: int) -> int:
        """Canonical z of the slice ``index`` along the stored third axis."""
        return self.depth - 1 - index if self.flipped else index


def labels_path(ds: Mapping[str, Any]) -> Path | None:
    """The dataset's labels table, or None when its labels come from the masks."""
    return Path(ds["labels_csv"]) if ds.get("labels_csv") else None


def scan_axis(ds: Mapping[str, Any], case_id: str) -> ScanAxis | None:
    """The third axis of a case's first channel, from its NIfTI header only (no voxel is read); None when
    that file is missing under ``on_bad_case: skip`` (slicing then skips the case)."""
    path = case_files(ds, case_id, missing_ok=ds.get("on_bad_case") == "skip").get(ds["modalities"][0])
    if path is None:
        return None
    try:
        img = nib.load(str(path))
        shape, affine = img.shape, img.affine
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise DataError(f"{path}: unreadable NIfTI header ({type(err).__name__}: {' '.join(str(err).split())})") from None
    if len(shape) < 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {shape}")
    axis, flip = orientations.io_orientation(affine)[2]
    return ScanAxis(int(shape[2]), int(axis), bool(flip < 0))


@dataclass(frozen=True)
class _Row:
    line: int
    case: str
    slice: int
    label: int


def _header(reader: Any, path: Path) -> dict[str, int]:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file; expected the header {','.join(COLUMNS)}")
    names = [h.strip().lower() for h in header]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DataError(f"{path} line 1: missing column(s) {', '.join(missing)}; expected the header {','.join(COLUMNS)}")
    return {c: names.index(c) for c in COLUMNS}


def _parse(path: Path, line: int, fields: Sequence[str], where: Mapping[str, int]) -> _Row:
    values = {c: (fields[k].strip() if k < len(fields) else "") for c, k in where.items()}
    at = f"{path} line {line}"
    if values["label"] not in LABELS:
        raise DataError(f"{at}: label {values['label']!r} is not 0 or 1")
    try:
        index = int(values["slice"])
    except ValueError:
        raise DataError(f"{at}: slice {values['slice']!r} is not an integer index") from None
    if not values["case"]:
        raise DataError(f"{at}: empty case")
    return _Row(line, values["case"], index, LABELS[values["label"]])


def read_table(path: str | Path) -> list[_Row]:
    """The rows of a labels table, checked for form only (columns, label 0/1, integer slice, no duplicate)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels table {path} does not exist (config key datasets.<name>.labels_csv)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable labels table ({type(err).__name__})") from None
    reader = csv.reader(text.splitlines())
    where = _header(reader, path)
    rows, seen = [], {}
    for line, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue
        row = _parse(path, line, fields, where)
        key = (row.case, row.slice)
        if key in seen:
            raise DataError(f"{path} line {line}: duplicate row: case {row.case} slice {row.slice} is already on line {seen[key]}")
        seen[key] = line
        rows.append(row)
    return rows


def check_rows(path: str | Path, rows: Sequence[_Row], cases: Sequence[str], axis_of: Callable[[str], ScanAxis | None],
               only: Sequence[str] | None = None) -> None:
    """Every row names a case of the dataset and a slice inside its scan (for the cases ``only``, or all)."""
    known, checked = set(cases), None if only is None else set(only)
    for row in rows:
        if row.case not in known:
            raise DataError(f"{path} line {row.line}: unknown case {row.case!r} (not among the dataset's {len(known)} cases)")
        if checked is not None and row.case not in checked:
            continue
        axis = axis_of(row.case)
        if axis is None:
            continue
        if not 0 <= row.slice < axis.depth:
            raise DataError(f"{path} line {row.line}: slice {row.slice} is out of range for case {row.case} "
                            f"(its scan has {axis.depth} slices along the third axis, 0 to {axis.depth - 1})")
        if axis.axis != 2:
            raise DataError(f"{path} line {row.line}: the third axis of case {row.case}'s scan is not its axial "
                            "(inferior-superior) axis, so its slices are not the pipeline's axial slices")


def load_labels(ds: Mapping[str, Any], cases: Sequence[str], only: Sequence[str] | None = None) -> dict[str, dict[int, int]]:
    """The dataset's labels table, validated: ``{case: {slice along the stored third axis: label}}``.

    ``cases``: every case of the dataset (a row naming another is an error); the slice range is checked
    for the cases ``only`` (default all), from their NIfTI headers.
    """
    path = labels_path(ds)
    if path is None:
        return {}
    rows = read_table(path)
    axes: dict[str, ScanAxis | None] = {}

    def axis_of(case: str) -> ScanAxis | None:
        if case not in axes:
            axes[case] = scan_axis(ds, case)
        return axes[case]

    check_rows(path, rows, cases, axis_of, only)
    table: dict[str, dict[int, int]] = {}
    for row in rows:
        table.setdefault(row.case, {})[row.slice] = row.label
    return table


def canonical_labels(listed: Mapping[int, int], depth: int, ornt: np.ndarray) -> np.ndarray:
    """Labels int8 (Z,) in canonical z order from ``{slice along the stored third axis: label}``; -1 where
    a slice is not listed. ``ornt``: the case's nibabel orientation (``io_orientation`` of its affine)."""
    out = np.full(int(depth), -1, dtype=np.int8)
    axis, flip = (int(v) for v in np.asarray(ornt)[2])
    if listed and axis != 2:
        raise DataError("a labels table indexes the third axis, which is not this scan's axial axis")
    scan = ScanAxis(int(depth), axis, flip < 0)
    for index, label in listed.items():
        out[scan.canonical(int(index))] = label
    return out
