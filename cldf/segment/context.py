"""Neighbouring slices' vote on CLDF's masks: 2.5-D context added after K-means.

K-means clusters each slice on its own, so a slice's mask can keep a fragment its neighbours reject, or
miss part of a target its neighbours mark. A tumour or an organ is a 3-D body: with a radius r, a pixel
is kept where a majority (r + 1) of the masks of slices z - r .. z + r of the same case mark it. Only the
slices that were segmented vote (under the labelled protocol the slices labelled positive; a slice
without a mask counts as empty), and a slice with fewer segmented slices around it needs all of them
(itself included) when they are fewer than r + 1. The radius (0: no vote) is chosen on validation with
CLDF's other settings (``choices.slice_vote``).
"""

from __future__ import annotations

import numpy as np


def vote_slices(masks: np.ndarray, case_index: np.ndarray, slice_index: np.ndarray, radius: int) -> np.ndarray:
    """Each mask voted on by the masks of the slices within ``radius`` of it in the same case.

    Parameters
    ----------
    masks
        (N, H, W) binary masks of N segmented slices, any order.
    case_index, slice_index
        int (N,): the case of each slice and its index along the scan's slice axis.
    radius
        Slices on each side that vote (>= 0; 0 returns the masks unchanged).

    Returns
    -------
    (N, H, W) masks of the dtype of ``masks``: a pixel is set where at least ``min(radius + 1, n)`` of the
    ``n`` masks among slices z - radius .. z + radius of its case (itself included) set it.
    """
    masks = np.asarray(masks)
    case_index, slice_index = np.asarray(case_index), np.asarray(slice_index)
    if masks.ndim != 3 or len(case_index) != len(masks) or len(slice_index) != len(masks):
        raise ValueError(f"expected (N, H, W) masks with N case and slice indices, got {masks.shape}, "
                         f"{case_index.shape}, {slice_index.shape}")
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a whole number >= 0, got {radius}")
    row = {(int(c), int(z)): r for r, (c, z) in enumerate(zip(case_index, slice_index))}
    if len(row) != len(masks):
        raise ValueError("two masks have the same case and slice index")
    if radius == 0:
        return masks.copy()
    on = masks.astype(bool)
    out = np.empty_like(masks)
    for r, (c, z) in enumerate(zip(case_index, slice_index)):
        window = [row[(int(c), int(z) + d)] for d in range(-int(radius), int(radius) + 1) if (int(c), int(z) + d) in row]
        votes = on[window].sum(axis=0)
        out[r] = votes >= min(int(radius) + 1, len(window))
    return out
