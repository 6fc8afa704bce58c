"""The method registry: every per-slice map and every segmentation method, registered once.

A **map** is computed slice by slice by a shard job (``cldf map``) from one trained network and cached as
a store (:class:`MapMethod`): the diffusion features, the mean-gradient map, the CAM classifier's
probabilities, the CDM saliency and each CAM method. A map with a ``label`` is also a baseline row of the
comparison table (its masks: per-slice Otsu inside the body). A **segmenter** is a row of the table that
is not a thresholded map (:class:`Segmenter`): CLDF and its selection ablations, the fully supervised
upper bound.

Rules, CLI choices, the schema's enum of CAM methods (:func:`cldf.config.validate_config` fills it in)
and table rows all derive from here. Adding a CAM method = one :class:`MapMethod` entry, its function
(``fn(model, batch, settings) -> {"maps": (B, H, W)}``, see :mod:`cldf.maps.run`) and its test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


MODEL_KINDS = ("cdm", "noisy_classifier", "cam_classifier", "fsl_unet")
"""The networks the pipeline trains (``cldf train --kind``; checkpoints ``models/<kind>.pt``)."""


@dataclass(frozen=True)
class MapMethod:
    """A per-slice map.

    Attributes
    ----------
    name
        Id in config, CLI and paths (a CAM's store is ``cams/<name>``).
    label
        Row label of its thresholded masks in the comparison table; ``None``: not a table row.
    family
        ``cam`` (a CAM method of the CAM classifier), ``map`` (another saliency map), ``features`` or
        ``probs``.
    model
        The trained network it reads (a model kind).
    function
        ``"module:function"``; the function maps ``(model, batch, settings)`` to arrays of the batch.
    section, keys
        Config section of its settings and the keys of that section it depends on (``None``: all), so a
        change of another key does not re-run it.
    splits
        Splits it is computed for (``None``: every slice).
    """

    name: str
    label: str | None
    family: str
    model: str
    function: str
    section: str
    keys: tuple[str, ...] | None = None
    splits: tuple[str, ...] | None = None

    @property
    def store(self) -> str:
        """The map's name in artifact paths (``map`` wildcard of the catalogue)."""
        return f"cams/{self.name}" if self.family == "cam" else self.name

    def load(self) -> Callable[..., dict[str, Any]]:
        """The function computing the map (imported on first use)."""
        module, attr = self.function.split(":")
        return getattr(importlib.import_module(module), attr)


MAPS: dict[str, MapMethod] = {
    m.name: m
    for m in [
        MapMethod("features", None, "features", "cdm", "cldf.maps.features:features_map", "features"),
        MapMethod("mean_gradient", "MG", "map", "noisy_classifier", "cldf.maps.gradients:gradient_map", "gradient"),
        MapMethod("classifier_probs", None, "probs", "cam_classifier", "cldf.maps.cams:probability_map", "cams",
                  ("batch_size",)),
        MapMethod("saliency", "CDM saliency", "map", "cdm", "cldf.maps.saliency:saliency_map", "saliency",
                  splits=("test",)),
        MapMethod("gradcam", "GradCAM", "cam", "cam_classifier", "cldf.maps.cams:gradcam", "cams",
                  ("layers", "batch_size")),
        MapMethod("gradcampp", "GradCAM++", "cam", "cam_classifier", "cldf.maps.cams:gradcampp", "cams",
                  ("layers", "batch_size")),
        MapMethod("scorecam", "ScoreCAM", "cam", "cam_classifier", "cldf.maps.cams:scorecam", "cams",
                  ("layers", "scorecam_channels", "batch_size")),
        MapMethod("layercam", "LayerCAM", "cam", "cam_classifier", "cldf.maps.cams:layercam", "cams",
                  ("layercam_layers", "batch_size")),
    ]
}


def cam_methods() -> list[str]:
    """Names of the registered CAM methods (the enum of ``cams.methods`` and ``cldf.cam``)."""
    return [m.name for m in MAPS.values() if m.family == "cam"]


def map_by_store(store: str) -> MapMethod:
    """The map whose artifact name is ``store`` (``features``, ``cams/gradcam``, ...)."""
    for method in MAPS.values():
        if method.store == store:
            return method
    raise KeyError(f"no registered map is stored as {store!r}")


def map_settings(config: dict[str, Any], method: MapMethod) -> dict[str, Any]:
    """The settings a map depends on, from its config section."""
    section = config[method.section]
    keys = method.keys if method.keys is not None else tuple(section)
    return {k: section[k] for k in keys}


SELECTION_MAPS = {"fused": ("cam", "mg"), "cam": ("cam",), "mg": ("mg",)}
"""The maps each pixel-selection mode reads: ``fused`` is CLDF, ``cam`` and ``mg`` its ablations."""


@dataclass(frozen=True)
class Segmenter:
    """A table row that is not a thresholded map.

    ``selection`` is the pixel-selection mode of its CLDF decoder (``fused``, ``cam``, ``mg``), or ``None``
    for the fully supervised UNet; ``label`` may hold ``{cam}``, the label of the CAM CLDF starts from.
    """

    name: str
    label: str
    selection: str | None

    @property
    def uses_cam(self) -> bool:
        return self.selection in ("fused", "cam")


SEGMENTERS: dict[str, Segmenter] = {
    s.name: s
    for s in [
        Segmenter("cldf", "CLDF", "fused"),
        Segmenter("cam_cl", "{cam}+CL", "cam"),
        Segmenter("mg_cl", "MG+CL", "mg"),
        Segmenter("fsl_unet", "FSL UNet (upper bound)", None),
    ]
}
