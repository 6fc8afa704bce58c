"""Pixel decoder (step 8): an MLP applied independently to every pixel's diffusion feature vector."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WIDTHS = (16, 16, 16, 16)


class PixelDecoder(nn.Module):
    """MLP ``len(channels) -> widths[0] -> ... -> widths[-1]`` with ReLU between layers, L2-normalised output.

    ``channels`` are the indices of the input channels the decoder reads (those of its feature layers and
    the image, :func:`cldf.segment.features.input_channels`); None reads all ``in_dim``. The caller always
    passes every channel of its feature source (``in_dim``); the decoder picks its own.

    No BatchNorm: the decoder is trained on class-balanced samples of selected pixels but applied to
    every pixel of a slice, whose statistics differ (mostly background), so BatchNorm's running
    statistics would not match at inference; the final L2 normalisation already fixes the output scale.
    The last layer has no activation, so embeddings may point anywhere on the unit sphere.

    Input (P, in_dim) float; output (P, widths[-1]) with unit L2 norm per row.
    """

    def __init__(self, in_dim: int, widths: Sequence[int] = DEFAULT_WIDTHS,
                 channels: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if in_dim < 1 or not widths or min(widths) < 1:
            raise ValueError(f"invalid decoder sizes in_dim={in_dim}, widths={widths}")
        self.in_dim = int(in_dim)
        self.widths = widths
        read = list(range(self.in_dim)) if channels is None else [int(c) for c in channels]
        if not read or min(read) < 0 or max(read) >= self.in_dim:
            raise ValueError(f"decoder channels {read} do not index {self.in_dim} input channels")
        self.channels = read
        self._reads_all = read == list(range(self.in_dim))
        self.register_buffer("_index", torch.tensor(read, dtype=torch.long), persistent=False)
        dims = [len(read), *widths]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The channels the decoder reads, along dim 1: (P, in_dim) -> (P, len(channels)), or
        (B, in_dim, H, W) -> (B, len(channels), H, W); no copy when it reads them all."""
        return x if self._reads_all else x.index_select(1, self._index)

    @property
    def out_dim(self) -> int:
        return self.widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(P, in_dim) -> (P, E) L2-normalised embeddings."""
        x = self.select(x)
        for k, linear in enumerate(self.linears):
            x = linear(x)
            if k < len(self.linears) - 1:
                x = F.relu(x)
        return F.normalize(x, dim=1)


def embed_slices(decoder: PixelDecoder, feats: torch.Tensor) -> torch.Tensor:
    """Embed every pixel of a batch of feature maps: (B, D, H, W) -> (B, E, H, W), unit norm along E.

    Equivalent to ``decoder`` on each pixel; implemented as 1×1 convolutions so that the (B, D, H, W)
    input is never permuted (nor copied, unless the decoder reads a subset of its channels).
    """
    if feats.ndim != 4 or feats.shape[1] != decoder.in_dim:
        raise ValueError(f"expected features (B, {decoder.in_dim}, H, W), got {tuple(feats.shape)}")
    x = decoder.select(feats)
    for k, linear in enumerate(decoder.linears):
        x = F.conv2d(x, linear.weight[:, :, None, None], linear.bias)
        if k < len(decoder.linears) - 1:
            x = F.relu(x)
    return F.normalize(x, dim=1)
