"""Small stores for tests: a slice store from arrays, a row-aligned map store, and a tiny blob dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cldf.data.slices import slice_arrays
from cldf.store import GROUND_TRUTH, SPLITS, ArrayStoreWriter


def write_slice_store(
    path: Path,
    images: np.ndarray,
    labels: Sequence[int],
    case_index: Sequence[int],
    splits: Sequence[str],
    masks: np.ndarray,
    body: np.ndarray | None = None,
    slice_index: Sequence[int] | None = None,
    cases: list[dict[str, Any]] | None = None,
    modalities: Sequence[str] | None = None,
) -> Path:
    """A slice store (the layout of :func:`cldf.data.slices.slice_arrays`) from in-memory arrays.

    ``images`` (N, C, S, S) in [-1, 1], ``masks`` (N, S, S) ground truth, ``splits`` one name per case.
    ``body`` defaults to every pixel, ``slice_index`` to 0..M-1 within each case, ``cases`` to minimal
    entries, ``modalities`` to flair, t1, m2, ...
    """
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    case_index = np.asarray(case_index, dtype=np.int32)
    if slice_index is None:
        slice_index = np.concatenate([np.arange((case_index == c).sum()) for c in np.unique(case_index)])
    if cases is None:
        cases = [{"id": f"case{k:02d}", "index": k, "split": s} for k, s in enumerate(splits)]
    names = list(modalities or (["flair", "t1"][:channels] + [f"m{k}" for k in range(2, channels)]))
    attrs = {"dataset": "tiny", "modalities": names, "image_size": size, "cases": cases,
             "case_ids": [c["id"] for c in cases]}
    split_codes = np.asarray([SPLITS.index(splits[c]) for c in case_index], np.uint8)
    masks = np.asarray(masks)
    columns = {
        "images": images, "body": np.ones((n, size, size), bool) if body is None else body, "labels": labels,
        "case_index": case_index, "slice_index": slice_index, "split": split_codes,
        "slice_ids": np.arange(n), "body_fraction": np.ones(n), f"{GROUND_TRUTH}/masks": masks,
        f"{GROUND_TRUTH}/target_fraction": masks.reshape(n, -1).mean(1),
    }
    with ArrayStoreWriter(path, n, slice_arrays(channels, size), attrs) as w:
        for name, values in columns.items():
            w.write(name, 0, np.asarray(values))
    return path


def write_test_truth(slices_path: Path, out: Path) -> Path:
    """The test truth of a slice store written by :func:`write_slice_store` (masks of its test rows)."""
    import zarr

    group = zarr.open_group(str(slices_path), mode="r")
    test = np.flatnonzero(np.asarray(group["split"][:]) == SPLITS.index("test"))
    masks = np.asarray(group[f"{GROUND_TRUTH}/masks"][:])[test]
    return write_map_store(out, test, masks=masks.astype(np.uint8), labels=np.asarray(group["labels"][:])[test],
                           target_fraction=masks.reshape(len(test), -1).mean(1).astype(np.float32))


def write_map_store(path: Path, ids: np.ndarray, attrs: dict | None = None, **arrays: np.ndarray) -> Path:
    """A row-aligned map store: ``slice_ids`` plus the given arrays (first axis = len(ids))."""
    specs = {"slice_ids": ((), np.int64), **{k: (v.shape[1:], v.dtype) for k, v in arrays.items()}}
    with ArrayStoreWriter(path, len(ids), specs, attrs) as w:
        w.write("slice_ids", 0, np.asarray(ids))
        for name, values in arrays.items():
            w.write(name, 0, values)
    return path


def make_slices(
    path: Path,
    n_cases: int = 10,
    slices_per_case: int = 24,
    size: int = 16,
    channels: int = 2,
    splits: tuple[str, ...] = ("train",) * 7 + ("val",) * 2 + ("test",),
    seed: int = 0,
) -> Path:
    """Write a slice store of ``n_cases`` × ``slices_per_case`` images (C, size, size) in [-1, 1].

    Every image is a noisy disk ("body", ≈ -0.3) on a -1 background. About a third of the slices are
    positive (label 1): a bright Gaussian blob (channel 0 → ≈ +0.9) whose pixels above half height form
    the ground-truth mask; every 12th slice is ambiguous (label -1, faint small blob) and must never be
    trained on by the weakly supervised models. ``splits[k]`` is the split of case ``k``.
    """
    rng = np.random.default_rng(seed)
    n = n_cases * slices_per_case
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    centre = (size - 1) / 2
    body = ((yy - centre) ** 2 + (xx - centre) ** 2) <= (0.45 * size) ** 2
    images = np.empty((n, channels, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    labels = np.zeros(n, np.int8)
    for i in range(n):
        img = np.where(body, -0.3, -1.0)[None].repeat(channels, 0) + 0.08 * rng.standard_normal((channels, size, size))
        kind = -1 if i % 12 == 11 else int(rng.random() < 0.35)
        if kind != 0:
            r = rng.uniform(1.5, 2.5) if kind == 1 else 0.7
            cy, cx = rng.uniform(0.3 * size, 0.7 * size, size=2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
            img[0] += (1.2 if kind == 1 else 0.4) * blob
            if channels > 1:
                img[1] += 0.5 * blob
            masks[i] = blob > 0.5
        labels[i] = kind
        images[i] = np.clip(img, -1, 1)
    case_index = np.repeat(np.arange(n_cases), slices_per_case)
    return write_slice_store(path, images, labels, case_index, splits[:n_cases], masks,
                             body=np.broadcast_to(body, (n, size, size)))
