"""Per-layer CAMs fused over chosen layers (LayerCAM): the numpy side, light to import.

A per-layer CAM store holds ``layers`` (N, L, H, W), one map per candidate layer; which subset of layers is
fused (element-wise maximum) is chosen on validation (:func:`cldf.evaluate.choices.choose_layers`) and
written to the final store by :func:`fuse_store`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cldf.store import ArrayStoreWriter, MapStore

PathLike = str | os.PathLike


def candidate_layers(subsets: Sequence[Sequence[str]]) -> list[str]:
    """The layers of a grid of layer subsets, each once, in order of first appearance."""
    return list(dict.fromkeys(layer for subset in subsets for layer in subset))


def fuse_layers(per_layer, names: Sequence[str], chosen: Sequence[str]):
    """Element-wise maximum over the ``chosen`` layers of per-layer maps (B, L, H, W) → (B, H, W)
    (a numpy array or a torch tensor, returned as the same kind)."""
    index = [list(names).index(name) for name in chosen]
    return per_layer[:, index].max(axis=1) if isinstance(per_layer, np.ndarray) else per_layer[:, index].amax(dim=1)


def fuse_store(per_layer_path: PathLike, names: Sequence[str], chosen: Sequence[str], out: PathLike) -> None:
    """Write ``maps`` (N, H, W), the element-wise maximum over the ``chosen`` of the layers ``names`` of a
    per-layer CAM store (``layers`` (N, L, H, W)), streamed in blocks."""
    store = MapStore(per_layer_path)
    size = store.group["layers"].shape[-1]
    arrays = {"slice_ids": ((), np.int64), "maps": ((size, size), np.float16)}
    attrs = {**store.attrs, "fused_layers": list(chosen)}
    with ArrayStoreWriter(out, len(store.slice_ids), arrays, attrs) as writer:
        for start in range(0, len(store.slice_ids), 256):
            ids = store.slice_ids[start : start + 256]
            writer.write("slice_ids", start, ids)
            writer.write("maps", start, fuse_layers(store.read("layers", ids).astype(np.float32), names, chosen))
