"""Mean-gradient maps (step 5): input gradients of the noisy classifier's positive log-probability."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cldf.maps.common import Batch, feature_noise
from cldf.models.tensors import noised_batch, normalise_per_slice
from cldf.models.builders import build_scheduler

REDUCTIONS = ("mean_abs", "max_abs", "l2")


def reduce_channels(grad: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce gradients (N, C, H, W) over channels to (N, H, W) by ``mean_abs``, ``max_abs`` or ``l2``."""
    if reduce == "mean_abs":
        return grad.abs().mean(dim=1)
    if reduce == "max_abs":
        return grad.abs().amax(dim=1)
    if reduce == "l2":
        return grad.pow(2).sum(dim=1).sqrt()
    raise ValueError(f"unknown channel reduction {reduce!r}; expected one of {REDUCTIONS}")


def mean_gradient(
    classifier: nn.Module,
    scheduler,
    images: torch.Tensor,
    timesteps: Sequence[int],
    reduce: str,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean-gradient map: ``g_t = d log p(y=1 | x_t, t) / d x_t``, reduced over channels, averaged over t.

    All timesteps go through one forward and one backward pass of batch T*B; samples are independent, so
    the gradient of the summed log-probabilities is the per-sample gradient. Model parameters receive no
    gradient.

    Parameters
    ----------
    classifier
        Noisy classifier ``classifier(x_t, timesteps=t) -> logits (N, 2)``.
    scheduler
        DDPM scheduler providing ``add_noise``.
    images
        float32 (B, C, H, W) in [-1, 1].
    timesteps
        T noise levels.
    reduce
        Channel reduction: ``mean_abs`` | ``max_abs`` | ``l2``.
    noise
        float32 (T, B, C, H, W).

    Returns
    -------
    float32 (B, H, W) in [0, 1], min-max normalised per slice.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown channel reduction {reduce!r}; expected one of {REDUCTIONS}")
    b, n_t = images.shape[0], len(timesteps)
    with torch.enable_grad():
        x_t, t = noised_batch(scheduler, images.detach(), timesteps, noise)
        x_t = x_t.detach().requires_grad_(True)
        log_p = F.log_softmax(classifier(x_t, timesteps=t).float(), dim=1)[:, 1]
        (grad,) = torch.autograd.grad(log_p.sum(), x_t)
    maps = reduce_channels(grad.detach(), reduce).reshape(n_t, b, *images.shape[2:]).mean(0)
    return normalise_per_slice(maps)


def gradient_map(classifier: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered map ``mean_gradient``: ``maps`` (B, H, W) in [0, 1].

    ``settings``: ``timesteps``, ``reduce``. The noise of each slice comes from ``(seed, slice id)``.
    """
    timesteps = [int(t) for t in settings["timesteps"]]
    noise = feature_noise(batch.slice_ids, len(timesteps), tuple(batch.images.shape[1:]), batch.seed)
    return {"maps": mean_gradient(classifier, build_scheduler(), batch.images, timesteps, settings["reduce"], noise)}
