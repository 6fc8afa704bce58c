"""Train/val/test assignment by case (never by slice, so no patient is in two splits)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cldf.io.errors import DataError


def assign_splits(all_case_ids: Sequence[str], split_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Map every case id to ``'train'``, ``'val'`` or ``'test'``.

    When ``split_cfg["val_cases"]`` or ``split_cfg["test_cases"]`` is non-empty, those lists define val
    and test and every other case is train. Otherwise cases are drawn with ``numpy.random.default_rng(seed)``
    from the sorted ids: ``round(test_fraction * n)`` test cases (at least one when ``test_fraction > 0``),
    ``round(val_fraction * n)`` val cases, at least one train case kept. The result depends only on the set
    of ids and the config, not on their order.
    """
    ids = sorted(all_case_ids)
    if len(set(ids)) != len(ids):
        raise DataError("duplicate case ids in the dataset")
    val_cases = list(split_cfg.get("val_cases") or [])
    test_cases = list(split_cfg.get("test_cases") or [])
    if val_cases or test_cases:
        unknown = sorted(set(val_cases + test_cases) - set(ids))
        if unknown:
            raise DataError(f"config key split.val_cases/test_cases: unknown case(s) {unknown}")
        both = sorted(set(val_cases) & set(test_cases))
        if both:
            raise DataError(f"config key split: case(s) {both} listed in both val_cases and test_cases")
        split = {c: "train" for c in ids}
        split.update({c: "val" for c in val_cases})
        split.update({c: "test" for c in test_cases})
        return split

    n = len(ids)
    n_test = int(round(float(split_cfg["test_fraction"]) * n))
    if split_cfg["test_fraction"] > 0:
        n_test = max(n_test, 1)
    n_val = int(round(float(split_cfg["val_fraction"]) * n))
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    order = np.random.default_rng(int(split_cfg["seed"])).permutation(n)
    split = {}
    for rank, k in enumerate(order):
        split[ids[k]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split
