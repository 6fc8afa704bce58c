"""Helpers shared by the map computations: per-slice normalisation, fixed per-slice noise, layer lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn


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


def normalise_per_slice(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of ``maps`` (B, H, W) to [0, 1]; a constant map becomes zeros.

    Returns float32 (B, H, W) on the device of ``maps``.
    """
    flat = maps.float().reshape(maps.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


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


def named_layers(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The sub-modules of ``model`` called ``names``; raise ``ValueError`` listing the valid names otherwise."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        top = [n for n in modules if n and n.count(".") <= 1]
        raise ValueError(
            f"unknown layer name(s) {missing} in {type(model).__name__}; valid names include: {', '.join(top)}"
        )
    return [modules[n] for n in names]


def noised_batch(
    scheduler, images: torch.Tensor, timesteps: Sequence[int], noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``images`` (B, C, H, W) at every timestep at once.

    ``noise`` is (T, B, C, H, W). Returns ``x_t`` (T*B, C, H, W), timestep-major (rows ``i*B:(i+1)*B`` are
    timestep ``timesteps[i]``), and the matching long timesteps (T*B,).
    """
    n_t, b = len(timesteps), images.shape[0]
    if noise.shape != (n_t, *images.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(n_t, *images.shape)}")
    t = torch.as_tensor(list(timesteps), dtype=torch.long, device=images.device).repeat_interleave(b)
    x0 = images.unsqueeze(0).expand(n_t, *images.shape).reshape(n_t * b, *images.shape[1:])
    x_t = scheduler.add_noise(x0, noise.to(images.device).reshape(n_t * b, *images.shape[1:]), t)
    return x_t, t
