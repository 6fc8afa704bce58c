"""A tiny synthetic ``slices.zarr`` for model tests: positives carry a bright blob, negatives do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cldf.store import SPLITS, ArrayStoreWriter


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
    case_index = np.repeat(np.arange(n_cases), slices_per_case).astype(np.int32)
    split_codes = np.asarray([SPLITS.index(splits[c]) for c in case_index], np.uint8)
    attrs = {
        "dataset": "tiny",
        "modalities": ["flair", "t1"][:channels] + [f"m{k}" for k in range(2, channels)],
        "image_size": size,
        "cases": [{"id": f"case{k:02d}", "split": splits[k]} for k in range(n_cases)],
    }
    arrays = {
        "images": ((channels, size, size), "float16"),
        "body": ((size, size), "uint8"),
        "labels": ((), "int8"),
        "case_index": ((), "int32"),
        "slice_index": ((), "int32"),
        "split": ((), "uint8"),
        "slice_ids": ((), "int64"),
        "ground_truth/masks": ((size, size), "uint8"),
    }
    with ArrayStoreWriter(path, n, arrays, attrs) as w:
        w.write("images", 0, images)
        w.write("body", 0, np.broadcast_to(body, (n, size, size)).astype(np.uint8))
        w.write("labels", 0, labels)
        w.write("case_index", 0, case_index)
        w.write("slice_index", 0, np.tile(np.arange(slices_per_case), n_cases).astype(np.int32))
        w.write("split", 0, split_codes)
        w.write("slice_ids", 0, np.arange(n, dtype=np.int64))
        w.write("ground_truth/masks", 0, masks)
    return path
