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
from cldf.config import dataset_settings, decoder_candidates, model_settings, resolved_preset
from cldf.io.layouts import case_files, list_cases
from cldf.plan_own import OwnData
from cldf.registry import DECODERS, MAPS, MODEL_KINDS, SEGMENTERS, MapMethod, map_by_store, map_settings

__all__ = ["MODEL_KINDS", "Plan", "as_json"]


def as_json(obj: Any) -> str:
    """Compact, key-sorted JSON: what a rule passes as ``--settings`` (and Snakemake compares for re-runs)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Plan(OwnData):
    """What to build for a validated config (users' own data: :class:`cldf.plan_own.OwnData`)."""

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
        A labels table (``labels_csv``) is an input too, checked when first asked for.
        """
        ds = self.dataset(dataset)
        if ds["layout"] == "synthetic":
            return [self.catalogue.path("phantom", dataset=dataset), *self.labels_table(dataset)]
        skip = ds["on_bad_case"] == "skip"
        names = self.cases(dataset)
        return [*self.labels_table(dataset),
                *(str(p) for i in self.shard_cases(dataset, shard) for p in case_files(ds, names[i], missing_ok=skip).values())]

    # --- settings each step depends on ----------------------------------------------------------

    def model_settings(self, kind: str) -> dict[str, Any]:
        return model_settings(self.config, kind)

    def map_settings(self, store: str) -> dict[str, Any]:
        """A map's settings; a CAM that CLDF does not start from is computed for its evaluation rows only."""
        method = map_by_store(store)
        settings = map_settings(self.config, method)
        if method.family == "cam":
            settings["rows"] = "all" if method.name in self.decoder_cams() else "evaluation"
        return settings

    def cldf_cams(self) -> list[str]:
        """The CAMs CLDF starts from in ``metrics.csv``: ``cldf.cam``, then ``cldf.extra_cams``."""
        cl = self.config["cldf"]
        return list(dict.fromkeys([cl["cam"], *cl["extra_cams"]]))

    def priority(self, step: str, name: str) -> int:
        """Scheduling priority of a ``model`` or ``map`` job (Snakemake starts the highest of the ready jobs
        first): what CLDF's decoders wait for, the longest first (the CDM, then the noisy classifier, then
        the networks of CLDF's CAMs), then the other networks (long jobs, better started early) and the maps
        CLDF reads (features, mean gradient and CLDF's CAMs before any other network); the comparison
        methods' maps fill the cores beside. A map's gather job has its map's priority; CLDF's later steps
        (layer choice, tuning, segmentation) have 2."""
        cam_models = {k for cam in self.cldf_cams() for k in MAPS[cam].models}
        if step == "model":
            return {"cdm": 4, "noisy_classifier": 3}.get(name, 2 if name in cam_models else 1)
        if name in {"features", "mean_gradient", *(MAPS[cam].store for cam in self.cldf_cams())}:
            return 3  # what CLDF's decoders train on: short jobs that start CLDF's path as soon as they can
        return 1 if name == "classifier_probs" else 0

    def decoder_cams(self) -> list[str]:
        """Every CAM a CLDF decoder may start from: those of ``metrics.csv`` and of Table 3."""
        return list(dict.fromkeys([*self.cldf_cams(), *self.config["table3"]["cams"]]))

    def cldf_settings(self) -> dict[str, Any]:
        """What the decoder's training and clustering depend on besides the tuned choices."""
        cl = self.config["cldf"]
        pixels = resolved_preset(self.config)["decoder_pixels"]
        return {"selection": {**cl["selection"], **pixels}, "decoder": cl["decoder"], "cluster": cl["cluster"]}

    def tune_settings(self) -> dict[str, Any]:
        """Settings of CLDF's decoder tuning (and of the ablation decoders, which reuse its choice)."""
        choices, rule = self.config["choices"], self.config["cldf"]["selection"]["threshold"]
        grids = ("optimizer", "feature_layers", "cluster", "components", "slice_vote", "epochs") + (("quantile",) if rule == "quantile" else ())
        return {"cldf": self.cldf_settings(), "choices": {k: choices[k] for k in grids if k in choices},
                "max_train_slices": self.config["features"]["max_train_slices"]}

    def segment_settings(self) -> dict[str, Any]:
        """What segmentation with on-the-fly features depends on."""
        features = self.config["features"]
        return {"features": {k: features[k] for k in ("timesteps", "layers")}, "cluster": self.config["cldf"]["cluster"],
                **{k: self.config["cldf"]["decoder"][k] for k in ("with_image", "image_context")}}

    def unlabelled_settings(self) -> dict[str, Any]:
        choices = self.config["choices"]
        return {**self.segment_settings(), "choices": {k: choices[k] for k in ("conditioning", "gate")}}

    def map_choice_settings(self) -> dict[str, Any]:
        return {k: self.config["choices"][k] for k in ("threshold", "layercam_layers")}

    # --- methods and the table ------------------------------------------------------------------

    def cams(self) -> list[MapMethod]:
        """The CAM methods the config computes."""
        return [MAPS[name] for name in self.config["cams"]["methods"]]

    def maps(self) -> list[MapMethod]:
        """Every map the config computes: the non-CAM maps and the configured CAMs."""
        return [*[m for m in MAPS.values() if m.family != "cam"], *self.cams()]

    def baseline_maps(self) -> list[MapMethod]:
        """Maps whose thresholded masks are rows of the table: the configured CAMs, then the other maps."""
        return [*self.cams(), *[m for m in MAPS.values() if m.family == "map"]]

    def final_map(self, dataset: str, method: MapMethod) -> str:
        """The store of a map the rest of the pipeline reads (a per-layer CAM: its fused store)."""
        if method.per_layer:
            return self.catalogue.path("fused_cam", dataset=dataset, cam=method.name)
        return self.catalogue.path("map", dataset=dataset, map=method.store)

    def thresholded_maps(self, dataset: str) -> dict[str, str]:
        """The maps of the baseline rows, name → the store they are thresholded from (a per-layer CAM:
        fused over its chosen layers)."""
        return {m.name: self.final_map(dataset, m) for m in self.baseline_maps()}

    def baseline_names(self) -> list[str]:
        """The rows rule ``baselines`` writes: every thresholded map, then ``intensity``."""
        return [*(m.name for m in self.baseline_maps()), "intensity"]

    def baseline_masks(self, dataset: str) -> dict[str, str]:
        """name → test-mask store of every row of :meth:`baseline_names`."""
        return {name: self.catalogue.path("baseline_masks", dataset=dataset, baseline=name)
                for name in self.baseline_names()}

    def per_layer_cams(self) -> list[str]:
        """The configured CAMs stored per layer (their fused layers are chosen on validation)."""
        return [m.name for m in self.cams() if m.per_layer]

    def decoders(self, dataset: str, cam: str, ablation: bool = False) -> dict[str, str]:
        """Segmenter name → decoder checkpoint of one CAM: CLDF's (rows of ``metrics.csv``), or with
        ``ablation`` its selection ablations (CAM + CL, MG + CL: rows of Table 3 only)."""
        return {name: self.catalogue.path("decoder", dataset=dataset, cam=cam, selection=mode)
                for mode, name in DECODERS.items() if SEGMENTERS[name].ablation == ablation}

    def rows(self, dataset: str) -> list[dict[str, Any]]:
        """Every row of the comparison table: ``protocol, method, cam, masks, array, gated``.

        Under each protocol: the thresholded maps, then the segmenters; CLDF once per CAM of
        :meth:`cldf_cams` (``cam`` names it). CLDF's selection ablations are rows of :meth:`table3_rows` only.
        """
        rows = []
        for protocol in self.config["evaluate"]["protocols"]:
            rows += [self._map_row(dataset, protocol, method) for method in self.baseline_maps()]
            for name, segmenter in SEGMENTERS.items():
                if segmenter.ablation:
                    continue
                if not segmenter.selection:
                    rows.append({"protocol": protocol, "method": name, "cam": "", "array": "masks", "gated": segmenter.gated,
                                 "masks": self.catalogue.path("baseline_masks", dataset=dataset, baseline=name)})
                    continue
                rows += [self._decoder_row(dataset, protocol, name, cam) for cam in self.cldf_cams()]
        return rows

    def _map_row(self, dataset: str, protocol: str, method: MapMethod) -> dict[str, Any]:
        return {"protocol": protocol, "method": method.name, "cam": method.name if method.family == "cam" else "",
                "masks": self.catalogue.path("baseline_masks", dataset=dataset, baseline=method.name),
                "array": "masks", "gated": True}

    def _decoder_row(self, dataset: str, protocol: str, segmenter: str, cam: str) -> dict[str, Any]:
        if SEGMENTERS[segmenter].ablation:
            masks = self.catalogue.path("ablation_masks", dataset=dataset, cam=cam)
        else:
            masks = self.catalogue.path("cldf_masks", dataset=dataset, cam=cam, protocol=protocol)
        return {"protocol": protocol, "method": segmenter, "cam": cam, "masks": masks, "array": segmenter,
                "gated": SEGMENTERS[segmenter].gated}

    def table3_rows(self, dataset: str) -> list[dict[str, Any]]:
        """Rows of Table 3 (selection), labelled protocol: per CAM of ``table3.cams`` the CAM alone, then the
        decoders of each selection mode (CAM + CL, MG + CL: masks of :meth:`decoders` with ``ablation``;
        CAM ∧ MG + CL = CLDF)."""
        rows = []
        for cam in self.config["table3"]["cams"]:
            rows.append(self._map_row(dataset, "labelled", MAPS[cam]))
            rows += [self._decoder_row(dataset, "labelled", DECODERS[mode], cam) for mode in ("cam", "mg", "fused")]
        return rows

    def reference(self) -> dict[str, str]:
        """The row ``differences.csv`` compares every other row with: CLDF on the configured CAM."""
        return {"method": "CLDF", "cam": self.config["cldf"]["cam"]}

    def figure_baselines(self, dataset: str) -> dict[str, str]:
        """Thresholded maps, for the figure's 'best baseline' column: name → masks store."""
        return {name: path for name, path in self.baseline_masks(dataset).items() if name != "intensity"}

    def ablation_settings(self, table: str = "ablation") -> dict[str, Any]:
        """What a lever table depends on: CLDF's settings, the levers (config key ``table``: ``ablation``
        or ``table2``), the bootstrap."""
        features = self.config["features"]
        levers = self.config[table] if table == "ablation" else self.config[table]["levers"]
        return {"cldf": self.cldf_settings(), "features": {k: features[k] for k in ("timesteps", "layers")},
                "max_train_slices": features["max_train_slices"], "levers": levers,
                "bootstrap": self.config["evaluate"]["bootstrap"]}

    def evaluation_settings(self) -> dict[str, Any]:
        return {"reference": self.reference(), "bootstrap": self.config["evaluate"]["bootstrap"]}

    def final_targets(self, dataset: str) -> list[str]:
        """What ``snakemake`` with no target builds for ``dataset`` (without masks: what needs none)."""
        if not self.has_masks(dataset):
            return self.without_masks_targets(dataset)
        c, cam = self.catalogue, self.config["cldf"]["cam"]
        names = ["metrics", "metrics_per_case", "differences", "selection", "metrics_3d", "figure"]
        return [*(c.path(name, dataset=dataset) for name in names), c.path("nifti", dataset=dataset, cam=cam)]

    def default_targets(self) -> list[str]:
        return self.final_targets(self.config["default_dataset"])

    # --- resources ------------------------------------------------------------------------------

    def gpus(self) -> int:
        """The ``gpu`` resource of one GPU job: 1 when this run uses CUDA, else 0 (nothing serialised)."""
        device = self.config["device"]
        uses_cuda = device.startswith("cuda") or (device == "auto" and shutil.which("nvidia-smi") is not None)
        return 1 if uses_cuda else 0

    def tune_threads(self) -> int:
        """Threads of CLDF's decoder tuning: on the CPU preset one per candidate of its first stage (they train
        side by side, one thread each, so a switch of CAM waits less; Snakemake caps them at ``--cores``);
        elsewhere :meth:`train_threads` (a GPU trains the candidates one after another)."""
        if self.config["model_preset"] != "cpu":
            return self.train_threads()
        return len(decoder_candidates(self.config["choices"], self.config["cldf"]["selection"]["threshold"]))

    def train_threads(self) -> int:
        """On the CPU preset one thread per job and jobs side by side beat multi-threaded jobs one after the
        other (measured on 2 cores); the paper preset's data loading and GPU jobs get more."""
        return 1 if self.config["model_preset"] == "cpu" else 4
