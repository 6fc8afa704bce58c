"""Choices made on the validation split: their rows, and the choices of the thresholded maps.

A choice is written as rows ``choice, value, val_dice, chosen`` (``selection.csv`` is their
concatenation): every candidate of its grid with the Dice of the validation slices against their ground
truth. Ties go to the earlier candidate of the grid, whose first entry is also the default when the
validation split has no slice to score (``val_dice`` is then empty).

Here: the layers a per-layer CAM is fused over (:func:`choose_layers`), the threshold of every thresholded
map and the intensity row's channel and side (:func:`choose_thresholds`), all on positive validation
slices; a map no better than marking the whole body is reported (:func:`warn_if_no_better_than_body`).
This module is light to import (numpy, pandas, zarr; no torch): the choice and baseline jobs are short
and would otherwise spend most of their time importing. CLDF's decoder settings and the unlabelled
protocol's choices are made in :mod:`cldf.evaluate.choose`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from cldf.atomic import atomic_file
from cldf.evaluate.metrics import dice_scores
from cldf.maps.layers import candidate_layers, fuse_layers
from cldf.segment.baselines import POLARITIES, intensity_map, threshold_map
from cldf.store import MapStore, SliceStore, read_ground_truth

LOG = logging.getLogger("cldf.choose")
COLUMNS = ("choice", "value", "val_dice", "chosen")


def encode(value: Any) -> str:
    """A candidate as it is written in ``selection.csv`` (strings as they are, the rest as compact JSON)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def decode(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def choice_rows(choice: str, candidates: Sequence[Any], scores: Sequence[float]) -> list[dict[str, Any]]:
    """Rows of one choice; the best score wins, the first candidate on ties or when nothing was scored."""
    finite = [s if np.isfinite(s) else -np.inf for s in scores]
    best = int(np.argmax(finite)) if np.isfinite(max(finite, default=-np.inf)) else 0
    return [{"choice": choice, "value": encode(c), "val_dice": float(s), "chosen": k == best}
            for k, (c, s) in enumerate(zip(candidates, scores))]


def chosen(rows: Iterable[Mapping[str, Any]] | pd.DataFrame, choice: str) -> Any:
    """The chosen value of ``choice`` among selection rows."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    hit = frame[(frame["choice"] == choice) & frame["chosen"].astype(bool)]
    if hit.empty:
        raise KeyError(f"no chosen value of {choice!r}")
    return decode(str(hit["value"].iloc[0]))


def read_selection(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"value": str})


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def mean_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean per-slice Dice of bool (B, H, W) masks; nan when there is no slice."""
    return float(dice_scores(pred, gt).mean()) if len(gt) else float("nan")


def val_positives(slices: SliceStore, slices_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive validation slices: ids (N,), their ground truth and body masks, bool (N, H, W)."""
    ids = slices.indices(split="val", labels=[1])
    if len(ids) == 0:
        LOG.warning("the validation split has no positive slice: every choice takes its default")
    return ids, read_ground_truth(slices_path, ids).astype(bool), slices.body(ids)


def choose_layers(slices_path: str | os.PathLike, per_layer_path: str | os.PathLike, name: str,
                  grids: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``layers:<name>``: the layer subset of a per-layer CAM store (``layers`` (N, L, H, W)) whose fused
    map, thresholded at its best threshold of ``grids["threshold"]``, scores highest; the subsets are
    ``grids["layercam_layers"]``."""
    slices = SliceStore(slices_path)
    ids, gt, body = val_positives(slices, slices_path)
    layers = MapStore(per_layer_path).read("layers", ids).astype(np.float32)
    names = candidate_layers(grids["layercam_layers"])
    scores = [max(mean_dice(threshold_map(fuse_layers(layers, names, subset), body, t), gt) for t in grids["threshold"])
              for subset in grids["layercam_layers"]]
    return choice_rows(f"layers:{name}", grids["layercam_layers"], scores)


def warn_if_no_better_than_body(name: str, scores: Sequence[float], floor: float) -> None:
    """Warn when a map's best validation Dice (``scores`` over its thresholds) is below ``floor``, the Dice of
    marking the whole body as target: the map does not localise the target, as when its network is too
    briefly trained or its training collapsed. No warning when ``floor`` is nan (no slice to score)."""
    best = float(np.nanmax(scores)) if np.isfinite(floor) else float("nan")  # all-nan scores: nanmax would warn
    if best < floor:
        LOG.warning("map %s: its best validation Dice (%.3f) is below that of marking the whole body as target "
                    "(%.3f): it does not localise the target, so its rows compare nothing (its network may be too "
                    "briefly trained or its training collapsed: README, known limitations)", name, best, floor)


def choose_thresholds(slices_path: str | os.PathLike, maps: Mapping[str, str | os.PathLike],
                      grids: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows ``threshold:<name>`` of every map (name → store with ``maps`` (N, H, W)) over
    ``grids["threshold"]`` (``otsu`` and numbers), then rows ``intensity``: the channel and side whose
    per-slice Otsu threshold scores highest."""
    slices = SliceStore(slices_path)
    ids, gt, body = val_positives(slices, slices_path)
    floor = mean_dice(body, gt)  # the whole body marked as target: nan without a positive validation slice
    rows: list[dict[str, Any]] = []
    for name, path in maps.items():
        values = MapStore(path).read("maps", ids).astype(np.float32)
        scores = [mean_dice(threshold_map(values, body, t), gt) for t in grids["threshold"]]
        rows += choice_rows(f"threshold:{name}", grids["threshold"], scores)
        warn_if_no_better_than_body(name, scores, floor)
    images = slices.images(ids)
    candidates = [f"{m}:{p}" for m in slices.modalities for p in POLARITIES]
    scores = [mean_dice(threshold_map(intensity_map(images, slices.modalities.index(c.split(":")[0]), c.split(":")[1]),
                                      body, "otsu"), gt) for c in candidates]
    return rows + choice_rows("intensity", candidates, scores)
