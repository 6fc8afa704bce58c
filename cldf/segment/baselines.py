"""Baseline masks: thresholded maps (CAMs, the mean-gradient map, CDM saliency) and a one-channel intensity
threshold, the floor every method is compared with.

Every map goes through the same rule, so the comparison table compares maps, not thresholding habits: per
slice, foreground = body pixels whose map value is above the map's threshold; the threshold is Otsu's
over the slice's body pixels (``otsu``) or a fixed value of the [0, 1] map, whichever the validation split
chose for that map (:mod:`cldf.evaluate.choose`). A map constant inside the body (or an empty body) gives
an empty mask. The intensity baseline is per-slice Otsu of one image channel inside the body, bright
(``bright``) or dark (``dark``) side, channel and side chosen on validation.

Only images, body masks and maps are read here: no label, no ground truth.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from skimage.filters import threshold_otsu

from cldf.store import ArrayStoreWriter, MapStore, SliceStore

POLARITIES = ("bright", "dark")


def threshold_map(maps: np.ndarray, body: np.ndarray, threshold: str | float = "otsu") -> np.ndarray:
    """Binarise maps slice by slice inside the body.

    Parameters
    ----------
    maps
        float (B, H, W) maps.
    body
        bool (B, H, W) body masks.
    threshold
        ``"otsu"`` (per slice, over the body pixels) or a number (the same for every slice).

    Returns
    -------
    bool (B, H, W): body pixels whose map value is above the threshold.
    """
    maps = np.asarray(maps, dtype=np.float32)
    body = np.asarray(body, dtype=bool)
    if maps.shape != body.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and body {body.shape} must both be (B, H, W)")
    if threshold != "otsu":
        return body & (maps > float(threshold))
    out = np.zeros(maps.shape, dtype=bool)
    for b in range(len(maps)):
        values = maps[b][body[b]]
        if values.size == 0 or values.max() <= values.min():
            continue
        out[b] = body[b] & (maps[b] > threshold_otsu(values))
    return out


def intensity_map(images: np.ndarray, channel: int, polarity: str) -> np.ndarray:
    """One image channel as a map (B, H, W), negated for ``dark`` so that the target side is high."""
    if polarity not in POLARITIES:
        raise ValueError(f"unknown polarity {polarity!r}; expected one of {POLARITIES}")
    values = np.asarray(images[:, channel], dtype=np.float32)
    return values if polarity == "bright" else -values


def run_threshold_baseline(
    slices_path: str | os.PathLike,
    map_path: str | os.PathLike | None,
    out: str | os.PathLike,
    slice_ids: Sequence[int] | np.ndarray,
    threshold: str | float = "otsu",
    intensity: tuple[int, str] | None = None,
    batch_size: int = 64,
) -> None:
    """Write a masks store (``slice_ids`` int64 (N,), ``masks`` uint8 (N, H, W)) of the slices ``slice_ids``.

    The map is ``maps`` of the store at ``map_path``, or, with ``intensity = (channel, polarity)`` and no
    store, that image channel (then the threshold is Otsu's). Memory does not grow with the number of slices.
    """
    slices = SliceStore(slices_path)
    maps = MapStore(map_path) if map_path is not None else None
    ids = np.asarray(slice_ids, dtype=np.int64)
    size = slices.image_size
    attrs = {"source": str(map_path) if map_path else f"intensity {intensity}", "threshold": threshold}
    arrays = {"slice_ids": ((), np.int64), "masks": ((size, size), np.uint8)}
    with ArrayStoreWriter(out, len(ids), arrays, attrs) as writer:
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            if maps is not None:
                values = maps.read("maps", batch)
            else:
                values = intensity_map(slices.images(batch), intensity[0], intensity[1])
            writer.write("slice_ids", start, batch)
            writer.write("masks", start, threshold_map(values, slices.body(batch), threshold).astype(np.uint8))
