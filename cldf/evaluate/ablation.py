"""The lever table (``ablation.csv``): CLDF with one thing changed at a time, validation and test Dice.

Each lever is a set of overrides of CLDF's settings as chosen on validation (the decoder, the pixel
selection, the clustering, the features the decoder sees): ``{"decoder": {"with_image": true}}``,
``{"features": {"timesteps": [1, 10]}}``; or ``{"seed": 1}``, the same settings with another seed for the
decoder and K-means, which shows how far chance alone moves the scores; or ``{"vote": 3}``, the pixel-wise
majority of the masks of decoders trained with seeds s, s+1, s+2 (s the run's seed, or the lever's ``seed``),
which asks whether averaging over chance pays. For every lever the decoder is retrained on the training
slices, and the validation and test slices are segmented under the labelled protocol; a row holds what
changed, the validation Dice (positive validation slices) and the test Dice (positive test slices) with
its 95 % bootstrap interval over cases. Levers are chosen by their validation Dice; the test column is
reported, never used to choose.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cldf.config import deep_merge
from cldf.evaluate.choose import cluster_settings, decoder_settings
from cldf.evaluate.metrics import dice_scores
from cldf.evaluate.table import bootstrap_indices, write_csv
from cldf.segment.cluster import segment_ids
from cldf.segment.features import ComputedFeatures, StoredFeatures, decoder_inputs
from cldf.segment.selftrain import self_train
from cldf.segment.train import train_decoder
from cldf.store import SliceStore, TestTruth, read_ground_truth

LOG = logging.getLogger("cldf.ablation")
RUN_KEYS = ("seed", "vote", "self_train")   # lever keys that say how to train, not which settings
COLUMNS = ("lever", "changed", "val_dice", "test_dice", "test_ci_low", "test_ci_high", "n_cases")


class CachedFeatures:
    """A feature source computed once for a set of slices and then served from memory (float16)."""

    def __init__(self, source: StoredFeatures | ComputedFeatures | Any, ids: np.ndarray, batch_size: int = 8) -> None:
        self.dim, self.device, self.channel_groups = source.dim, source.device, source.channel_groups
        self._cache = {int(i): f.half() for batch, feats in source.batches(ids, batch_size) for i, f in zip(batch, feats)}
        self.held_ids = np.asarray(sorted(self._cache), dtype=np.int64)

    def batches(self, slice_ids: Sequence[int] | np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        slice_ids = np.asarray(slice_ids, dtype=np.int64)
        for start in range(0, len(slice_ids), batch_size):
            ids = slice_ids[start : start + batch_size]
            yield ids, torch.stack([self._cache[int(i)] for i in ids]).float()


def _case_interval(dice: np.ndarray, cases: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float]:
    names = sorted(set(cases))
    sums = np.asarray([dice[cases == c].sum() for c in names])
    counts = np.asarray([(cases == c).sum() for c in names], dtype=np.float64)
    resamples = bootstrap_indices(len(names), n_resamples, seed)
    boot = sums[resamples].sum(1) / np.maximum(counts[resamples].sum(1), 1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(low), float(high)


class Ablation:
    """What every lever shares: the slices, the chosen settings, the trained CDM, the data to score on."""

    def __init__(self, slices_path: str | os.PathLike, truth_path: str | os.PathLike, features_path: str | os.PathLike,
                 networks: Mapping[str, torch.nn.Module], maps: Mapping[str, str | os.PathLike], base: Mapping[str, Any],
                 device: torch.device, seed: int) -> None:
        """``networks``: the trained networks features may come from (``cdm``, and for the feature-source
        levers ``noisy_classifier`` and ``cam_classifier``); ``maps``: the ``cam`` and ``mg`` stores."""
        self.slices_path, self.slices = slices_path, SliceStore(slices_path)
        self.features_path, self.networks, self.maps, self.base = features_path, networks, maps, base
        self.device, self.seed = device, int(seed)
        self.val = self.slices.indices(split="val", labels=[1])
        self.val_gt = read_ground_truth(slices_path, self.val).astype(bool)
        truth = TestTruth(truth_path)
        self.test = truth.slice_ids[truth.labels == 1]
        self.test_gt = truth.masks(self.test)
        self.test_cases = np.asarray([self.slices.cases[int(c)]["id"] for c in self.slices.case_index[self.test]])
        self._test_features: dict[str, CachedFeatures] = {}

    def _sources(self, settings: Mapping[str, Any]) -> tuple[Any, Any]:
        """Training/validation and test feature sources under ``settings`` (features computed on the fly
        when the lever changes them, the test slices' once per feature setting)."""
        features, decoder = settings["features"], settings["decoder"]
        key = json.dumps(features, sort_keys=True)
        network = self.networks[features.get("source", "cdm")]
        if features == self.base["features"]:
            train = StoredFeatures(self.features_path, self.slices.image_size, self.device)
        else:
            source = ComputedFeatures(network, self.slices, features, "label", self.seed, self.device)
            train = CachedFeatures(source, np.union1d(self.slices.indices(split="train", labels=[0, 1]), self.val))
        if key not in self._test_features:
            source = ComputedFeatures(network, self.slices, features, "label", self.seed, self.device)
            self._test_features[key] = CachedFeatures(source, self.test)
        return (decoder_inputs(train, self.slices, decoder), decoder_inputs(self._test_features[key], self.slices, decoder))

    def masks(self, overrides: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """CLDF's masks under ``overrides``: bool (N_val, H, W) of the positive validation slices and bool
        (N_test, H, W) of the positive test slices. An override ``seed`` seeds the decoder's training and
        K-means instead of the run's seed (the features keep the run's); ``vote: n`` trains n decoders (seeds
        seed .. seed+n-1) and keeps the pixels most of their masks hold (:func:`majority`)."""
        seed, votes = int(overrides.get("seed", self.seed)), int(overrides.get("vote", 1))
        rounds = int(overrides.get("self_train", 0))
        settings = lever_settings(self.base, {k: v for k, v in overrides.items() if k not in RUN_KEYS})
        train, test = self._sources(settings)
        decoder_cfg = {"selection": settings["selection"], "decoder": settings["decoder"]}
        val_masks, test_masks = [], []
        for s in range(seed, seed + votes):
            decoder, checkpoint = train_decoder(self.slices_path, train, self.maps["cam"], self.maps["mg"],
                                                decoder_cfg, None, s, int(settings["max_train_slices"]))
            decoder, checkpoint = self_train(self.slices_path, train, self.maps["cam"], self.maps["mg"], decoder_cfg,
                                             settings["cluster"], decoder, checkpoint, rounds, s,
                                             int(settings["max_train_slices"]))
            val_masks.append(segment_ids(train, decoder, checkpoint, self.slices, self.val, settings["cluster"], s))
            test_masks.append(segment_ids(test, decoder, checkpoint, self.slices, self.test, settings["cluster"], s))
        return majority(val_masks), majority(test_masks)

    def score(self, name: str, overrides: Mapping[str, Any], n_resamples: int) -> dict[str, Any]:
        """Retrain CLDF's decoder with ``overrides`` (:meth:`masks`) and score it on validation and test:
        the seed and vote levers show what the same settings score when only chance differs, and whether
        averaging over chance pays (the bootstrap keeps the run's seed)."""
        val_masks, test_masks = self.masks(overrides)
        val = float(dice_scores(val_masks, self.val_gt).mean()) if len(self.val) else float("nan")
        dice = dice_scores(test_masks, self.test_gt)
        low, high = _case_interval(dice, self.test_cases, n_resamples, self.seed)
        LOG.info("lever %s: validation Dice %.4f, test Dice %.4f", name, val, dice.mean())
        return {"lever": name, "changed": json.dumps(overrides, sort_keys=True), "val_dice": val,
                "test_dice": float(dice.mean()), "test_ci_low": low, "test_ci_high": high,
                "n_cases": len(set(self.test_cases))}


def majority(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Pixel-wise majority of ``masks`` (each (N, H, W) bool): a pixel is kept when more than half of
    them hold it (a tie, with an even count, drops it). One mask is returned as it is."""
    if len(masks) == 1:
        return masks[0]
    return np.stack(masks).sum(0) * 2 > len(masks)


def lever_settings(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """CLDF's chosen settings ``base`` with one lever's ``overrides``. A lever that taps other layers or
    another network (``features.layers`` or ``features.source``) has the decoder read every layer it taps,
    not the layer set chosen for the stored features, unless it also sets ``decoder.feature_layers``."""
    settings = deep_merge(base, overrides)
    if overrides.get("features", {}).keys() & {"layers", "source"} and "feature_layers" not in overrides.get("decoder", {}):
        settings["decoder"] = {k: v for k, v in settings["decoder"].items() if k != "feature_layers"}
    return settings


def chosen_settings(config_cldf: Mapping[str, Any], tuned: Mapping[str, Any], features: Mapping[str, Any],
                    max_train_slices: int) -> dict[str, Any]:
    """CLDF's settings as chosen on validation: the base every lever changes."""
    trained = decoder_settings(config_cldf, tuned, "fused")
    return {**trained, "cluster": cluster_settings(config_cldf["cluster"], tuned),
            "features": {k: features[k] for k in ("timesteps", "layers")}, "max_train_slices": max_train_slices}


def run_ablation(ablation: Ablation, levers: Mapping[str, Mapping[str, Any]], out: str | os.PathLike,
                 n_resamples: int) -> pd.DataFrame:
    """Score the chosen configuration and every lever; write ``ablation.csv`` (:data:`COLUMNS`)."""
    rows = [ablation.score("chosen on validation", {}, n_resamples)]
    rows += [ablation.score(name, overrides, n_resamples) for name, overrides in levers.items()]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    write_csv(frame, out)
    return frame
