"""Choices given instead of made: a dataset without masks has no validation Dice to choose on.

Each choice is taken from another dataset's ``selection.csv`` (the dataset key ``selection_from``) or, without
one, it is the config's default (the first entry of its ``choices`` grid); the job log says which, choice by
choice. The rows have the columns of :mod:`cldf.evaluate.choose` (``choice, value, val_dice, chosen``) with
one row per choice, ``val_dice`` empty and ``chosen`` true, so every reader of the choices works unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import pandas as pd

from cldf.evaluate.choices import chosen, encode, read_selection
from cldf.evaluate.choose import decoder_settings
from cldf.segment.features import StoredFeatures
from cldf.segment.train import train_decoder

LOG = logging.getLogger("cldf.given")


def given_rows(choices: Mapping[str, Sequence[Any]], source: str | os.PathLike | None) -> list[dict[str, Any]]:
    """One chosen row per choice. ``choices``: ``{choice: (its name in the source, default)}``; ``source``: a
    ``selection.csv`` or None (every choice takes its default)."""
    frame = read_selection(source) if source else pd.DataFrame(columns=["choice", "value", "val_dice", "chosen"])
    rows = []
    for name, (source_name, default) in choices.items():
        try:
            value, origin = chosen(frame, source_name), f"{source_name} of {source}"
        except KeyError:
            value = default
            origin = f"the config's default (no {source_name} in {source})" if source else "the config's default"
        LOG.warning("no masks: choice %s = %s, from %s", name, encode(value), origin)
        rows.append({"choice": name, "value": encode(value), "val_dice": float("nan"), "chosen": True})
    return rows


def given_decoder(
    slices_path: str | os.PathLike,
    features: StoredFeatures,
    cam_path: str | os.PathLike,
    mg_path: str | os.PathLike,
    base: Mapping[str, Any],
    candidate: Mapping[str, Any],
    out: str | os.PathLike,
    seed: int,
    cap: int,
) -> dict[str, Any]:
    """Train CLDF's decoder with the given candidate (``quantile``, ``optimizer``, ``lr``, ``loss``; ``k`` and
    ``assign`` are read at clustering) and save it to ``out``; returns its training statistics."""
    _, checkpoint = train_decoder(slices_path, features, cam_path, mg_path, decoder_settings(base, candidate, "fused"),
                                  out, seed, cap)
    return checkpoint["stats"]

