"""On-the-fly upsampling of diffusion features stored at their native resolution.

The features store holds one float16 array ``layer_k`` of shape (N, C_k, h_k, w_k) per tapped decoder
layer. Full-resolution concatenated features are only ever built for one batch of slices, so memory is
bounded by ``batch_size * D * H * W`` floats whatever the size of the dataset.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cldf.store import MapStore, StoreError

_LAYER = re.compile(r"^layer_(\d+)$")


def upsample_features(layers: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Bilinearly upsample every layer to ``size`` × ``size`` and concatenate along channels.

    Parameters
    ----------
    layers
        One tensor (B, C_k, h_k, w_k) per tapped layer (any float dtype).
    size
        Output side length H = W.

    Returns
    -------
    float32 tensor (B, D, H, W) with D = sum_k C_k.
    """
    if not layers:
        raise ValueError("upsample_features needs at least one feature layer")
    out = []
    for layer in layers:
        layer = layer.float()
        if layer.shape[-2:] != (size, size):
            layer = F.interpolate(layer, size=(size, size), mode="bilinear", align_corners=False)
        out.append(layer)
    return torch.cat(out, dim=1)


def layer_names(store: MapStore) -> list[str]:
    """Names ``layer_0 .. layer_{K-1}`` of the feature arrays of a features store, in layer order."""
    found = sorted(
        (int(m.group(1)), key) for key in store.group.array_keys() if (m := _LAYER.match(key)) is not None
    )
    names = [key for _, key in found]
    if not names or [k for k, _ in found] != list(range(len(names))):
        raise StoreError(f"{store.path} holds no contiguous layer_0..layer_K arrays (found {names})")
    return names


def feature_dim(features_path: str | os.PathLike) -> int:
    """Total channel count D of a features store (sum of the layers' channels)."""
    store = MapStore(features_path)
    return int(sum(store.group[name].shape[1] for name in layer_names(store)))


def iter_feature_batches(
    features_path: str | os.PathLike,
    slice_ids: Sequence[int] | np.ndarray,
    batch_size: int,
    size: int,
    device: torch.device,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(ids, features)`` for consecutive batches of ``slice_ids`` (in the given order).

    ``ids`` is int64 (B,), ``features`` a float32 tensor (B, D, size, size) on ``device``; only one
    batch is held in memory at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = MapStore(features_path)
    names = layer_names(store)
    slice_ids = np.asarray(slice_ids, dtype=np.int64)
    for start in range(0, len(slice_ids), batch_size):
        ids = slice_ids[start : start + batch_size]
        layers = [torch.from_numpy(store.read(name, ids)).to(device) for name in names]
        yield ids, upsample_features(layers, size)
