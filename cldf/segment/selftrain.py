"""Self-training of CLDF's pixel decoder: its own masks of the training slices as the next decoder's anchors.

The maps' selection (CAM ∧ MG) picks confident pixels only: on brats18_shared's validation slices its
foreground holds about a third of the tumour. A round of self-training segments the positive training
slices with the trained decoder and K-means (the chosen clustering), then trains a new decoder whose
foreground anchors are the components of those masks that the maps' foreground touches (a component
no map vouches for is left out) and whose background anchors are the maps' background outside the
masks; negative slices keep the maps' selection.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch
from scipy import ndimage

from cldf.data.splits import training_rows
from cldf.models.decoder import PixelDecoder
from cldf.segment.cluster import segment_ids
from cldf.segment.components import EIGHT_CONNECTED
from cldf.segment.selection import select_stored
from cldf.segment.train import map_stores, train_decoder
from cldf.store import SliceStore


def vouched_anchors(fg: torch.Tensor, bg: torch.Tensor, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One slice's anchors from the maps' selection ``fg``, ``bg`` (bool (H, W)) and a decoder's ``mask`` (bool
    (H, W)): foreground, the mask's components (8-connected) that hold a pixel of ``fg``, and ``fg`` itself;
    background, ``bg`` outside the mask (a component no map vouches for is neither)."""
    mask = np.asarray(mask, dtype=bool)
    components, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
    vouched = np.setdiff1d(components[fg.numpy() & mask], [0])
    return torch.from_numpy(np.isin(components, vouched)) | fg, bg & ~torch.from_numpy(mask)


def self_train(slices_path: str | os.PathLike, features, cam_path: str | os.PathLike | None,
               mg_path: str | os.PathLike | None, settings: Mapping[str, Any], cluster: Mapping[str, Any],
               decoder: PixelDecoder, checkpoint: Mapping[str, Any], rounds: int, seed: int, cap: int
               ) -> tuple[PixelDecoder, dict[str, Any]]:
    """``rounds`` rounds of self-training from a trained ``decoder`` (and its ``checkpoint``): each segments
    the positive training slices (features (D, H, W) per slice from ``features``; K-means under ``cluster``)
    and trains a new decoder under ``settings`` (those of :func:`train_decoder`) on the maps' selection of the
    training slices (:func:`select_stored`, made once), each positive one widened by its mask (:func:`vouched_anchors`).
    Returns the last decoder and its checkpoint (the given ones when ``rounds`` is 0)."""
    if int(rounds) == 0:
        return decoder, dict(checkpoint)
    slices = SliceStore(slices_path)
    ids = training_rows(slices, cap, seed)
    positive = ids[slices.labels[ids] == 1]
    selection = settings["selection"]
    rows, fg, bg, _ = select_stored(slices, *map_stores(selection, cam_path, mg_path), ids, {**selection, "weight": "none"})
    for _ in range(int(rounds)):
        masks = dict(zip(positive.tolist(), segment_ids(features, decoder, checkpoint, slices, positive, cluster, seed)))
        anchors = {sid: vouched_anchors(fg[k], bg[k], masks[sid]) if sid in masks else (fg[k], bg[k])
                   for k, sid in enumerate(rows.tolist())}
        decoder, checkpoint = train_decoder(slices_path, features, cam_path, mg_path, settings, None, seed, cap, anchors)
    return decoder, dict(checkpoint)
