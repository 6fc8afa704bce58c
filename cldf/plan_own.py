"""The experiment plan for users' own data (a part of :class:`cldf.plan.Plan`).

Labels from a table (``labels_csv``), masks optional; for a dataset without masks the choices are given
(``selection_from`` or the config's defaults, :mod:`cldf.evaluate.given`) instead of made on validation;
pseudo-masks of every case, the nnU-Net v2 hand-off, and predictions on new scans (``predict_root``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from cldf.config import ConfigError, decoder_candidates
from cldf.io.errors import DataError
from cldf.io.labels import labels_path, load_labels
from cldf.io.layouts import case_files, masks_optional

LOG = logging.getLogger("cldf.plan")
NNUNET_DEFAULTS = {"id": 501, "name": None}
"""Defaults of a dataset's ``nnunet`` key (``name`` null: the dataset's name)."""
NO_MATCH = "-"
"""A wildcard constraint no dataset name matches (the rules of mask-free datasets when there is none)."""


class OwnData:
    """Methods of :class:`cldf.plan.Plan` for labels tables, datasets without masks and their outputs."""

    config: Mapping[str, Any]

    # --- labels and masks -----------------------------------------------------------------------

    def labels_table(self, dataset: str) -> list[str]:
        """The labels table as an input of slicing (``[]`` when the labels come from the masks).

        Checked once per run, at the start: a bad table stops the run with one line (file, line, problem).
        A phantom's table is checked by the slicing job (the phantom does not exist before the run).
        """
        ds = self.dataset(dataset)  # type: ignore[attr-defined]
        path = labels_path(ds)
        if path is None:
            return []
        checked = self.__dict__.setdefault("_labels_checked", set())
        if dataset not in checked and ds["layout"] != "synthetic":
            load_labels(ds, self.cases(dataset))  # type: ignore[attr-defined]
            checked.add(dataset)
        return [str(path)]

    def has_masks(self, dataset: str) -> bool:
        """Whether every case of the dataset has a mask file (always, unless masks are optional)."""
        ds = self.dataset(dataset)  # type: ignore[attr-defined]
        if not masks_optional(ds) or ds["layout"] == "synthetic":
            return True
        return all("seg" in case_files(ds, case, missing_ok=True) for case in self.cases(dataset))  # type: ignore[attr-defined]

    def mask_free_datasets(self) -> list[str]:
        """Datasets with a labels table and without masks (a dataset whose root is missing counts as one)."""
        free = []
        for name, ds in self.config["datasets"].items():
            if not ds.get("labels_csv"):
                continue
            try:
                if not self.has_masks(name):
                    free.append(name)
            except (DataError, ConfigError):
                free.append(name)
        return free

    def mask_free_pattern(self) -> str:
        """Wildcard constraint of the rules that give the choices of mask-free datasets."""
        return "|".join(self.mask_free_datasets()) or NO_MATCH

    def without_masks_targets(self, dataset: str) -> list[str]:
        """The default target of a dataset without masks: what needs no ground truth (logged once)."""
        c, cam = self.catalogue, self.config["cldf"]["cam"]  # type: ignore[attr-defined]
        LOG.warning("dataset %s has no masks (labels from %s): the evaluation rows that need them (metrics.csv, "
                    "metrics_per_case.csv, differences.csv, metrics_3d.csv, figure.png) are left out", dataset,
                    self.dataset(dataset)["labels_csv"])  # type: ignore[attr-defined]
        targets = [c.path("selection", dataset=dataset), c.path("cdm_samples", dataset=dataset)]
        split = self.dataset(dataset)["split"]  # type: ignore[attr-defined]
        if split.get("test_cases") or split["test_fraction"] > 0:
            targets.append(c.path("nifti", dataset=dataset, cam=cam))
        return targets

    # --- choices given instead of made ----------------------------------------------------------

    def given_source(self, dataset: str) -> list[str]:
        """The ``selection.csv`` the choices of a dataset without masks come from (``selection_from``), or []."""
        source = self.dataset(dataset).get("selection_from")  # type: ignore[attr-defined]
        return [self.catalogue.path("selection", dataset=source)] if source else []  # type: ignore[attr-defined]

    def given_choices(self, part: str, cam: str | None = None) -> dict[str, list[Any]]:
        """``{choice: [its name in the source selection.csv, the config's default]}`` of one part of the
        choices: ``layers`` (the fused layers of the per-layer CAM ``cam``), ``tuning`` or ``unlabelled`` (of ``cam``).

        A default is the first entry of the ``choices`` grid; choices made for a CAM other than ``cldf.cam``
        are named ``choice@cam`` in a ``selection.csv``.
        """
        grids = self.config["choices"]
        if part == "layers":
            return {f"layers:{cam}": [f"layers:{cam}", grids["layercam_layers"][0]]}
        tag = "" if cam == self.config["cldf"]["cam"] else f"@{cam}"
        if part == "tuning":
            default = {**decoder_candidates(grids, self.config["cldf"]["selection"]["threshold"])[0], **grids["cluster"][0],
                       "feature_layers": grids["feature_layers"][0], "min_component": grids["components"][0],
                       "slice_vote": grids["slice_vote"][0], "epochs": self.config["cldf"]["decoder"]["epochs"]}
            return {"decoder": ["decoder" + tag, default]}
        return {name: [name + tag, grids[name][0]] for name in ("conditioning", "gate")}

    # --- pseudo-masks, nnU-Net, new scans -------------------------------------------------------

    def pseudo_settings(self) -> dict[str, Any]:
        """What the pseudo-masks and predictions depend on: segmentation settings, the classifier's batch."""
        return {**self.segment_settings(), "batch_size": self.config["cams"]["batch_size"]}  # type: ignore[attr-defined]

    def nnunet_settings(self, dataset: str) -> dict[str, Any]:
        """The nnU-Net raw dataset's ``id``, ``name`` and folder (``Dataset<id>_<name>`` beside the manifest)."""
        given = {**NNUNET_DEFAULTS, **(self.dataset(dataset).get("nnunet") or {})}  # type: ignore[attr-defined]
        name = given["name"] or dataset
        folder = f"Dataset{int(given['id']):03d}_{name}"
        return {"id": int(given["id"]), "name": name,
                "folder": self.catalogue.path("nnunet_raw", dataset=dataset, nnunet_dataset=folder)}  # type: ignore[attr-defined]

    def predict_dataset(self, dataset: str) -> dict[str, Any]:
        """Settings of the dataset's new scans (``predict_root``): its own, with no labels and no masks."""
        ds = self.dataset(dataset)  # type: ignore[attr-defined]
        if not ds.get("predict_root"):
            raise ConfigError(f"config key datasets.{dataset}.predict_root: not set; it names the folder of the new "
                              "scans to predict (the dataset's layout, no masks needed)")
        return {**ds, "root": ds["predict_root"], "predict": True, "labels_csv": None, "ambiguous_slices": "evaluate",
                "max_cases": None}

    def predict_cases(self, dataset: str) -> list[str]:
        key = f"{dataset}/predict"
        if key not in self._cases:  # type: ignore[attr-defined]
            self._cases[key] = self._lister(self.predict_dataset(dataset))  # type: ignore[attr-defined]
        return self._cases[key]  # type: ignore[attr-defined]

    def predict_shards(self, dataset: str) -> list[int]:
        return list(range(math.ceil(len(self.predict_cases(dataset)) / int(self.config["shard_size"]))))

    def predict_shard_cases(self, dataset: str, shard: int | str) -> list[int]:
        size = int(self.config["shard_size"])
        return list(range(int(shard) * size, min((int(shard) + 1) * size, len(self.predict_cases(dataset)))))

    def predict_inputs(self, dataset: str, shard: int | str) -> list[str]:
        """The image files of one shard of new scans (a mask file beside one is not read)."""
        ds = self.predict_dataset(dataset)
        names, skip = self.predict_cases(dataset), ds["on_bad_case"] == "skip"
        return [str(p) for i in self.predict_shard_cases(dataset, shard)
                for kind, p in case_files(ds, names[i], missing_ok=skip).items() if kind != "seg"]

