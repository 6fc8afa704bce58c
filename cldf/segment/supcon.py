"""Supervised contrastive loss (Khosla et al., 2020, the "L_out" form), memory-bounded."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

ANCHOR_CHUNK = 1024


def _chunk_loss(
    anchors: torch.Tensor, emb: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum of the per-anchor losses of the anchors ``emb[rows]`` that have at least one positive.

    ``anchors`` (c, E) = ``emb[rows]``; ``emb`` (P, E); ``rows`` long (c,); ``y`` long (P,).
    """
    logits = anchors @ emb.T / temperature  # (c, P)
    is_self = rows.view(-1, 1) == torch.arange(emb.shape[0], device=emb.device).view(1, -1)
    logits = logits.masked_fill(is_self, float("-inf"))
    row_max = logits.max(dim=1, keepdim=True).values.detach()
    shifted = logits - row_max
    log_denominator = torch.log(torch.exp(shifted).sum(dim=1))  # (c,)
    positives = (y[rows].view(-1, 1) == y.view(1, -1)) & ~is_self
    n_pos = positives.sum(dim=1)
    mean_pos = shifted.masked_fill(~positives, 0.0).sum(dim=1) / n_pos.clamp(min=1)
    per_anchor = log_denominator - mean_pos
    return per_anchor[n_pos > 0].sum()


def supcon_loss(emb: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss of a set of embeddings.

    For each anchor i with at least one positive (another sample of the same label),
    ``L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )``;
    the loss is the mean of ``L_i`` over those anchors (anchors without a positive are excluded).
    The row maximum is subtracted before exponentiating. Anchors are processed in chunks of
    :data:`ANCHOR_CHUNK` rows, under activation checkpointing when there is more than one chunk, so
    memory is O(chunk * P) rather than O(P²) (10,000 pixels would otherwise need several GB).

    Parameters
    ----------
    emb
        float (P, E) L2-normalised embeddings.
    y
        long (P,) class labels.
    temperature
        Softmax temperature t > 0.

    Returns
    -------
    Scalar tensor. Raises ValueError if no anchor has a positive.
    """
    if emb.ndim != 2 or y.shape != (emb.shape[0],):
        raise ValueError(f"expected emb (P, E) and y (P,), got {tuple(emb.shape)} and {tuple(y.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _, counts = torch.unique(y, return_counts=True)
    n_anchors = int(counts[counts > 1].sum())
    if n_anchors == 0:
        raise ValueError("supcon_loss: no sample has a positive (every label occurs once)")
    y = y.long()
    total = emb.new_zeros(())
    for start in range(0, emb.shape[0], ANCHOR_CHUNK):
        rows = torch.arange(start, min(start + ANCHOR_CHUNK, emb.shape[0]), device=emb.device)
        anchors = emb[start : start + ANCHOR_CHUNK]
        if torch.is_grad_enabled() and emb.requires_grad and emb.shape[0] > ANCHOR_CHUNK:
            total = total + checkpoint(_chunk_loss, anchors, emb, rows, y, temperature, use_reentrant=False)
        else:
            total = total + _chunk_loss(anchors, emb, rows, y, temperature)
    return total / n_anchors
