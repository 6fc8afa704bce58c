"""Connected components of CLDF's masks: drop the small fragments K-means leaves beside the target, fill
the holes it leaves inside it.

K-means labels pixels one by one; scattered pixels whose embeddings fall on the target's side of the
clusters come out as small islands away from it. Keeping only the components that reach a fraction of
the slice's largest component removes them: 0 keeps every component (the paper's masks), 1 keeps the
largest alone (ties kept), a value between keeps several large ones (two kidneys, a multifocal tumour).
The fraction is chosen on validation with CLDF's other settings (``choices.components``). Components are
8-connected.

K-means also leaves holes: pixels inside the target (a necrotic core, a vessel through an organ) whose
embeddings fall on the background's side. A tumour's or an organ's mask has none, so
``cldf.cluster.fill_holes`` (the default, chosen by the lever "holes inside the masks left open" of
``ablation.csv``) sets every background pixel that the mask encloses in its slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def keep_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """The components of a binary mask that are at least ``min_fraction`` of its largest one.

    Parameters
    ----------
    mask
        bool (H, W) or a stack bool (N, H, W) of masks, each filtered on its own.
    min_fraction
        In [0, 1]; a component of ``n`` pixels is kept when ``n >= min_fraction * largest``.

    Returns
    -------
    bool array of the shape of ``mask``.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 3:
        return np.stack([keep_components(m, min_fraction) for m in mask]) if len(mask) else mask.copy()
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) or (N, H, W) mask, got shape {mask.shape}")
    if min_fraction == 0.0:
        return mask.copy()
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    return np.isin(labels, keep)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every hole filled: background pixels not 4-connected to the slice's border are set.

    Parameters
    ----------
    mask
        bool (H, W) or a stack bool (N, H, W) of masks, each filled on its own.

    Returns
    -------
    bool array of the shape of ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 3:
        return np.stack([ndimage.binary_fill_holes(m) for m in mask]) if len(mask) else mask.copy()
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) or (N, H, W) mask, got shape {mask.shape}")
    return ndimage.binary_fill_holes(mask)
