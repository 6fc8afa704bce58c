"""Slicing, normalisation, image-level labels, case splits, inverse geometry and the synthetic phantom."""
