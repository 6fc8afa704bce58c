"""Network and noise-schedule builders from plain settings dicts (the config presets).

Every network is rebuilt from ``(kind, settings, in_channels)`` alone, which is what a checkpoint
stores, so a checkpoint never pickles code.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Mapping

import torch
from monai.networks.nets import DiffusionModelUNet, UNet, resnet18
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from cldf.models.decoder import PixelDecoder
from cldf.registry import METHOD_NETWORKS, MODEL_KINDS

NULL_CLASS = 2
"""Class label of the CDM's null (unconditional) embedding used for classifier-free guidance."""
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SCHEDULE = "linear_beta"


def _norm_groups(settings: Mapping[str, Any]) -> int:
    """GroupNorm groups: ``settings['norm_num_groups']`` or the largest divisor of 32 shared by all widths."""
    if "norm_num_groups" in settings:
        return int(settings["norm_num_groups"])
    return math.gcd(32, *[int(c) for c in settings["channels"]])


def _diffusion_backbone(settings: Mapping[str, Any]) -> dict[str, Any]:
    channels = tuple(int(c) for c in settings["channels"])
    attention = tuple(bool(a) for a in settings["attention_levels"])
    if len(attention) != len(channels):
        raise ValueError(f"attention_levels {list(attention)} must have one entry per level of channels {list(channels)}")
    return {
        "spatial_dims": 2,
        "channels": channels,
        "attention_levels": attention,
        "num_res_blocks": int(settings["num_res_blocks"]),
        "num_head_channels": int(settings["num_head_channels"]),
        "norm_num_groups": _norm_groups(settings),
    }


class PooledHead(nn.Module):
    """Classifier head over the encoder's flattened bottleneck (B, C·h·w): global average pooling over
    the h·w positions, then a linear layer → logits (B, n_classes).

    Replaces MONAI's flatten→MLP head of ``DiffusionModelEncoder``, whose weight count grows with the
    image area and which overfits the few hundred labelled slices of a small study.
    """

    def __init__(self, channels: int, n_classes: int) -> None:
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(channels, n_classes)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        return self.linear(flat.view(flat.shape[0], self.channels, -1).mean(-1))


def build_model(kind: str, settings: Mapping[str, Any], in_channels: int) -> nn.Module:
    """Build an untrained network of ``kind`` (one of :data:`MODEL_KINDS`).

    - ``cdm``: class-conditional DDPM UNet, ``cdm(x_t (B,C,H,W), timesteps=t (B,), class_labels=y (B,))``
      → ε̂ (B, C, H, W); labels 0 negative, 1 positive, 2 null (classifier-free guidance).
    - ``noisy_classifier``: the CDM's encoder backbone without class conditioning,
      ``clf(x_t (B,C,H,W), timesteps=t (B,))`` → logits (B, 2), with a global-average-pooling head
      (:class:`PooledHead`). MONAI's encoder still needs ``settings['image_size']`` (H = W) to build.
    - ``cam_classifier``: 2-D ResNet-18 on clean images, (B, C, H, W) → logits (B, 2); blocks
      ``layer1`` … ``layer4`` are the CAM target layers.
    - ``fsl_unet``: fully supervised UNet, (B, C, H, W) → mask logits (B, 1, H, W).
    - ``amecam``, ``seam``, ``dig``: the comparison methods' networks (``cldf/models/<kind>.py``), each with
      ``cam(images (B, C, H, W), context) -> (B, H, W)`` and ``positive_probability(images) -> (B,)``.
    - ``pixel_decoder``: CLDF's per-pixel MLP (:class:`cldf.models.decoder.PixelDecoder`), features
      (P, D) → unit embeddings (P, E); ``in_channels`` is the feature dimension D, ``settings["channels"]``
      the indices of the channels it reads (all when absent).
    """
    if kind == "cdm":
        return DiffusionModelUNet(
            in_channels=in_channels, out_channels=in_channels, num_class_embeds=3, **_diffusion_backbone(settings)
        )
    if kind == "noisy_classifier":
        if "image_size" not in settings:
            raise ValueError("noisy_classifier settings need 'image_size' (its linear head depends on it)")
        size = int(settings["image_size"])
        levels = len(settings["channels"])
        if size % (2**levels):
            raise ValueError(f"noisy_classifier: image_size {size} must be divisible by 2**{levels} (one halving per level)")
        encoder = DiffusionModelEncoder(
            in_channels=in_channels, out_channels=2, input_shape=(size, size), **_diffusion_backbone(settings)
        )
        encoder.out = PooledHead(int(settings["channels"][-1]), 2)
        return encoder
    if kind == "cam_classifier":
        return resnet18(
            spatial_dims=2,
            n_input_channels=in_channels,
            num_classes=2,
            widen_factor=float(settings["widen_factor"]),
            conv1_t_stride=int(settings.get("conv1_stride", 2)),
            no_max_pool=not bool(settings.get("max_pool", True)),
        )
    if kind in METHOD_NETWORKS:
        return importlib.import_module(f"cldf.models.{kind}").build(settings, in_channels)
    if kind == "pixel_decoder":
        return PixelDecoder(in_channels, settings["widths"], settings.get("channels"))
    if kind == "fsl_unet":
        channels = tuple(int(c) for c in settings["channels"])
        return UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=1,
        )
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def build_scheduler(settings: Mapping[str, Any] | None = None) -> DDPMScheduler:
    """The DDPM noise schedule shared by the CDM and the noisy classifier.

    1000 training timesteps, ``linear_beta`` (β from 1e-4 to 0.02, Ho et al. 2020; the schedule of the
    diffusion WSSS / anomaly-detection predecessors) unless ``settings['schedule']`` names another MONAI
    schedule. CDM and noisy classifier must use the same one; the presets leave it at the default.
    """
    schedule = (settings or {}).get("schedule", DEFAULT_SCHEDULE)
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, schedule=schedule)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def alphas_cumprod(scheduler: DDPMScheduler, device: torch.device) -> torch.Tensor:
    """ᾱ_t of ``scheduler`` as float32 (T,) on ``device``."""
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
