"""Train/val/test assignment by case (never by slice, so no patient is in two splits)."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from cldf.io.errors import DataError
from cldf.store import SliceStore

LOG = logging.getLogger("cldf.data")


def _listed(split_cfg: Mapping[str, Any], key: str, ids: Sequence[str], skipped: Mapping[str, str]) -> list[str]:
    """The cases listed under ``split_cfg[key]`` that were kept; listed cases that were skipped are logged."""
    listed = list(split_cfg.get(key) or [])
    unknown = sorted(set(listed) - set(ids) - set(skipped))
    if unknown:
        raise DataError(f"config key split.{key}: unknown case(s) {unknown}")
    for case in sorted(set(listed) & set(skipped)):
        LOG.warning("case %s of split.%s was skipped: %s", case, key, skipped[case])
    return [c for c in listed if c in set(ids)]


def _requested(split_cfg: Mapping[str, Any]) -> dict[str, bool]:
    """Which splits the config asks for: train always, val/test by a fraction above 0 or listed cases."""
    listed = bool(split_cfg.get("val_cases") or split_cfg.get("test_cases"))
    return {
        "train": True,
        "val": bool(split_cfg.get("val_cases")) if listed else float(split_cfg["val_fraction"]) > 0,
        "test": bool(split_cfg.get("test_cases")) if listed else float(split_cfg["test_fraction"]) > 0,
    }


def _check_not_empty(split: Mapping[str, str], split_cfg: Mapping[str, Any], skipped: Mapping[str, str]) -> None:
    for name, asked in _requested(split_cfg).items():
        if asked and name not in split.values():
            reasons = "; ".join(f"{case}: {why}" for case, why in sorted(skipped.items())) or "none"
            raise DataError(
                f"split {name!r} is empty: {len(split)} case(s) kept, {len(skipped)} skipped ({reasons})"
            )


def assign_splits(
    all_case_ids: Sequence[str], split_cfg: Mapping[str, Any], skipped: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Map every kept case id to ``'train'``, ``'val'`` or ``'test'``.

    ``all_case_ids`` are the kept cases; ``skipped`` maps the cases left out (bad input) to the reason.
    When ``split_cfg["val_cases"]`` or ``split_cfg["test_cases"]`` is non-empty, those lists (minus skipped
    cases) define val and test and every other case is train. Otherwise cases are drawn with
    ``numpy.random.default_rng(seed)`` from the sorted ids: ``round(test_fraction * n)`` test cases (at least
    one when ``test_fraction > 0``), ``round(val_fraction * n)`` val cases (at least one when ``val_fraction > 0``), at least one train case kept.
    The result depends only on the set of ids and the config, not on their order. A split the config asks
    for (a fraction above 0, or listed cases) that ends up empty is a :class:`DataError` naming it and the
    skipped cases.
    """
    skipped = dict(skipped or {})
    ids = sorted(all_case_ids)
    if len(set(ids)) != len(ids):
        raise DataError("duplicate case ids in the dataset")
    if split_cfg.get("val_cases") or split_cfg.get("test_cases"):
        val_cases = _listed(split_cfg, "val_cases", ids, skipped)
        test_cases = _listed(split_cfg, "test_cases", ids, skipped)
        both = sorted(set(val_cases) & set(test_cases))
        if both:
            raise DataError(f"config key split: case(s) {both} listed in both val_cases and test_cases")
        split = {c: "train" for c in ids}
        split.update({c: "val" for c in val_cases})
        split.update({c: "test" for c in test_cases})
    else:
        split = _random_split(ids, split_cfg)
    _check_not_empty(split, split_cfg, skipped)
    return split


def _random_split(ids: Sequence[str], split_cfg: Mapping[str, Any]) -> dict[str, str]:
    n = len(ids)
    n_test = int(round(float(split_cfg["test_fraction"]) * n))
    if split_cfg["test_fraction"] > 0:
        n_test = max(n_test, 1)
    n_val = int(round(float(split_cfg["val_fraction"]) * n))
    if split_cfg["val_fraction"] > 0:
        n_val = max(n_val, 1)
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    order = np.random.default_rng(int(split_cfg["seed"])).permutation(n)
    split = {}
    for rank, k in enumerate(order):
        split[ids[k]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def training_rows(slices: SliceStore, cap: int, seed: int) -> np.ndarray:
    """The pixel decoder's training slices: training split, label 0 or 1; a seeded sample of ``cap`` when more."""
    ids = slices.indices(split="train", labels=[0, 1])
    if len(ids) > cap:
        ids = np.sort(np.random.default_rng([seed, 17]).choice(ids, size=cap, replace=False))
    return ids


def feature_rows(slices: SliceStore, cap: int, seed: int) -> np.ndarray:
    """Slices whose diffusion features are cached: the decoder's training slices and the validation slices
    labelled 0 or 1 (on which its settings are chosen); every other slice's features are computed on the fly."""
    return np.union1d(training_rows(slices, cap, seed), slices.indices(split="val", labels=[0, 1]))
