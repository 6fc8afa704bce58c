"""SEAM (Wang et al., CVPR 2020, "Self-supervised Equivariant Attention Mechanism"), single-class version.

Our own implementation after the description of the paper and of its public code (``YudeWang/SEAM``:
``network/resnet38_SEAM.py``, ``train_SEAM.py``, ``infer_SEAM.py``); no code is copied.

What it is:

- **Backbone.** A 2-D MONAI ResNet-18 (``widen_factor``, ``conv1_stride``, ``max_pool`` as the CAM
  classifier's) instead of the original's ImageNet-pretrained ResNet-38. The last ``dilated_stages``
  stages trade their stride for dilation, as ResNet-38 does, so that the CAM grid stays fine (output
  stride 8 with the standard stem and two dilated stages, the original's).
- **CAM.** A 1x1 convolution without bias on the last stage (after channel dropout), one output: the
  target. The original's 1x1 convolution also has a background output, but no loss ever reaches it: its
  background channel is replaced by 1 - (normalised foreground) before every use. We build that
  background channel the same way, from the target, and leave the unused output out.
- **PCM** (pixel-correlation module, :class:`PixelCorrelation`). The image (area-resized to the CAM grid)
  and 1x1 projections (with ReLU) of the two stages before the last one (detached: the PCM does not train
  the backbone) are concatenated and embedded by a 1x1 convolution; the embeddings are L2-normalised,
  ``ReLU(f^T f)`` is the affinity, normalised so that each output pixel's weights sum to 1; the refined
  map of a pixel is the affinity-weighted mean of the (detached, max-normalised) CAM with its background.
- **Training** (:func:`training_loss`): the image and a copy rescaled by ``scale``; per branch a
  classification loss (BCE on the average-pooled target CAM) and the original's "adaptive min-pooling"
  loss on the refined target map; the equivariant-regularisation loss (L1 between the two branches'
  max-normalised target CAMs, the full-size one rescaled); the equivariant cross-regularisation loss
  (L1 between each branch's refined map and the other branch's detached CAM, over the ``ecr_top_fraction``
  largest errors). Target channels are zeroed on negative slices (the original multiplies by the labels).
- **Inference** (:meth:`SEAM.cam`): the refined target map averaged over ``infer_scales`` and left-right
  flips (the original's multi-scale inference), upsampled to H x W and min-max normalised per slice.
  Unlike the original it is not multiplied by the slice's label (unknown on the unlabelled path).

Other departures from the original: no ImageNet pretraining (C-channel MR/CT input); the generic trainer's
single-learning-rate AdamW and left-right flips instead of poly-SGD with 10x/20x rates for the new layers,
random rescaling, cropping and colour jitter; the class logit pools the CAM on its own grid (the original
pools the upsampled map); the image enters the PCM area-resized (the original samples it bilinearly).
Only SEAM's own CAM step is implemented: no CRF, no AffinityNet random walk, no segmentation retraining.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from monai.networks.nets import resnet18
from torch import nn
from torch.nn import functional as F

from cldf.models.tensors import normalise_per_slice

PCM_WIDTHS = (64, 128)
"""Widths of the PCM's projections of the mid and late backbone stages (the original's)."""
MIN_POOL_FRACTION = 0.25
"""The adaptive min-pooling loss acts on this fraction of the refined target map's smallest values."""
EPS = 1e-5


class PixelCorrelation(nn.Module):
    """The pixel-correlation module: an affinity from image and features that refines the CAM.

    ``mid_channels`` and ``late_channels`` are the widths of the backbone features it projects.
    """

    def __init__(self, image_channels: int, mid_channels: int, late_channels: int) -> None:
        super().__init__()
        self.project_mid = nn.Conv2d(mid_channels, PCM_WIDTHS[0], 1, bias=False)
        self.project_late = nn.Conv2d(late_channels, PCM_WIDTHS[1], 1, bias=False)
        self.embed = nn.Conv2d(image_channels + sum(PCM_WIDTHS), sum(PCM_WIDTHS), 1, bias=False)
        nn.init.kaiming_normal_(self.project_mid.weight)
        nn.init.kaiming_normal_(self.project_late.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)

    def affinity(self, images: torch.Tensor, mid: torch.Tensor, late: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Affinity (B, N, N) of the N = h·w pixels of the CAM grid ``size`` = (h, w): float32, non-negative,
        each row summing to 1 (row i: the weights of the pixels in the refined value of pixel i).

        ``images`` (B, C, H, W), ``mid`` (B, C_m, h_m, w_m) and ``late`` (B, C_l, h_l, w_l) are area-resized
        to the grid where their size differs.
        """
        with torch.autocast(device_type=late.device.type, enabled=False):
            parts = [
                _area(images.float(), size),
                F.relu(self.project_mid(_area(mid.detach().float(), size))),
                F.relu(self.project_late(_area(late.detach().float(), size))),
            ]
            embedding = self.embed(torch.cat(parts, dim=1)).flatten(2)  # (B, D, N)
            embedding = embedding / (embedding.norm(dim=1, keepdim=True) + EPS)
            similarity = F.relu(embedding.transpose(1, 2) @ embedding)  # (B, N, N), symmetric
            return similarity / (similarity.sum(dim=2, keepdim=True) + EPS)

    def forward(self, seeds: torch.Tensor, images: torch.Tensor, mid: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
        """Refine ``seeds`` (B, K, h, w) by the affinity: float32 (B, K, h, w), each pixel a convex combination."""
        affinity = self.affinity(images, mid, late, seeds.shape[-2:])
        refined = seeds.float().flatten(2) @ affinity.transpose(1, 2)  # (B, K, N)
        return refined.view(seeds.shape)


class SEAM(nn.Module):
    """SEAM network: ``forward(images (B, C, H, W))`` -> (raw target CAM (B, 1, h, w), refined
    [background, target] maps (B, 2, h, w)) on the CAM grid h x w (input size / output stride).

    Parameters
    ----------
    in_channels
        Image channels C.
    widen_factor, conv1_stride, max_pool
        The ResNet-18's width multiplier, stem stride and stem max-pooling.
    dilated_stages
        How many of the last stages (0-2) use dilation instead of stride.
    dropout
        Channel-dropout probability before the CAM convolution (the original: 0.5).
    infer_scales
        Input scales averaged by :meth:`cam` (each with its left-right flip).
    """

    def __init__(
        self,
        in_channels: int,
        widen_factor: float,
        conv1_stride: int,
        max_pool: bool,
        dilated_stages: int,
        dropout: float,
        infer_scales: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone = resnet18(
            spatial_dims=2, n_input_channels=in_channels, widen_factor=widen_factor, conv1_t_stride=conv1_stride,
            no_max_pool=not max_pool, feed_forward=False,
        )
        if not 0 <= dilated_stages <= 2:
            raise ValueError(f"seam: dilated_stages must be 0, 1 or 2, got {dilated_stages}")
        stages = [self.backbone.layer3, self.backbone.layer4][2 - dilated_stages:]
        for k, stage in enumerate(stages):
            _dilate(stage, 2 ** (k + 1))
        mid, late, last = (stage[-1].conv2.out_channels for stage in
                           (self.backbone.layer2, self.backbone.layer3, self.backbone.layer4))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(last, 1, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.pcm = PixelCorrelation(in_channels, mid, late)
        self.infer_scales = tuple(float(s) for s in infer_scales)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs of ``layer2``, ``layer3`` and ``layer4`` (B, C_k, h_k, w_k) for images (B, C, H, W)."""
        net = self.backbone
        x = net.act(net.bn1(net.conv1(images)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        mid = net.layer2(net.layer1(x))
        late = net.layer3(mid)
        return mid, late, net.layer4(late)

    def raw_cam(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target CAM float32 (B, 1, h, w), ``layer2`` output, ``layer3`` output) for images (B, C, H, W)."""
        mid, late, last = self.features(images)
        return self.classifier(self.dropout(last)).float(), mid, late

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> (target CAM (B, 1, h, w), refined [background, target] (B, 2, h, w)), float32.

        The PCM refines the detached CAM, max-normalised, with 1 - that as its background channel.
        """
        cam, mid, late = self.raw_cam(images)
        with torch.no_grad():
            target = _max_norm_seed(cam)
            seeds = torch.cat([1 - target, target], dim=1)
        return cam, self.pcm(seeds, images, mid, late)

    @torch.no_grad()
    def positive_probability(self, images: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the average-pooled target CAM: images (B, C, H, W) -> float32 (B,)."""
        return torch.sigmoid(self.raw_cam(images)[0].mean(dim=(1, 2, 3)))

    @torch.no_grad()
    def cam(self, images: torch.Tensor, context: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        """Refined target map: images (B, C, H, W) -> float32 (B, H, W) in [0, 1] (min-max per slice).

        Averaged over ``infer_scales`` and left-right flips; ``context`` is not used.
        """
        b, size = images.shape[0], images.shape[-2:]
        total = torch.zeros(b, *size, device=images.device)
        for scale in self.infer_scales:
            scaled = images if scale == 1 else _bilinear(images, _scaled(size, scale))
            refined = self(torch.cat([scaled, scaled.flip(-1)]))[1][:, 1:]
            up = F.interpolate(refined, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
            total += up[:b] + up[b:].flip(-1)
        return normalise_per_slice(total)


def _dilate(stage: nn.Sequential, dilation: int) -> None:
    """Give a ResNet stage stride 1 and ``dilation`` in its 3x3 convolutions (in place)."""
    for block in stage:
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _area(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) area-resized to ``size`` (unchanged when already that size)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="area")


def _bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) bilinearly resized to ``size`` with aligned corners (the original's rescaling)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _scaled(size: Sequence[int], scale: float) -> tuple[int, int]:
    """(H, W) scaled by ``scale`` and rounded, at least 1."""
    height, width = (max(1, round(int(s) * scale)) for s in size)
    return height, width


def _max_norm_seed(cam: torch.Tensor) -> torch.Tensor:
    """PCM seed: ReLU(cam) divided by its per-map maximum, (B, K, h, w) -> (B, K, h, w) in [0, 1)."""
    positive = F.relu(cam)
    peak = positive.flatten(2).amax(dim=2)[..., None, None] + EPS
    return F.relu(positive - EPS) / peak


def _max_norm(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation after ReLU, (B, K, h, w) -> (B, K, h, w) in [0, 1)."""
    positive = F.relu(maps)
    low = positive.flatten(2).amin(dim=2)[..., None, None]
    high = positive.flatten(2).amax(dim=2)[..., None, None]
    return F.relu(positive - low - EPS) / (high - low + EPS)


def _min_pool_loss(maps: torch.Tensor) -> torch.Tensor:
    """Mean of the ReLU of the smallest ``MIN_POOL_FRACTION`` of each map's values; maps (B, h, w) -> scalar."""
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * MIN_POOL_FRACTION))
    return F.relu(flat.topk(k, dim=1, largest=False).values).mean()


def _cross_loss(refined: torch.Tensor, target: torch.Tensor, fraction: float) -> torch.Tensor:
    """Equivariant cross-regularisation: mean of the largest ``fraction`` of |[1 - target, target] - refined|
    per slice; ``refined`` (B, 2, h, w), ``target`` (B, 1, h, w) (detached)."""
    errors = (torch.cat([1 - target, target], dim=1) - refined).abs().flatten(1)
    k = max(1, int(errors.shape[1] * fraction))
    return errors.topk(k, dim=1).values.mean()


def _branch(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One branch: (pooled target logit (B,), target CAM (B, 1, H, W), refined maps (B, 2, H, W)) at the
    input size H x W (both maps upsampled bilinearly, as the original does before its losses)."""
    cam, refined = model(images)
    size = images.shape[-2:]
    return cam.mean(dim=(1, 2, 3)), _bilinear(cam, size), _bilinear(refined, size)


def _normalised(maps: torch.Tensor, gate: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Maps (B, K, H, W) min-max normalised per map, resized to ``size`` and multiplied by ``gate`` (B, K)."""
    return _bilinear(_max_norm(maps), size) * gate[..., None, None]


def loss_terms(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The four SEAM loss terms (scalars) of images (B, C, H, W) with labels (B,) 0/1.

    ``model(images)`` -> (target CAM (B, 1, h, w), refined [background, target] (B, 2, h, w)), as
    :class:`SEAM`. Terms: ``classification`` (BCE of the pooled target CAM) and ``min_pool`` (the original's
    adaptive min-pooling of the refined target map), each the mean over the two branches; ``equivariance``
    (L1 between the normalised target CAMs at the small branch's size); ``cross`` (each branch's refined
    maps against [1 - CAM, CAM] of the other branch, detached, over the largest ``ecr_top_fraction`` errors).
    Target channels are zeroed on negative slices.
    """
    y = labels.float()
    small = _scaled(images.shape[-2:], float(settings["scale"]))
    logit1, cam1, refined1 = _branch(model, images)
    logit2, cam2, refined2 = _branch(model, _bilinear(images, small))
    gate, channel_gate = y[:, None], torch.stack([torch.ones_like(y), y], dim=1)
    target1, target2 = _normalised(cam1, gate, small), _normalised(cam2, gate, small)
    fraction = float(settings["ecr_top_fraction"])
    bce = F.binary_cross_entropy_with_logits
    return {
        "classification": (bce(logit1, y) + bce(logit2, y)) / 2,
        "min_pool": (_min_pool_loss(refined1[:, 1] * gate[..., None]) + _min_pool_loss(refined2[:, 1] * gate[..., None])) / 2,
        "equivariance": (target1 - target2).abs().mean(),
        "cross": _cross_loss(_normalised(refined1, channel_gate, small), target2.detach(), fraction)
        + _cross_loss(_normalised(refined2, channel_gate, small), target1.detach(), fraction),
    }


def training_loss(
    model: SEAM,
    batch: dict[str, torch.Tensor],
    step: int,
    settings: Mapping[str, Any],
    generator: torch.Generator,
    context: Mapping[str, nn.Module],
) -> torch.Tensor:
    """SEAM loss of a batch: ``image`` float32 (B, C, H, W) in [-1, 1], ``label`` long (B,) 0/1 -> scalar.

    ``classification + min_pool + er_weight * equivariance + ecr_weight * cross`` (:func:`loss_terms`; the
    original weighs all four 1). ``step``, ``generator`` and ``context`` are not used: the only randomness is
    the CAM's channel dropout, drawn from torch's global generator, which the trainer seeds per step.
    """
    terms = loss_terms(model, batch["image"], batch["label"], settings)
    weighted = float(settings["er_weight"]) * terms["equivariance"] + float(settings["ecr_weight"]) * terms["cross"]
    return terms["classification"] + terms["min_pool"] + weighted


def build(settings: Mapping[str, Any], in_channels: int) -> SEAM:
    """Untrained :class:`SEAM` from a preset entry (``widen_factor``, ``conv1_stride``, ``max_pool``,
    ``dilated_stages``, ``dropout``, ``infer_scales``; other keys are the trainer's and the loss's)."""
    return SEAM(
        in_channels,
        widen_factor=float(settings["widen_factor"]),
        conv1_stride=int(settings["conv1_stride"]),
        max_pool=bool(settings["max_pool"]),
        dilated_stages=int(settings["dilated_stages"]),
        dropout=float(settings["dropout"]),
        infer_scales=[float(s) for s in settings["infer_scales"]],
    )
