"""Tensor helpers shared by the networks (``cldf.models``) and the maps (``cldf.maps``): per-slice
normalisation, layer lookup by name, noising a batch at several timesteps."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

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
