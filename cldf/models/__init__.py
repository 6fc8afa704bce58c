"""CDM, noisy classifier, CAM classifier and fully supervised UNet.

``builders`` (networks, noise schedule), ``checkpoint`` (save/load), ``data`` (datasets, samplers),
``train`` (training loop, CLI ``python -m cldf.models.train``), ``sample`` (CDM sampling).
"""

from cldf.models.builders import MODEL_KINDS, NULL_CLASS, build_model, build_scheduler, count_parameters
from cldf.models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint

__all__ = [
    "MODEL_KINDS", "NULL_CLASS", "CheckpointError", "build_model", "build_scheduler", "count_parameters",
    "load_checkpoint", "load_model", "save_checkpoint",
]
