"""Write slice masks back as one NIfTI volume per case, in the case's original geometry.

The output opens over the original scan in 3D Slicer or ITK-SNAP: same voxel grid, same affine.
Slices that were dropped during slicing (no body) or that have no mask are zero.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from cldf.data.geometry import to_original
from cldf.store import MapStore, SliceStore


def write_case_masks(slices_path: str | os.PathLike, masks_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<out_dir>/<case>.nii.gz`` for every case that has slices in the masks store.

    Reads the masks store (``slice_ids``, ``masks`` uint8 (N, H, W)) one case at a time; the
    directory is built under a temporary name and renamed into place when every case is written.
    Returns the written paths.
    """
    slices = SliceStore(slices_path)
    masks = MapStore(masks_path)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    written = []
    try:
        for ci in np.unique(slices.case_index[masks.slice_ids]):
            ids = masks.slice_ids[slices.case_index[masks.slice_ids] == ci]
            meta = slices.cases[int(ci)]
            case_id = meta["id"]
            image = to_original(masks.read("masks", ids), slices.slice_index[ids], meta)
            nib.save(image, tmp / f"{case_id}.nii.gz")
            written.append(out_dir / f"{case_id}.nii.gz")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
