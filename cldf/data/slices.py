"""From NIfTI cases to the slice store (layout in :mod:`cldf.store`).

Per case (one case in memory at a time): read and validate (:func:`cldf.io.nifti.read_case`), normalise
the volume to [-1, 1], pad in-plane to a square and resize axial slices (:mod:`cldf.data.geometry`),
compute the body mask from the image, drop slices with too little body, and label each slice.

Image-level label of a slice (from the ground truth, the only weak label the methods see):
``target_fraction`` = target voxels of the slice / S² where S × S is the padded square slice at the
original resolution (so labels do not depend on ``image_size``); 1 if ``target_fraction >
positive_min_fraction``, 0 if the target is absent, -1 (ambiguous) otherwise. With a labels table
(``labels_csv``, :mod:`cldf.io.labels`) the labels are the table's instead (-1: not listed, kept whatever
``ambiguous_slices`` says); masks are then optional, and where a case has one, how often the table
disagrees with it is recorded in the case's ``labels_check`` entry.

Extra arrays beside the documented layout: ``body_fraction`` float32 (N,) (from the image) and
``ground_truth/target_fraction`` float32 (N,) (ground truth, so kept under ``ground_truth``); they
feed the manifest CSV.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from cldf.atomic import atomic_file, make_owned_dir, remove_stale_temporaries, temporary_sibling

from cldf.data.geometry import pad_to_square, resize_images, resize_masks, square_padding
from cldf.data.splits import assign_splits
from cldf.io.errors import DataError
from cldf.io.labels import canonical_labels, labels_path, load_labels
from cldf.io.layouts import slab_of, slab_slices
from cldf.io.nifti import Case, read_case
from cldf.store import GROUND_TRUTH, SPLITS, ArrayStoreWriter, open_store

LOG = logging.getLogger("cldf.data")
BODY_EPS = 1e-3  # a voxel belongs to the body when some channel is above -1 + BODY_EPS
Z_CHUNK = 32  # slices resized at a time


def slice_arrays(channels: int, image_size: int, with_split: bool = True) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Array specs of a slice store (a shard store has no ``split``) for :class:`cldf.store.ArrayStoreWriter`."""
    s = int(image_size)
    specs = {
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
        f"{GROUND_TRUTH}/labels": ((), np.int8),
    }
    if not with_split:
        del specs["split"]
    return specs


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


def labels_check(table: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """How a labels table (int8 (Z,), -1 unlisted) compares with the mask-derived labels of the same slices."""
    listed = table != -1
    return {"listed": int(listed.sum()), "agree": int(np.sum(listed & (table == truth))),
            "table_1_mask_0": int(np.sum(listed & (table == 1) & (truth == 0))),
            "table_0_mask_1": int(np.sum(listed & (table == 0) & (truth == 1))),
            "mask_ambiguous": int(np.sum(listed & (truth == -1)))}


def _case_slices(
    ds: Mapping[str, Any], case: Case, table: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Slices of one case that are kept, as arrays with first axis M, and the case's geometry.

    ``table``: the case's labels from a labels table, int8 (Z,) in canonical z order (-1: not listed).
    """
    size = int(ds["image_size"])
    norm = normalise(case.image, ds["normalisation"])
    cx, cy, cz = case.image.shape[1:]
    square, pad = square_padding((cx, cy))
    norm = pad_to_square(norm, square, pad, -1.0)
    seg = np.zeros((cx, cy, cz), np.uint8) if case.seg is None else case.seg
    target = pad_to_square(np.isin(seg, ds["target_labels"]).astype(np.uint8), square, pad, 0)
    target_fraction = target.sum(axis=(0, 1)).astype(np.float64) / float(square * square)

    images, masks = [], []
    for z0 in range(0, cz, Z_CHUNK):
        z1 = min(z0 + Z_CHUNK, cz)
        images.append(resize_images(np.moveaxis(norm[..., z0:z1], -1, 0), size))
        masks.append(resize_masks(np.moveaxis(target[..., z0:z1], -1, 0), size))
    images_all = np.concatenate(images)
    body = body_masks(images_all)
    body_fraction = body.mean(axis=(1, 2))
    truth = slice_labels(target_fraction, float(ds["positive_min_fraction"])) if case.seg is not None else \
        np.full(cz, -1, np.int8)
    labels = truth if table is None else table

    keep = body_fraction >= float(ds["min_body_fraction"])
    if ds["ambiguous_slices"] == "drop" and table is None and case.seg is not None:
        keep &= labels != -1
    slab = slab_of(ds, case.id)
    where = ""
    if slab is not None:
        keep &= slab_slices(ds, slab[1], cz)
        where = f" among its slices of the scan (config key datasets.{ds['name']}.slabs)"
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise DataError(
            f"case {case.id}: no slice is kept{where} (none has a body fraction of at least "
            f"{ds['min_body_fraction']}, config key datasets.{ds['name']}.min_body_fraction)"
        )
    arrays = {
        "images": images_all[kept].astype(np.float16),
        "body": body[kept].astype(np.uint8),
        "labels": labels[kept],
        "slice_index": kept.astype(np.int32),
        "body_fraction": body_fraction[kept].astype(np.float32),
        f"{GROUND_TRUTH}/masks": np.concatenate(masks)[kept],
        f"{GROUND_TRUTH}/target_fraction": target_fraction[kept].astype(np.float32),
        f"{GROUND_TRUTH}/labels": truth[kept],
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
        "has_mask": case.seg is not None,
    }
    if table is not None and case.seg is not None:
        meta["labels_check"] = labels_check(table, truth)
    return arrays, meta


def _store_attrs(ds: Mapping[str, Any], all_case_ids: Sequence[str], cases: list[dict[str, Any]]) -> dict[str, Any]:
    """``labels_from``: the labels table, or ``masks``; ``has_masks``: every kept case has a mask."""
    return {
        "dataset": ds["name"],
        "layout": ds.get("layout", ""),
        "modalities": list(ds["modalities"]),
        "image_size": int(ds["image_size"]),
        "case_ids": list(all_case_ids),
        "cases": cases,
        "labels_from": str(ds.get("labels_csv") or "masks"),
        "has_masks": all(m.get("has_mask", True) for m in cases if "skipped" not in m),
    }


def slice_case(ds: Mapping[str, Any], case_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, check and slice one case without a labels table (new scans: every slice is labelled -1
    when the case has no mask); arrays of the kept slices and the case's geometry (:func:`_case_slices`)."""
    arrays, meta = _case_slices(ds, read_case(ds, case_id))
    return arrays, {"id": case_id, **meta}


def _buffer_name(k: int, name: str) -> str:
    return f"{k}-{name.replace('/', '.')}.npy"


def _read_and_slice(ds: Mapping[str, Any], case_id: str, tables: Mapping[str, Mapping[int, int]] | None):
    case = read_case(ds, case_id)
    table = None if tables is None else canonical_labels(tables.get(case_id, {}), case.image.shape[3], case.ornt)
    return _case_slices(ds, case, table)


def _slice_cases(
    ds: Mapping[str, Any], case_ids: list[str], index: Mapping[str, int], buffers: Path,
    tables: Mapping[str, Mapping[int, int]] | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Read, check and slice each case into ``buffers``: per-case metadata and slice counts.

    A bad case raises (``on_bad_case: error``) or is recorded with ``"skipped": reason`` (``skip``).
    ``tables``: the labels table (:func:`cldf.io.labels.load_labels`), or None when labels come from masks.
    """
    metas: list[dict[str, Any]] = []
    counts: list[int] = []
    for case_id in tqdm(case_ids, desc="slicing", unit="case"):
        meta: dict[str, Any] = {"id": case_id, "index": index[case_id]}
        try:
            arrays, geometry = _read_and_slice(ds, case_id, tables)
        except DataError as err:
            if ds["on_bad_case"] == "error":
                raise
            LOG.warning("skipping case %s: %s", case_id, err)
            metas.append({**meta, "skipped": str(err)})
            counts.append(0)
            continue
        metas.append({**meta, **geometry})
        counts.append(len(arrays["labels"]))
        for name, arr in arrays.items():
            np.save(buffers / _buffer_name(len(metas) - 1, name), arr)
    return metas, counts


def build_shard(ds: Mapping[str, Any], case_ids: list[str], all_case_ids: list[str], out: str | os.PathLike) -> None:
    """Slice cases ``case_ids`` into the shard store ``out`` (the slice-store layout without ``split``).

    ``case_index`` is the position in ``all_case_ids``; ``slice_ids`` are local (0..M-1) until :func:`gather`,
    which also assigns the splits (from the cases that were kept). A bad case raises :class:`DataError`
    (``on_bad_case: error``; nothing is written) or is left out with a warning (``skip``; its ``cases``
    entry has ``"skipped": reason``). Each case's slices are buffered on disk next to ``out`` (a marked
    temporary directory that the next run removes if this one is killed), so memory holds one case at a time.
    """
    out = Path(out)
    index = {c: k for k, c in enumerate(all_case_ids)}
    missing = [c for c in case_ids if c not in index]
    if missing:
        raise DataError(f"case(s) {missing} are not among the dataset's cases")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tables = load_labels(ds, all_case_ids, only=case_ids) if labels_path(ds) is not None else None
    buffers = make_owned_dir(temporary_sibling(out, "buffers"))
    try:
        metas, counts = _slice_cases(ds, case_ids, index, buffers, tables)
        specs = slice_arrays(len(ds["modalities"]), ds["image_size"], with_split=False)
        with ArrayStoreWriter(out, sum(counts), specs, _store_attrs(ds, all_case_ids, metas)) as writer:
            start = 0
            for k, (meta, m) in enumerate(zip(metas, counts)):
                if m == 0:
                    continue
                for name in specs:
                    if name not in ("case_index", "slice_ids"):
                        writer.write(name, start, np.load(buffers / _buffer_name(k, name), mmap_mode="r"))
                writer.write("case_index", start, np.full(m, meta["index"], dtype=np.int32))
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


def _collect_cases(shard_paths: Sequence[Path], shards: Sequence[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Common attributes of the shards and the metadata of every case, in ``case_ids`` order."""
    ref = dict(shards[0].attrs)
    for path, shard in zip(shard_paths, shards):
        for key in ("dataset", "modalities", "image_size", "case_ids"):
            if shard.attrs[key] != ref[key]:
                raise DataError(f"shard {path} has {key}={shard.attrs[key]!r}, other shards {ref[key]!r}")
    by_index: dict[int, dict[str, Any]] = {}
    for path, shard in zip(shard_paths, shards):
        for meta in shard.attrs["cases"]:
            if meta["index"] in by_index:
                raise DataError(f"case {meta['id']} appears in two shards (second: {path})")
            by_index[meta["index"]] = meta
    absent = [c for k, c in enumerate(ref["case_ids"]) if k not in by_index]
    if absent:
        raise DataError(f"no shard holds case(s) {absent}")
    return ref, [by_index[k] for k in range(len(ref["case_ids"]))]


def _with_splits(cases: list[dict[str, Any]], split_cfg: Mapping[str, Any], dataset: str) -> list[dict[str, Any]]:
    """Case metadata with ``split`` assigned from the kept cases (skipped cases get ``None``)."""
    skipped = {m["id"]: m["skipped"] for m in cases if "skipped" in m}
    kept = [m["id"] for m in cases if "skipped" not in m]
    if not kept:
        reasons = "; ".join(f"{c}: {why}" for c, why in skipped.items())
        raise DataError(f"dataset {dataset}: every case was skipped ({reasons})")
    try:
        split = assign_splits(kept, split_cfg, skipped)
    except DataError as err:
        raise DataError(f"dataset {dataset}: {err}") from None
    return [{"id": m["id"], "index": m["index"], "split": split.get(m["id"]), **m} for m in cases]


def write_skipped_cases(cases: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """``case,reason`` of every skipped case (only the header when none was skipped), atomically."""
    frame = pd.DataFrame(
        [(m["id"], m["skipped"]) for m in cases if "skipped" in m], columns=["case", "reason"]
    )
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)


def gather(
    shard_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    test_truth_out: str | os.PathLike,
    manifest_csv: str | os.PathLike,
    skipped_csv: str | os.PathLike,
    split_cfg: Mapping[str, Any],
) -> None:
    """Combine shard stores into the slice store ``out`` and the test truth, assign the splits, write the CSVs.

    Rows are ordered by (case_index, slice_index) and get global ``slice_ids`` 0..N-1. The ``cases``
    attribute lists every case of ``case_ids`` in that order (so ``cases[case_index]`` is a row's case);
    the shards must cover every case exactly once. Splits are drawn from the kept cases only
    (:func:`cldf.data.splits.assign_splits`); ``skipped_csv`` lists the skipped cases with their reason.
    The masks of test slices go to ``test_truth_out`` only (their rows in the slice store's ground truth
    are zero). Streams blocks of rows, memory independent of N. Manifest columns: slice_id, case,
    slice_index, split, label, target_fraction, body_fraction. Raises :class:`DataError` when every case
    was skipped or a split the config asks for is empty.
    """
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise DataError(f"no shards to gather into {out}")
    shards = [open_store(p) for p in shard_paths]
    ref, cases = _collect_cases(shard_paths, shards)
    cases = _with_splits(cases, split_cfg, ref["dataset"])
    for meta in cases:
        if "skipped" in meta:
            LOG.warning("case %s was skipped: %s", meta["id"], meta["skipped"])
    _log_labels_check(ref.get("labels_from", "masks"), cases)
    case_index = np.concatenate([np.asarray(s["case_index"][:], dtype=np.int64) for s in shards])
    slice_index = np.concatenate([np.asarray(s["slice_index"][:], dtype=np.int64) for s in shards])
    owner = np.concatenate([np.full(s["labels"].shape[0], k) for k, s in enumerate(shards)])
    local = np.concatenate([np.arange(s["labels"].shape[0]) for s in shards])
    order = np.lexsort((slice_index, case_index))
    split_codes = np.asarray([SPLITS.index(m["split"]) if m["split"] else 0 for m in cases], dtype=np.uint8)
    rows = _Rows(owner[order], local[order], split_codes[case_index[order]])
    columns = _write_gathered(shards, rows, ref, cases, out, test_truth_out)
    write_skipped_cases(cases, skipped_csv)
    _write_manifest(ref["case_ids"], case_index[order], slice_index[order], columns, manifest_csv)


def _log_labels_check(labels_from: str, cases: Sequence[Mapping[str, Any]]) -> None:
    """One line: how often the labels table disagrees with the masks (cases with a mask only)."""
    checks = [m["labels_check"] for m in cases if "labels_check" in m]
    if labels_from == "masks" or not checks:
        return
    listed, agree = sum(c["listed"] for c in checks), sum(c["agree"] for c in checks)
    LOG.warning("labels table %s disagrees with the masks on %d of %d listed slices (%.1f %%) of %d case(s) with a "
                "mask; the table wins (per case: labels_check.csv)", labels_from, listed - agree, listed,
                100.0 * (listed - agree) / max(listed, 1), len(checks))


@dataclass
class _Rows:
    """Where each row of the gathered store comes from (shard, row in it) and its split code."""

    owner: np.ndarray
    local: np.ndarray
    split: np.ndarray


TEST = SPLITS.index("test")


def _write_gathered(
    shards: Sequence[Any],
    rows: _Rows,
    ref: Mapping[str, Any],
    cases: list[dict[str, Any]],
    out: str | os.PathLike,
    test_truth_out: str | os.PathLike,
) -> dict[str, np.ndarray]:
    """Stream the shards' rows into ``out`` (test masks zeroed) and the test rows' truth into ``test_truth_out``.

    Returns the per-row columns the manifest needs (labels, split, body and target fractions).
    """
    labels_from = ref.get("labels_from", "masks")
    ds_like = {"name": ref["dataset"], "layout": ref.get("layout", ""), "modalities": ref["modalities"],
               "image_size": ref["image_size"], "labels_csv": None if labels_from == "masks" else labels_from}
    size = int(ref["image_size"])
    specs = slice_arrays(len(ref["modalities"]), size)
    test_rows = np.flatnonzero(rows.split == TEST)
    truth_specs = {"slice_ids": ((), np.int64), "masks": ((size, size), np.uint8), "labels": ((), np.int8),
                   "target_fraction": ((), np.float32)}
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("labels", "split", "body_fraction", "target_fraction")}
    attrs = _store_attrs(ds_like, ref["case_ids"], cases)
    truth_attrs = {"dataset": ref["dataset"], "has_masks": attrs["has_masks"]}
    with ArrayStoreWriter(out, len(rows.owner), specs, attrs) as writer, \
            ArrayStoreWriter(test_truth_out, len(test_rows), truth_specs, truth_attrs) as truth:
        written = 0
        for start, length, k, lo in _runs(rows.owner, rows.local, Z_CHUNK):
            block = {name: np.asarray(shards[k][name][lo : lo + length]) for name in specs if name not in ("slice_ids", "split")}
            split = rows.split[start : start + length]
            is_test = split == TEST
            if is_test.any():
                n = int(is_test.sum())
                truth.write("slice_ids", written, np.arange(start, start + length)[is_test])
                truth.write("masks", written, block[f"{GROUND_TRUTH}/masks"][is_test])
                truth.write("labels", written, block[f"{GROUND_TRUTH}/labels"][is_test])
                truth.write("target_fraction", written, block[f"{GROUND_TRUTH}/target_fraction"][is_test])
                written += n
                block[f"{GROUND_TRUTH}/masks"] = np.where(is_test[:, None, None], 0, block[f"{GROUND_TRUTH}/masks"])
                block[f"{GROUND_TRUTH}/target_fraction"] = np.where(is_test, 0, block[f"{GROUND_TRUTH}/target_fraction"])
                block[f"{GROUND_TRUTH}/labels"] = np.where(is_test, -1, block[f"{GROUND_TRUTH}/labels"])
            for name, values in {**block, "split": split}.items():
                writer.write(name, start, values)
            for key, name in (("labels", "labels"), ("split", "split"), ("body_fraction", "body_fraction"),
                              ("target_fraction", f"{GROUND_TRUTH}/target_fraction")):
                columns[key].append(split if key == "split" else np.asarray(shards[k][name][lo : lo + length]))
        writer.write("slice_ids", 0, np.arange(len(rows.owner), dtype=np.int64))
    return {k: np.concatenate(v) for k, v in columns.items()}


def _write_manifest(
    case_ids: Sequence[str],
    case_index: np.ndarray,
    slice_index: np.ndarray,
    columns: Mapping[str, np.ndarray],
    manifest_csv: str | os.PathLike,
) -> None:
    frame = pd.DataFrame(
        {
            "slice_id": np.arange(len(case_index)),
            "case": np.asarray(case_ids, dtype=object)[case_index],
            "slice_index": slice_index,
            "split": np.asarray(SPLITS, dtype=object)[columns["split"].astype(np.int64)],
            "label": columns["labels"],
            "target_fraction": columns["target_fraction"],
            "body_fraction": columns["body_fraction"],
        }
    )
    with atomic_file(manifest_csv) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
