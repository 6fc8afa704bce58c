"""Every open choice, made on the validation split (never on test masks).

Each function scores a grid of candidates by the Dice of validation slices against their ground truth and
returns rows ``choice, value, val_dice, chosen`` (``selection.csv`` is their concatenation). Ties go to the
earlier candidate of the grid, whose first entry is also the default when the validation split has no
slice to score (``val_dice`` is then empty).

* the threshold of every thresholded map, LayerCAM's layers, the intensity channel and side
  (:func:`choose_maps`; positive validation slices);
* CLDF's pixel-selection quantile and decoder optimiser, learning rate and loss reduction
  (:func:`tune_decoder`; positive validation slices, features conditioned on the labels);
* the CDM conditioning and the classifier gate of the unlabelled protocol (:func:`choose_unlabelled`; the
  conditioning by the Dice of positive validation slices, the gate by the mean Dice over positive and
  negative validation slices, an empty mask on an empty slice counting 1).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cldf.atomic import atomic_file
from cldf.evaluate.metrics import dice_scores
from cldf.maps.cams import candidate_layers, fuse_layers
from cldf.models.checkpoint import save_checkpoint
from cldf.segment.baselines import POLARITIES, intensity_map, threshold_map
from cldf.segment.cluster import prototypes_of, segment_batches
from cldf.segment.features import ComputedFeatures, StoredFeatures, decoder_inputs
from cldf.segment.train import load_decoder, train_decoder
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


def _rows(choice: str, candidates: Sequence[Any], scores: Sequence[float]) -> list[dict[str, Any]]:
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


def _mean_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(dice_scores(pred, gt).mean()) if len(gt) else float("nan")


def _val_positives(slices: SliceStore, slices_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = slices.indices(split="val", labels=[1])
    if len(ids) == 0:
        LOG.warning("the validation split has no positive slice: every choice takes its default")
    return ids, read_ground_truth(slices_path, ids).astype(bool), slices.body(ids)


def choose_maps(
    slices_path: str | os.PathLike,
    maps: Mapping[str, str | os.PathLike],
    per_layer: Mapping[str, str | os.PathLike],
    grids: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Thresholds of the baseline maps, the fused layers of per-layer CAMs, the intensity channel and side.

    ``maps``: map name → store with ``maps``; ``per_layer``: map name → store with ``layers`` (its layer
    subsets are ``grids["layercam_layers"]``); ``grids``: ``threshold`` (``otsu`` and numbers), ``layercam_layers``.
    """
    slices = SliceStore(slices_path)
    ids, gt, body = _val_positives(slices, slices_path)
    rows: list[dict[str, Any]] = []
    for name, path in maps.items():
        values = MapStore(path).read("maps", ids).astype(np.float32)
        scores = [_mean_dice(threshold_map(values, body, t), gt) for t in grids["threshold"]]
        rows += _rows(f"threshold:{name}", grids["threshold"], scores)
    for name, path in per_layer.items():
        store = MapStore(path)
        layers = store.read("layers", ids).astype(np.float32)
        names = candidate_layers(grids["layercam_layers"])
        best = []
        for subset in grids["layercam_layers"]:
            fused = fuse_layers(layers, names, subset)
            best.append([_mean_dice(threshold_map(fused, body, t), gt) for t in grids["threshold"]])
        layer_rows = _rows(f"layers:{name}", grids["layercam_layers"], [max(s) for s in best])
        pick = next(k for k, r in enumerate(layer_rows) if r["chosen"])
        rows += layer_rows + _rows(f"threshold:{name}", grids["threshold"], best[pick])
    images = slices.images(ids)
    candidates = [f"{m}:{p}" for m in slices.modalities for p in POLARITIES]
    scores = [_mean_dice(threshold_map(intensity_map(images, slices.modalities.index(c.split(":")[0]), c.split(":")[1]),
                                       body, "otsu"), gt) for c in candidates]
    return rows + _rows("intensity", candidates, scores)


def decoder_settings(base: Mapping[str, Any], candidate: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """Decoder training settings: the config's ``cldf`` selection and decoder, with a tuned candidate
    (``quantile``, ``optimizer``, ``lr``, ``loss``) and the selection ``mode`` filled in."""
    selection = {**base["selection"], "mode": mode, "quantile": float(candidate["quantile"])}
    decoder = {**base["decoder"], **{k: candidate[k] for k in ("optimizer", "lr", "loss")}}
    return {"selection": selection, "decoder": decoder}


def candidates(grids: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The decoder grid: every selection quantile with every optimiser entry (each then clustered every
    way of ``grids["cluster"]``)."""
    return [{"quantile": q, **opt} for q in grids["quantile"] for opt in grids["optimizer"]]


def cluster_settings(base: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict[str, Any]:
    """Clustering settings: the config's (``inside_body``) with a tuned candidate's ``k`` and ``assign``."""
    return {**base, "k": int(candidate["k"]), "assign": candidate["assign"]}


def tune_decoder(
    slices_path: str | os.PathLike,
    features: StoredFeatures,
    cam_path: str | os.PathLike | None,
    mg_path: str | os.PathLike | None,
    base: Mapping[str, Any],
    grids: Mapping[str, Any],
    out: str | os.PathLike,
    seed: int,
    cap: int,
) -> list[dict[str, Any]]:
    """Train CLDF's decoder for every candidate and cluster its validation slices every way of the grid;
    write the decoder of the best combination (validation Dice) to ``out``."""
    slices = SliceStore(slices_path)
    ids, gt, _ = _val_positives(slices, slices_path)
    grid, scores, best = [], [], (-np.inf, None)
    for candidate in candidates(grids):
        decoder, checkpoint = train_decoder(slices_path, features, cam_path, mg_path,
                                            decoder_settings(base, candidate, "fused"), None, seed, cap)
        for clustering in grids["cluster"]:
            grid.append({**candidate, **clustering})
            pred = segment_ids(features, decoder, checkpoint, slices, ids, cluster_settings(base["cluster"], clustering), seed)
            scores.append(_mean_dice(pred, gt))
            LOG.info("decoder candidate %s: validation Dice %.4f", encode(grid[-1]), scores[-1])
            score = scores[-1] if np.isfinite(scores[-1]) else -np.inf
            if best[1] is None or score > best[0]:
                best = (score, checkpoint)
    save_checkpoint(out, best[1])
    return _rows("decoder", grid, scores)


def segment_ids(features, decoder, checkpoint, slices: SliceStore, ids: np.ndarray, cluster: Mapping[str, Any],
             seed: int) -> np.ndarray:
    """bool (N, H, W) masks of the slices ``ids`` clustered with one decoder (its checkpoint's prototypes)."""
    decoders = {"d": (decoder, prototypes_of(checkpoint))}
    out = np.zeros((len(ids), slices.image_size, slices.image_size), dtype=bool)
    row = {int(s): r for r, s in enumerate(ids)}
    for batch_ids, masks in segment_batches(features, decoders, slices, ids, cluster, seed):
        out[[row[int(s)] for s in batch_ids]] = masks["d"].astype(bool)
    return out


def choose_unlabelled(
    slices_path: str | os.PathLike,
    cdm: torch.nn.Module,
    decoder_path: str | os.PathLike,
    probs_path: str | os.PathLike,
    settings: Mapping[str, Any],
    tuned: Mapping[str, Any],
    device: torch.device,
    seed: int,
) -> list[dict[str, Any]]:
    """The CDM conditioning of unlabelled slices and the classifier gate, chosen on validation.

    ``settings``: ``features`` (timesteps, layers), ``with_image``, ``cluster`` (the config's, completed by the
    tuned ``k`` and ``assign`` of ``tuned``), ``choices`` (``conditioning``, ``gate`` grids).
    """
    cluster, grids = cluster_settings(settings["cluster"], tuned), settings["choices"]
    slices = SliceStore(slices_path)
    probs = MapStore(probs_path)
    ids = slices.indices(split="val", labels=[0, 1])
    gt = read_ground_truth(slices_path, ids).astype(bool)
    positive = slices.labels[ids] == 1
    decoder, checkpoint = load_decoder(decoder_path, device)
    masks = {}
    for conditioning in grids["conditioning"]:
        features = decoder_inputs(ComputedFeatures(cdm, slices, settings["features"], conditioning, seed, device, probs),
                                  slices, settings["with_image"])
        masks[conditioning] = segment_ids(features, decoder, checkpoint, slices, ids, cluster, seed)
    scores = [_mean_dice(masks[c][positive], gt[positive]) for c in grids["conditioning"]]
    rows = _rows("conditioning", grids["conditioning"], scores)
    best = masks[next(r for r in rows if r["chosen"])["value"]]
    p = probs.read("probs", ids)
    gate_scores = [_mean_dice(np.where((p >= g)[:, None, None], best, False), gt) for g in grids["gate"]]
    return rows + _rows("gate", grids["gate"], gate_scores)
