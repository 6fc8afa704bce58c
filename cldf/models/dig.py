"""DiG — diffusion-guided weakly supervised segmentation (Yoon et al., ECCV 2024), a minimal faithful version.

The original (``yoon307/DiG``: ``models/model_ECCV24_DiG.py``, ``networks/mctformer.py``) trains an
MCTformer-V2 ViT (one class token per class) with image-level labels, and a *diffusion branch* beside it:

- **Diffusion features.** The frozen, unconditional diffusion UNet is run on ``x_t`` at t ∈ {0 … 4}; the
  activations of a few of its layers, resized to the ViT's token grid, are concatenated over layers and
  timesteps and reduced by a residual conv block.
- **Cross-attention (LFCA).** The (detached) queries of the ViT's last two layers attend to the diffusion
  features; the class token's output gives a classification logit, the patch tokens' output (added back to
  the features) a diffusion-guided CAM. One cross-attention module per ViT layer; their outputs are averaged.
- **Losses.** Classification of the ViT (class token and top-k pooled patch CAM); classification plus
  distillation of the ViT's (detached) logits into the diffusion branch; *CAM distillation* of the detached
  diffusion CAM into the ViT's CAM; classification of the one-step denoised ``x̂0`` (from ``x_t`` at
  t = 100); *consistency* between the attention-refined CAMs of ``x0`` (detached) and ``x̂0``. The two CAM
  losses start after a warm-up (the original: after epoch 9).
- **Inference.** The ViT alone: its attention-refined CAM (class-to-patch attention × patch CAM,
  propagated by the patch-to-patch attention), averaged with that of the flipped image. ``cam_map: fused``
  skips the propagation: the original's ViT starts from ImageNet DeiT weights, ours from scratch, and a tiny
  ViT trained for minutes has patch-to-patch attention that is no affinity (the refined map inverts the
  blob of the test phantom in about half of the seeds tried), while its fused map is reliable.

Here: one class token (the positive class; negatives are label 0, as in multi-label training with no class
present), binary cross-entropy in place of the multi-label soft-margin loss (identical for one class), a
Bernoulli KL for the distillation (the original's ``cat(p, 1 - p)`` KL with a sigmoid in place of a softmax
over classes), the CDM under its null class as the unconditional diffusion model, ε-prediction for ``x̂0``,
no stochastic depth (every random draw comes from the caller's generator), trained from scratch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cldf.models.tensors import named_layers, noised_batch, normalise_per_slice
from cldf.models.builders import NULL_CLASS, alphas_cumprod, build_scheduler

TOP_K = 3
"""Patch CAMs are pooled to a logit by the mean of their top-3 minus the mean of their bottom-3 (original)."""


class ViTOutput(NamedTuple):
    """What DiG takes from one ViT pass over images (B, C, H, W) with a g × g token grid."""

    cls_logit: torch.Tensor  # (B,): class token, averaged over the embedding
    patch_logit: torch.Tensor  # (B,): top-k pooled patch CAM
    cam: torch.Tensor  # (B, 1, g, g): ReLU of the patch head
    fcam: torch.Tensor  # (B, 1, g, g): fused CAM, class-to-patch attention × ``cam``
    rcam: torch.Tensor  # (B, 1, g, g): refined CAM, ``fcam`` propagated by the patch-to-patch attention
    queries: tuple[torch.Tensor, ...]  # (B, 1 + g², D) queries of the last two layers, detached


def _top_k_logit(cam: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) → (B,): mean of the top-k positive part minus mean of the top-k negative part."""
    flat = cam.flatten(1)
    k = min(TOP_K, flat.shape[1])
    return F.relu(flat).topk(k, dim=1).values.mean(1) - F.relu(-flat).topk(k, dim=1).values.mean(1)


def _max_norm(cam: torch.Tensor) -> torch.Tensor:
    """The original's per-map normalisation of (B, 1, h, w): ReLU, then (x - min) / (max - min)."""
    cam = F.relu(cam)
    lo = cam.amin(dim=(2, 3), keepdim=True)
    hi = cam.amax(dim=(2, 3), keepdim=True)
    return F.relu(cam - lo - 1e-5) / (hi - lo + 1e-5)


class Attention(nn.Module):
    """Multi-head self-attention that also returns its attention (B, heads, N, N) and queries (B, N, D)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), attn, q.transpose(1, 2).reshape(b, n, d)


class Block(nn.Module):
    """Pre-norm transformer block (attention, MLP ×4); returns tokens, attention and queries."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, attn, q = self.attn(self.norm1(x))
        x = x + out
        return x + self.mlp(self.norm2(x)), attn, q


class ClassTokenViT(nn.Module):
    """MCTformer-V2-style ViT with one (positive-class) token: images (B, C, H, W) → :class:`ViTOutput`."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if image_size % patch_size or dim % heads or depth < 2:
            raise ValueError(f"DiG ViT: need image_size % patch_size == 0, dim % heads == 0, depth >= 2; got image "
                             f"size {image_size}, patch size {patch_size}, dim {dim}, heads {heads}, depth {depth}")
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=0.02))
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1 + self.grid**2, dim), std=0.02))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Conv2d(dim, 1, 3, padding=1)

    def forward(self, images: torch.Tensor) -> ViTOutput:
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        if patches.shape[1] != self.grid**2:
            raise ValueError(f"DiG ViT was built for a {self.grid}x{self.grid} token grid; images "
                             f"{tuple(images.shape[-2:])} give {patches.shape[1]} tokens")
        x = torch.cat([self.cls_token.expand(len(images), -1, -1), patches], 1) + self.pos_embed
        attns, queries = [], []
        for block in self.blocks:
            x, attn, q = block(x)
            attns.append(attn.mean(1))
            queries.append(q)
        b, g = len(images), self.grid
        patch_cam = self.head(x[:, 1:].transpose(1, 2).reshape(b, -1, g, g))
        attn = torch.stack(attns).sum(0)  # (B, N, N), summed over layers, averaged over heads
        cam = F.relu(patch_cam)
        fcam = attn[:, :1, 1:].reshape(b, 1, g, g) * cam
        rcam = (attn[:, 1:, 1:] @ fcam.reshape(b, -1, 1)).reshape(b, 1, g, g)
        return ViTOutput(x[:, 0].mean(-1), _top_k_logit(patch_cam), cam, fcam, rcam,
                         tuple(q.detach() for q in queries[-2:]))


class FeatureBlock(nn.Module):
    """The original's residual reduction of the concatenated features: (B, C_in, h, w) → (B, C_out, h, w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(1, out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(1, out_channels),
        )
        self.branch = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.branch(x))


class CrossAttention(nn.Module):
    """LFCA: ViT queries (B, 1 + g², D) attend to diffusion features (B, T·D_f, h, w).

    Returns the class token's output (B, D) and the refined features (B, D_f, h, w).
    """

    def __init__(self, dim: int, feature_dim: int, n_timesteps: int, heads: int) -> None:
        super().__init__()
        if dim % heads or feature_dim % heads:
            raise ValueError(f"DiG: dim {dim} and the summed feature_channels {feature_dim} must be divisible by "
                             f"cross_heads {heads}")
        self.heads = heads
        self.reduce = FeatureBlock(n_timesteps * feature_dim, feature_dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Conv2d(feature_dim, dim, 1)
        self.value = nn.Conv2d(feature_dim, feature_dim, 3, padding=1)
        self.norm_k = nn.LayerNorm(dim, eps=1e-6)
        self.norm_v = nn.LayerNorm(feature_dim, eps=1e-6)
        self.class_in = nn.Linear(feature_dim, dim)
        self.class_norm = nn.LayerNorm(dim, eps=1e-6)
        self.class_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.patch_in = nn.Conv2d(feature_dim, feature_dim, 3, padding=1)
        self.patch_norm = nn.GroupNorm(1, feature_dim, eps=1e-6)
        self.patch_mlp = nn.Sequential(nn.Conv2d(feature_dim, 4 * feature_dim, 1), nn.GELU(),
                                       nn.Conv2d(4 * feature_dim, feature_dim, 1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, E) → (B, heads, N, E / heads)."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, dim = queries.shape
        g = round((n - 1) ** 0.5)
        kv = self.reduce(features)
        q = self._heads(self.norm_k(self.query(queries)))
        k = self._heads(self.norm_k(self.key(kv).flatten(2).transpose(1, 2)))
        v = self._heads(self.norm_v(self.value(kv).flatten(2).transpose(1, 2)))
        attn = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        cls = self.class_in(out[:, 0]) + queries[:, 0]
        cls = cls + self.class_mlp(self.class_norm(cls))
        patch = self.patch_in(out[:, 1:].transpose(1, 2).reshape(b, -1, g, g))
        patch = kv + F.interpolate(patch, size=kv.shape[-2:], mode="bilinear", align_corners=False)
        return cls, patch + self.patch_mlp(self.patch_norm(patch))


class DiffusionBranch(NamedTuple):
    """Outputs of DiG's diffusion branch for a batch (B, ...) with features at h × w."""

    cls_logit: torch.Tensor  # (B,)
    patch_logit: torch.Tensor  # (B,)
    cam: torch.Tensor  # (B, 1, h, w), ReLU'd


CAM_MAPS = {"refined": "rcam", "fused": "fcam"}
"""Inference map of the ViT (a :class:`ViTOutput` field): ``refined`` (the original's) or ``fused`` (MCTformer-V2's
fused CAM, without the patch-to-patch propagation: a from-scratch ViT's patch attention is no affinity yet)."""


class DiG(nn.Module):
    """The ViT (``vit``), two cross-attention modules (``cross``, on the last two layers) and the CAM head.

    ``cam_map`` (one of :data:`CAM_MAPS`) is the ViT map :meth:`cam` returns.
    """

    def __init__(self, in_channels: int, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 cross_heads: int, feature_channels: Sequence[int], n_timesteps: int, cam_map: str) -> None:
        super().__init__()
        if cam_map not in CAM_MAPS:
            raise ValueError(f"DiG cam_map {cam_map!r}: expected one of {list(CAM_MAPS)}")
        self.cam_map = cam_map
        self.vit = ClassTokenViT(in_channels, image_size, patch_size, dim, depth, heads)
        self.feature_dim = sum(int(c) for c in feature_channels)
        self.n_timesteps = n_timesteps
        self.cross = nn.ModuleList(CrossAttention(dim, self.feature_dim, n_timesteps, cross_heads) for _ in range(2))
        self.cam_head = nn.Sequential(nn.Conv2d(self.feature_dim, self.feature_dim, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(self.feature_dim, 1, 1))

    def diffusion_branch(self, queries: Sequence[torch.Tensor], features: torch.Tensor) -> DiffusionBranch:
        """Cross-attend the ViT queries (B, 1 + g², D) ×2 to features (B, T·D_f, h, w)."""
        if features.shape[1] != self.n_timesteps * self.feature_dim:
            raise ValueError(f"DiG was built for {self.n_timesteps} timesteps x {self.feature_dim} feature channels "
                             f"(settings feature_channels); the CDM layers give {features.shape[1]} in all")
        outs = [module(q, features) for module, q in zip(self.cross, queries)]
        cls = torch.stack([c for c, _ in outs]).mean(0)
        cam = self.cam_head(torch.stack([p for _, p in outs]).mean(0))
        return DiffusionBranch(cls.mean(-1), _top_k_logit(cam), F.relu(cam))

    def forward(self, images: torch.Tensor, features: torch.Tensor,
                denoised: torch.Tensor) -> tuple[ViTOutput, DiffusionBranch, ViTOutput]:
        """One training pass: the ViT on images (B, C, H, W), the diffusion branch on their CDM features
        (B, T·D_f, h, w), the ViT on the denoised images x̂0 (B, C, H, W)."""
        out = self.vit(images)
        return out, self.diffusion_branch(out.queries, features), self.vit(denoised)

    @torch.no_grad()
    def positive_probability(self, images: torch.Tensor) -> torch.Tensor:
        """P(positive) (B,) from the ViT's class token, for images (B, C, H, W)."""
        return torch.sigmoid(self.vit(images).cls_logit)

    @torch.no_grad()
    def cam(self, images: torch.Tensor, context: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
        """DiG's map of the positive class: float32 (B, H, W) in [0, 1] for images (B, C, H, W).

        As the original's inference: the ViT's ``cam_map`` plus that of the flipped image, upsampled (bilinear)
        and min-max normalised per slice. Deterministic; the CDM (``context``) guides training only.
        """
        maps = [getattr(self.vit(x), CAM_MAPS[self.cam_map]) for x in (images, images.flip(-1))]
        up = F.interpolate(maps[0] + maps[1].flip(-1), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return normalise_per_slice(up[:, 0]).float()


def build(settings: Mapping[str, Any], in_channels: int) -> DiG:
    """An untrained :class:`DiG` from its preset entry plus ``image_size``.

    Model keys: ``patch_size``, ``dim``, ``depth``, ``heads`` (ViT), ``cross_heads`` (cross-attention),
    ``feature_channels`` (channels of each of ``feature_layers`` in the CDM), ``feature_timesteps``, ``cam_map``
    (:data:`CAM_MAPS`). The loss reads ``feature_layers``, ``consistency_t``, ``warmup_steps``, ``kd_temperature``,
    ``kd_alpha`` and ``loss_weights`` (``classification``, ``diffusion``, ``cam_distillation``,
    ``denoised_classification``, ``consistency``).
    """
    return DiG(in_channels, int(settings["image_size"]), int(settings["patch_size"]), int(settings["dim"]),
               int(settings["depth"]), int(settings["heads"]), int(settings["cross_heads"]),
               [int(c) for c in settings["feature_channels"]], len(settings["feature_timesteps"]),
               str(settings["cam_map"]))


class _Captured(Exception):
    """Raised by the last feature hook: the rest of the CDM's forward pass is not needed."""


def tapped_features(cdm: nn.Module, x_t: torch.Tensor, t: torch.Tensor, layers: Sequence[str],
                    grid: int) -> torch.Tensor:
    """Activations of the CDM ``layers`` for ``x_t`` (N, C, H, W) at timesteps ``t`` (N,), null class.

    Each layer's output (the first tensor when it returns a tuple, as MONAI's down blocks do) is resized to
    grid × grid (bilinear, as the original) and the layers are concatenated: (N, ΣC_k, grid, grid). The
    forward pass stops after the last tapped layer; the hooks are removed whatever happens.
    """
    captured: dict[int, torch.Tensor] = {}

    def hook(k: int) -> Callable[[nn.Module, tuple, Any], None]:
        def _store(_module: nn.Module, _inputs: tuple, output: Any) -> None:
            captured[k] = output[0] if isinstance(output, tuple) else output
            if len(captured) == len(layers):
                raise _Captured

        return _store

    handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(named_layers(cdm, layers))]
    try:
        cdm(x_t, timesteps=t, class_labels=torch.full_like(t, NULL_CLASS))
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    resized = [F.interpolate(captured[k].float(), size=(grid, grid), mode="bilinear", align_corners=True)
               for k in range(len(layers))]
    return torch.cat(resized, 1)


@torch.no_grad()
def diffusion_inputs(cdm: nn.Module, images: torch.Tensor, settings: Mapping[str, Any], grid: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen CDM gives DiG for images (B, C, H, W), noise drawn from ``generator``.

    Returns the features at ``feature_timesteps``, concatenated over timesteps (B, T·ΣC_k, grid, grid), and the
    one-step denoised x̂0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t (B, C, H, W) in [-1, 1] at t = ``consistency_t``.
    """
    scheduler = build_scheduler()
    timesteps = [int(t) for t in settings["feature_timesteps"]]
    n_t, b = len(timesteps), len(images)
    noise = torch.randn((n_t + 1, *images.shape), generator=generator, device=images.device)
    x_t, t = noised_batch(scheduler, images, timesteps, noise[:n_t])
    feats = tapped_features(cdm, x_t, t, list(settings["feature_layers"]), grid)
    feats = feats.reshape(n_t, b, -1, grid, grid).transpose(0, 1).reshape(b, -1, grid, grid)
    x_t, t = noised_batch(scheduler, images, [int(settings["consistency_t"])], noise[n_t:])
    eps = cdm(x_t, timesteps=t, class_labels=torch.full_like(t, NULL_CLASS))
    abar = alphas_cumprod(scheduler, images.device)[t].view(-1, 1, 1, 1)
    x_hat = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    return feats, x_hat


def _binary_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(Bern(σ(teacher / T)) ‖ Bern(σ(student / T))), batch mean, for logits (B,)."""
    s, t = student / temperature, teacher.detach() / temperature
    log_t = torch.stack([F.logsigmoid(t), F.logsigmoid(-t)])
    log_s = torch.stack([F.logsigmoid(s), F.logsigmoid(-s)])
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum(0).mean()


def _cam_l1(student: torch.Tensor, teacher: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean |max_norm(teacher) - max_norm(student)| over positive slices' pixels (the original's masked L1)."""
    student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return ((_max_norm(teacher).detach() - _max_norm(student)) * positive.view(-1, 1, 1, 1)).abs().mean()


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], step: int, settings: Mapping[str, Any],
                  generator: torch.Generator, context: Mapping[str, nn.Module]) -> torch.Tensor:
    """DiG's loss of one batch: ``image`` float32 (B, C, H, W) in [-1, 1], ``label`` long (B,) 0/1.

    ``model``: a :class:`DiG` or a wrapper that forwards to it (DistributedDataParallel). ``context['cdm']``
    is the frozen CDM (run under no-grad); ``step`` (0-based) gates the two CAM losses, which start at
    ``warmup_steps``; every random draw comes from ``generator``.
    """
    images, y = batch["image"], batch["label"].float()
    w = settings["loss_weights"]
    temperature, alpha = float(settings["kd_temperature"]), float(settings["kd_alpha"])
    grid = int(settings["image_size"]) // int(settings["patch_size"])
    out, diff, hat = model(images, *diffusion_inputs(context["cdm"], images, settings, grid, generator))

    def bce(logit: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logit, y)

    loss = w["classification"] * (bce(out.cls_logit) + bce(out.patch_logit))
    distill = (_binary_distillation(diff.cls_logit, out.cls_logit, temperature)
               + _binary_distillation(diff.patch_logit, out.patch_logit, temperature)) / 2
    loss = loss + w["diffusion"] * (alpha * (bce(diff.cls_logit) + bce(diff.patch_logit)) + (1 - alpha) * distill)
    loss = loss + w["denoised_classification"] * (bce(hat.cls_logit) + bce(hat.patch_logit))
    if step >= int(settings["warmup_steps"]):
        loss = loss + w["cam_distillation"] * _cam_l1(out.cam, diff.cam, y)
        loss = loss + w["consistency"] * _cam_l1(hat.rcam, out.rcam, y)
    return loss
