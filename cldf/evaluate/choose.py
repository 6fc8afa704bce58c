"""CLDF's open choices, made on the validation split (never on test masks); rows as in
:mod:`cldf.evaluate.choices`, which also makes the choices of the thresholded maps.

* CLDF's decoder optimiser, learning rate and loss reduction, and the pixel-selection quantile under the
  quantile rule (:func:`tune_decoder`; positive validation slices, features conditioned on the labels);
* the CDM conditioning and the classifier gate of the unlabelled protocol (:func:`choose_unlabelled`; the
  conditioning by the Dice of positive validation slices, the gate by the mean Dice over positive and
  negative validation slices, an empty mask on an empty slice counting 1).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np
import torch

from cldf.config import decoder_candidates
from cldf.evaluate.choices import choice_rows, encode, mean_dice, val_positives
from cldf.models.checkpoint import save_checkpoint
from cldf.segment.cluster import finish_masks, segment_ids
from cldf.segment.components import keep_components
from cldf.segment.features import ComputedFeatures, StoredFeatures, decoder_inputs
from cldf.segment.train import load_decoder, train_decoder_epochs
from cldf.store import MapStore, SliceStore, read_ground_truth

LOG = logging.getLogger("cldf.choose")


def decoder_settings(base: Mapping[str, Any], candidate: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """Decoder training settings: the config's ``cldf`` selection and decoder, with a tuned candidate
    (``optimizer``, ``lr``, ``loss``, the ``feature_layers`` it reads and its ``epochs`` when tuned, and ``quantile``
    under the quantile rule) and the selection ``mode`` filled in."""
    selection = {**base["selection"], "mode": mode}
    if "quantile" in candidate:
        selection["quantile"] = float(candidate["quantile"])
    decoder = {**base["decoder"], **{k: candidate[k] for k in ("optimizer", "lr", "loss", "feature_layers", "epochs")
                                     if k in candidate}}
    return {"selection": selection, "decoder": decoder}


def cluster_settings(base: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict[str, Any]:
    """Clustering settings: the config's (``inside_body``) with a tuned candidate's ``k``, ``assign``,
    ``min_component`` (:func:`cldf.segment.components.keep_components`; 0, every component, when the
    candidate has none) and ``slice_vote`` (the radius of :func:`cldf.segment.context.vote_slices`; 0, no
    vote, when the candidate has none)."""
    return {**base, "k": int(candidate["k"]), "assign": candidate["assign"],
            "min_component": float(candidate.get("min_component", 0.0)),
            "slice_vote": int(candidate.get("slice_vote", 0))}


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
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Train CLDF's decoder for every candidate, cluster its validation slices every way of ``grids["cluster"]``,
    keep each clustering's components every way of ``grids["components"]`` and let neighbouring slices vote
    within each radius of ``grids["slice_vote"]`` (no K-means re-run), then fill the masks' holes when
    ``base["cluster"]["fill_holes"]`` is set (:func:`cldf.segment.cluster.finish_masks`); write the decoder of the
    best combination (validation Dice) to ``out``.

    The candidates are the optimiser (and quantile) grid, reading the first entry of
    ``grids["feature_layers"]``; then the best of them reads each other entry (one decoder more per entry,
    not one per combination); then the best of all is also scored after each count of ``grids["epochs"]``
    (no decoder more: every candidate trains for the most epochs of ``base["decoder"]["epochs"]`` and that grid,
    is scored after ``base["decoder"]["epochs"]`` and keeps its weights after each other count).
    ``features`` holds every tapped layer (:class:`StoredFeatures`, maybe with the image channels); a decoder
    reads its own layers' channels. Up to ``workers`` candidates train at once, each in one thread of its own,
    so the rows and the decoder do not depend on ``workers``.
    """
    slices = SliceStore(slices_path)
    ids, gt, _ = val_positives(slices, slices_path)
    where = slices.case_index[ids], slices.slice_index[ids]
    first = int(base["decoder"]["epochs"])
    counts = sorted({first, *(int(c) for c in grids.get("epochs", []))})

    def score(candidate: dict[str, Any], decoder, checkpoint) -> Scored:
        rows = []
        for clustering in grids["cluster"]:
            unfilled = {**cluster_settings(base["cluster"], clustering), "fill_holes": False}
            every = segment_ids(features, decoder, checkpoint, slices, ids, unfilled, seed)
            for fraction in grids["components"]:
                kept = keep_components(every, float(fraction))
                for radius in grids["slice_vote"]:
                    rows.append(({**candidate, **clustering, "min_component": fraction, "slice_vote": radius},
                                 mean_dice(finish_masks(kept, *where, {**base["cluster"], "slice_vote": radius}), gt)))
        return candidate, checkpoint, rows

    def evaluate(candidate: dict[str, Any]) -> tuple[Scored, dict[int, Any]]:
        built = train_decoder_epochs(slices_path, features, cam_path, mg_path,
                                     decoder_settings(base, candidate, "fused"), seed, cap, counts)
        return score({**candidate, "epochs": first}, *built[first]()), built

    def rescore(count: int) -> Scored:
        return score({**results[top][0], "epochs": count}, *trained[top][count]())

    layer_sets = [list(layers) for layers in grids.get("feature_layers", [])]
    reads = {"feature_layers": layer_sets[0]} if layer_sets else {}
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        done = list(pool.map(evaluate, [{**c, **reads} for c in decoder_candidates(grids, base["selection"]["threshold"])]))
        best = done[_best([r for r, _ in done])][0][0]
        done += list(pool.map(evaluate, [{**best, "feature_layers": layers} for layers in layer_sets[1:]]))
        results, trained = [r for r, _ in done], [t for _, t in done]
        top = _best(results)
        results += list(pool.map(rescore, [c for c in counts if c != first]))
    grid = [entry for _, _, rows in results for entry, _ in rows]
    scores = [score for _, _, rows in results for _, score in rows]
    for entry, value in zip(grid, scores):
        LOG.info("decoder candidate %s: validation Dice %.4f", encode(entry), value)
    save_checkpoint(out, results[_best(results)][1])
    return choice_rows("decoder", grid, scores)


Scored = tuple[dict[str, Any], dict[str, Any], list[tuple[dict[str, Any], float]]]
"""A candidate, its decoder's checkpoint and its rows (each clustering's candidate and validation Dice)."""


def _best(results: list[Scored]) -> int:
    """Index of the :data:`Scored` holding the best validation Dice of its rows (the first
    on ties; the first when none is finite)."""
    top = [max((s if np.isfinite(s) else -np.inf for _, s in rows), default=-np.inf) for _, _, rows in results]
    return int(np.argmax(top))


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

    ``settings``: ``features`` (timesteps, layers), ``with_image``, ``image_context``, ``cluster`` (the config's,
    completed by the tuned ``k`` and ``assign`` of ``tuned``), ``choices`` (``conditioning``, ``gate`` grids).
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
                                  slices, settings)
        masks[conditioning] = segment_ids(features, decoder, checkpoint, slices, ids, cluster, seed)
    scores = [mean_dice(masks[c][positive], gt[positive]) for c in grids["conditioning"]]
    rows = choice_rows("conditioning", grids["conditioning"], scores)
    best = masks[next(r for r in rows if r["chosen"])["value"]]
    p = probs.read("probs", ids)
    gate_scores = [mean_dice(np.where((p >= g)[:, None, None], best, False), gt) for g in grids["gate"]]
    return rows + choice_rows("gate", grids["gate"], gate_scores)
