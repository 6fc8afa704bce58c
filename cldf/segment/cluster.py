"""Segmentation (step 9): K-means on the decoder's pixel embeddings, foreground cluster by prototype, then
the mask's small components dropped and the neighbouring slices' vote, each as chosen on validation
(:mod:`cldf.segment.components`, :mod:`cldf.segment.context`), and the mask's holes filled
(``cldf.cluster.fill_holes``).

Clustering runs inside the body by default: with k = 2 over the whole slice, K-means splits body versus
air (measured by the issue author), which says nothing about the target. The foreground cluster is the
one whose normalised centroid has the highest cosine similarity with the foreground prototype learned
during decoder training (mean embedding of the selected training foreground pixels), so no ground truth
is involved.

K-means runs per slice by default (the paper's); ``cldf.cluster.scope: case`` runs one K-means over the
pixels of all slices of a case that are segmented, so a slice through a tumour's edge and one through its
middle are split by the same clusters instead of each slice being cut into ``k`` parts of its own
(``ablation.csv``).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm import tqdm

from cldf.models.decoder import PixelDecoder, embed_slices
from cldf.segment.components import fill_holes, keep_components
from cldf.segment.context import vote_slices
from cldf.segment.features import ComputedFeatures, StoredFeatures
from cldf.segment.train import check_feature_dim, load_decoder
from cldf.store import ArrayStoreWriter, SliceStore

N_INIT = 3


ASSIGNMENTS = ("prototype", "nearest")
SCOPES = ("slice", "case")
MAX_FIT_POINTS = 200_000


def _cosine(points: np.ndarray, vector: np.ndarray) -> np.ndarray:
    return points @ vector / np.maximum(np.linalg.norm(points, axis=1) * np.linalg.norm(vector), 1e-12)


def cluster_slices(
    emb: torch.Tensor | np.ndarray,
    body: torch.Tensor | np.ndarray,
    k: int,
    prototypes: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    seed: int,
    assign: str = "prototype",
) -> np.ndarray:
    """Binary masks of slices from their pixel embeddings, by one K-means over the pixels of all of them.

    Parameters
    ----------
    emb
        float (S, E, H, W) pixel embeddings of S slices (S = 1: one slice clustered on its own).
    body
        bool (S, H, W) region to cluster (the body masks, or all True to cluster the whole slices).
    k
        Number of K-means clusters (>= 2).
    prototypes
        float (E,) foreground and background prototypes.
    seed
        ``random_state`` of K-means (``n_init`` = :data:`N_INIT`); it also draws the at most
        :data:`MAX_FIT_POINTS` pixels K-means is fitted on when the region holds more (all are then assigned
        to the nearest centroid).
    assign
        ``prototype``: the one cluster closest (cosine) to the foreground prototype is the target;
        ``nearest``: every cluster closer to the foreground than to the background prototype is.

    Returns
    -------
    bool (S, H, W) inside ``body``; everything outside ``body`` is background. Fewer than ``k`` pixels in
    ``body`` → empty masks.
    """
    if k < 2 or assign not in ASSIGNMENTS:
        raise ValueError(f"need k >= 2 and assign in {ASSIGNMENTS}, got k={k}, assign={assign!r}")
    emb = torch.as_tensor(emb).detach().float().cpu().numpy()
    body = torch.as_tensor(body).detach().cpu().numpy().astype(bool)
    fg, bg = (torch.as_tensor(p).detach().float().cpu().numpy().astype(np.float64) for p in prototypes)
    if emb.ndim != 4 or body.shape != (emb.shape[0], *emb.shape[2:]) or fg.shape != (emb.shape[1],) or bg.shape != fg.shape:
        raise ValueError(f"shapes emb {emb.shape}, body {body.shape}, prototypes {fg.shape}/{bg.shape} do not match")
    mask = np.zeros(body.shape, dtype=bool)
    points = emb.transpose(0, 2, 3, 1)[body].astype(np.float64)  # (n, E)
    if len(points) < k:
        return mask
    fit = points
    if len(points) > MAX_FIT_POINTS:
        fit = points[np.sort(np.random.default_rng(seed).choice(len(points), MAX_FIT_POINTS, replace=False))]
    kmeans = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(fit)
    labels = kmeans.labels_ if fit is points else kmeans.predict(points)
    to_fg = _cosine(kmeans.cluster_centers_, fg)
    chosen = [int(np.argmax(to_fg))] if assign == "prototype" else np.flatnonzero(to_fg > _cosine(kmeans.cluster_centers_, bg))
    mask[body] = np.isin(labels, chosen)
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
    """K-means masks of the slices ``ids`` with every decoder: ``(ids (B,), {name: uint8 (B, H, W)})`` per batch,
    or per case under ``scope: case``.

    ``decoders`` maps a name to ``(decoder, (foreground, background) prototypes (E,))``; ``settings``: ``k``,
    ``assign`` (:func:`cluster_slices`), ``inside_body`` (cluster the body pixels only), ``scope`` (``slice``,
    the default: one K-means per slice; ``case``: one K-means over the pixels of a case's slices of ``ids``,
    so every slice of a case is split by the same clusters) and ``min_component`` (:func:`keep_components`,
    per slice; 0 or absent keeps every component). The features of a batch are shared by every decoder.
    """
    size = slices.image_size
    k, assign = int(settings["k"]), settings.get("assign", "prototype")
    min_component = float(settings.get("min_component", 0.0))
    scope = settings.get("scope", "slice")
    if scope not in SCOPES:
        raise ValueError(f"cluster scope must be one of {SCOPES}, got {scope!r}")
    ids = np.asarray(ids, dtype=np.int64)

    def clustered(emb: torch.Tensor, region: np.ndarray, prototypes: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        """bool (B, H, W) from embeddings (B, E, H, W): one K-means per slice, or one over all B under ``case``."""
        pieces = [slice(None)] if scope == "case" else [slice(b, b + 1) for b in range(len(emb))]
        return np.concatenate([cluster_slices(emb[p], region[p], k, prototypes, seed, assign) for p in pieces])

    def embedded(batch_ids: np.ndarray, feats: Any) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
        region = slices.body(batch_ids) if settings["inside_body"] else np.ones((len(batch_ids), size, size), bool)
        return batch_ids, region, {name: embed_slices(decoder, feats).cpu() for name, (decoder, _) in decoders.items()}

    def units() -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]]:
        """What one :func:`clustered` call sees: a batch of slices, or under ``case`` all slices of one case."""
        if scope == "slice":
            yield from (embedded(batch_ids, feats) for batch_ids, feats in features.batches(ids, batch_size))
            return
        cases = slices.case_index[ids]
        for case in dict.fromkeys(cases.tolist()):
            parts = [embedded(batch_ids, feats) for batch_ids, feats in features.batches(ids[cases == case], batch_size)]
            yield (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                   {name: torch.cat([p[2][name] for p in parts]) for name in decoders})

    with torch.no_grad():
        for batch_ids, region, embs in units():
            yield batch_ids, {name: keep_components(clustered(embs[name], region, prototypes), min_component).astype(np.uint8)
                              for name, (_, prototypes) in decoders.items()}


def segment_slices(
    features: StoredFeatures | ComputedFeatures,
    decoders: Mapping[str, tuple[PixelDecoder, torch.Tensor]],
    slices: SliceStore,
    ids: np.ndarray,
    settings: Mapping[str, Any],
    seed: int,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """:func:`segment_batches`, then :func:`finish_masks`: when ``settings["slice_vote"]`` (a radius) is above
    0 the vote of neighbouring slices among the slices of ``ids``, and with ``settings["fill_holes"]`` each
    mask's holes filled. Yields ``(ids (B,), {name: uint8 (B, H, W)})`` per batch, or per case when voting."""
    ids = np.asarray(ids, dtype=np.int64)
    if int(settings.get("slice_vote", 0)) == 0:
        parts: Iterator[list[tuple[np.ndarray, dict[str, np.ndarray]]]] = (
            [batch] for batch in segment_batches(features, decoders, slices, ids, settings, seed))
    else:
        cases = slices.case_index[ids]
        parts = (list(segment_batches(features, decoders, slices, ids[cases == case], settings, seed))
                 for case in dict.fromkeys(cases.tolist()))
    for part in parts:
        got = np.concatenate([batch_ids for batch_ids, _ in part])
        yield got, {name: finish_masks(np.concatenate([masks[name] for _, masks in part]), slices.case_index[got],
                                       slices.slice_index[got], settings).astype(np.uint8)
                    for name in decoders}


def segment_ids(features, decoder, checkpoint, slices: SliceStore, ids: np.ndarray, cluster: Mapping[str, Any],
             seed: int) -> np.ndarray:
    """bool (N, H, W) masks of the slices ``ids`` clustered with one decoder (its checkpoint's prototypes); with
    ``cluster["slice_vote"]`` above 0 the slices of ``ids`` vote on their neighbours' masks."""
    decoders = {"d": (decoder, prototypes_of(checkpoint))}
    out = np.zeros((len(ids), slices.image_size, slices.image_size), dtype=bool)
    row = {int(s): r for r, s in enumerate(ids)}
    for batch_ids, masks in segment_slices(features, decoders, slices, ids, cluster, seed):
        out[[row[int(s)] for s in batch_ids]] = masks["d"].astype(bool)
    return out


def finish_masks(masks: np.ndarray, case_index: np.ndarray, slice_index: np.ndarray,
                 settings: Mapping[str, Any]) -> np.ndarray:
    """What follows K-means and the components' filter: the neighbouring slices' vote within the radius
    ``settings["slice_vote"]`` (:func:`cldf.segment.context.vote_slices`; 0 or absent, none), then, when
    ``settings["fill_holes"]`` is set, every mask's holes filled (:func:`cldf.segment.components.fill_holes`).

    ``masks``: (N, H, W) binary masks; ``case_index``, ``slice_index``: int (N,). Returns bool (N, H, W).
    """
    radius = int(settings.get("slice_vote", 0))
    voted = vote_slices(masks, case_index, slice_index, radius).astype(bool) if radius else np.asarray(masks, dtype=bool)
    return fill_holes(voted) if settings.get("fill_holes", False) else voted


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
