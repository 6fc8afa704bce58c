"""The experiment plan: from the config to what gets built (datasets × methods × shards).

A plain object the Snakefile asks, so the plan is unit-tested without Snakemake: which cases a dataset
holds and how they are sharded, which settings each step depends on (Snakemake re-runs a step when they
change), which table rows exist and which files the default target builds. Paths come from
:class:`cldf.catalogue.Catalogue`, methods from :mod:`cldf.registry`.
"""

from __future__ import annotations

import json
import math
import shutil
from typing import Any, Callable, Mapping

from cldf.catalogue import Catalogue
from cldf.config import dataset_settings, model_settings
from cldf.io.layouts import case_files, list_cases
from cldf.registry import MAPS, MODEL_KINDS, SEGMENTERS, MapMethod, map_settings

__all__ = ["MODEL_KINDS", "Plan", "as_json"]


def as_json(obj: Any) -> str:
    """Compact, key-sorted JSON: what a rule passes as ``--settings`` (and Snakemake compares for re-runs)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Plan:
    """What to build for a validated config."""

    def __init__(self, config: Mapping[str, Any], lister: Callable[[Mapping[str, Any]], list[str]] = list_cases) -> None:
        self.config = config
        self.catalogue = Catalogue(config["results_dir"])
        self._lister = lister
        self._cases: dict[str, list[str]] = {}

    # --- data -----------------------------------------------------------------------------------

    def dataset(self, name: str) -> dict[str, Any]:
        """Settings of dataset ``name`` (image_size resolved from the preset)."""
        return dataset_settings(self.config, name)

    def cases(self, dataset: str) -> list[str]:
        """Case ids of a dataset, from a directory listing (or the phantom config); cached."""
        if dataset not in self._cases:
            self._cases[dataset] = self._lister(self.dataset(dataset))
        return self._cases[dataset]

    def n_shards(self, dataset: str) -> int:
        return math.ceil(len(self.cases(dataset)) / int(self.config["shard_size"]))

    def shards(self, dataset: str) -> list[int]:
        return list(range(self.n_shards(dataset)))

    def shard_cases(self, dataset: str, shard: int | str) -> list[int]:
        """Global case indices of one shard."""
        size = int(self.config["shard_size"])
        start = int(shard) * size
        return list(range(start, min(start + size, len(self.cases(dataset)))))

    def raw_inputs(self, dataset: str, shard: int | str) -> list[str]:
        """What slicing a shard reads: the phantom manifest, or the NIfTI files of the shard's cases.

        Under ``on_bad_case: skip`` a case with a missing file lists the files it has: the job skips it.
        """
        ds = self.dataset(dataset)
        if ds["layout"] == "synthetic":
            return [self.catalogue.path("phantom", dataset=dataset)]
        skip = ds["on_bad_case"] == "skip"
        names = self.cases(dataset)
        return [str(p) for i in self.shard_cases(dataset, shard) for p in case_files(ds, names[i], missing_ok=skip).values()]

    # --- settings each step depends on ----------------------------------------------------------

    def model_settings(self, kind: str) -> dict[str, Any]:
        return model_settings(self.config, kind)

    def map_settings(self, store: str) -> dict[str, Any]:
        from cldf.registry import map_by_store

        return map_settings(self.config, map_by_store(store))

    def decoder_settings(self, selection: str) -> dict[str, Any]:
        cl = self.config["cldf"]
        return {"selection": {**cl["selection"], "mode": selection}, "decoder": cl["decoder"]}

    # --- methods and the table ------------------------------------------------------------------

    def cams(self) -> list[MapMethod]:
        """The CAM methods the config computes."""
        return [MAPS[name] for name in self.config["cams"]["methods"]]

    def baseline_maps(self) -> list[MapMethod]:
        """Maps whose thresholded masks are rows of the table: the configured CAMs, then the other maps."""
        return [*self.cams(), *[m for m in MAPS.values() if m.family == "map"]]

    def segmenter_masks(self, dataset: str, name: str) -> str:
        segmenter = SEGMENTERS[name]
        if segmenter.selection is None:
            return self.catalogue.path("baseline_masks", dataset=dataset, baseline=name)
        return self.catalogue.path("cldf_masks", dataset=dataset, selection=segmenter.selection,
                                   cam=self.config["cldf"]["cam"])

    def table_rows(self, dataset: str) -> dict[str, dict[str, str]]:
        """Every row of the comparison table: label → ``{"masks": store, "cam": CAM it starts from or ""}``."""
        cam = MAPS[self.config["cldf"]["cam"]]
        rows = {}
        for method in self.baseline_maps():
            masks = self.catalogue.path("baseline_masks", dataset=dataset, baseline=method.name)
            rows[method.label] = {"masks": masks, "cam": method.name if method.family == "cam" else ""}
        for name, segmenter in SEGMENTERS.items():
            label = segmenter.label.format(cam=cam.label)
            rows[label] = {"masks": self.segmenter_masks(dataset, name), "cam": cam.name if segmenter.uses_cam else ""}
        return rows

    def figure_baselines(self, dataset: str) -> dict[str, str]:
        """Rows without contrastive learning, for the figure's 'best baseline' column: label → masks store."""
        rows = self.table_rows(dataset)
        return {m.label: rows[m.label]["masks"] for m in self.baseline_maps()}

    def final_targets(self, dataset: str) -> list[str]:
        """What ``snakemake`` with no target builds for ``dataset``."""
        c, cam = self.catalogue, self.config["cldf"]["cam"]
        return [
            c.path("metrics", dataset=dataset),
            c.path("figure", dataset=dataset),
            c.path("nifti", dataset=dataset, cam=cam),
            c.path("cdm_samples", dataset=dataset),
        ]

    def default_targets(self) -> list[str]:
        return self.final_targets(self.config["default_dataset"])

    # --- resources ------------------------------------------------------------------------------

    def gpus(self) -> int:
        """The ``gpu`` resource of one GPU job: 1 when this run uses CUDA, else 0 (nothing serialised)."""
        device = self.config["device"]
        uses_cuda = device.startswith("cuda") or (device == "auto" and shutil.which("nvidia-smi") is not None)
        return 1 if uses_cuda else 0

    def train_threads(self) -> int:
        """On the CPU preset one thread per job and jobs side by side beat multi-threaded jobs one after the
        other (measured on 2 cores); the paper preset's data loading and GPU jobs get more."""
        return 1 if self.config["model_preset"] == "cpu" else 4
