"""Diffusion features (step 4): decoder activations of the frozen CDM, averaged over noise levels."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cldf.maps.common import Batch, feature_noise
from cldf.models.tensors import named_layers, noised_batch
from cldf.models.builders import build_scheduler


def extract_features(
    cdm: nn.Module,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    timesteps: Sequence[int],
    layers: Sequence[str],
    noise: torch.Tensor,
) -> list[torch.Tensor]:
    """Activations of the CDM decoder layers ``layers``, averaged over ``timesteps``.

    For every t, ``x_t = add_noise(images, noise[i], t)``; all timesteps go through the CDM in one
    forward pass of batch T*B, conditioned on ``labels``.

    Parameters
    ----------
    cdm
        Class-conditional DiffusionModelUNet, called ``cdm(x_t, timesteps=t, class_labels=y)``.
    scheduler
        DDPM scheduler providing ``add_noise``.
    images
        float32 (B, C, H, W) in [-1, 1].
    labels
        long (B,) class labels used for conditioning (0 negative, 1 positive, 2 null).
    timesteps
        T noise levels.
    layers
        Module names (``named_modules``) of the tapped layers, e.g. ``up_blocks.0``.
    noise
        float32 (T, B, C, H, W), e.g. from :func:`cldf.maps.common.feature_noise`.

    Returns
    -------
    One float32 tensor (B, C_k, h_k, w_k) per layer, at the layer's native resolution.
    """
    b, n_t = images.shape[0], len(timesteps)
    x_t, t = noised_batch(scheduler, images, timesteps, noise)
    y = labels.to(images.device, torch.long).repeat(n_t)
    captured = _capture(cdm, layers, lambda: cdm(x_t, timesteps=t, class_labels=y))
    return [c.float().reshape(n_t, b, *c.shape[1:]).mean(0) for c in captured]


def _capture(model: nn.Module, layers: Sequence[str], forward: Callable[[], Any]) -> list[torch.Tensor]:
    """Outputs of ``layers`` of ``model`` during ``forward()`` (no gradient; float16 autocast on CUDA only,
    the features are stored as float16 anyway); the hooks are removed afterwards."""
    modules = named_layers(model, layers)
    captured: dict[int, torch.Tensor] = {}

    def hook(k: int):
        def _store(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
            if isinstance(output, tuple):  # MONAI's encoder blocks return (hidden states, residuals)
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {layers[k]!r} returns {type(output).__name__}, not a tensor")
            captured[k] = output

        return _store

    handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(modules)]
    on_cuda = next(model.parameters()).device.type == "cuda"
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=on_cuda):
            forward()
    finally:
        for h in handles:
            h.remove()
    return [captured[k] for k in range(len(layers))]


def encoder_features(model: nn.Module, scheduler, images: torch.Tensor, timesteps: Sequence[int],
                     layers: Sequence[str], noise: torch.Tensor) -> list[torch.Tensor]:
    """Activations of the noisy classifier's encoder layers ``layers``, averaged over ``timesteps``
    (it has no class input): one float32 (B, C_k, h_k, w_k) per layer. ``noise`` (T, B, C, H, W)."""
    b, n_t = images.shape[0], len(timesteps)
    x_t, t = noised_batch(scheduler, images, timesteps, noise)
    captured = _capture(model, layers, lambda: model(x_t, timesteps=t))
    return [c.float().reshape(n_t, b, *c.shape[1:]).mean(0) for c in captured]


def classifier_features(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    """Activations of the CAM classifier's layers ``layers`` on the clean images: float32 (B, C_k, h_k, w_k)."""
    return [c.float() for c in _capture(model, layers, lambda: model(images))]


NULL_CONDITION = 2
"""Class index of the CDM's null (unconditional) embedding."""


def conditioning_labels(slice_labels: np.ndarray) -> torch.Tensor:
    """CDM class of each slice from its image-level label (1 / -1 -> 1, 0 -> 0): long (B,).

    An ambiguous slice (-1) holds the target, only below the positivity fraction, so it is conditioned
    on the positive class.
    """
    return torch.from_numpy((np.asarray(slice_labels) != 0).astype(np.int64))


def diffusion_features(
    model: nn.Module, images: torch.Tensor, classes: torch.Tensor, slice_ids: np.ndarray, seed: int,
    settings: Mapping[str, Any],
) -> list[torch.Tensor]:
    """The features of a batch from the network of ``settings["source"]`` (default the CDM, under the given
    classes): one (B, C_k, h_k, w_k) per tapped layer.

    ``images`` float32 (B, C, H, W) in [-1, 1]; ``classes`` long (B,) (0, 1, or 2 = null; the CDM only);
    ``settings``: ``timesteps``, ``layers``, optional ``source`` (:data:`cldf.registry.FEATURE_SOURCES`). The noise of each
    slice comes from ``(seed, slice id)`` (:func:`cldf.maps.common.feature_noise`), so a slice's features do
    not depend on its batch.
    """
    source, layers = settings.get("source", "cdm"), list(settings["layers"])
    if source == "cam_classifier":
        return classifier_features(model, images, layers)
    timesteps = [int(t) for t in settings["timesteps"]]
    noise = feature_noise(slice_ids, len(timesteps), tuple(images.shape[1:]), seed)
    if source == "noisy_classifier":
        return encoder_features(model, build_scheduler(), images, timesteps, layers, noise)
    return extract_features(model, build_scheduler(), images, classes.to(images.device), timesteps, layers, noise)


def features_map(cdm: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered map ``features``: ``layer_k`` (B, C_k, h_k, w_k) per tapped layer, at native resolution,
    conditioned on each slice's image-level label (the decoder's training and validation slices)."""
    feats = diffusion_features(cdm, batch.images, conditioning_labels(batch.labels), batch.slice_ids, batch.seed,
                               settings)
    return {f"layer_{k}": f for k, f in enumerate(feats)}
