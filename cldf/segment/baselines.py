"""Baseline masks from saliency maps: CAM methods, the mean-gradient map (MG) and CDM saliency.

Every baseline goes through the same rule, so the comparison table compares maps, not thresholds:

1. per slice, Otsu's threshold of the map over the *body* pixels (body = brain/body mask computed from
   the image); foreground = body pixels strictly above the threshold; a map that is constant inside the
   body (or an empty body) gives an empty mask;
2. optionally, when a classifier-probability store is given (``probs_path``), slices whose classifier
   probability of the positive class is below :data:`POSITIVE_PROBABILITY` get an empty mask.

Only image-level information is used: ground-truth masks are never read here.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from skimage.filters import threshold_otsu

from cldf.store import ArrayStoreWriter, MapStore, SliceStore

THRESHOLD_RULES = ("otsu",)
POSITIVE_PROBABILITY = 0.5
BASELINE_RULE = (
    "Baseline masks: per slice, Otsu's threshold of the map computed over the body pixels; foreground = "
    "body pixels above it (a map constant inside the body gives an empty mask). With a classifier gate, "
    f"slices whose positive-class probability is below {POSITIVE_PROBABILITY} are left empty."
)


def threshold_map(maps: np.ndarray, body: np.ndarray, rule: str = "otsu") -> np.ndarray:
    """Binarise saliency maps slice by slice inside the body.

    Parameters
    ----------
    maps
        Saliency maps, float (B, H, W) (any range; the stores hold [0, 1]).
    body
        Body/brain masks, bool (B, H, W).
    rule
        Threshold rule; one of :data:`THRESHOLD_RULES`.

    Returns
    -------
    Masks, bool (B, H, W): body pixels whose map value is above the slice's threshold.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    maps = np.asarray(maps, dtype=np.float32)
    body = np.asarray(body, dtype=bool)
    if maps.shape != body.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and body {body.shape} must both be (B, H, W)")
    out = np.zeros(maps.shape, dtype=bool)
    for b in range(len(maps)):
        values = maps[b][body[b]]
        if values.size == 0 or values.max() <= values.min():
            continue
        out[b] = body[b] & (maps[b] > threshold_otsu(values))
    return out


def run_threshold_baseline(
    slices_path: str | os.PathLike,
    map_path: str | os.PathLike,
    out: str | os.PathLike,
    slice_ids: Sequence[int] | np.ndarray | None = None,
    probs_path: str | os.PathLike | None = None,
    rule: str = "otsu",
    batch_size: int = 64,
) -> None:
    """Write a masks store (``slice_ids`` int64 (N,), ``masks`` uint8 (N, H, W)) from a map store.

    Parameters
    ----------
    slices_path
        The slice store (body masks are read from it).
    map_path
        Map store with ``maps`` (N, H, W) in [0, 1].
    out
        Path of the masks store to write.
    slice_ids
        Global slice ids to segment; default: every slice of the map store, in its order.
    probs_path
        Optional classifier-probability store whose ``probs`` (N,) gate the masks (see the module docstring).
    rule
        Threshold rule passed to :func:`threshold_map`.
    batch_size
        Slices per batch; memory does not grow with the number of slices.
    """
    slices = SliceStore(slices_path)
    maps = MapStore(map_path)
    gate = MapStore(probs_path) if probs_path is not None else None
    ids = maps.slice_ids if slice_ids is None else np.asarray(slice_ids, dtype=np.int64)
    size = slices.image_size
    attrs = {
        "method": "threshold_baseline",
        "rule": rule,
        "source": str(map_path),
        "gate": str(probs_path) if probs_path is not None else None,
        "positive_probability": POSITIVE_PROBABILITY,
        "description": BASELINE_RULE,
    }
    arrays = {"slice_ids": ((), np.int64), "masks": ((size, size), np.uint8)}
    with ArrayStoreWriter(out, len(ids), arrays, attrs) as writer:
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            masks = threshold_map(maps.read("maps", batch), slices.body(batch), rule)
            if gate is not None:
                masks[np.asarray(gate.read("probs", batch)) < POSITIVE_PROBABILITY] = False
            writer.write("slice_ids", start, batch)
            writer.write("masks", start, masks.astype(np.uint8))
