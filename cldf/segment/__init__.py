"""CLDF proper: pixel selection, contrastive pixel decoder and K-means segmentation (steps 7–9)."""
