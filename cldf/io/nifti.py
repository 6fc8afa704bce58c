"""Reading and validating one case: its image channels and label map, in canonical (RAS+) orientation.

Every problem becomes a one-line :class:`~cldf.io.errors.DataError` naming the file; no nibabel
traceback reaches the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
from nibabel import orientations

from cldf.io.errors import DataError
from cldf.io.layouts import case_files

AFFINE_ATOL = 1e-3  # mm; image and mask affines must agree this closely


@dataclass
class Case:
    """One case, reoriented to the closest canonical (RAS+) voxel order.

    Attributes
    ----------
    id
        Case id.
    image
        float32 (C, X, Y, Z), channels in the order of ``ds["modalities"]``, canonical orientation.
    seg
        uint8 (X, Y, Z) label map, canonical orientation; None for a case without a mask file (allowed where
        :func:`cldf.io.layouts.masks_optional`).
    affine, shape
        Affine (4, 4) and 3-D shape of the files as stored (the original voxel grid): the mask's, or without
        a mask the first channel's.
    canonical_affine
        Affine (4, 4) of ``image`` / ``seg``.
    spacing
        Voxel size in mm along the canonical axes (3,).
    ornt
        int (3, 2) nibabel orientation of the original axes relative to RAS (``io_orientation``);
        :func:`from_canonical` uses it to undo the reorientation.
    """

    id: str
    image: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    spacing: tuple[float, float, float]
    ornt: np.ndarray


def from_canonical(volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo the canonical reorientation: (X, Y, Z) canonical → the original voxel order."""
    identity = orientations.axcodes2ornt(("R", "A", "S"))
    return orientations.apply_orientation(volume, orientations.ornt_transform(identity, np.asarray(ornt)))


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Image header and voxel data (X, Y, Z); any reading problem is a :class:`DataError`."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel/gzip/zlib raise many types for corrupt files
        detail = " ".join(str(err).split())
        raise DataError(f"{path}: unreadable NIfTI file ({type(err).__name__}: {detail})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return img, data


def _check_mask(seg: np.ndarray, path: Path, ds: Mapping[str, Any]) -> None:
    """Finite integer values of ``ds["mask_labels"]`` only."""
    if not np.all(np.isfinite(seg)):
        raise DataError(f"{path}: mask contains NaN/Inf voxels")
    values = np.unique(seg)
    if not np.all(values == np.round(values)):
        raise DataError(f"{path}: mask contains non-integer values")
    unexpected = sorted(set(values.astype(np.int64).tolist()) - set(int(v) for v in ds["mask_labels"]))
    if unexpected:
        raise DataError(
            f"{path}: unexpected label value(s) {unexpected}; allowed: {list(ds['mask_labels'])} "
            f"(config key datasets.{ds['name']}.mask_labels)"
        )


def read_case(ds: Mapping[str, Any], case_id: str) -> Case:
    """Read and validate case ``case_id`` of dataset ``ds`` (settings from ``cldf.config.dataset_settings``).

    Checks, each a :class:`DataError` naming the file: files exist and are readable NIfTI, every channel
    has the mask's shape and (within ``AFFINE_ATOL``) affine, no NaN/Inf voxels, mask values are integers
    in ``ds["mask_labels"]``. Returns the channels stacked as float32 (C, X, Y, Z) and the mask as uint8
    (X, Y, Z), both reoriented like ``nibabel.as_closest_canonical``.
    """
    files = case_files(ds, case_id)
    if ds.get("predict"):  # a new scan: a mask file beside it is never read
        files.pop("seg", None)
    reference = files.get("seg", files[ds["modalities"][0]])
    ref_img, seg = _load(reference)
    shape = tuple(int(s) for s in seg.shape)
    affine = np.asarray(ref_img.affine, dtype=np.float64)
    if "seg" in files:
        _check_mask(seg, files["seg"], ds)
    else:
        seg = None
    what = "the mask's" if seg is not None else "the first channel's"

    ornt = orientations.io_orientation(affine)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(shape, np.uint8) if seg is None else seg.astype(np.uint8), affine))
    channels = []
    for modality in ds["modalities"]:
        img, data = _load(files[modality])
        if data.shape != shape:
            raise DataError(f"{files[modality]}: shape {data.shape} differs from {what} {shape} ({reference})")
        if not np.allclose(img.affine, affine, atol=AFFINE_ATOL, rtol=0):
            raise DataError(f"{files[modality]}: affine differs from {what} ({reference}) by more than {AFFINE_ATOL} mm")
        data = data.astype(np.float32, copy=False)
        if not np.all(np.isfinite(data)):
            raise DataError(f"{files[modality]}: {int(np.sum(~np.isfinite(data)))} NaN/Inf voxel(s)")
        channels.append(orientations.apply_orientation(data, ornt))

    return Case(
        id=case_id,
        image=np.ascontiguousarray(np.stack(channels), dtype=np.float32),
        seg=None if seg is None else np.ascontiguousarray(np.asanyarray(canonical.dataobj), dtype=np.uint8),
        affine=affine,
        shape=shape,  # type: ignore[arg-type]
        canonical_affine=np.asarray(canonical.affine, dtype=np.float64),
        spacing=tuple(float(z) for z in canonical.header.get_zooms()[:3]),  # type: ignore[arg-type]
        ornt=ornt.astype(np.int64),
    )


def read_target(ds: Mapping[str, Any], case_id: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The target of one case as stored: bool (X, Y, Z) in the file's own voxel order, and its voxel size
    in mm. For evaluation in the scan's own geometry only (the mask file alone is read)."""
    files = case_files(ds, case_id)
    if "seg" not in files:
        raise DataError(f"case {case_id} of dataset {ds['name']} has no mask file: evaluation needs masks")
    path = files["seg"]
    img, seg = _load(path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.isin(seg, list(ds["target_labels"])), zooms  # type: ignore[return-value]
