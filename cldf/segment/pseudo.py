"""CLDF masks of whole cases in each scan's own geometry: pseudo-masks of a dataset's cases, predictions on
new scans.

Each slice is segmented as its label allows. Labelled 1: features conditioned on the label (the labelled
protocol). Labelled 0: empty. Unlabelled (-1: not in the labels table, an ambiguous slice, every slice of a
new scan): the unlabelled protocol, as chosen on validation (or given, :mod:`cldf.evaluate.given`): the
CDM conditioned on the null class or on the classifier's call, and the mask emptied where the CAM
classifier's probability is below the gate. Diffusion features and probabilities are computed batch by
batch and never stored; one case is in memory at a time. The masks go back into the scan's voxel grid,
affine and orientation (:func:`cldf.data.geometry.to_original`), written atomically one file per case.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cldf.atomic import atomic_file
from cldf.data.geometry import to_original
from cldf.data.slices import slice_case
from cldf.io.errors import DataError
from cldf.maps.cams import positive_probability
from cldf.models.decoder import PixelDecoder
from cldf.segment.cluster import finish_masks, prototypes_of, segment_batches
from cldf.segment.features import ComputedFeatures, GroupedFeatures, decoder_inputs
from cldf.segment.train import check_feature_dim
from cldf.store import SliceStore

LOG = logging.getLogger("cldf.pseudo")
PSEUDO_COLUMNS = ("case", "path", "n_slices", "n_positive_slices", "foreground_voxels")
PREDICT_COLUMNS = ("case", "path", "foreground_voxels")


class ClassifierProbs:
    """The CAM classifier's positive-class probability, computed on the fly and kept per slice id: what
    :class:`ComputedFeatures` (conditioning ``predicted``) and the gate read, like a ``classifier_probs`` store."""

    def __init__(self, model: torch.nn.Module, slices: Any, device: torch.device, batch_size: int) -> None:
        self.model, self.slices, self.device, self.batch_size = model.to(device).eval(), slices, device, int(batch_size)
        self._probs: dict[int, float] = {}

    def read(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (B,) probabilities of the slices ``ids`` (``name`` is ``probs``, as in the store)."""
        ids = np.asarray(ids, dtype=np.int64)
        todo = np.asarray([i for i in ids if int(i) not in self._probs], dtype=np.int64)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            images = torch.from_numpy(self.slices.images(batch)).to(self.device)
            self._probs.update(zip(batch.tolist(), positive_probability(self.model, images).float().cpu().tolist()))
        return np.asarray([self._probs[int(i)] for i in ids], dtype=np.float32)


class CaseSlices:
    """The kept slices of one case held in memory (:func:`cldf.data.slices.slice_case`): what segmentation
    reads of a :class:`cldf.store.SliceStore` (``images``, ``body``, ``labels``, ``slice_index``, sizes, and
    ``case_index``, all 0: one case)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], image_size: int) -> None:
        self._images, self._body = arrays["images"], arrays["body"]
        self.labels = np.asarray(arrays["labels"], dtype=np.int8)
        self.slice_index = np.asarray(arrays["slice_index"], dtype=np.int64)
        self.image_size, self.channels, self.n = int(image_size), int(self._images.shape[1]), len(self.labels)
        self.case_index = np.zeros(self.n, dtype=np.int64)

    def images(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.asarray(self._images[np.asarray(idx, dtype=np.int64)], dtype=np.float32)

    def body(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.asarray(self._body[np.asarray(idx, dtype=np.int64)]).astype(bool)


@dataclass
class CaseSegmenter:
    """Everything CLDF's masks of whole cases read: the frozen CDM and CAM classifier, the decoder with its
    prototypes and checkpoint path, the clustering (``k``, ``assign``, ``inside_body``), the unlabelled
    protocol's ``conditioning`` and ``gate``, and ``settings`` (``features``, ``with_image``, ``image_context``,
    ``batch_size``)."""

    cdm: torch.nn.Module
    classifier: torch.nn.Module
    decoder: PixelDecoder
    checkpoint: Mapping[str, Any]
    decoder_path: str
    cluster: Mapping[str, Any]
    conditioning: str
    gate: float
    settings: Mapping[str, Any]
    device: torch.device
    seed: int

    def features(self, slices: Any, conditioning: str, probs: ClassifierProbs):
        source = ComputedFeatures(self.cdm, slices, self.settings["features"], conditioning, self.seed, self.device, probs)
        features = decoder_inputs(source, slices, self.settings)
        check_feature_dim(self.checkpoint, self.decoder_path, features.dim)
        return features


def segment_case(m: CaseSegmenter, slices: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks uint8 (M, H, W) of the slices ``rows`` of one case, and bool (M,): which were segmented
    (labelled positive, or unlabelled with a probability at or above the gate); the others are empty. The
    labelled slices' features are conditioned on their label, the gated ones' on ``m.conditioning``; under
    ``scope: case`` one K-means clusters them all. With ``slice_vote`` (a radius above 0) in the clustering
    settings, the segmented slices vote on each other's masks; with ``fill_holes`` their holes are filled
    (:func:`cldf.segment.cluster.finish_masks`)."""
    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(slices.labels)[rows]
    probs = ClassifierProbs(m.classifier, slices, m.device, int(m.settings["batch_size"]))
    unlabelled = rows[labels == -1]
    passed = unlabelled[probs.read("probs", unlabelled) >= m.gate] if len(unlabelled) else unlabelled
    out = np.zeros((len(rows), slices.image_size, slices.image_size), dtype=np.uint8)
    position = {int(r): k for k, r in enumerate(rows)}
    groups = [(ids, m.features(slices, conditioning, probs))
              for ids, conditioning in ((rows[labels == 1], "label"), (passed, m.conditioning)) if len(ids)]
    targets = np.concatenate([rows[labels == 1], passed])
    if groups:
        decoders = {"CLDF": (m.decoder, prototypes_of(m.checkpoint))}
        with torch.no_grad():
            for batch_ids, masks in segment_batches(GroupedFeatures(groups), decoders, slices, targets, m.cluster, m.seed):
                out[[position[int(i)] for i in batch_ids]] = masks["CLDF"]
    segmented = np.isin(rows, targets)
    one_case = np.zeros(int(segmented.sum()), dtype=np.int64)
    out[segmented] = finish_masks(out[segmented], one_case, np.asarray(slices.slice_index)[rows[segmented]], m.cluster)
    return out, segmented


def write_mask(masks: np.ndarray, slice_index: np.ndarray, meta: Mapping[str, Any], path: str | os.PathLike) -> int:
    """Write one case's slice masks as ``path`` (.nii.gz, the scan's own grid and affine), atomically;
    returns its foreground voxel count."""
    image = to_original(masks, slice_index, meta)
    with atomic_file(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
    return int(np.count_nonzero(np.asarray(image.dataobj)))


def pseudo_masks(slices_path: str | os.PathLike, m: CaseSegmenter, cases: Sequence[int],
                 folder: str | os.PathLike) -> pd.DataFrame:
    """Write ``<folder>/<case>.nii.gz`` for the cases ``cases`` (indices) of a slice store; their manifest
    rows (:data:`PSEUDO_COLUMNS`). Skipped cases (``on_bad_case: skip``) have no slices and no mask."""
    slices = SliceStore(slices_path)
    rows = []
    for ci in cases:
        meta = slices.cases[int(ci)]
        if "skipped" in meta:
            LOG.warning("case %s was skipped at slicing (%s): no pseudo-mask", meta["id"], meta["skipped"])
            continue
        ids = slices.indices(cases=[int(ci)])
        masks, segmented = segment_case(m, slices, ids)
        path = Path(folder) / f"{meta['id']}.nii.gz"
        voxels = write_mask(masks, slices.slice_index[ids], meta, path)
        rows.append({"case": meta["id"], "path": str(path), "n_slices": int(meta["canonical_shape"][2]),
                     "n_positive_slices": int(segmented.sum()), "foreground_voxels": voxels})
        LOG.info("%s: %d of %d slices segmented, %d foreground voxels", meta["id"], segmented.sum(), len(ids), voxels)
    return pd.DataFrame(rows, columns=list(PSEUDO_COLUMNS))


def predict_scans(ds: Mapping[str, Any], case_ids: Sequence[str], m: CaseSegmenter,
                  folder: str | os.PathLike) -> pd.DataFrame:
    """Read, slice and segment new scans (every slice unlabelled) and write ``<folder>/<case>.nii.gz``; their
    manifest rows (:data:`PREDICT_COLUMNS`). A bad scan stops the job, or is left out under ``on_bad_case: skip``."""
    rows = []
    for case_id in case_ids:
        try:
            arrays, meta = slice_case(ds, case_id)
        except DataError as err:
            if ds["on_bad_case"] == "error":
                raise
            LOG.warning("skipping new scan %s: %s", case_id, err)
            continue
        unlabelled = np.full(len(arrays["labels"]), -1, dtype=np.int8)  # nothing about a new scan is known
        slices = CaseSlices({**arrays, "labels": unlabelled}, int(ds["image_size"]))
        masks, segmented = segment_case(m, slices, np.arange(slices.n))
        path = Path(folder) / f"{case_id}.nii.gz"
        voxels = write_mask(masks, slices.slice_index, meta, path)
        rows.append({"case": case_id, "path": str(path), "foreground_voxels": voxels})
        LOG.info("%s: %d of %d slices predicted positive, %d foreground voxels", case_id, segmented.sum(), slices.n, voxels)
    return pd.DataFrame(rows, columns=list(PREDICT_COLUMNS))


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)


def collect_manifest(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """The shards' manifest rows as one manifest, sorted by case; every listed file must exist."""
    frame = pd.concat([pd.read_csv(p, dtype={"case": str}) for p in parts], ignore_index=True)
    missing = [p for p in frame["path"] if not Path(p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) of the manifest are missing, e.g. {missing[0]}; re-run the shard jobs")
    frame = frame.sort_values("case", kind="stable").reset_index(drop=True)
    write_table(frame, out)
    return frame
