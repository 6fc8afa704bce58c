"""CLDF: Contrastive Learning with Diffusion Features for weakly supervised medical image segmentation."""

__version__ = "0.1.0"
