"""Training data for the models: slices of the slice store, class-balanced, seeded and resumable.

Only the fully supervised UNet (``with_masks=True``) reads ground-truth masks, through
:func:`cldf.store.read_ground_truth`; the CDM and the classifiers see images and image-level labels.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cldf import store

CACHE_LIMIT_BYTES = 2 * 1024**3
"""Training sets whose images (float16) are smaller than this are read into RAM once."""
MAX_VAL_SLICES = 1024
HELD_OUT_FRACTION = 0.1


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed derived from (seed, step, rank): all randomness of one training step comes from it."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SliceDataset(Dataset):
    """Rows ``rows`` of a slice store.

    Item ``i``: ``{"image": float32 (C, H, W) in [-1, 1], "label": int64 (), "row": int64 ()}`` plus
    ``"mask": float32 (1, H, W)`` (ground truth, 0/1) when ``with_masks``. Images (and masks) are
    cached in RAM as float16/uint8 when they fit in ``cache_limit_bytes``; otherwise each item reads
    its own chunk (one slice) from the store.
    """

    def __init__(
        self,
        slices_path: str | os.PathLike,
        rows: np.ndarray,
        with_masks: bool = False,
        cache_limit_bytes: int = CACHE_LIMIT_BYTES,
    ) -> None:
        self.slices_path = slices_path
        self.store = store.SliceStore(slices_path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = self.store.labels[self.rows].astype(np.int64)
        self.with_masks = with_masks
        size = self.store.image_size
        image_bytes = len(self.rows) * self.store.channels * size * size * 2
        self.cached = image_bytes < cache_limit_bytes
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        if self.cached:
            chunks = [self.store.images(part).astype(np.float16) for part in _chunks(self.rows, 256)]
            self._images = np.concatenate(chunks) if chunks else np.zeros((0, self.store.channels, size, size), np.float16)
            if with_masks:
                self._masks = store.read_ground_truth(slices_path, self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        if self._images is not None:
            image = self._images[i].astype(np.float32)
        else:
            image = self.store.images([row])[0]
        item = {
            "image": torch.from_numpy(image),
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "row": torch.tensor(row, dtype=torch.int64),
        }
        if self.with_masks:
            mask = self._masks[i] if self._masks is not None else store.read_ground_truth(self.slices_path, [row])[0]
            item["mask"] = torch.from_numpy((mask > 0).astype(np.float32))[None]
        return item


def _chunks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


class BalancedBatchSampler(Sampler[list[int]]):
    """Yields, for steps ``start_step … steps-1``, this rank's share of a class-balanced global batch.

    The global batch of ``batch_size`` dataset indices at step ``s`` depends only on ``(seed, s)``:
    each element picks group 0 or 1 with probability ½, then a uniformly random member of that group
    (with replacement), so rare positives are seen as often as negatives. Rank ``r`` of ``world_size``
    gets elements ``r::world_size``. Restarting at ``start_step`` reproduces the remaining batches
    exactly, which is what makes resumed training identical to an uninterrupted run.
    A group with no members is skipped (sampling is then uniform over the other group).
    """

    def __init__(
        self,
        groups: np.ndarray,
        batch_size: int,
        seed: int,
        steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        groups = np.asarray(groups)
        self.members = [np.flatnonzero(groups == g) for g in (0, 1)]
        self.members = [m for m in self.members if len(m)]
        if not self.members:
            raise ValueError("BalancedBatchSampler: no training slices")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the number of processes {world_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.steps = steps
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)

    def global_batch(self, step: int) -> np.ndarray:
        """Dataset indices of the whole (all ranks) batch of ``step``: int64 (batch_size,)."""
        rng = np.random.default_rng([self.seed, step, 7])
        which = rng.integers(0, len(self.members), size=self.batch_size)
        return np.asarray([m[rng.integers(0, len(m))] for m in (self.members[w] for w in which)], dtype=np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            yield self.global_batch(step)[self.rank :: self.world_size].tolist()


def split_rows(
    slice_store: store.SliceStore, labels: tuple[int, ...] | None, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and validation rows of a slice store: ``(train (M,), val (V,), val_source)``.

    ``labels`` restricts both to those slice labels (``(0, 1)`` for the weakly supervised models,
    ``None`` = all). Validation is the ``val`` split (at most :data:`MAX_VAL_SLICES` slices, seeded);
    when it is empty, :data:`HELD_OUT_FRACTION` of the training *cases* are held out instead (whole
    cases, so no slice of a validation case is trained on), and ``val_source`` says so.
    """
    train = slice_store.indices("train", labels=labels)
    val = slice_store.indices("val", labels=labels)
    source = "val split"
    if len(val) == 0:
        cases = np.unique(slice_store.case_index[train])
        if len(cases) < 2:
            raise ValueError(
                f"{slice_store.path}: the val split is empty and the training split has {len(cases)} case(s); "
                "cannot hold out validation cases"
            )
        n_hold = max(1, math.ceil(HELD_OUT_FRACTION * len(cases)))
        held = np.random.default_rng([seed, 11]).choice(cases, size=n_hold, replace=False)
        is_held = np.isin(slice_store.case_index[train], held)
        val, train = train[is_held], train[~is_held]
        source = f"held-out training cases {sorted(int(c) for c in held)} (val split empty)"
    if len(val) > MAX_VAL_SLICES:
        val = np.sort(np.random.default_rng([seed, 13]).choice(val, size=MAX_VAL_SLICES, replace=False))
    return train, val, source
