"""Supervised contrastive loss (Khosla et al., 2020, the "L_out" form), memory-bounded."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

ANCHOR_CHUNK = 2048


def _chunk_loss(
    anchors: torch.Tensor,
    emb: torch.Tensor,
    rows: torch.Tensor,
    pos_sum: torch.Tensor,
    n_pos: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Sum of the per-anchor losses of the anchors ``emb[rows]`` that have at least one positive.

    ``anchors`` (c, E) = ``emb[rows]``; ``emb`` (P, E); ``rows`` long (c,); ``pos_sum`` (c,) the summed
    similarities z_i·z_p / t over each anchor's positives; ``n_pos`` long (c,) their number.
    """
    logits = anchors @ emb.T / temperature  # (c, P)
    logits = logits.index_put((torch.arange(len(rows), device=emb.device), rows), logits.new_tensor(float("-inf")))
    log_denominator = torch.logsumexp(logits, dim=1)  # (c,), excludes the anchor itself
    per_anchor = log_denominator - pos_sum / n_pos.clamp(min=1)
    return per_anchor[n_pos > 0].sum()


def supcon_loss(emb: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss of a set of embeddings.

    For each anchor i with at least one positive (another sample of the same label),
    ``L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )``;
    the loss is the mean of ``L_i`` over those anchors (anchors without a positive are excluded).

    The positive term is linear in the similarities, so it is computed from per-class embedding sums in
    O(P·E); only the log-denominator needs the (P × P) similarities, taken with a stable logsumexp over
    chunks of :data:`ANCHOR_CHUNK` anchors (under activation checkpointing when there is more than one
    chunk), so memory is O(chunk · P) rather than O(P²).

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
    _, cls, counts = torch.unique(y, return_inverse=True, return_counts=True)
    n_pos_all = counts[cls] - 1  # (P,)
    n_anchors = int((n_pos_all > 0).sum())
    if n_anchors == 0:
        raise ValueError("supcon_loss: no sample has a positive (every label occurs once)")
    class_sums = emb.new_zeros(len(counts), emb.shape[1]).index_add(0, cls, emb)  # (K, E)
    pos_sum_all = ((emb * class_sums[cls]).sum(1) - (emb * emb).sum(1)) / temperature  # (P,)
    total = emb.new_zeros(())
    for start in range(0, emb.shape[0], ANCHOR_CHUNK):
        stop = min(start + ANCHOR_CHUNK, emb.shape[0])
        rows = torch.arange(start, stop, device=emb.device)
        args = (emb[start:stop], emb, rows, pos_sum_all[start:stop], n_pos_all[start:stop], temperature)
        if torch.is_grad_enabled() and emb.requires_grad and emb.shape[0] > ANCHOR_CHUNK:
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total / n_anchors
