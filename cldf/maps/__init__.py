"""Per-slice maps: diffusion features, mean-gradient maps, CAMs and the CDM saliency baseline."""

from cldf.maps.cams import METHODS as CAM_METHODS
from cldf.maps.cams import compute_cam, positive_probability
from cldf.maps.common import feature_noise, normalise_per_slice
from cldf.maps.features import extract_features
from cldf.maps.gradients import mean_gradient
from cldf.maps.run import run_cam, run_classifier_probs, run_features, run_gradient, run_saliency
from cldf.maps.saliency import cdm_saliency

__all__ = [
    "CAM_METHODS",
    "cdm_saliency",
    "compute_cam",
    "extract_features",
    "feature_noise",
    "mean_gradient",
    "normalise_per_slice",
    "positive_probability",
    "run_cam",
    "run_classifier_probs",
    "run_features",
    "run_gradient",
    "run_saliency",
]
