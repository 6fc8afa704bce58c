"""Diffusion features for the decoder, one batch at a time: read from the store, or computed on the fly.

The features store holds one float16 array ``layer_k`` of shape (N, C_k, h_k, w_k) per tapped decoder
layer, for the decoder's training and validation slices only (:class:`StoredFeatures`). Segmentation,
pseudo-masks and prediction compute the features of their slices with the frozen CDM as they go and keep
none (:class:`ComputedFeatures`), under the conditioning of their protocol. Full-resolution concatenated
features are only ever built for one batch of slices, so memory is bounded by ``batch_size * D * H * W``
floats whatever the size of the dataset.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cldf.maps.features import NULL_CONDITION, conditioning_labels, diffusion_features
from cldf.store import MapStore, SliceStore, StoreError

_LAYER = re.compile(r"^layer_(\d+)$")
CACHE_BYTES = 1 << 30
"""Features stores up to this size are held in memory while a decoder trains (1 GiB)."""


def upsample_features(layers: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Bilinearly upsample every layer to ``size`` × ``size`` and concatenate along channels.

    Parameters
    ----------
    layers
        One tensor (B, C_k, h_k, w_k) per tapped layer (any float dtype).
    size
        Output side length H = W.

    Returns
    -------
    float32 tensor (B, D, H, W) with D = sum_k C_k.
    """
    if not layers:
        raise ValueError("upsample_features needs at least one feature layer")
    out = []
    for layer in layers:
        layer = layer.float()
        if layer.shape[-2:] != (size, size):
            layer = F.interpolate(layer, size=(size, size), mode="bilinear", align_corners=False)
        out.append(layer)
    return torch.cat(out, dim=1)


def layer_names(store: MapStore) -> list[str]:
    """Names ``layer_0 .. layer_{K-1}`` of the feature arrays of a features store, in layer order."""
    found = sorted(
        (int(m.group(1)), key) for key in store.group.array_keys() if (m := _LAYER.match(key)) is not None
    )
    names = [key for _, key in found]
    if not names or [k for k, _ in found] != list(range(len(names))):
        raise StoreError(f"{store.path} holds no contiguous layer_0..layer_K arrays (found {names})")
    return names


def feature_dim(features_path: str | os.PathLike) -> int:
    """Total channel count D of a features store (sum of the layers' channels)."""
    store = MapStore(features_path)
    return int(sum(store.group[name].shape[1] for name in layer_names(store)))


def iter_feature_batches(
    features_path: str | os.PathLike,
    slice_ids: Sequence[int] | np.ndarray,
    batch_size: int,
    size: int,
    device: torch.device,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(ids, features)`` for consecutive batches of ``slice_ids`` (in the given order).

    ``ids`` is int64 (B,), ``features`` a float32 tensor (B, D, size, size) on ``device``; only one
    batch is held in memory at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = MapStore(features_path)
    names = layer_names(store)
    slice_ids = np.asarray(slice_ids, dtype=np.int64)
    for start in range(0, len(slice_ids), batch_size):
        ids = slice_ids[start : start + batch_size]
        layers = [torch.from_numpy(store.read(name, ids)).to(device) for name in names]
        yield ids, upsample_features(layers, size)


ChannelGroups = list[tuple[str, int]]
"""The channels of a feature source in order, grouped: ``[(name, count), ...]``; a tapped layer's module
name (``up_blocks.2``) or ``image`` for the image channels."""


def input_channels(groups: ChannelGroups, feature_layers: Sequence[str] | None) -> list[int] | None:
    """Indices of the channels of ``groups`` a decoder reading the layers ``feature_layers`` (and the image
    channels, when the source has them) sees; None (all) when ``feature_layers`` is None.

    Raises :class:`StoreError` naming a layer the source does not hold.
    """
    if feature_layers is None:
        return None
    names = [name for name, _ in groups]
    missing = [layer for layer in feature_layers if layer not in names]
    if missing:
        raise StoreError(f"the decoder reads the feature layers {list(feature_layers)}, but its features hold "
                         f"{[n for n in names if n != 'image']}: {missing} missing (features.layers must tap them)")
    read, start = [], 0
    for name, count in groups:
        if name in feature_layers or name == "image":
            read += range(start, start + count)
        start += count
    return read


class StoredFeatures:
    """Features of the slices of a features store.

    A store smaller than ``cache_bytes`` is read into memory once (it holds the decoder's training and
    validation slices only, capped by ``features.max_train_slices``), so the epochs of decoder training
    and the candidates of its tuning do not re-read it; a larger one is read batch by batch.
    """

    def __init__(self, path: str | os.PathLike, size: int, device: torch.device,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.path, self.size, self.device = path, int(size), device
        store = MapStore(path)
        self._names = layer_names(store)
        tapped = store.attrs.get("settings", {}).get("layers") or []
        tapped = tapped if len(tapped) == len(self._names) else self._names  # module names when recorded
        self.channel_groups: ChannelGroups = [(str(layer), int(store.group[name].shape[1]))
                                              for layer, name in zip(tapped, self._names)]
        self.dim = sum(count for _, count in self.channel_groups)
        nbytes = sum(store.group[name].nbytes for name in self._names)
        self._cache = [np.asarray(store.group[name][:]) for name in self._names] if nbytes <= cache_bytes else None
        self._row = {int(s): r for r, s in enumerate(store.slice_ids)}
        # the slice ids served from memory (None when read batch by batch)
        self.held_ids = np.asarray(store.slice_ids, dtype=np.int64) if self._cache is not None else None

    def batches(self, slice_ids: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(ids (B,), features float32 (B, D, H, W) on the device)`` for consecutive batches of ``slice_ids``."""
        if self._cache is None:
            yield from iter_feature_batches(self.path, slice_ids, batch_size, self.size, self.device)
            return
        slice_ids = np.asarray(slice_ids, dtype=np.int64)
        for start in range(0, len(slice_ids), batch_size):
            ids = slice_ids[start : start + batch_size]
            try:
                rows = [self._row[int(s)] for s in ids]
            except KeyError as err:
                raise StoreError(f"{self.path} has no entry for slice {err.args[0]}") from err
            layers = [torch.from_numpy(layer[rows]).to(self.device) for layer in self._cache]
            yield ids, upsample_features(layers, self.size)


CONDITIONINGS = ("label", "null_class", "predicted")
"""CDM class of a slice's features: its image-level label (training, and test slices under the labelled
protocol), the null class, or the CAM classifier's prediction (p ≥ 0.5): the last two read no label."""


class ComputedFeatures:
    """Features computed batch by batch by a frozen network (the CDM, or the network of
    ``settings["source"]``), rounded to float16 like the stored ones.

    ``conditioning`` is one of :data:`CONDITIONINGS` (the CDM's class; the classifiers ignore it);
    ``predicted`` needs the classifier-probability store. Only ``label`` reads the slices' image-level labels.
    """

    def __init__(self, model: torch.nn.Module, slices: SliceStore, settings: Mapping[str, Any], conditioning: str,
                 seed: int, device: torch.device, probs: MapStore | None = None) -> None:
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {CONDITIONINGS}")
        if conditioning == "predicted" and probs is None:
            raise ValueError("conditioning 'predicted' needs the classifier-probability store")
        self.model, self.slices, self.settings = model.to(device).eval(), slices, settings
        self.conditioning, self.seed, self.device, self.probs = conditioning, int(seed), device, probs
        shape = (1, slices.channels, slices.image_size, slices.image_size)
        probe = diffusion_features(self.model, torch.full(shape, -1.0, device=device), torch.zeros(1, dtype=torch.long),
                                   np.zeros(1, np.int64), self.seed, settings)
        self.channel_groups: ChannelGroups = [(str(layer), int(f.shape[1])) for layer, f in zip(settings["layers"], probe)]
        self.dim = sum(count for _, count in self.channel_groups)

    def classes(self, ids: np.ndarray) -> torch.Tensor:
        """CDM class per slice under this conditioning: long (B,)."""
        if self.conditioning == "label":
            return conditioning_labels(self.slices.labels[ids])
        if self.conditioning == "null_class":
            return torch.full((len(ids),), NULL_CONDITION, dtype=torch.long)
        return torch.from_numpy((self.probs.read("probs", ids) >= 0.5).astype(np.int64))

    def batches(self, slice_ids: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(ids (B,), features float32 (B, D, H, W) on the device)`` for consecutive batches of ``slice_ids``."""
        slice_ids = np.asarray(slice_ids, dtype=np.int64)
        for start in range(0, len(slice_ids), batch_size):
            ids = slice_ids[start : start + batch_size]
            images = torch.from_numpy(self.slices.images(ids)).to(self.device)
            feats = diffusion_features(self.model, images, self.classes(ids), ids, self.seed, self.settings)
            yield ids, upsample_features([f.half() for f in feats], self.slices.image_size)


class WithImage:
    """A feature source whose pixels also carry image channels: (B, D + (2r + 1) C, H, W).

    The image intensities are features like the diffusion ones: the decoder may learn that a channel's
    brightness matters; no threshold is imposed on them. With a ``context`` radius r above 0 each pixel
    also carries the image channels of slices z - r .. z + r of its case (in that order, the slice's own in
    the middle; a neighbour outside the store repeats the nearest slice that is in it), 2.5-D context the
    decoder may learn from. When the source holds its slices in memory (``held_ids``), their images are
    read once too (up to ``cache_bytes``), so the epochs of decoder training and the candidates of its
    tuning do not re-read them batch by batch.
    """

    def __init__(self, source: StoredFeatures | ComputedFeatures, slices: SliceStore, context: int = 0,
                 cache_bytes: int = CACHE_BYTES) -> None:
        if int(context) != context or context < 0:
            raise ValueError(f"the image context is a number of slices >= 0, got {context}")
        self.source, self.slices, self.context = source, slices, int(context)
        self.device = source.device
        self.dim = source.dim + slices.channels * (2 * self.context + 1)
        self.channel_groups: ChannelGroups = [*source.channel_groups, ("image", self.dim - source.dim)]
        self._row = ({(int(c), int(z)): r for r, (c, z) in enumerate(zip(slices.case_index, slices.slice_index))}
                     if self.context else {})  # (case, slice index) -> row, for the neighbours' lookup
        held = getattr(source, "held_ids", None)
        self._images: tuple[dict[int, int], np.ndarray] | None = None
        if held is not None:
            ids = np.unique(self._window(np.asarray(held, dtype=np.int64)))
            if len(ids) * slices.channels * slices.image_size**2 * 4 <= cache_bytes:
                self._images = ({int(s): r for r, s in enumerate(ids)}, slices.images(ids))

    def _window(self, ids: np.ndarray) -> np.ndarray:
        """int64 (B, 2r + 1): the rows of slices z - r .. z + r of each slice's case (the nearest held one
        towards the slice where a neighbour is not in the store)."""
        out = np.repeat(ids[:, None], 2 * self.context + 1, axis=1)
        for b, s in enumerate(ids):
            c, z = int(self.slices.case_index[s]), int(self.slices.slice_index[s])
            for side in (-1, 1):
                last = int(s)
                for d in range(1, self.context + 1):
                    last = self._row.get((c, z + side * d), last)
                    out[b, self.context + side * d] = last
        return out

    def _read_images(self, ids: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) images of ``ids``, from memory when held."""
        if self._images is not None and all(int(s) in self._images[0] for s in ids):
            return self._images[1][[self._images[0][int(s)] for s in ids]]
        return self.slices.images(ids)

    def _context_images(self, ids: np.ndarray) -> np.ndarray:
        """float32 (B, (2r + 1) C, H, W): the images of each slice's window, slice by slice along it."""
        if not self.context:  # the slice's own images: no window to look up
            return self._read_images(ids)
        rows, where = np.unique(self._window(np.asarray(ids, dtype=np.int64)), return_inverse=True)
        images = self._read_images(rows)[where.reshape(-1)]
        return images.reshape(len(ids), -1, *images.shape[2:])

    def batches(self, slice_ids: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for ids, feats in self.source.batches(slice_ids, batch_size):
            images = torch.from_numpy(self._context_images(ids)).to(feats.device)
            yield ids, torch.cat([feats, images], dim=1)


class GroupedFeatures:
    """Features of slices whose source depends on the slice: ``groups`` pairs slice ids (N_g,) with the
    source serving them (e.g. labelled slices conditioned on their label, unlabelled ones on another class).
    Every batch comes from one source; the groups are served in order, so one caller (a per-case K-means)
    sees all of a case's slices whatever source each came from."""

    def __init__(self, groups: Sequence[tuple[np.ndarray, Any]]) -> None:
        """``groups``: at least one (ids, source); the sources give features of one width (the first's)."""
        self.groups = [(np.asarray(ids, dtype=np.int64), source) for ids, source in groups]
        self.dim, self.device, self.channel_groups = groups[0][1].dim, groups[0][1].device, groups[0][1].channel_groups

    def batches(self, slice_ids: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        slice_ids = np.asarray(slice_ids, dtype=np.int64)
        for ids, source in self.groups:
            mine = slice_ids[np.isin(slice_ids, ids)]
            if len(mine):
                yield from source.batches(mine, batch_size)


def decoder_inputs(source: StoredFeatures | ComputedFeatures, slices: SliceStore, decoder: Mapping[str, Any]):
    """What the pixel decoder sees: the diffusion features, with the image channels of each slice (and of the
    ``decoder["image_context"]`` slices on each side of it) when ``decoder["with_image"]``. ``decoder``: the
    decoder's settings (``cldf.decoder``, or any mapping holding those two keys)."""
    return WithImage(source, slices, decoder["image_context"]) if decoder["with_image"] else source
