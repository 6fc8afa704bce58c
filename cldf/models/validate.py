"""Validation metrics of a trained network (written beside its checkpoint as ``<kind>.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

from cldf.models.data import SliceDataset, step_seed

VAL_BATCH = 64
VAL_TAG = 10**6 + 1
"""Stream tag of :func:`cldf.models.data.step_seed` for validation noise (never a rank)."""
LOW_NOISE_T = 200
"""The noisy classifier is also validated at t ≤ 200, the range the mean-gradient map uses."""


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


@torch.no_grad()
def evaluate_model(
    kind: str,
    model: nn.Module,
    scheduler: DDPMScheduler,
    dataset: SliceDataset,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """Validation metrics of a trained net on ``dataset`` (fixed noise draws from ``seed``).

    cdm: ``val_eps_mse`` (mean ε-prediction MSE at uniform t, conditioned on the true label);
    noisy_classifier: ``val_accuracy``/``val_auc`` at uniform t and ``val_accuracy_t_le_200``/
    ``val_auc_t_le_200``; cam_classifier and the comparison methods' networks (their
    ``positive_probability``): ``val_accuracy``/``val_auc``; fsl_unet: ``val_dice``
    (pooled over all pixels) and ``val_dice_positive_mean`` (mean over slices with target).
    AUC is None when the validation slices hold one class only.
    """
    model.eval()
    generator = torch.Generator(device).manual_seed(step_seed(seed, 0, VAL_TAG))
    loader = DataLoader(dataset, batch_size=VAL_BATCH, shuffle=False)
    labels, sq_err, n_err = [], 0.0, 0
    probs: dict[str, list[np.ndarray]] = {"all": [], "low": []}
    inter = total = 0.0
    dice_pos: list[np.ndarray] = []
    for batch in loader:
        x0, y = batch["image"].to(device), batch["label"].to(device)
        labels.append(y.cpu().numpy())
        if kind in ("cdm", "noisy_classifier"):
            t_all = torch.randint(0, scheduler.num_train_timesteps, (len(x0),), device=device, generator=generator)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            if kind == "cdm":
                pred = model(scheduler.add_noise(x0, noise, t_all), timesteps=t_all, class_labels=y)
                sq_err += float(((pred.float() - noise) ** 2).sum())
                n_err += noise.numel()
                continue
            t_low = torch.randint(0, LOW_NOISE_T + 1, (len(x0),), device=device, generator=generator)
            for name, t in (("all", t_all), ("low", t_low)):
                logits = model(scheduler.add_noise(x0, noise, t), timesteps=t)
                probs[name].append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
        elif kind == "cam_classifier":
            probs["all"].append(torch.softmax(model(x0).float(), 1)[:, 1].cpu().numpy())
        elif hasattr(model, "positive_probability"):  # a comparison method's network
            probs["all"].append(model.positive_probability(x0).float().cpu().numpy())
        else:
            pred = (model(x0) > 0).float()
            gt = batch["mask"].to(device)
            inter += float((pred * gt).sum())
            total += float(pred.sum() + gt.sum())
            has_target = gt.flatten(1).sum(1) > 0
            per_slice = 2 * (pred * gt).flatten(1).sum(1) / (pred.flatten(1).sum(1) + gt.flatten(1).sum(1)).clamp_min(1)
            dice_pos.append(per_slice[has_target].cpu().numpy())
    y_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if kind == "cdm":
        return {"val_eps_mse": sq_err / max(n_err, 1)}
    if kind == "fsl_unet":
        pos = np.concatenate(dice_pos) if dice_pos else np.zeros(0)
        return {
            "val_dice": 2 * inter / total if total > 0 else 1.0,
            "val_dice_positive_mean": float(pos.mean()) if len(pos) else None,
        }
    out: dict[str, Any] = {}
    for name, suffix in (("all", ""), ("low", f"_t_le_{LOW_NOISE_T}")):
        if not probs[name]:
            continue
        p = np.concatenate(probs[name])
        out[f"val_accuracy{suffix}"] = float(((p > 0.5) == (y_all == 1)).mean())
        out[f"val_auc{suffix}"] = _auc(y_all, p)
    return out


