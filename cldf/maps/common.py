"""Helpers shared by the map computations: the batch a map function sees, fixed per-slice noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class Batch:
    """What a map function sees of a batch of slices (never the ground truth).

    ``images`` float32 (B, C, H, W) in [-1, 1] on the compute device; ``labels`` int8 (B,) image-level
    labels (1 positive, 0 negative, -1 ambiguous); ``slice_ids`` int64 (B,) global slice ids (they seed the
    per-slice noise); ``seed`` the run seed.
    """

    images: torch.Tensor
    labels: np.ndarray
    slice_ids: np.ndarray
    seed: int


def feature_noise(
    slice_ids: Sequence[int] | np.ndarray, n_timesteps: int, shape: Sequence[int], seed: int
) -> torch.Tensor:
    """Fixed Gaussian noise per slice, derived from ``(seed, slice_id)`` only.

    The noise of a slice therefore does not depend on the batch or shard it is computed in.

    Parameters
    ----------
    slice_ids
        Global slice ids (B,).
    n_timesteps
        T, the number of noise draws per slice (one per timestep).
    shape
        (C, H, W) of one image.
    seed
        The run seed.

    Returns
    -------
    float32 CPU tensor (T, B, C, H, W).
    """
    draws = []
    for sid in np.asarray(slice_ids, dtype=np.int64).tolist():
        state = np.random.SeedSequence([int(seed), int(sid)]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        draws.append(torch.randn((n_timesteps, *shape), generator=gen, dtype=torch.float32))
    if not draws:
        return torch.zeros((n_timesteps, 0, *shape), dtype=torch.float32)
    return torch.stack(draws, dim=1)
