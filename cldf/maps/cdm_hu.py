"""CDM saliency as Hu et al. (2023) run it: ``scripts/image_p_seg.py: main_ddim_guided`` of
``xhu248/cond_ddpm_wsss``, on this project's 1000-step schedule.

Each slice is noised once, with a forward q-sample, to ``t_start``. From that one ``x_t`` two deterministic
DDIM trajectories of ``moves`` single-timestep moves (``t_start → t_start-1 → … → t_start-moves``) run
side by side:

- the *class* trajectory: the CDM conditioned on the hypothesis class (1, positive), classifier guidance
  towards that class;
- the *counterfactual* trajectory: the same CDM with its class embedding replaced by
  ``(1-p)·e_1 + p·e_0`` (``p = perturbation``), classifier guidance towards the other class 0 (Hu et al.
  give their fake label 0 to the perturbed model and to the classifier alike).

Every move is guided_diffusion's ``ddim_sample`` (eta 0, ``clip_denoised``) with ``condition_score``:
ε is re-derived from the clipped x̂₀, shifted by ``-sqrt(1-ᾱ_t)·s·∇ log p(y | x_t, t)``, and the sample
moves to ᾱ_{t-1}. The map is the *signed* difference class − counterfactual, accumulated over the moves,
summed over channels and min-max normalised per slice: high where the positive hypothesis makes the pixel
brighter than its counterfactual. No threshold is applied here (Hu et al.: Otsu, chosen elsewhere).

Timestep mapping (by ᾱ). Their linear schedule of 4000 steps (β from 2.5e-5 to 5e-3) has
ᾱ_400 = 0.8960; ours (1000 steps, β from 1e-4 to 0.02) has ᾱ_100 = 0.8951 and ᾱ_99 = 0.8970, so their
t = 400 is our ``t_start = 100``. One of our steps spans about four of theirs, so the default 3 moves
(100 → 97, ᾱ 0.895 → 0.901) cover the ᾱ range of their 10 (399 → 389, ᾱ 0.896 → 0.901); our networks are
trained on integer timesteps only, so the moves stay whole steps.

Differences from Hu et al.: the map is computed for class 1 on every slice, with no label read (they
condition on the true label and only run tumour slices); the forward noise comes from ``(seed, slice id)``
(theirs is unseeded); their first move evaluates the 400-noised sample as if it were at 399 (an
off-by-one of ᾱ 5e-4 in their schedule, which would be 2e-3 in ours), ours evaluates it at ``t_start``;
min-max is per slice (theirs over the batch, of size 1 in their README); the perturbed embedding is a
temporary forward hook on the caller's ``class_embedding`` instead of a second copy of the model, and both
trajectories go through one batch of 2B.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cldf.maps.common import Batch, feature_noise
from cldf.models.tensors import normalise_per_slice
from cldf.models.builders import alphas_cumprod, build_scheduler


def perturbed_embedding(cdm: nn.Module, target: int, other: int, perturbation: float) -> torch.Tensor:
    """The counterfactual class embedding ``(1-p)·e_target + p·e_other`` of ``cdm``: (E,), no gradient."""
    embedding = getattr(cdm, "class_embedding", None)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{type(cdm).__name__} has no nn.Embedding 'class_embedding'; is it a class-conditional CDM?")
    weight = embedding.weight.detach()
    return (1.0 - perturbation) * weight[target] + perturbation * weight[other]


@contextmanager
def embedding_rows_replaced(cdm: nn.Module, start: int, vector: torch.Tensor) -> Iterator[None]:
    """Within the block, rows ``start:`` of every ``cdm.class_embedding`` output (N, E) are ``vector`` (E,).

    A forward hook, removed on exit (also on error); the CDM's parameters are never touched.
    """

    def replace(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        rows = output.shape[0] - start
        return torch.cat([output[:start], vector.to(output.dtype).expand(rows, -1)])

    handle = cdm.class_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def classifier_gradient(classifier: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇_x log p(y | x, t)`` of the noisy classifier, per sample: x (N, C, H, W), t and y long (N,) → (N, C, H, W).

    Model parameters receive no gradient.
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_p = F.log_softmax(classifier(x_in, timesteps=t).float(), dim=1)
        (grad,) = torch.autograd.grad(log_p.gather(1, y[:, None]).sum(), x_in)
    return grad


def guided_ddim_move(
    cdm: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    t: int,
    cdm_labels: torch.Tensor,
    guide_labels: torch.Tensor,
    guidance_scale: float,
    abar: torch.Tensor,
) -> torch.Tensor:
    """One deterministic, classifier-guided DDIM move of x (N, C, H, W) from timestep ``t`` to ``t - 1``.

    guided_diffusion's ``ddim_sample`` (eta 0, clip_denoised) with ``condition_score``: the CDM's ε under
    ``cdm_labels`` (N,) gives x̂₀ clipped to [-1, 1]; ε is re-derived from it and shifted by
    ``-sqrt(1-ᾱ_t)·scale·∇ log p(guide_labels | x_t, t)``; x̂₀ is recomputed and moved to ᾱ_{t-1}.
    ``abar``: ᾱ (T,) on x's device. Returns x_{t-1} (N, C, H, W).
    """
    a, a_prev = abar[t], abar[t - 1]
    steps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    with torch.no_grad():
        eps = cdm(x, timesteps=steps, class_labels=cdm_labels).float()
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1.0, 1.0)
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    if guidance_scale:
        eps = eps - (1 - a).sqrt() * guidance_scale * classifier_gradient(classifier, x, steps, guide_labels)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def hu_saliency(
    cdm: nn.Module,
    classifier: nn.Module,
    images: torch.Tensor,
    noise: torch.Tensor,
    t_start: int,
    moves: int,
    guidance_scale: float,
    perturbation: float,
    target: int = 1,
) -> torch.Tensor:
    """Hu et al.'s CDM saliency of class ``target`` (see the module docstring).

    Parameters
    ----------
    cdm
        Class-conditional DiffusionModelUNet (labels 0 negative, 1 positive), frozen; left unchanged.
    classifier
        Noisy classifier ``classifier(x_t, timesteps=t) -> logits (N, 2)``, frozen.
    images
        float32 (B, C, H, W) in [-1, 1].
    noise
        float32 (B, C, H, W), the forward noise of each slice.
    t_start, moves
        The q-sample timestep and the number of single-timestep moves (``1 <= moves <= t_start <= 999``).
    guidance_scale, perturbation
        Classifier-guidance scale s; weight p of the other class in the counterfactual embedding.

    Returns
    -------
    float32 (B, H, W) in [0, 1], min-max normalised per slice.
    """
    abar = alphas_cumprod(build_scheduler(), images.device)
    if not 1 <= moves <= t_start < abar.shape[0]:
        raise ValueError(f"need 1 <= moves ({moves}) <= t_start ({t_start}) < {abar.shape[0]}")
    b, other = images.shape[0], 1 - target
    x_t = abar[t_start].sqrt() * images.float() + (1 - abar[t_start]).sqrt() * noise.to(images.device).float()
    x = torch.cat([x_t, x_t])
    labels = torch.tensor([target, other], device=images.device).repeat_interleave(b)
    cdm_labels = torch.full_like(labels, target)
    diff = torch.zeros_like(x_t)
    with embedding_rows_replaced(cdm, b, perturbed_embedding(cdm, target, other, perturbation)):
        for t in range(t_start, t_start - moves, -1):
            x = guided_ddim_move(cdm, classifier, x, t, cdm_labels, labels, guidance_scale, abar)
            diff += x[:b] - x[b:]
    return normalise_per_slice(diff.sum(dim=1))


def cdm_hu_map(models: Mapping[str, nn.Module], batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map ``cdm_hu`` ("CDM (Hu et al.)"): ``maps`` (B, H, W) float32 in [0, 1], evidence for the positive class.

    ``models``: ``cdm`` and ``noisy_classifier``, frozen, eval mode. ``settings``: ``t_start``, ``moves``,
    ``guidance_scale``, ``perturbation`` (``batch_size`` is the caller's). Class 1 on every slice (no label
    read); the forward noise of a slice comes from ``(seed, slice id)``, so its map does not depend on its batch.
    """
    noise = feature_noise(batch.slice_ids, 1, tuple(batch.images.shape[1:]), batch.seed)[0]
    maps = hu_saliency(models["cdm"], models["noisy_classifier"], batch.images, noise, int(settings["t_start"]),
                       int(settings["moves"]), float(settings["guidance_scale"]), float(settings["perturbation"]))
    return {"maps": maps}
