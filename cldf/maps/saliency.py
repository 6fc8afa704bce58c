"""CDM saliency baseline (Hu et al. 2023, "Conditional diffusion models for weakly supervised medical
image segmentation").

The image is encoded deterministically (DDIM inversion, conditioned on its class) up to ``noise_level``,
then denoised with DDIM along the trajectory of its class; at every step the next sample is also
computed under a reference class (the null class by default), and the saliency is the accumulated
absolute difference between the two, summed over channels. The DDIM loop is written here on
``scheduler.alphas_cumprod`` because MONAI's ``DDIMScheduler`` disagrees with itself about the stride.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from cldf.maps.common import Batch
from cldf.models.tensors import normalise_per_slice
from cldf.models.builders import NULL_CLASS, build_scheduler


def ddim_timesteps(noise_level: int, ddim_steps: int) -> list[int]:
    """Increasing DDIM timesteps ``[0, ..., noise_level]`` with ``ddim_steps`` intervals (distinct ints)."""
    if not 1 <= ddim_steps <= noise_level:
        raise ValueError(f"ddim_steps must be in [1, noise_level={noise_level}], got {ddim_steps}")
    grid = torch.linspace(0, noise_level, ddim_steps + 1).round().long()
    return grid.tolist()


def _eps(cdm: nn.Module, x: torch.Tensor, t: int, y: torch.Tensor, prediction_type: str, abar: torch.Tensor) -> torch.Tensor:
    """The CDM's noise estimate eps(x_t, t, y) for (N, C, H, W) inputs."""
    out = cdm(x, timesteps=torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), class_labels=y)
    a = abar[t]
    if prediction_type == "epsilon":
        return out
    if prediction_type == "sample":
        return (x - a.sqrt() * out) / (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return (1 - a).sqrt() * x + a.sqrt() * out
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def _ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move of x from cumulative alpha ``a_from`` to ``a_to`` with noise estimate eps."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def cdm_saliency(
    cdm: nn.Module,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise_level: int,
    ddim_steps: int,
    reference_class: int = NULL_CLASS,
) -> torch.Tensor:
    """Saliency of the class condition: where denoising under ``labels`` and ``reference_class`` differs.

    Parameters
    ----------
    cdm
        Class-conditional DiffusionModelUNet, ``cdm(x_t, timesteps=t, class_labels=y)``.
    scheduler
        DDPM scheduler (``alphas_cumprod``, ``prediction_type``).
    images
        float32 (B, C, H, W) in [-1, 1].
    labels
        long (B,) class of each image (1 for the positive class whose evidence is sought).
    noise_level
        Timestep the image is encoded to (Hu et al.: a few hundred of 1000).
    ddim_steps
        Number of DDIM steps of the encoding and of the denoising.
    reference_class
        The class the denoising is compared with (2 = null/unconditional, 0 = negative).

    Returns
    -------
    float32 (B, H, W) in [0, 1], min-max normalised per slice. Deterministic (no noise is drawn).
    """
    steps = ddim_timesteps(noise_level, ddim_steps)
    abar = scheduler.alphas_cumprod.to(images.device, torch.float32)
    kind = str(getattr(scheduler, "prediction_type", "epsilon"))
    b = images.shape[0]
    y = labels.to(images.device, torch.long)
    y_pair = torch.cat([y, torch.full_like(y, reference_class)])
    saliency = torch.zeros(b, *images.shape[2:], device=images.device)
    with torch.inference_mode():
        x = images.float()
        for t_from, t_to in zip(steps[:-1], steps[1:]):
            x = _ddim_move(x, _eps(cdm, x, t_from, y, kind, abar), abar[t_from], abar[t_to])
        for t_from, t_to in zip(steps[:0:-1], steps[-2::-1]):
            eps = _eps(cdm, torch.cat([x, x]), t_from, y_pair, kind, abar)
            nxt = _ddim_move(torch.cat([x, x]), eps, abar[t_from], abar[t_to])
            x, x_ref = nxt[:b], nxt[b:]
            saliency += (x - x_ref).abs().sum(dim=1)
    return normalise_per_slice(saliency)


def saliency_map(cdm: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered map ``saliency``: ``maps`` (B, H, W) in [0, 1], the evidence for the positive class.

    ``settings``: ``noise_level``, ``ddim_steps``. Deterministic (DDIM draws no noise).
    """
    labels = torch.ones(len(batch.slice_ids), dtype=torch.long, device=batch.images.device)
    maps = cdm_saliency(cdm, build_scheduler(), batch.images, labels, int(settings["noise_level"]),
                        int(settings["ddim_steps"]))
    return {"maps": maps}
