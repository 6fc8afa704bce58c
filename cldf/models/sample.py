"""Class-conditional sampling from the CDM (sanity check that it learnt p(x | y))."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from cldf.models.builders import NULL_CLASS, alphas_cumprod, build_scheduler
from cldf.models.checkpoint import load_checkpoint, model_from_payload

BRIGHT_LEVEL = 0.5
"""FLAIR intensities above this (images in [-1, 1]) count as hyperintense in the sample statistics."""


@torch.no_grad()
def sample_images(
    cdm: nn.Module,
    scheduler: DDPMScheduler,
    n: int,
    label: int,
    image_size: int,
    channels: int,
    generator: torch.Generator,
    steps: int = 50,
    guidance_scale: float = 0.0,
) -> torch.Tensor:
    """Draw ``n`` images of class ``label`` by ancestral sampling: float32 (n, C, H, W) in [-1, 1].

    Our own loop over ``steps`` evenly spaced timesteps from T-1 down to 0 (no MONAI scheduler stepping,
    so no DDIM stride mismatch): at each step x̂₀ is predicted from ε̂ and clipped to [-1, 1], and
    x_{t'} is drawn from the DDPM posterior q(x_{t'} | x_t, x̂₀) of the strided chain (DDIM with η = 1;
    with ``steps`` = T it is exactly DDPM ancestral sampling). ``guidance_scale`` w > 0 applies
    classifier-free guidance ε̂ = (1 + w) ε̂(x, y) − w ε̂(x, ∅). ``generator`` lives on the CDM's device.
    """
    device = next(cdm.parameters()).device
    abar = alphas_cumprod(scheduler, device)
    timesteps = np.unique(np.linspace(0, scheduler.num_train_timesteps - 1, steps).round().astype(np.int64))[::-1]
    x = torch.randn((n, channels, image_size, image_size), device=device, generator=generator)
    y = torch.full((n,), int(label), device=device, dtype=torch.long)
    null = torch.full_like(y, NULL_CLASS)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((n,), int(t), device=device, dtype=torch.long)
        eps = cdm(x, timesteps=t_batch, class_labels=y)
        if guidance_scale > 0:
            eps = (1 + guidance_scale) * eps - guidance_scale * cdm(x, timesteps=t_batch, class_labels=null)
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones((), device=device)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        if i + 1 == len(timesteps):
            return x0
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        noise = torch.randn(x.shape, device=device, generator=generator)
        x = a_prev.sqrt() * x0 + (1 - a_prev - var).clamp_min(0).sqrt() * eps + var.sqrt() * noise
    return x


def save_sample_grid(
    cdm_path: str | os.PathLike,
    out_png: str | os.PathLike,
    n_per_class: int,
    device: torch.device,
    seed: int,
    steps: int = 50,
    guidance_scale: float = 3.0,
) -> dict[str, Any]:
    """Sample ``n_per_class`` images per class from the CDM at ``cdm_path`` and write a PNG grid.

    Row 0: y = 0 (negative), row 1: y = 1 (positive); the FLAIR channel (or the first channel when
    there is no FLAIR). Both rows start from the same noise (paired samples) and use classifier-free
    guidance with ``guidance_scale`` (the CDM is trained with label dropout to the null class).
    Returns ``{"bright_fraction_y0", "bright_fraction_y1", "channel", ...}``: the mean fraction of pixels
    above :data:`BRIGHT_LEVEL` per class (positives should have more).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    payload = load_checkpoint(cdm_path)
    if payload["kind"] != "cdm":
        raise ValueError(f"{cdm_path} holds a {payload['kind']!r}, not a CDM")
    cdm = model_from_payload(payload, device)
    scheduler = build_scheduler(payload["settings"])
    modalities = [m.lower() for m in payload.get("modalities", [])]
    channel = modalities.index("flair") if "flair" in modalities else 0
    size, channels = int(payload["settings"]["image_size"]), int(payload["in_channels"])
    rows = [
        sample_images(cdm, scheduler, n_per_class, y, size, channels, torch.Generator(device).manual_seed(seed),
                      steps, guidance_scale)[:, channel].cpu().numpy()
        for y in (0, 1)
    ]
    fig = Figure(figsize=(1.2 * n_per_class, 2.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n_per_class, squeeze=False)
    for y, images in enumerate(rows):
        for j, image in enumerate(images):
            ax = axes[y, j]
            ax.imshow(image, cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"y={y}")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=100)
    return {
        "channel": modalities[channel] if modalities else channel,
        "n_per_class": n_per_class,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "bright_level": BRIGHT_LEVEL,
        "bright_fraction_y0": float((rows[0] > BRIGHT_LEVEL).mean()),
        "bright_fraction_y1": float((rows[1] > BRIGHT_LEVEL).mean()),
    }
