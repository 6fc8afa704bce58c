"""In-plane geometry of slices and its inverse.

Forward (``slices.py``): canonical volume (X, Y, Z) → centre-pad in-plane to the square S × S with
S = max(X, Y) (pad offsets ``pad = (px, py)``; nothing is ever cropped) → axial slices ``[:, :, z]`` as
(S, S) images with rows = canonical X, columns = canonical Y → resize to ``image_size`` (bilinear with
antialiasing for images, nearest-exact for masks).

Inverse (:func:`to_original`): resize back to S × S (nearest-exact), remove the padding, put each slice
at its z in a canonical volume, undo the canonical reorientation, and wrap it with the original affine.
"""

from __future__ import annotations

from typing import Any, Mapping

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from cldf.io.nifti import from_canonical


def square_padding(shape_xy: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Side S = max(X, Y) of the square and the centre-pad offsets (px, py) of an X × Y slice."""
    x, y = (int(s) for s in shape_xy)
    size = max(x, y)
    return size, ((size - x) // 2, (size - y) // 2)


def pad_to_square(volume: np.ndarray, size: int, pad: tuple[int, int], fill: float) -> np.ndarray:
    """(..., X, Y, Z) → (..., S, S, Z), the input placed at offsets ``pad`` and ``fill`` elsewhere."""
    *lead, x, y, z = volume.shape
    out = np.full((*lead, size, size, z), fill, dtype=volume.dtype)
    out[..., pad[0] : pad[0] + x, pad[1] : pad[1] + y, :] = volume
    return out


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of float images (B, C, S, S) → float32 (B, C, size, size)."""
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if t.shape[-1] == size and t.shape[-2] == size:
        return t.numpy()
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).numpy()


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Nearest-exact resize of label masks (B, S, S) → uint8 (B, size, size)."""
    t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))[:, None]
    if t.shape[-1] == size and t.shape[-2] == size:
        return t[:, 0].numpy()
    return F.interpolate(t, size=(size, size), mode="nearest-exact")[:, 0].numpy()


def to_original(mask_slices: np.ndarray, slice_index: np.ndarray, case_meta: Mapping[str, Any]) -> nib.Nifti1Image:
    """Put slice masks back into the case's original voxel grid.

    Parameters
    ----------
    mask_slices
        uint8 (M, H, W) masks of slices of one case, H = W = ``image_size`` of the slice store.
    slice_index
        int (M,) canonical z index of each slice (``slice_index`` of the slice store).
    case_meta
        The case's entry of the ``cases`` attribute of the slice store.

    Returns
    -------
    A uint8 NIfTI image of the original shape with the original affine; voxels of slices not given are 0.
    """
    mask_slices = np.asarray(mask_slices)
    slice_index = np.asarray(slice_index, dtype=np.int64)
    if mask_slices.ndim != 3 or len(mask_slices) != len(slice_index):
        raise ValueError(f"mask_slices must be (M, H, W) with M = len(slice_index); got {mask_slices.shape}")
    cx, cy, cz = (int(s) for s in case_meta["canonical_shape"])
    size = int(case_meta["square_size"])
    px, py = (int(p) for p in case_meta["pad"])
    if len(slice_index) and (slice_index.min() < 0 or slice_index.max() >= cz):
        raise ValueError(f"slice_index outside [0, {cz}) for case {case_meta['id']}")
    canonical = np.zeros((cx, cy, cz), dtype=np.uint8)
    if len(slice_index):
        square = resize_masks(mask_slices, size)
        canonical[:, :, slice_index] = np.moveaxis(square[:, px : px + cx, py : py + cy], 0, -1)
    original = from_canonical(canonical, np.asarray(case_meta["ornt"]))
    expected = tuple(int(s) for s in case_meta["shape"])
    assert original.shape == expected, (original.shape, expected)
    img = nib.Nifti1Image(np.ascontiguousarray(original, dtype=np.uint8), np.asarray(case_meta["affine"], dtype=np.float64))
    img.set_data_dtype(np.uint8)
    return img
