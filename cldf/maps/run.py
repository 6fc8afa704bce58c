"""Pipeline steps that compute maps for one shard of cases and write them as a row-aligned store.

Each step reads images and image-level labels through :class:`cldf.store.SliceStore` (never the ground
truth), processes ``settings["batch_size"]`` slices at a time and writes every batch straight into an
:class:`cldf.store.ArrayStoreWriter`, so memory is bounded by the batch size. Rows are the shard's slices
in increasing global slice id; a shard without slices yields a valid store with N = 0.

Conditioning label of a slice for the CDM: 1 if the slice is positive *or ambiguous* (label -1 means
the target is present, only below the positivity fraction), else 0.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cldf.maps.cams import compute_cam, positive_probability
from cldf.maps.common import feature_noise
from cldf.maps.features import extract_features
from cldf.maps.gradients import mean_gradient
from cldf.maps.saliency import cdm_saliency
from cldf.store import ArrayStoreWriter, SliceStore

PathLike = str | os.PathLike


def _batches(ids: np.ndarray, batch_size: int, desc: str) -> Iterator[tuple[int, np.ndarray]]:
    """(start row in the output, global slice ids (b,)) of consecutive batches of ``ids``."""
    starts = range(0, len(ids), int(batch_size))
    for start in tqdm(starts, desc=desc, unit="batch", total=len(starts), mininterval=5.0):
        yield start, ids[start : start + int(batch_size)]


def _images(store: SliceStore, ids: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(store.images(ids)).to(device)


def conditioning_labels(slice_labels: np.ndarray) -> torch.Tensor:
    """CDM class of each slice from its image-level label (1 / -1 -> 1, 0 -> 0): long (B,)."""
    return torch.from_numpy((np.asarray(slice_labels) != 0).astype(np.int64))


def _map_attrs(store: SliceStore, **extra: Any) -> dict[str, Any]:
    return {"image_size": store.image_size, **extra}


def run_features(
    slices_path: PathLike,
    cdm: nn.Module,
    scheduler,
    settings: Mapping[str, Any],
    cases: Sequence[int],
    out: PathLike,
    device: torch.device,
    seed: int,
) -> None:
    """Diffusion features of the shard's slices.

    ``settings``: ``timesteps`` (list[int]), ``layers`` (list[str]), ``batch_size``. Writes ``slice_ids`` int64
    (N,) and ``layer_{k}`` float16 (N, C_k, h_k, w_k) per tapped layer; attrs ``layers``, ``timesteps``,
    ``channels`` (C_k), ``D`` (sum C_k), ``shapes`` ([C_k, h_k, w_k]), ``image_size``.
    """
    store = SliceStore(slices_path)
    cdm = cdm.to(device).eval()
    timesteps, layers = [int(t) for t in settings["timesteps"]], list(settings["layers"])
    shape = (store.channels, store.image_size, store.image_size)
    probe = extract_features(
        cdm, scheduler, torch.zeros(1, *shape, device=device), torch.zeros(1, dtype=torch.long, device=device),
        timesteps[:1], layers, torch.zeros(1, 1, *shape),
    )
    shapes = [list(f.shape[1:]) for f in probe]
    channels = [s[0] for s in shapes]
    ids = store.indices(cases=list(cases))
    arrays = {"slice_ids": ((), np.int64), **{f"layer_{k}": (s, np.float16) for k, s in enumerate(shapes)}}
    attrs = _map_attrs(store, layers=layers, timesteps=timesteps, channels=channels, D=sum(channels),
                       shapes=shapes, seed=int(seed))
    with ArrayStoreWriter(out, len(ids), arrays, attrs) as writer:
        for start, batch in _batches(ids, settings["batch_size"], "features"):
            images = _images(store, batch, device)
            labels = conditioning_labels(store.labels[batch]).to(device)
            noise = feature_noise(batch, len(timesteps), shape, seed)
            feats = extract_features(cdm, scheduler, images, labels, timesteps, layers, noise)
            writer.write("slice_ids", start, batch)
            for k, f in enumerate(feats):
                writer.write(f"layer_{k}", start, f.cpu().numpy())


def run_gradient(
    slices_path: PathLike,
    classifier: nn.Module,
    scheduler,
    settings: Mapping[str, Any],
    cases: Sequence[int],
    out: PathLike,
    device: torch.device,
    seed: int,
) -> None:
    """Mean-gradient maps of the shard's slices.

    ``settings``: ``timesteps``, ``reduce``, ``batch_size``. Writes ``slice_ids`` int64 (N,) and ``maps``
    float16 (N, H, W) in [0, 1].
    """
    store = SliceStore(slices_path)
    classifier = classifier.to(device).eval()
    timesteps = [int(t) for t in settings["timesteps"]]
    size, shape = store.image_size, (store.channels, store.image_size, store.image_size)
    ids = store.indices(cases=list(cases))
    attrs = _map_attrs(store, timesteps=timesteps, reduce=settings["reduce"], seed=int(seed))
    with ArrayStoreWriter(out, len(ids), {"slice_ids": ((), np.int64), "maps": ((size, size), np.float16)}, attrs) as w:
        for start, batch in _batches(ids, settings["batch_size"], "mean gradient"):
            noise = feature_noise(batch, len(timesteps), shape, seed)
            maps = mean_gradient(classifier, scheduler, _images(store, batch, device), timesteps, settings["reduce"], noise)
            w.write("slice_ids", start, batch)
            w.write("maps", start, maps.cpu().numpy())


def run_cam(
    slices_path: PathLike,
    model: nn.Module,
    method: str,
    settings: Mapping[str, Any],
    cases: Sequence[int],
    out: PathLike,
    device: torch.device,
) -> None:
    """CAMs (positive class) of the shard's slices with ``method``.

    ``settings``: ``layers`` (target layer of gradcam/gradcampp/scorecam), ``layercam_layers``,
    ``scorecam_channels``, ``batch_size``.
    Writes ``slice_ids`` int64 (N,) and ``maps`` float16 (N, H, W) in [0, 1].
    """
    store = SliceStore(slices_path)
    model = model.to(device).eval()
    layers = list(settings["layercam_layers"] if method == "layercam" else settings["layers"])
    size = store.image_size
    ids = store.indices(cases=list(cases))
    arrays = {"slice_ids": ((), np.int64), "maps": ((size, size), np.float16)}
    with ArrayStoreWriter(out, len(ids), arrays, _map_attrs(store, method=method, layers=layers)) as w:
        for start, batch in _batches(ids, settings["batch_size"], method):
            maps = compute_cam(method, model, _images(store, batch, device), layers, settings.get("scorecam_channels"))
            w.write("slice_ids", start, batch)
            w.write("maps", start, maps.cpu().numpy())


def run_classifier_probs(
    slices_path: PathLike,
    model: nn.Module,
    batch_size: int,
    cases: Sequence[int],
    out: PathLike,
    device: torch.device,
) -> None:
    """The CAM classifier's positive-class probability of every slice of the shard.

    It gates the masks of CLDF and of the thresholded baselines; kept apart from the CAM stores so that
    switching the CAM method leaves it (and everything gated by it) untouched.
    Writes ``slice_ids`` int64 (N,) and ``probs`` float32 (N,).
    """
    store = SliceStore(slices_path)
    model = model.to(device).eval()
    ids = store.indices(cases=list(cases))
    with ArrayStoreWriter(out, len(ids), {"slice_ids": ((), np.int64), "probs": ((), np.float32)}, _map_attrs(store)) as w:
        for start, batch in _batches(ids, batch_size, "classifier probabilities"):
            w.write("slice_ids", start, batch)
            w.write("probs", start, positive_probability(model, _images(store, batch, device)).cpu().numpy())


def run_saliency(
    slices_path: PathLike,
    cdm: nn.Module,
    scheduler,
    settings: Mapping[str, Any],
    cases: Sequence[int],
    out: PathLike,
    device: torch.device,
    splits: Sequence[str] | None = None,
) -> None:
    """CDM saliency maps (Hu et al. 2023) of the shard's slices, for the positive class vs the null class.

    ``settings``: ``noise_level``, ``ddim_steps``, ``batch_size``. Only slices of ``splits`` (all when None)
    are processed: the baseline is evaluated on the test split only. Writes ``slice_ids`` int64 (N,) and
    ``maps`` float16 (N, H, W) in [0, 1]. Deterministic: DDIM encoding draws no noise, so there is no seed.
    """
    store = SliceStore(slices_path)
    cdm = cdm.to(device).eval()
    size = store.image_size
    ids = store.indices(split=splits, cases=list(cases))
    attrs = _map_attrs(store, noise_level=int(settings["noise_level"]), ddim_steps=int(settings["ddim_steps"]))
    with ArrayStoreWriter(out, len(ids), {"slice_ids": ((), np.int64), "maps": ((size, size), np.float16)}, attrs) as w:
        for start, batch in _batches(ids, settings["batch_size"], "cdm saliency"):
            images = _images(store, batch, device)
            labels = torch.ones(len(batch), dtype=torch.long, device=device)
            maps = cdm_saliency(cdm, scheduler, images, labels, int(settings["noise_level"]), int(settings["ddim_steps"]))
            w.write("slice_ids", start, batch)
            w.write("maps", start, maps.cpu().numpy())
