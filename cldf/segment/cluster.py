"""Segmentation (step 9): K-means on the decoder's pixel embeddings, foreground cluster by prototype.

Clustering runs inside the body by default: with k = 2 over the whole slice, K-means splits body versus
air (measured by the issue author), which says nothing about the target. The foreground cluster is the
one whose normalised centroid has the highest cosine similarity with the foreground prototype learned
during decoder training (mean embedding of the selected training foreground pixels), so no ground truth
is involved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm import tqdm

from cldf.segment.baselines import POSITIVE_PROBABILITY
from cldf.models.decoder import embed_slices
from cldf.segment.features import feature_dim, iter_feature_batches
from cldf.segment.train import check_feature_dim, load_decoder
from cldf.store import ArrayStoreWriter, MapStore, SliceStore

N_INIT = 3


def cluster_slice(
    emb: torch.Tensor | np.ndarray,
    body: torch.Tensor | np.ndarray,
    k: int,
    fg_prototype: torch.Tensor | np.ndarray,
    seed: int,
) -> np.ndarray:
    """Binary mask of one slice from its pixel embeddings.

    Parameters
    ----------
    emb
        float (E, H, W) pixel embeddings.
    body
        bool (H, W) region to cluster (the body mask, or all True to cluster the whole slice).
    k
        Number of K-means clusters (>= 2).
    fg_prototype
        float (E,) foreground prototype.
    seed
        ``random_state`` of K-means (``n_init`` = :data:`N_INIT`).

    Returns
    -------
    bool (H, W): the pixels of ``body`` in the cluster closest (cosine) to ``fg_prototype``; everything
    outside ``body`` is background. Fewer than ``k`` pixels in ``body`` → empty mask.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    emb = torch.as_tensor(emb).detach().float().cpu().numpy()
    body = torch.as_tensor(body).detach().cpu().numpy().astype(bool)
    prototype = torch.as_tensor(fg_prototype).detach().float().cpu().numpy().astype(np.float64)
    if emb.ndim != 3 or body.shape != emb.shape[1:] or prototype.shape != (emb.shape[0],):
        raise ValueError(f"shapes emb {emb.shape}, body {body.shape}, prototype {prototype.shape} do not match")
    mask = np.zeros(body.shape, dtype=bool)
    points = emb[:, body].T.astype(np.float64)  # (n, E)
    if len(points) < k:
        return mask
    kmeans = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(points)
    centroids = kmeans.cluster_centers_
    norms = np.linalg.norm(centroids, axis=1)
    cosine = centroids @ prototype / np.maximum(norms * np.linalg.norm(prototype), 1e-12)
    mask[body] = kmeans.labels_ == int(np.argmax(cosine))
    return mask


def run_segmentation(
    slices_path: str | os.PathLike,
    features_path: str | os.PathLike,
    decoder_path: str | os.PathLike,
    probs_path: str | os.PathLike | None,
    settings: Mapping[str, Any],
    cases: Sequence[int] | None,
    splits: Sequence[str] | None,
    out: str | os.PathLike,
    device: torch.device,
    seed: int,
    batch_size: int = 4,
) -> int:
    """Segment the slices of ``cases`` (all cases when None) in ``splits`` (all splits when None).

    Parameters
    ----------
    settings
        ``{k, inside_body, empty_if_classifier_negative}`` (``cldf.cluster`` config section).
    probs_path
        Classifier-probability store (``probs`` (N,)) that gates the masks when
        ``empty_if_classifier_negative`` (probability < :data:`POSITIVE_PROBABILITY` → empty mask); may be None otherwise.
    out
        Mask store: ``slice_ids`` int64 (N,), ``masks`` uint8 (N, H, W) (1 = target), written atomically.
    batch_size
        Slices embedded at once (bounds memory).

    Returns the number of slices segmented.
    """
    slices = SliceStore(slices_path)
    ids = slices.indices(split=None if splits is None else list(splits), cases=cases)
    decoder, checkpoint = load_decoder(decoder_path, device)
    check_feature_dim(checkpoint, decoder_path, feature_dim(features_path))
    prototype = checkpoint["prototypes"]["foreground"]
    k = int(settings["k"])
    gate = bool(settings["empty_if_classifier_negative"])
    if gate and probs_path is None:
        raise ValueError("empty_if_classifier_negative needs the classifier-probability store (--probs)")
    probs = MapStore(probs_path).read("probs", ids).astype(np.float32) if gate else None
    size = slices.image_size
    attrs = {
        "cluster": dict(settings),
        "seed": int(seed),
        "decoder": str(Path(decoder_path).name),
    }
    arrays = {"slice_ids": ((), np.int64), "masks": ((size, size), np.uint8)}
    with ArrayStoreWriter(out, len(ids), arrays, attrs) as writer:
        writer.write("slice_ids", 0, ids)
        start = 0
        batches = iter_feature_batches(features_path, ids, batch_size, size, device)
        with torch.no_grad(), tqdm(total=len(ids), desc="segment", unit="slice") as bar:
            for batch_ids, feats in batches:
                emb = embed_slices(decoder, feats).cpu()
                if settings["inside_body"]:
                    region = slices.body(batch_ids)
                else:
                    region = np.ones((len(batch_ids), size, size), dtype=bool)
                masks = np.zeros((len(batch_ids), size, size), dtype=np.uint8)
                for b in range(len(batch_ids)):
                    if probs is not None and probs[start + b] < POSITIVE_PROBABILITY:
                        continue
                    masks[b] = cluster_slice(emb[b], region[b], k, prototype, seed)
                writer.write("masks", start, masks)
                start += len(batch_ids)
                bar.update(len(batch_ids))
    return int(len(ids))
