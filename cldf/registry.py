"""The method registry: every per-slice map and every row of the comparison table, registered once.

A **map** is computed slice by slice by a shard job (``cldf map``) from one trained network and cached as
a store (:class:`MapMethod`): the diffusion features, the mean-gradient map, the CAM classifier's
probabilities, the CDM saliency and each CAM method. A map with a ``label`` is also a thresholded
baseline row of the table (its masks: the map above the threshold chosen on validation, inside the body).
The other rows are **segmenters** (:class:`Segmenter`): the one-channel intensity threshold, CLDF and its
selection ablations, the fully supervised upper bound.

Rules, CLI choices, the schema's enum of CAM methods (:func:`cldf.config.validate_config` fills it in),
table rows and their labels all derive from here. Adding a CAM method = one :class:`MapMethod` entry, its
function (``fn(model, batch, settings) -> {"maps": (B, H, W)}``, see :mod:`cldf.maps.run`) and its test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

METHOD_NETWORKS = {"amecam": (), "seam": (), "dig": ("cdm",)}
"""Networks of other weakly supervised methods, each in ``cldf/models/<kind>.py`` (``build``, ``training_loss``,
a model with ``cam`` and ``positive_probability``), with the frozen networks its training reads."""
MODEL_KINDS = ("cdm", "noisy_classifier", "cam_classifier", "fsl_unet", *METHOD_NETWORKS)
"""The networks the pipeline trains (``cldf train --kind``; checkpoints ``models/<kind>.pt``)."""

PROTOCOLS = ("labelled", "unlabelled")
"""``labelled``: the test slices' image-level labels are known (the paper's protocol); ``unlabelled``:
nothing about a test slice is known (no label read, CDM conditioning and gate chosen on validation)."""

ROWS = ("all", "val+test", "evaluation", "decoder")
"""Which slices a map is computed for: every slice; validation and test slices; the positive validation
slices (on which its threshold is chosen) and the test slices; the decoder's training slices (capped) and
the validation slices (:func:`cldf.data.splits.feature_rows`). A CAM that CLDF starts from is computed for
every slice (its selection reads the training slices), any other CAM for ``evaluation`` only."""


@dataclass(frozen=True)
class MapMethod:
    """A per-slice map.

    Attributes
    ----------
    name
        Id in config, CLI, paths and ``metrics.csv``.
    label
        Row label in printed tables when its thresholded masks are a baseline row; ``None``: no row.
    family
        ``cam`` (a CAM of the CAM classifier), ``map`` (another saliency map), ``features`` or ``probs``.
    model
        The trained network it reads (a model kind), or a tuple of kinds (its function then gets a dict
        ``{kind: network}``).
    function
        ``"module:function"``; the function maps ``(model, batch, settings)`` to arrays of the batch.
    settings
        Dotted config keys it depends on (``cams.batch_size``); a change of any other key does not re-run it.
    rows
        One of :data:`ROWS`.
    per_layer
        The map is stored per target layer (``layers`` (L, H, W)); which layers are fused (element-wise
        max) is chosen on validation (``choices.layercam_layers``) and written to the final ``cams/<name>``.
    paper
        Dice reported in the paper per dataset family (``brats``, ``flare``), where it reports one.
    """

    name: str
    label: str | None
    family: str
    model: str | tuple[str, ...]
    function: str
    settings: tuple[str, ...]
    rows: str = "all"
    per_layer: bool = False
    paper: Mapping[str, float] = field(default_factory=dict)

    @property
    def models(self) -> tuple[str, ...]:
        """The model kinds it reads."""
        return (self.model,) if isinstance(self.model, str) else tuple(self.model)

    @property
    def store(self) -> str:
        """The map's name in artifact paths as computed (``map`` wildcard of the catalogue)."""
        if self.family != "cam":
            return self.name
        return f"cams/{self.name}_layers" if self.per_layer else f"cams/{self.name}"

    @property
    def final_store(self) -> str:
        """The store the rest of the pipeline reads (the fused one for a per-layer CAM)."""
        return f"cams/{self.name}" if self.family == "cam" else self.name

    def load(self) -> Callable[..., dict[str, Any]]:
        """The function computing the map (imported on first use)."""
        module, attr = self.function.split(":")
        return getattr(importlib.import_module(module), attr)


_CAM_NET = "cam_classifier"
MAPS: dict[str, MapMethod] = {
    m.name: m
    for m in [
        MapMethod("features", None, "features", "cdm", "cldf.maps.features:features_map",
                  ("features.timesteps", "features.layers", "features.batch_size", "features.max_train_slices"),
                  rows="decoder"),
        MapMethod("mean_gradient", "MG", "map", "noisy_classifier", "cldf.maps.gradients:gradient_map",
                  ("gradient.timesteps", "gradient.reduce", "gradient.batch_size")),
        MapMethod("classifier_probs", None, "probs", _CAM_NET, "cldf.maps.cams:probability_map", ("cams.batch_size",),
                  rows="val+test"),
        MapMethod("cdm_saliency", "CDM saliency (null-class variant)", "map", "cdm", "cldf.maps.saliency:saliency_map",
                  ("saliency.noise_level", "saliency.ddim_steps", "saliency.batch_size"), rows="evaluation"),
        MapMethod("cdm_hu", "CDM (Hu et al.)", "map", ("cdm", "noisy_classifier"), "cldf.maps.cdm_hu:cdm_hu_map",
                  ("cdm_hu.t_start", "cdm_hu.moves", "cdm_hu.guidance_scale", "cdm_hu.perturbation",
                   "cdm_hu.batch_size"), rows="evaluation"),
        MapMethod("gradcam", "GradCAM", "cam", _CAM_NET, "cldf.maps.cams:gradcam", ("cams.layers", "cams.batch_size")),
        MapMethod("gradcampp", "GradCAM++", "cam", _CAM_NET, "cldf.maps.cams:gradcampp",
                  ("cams.layers", "cams.batch_size")),
        MapMethod("scorecam", "ScoreCAM", "cam", _CAM_NET, "cldf.maps.cams:scorecam",
                  ("cams.layers", "cams.scorecam_channels", "cams.batch_size")),
        MapMethod("layercam", "LayerCAM", "cam", _CAM_NET, "cldf.maps.cams:layercam_layers",
                  ("choices.layercam_layers", "cams.batch_size"), per_layer=True),
        MapMethod("amecam", "AME-CAM", "cam", "amecam", "cldf.maps.trained:method_map", ("cams.batch_size",)),
        MapMethod("seam", "SEAM", "map", "seam", "cldf.maps.trained:method_map", ("cams.batch_size",), rows="evaluation"),
        MapMethod("dig", "DiG", "map", "dig", "cldf.maps.trained:method_map", ("cams.batch_size",), rows="evaluation",
                  paper={"brats": 0.535}),
    ]
}


def cam_methods() -> list[str]:
    """Names of the registered CAM methods (the enum of ``cams.methods`` and ``cldf.cam``)."""
    return [m.name for m in MAPS.values() if m.family == "cam"]


def map_by_store(store: str) -> MapMethod:
    """The map whose computed store is ``store`` (``features``, ``cams/gradcam``, ``cams/layercam_layers``)."""
    for method in MAPS.values():
        if method.store == store:
            return method
    raise KeyError(f"no registered map is stored as {store!r}")


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """The value of a dotted config key (``cams.batch_size``)."""
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


def map_settings(config: Mapping[str, Any], method: MapMethod) -> dict[str, Any]:
    """The settings a map depends on: ``{leaf key: value}`` of its dotted config keys."""
    return {key.rsplit(".", 1)[-1]: config_value(config, key) for key in method.settings}


SELECTION_MAPS = {"fused": ("cam", "mg"), "cam": ("cam",), "mg": ("mg",)}
"""The maps each pixel-selection mode reads: ``fused`` is CLDF, ``cam`` and ``mg`` its ablations."""


@dataclass(frozen=True)
class Segmenter:
    """A table row that is not a thresholded map.

    ``selection`` is the pixel-selection mode of a CLDF decoder (:data:`SELECTION_MAPS`), or ``None``;
    ``label`` may hold ``{cam}``, the label of the CAM the row starts from; ``gated``: under the unlabelled
    protocol its masks of slices the classifier calls negative are emptied (every row but the fully
    supervised UNet, which needs no classifier). ``ablation``: a selection ablation of CLDF, a row of
    Table 3 only (``table3.csv``), not of the comparison table ``metrics.csv``.
    """

    name: str
    label: str
    selection: str | None = None
    gated: bool = True
    paper: Mapping[str, float] = field(default_factory=dict)
    ablation: bool = False

    @property
    def uses_cam(self) -> bool:
        return self.selection in ("fused", "cam")


SEGMENTERS: dict[str, Segmenter] = {
    s.name: s
    for s in [
        Segmenter("intensity", "Intensity threshold (one channel)"),
        Segmenter("CLDF", "CLDF ({cam})", "fused", paper={"brats": 0.880}),
        Segmenter("cam_cl", "{cam}+CL", "cam", ablation=True),
        Segmenter("mg_cl", "MG+CL (tuned with {cam})", "mg", ablation=True),
        Segmenter("fsl_unet", "FSL UNet (upper bound)", gated=False),
    ]
}
DECODERS = {s.selection: s.name for s in SEGMENTERS.values() if s.selection}
"""Selection mode → the segmenter whose decoder uses it."""


def label_of(method: str, cam: str = "") -> str:
    """Printed label of a row of ``metrics.csv`` (``method``, ``cam``)."""
    if method in MAPS:
        return str(MAPS[method].label)
    text = SEGMENTERS[method].label
    if not cam:
        return text.replace(" ({cam})", "")
    return text.format(cam=MAPS[cam].label if cam in MAPS else cam)


FEATURE_SOURCES = ("cdm", "noisy_classifier", "cam_classifier")
"""Networks whose activations can feed CLDF's decoder (the paper's Table 2; the schema's ``features.source``)."""

FEATURE_SOURCE_PAPER = {"cam_classifier": {"brats": 0.640}, "noisy_classifier": {"brats": 0.760}, "cdm": {"brats": 0.880}}
"""The paper's Table 2: CLDF's Dice with the decoder's features from each network."""


def paper_dice(method: str, family: str) -> float | None:
    """The paper's Dice for a row, where it reports one."""
    entry = MAPS.get(method) or SEGMENTERS.get(method)
    return None if entry is None else entry.paper.get(family)
