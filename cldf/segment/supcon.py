"""Supervised contrastive loss (Khosla et al., 2020, the "L_out" form), memory-bounded and cache-friendly."""

from __future__ import annotations

import torch

ANCHOR_CHUNK = 256
KEEP_BYTES = 1 << 28
"""The forward keeps its (P × P) exponentials for the backward up to this size (256 MiB: P ≈ 8,000 in float32)."""


def _similarity_chunk(emb: torch.Tensor, start: int, stop: int, temperature: float) -> torch.Tensor:
    """Logits (c, P) = emb[start:stop] · embᵀ / t with each anchor's own entry (the diagonal) set to -inf."""
    logits = emb[start:stop] @ emb.T
    logits.mul_(1.0 / temperature)
    rows = torch.arange(stop - start, device=emb.device)
    logits[rows, rows + start] = float("-inf")
    return logits


class _LogDenominator(torch.autograd.Function):
    """Per-anchor ``logsumexp_{a != i}(z_i · z_a / t)``, (P, E) -> (P,), in chunks of anchors.

    With ``S`` the row-softmax of the similarities and ``G = diag(g) S`` for the incoming gradient g (P,),
    the gradient is ``(G + Gᵀ) Z / t``. The forward exponentiates each chunk once, shifted by its row
    maxima, and keeps the (P × P) exponentials for the backward while they fit in :data:`KEEP_BYTES`
    (the backward then only rescales them); above that it keeps only its (P,) result and the backward
    recomputes each chunk. Chunks of a few hundred anchors stay in the CPU cache.
    """

    @staticmethod
    def forward(ctx, emb: torch.Tensor, temperature: float) -> torch.Tensor:
        n = emb.shape[0]
        log_denominator, row_max = emb.new_empty(n), emb.new_empty(n)
        keep = n * n * emb.element_size() <= KEEP_BYTES
        kept = []
        for start in range(0, n, ANCHOR_CHUNK):
            stop = min(start + ANCHOR_CHUNK, n)
            chunk = _similarity_chunk(emb, start, stop, temperature)
            row_max[start:stop] = chunk.amax(dim=1)
            chunk.sub_(row_max[start:stop, None]).exp_()  # exp(s - max): the diagonal's -inf becomes 0
            log_denominator[start:stop] = row_max[start:stop] + chunk.sum(dim=1).log()
            if keep:
                kept.append(chunk)
        ctx.save_for_backward(emb, log_denominator, row_max)
        ctx.temperature, ctx.kept = temperature, kept if keep else None
        return log_denominator

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        emb, log_denominator, row_max = ctx.saved_tensors
        scale = grad_output / ctx.temperature  # (P,)
        grad = torch.zeros_like(emb)
        for k, start in enumerate(range(0, emb.shape[0], ANCHOR_CHUNK)):
            stop = min(start + ANCHOR_CHUNK, emb.shape[0])
            if ctx.kept is not None:  # softmax = exp(s - max) · exp(max - logsumexp)
                g = ctx.kept[k] * ((row_max[start:stop] - log_denominator[start:stop]).exp() * scale[start:stop])[:, None]
            else:
                g = _similarity_chunk(emb, start, stop, ctx.temperature)
                g.sub_(log_denominator[start:stop, None]).exp_().mul_(scale[start:stop, None])  # (c, P)
            grad[start:stop] += g @ emb
            grad += g.T @ emb[start:stop]
        return grad, None


REDUCTIONS = ("mean", "sum")


def supcon_loss(emb: torch.Tensor, y: torch.Tensor, temperature: float = 0.1, reduction: str = "mean",
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised contrastive loss of a set of embeddings.

    For each anchor i with at least one positive (another sample of the same label),
    ``L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )``;
    the loss is the mean (``reduction="mean"``) or, as in the paper's equation 1, the sum (``"sum"``) of
    ``L_i`` over those anchors (anchors without a positive are excluded). With ``weights`` ``w_i``, the sum is
    ``sum_i w_i L_i`` and the mean ``sum_i w_i L_i / sum_i w_i``: an anchor counts by its weight, while every
    sample still serves as a positive and in the denominators unweighted.

    The positive term is linear in the similarities, so it is computed from per-class embedding sums in
    O(P·E); only the log-denominator needs the (P × P) similarities, computed chunk by chunk
    (:class:`_LogDenominator`); they are kept for the backward only up to :data:`KEEP_BYTES`, so memory
    stays bounded whatever P.

    Parameters
    ----------
    emb
        float (P, E) L2-normalised embeddings.
    y
        long (P,) class labels.
    temperature
        Softmax temperature t > 0.
    reduction
        ``mean`` or ``sum`` over the anchors.
    weights
        float (P,) non-negative anchor weights, or None (every anchor 1).

    Returns
    -------
    Scalar tensor. Raises ValueError if no anchor has a positive, or if the anchors' weights sum to 0
    under ``mean``.
    """
    if emb.ndim != 2 or y.shape != (emb.shape[0],):
        raise ValueError(f"expected emb (P, E) and y (P,), got {tuple(emb.shape)} and {tuple(y.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if weights is not None and (weights.shape != y.shape or bool((weights < 0).any())):
        raise ValueError(f"weights must be (P,) = {tuple(y.shape)} and non-negative, got {tuple(weights.shape)}")
    _, cls, counts = torch.unique(y, return_inverse=True, return_counts=True)
    n_pos = counts[cls] - 1  # (P,)
    is_anchor = n_pos > 0
    n_anchors = int(is_anchor.sum())
    if n_anchors == 0:
        raise ValueError("supcon_loss: no sample has a positive (every label occurs once)")
    class_sums = emb.new_zeros(len(counts), emb.shape[1]).index_add(0, cls, emb)  # (K, E)
    pos_sum = ((emb * class_sums[cls]).sum(1) - (emb * emb).sum(1)) / temperature  # (P,)
    per_anchor = _LogDenominator.apply(emb, float(temperature)) - pos_sum / n_pos.clamp(min=1)
    if weights is None:
        total = per_anchor[is_anchor].sum()
        return total if reduction == "sum" else total / n_anchors
    w = weights.to(per_anchor)[is_anchor]
    total = (w * per_anchor[is_anchor]).sum()
    if reduction == "sum":
        return total
    if float(w.sum()) <= 0:
        raise ValueError("supcon_loss: the anchors' weights sum to 0")
    return total / w.sum()
