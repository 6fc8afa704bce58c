"""Segmentation (step 9): K-means on the decoder's pixel embeddings, foreground cluster by prototype, then
the mask's small components dropped and the neighbouring slices' vote, each as chosen on validation
(:mod:`cldf.segment.components`, :mod:`cldf.segment.context`).

Clustering runs inside the body by default: with k = 2 over the whole slice, K-means splits body versus
air (measured by the issue author), which says nothing about the target. The foreground cluster is the
one whose normalised centroid has the highest cosine similarity with the foreground prototype learned
during decoder training (mean embedding of the selected training foreground pixels), so no ground truth
is involved.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm import tqdm

from cldf.models.decoder import PixelDecoder, embed_slices
from cldf.segment.components import keep_components
from cldf.segment.context import vote_slices
from cldf.segment.features import ComputedFeatures, StoredFeatures
from cldf.segment.train import check_feature_dim, load_decoder
from cldf.store import ArrayStoreWriter, SliceStore

N_INIT = 3


ASSIGNMENTS = ("prototype", "nearest")


def _cosine(points: np.ndarray, vector: np.ndarray) -> np.ndarray:
    return points @ vector / np.maximum(np.linalg.norm(points, axis=1) * np.linalg.norm(vector), 1e-12)


def cluster_slice(
    emb: torch.Tensor | np.ndarray,
    body: torch.Tensor | np.ndarray,
    k: int,
    prototypes: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    seed: int,
    assign: str = "prototype",
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
    prototypes
        float (E,) foreground and background prototypes.
    seed
        ``random_state`` of K-means (``n_init`` = :data:`N_INIT`).
    assign
        ``prototype``: the one cluster closest (cosine) to the foreground prototype is the target;
        ``nearest``: every cluster closer to the foreground than to the background prototype is.

    Returns
    -------
    bool (H, W) inside ``body``; everything outside ``body`` is background. Fewer than ``k`` pixels in
    ``body`` → empty mask.
    """
    if k < 2 or assign not in ASSIGNMENTS:
        raise ValueError(f"need k >= 2 and assign in {ASSIGNMENTS}, got k={k}, assign={assign!r}")
    emb = torch.as_tensor(emb).detach().float().cpu().numpy()
    body = torch.as_tensor(body).detach().cpu().numpy().astype(bool)
    fg, bg = (torch.as_tensor(p).detach().float().cpu().numpy().astype(np.float64) for p in prototypes)
    if emb.ndim != 3 or body.shape != emb.shape[1:] or fg.shape != (emb.shape[0],) or bg.shape != fg.shape:
        raise ValueError(f"shapes emb {emb.shape}, body {body.shape}, prototypes {fg.shape}/{bg.shape} do not match")
    mask = np.zeros(body.shape, dtype=bool)
    points = emb[:, body].T.astype(np.float64)  # (n, E)
    if len(points) < k:
        return mask
    kmeans = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(points)
    to_fg = _cosine(kmeans.cluster_centers_, fg)
    chosen = [int(np.argmax(to_fg))] if assign == "prototype" else np.flatnonzero(to_fg > _cosine(kmeans.cluster_centers_, bg))
    mask[body] = np.isin(kmeans.labels_, chosen)
    return mask


def prototypes_of(checkpoint: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground and background prototypes (E,) of a decoder checkpoint."""
    return checkpoint["prototypes"]["foreground"], checkpoint["prototypes"]["background"]


def segment_batches(
    features: StoredFeatures | ComputedFeatures,
    decoders: Mapping[str, tuple[PixelDecoder, torch.Tensor]],
    slices: SliceStore,
    ids: np.ndarray,
    settings: Mapping[str, Any],
    seed: int,
    batch_size: int = 4,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """K-means masks of the slices ``ids`` with every decoder: ``(ids (B,), {name: uint8 (B, H, W)})`` per batch.

    ``decoders`` maps a name to ``(decoder, (foreground, background) prototypes (E,))``; ``settings``: ``k``,
    ``assign`` (:func:`cluster_slice`), ``inside_body`` (cluster the body pixels only) and ``min_component``
    (:func:`keep_components`; 0 or absent keeps every component). The features of a batch are shared by
    every decoder.
    """
    size = slices.image_size
    k, assign = int(settings["k"]), settings.get("assign", "prototype")
    min_component = float(settings.get("min_component", 0.0))
    with torch.no_grad():
        for batch_ids, feats in features.batches(ids, batch_size):
            region = slices.body(batch_ids) if settings["inside_body"] else np.ones((len(batch_ids), size, size), bool)
            out = {}
            for name, (decoder, prototypes) in decoders.items():
                emb = embed_slices(decoder, feats).cpu()
                out[name] = np.stack([keep_components(cluster_slice(emb[b], region[b], k, prototypes, seed, assign),
                                                      min_component)
                                      for b in range(len(batch_ids))]).astype(np.uint8)
            yield batch_ids, out


def segment_slices(
    features: StoredFeatures | ComputedFeatures,
    decoders: Mapping[str, tuple[PixelDecoder, torch.Tensor]],
    slices: SliceStore,
    ids: np.ndarray,
    settings: Mapping[str, Any],
    seed: int,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """:func:`segment_batches`, then, when ``settings["slice_vote"]`` (a radius) is above 0, the vote of
    neighbouring slices (:func:`cldf.segment.context.vote_slices` among the slices of ``ids``): yields
    ``(ids (B,), {name: uint8 (B, H, W)})`` per batch, or per case when voting."""
    radius = int(settings.get("slice_vote", 0))
    if radius == 0:
        yield from segment_batches(features, decoders, slices, ids, settings, seed)
        return
    ids = np.asarray(ids, dtype=np.int64)
    cases = slices.case_index[ids]
    for case in dict.fromkeys(cases.tolist()):
        parts = list(segment_batches(features, decoders, slices, ids[cases == case], settings, seed))
        got = np.concatenate([batch_ids for batch_ids, _ in parts])
        yield got, {name: vote_slices(np.concatenate([masks[name] for _, masks in parts]),
                                      slices.case_index[got], slices.slice_index[got], radius)
                    for name in decoders}


def run_segmentation(
    slices_path: str | os.PathLike,
    features: StoredFeatures | ComputedFeatures,
    decoder_paths: Mapping[str, str | os.PathLike],
    settings: Mapping[str, Any],
    ids: np.ndarray,
    segment: np.ndarray,
    out: str | os.PathLike,
    device: torch.device,
    seed: int,
) -> int:
    """Write the masks of the slices ``ids`` (one uint8 (N, H, W) array per decoder) to ``out``.

    Only the slices of ``ids`` where ``segment`` (bool (N,)) is set are clustered; the others get empty masks
    (under the labelled protocol, the slices labelled negative); with ``settings["slice_vote"]`` above 0 the
    clustered slices of a case vote on each other's masks (:func:`segment_slices`). Returns the number of slices
    clustered.
    """
    slices = SliceStore(slices_path)
    decoders = {}
    for name, path in decoder_paths.items():
        decoder, checkpoint = load_decoder(path, device)
        check_feature_dim(checkpoint, path, features.dim)
        decoders[name] = (decoder, prototypes_of(checkpoint))
    size = slices.image_size
    arrays = {"slice_ids": ((), np.int64), **{name: ((size, size), np.uint8) for name in decoders}}
    attrs = {"cluster": dict(settings), "seed": int(seed), "decoders": {n: str(p) for n, p in decoder_paths.items()}}
    ids = np.asarray(ids, dtype=np.int64)
    row = {int(sid): r for r, sid in enumerate(ids)}
    chosen = ids[np.asarray(segment, dtype=bool)]
    with ArrayStoreWriter(out, len(ids), arrays, attrs) as writer, tqdm(total=len(chosen), desc="segment", unit="slice") as bar:
        writer.write("slice_ids", 0, ids)
        for batch_ids, masks in segment_slices(features, decoders, slices, chosen, settings, seed):
            for name, values in masks.items():
                for b, sid in enumerate(batch_ids):
                    writer.write(name, row[int(sid)], values[b : b + 1])
            bar.update(len(batch_ids))
    return int(len(chosen))
