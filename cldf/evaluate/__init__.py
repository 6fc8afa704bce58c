"""Evaluation: per-slice metrics (:mod:`.metrics`), the comparison table (:mod:`.table`), figures (:mod:`.figures`).

The only package code besides the fully supervised upper bound that reads ground-truth masks.
"""
