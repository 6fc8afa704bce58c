"""Class activation maps (step 6) of the CAM classifier, always for the positive class (index 1).

Activations are captured with forward hooks whose handles are removed after every call, and gradients
are taken with ``torch.autograd.grad`` with respect to those activations only, so no hook is left on the
model and no parameter accumulates a gradient. (MONAI's ``ModelWithHooks`` registers hooks it never
removes and back-propagates into the parameters, which is why it is not used here.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cldf.maps.common import Batch
from cldf.maps.layers import candidate_layers
from cldf.models.tensors import named_layers, normalise_per_slice

POSITIVE = 1
SCORECAM_CHUNK = 128
BACKGROUND_VALUE = -1.0


@contextmanager
def capture_activations(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Context in which each forward of ``model`` stores the outputs of ``layers`` in the yielded dict."""
    acts: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def _store(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            acts[name] = output

        return _store

    handles = [m.register_forward_hook(hook(n)) for n, m in zip(layers, named_layers(model, layers))]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def _upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) maps to (B, H, W)."""
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def _activations_and_grads(
    model: nn.Module, images: torch.Tensor, layers: Sequence[str]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Activations and gradients of the positive logit for each layer (B, C_k, h_k, w_k).

    The input is made to require grad so that the graph exists even when every parameter is frozen.
    """
    with torch.enable_grad(), capture_activations(model, layers) as acts:
        logits = model(images.detach().requires_grad_(True))
        feats = [acts[n] for n in layers]
        grads = torch.autograd.grad(logits[:, POSITIVE].sum(), feats)
    return [a.detach() for a in feats], [g.detach() for g in grads]


def _gradcam(acti: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_c mean_hw(grad_c) * A_c); (B, C, h, w) -> (B, h, w)."""
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * acti).sum(dim=1))


def _gradcampp(acti: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018) with the exponential score; (B, C, h, w) -> (B, h, w).

    With S = exp(logit), alpha = g^2 / (2 g^2 + sum_hw A g^3) and the channel weight is
    sum_hw alpha * ReLU(exp(logit) g). The factor exp(logit) is one positive number per slice and
    cancels in the per-slice normalisation, so it is left out (it overflows for large logits).
    """
    g2 = grad.pow(2)
    denom = 2 * g2 + (acti * grad.pow(3)).sum(dim=(2, 3), keepdim=True)
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    alpha = g2 / denom
    weights = (alpha * F.relu(grad)).sum(dim=(2, 3), keepdim=True)
    return F.relu((weights * acti).sum(dim=1))


def _layercam(acti: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): ReLU(sum_c ReLU(grad_c) * A_c); (B, C, h, w) -> (B, h, w)."""
    return F.relu((F.relu(grad) * acti).sum(dim=1))


def _scorecam(
    model: nn.Module, images: torch.Tensor, layer: str, max_channels: int | None = None
) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020) at ``layer``: raw maps (B, H, W).

    Each activation channel, upsampled to H x W and min-max normalised, masks the input (towards the
    background value -1 of images in [-1, 1]); the positive-class softmax score of the masked input is the
    channel's weight. With ``max_channels``, only the channels of highest mean activation of each slice are
    scored (the others weigh 0), which bounds the cost at ``max_channels`` forwards per slice. Masked
    forwards run in chunks of ``SCORECAM_CHUNK`` images.
    """
    size = images.shape[2:]
    with torch.inference_mode():
        with capture_activations(model, [layer]) as acts:
            model(images)
        acti = acts[layer].float()
        b, c = acti.shape[:2]
        k = c if max_channels is None else min(int(max_channels), c)
        top = acti.mean(dim=(2, 3)).topk(k, dim=1).indices  # (B, k)
        weights = torch.zeros(b, c, device=images.device)
        for i in range(b):
            masks = normalise_per_slice(_upsample(acti[i, top[i]], size))  # (k, H, W)
            masked = BACKGROUND_VALUE + (images[i : i + 1] - BACKGROUND_VALUE) * masks.unsqueeze(1)
            scores = [
                F.softmax(model(masked[s : s + SCORECAM_CHUNK]).float(), dim=1)[:, POSITIVE]
                for s in range(0, k, SCORECAM_CHUNK)
            ]
            weights[i, top[i]] = torch.cat(scores)
        maps = F.relu((weights[:, :, None, None] * acti).sum(dim=1))
    return _upsample(maps, size)


def compute_cam(
    method: str,
    model: nn.Module,
    images: torch.Tensor,
    target_layers: Sequence[str],
    scorecam_channels: int | None = None,
) -> torch.Tensor:
    """CAM of the positive class.

    Parameters
    ----------
    method
        ``gradcam`` | ``gradcampp`` | ``layercam`` | ``scorecam``.
    model
        CAM classifier, ``model(images) -> logits (B, 2)``.
    images
        float32 (B, C, H, W) in [-1, 1].
    target_layers
        Module names. ``layercam`` computes a map per layer (each upsampled and normalised) and fuses them by
        element-wise maximum; the other methods use exactly one layer.
    scorecam_channels
        Score-CAM only: score the ``scorecam_channels`` most activated channels per slice (all when None).

    Returns
    -------
    float32 (B, H, W) in [0, 1] (per-slice min-max).
    """
    if method not in _CAM_WEIGHTS and method not in ("layercam", "scorecam"):
        raise ValueError(f"unknown CAM method {method!r}")
    layers = list(target_layers)
    if not layers or (method != "layercam" and len(layers) != 1):
        raise ValueError(f"{method} needs exactly one target layer (layercam: one or more), got {layers}")
    size = images.shape[2:]
    if method == "scorecam":
        return normalise_per_slice(_scorecam(model, images, layers[0], scorecam_channels))
    acts, grads = _activations_and_grads(model, images, layers)
    if method == "layercam":
        return layercam_per_layer(acts, grads, size).amax(dim=1)
    cam = _CAM_WEIGHTS[method]
    return normalise_per_slice(_upsample(cam(acts[0].float(), grads[0].float()), size))


def layercam_per_layer(acts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """LayerCAM of each layer, upsampled to ``size`` and min-max normalised per slice: (B, L, H, W)."""
    maps = [normalise_per_slice(_upsample(_layercam(a.float(), g.float()), size)) for a, g in zip(acts, grads)]
    return torch.stack(maps, dim=1)


def positive_probability(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's positive-class probability: images (B, C, H, W) -> float32 (B,)."""
    with torch.inference_mode():
        return F.softmax(model(images).float(), dim=1)[:, POSITIVE]


_CAM_WEIGHTS = {"gradcam": _gradcam, "gradcampp": _gradcampp}


def gradcam(model: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered CAM ``gradcam`` at ``settings["layers"]``: ``maps`` (B, H, W) in [0, 1]."""
    return {"maps": compute_cam("gradcam", model, batch.images, settings["layers"])}


def gradcampp(model: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered CAM ``gradcampp`` (Grad-CAM++) at ``settings["layers"]``: ``maps`` (B, H, W) in [0, 1]."""
    return {"maps": compute_cam("gradcampp", model, batch.images, settings["layers"])}


def layercam_layers(model: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered CAM ``layercam``, per layer: ``layers`` (B, L, H, W) in [0, 1] for every layer of the
    candidate subsets ``settings["layercam_layers"]`` (:func:`candidate_layers` order). Which subset is fused
    (element-wise max, :func:`cldf.maps.layers.fuse_layers`) is chosen on validation."""
    names = candidate_layers(settings["layercam_layers"])
    acts, grads = _activations_and_grads(model, batch.images, names)
    return {"layers": layercam_per_layer(acts, grads, batch.images.shape[2:])}


def scorecam(model: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered CAM ``scorecam`` at ``settings["layers"]``, scoring ``scorecam_channels`` channels per
    slice: ``maps`` (B, H, W) in [0, 1]."""
    return {"maps": compute_cam("scorecam", model, batch.images, settings["layers"], settings.get("scorecam_channels"))}


def probability_map(model: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered map ``classifier_probs``: ``probs`` (B,), the CAM classifier's positive-class probability.

    It gates the masks of CLDF and of the thresholded baselines; it is kept apart from the CAM stores so
    that switching the CAM method leaves it (and everything gated by it) untouched.
    """
    return {"probs": positive_probability(model, batch.images)}
