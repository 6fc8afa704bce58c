"""Per-slice maps: diffusion features, mean-gradient maps, CAMs and the CDM saliency baseline."""

from cldf.maps.cams import METHODS as CAM_METHODS
from cldf.maps.cams import cam_with_probs, compute_cam
from cldf.maps.common import feature_noise, normalise_per_slice
from cldf.maps.features import extract_features
from cldf.maps.gradients import mean_gradient
from cldf.maps.run import run_cam, run_features, run_gradient, run_saliency
from cldf.maps.saliency import cdm_saliency

__all__ = [
    "CAM_METHODS",
    "cam_with_probs",
    "cdm_saliency",
    "compute_cam",
    "extract_features",
    "feature_noise",
    "mean_gradient",
    "normalise_per_slice",
    "run_cam",
    "run_features",
    "run_gradient",
    "run_saliency",
]
