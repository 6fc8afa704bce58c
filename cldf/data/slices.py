"""From NIfTI cases to the slice store ``slices.zarr`` (layout in :mod:`cldf.store`).

Per case (one case in memory at a time): read and validate (:func:`cldf.io.nifti.read_case`), normalise
the volume to [-1, 1], pad in-plane to a square and resize axial slices (:mod:`cldf.data.geometry`),
compute the body mask from the image, drop slices with too little body, and label each slice.

Image-level label of a slice (from the ground truth, the only weak label the methods see):
``target_fraction`` = target voxels of the slice / S² where S × S is the padded square slice at the
original resolution (so labels do not depend on ``image_size``); 1 if ``target_fraction >
positive_min_fraction``, 0 if the target is absent, -1 (ambiguous) otherwise.

Extra arrays beside the documented layout: ``body_fraction`` float32 (N,) (from the image) and
``ground_truth/target_fraction`` float32 (N,) (ground truth, so kept under ``ground_truth``); they
feed the manifest CSV.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from cldf.data.geometry import pad_to_square, resize_images, resize_masks, square_padding
from cldf.data.splits import assign_splits
from cldf.io.errors import DataError
from cldf.io.nifti import Case, read_case
from cldf.store import GROUND_TRUTH, SPLITS, ArrayStoreWriter, open_store

BODY_EPS = 1e-3  # a voxel belongs to the body when some channel is above -1 + BODY_EPS
Z_CHUNK = 32  # slices resized at a time


def slice_arrays(channels: int, image_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Array specs of a slice store / shard for :class:`cldf.store.ArrayStoreWriter`."""
    s = int(image_size)
    return {
        "images": ((channels, s, s), np.float16),
        "body": ((s, s), np.uint8),
        "labels": ((), np.int8),
        "case_index": ((), np.int32),
        "slice_index": ((), np.int32),
        "split": ((), np.uint8),
        "slice_ids": ((), np.int64),
        "body_fraction": ((), np.float32),
        f"{GROUND_TRUTH}/masks": ((s, s), np.uint8),
        f"{GROUND_TRUTH}/target_fraction": ((), np.float32),
    }


def normalise(image: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """Scale a volume (C, X, Y, Z) to float32 [-1, 1] per channel.

    ``percentile`` (MR): clip each channel to its [lower, upper] percentiles over the brain voxels
    (voxels where any channel is non-zero), scale to [-1, 1], and set voxels outside the brain to -1.
    ``window`` (CT): clip to [lower, upper] (HU) and scale to [-1, 1].
    """
    lower, upper = float(settings["lower"]), float(settings["upper"])
    out = np.empty(image.shape, dtype=np.float32)
    if settings["method"] == "window":
        np.clip(image, lower, upper, out=out)
        out -= lower
        out *= 2.0 / (upper - lower)
        out -= 1.0
        return out
    brain = np.any(image != 0, axis=0)
    for c in range(image.shape[0]):
        values = image[c][brain]
        lo, hi = np.percentile(values, [lower, upper]) if values.size else (0.0, 1.0)
        scale = 2.0 / (hi - lo) if hi > lo else 1.0
        out[c] = (np.clip(image[c], lo, hi) - lo) * scale - 1.0
        out[c][~brain] = -1.0
    return out


def body_masks(images: np.ndarray) -> np.ndarray:
    """Body/brain masks from normalised images (B, C, H, W) in [-1, 1]: bool (B, H, W), holes filled."""
    body = np.any(images > -1.0 + BODY_EPS, axis=1)
    return np.stack([ndimage.binary_fill_holes(b) for b in body]) if len(body) else body


def slice_labels(target_fraction: np.ndarray, positive_min_fraction: float) -> np.ndarray:
    """Image-level labels int8 (Z,): 1 if fraction > positive_min_fraction, 0 if 0, else -1 (ambiguous)."""
    labels = np.full(target_fraction.shape, -1, dtype=np.int8)
    labels[target_fraction == 0] = 0
    labels[target_fraction > positive_min_fraction] = 1
    return labels


def _case_slices(ds: Mapping[str, Any], case: Case) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Slices of one case that are kept, as arrays with first axis M, and the case's geometry."""
    size = int(ds["image_size"])
    norm = normalise(case.image, ds["normalisation"])
    cx, cy, cz = case.seg.shape
    square, pad = square_padding((cx, cy))
    norm = pad_to_square(norm, square, pad, -1.0)
    target = pad_to_square(np.isin(case.seg, ds["target_labels"]).astype(np.uint8), square, pad, 0)
    target_fraction = target.sum(axis=(0, 1)).astype(np.float64) / float(square * square)

    images, masks = [], []
    for z0 in range(0, cz, Z_CHUNK):
        z1 = min(z0 + Z_CHUNK, cz)
        images.append(resize_images(np.moveaxis(norm[..., z0:z1], -1, 0), size))
        masks.append(resize_masks(np.moveaxis(target[..., z0:z1], -1, 0), size))
    images_all = np.concatenate(images)
    body = body_masks(images_all)
    body_fraction = body.mean(axis=(1, 2))
    labels = slice_labels(target_fraction, float(ds["positive_min_fraction"]))

    keep = body_fraction >= float(ds["min_body_fraction"])
    if ds["ambiguous_slices"] == "drop":
        keep &= labels != -1
    kept = np.flatnonzero(keep)
    if ds["layout"] != "synthetic" and not np.any(labels[kept] == 1):
        raise DataError(
            f"case {case.id}: no positive slice (target labels {list(ds['target_labels'])} cover more than "
            f"{ds['positive_min_fraction']} of no kept slice); wrong or empty mask?"
        )
    arrays = {
        "images": images_all[kept].astype(np.float16),
        "body": body[kept].astype(np.uint8),
        "labels": labels[kept],
        "slice_index": kept.astype(np.int32),
        "body_fraction": body_fraction[kept].astype(np.float32),
        f"{GROUND_TRUTH}/masks": np.concatenate(masks)[kept],
        f"{GROUND_TRUTH}/target_fraction": target_fraction[kept].astype(np.float32),
    }
    meta = {
        "shape": [int(s) for s in case.shape],
        "affine": np.asarray(case.affine).tolist(),
        "canonical_shape": [int(cx), int(cy), int(cz)],
        "canonical_affine": np.asarray(case.canonical_affine).tolist(),
        "spacing": [float(s) for s in case.spacing],
        "ornt": np.asarray(case.ornt).tolist(),
        "square_size": int(square),
        "pad": [int(pad[0]), int(pad[1])],
        "image_size": size,
        "slice_index": kept.tolist(),
        "n_positive": int(np.sum(labels[kept] == 1)),
        "n_negative": int(np.sum(labels[kept] == 0)),
        "n_ambiguous": int(np.sum(labels[kept] == -1)),
    }
    return arrays, meta


def _store_attrs(ds: Mapping[str, Any], all_case_ids: Sequence[str], cases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "dataset": ds["name"],
        "modalities": list(ds["modalities"]),
        "image_size": int(ds["image_size"]),
        "case_ids": list(all_case_ids),
        "cases": cases,
    }


def build_shard(ds: Mapping[str, Any], case_ids: list[str], all_case_ids: list[str], out: str | os.PathLike) -> None:
    """Slice cases ``case_ids`` into the shard store ``out`` (``slices.zarr`` layout).

    ``case_index`` is the position in ``all_case_ids`` (which also determines the split, see
    :func:`cldf.data.splits.assign_splits`); ``slice_ids`` are local (0..M-1) until :func:`gather`.
    A bad case raises :class:`DataError` (``on_bad_case: error``; nothing is written) or is left out with
    a warning (``skip``; its ``cases`` entry has ``"skipped": reason``). Each case's slices are buffered
    on disk next to ``out``, so memory holds one case at a time.
    """
    out = Path(out)
    index = {c: k for k, c in enumerate(all_case_ids)}
    missing = [c for c in case_ids if c not in index]
    if missing:
        raise DataError(f"case(s) {missing} are not among the dataset's cases")
    splits = assign_splits(all_case_ids, ds["split"])
    out.parent.mkdir(parents=True, exist_ok=True)
    buffers = Path(tempfile.mkdtemp(prefix=f".{out.name}.buffers-", dir=out.parent))
    try:
        metas: list[dict[str, Any]] = []
        counts: list[int] = []
        for case_id in case_ids:
            meta: dict[str, Any] = {"id": case_id, "index": index[case_id], "split": splits[case_id]}
            try:
                arrays, geometry = _case_slices(ds, read_case(ds, case_id))
            except DataError as err:
                if ds["on_bad_case"] == "error":
                    raise
                warnings.warn(f"skipping case {case_id}: {err}", stacklevel=2)
                metas.append({**meta, "skipped": str(err)})
                counts.append(0)
                continue
            metas.append({**meta, **geometry})
            counts.append(len(arrays["labels"]))
            for name, arr in arrays.items():
                np.save(buffers / f"{len(metas) - 1}-{name.replace('/', '.')}.npy", arr)

        specs = slice_arrays(len(ds["modalities"]), ds["image_size"])
        with ArrayStoreWriter(out, sum(counts), specs, _store_attrs(ds, all_case_ids, metas)) as writer:
            start = 0
            for k, (meta, m) in enumerate(zip(metas, counts)):
                if m == 0:
                    continue
                for name in specs:
                    if name in ("case_index", "split", "slice_ids"):
                        continue
                    writer.write(name, start, np.load(buffers / f"{k}-{name.replace('/', '.')}.npy", mmap_mode="r"))
                writer.write("case_index", start, np.full(m, meta["index"], dtype=np.int32))
                writer.write("split", start, np.full(m, SPLITS.index(meta["split"]), dtype=np.uint8))
                writer.write("slice_ids", start, np.arange(start, start + m, dtype=np.int64))
                start += m
    finally:
        shutil.rmtree(buffers, ignore_errors=True)


def _runs(owner: np.ndarray, local: np.ndarray, max_len: int) -> Iterable[tuple[int, int, int, int]]:
    """Maximal runs (start, length, shard, local_start) of consecutive rows of one shard, ≤ max_len long."""
    start = 0
    n = len(owner)
    while start < n:
        end = start + 1
        while (
            end < n and end - start < max_len and owner[end] == owner[start] and local[end] == local[end - 1] + 1
        ):
            end += 1
        yield start, end - start, int(owner[start]), int(local[start])
        start = end


def gather(shard_paths: Sequence[str | os.PathLike], out: str | os.PathLike, manifest_csv: str | os.PathLike) -> None:
    """Combine shard stores into ``slices.zarr`` at ``out`` and write the manifest CSV.

    Rows are ordered by (case_index, slice_index) and get global ``slice_ids`` 0..N-1. The ``cases``
    attribute lists every case of ``case_ids`` in that order (so ``cases[case_index]`` is a row's case);
    the shards must cover every case exactly once. Streams blocks of rows, memory independent of N.
    Manifest columns: slice_id, case, slice_index, split, label, target_fraction, body_fraction.
    Raises :class:`DataError` when there are no slices at all.
    """
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise DataError(f"no shards to gather into {out}")
    shards = [open_store(p) for p in shard_paths]
    ref = dict(shards[0].attrs)
    for path, shard in zip(shard_paths, shards):
        for key in ("dataset", "modalities", "image_size", "case_ids"):
            if shard.attrs[key] != ref[key]:
                raise DataError(f"shard {path} has {key}={shard.attrs[key]!r}, other shards {ref[key]!r}")
    case_ids = list(ref["case_ids"])
    by_index: dict[int, dict[str, Any]] = {}
    for path, shard in zip(shard_paths, shards):
        for meta in shard.attrs["cases"]:
            if meta["index"] in by_index:
                raise DataError(f"case {meta['id']} appears in two shards (second: {path})")
            by_index[meta["index"]] = meta
    absent = [c for k, c in enumerate(case_ids) if k not in by_index]
    if absent:
        raise DataError(f"no shard holds case(s) {absent}")
    cases = [by_index[k] for k in range(len(case_ids))]

    case_index = np.concatenate([np.asarray(s["case_index"][:], dtype=np.int64) for s in shards])
    slice_index = np.concatenate([np.asarray(s["slice_index"][:], dtype=np.int64) for s in shards])
    if len(case_index) == 0:
        reasons = "; ".join(f"{m['id']}: {m['skipped']}" for m in cases if "skipped" in m)
        raise DataError(f"no slices to write into {out}: every case was skipped or had no kept slice ({reasons})")
    owner = np.concatenate([np.full(s["labels"].shape[0], k) for k, s in enumerate(shards)])
    local = np.concatenate([np.arange(s["labels"].shape[0]) for s in shards])
    order = np.lexsort((slice_index, case_index))
    owner, local = owner[order], local[order]

    ds_like = {"name": ref["dataset"], "modalities": ref["modalities"], "image_size": ref["image_size"]}
    specs = slice_arrays(len(ref["modalities"]), int(ref["image_size"]))
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("labels", "split", "body_fraction", "target_fraction")}
    with ArrayStoreWriter(out, len(order), specs, _store_attrs(ds_like, case_ids, cases)) as writer:
        for start, length, k, lo in _runs(owner, local, Z_CHUNK):
            shard = shards[k]
            for name in specs:
                if name == "slice_ids":
                    continue
                block = np.asarray(shard[name][lo : lo + length])
                writer.write(name, start, block)
                key = "target_fraction" if name.endswith("target_fraction") else name
                if key in columns:
                    columns[key].append(block)
        writer.write("slice_ids", 0, np.arange(len(order), dtype=np.int64))

    manifest_csv = Path(manifest_csv)
    manifest_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp_csv = manifest_csv.with_name(f".{manifest_csv.name}.tmp-{os.getpid()}")
    pd.DataFrame(
        {
            "slice_id": np.arange(len(order)),
            "case": np.asarray(case_ids, dtype=object)[case_index[order]],
            "slice_index": slice_index[order],
            "split": np.asarray(SPLITS, dtype=object)[np.concatenate(columns["split"]).astype(np.int64)],
            "label": np.concatenate(columns["labels"]),
            "target_fraction": np.concatenate(columns["target_fraction"]),
            "body_fraction": np.concatenate(columns["body_fraction"]),
        }
    ).to_csv(tmp_csv, index=False, float_format="%.6g")
    os.replace(tmp_csv, manifest_csv)
