"""Pixel selection (step 7): which pixels the contrastive decoder treats as foreground or background.

A pixel is *activated* in a map when its value exceeds a per-slice threshold computed from the body
pixels of that slice only (Otsu, or a quantile). Foreground = activated in both the CAM and the mean
gradient (``fused``), or in one of them (``cam`` / ``mg``), on positive slices only. Background = activated
in none of the maps used, inside the body, on positive slices; on negative slices the whole body is
background. The background's activation rule may be looser than the foreground's (``background:
otsu`` with a top-quantile foreground): the pixels between the two thresholds, where the maps are
unsure, are then left out of both sets, and a foreground pixel is never background, whatever the two
rules. With ``margin: m`` the background also keeps m pixels away from every pixel a map activates (a
square neighbourhood): the maps' activations cover the target's confident core, and the tissue just
beyond them is as likely its unsure rim as the healthy body. The foreground's threshold is per slice, or per case
(``scope: case``: over the body pixels of all positive slices of the case, so a slice through a large
tumour gives more foreground than one through its tip). Pixels outside the body are never selected: body versus air is
trivially separable and segmentation clusters inside the body only, so air pixels would only teach the
decoder a distinction it is never asked to make. Ambiguous slices (label -1) contribute nothing.

With ``weight: confidence`` each selected pixel also gets an anchor weight for the contrastive loss
(:func:`anchor_weights`): how sure the maps it was selected by are of it.
"""

from __future__ import annotations

from typing import Any, Container, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu

from cldf.registry import SELECTION_MAPS as MODE_MAPS
from cldf.store import MapStore, SliceStore

RULES = ("otsu", "quantile")
BACKGROUND_RULES = ("foreground", "otsu")
WEIGHTS = ("none", "confidence")
MODES = tuple(MODE_MAPS)


def activated(maps: torch.Tensor, body: torch.Tensor, rule: str = "otsu", quantile: float | None = None,
              groups: np.ndarray | None = None) -> torch.Tensor:
    """Activated pixels of each map, thresholded per slice (or per group of slices) inside the body.

    Parameters
    ----------
    maps
        float (B, H, W) saliency maps.
    body
        bool (B, H, W) body masks.
    rule
        ``otsu`` (skimage's Otsu threshold of the body pixels) or ``quantile`` (the ``quantile``-th
        quantile of the body pixels).
    quantile
        Quantile in (0, 1) for rule ``quantile`` (unused by ``otsu``).
    groups
        int (B,): slices of one value share one threshold, computed over all their body pixels; None:
        each slice its own.

    Returns
    -------
    bool (B, H, W): ``map > threshold`` inside the body. A group (slice) whose map is constant over the
    body, or whose body is empty, has no activated pixel.
    """
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {RULES}")
    if rule == "quantile" and (quantile is None or not 0.0 < quantile < 1.0):
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if maps.shape != body.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and body {tuple(body.shape)} differ in shape")
    values = maps.detach().float().cpu().numpy()
    inside = body.detach().cpu().numpy().astype(bool)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    if groups.shape != (len(values),):
        raise ValueError(f"groups {groups.shape} must give one value per slice ({len(values)})")
    out = np.zeros(values.shape, dtype=bool)
    for group in np.unique(groups):
        members = groups == group
        pixels = values[members][inside[members]]
        if pixels.size == 0 or pixels.max() == pixels.min():
            continue
        if rule == "otsu":
            threshold = threshold_otsu(pixels)
        else:
            threshold = np.quantile(pixels, quantile)
        out[members] = (values[members] > threshold) & inside[members]
    return torch.from_numpy(out).to(maps.device)


def select_pixels(
    cam: torch.Tensor | None,
    mg: torch.Tensor | None,
    labels: torch.Tensor,
    body: torch.Tensor,
    mode: str = "fused",
    rule: str = "otsu",
    quantile: float | None = None,
    background: str = "foreground",
    cases: np.ndarray | None = None,
    margin: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background training pixels of a batch of slices.

    Parameters
    ----------
    cam, mg
        float (B, H, W) CAM and mean-gradient maps in [0, 1]; the map a mode does not use may be None.
    labels
        int (B,) slice labels: 1 positive, 0 negative, -1 ambiguous (never selected).
    body
        bool (B, H, W) body masks.
    mode
        ``fused`` (foreground = activated in CAM and MG), ``cam`` or ``mg`` (that map only).
    rule, quantile
        Activation threshold of the foreground, see :func:`activated`.
    background
        Activation threshold below which a pixel of a positive slice is background: ``foreground`` (the
        same rule) or ``otsu`` (per-slice Otsu, whatever the foreground's rule).
    cases
        int (B,) case of each slice: the foreground threshold is then one per case, over the body pixels
        of the case's positive slices in the batch (pass all of them); None: per slice. The background's
        ``otsu`` rule stays per slice.
    margin
        Pixels of a positive slice within ``margin`` (Chebyshev distance) of a pixel activated in any
        used map, or of a foreground pixel, are not background; 0: only those pixels themselves.

    Returns
    -------
    ``(fg, bg)``, disjoint bool tensors (B, H, W), both inside the body. ``fg`` is empty on non-positive
    slices; ``bg`` covers the whole body on negative slices.
    """
    if mode not in MODES:
        raise ValueError(f"unknown selection mode {mode!r}; expected one of {MODES}")
    body = body.bool()
    used = [{"cam": cam, "mg": mg}[name] for name in MODE_MAPS[mode]]
    if any(m is None for m in used):
        raise ValueError(f"selection mode {mode!r} needs the map(s) it uses; got None")
    if background not in BACKGROUND_RULES:
        raise ValueError(f"unknown background rule {background!r}; expected one of {BACKGROUND_RULES}")
    if int(margin) != margin or margin < 0:
        raise ValueError(f"background margin must be a whole number of pixels >= 0, got {margin}")
    groups = None
    if cases is not None:  # positive slices pool per case; every other slice stays on its own
        cases = np.asarray(cases)
        alone = cases.max(initial=0) + 1 + np.arange(len(cases))
        groups = np.where(labels.cpu().numpy() == 1, cases, alone)
    acts = [activated(m, body, rule, quantile, groups) for m in used]
    same = background == "foreground" or (background == rule and groups is None)  # the same activations
    loose = acts if same else [activated(m, body, background) for m in used]
    in_all = torch.stack(acts).all(dim=0)
    near = _dilate(torch.stack(loose).any(dim=0) | in_all, int(margin))
    positive = (labels == 1).view(-1, 1, 1).to(body.device)
    negative = (labels == 0).view(-1, 1, 1).to(body.device)
    fg = in_all & positive
    bg = body & ((positive & ~near) | negative)
    return fg, bg


def _dilate(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """bool (B, H, W) grown by ``margin`` pixels in every direction (a (2m+1)² square); 0: unchanged."""
    if margin == 0:
        return masks
    grown = F.max_pool2d(masks[:, None].float(), 2 * margin + 1, stride=1, padding=margin)
    return grown[:, 0] > 0


def anchor_weights(cam: torch.Tensor | None, mg: torch.Tensor | None, labels: torch.Tensor, fg: torch.Tensor,
                   bg: torch.Tensor, mode: str = "fused") -> torch.Tensor:
    """Confidence of the maps in each selected pixel, the weight of that pixel as an anchor.

    Parameters
    ----------
    cam, mg
        float (B, H, W) maps in [0, 1]; the one ``mode`` does not use may be None.
    labels
        int (B,) slice labels.
    fg, bg
        bool (B, H, W) selected pixels (:func:`select_pixels`).
    mode
        The selection mode: which maps are asked.

    Returns
    -------
    float32 (B, H, W): on foreground pixels the lowest value of the used maps (high only where every map
    is), on background pixels of positive slices one minus the highest (low only where some map is), 1 on
    the background of negative slices (the slice label is sure of it), 0 on pixels not selected.
    """
    used = torch.stack([{"cam": cam, "mg": mg}[name].float() for name in MODE_MAPS[mode]]).clamp(0.0, 1.0)
    negative = (labels == 0).view(-1, 1, 1).to(fg.device)
    background = torch.where(negative, torch.ones_like(used[0]), 1.0 - used.amax(dim=0))
    return torch.where(fg, used.amin(dim=0), torch.where(bg, background, torch.zeros_like(used[0])))


def case_pool(slices: SliceStore, ids: np.ndarray, stores: Sequence[MapStore | None]) -> np.ndarray:
    """``ids`` and every positive slice of their cases that each of ``stores`` holds a map of: int64 (M,),
    sorted; what :func:`select_pixels` needs (with ``cases``) for a per-case foreground threshold."""
    pool = slices.indices(cases=np.unique(slices.case_index[ids]), labels=[1])
    for store in stores:
        pool = pool if store is None else np.intersect1d(pool, store.slice_ids)
    return np.union1d(ids, pool).astype(np.int64)


def select_stored(slices: SliceStore, cam: MapStore | None, mg: MapStore | None, ids: np.ndarray,
                  settings: Mapping[str, Any], done: Container[int] = ()
                  ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`select_pixels` on the stored maps of slices ``ids`` under CLDF's selection ``settings``
    (``mode``, ``threshold``, ``quantile``, ``background``, ``margin``, ``scope``, ``weight``).

    Returns ``(rows int64 (M,), fg (M, H, W), bg (M, H, W), weights)``; ``weights`` are the anchor weights
    float32 (M, H, W) of :func:`anchor_weights` under ``weight: confidence``, else None. ``rows`` are ``ids``; under ``scope: case``
    they also hold the positive slices of the same cases (:func:`case_pool`) but those in ``done``:
    slices selected before, with the whole pool of their case.
    """
    per_case = settings.get("scope", "slice") == "case"
    rows = np.asarray(ids, dtype=np.int64)
    if per_case:
        rows = np.asarray([i for i in case_pool(slices, rows, (cam, mg)) if int(i) not in done], dtype=np.int64)

    def read(store: MapStore | None) -> torch.Tensor | None:
        return None if store is None else torch.from_numpy(store.read("maps", rows).astype(np.float32))

    weight = settings.get("weight", "none")
    if weight not in WEIGHTS:
        raise ValueError(f"unknown anchor weight {weight!r}; expected one of {WEIGHTS}")
    cam_maps, mg_maps = read(cam), read(mg)
    labels = torch.from_numpy(slices.labels[rows].astype(np.int64))
    fg, bg = select_pixels(
        cam_maps, mg_maps, labels, torch.from_numpy(slices.body(rows)),
        mode=settings["mode"], rule=settings["threshold"], quantile=settings.get("quantile"),
        background=settings.get("background", "foreground"), cases=slices.case_index[rows] if per_case else None,
        margin=settings.get("margin", 0),
    )
    weights = anchor_weights(cam_maps, mg_maps, labels, fg, bg, settings["mode"]) if weight == "confidence" else None
    return rows, fg, bg, weights
