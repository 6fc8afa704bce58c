"""The pipeline step that computes one registered map for one shard of cases (``cldf map``).

It reads images and image-level labels through :class:`cldf.store.SliceStore` (never the ground truth),
calls the map's function (:mod:`cldf.registry`) on ``settings["batch_size"]`` slices at a time and writes
every batch straight into an :class:`cldf.store.ArrayStoreWriter`, so memory is bounded by the batch size.
Rows are the shard's slices in increasing global slice id (only those the map is registered for,
:func:`map_rows`); a shard without such slices yields a valid store with N = 0.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cldf.data.splits import feature_rows
from cldf.maps.common import Batch
from cldf.registry import MapMethod
from cldf.store import ArrayStoreWriter, SliceStore

PathLike = str | os.PathLike
DTYPES = {"probs": np.float32}
"""Stored dtype of a map function's outputs by name; every other output is stored as float16."""


def _batches(ids: np.ndarray, batch_size: int, desc: str) -> Iterator[tuple[int, np.ndarray]]:
    """(start row in the output, global slice ids (b,)) of consecutive batches of ``ids``."""
    starts = range(0, len(ids), int(batch_size))
    for start in tqdm(starts, desc=desc, unit="batch", total=len(starts), mininterval=5.0):
        yield start, ids[start : start + int(batch_size)]


def _batch(store: SliceStore, ids: np.ndarray, device: torch.device, seed: int) -> Batch:
    images = torch.from_numpy(store.images(ids)).to(device)
    return Batch(images=images, labels=store.labels[ids], slice_ids=ids, seed=int(seed))


def _probe(store: SliceStore, device: torch.device, seed: int) -> Batch:
    """One all-background slice: the map's output shapes, also for a shard without slices."""
    shape = (1, store.channels, store.image_size, store.image_size)
    images = torch.full(shape, -1.0, device=device)
    return Batch(images=images, labels=np.zeros(1, np.int8), slice_ids=np.zeros(1, np.int64), seed=int(seed))


def map_rows(store: SliceStore, method: MapMethod, cases: Sequence[int], settings: Mapping[str, Any],
             seed: int) -> np.ndarray:
    """The slices of ``cases`` a map is computed for: its registered ``rows``, or ``settings["rows"]``."""
    ids = store.indices(cases=list(cases))
    rows = settings.get("rows", method.rows)
    if rows == "val+test":
        return np.intersect1d(ids, store.indices(split=["val", "test"]))
    if rows == "evaluation":
        wanted = np.union1d(store.indices(split="val", labels=[1]), store.indices(split="test"))
        return np.intersect1d(ids, wanted)
    if rows == "decoder":
        return np.intersect1d(ids, feature_rows(store, int(settings["max_train_slices"]), seed))
    return ids


def run_map(
    slices_path: PathLike,
    method: MapMethod,
    model: nn.Module | Mapping[str, nn.Module],
    settings: Mapping[str, Any],
    cases: Sequence[int],
    out: PathLike,
    device: torch.device,
    seed: int,
) -> int:
    """Compute map ``method`` for the slices of ``cases`` and write it to ``out``; returns N.

    ``model`` is the network the map reads, or ``{kind: network}`` for a map of several.

    The store holds ``slice_ids`` int64 (N,) and one array per output of the map function, (N, ...),
    float16 (``probs``: float32); attributes ``map``, ``settings``, ``seed``, ``image_size`` and ``shapes``
    (the per-slice shape of every output).
    """
    store = SliceStore(slices_path)
    model = {k: m.to(device).eval() for k, m in model.items()} if isinstance(model, dict) else model.to(device).eval()
    compute = method.load()
    ids = map_rows(store, method, cases, settings, seed)
    probe = compute(model, _probe(store, device, seed), settings)
    shapes = {name: [int(s) for s in value.shape[1:]] for name, value in probe.items()}
    arrays = {"slice_ids": ((), np.int64), **{n: (s, DTYPES.get(n, np.float16)) for n, s in shapes.items()}}
    attrs = {"map": method.name, "settings": dict(settings), "seed": int(seed), "image_size": store.image_size,
             "shapes": shapes}
    with ArrayStoreWriter(out, len(ids), arrays, attrs) as writer:
        for start, batch in _batches(ids, settings["batch_size"], method.name):
            values = compute(model, _batch(store, batch, device, seed), settings)
            writer.write("slice_ids", start, batch)
            for name, value in values.items():
                writer.write(name, start, value.detach().float().cpu().numpy())
    return int(len(ids))
