"""Per-slice segmentation metrics (Dice, IoU, HD95) computed with MONAI on binary 2-D masks.

Empty-mask conventions (MONAI returns nan/inf there; we set the values explicitly instead):

* prediction and ground truth both empty: Dice = IoU = 1, HD95 = 0 (a perfect answer);
* exactly one of them empty: Dice = IoU = 0, HD95 = the image diagonal,
  ``sqrt((H * s_y)**2 + (W * s_x)**2)`` (the largest distance the image can hold, as the BraTS
  challenge does for volumes), so every slice enters the HD95 mean and a method cannot improve its
  HD95 by predicting nothing.

HD95 is the symmetric 95th-percentile Hausdorff distance between the mask boundaries (MONAI
``compute_hausdorff_distance(percentile=95)``), in pixels of the evaluated image size (e.g. 64 x 64 for
the CPU preset, 256 x 256 for the paper's), unless a pixel ``spacing`` is given.

torch and MONAI are imported by the functions that call MONAI: :func:`dice_scores` (numpy) is what the
light choice jobs use, and importing MONAI costs each of them seconds.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

METRIC_COLUMNS = ("dice", "iou", "hd95")


def image_diagonal(shape: tuple[int, int], spacing: float | Sequence[float] | None = None) -> float:
    """Diagonal of an (H, W) image, in pixels or, with ``spacing`` (scalar or (s_y, s_x)), in its units."""
    sy, sx = _spacing_pair(spacing)
    return math.hypot(shape[0] * sy, shape[1] * sx)


def _spacing_pair(spacing: float | Sequence[float] | None) -> tuple[float, float]:
    if spacing is None:
        return 1.0, 1.0
    if np.isscalar(spacing):
        return float(spacing), float(spacing)
    sy, sx = (float(s) for s in spacing)
    return sy, sx


def slice_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] | None = None
) -> pd.DataFrame:
    """Dice, IoU and HD95 of each slice.

    Parameters
    ----------
    pred, gt
        Binary masks, (B, H, W) (bool or 0/1 integers).
    spacing
        Pixel spacing for HD95 (scalar or (s_y, s_x)); ``None`` measures it in pixels.

    Returns
    -------
    DataFrame with B rows and the float columns ``dice``, ``iou``, ``hd95`` (see the module docstring
    for the empty-mask conventions).
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (B, H, W)")
    n = len(pred)
    pred_any = pred.reshape(n, -1).any(axis=1)
    gt_any = gt.reshape(n, -1).any(axis=1)
    both = pred_any & gt_any
    one = pred_any ^ gt_any

    dice = np.ones(n, dtype=np.float64)
    iou = np.ones(n, dtype=np.float64)
    hd95 = np.zeros(n, dtype=np.float64)
    dice[one] = 0.0
    iou[one] = 0.0
    hd95[one] = image_diagonal(pred.shape[1:], spacing)
    if both.any():
        p = torch.from_numpy(pred[both]).unsqueeze(1).float()
        g = torch.from_numpy(gt[both]).unsqueeze(1).float()
        dice[both] = compute_dice(p, g, include_background=True).squeeze(1).double().numpy()
        iou[both] = compute_iou(p, g, include_background=True).squeeze(1).double().numpy()
        with warnings.catch_warnings():
            # MONAI 1.6 warns about its own deprecated internal argument on every call.
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(
                p, g, include_background=True, percentile=95, spacing=list(_spacing_pair(spacing))
            )
        hd95[both] = hd.squeeze(1).double().numpy()
    return pd.DataFrame({"dice": dice, "iou": iou, "hd95": hd95})


def dice_scores(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-slice Dice of binary masks (B, H, W) → float64 (B,), with the empty-mask conventions above
    (both empty: 1; exactly one empty: 0). Equal to the ``dice`` of :func:`slice_metrics`, without HD95."""
    pred = np.asarray(pred).astype(bool).reshape(len(pred), -1)
    gt = np.asarray(gt).astype(bool).reshape(len(gt), -1)
    total = pred.sum(1) + gt.sum(1)
    inter = (pred & gt).sum(1)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def volume_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """3-D Dice and HD95 (in the units of ``spacing``, mm) of binary volumes (X, Y, Z).

    Both empty: Dice 1, HD95 0; exactly one empty: Dice 0, HD95 = the volume's diagonal.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (X, Y, Z)")
    if not pred.any() and not gt.any():
        return 1.0, 0.0
    if not pred.any() or not gt.any():
        return 0.0, float(np.sqrt(sum((n * float(s)) ** 2 for n, s in zip(pred.shape, spacing))))
    dice = float(2.0 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(gt)[None, None].float(),
                                        include_background=True, percentile=95, spacing=[float(s) for s in spacing])
    return dice, float(hd.item())
