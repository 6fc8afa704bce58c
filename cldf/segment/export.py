"""Write slice masks back as one NIfTI volume per case, in the case's original geometry.

The output opens over the original scan in 3D Slicer or ITK-SNAP: same voxel grid, same affine.
Slices that were dropped during slicing (no body), slices the classifier gate empties, and slices without
a mask are zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from cldf.atomic import atomic_dir
from cldf.data.geometry import to_original
from cldf.store import MapStore, SliceStore


def write_case_masks(
    slices_path: str | os.PathLike,
    masks_path: str | os.PathLike,
    array: str,
    out_dir: str | os.PathLike,
    probs_path: str | os.PathLike | None = None,
    gate: float | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<case>.nii.gz`` for every case that has slices in the masks store.

    ``array`` names the masks (uint8 (N, H, W)) in the store; with ``probs_path`` and ``gate``, slices whose
    classifier probability is below the gate are emptied (the unlabelled protocol). One case at a time;
    the directory is built under a temporary name and renamed into place when every case is written.
    """
    slices = SliceStore(slices_path)
    masks = MapStore(masks_path)
    probs = MapStore(probs_path) if probs_path is not None and gate is not None else None
    written = []
    with atomic_dir(out_dir) as tmp:
        for ci in np.unique(slices.case_index[masks.slice_ids]):
            ids = masks.slice_ids[slices.case_index[masks.slice_ids] == ci]
            values = masks.read(array, ids)
            if probs is not None:
                values[probs.read("probs", ids) < gate] = 0
            meta = slices.cases[int(ci)]
            nib.save(to_original(values, slices.slice_index[ids], meta), tmp / f"{meta['id']}.nii.gz")
            written.append(Path(out_dir) / f"{meta['id']}.nii.gz")
    return written
