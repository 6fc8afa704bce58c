"""AME-CAM (Chen et al., MICCAI 2023): activation maps of a multi-exit classifier, fused pixel-wise.

Our implementation from the published description and the released code (``windstormer/AME-CAM``),
on our MONAI ResNet-18:

1. **Multi-exit classifier** (:class:`MultiExitResNet`). The outputs of ``layer1`` … ``layer4`` each go
   through their own 1×1 convolution to one channel; that map *is* the exit's CAM and its global average
   is the exit's logit. Trained with Σ_k w_k · BCE(logit_k, y), w = 0.25, 0.5, 0.75, 1.0.
2. **Attention aggregation** (:class:`ExitAggregator`, their ``Res_Scoring``). The classifier frozen; the
   four exit maps, upsampled to H × W and min-max normalised per slice, times the grey image, go through
   four 3×3 conv + BN + ReLU layers (4 → 32 → 32 → 32 → 4) and a softmax over the 4 channels: pixel-wise
   exit weights. Aggregated map = Σ_k normalised exit map_k × weight_k. Trained without labels with the
   C²AM losses on fg = grey · map and bg = grey · (1 − map), compared as flattened pixel vectors (as in
   the released code, which embeds them with no network): pull fg together, pull bg together (−log sim,
   rank-weighted), push fg from bg (−log(1 − sim)); cosine similarity clamped to [5e-4, 0.9995].
3. **Map.** Mean of the four normalised exit maps and the aggregated map, min-max normalised per slice.
   The released code inverts it (1 − map) unconditionally; we decide the polarity once per trained model
   with C²AM's rule instead (:meth:`AMECAM.set_polarity`).

Training is one model, two phases, driven by the step counter (:func:`training_loss`): steps
``< classifier_steps`` train the classifier only, later steps the aggregator only.

Where we differ from the released code: no optional SimCLR pretraining of the encoder; MONAI's ResNet-18
(BatchNorm, ``widen_factor``/stem from the preset) instead of theirs (InstanceNorm, 3 channels); one model
on all C image channels instead of one model per modality replicated as RGB, with channel 0 as the grey
image; the aggregated map combines the *normalised* exit maps (theirs the raw ones, so it stays in [0, 1]
and fg/bg are proper complements); the polarity rule above instead of the hard-coded inversion.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import pairwise
from typing import Any, Iterator, Mapping

import torch
from monai.networks.nets import resnet18
from torch import nn
from torch.nn import functional as F

from cldf.models.tensors import normalise_per_slice

EXIT_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
"""Weights of the four exits' BCE losses (exit 1 = ``layer1`` … exit 4 = ``layer4``)."""
N_EXITS = len(EXIT_WEIGHTS)
RESNET_WIDTHS = (64, 128, 256, 512)
"""Output channels of ResNet-18's ``layer1`` … ``layer4`` at ``widen_factor`` 1."""
AGGREGATOR_WIDTH = 32
RANK_ALPHA = 0.25
"""Decay of C²AM's rank weights exp(−α (rank − 1)) in the pull losses."""
SIM_RANGE = (5e-4, 0.9995)
"""Clamp of the cosine similarities of the C²AM losses (keeps both logarithms finite)."""
BORDER_FRACTION = 0.1
"""Width of the image frame, as a fraction of the side, on which the polarity rule reads the map."""
REQUIRED_SETTINGS = ("widen_factor", "conv1_stride", "max_pool", "classifier_steps", "aggregation_steps",
                     "batch_size", "lr", "checkpoint_every")


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``module`` is in eval mode (BatchNorm uses and keeps its running statistics);
    the previous mode of every submodule is restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def grey_image(images: torch.Tensor) -> torch.Tensor:
    """Channel 0 (FLAIR for BraTS) rescaled from [-1, 1] to [0, 1]: (B, C, H, W) -> (B, 1, H, W)."""
    return (images[:, :1].float() + 1.0) / 2.0


def upsample_and_normalise(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Exit maps (B, K, h, w), bilinearly upsampled to ``size`` (H, W) and min-max normalised per slice
    and exit: float32 (B, K, H, W) in [0, 1] (a constant map becomes zeros)."""
    b, k = maps.shape[:2]
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return normalise_per_slice(up.reshape(b * k, *size)).reshape(b, k, *size)


class MultiExitResNet(nn.Module):
    """MONAI 2-D ResNet-18 with a 1×1 convolution to one channel after each of ``layer1`` … ``layer4``.

    ``forward(images (B, C, H, W))`` -> list of the 4 raw exit maps, exit k (B, 1, h_k, w_k) with
    h_k = H / (s · 2^(k−1)), s the stem's stride (``conv1_stride`` × 2 with ``max_pool``).
    """

    def __init__(self, settings: Mapping[str, Any], in_channels: int) -> None:
        super().__init__()
        widen = float(settings["widen_factor"])
        self.backbone = resnet18(
            spatial_dims=2,
            n_input_channels=in_channels,
            widen_factor=widen,
            conv1_t_stride=int(settings["conv1_stride"]),
            no_max_pool=not bool(settings["max_pool"]),
            feed_forward=False,
        )
        self.heads = nn.ModuleList(nn.Conv2d(int(w * widen), 1, kernel_size=1) for w in RESNET_WIDTHS)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.backbone
        x = net.act(net.bn1(net.conv1(images)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        maps = []
        for layer, head in zip((net.layer1, net.layer2, net.layer3, net.layer4), self.heads):
            x = layer(x)
            maps.append(head(x))
        return maps


class ExitAggregator(nn.Module):
    """Pixel-wise attention over the exits (their ``Res_Scoring``).

    ``forward(grey (B, 1, H, W), exits (B, 4, H, W) in [0, 1])`` -> aggregated map float32 (B, H, W)
    in [0, 1]: Σ_k exits_k · softmax_k(net(grey · exits)). As in the released code every layer,
    the last included, is conv + BN + ReLU.
    """

    def __init__(self, n_exits: int = N_EXITS, width: int = AGGREGATOR_WIDTH) -> None:
        super().__init__()
        sizes = (n_exits, width, width, width, n_exits)
        layers: list[nn.Module] = []
        for cin, cout in pairwise(sizes):
            layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, grey: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.net(grey * exits).float(), dim=1)
        return (exits * weights).sum(dim=1)


class AMECAM(nn.Module):
    """Multi-exit classifier + exit aggregator + the map's polarity (buffer ``flip``, bool scalar).

    ``forward(images (B, C, H, W), stage)`` is what training calls (through DDP when distributed):
    ``stage="classifier"`` -> exit logits float32 (B, 4); ``stage="aggregator"`` -> aggregated map
    float32 (B, H, W) from the frozen classifier (no gradient reaches it, its BatchNorm statistics stay).
    Images are float32 in [-1, 1]; any H, W that the stem's strides divide.
    """

    def __init__(self, settings: Mapping[str, Any], in_channels: int) -> None:
        super().__init__()
        self.classifier = MultiExitResNet(settings, in_channels)
        self.aggregator = ExitAggregator()
        self.register_buffer("flip", torch.zeros((), dtype=torch.bool))

    def forward(self, images: torch.Tensor, stage: str = "classifier") -> torch.Tensor:
        if stage == "classifier":
            return self.exit_logits(images)
        if stage == "aggregator":
            return self.aggregator(grey_image(images), self.frozen_exits(images))
        raise ValueError(f"unknown AME-CAM stage {stage!r}; expected 'classifier' or 'aggregator'")

    def exit_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Global averages of the 4 raw exit maps: images (B, C, H, W) -> float32 (B, 4)."""
        return torch.cat([m.float().mean(dim=(2, 3)) for m in self.classifier(images)], dim=1)

    def frozen_exits(self, images: torch.Tensor) -> torch.Tensor:
        """Exit maps of the classifier in eval mode without gradient, upsampled to H × W and min-max
        normalised per slice: images (B, C, H, W) -> float32 (B, 4, H, W) in [0, 1]."""
        size = (int(images.shape[2]), int(images.shape[3]))
        with torch.no_grad(), evaluating(self.classifier):
            maps = self.classifier(images)
        return torch.cat([upsample_and_normalise(m, size) for m in maps], dim=1)

    def unflipped_cam(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the 4 normalised exit maps and the aggregated map, min-max normalised per slice, before
        the polarity: images (B, C, H, W) -> float32 (B, H, W) in [0, 1]. Runs in eval mode, no gradient."""
        with torch.no_grad(), evaluating(self):
            exits = self.frozen_exits(images)
            fused = self.aggregator(grey_image(images), exits)
            maps = torch.cat([exits, fused.unsqueeze(1)], dim=1).mean(dim=1)
        return normalise_per_slice(maps)

    def cam(self, images: torch.Tensor, context: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        """The AME-CAM map with the polarity applied: images (B, C, H, W) -> float32 (B, H, W) in [0, 1].

        Evaluated in eval mode (the caller's mode is restored) without gradient, so it is deterministic
        and registers nothing on the model. ``context`` (other trained networks) is not needed here.
        """
        maps = self.unflipped_cam(images)
        return torch.where(self.flip, 1.0 - maps, maps)

    @torch.no_grad()
    def set_polarity(self, images: torch.Tensor) -> None:
        """C²AM's polarity rule: flip the map (map -> 1 − map) from now on when the unflipped map's mean
        over the image border (a frame of ``BORDER_FRACTION`` of the side) of ``images`` (B, C, H, W) is
        above 0.5. Pass positive slices: a negative slice's normalised map says little."""
        maps = self.unflipped_cam(images)
        frame = border_mask(maps.shape[1], maps.shape[2], maps.device)
        self.flip.fill_(bool(maps[:, frame].mean() > 0.5))

    def positive_probability(self, images: torch.Tensor) -> torch.Tensor:
        """Sigmoid of exit 4's logit (eval mode, no gradient): images (B, C, H, W) -> float32 (B,)."""
        with torch.no_grad(), evaluating(self):
            return torch.sigmoid(self.exit_logits(images)[:, -1])


def border_mask(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """bool (H, W), True on a frame of ``BORDER_FRACTION`` of each side (at least one pixel wide)."""
    dy, dx = max(1, round(BORDER_FRACTION * height)), max(1, round(BORDER_FRACTION * width))
    mask = torch.ones(height, width, dtype=torch.bool, device=device)
    mask[dy : height - dy, dx : width - dx] = False
    return mask


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``a`` (N, D) and ``b`` (M, D), clamped to
    ``SIM_RANGE``: (N, M). A zero row has similarity 0 (then the lower clamp) to everything."""
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return sim.clamp(*SIM_RANGE)


def pull_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """C²AM's rank-weighted similarity-maximisation loss over all pairs of ``embeddings`` (N, D):
    mean of −log sim_ij · exp(−α (r_ij − 1)), r_ij the rank of sim_ij in row i (0 = most similar).
    Returns a scalar."""
    sim = cosine_similarity(embeddings, embeddings)
    order = sim.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1, stable=True)
    weights = torch.exp(-RANK_ALPHA * (rank.float() - 1.0))
    return (-torch.log(sim) * weights).mean()


def push_loss(foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """C²AM's similarity-minimisation loss: mean over all pairs of −log(1 − sim(bg_i, fg_j)) for
    ``foreground`` and ``background`` (N, D). Returns a scalar."""
    return -torch.log(1.0 - cosine_similarity(background, foreground)).mean()


def c2am_loss(grey: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """The aggregator's unsupervised loss on fg = grey · map and bg = grey · (1 − map), flattened to
    (B, H·W) pixel vectors: pull(fg) + push(fg, bg) + pull(bg). ``grey`` (B, 1, H, W) in [0, 1],
    ``fused`` (B, H, W) in [0, 1]. Computed in float32 (outside autocast). Returns a scalar."""
    with torch.autocast(device_type=fused.device.type, enabled=False):
        grey, fused = grey[:, 0].float(), fused.float()
        foreground = (grey * fused).flatten(1)
        background = (grey * (1.0 - fused)).flatten(1)
        return pull_loss(foreground) + push_loss(foreground, background) + pull_loss(background)


def multi_exit_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · BCE(logit_k, y) with w = ``EXIT_WEIGHTS``: ``logits`` (B, 4), ``labels`` (B,) 0/1.
    Returns a float32 scalar."""
    target = labels.float()[:, None].expand_as(logits)
    per_exit = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(dim=0)
    return (per_exit * per_exit.new_tensor(EXIT_WEIGHTS)).sum()


def total_steps(settings: Mapping[str, Any]) -> int:
    """Optimisation steps of a run: ``classifier_steps`` + ``aggregation_steps``."""
    return int(settings["classifier_steps"]) + int(settings["aggregation_steps"])


def build(settings: Mapping[str, Any], in_channels: int) -> AMECAM:
    """An untrained :class:`AMECAM` for images of ``in_channels`` channels from the preset entry
    ``settings`` (keys ``REQUIRED_SETTINGS``; ``steps``, when given, must equal :func:`total_steps`)."""
    missing = [key for key in REQUIRED_SETTINGS if key not in settings]
    if missing:
        raise ValueError(f"amecam settings lack {missing}")
    if "steps" in settings and int(settings["steps"]) != total_steps(settings):
        raise ValueError(f"amecam: steps {settings['steps']} != classifier_steps + aggregation_steps "
                         f"({total_steps(settings)})")
    return AMECAM(settings, in_channels)


def training_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    step: int,
    settings: Mapping[str, Any],
    generator: torch.Generator,
    context: Mapping[str, nn.Module],
) -> torch.Tensor:
    """Loss of optimisation step ``step`` (0-based) on ``batch`` (``image`` float32 (B, C, H, W) in
    [-1, 1], ``label`` long (B,) 0/1).

    Steps below ``settings["classifier_steps"]``: :func:`multi_exit_loss` (only the classifier gets
    gradients). Later steps: :func:`c2am_loss` of the aggregated map (only the aggregator gets gradients;
    labels unused). ``model`` is an :class:`AMECAM`, possibly wrapped (DDP); ``generator`` and ``context``
    are not needed (no random draw, no other network). Returns a scalar.
    """
    images = batch["image"]
    if step < int(settings["classifier_steps"]):
        return multi_exit_loss(model(images, stage="classifier"), batch["label"])
    return c2am_loss(grey_image(images), model(images, stage="aggregator"))
