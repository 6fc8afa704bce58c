"""The artifact catalogue: every file the pipeline writes for a dataset, where it lives, what makes it.

Paths are patterns relative to ``results_dir``; ``{dataset}``, ``{shard}``, ``{model}``, ``{map}``, ``{cam}``
and ``{baseline}`` are wildcards (Snakemake's, in the rules). Rules, the experiment plan, the CLI and the
tests ask :class:`Catalogue` for paths; no other module spells an artifact's file name. Every artifact is
written atomically (:mod:`cldf.atomic`); each job also writes a log (and, for the heavy ones, a
benchmark) whose path :meth:`Catalogue.log` / :meth:`Catalogue.benchmark` derive from its output.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

ZARR = ".zarr"


@dataclass(frozen=True)
class Artifact:
    """One kind of artifact: ``pattern`` (relative to ``results_dir``), ``kind``, the rule that makes it."""

    name: str
    pattern: str
    kind: str
    producer: str
    description: str


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in [
        Artifact("phantom", "{dataset}/phantom.json", "json", "phantom",
                 "manifest of the generated phantom (its NIfTI cases live at the dataset root)"),
        Artifact("slice_shard", "{dataset}/shards/slices/{shard}" + ZARR, "zarr", "slices_shard",
                 "slices of one shard of cases (temporary)"),
        Artifact("slices", "{dataset}/slices" + ZARR, "zarr", "slices",
                 "images, body masks, labels, case/slice ids, split; ground truth in a sub-group"),
        Artifact("slices_csv", "{dataset}/slices.csv", "csv", "slices", "one row per slice"),
        Artifact("skipped_cases", "{dataset}/skipped_cases.csv", "csv", "slices", "case,reason of skipped cases"),
        Artifact("model", "{dataset}/models/{model}.pt", "checkpoint", "train_model",
                 "a trained network (cdm, noisy_classifier, cam_classifier, fsl_unet)"),
        Artifact("model_metrics", "{dataset}/models/{model}.json", "json", "train_model",
                 "validation metrics of a trained network (its loss curve beside it, .loss.csv/.png)"),
        Artifact("cdm_samples", "{dataset}/models/cdm_samples.png", "png", "cdm_samples",
                 "class-conditional CDM samples, y=0 row and y=1 row"),
        Artifact("map_shard", "{dataset}/shards/{map}/{shard}" + ZARR, "zarr", "map_shard",
                 "one registered per-slice map (features, gradients, a CAM, ...) of one shard (temporary)"),
        Artifact("map", "{dataset}/{map}" + ZARR, "zarr", "gather_map",
                 "one registered per-slice map of every slice (CAMs under cams/)"),
        Artifact("decoder", "{dataset}/cldf/{selection}decoder.pt", "checkpoint", "decoder",
                 "CLDF's pixel decoder for one pixel-selection mode"),
        Artifact("cldf_mask_shard", "{dataset}/shards/cldf/{selection}masks/{shard}" + ZARR, "zarr", "segment_shard",
                 "K-means masks of one shard's test slices (temporary)"),
        Artifact("cldf_masks", "{dataset}/cldf/{selection}masks" + ZARR, "zarr", "cldf_masks",
                 "K-means masks of the test slices for one pixel-selection mode"),
        Artifact("baseline_masks", "{dataset}/baselines/{baseline}/masks" + ZARR, "zarr", "baseline_masks",
                 "test masks of a thresholded map, or of the fully supervised UNet"),
        Artifact("nifti", "{dataset}/cldf/{cam}/nifti", "nifti-dir", "nifti",
                 "CLDF masks of the test cases as NIfTI in each case's own geometry"),
        Artifact("metrics", "{dataset}/metrics.csv", "csv", "metrics", "the comparison table"),
        Artifact("metrics_per_slice", "{dataset}/metrics_per_slice.csv", "csv", "metrics",
                 "Dice, IoU, HD95 per method and test slice"),
        Artifact("figure", "{dataset}/figure.png", "png", "figure", "the qualitative figure (paper Fig. 3)"),
    ]
}

SELECTION_DIRS = {"fused": "{cam}/", "cam": "{cam}/ablation-cam/", "mg": "ablation-mg/"}
"""Sub-directory of ``cldf/`` per pixel-selection mode; the MG-only ablation does not depend on the CAM,
so it lives outside the CAM's directory and survives a switch of ``cldf.cam``."""


class _Keep(dict):
    """Format mapping that leaves unknown wildcards as ``{name}``."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def wildcards(pattern: str) -> list[str]:
    """Wildcard names of a pattern, in order."""
    return [field for _, field, _, _ in string.Formatter().parse(pattern) if field]


class Catalogue:
    """Paths of the artifacts under one ``results_dir``."""

    def __init__(self, results_dir: str) -> None:
        self.root = str(results_dir).rstrip("/")

    def pattern(self, name: str, **fixed: object) -> str:
        """``results_dir/<pattern>`` with the ``fixed`` wildcards filled in and the others left as ``{w}``."""
        artifact = ARTIFACTS[name]
        values = {k: str(v) for k, v in fixed.items()}
        if "selection" in values:
            values["selection"] = SELECTION_DIRS[values["selection"]].format_map(_Keep(values))
        return f"{self.root}/" + artifact.pattern.format_map(_Keep(values))

    def path(self, name: str, **values: object) -> str:
        """A concrete path; every wildcard of the artifact must be given."""
        path = self.pattern(name, **values)
        missing = wildcards(path)
        if missing:
            raise KeyError(f"artifact {name!r} needs {missing}")
        return path

    def _side(self, output: str, folder: str, suffix: str) -> str:
        relative = output[len(self.root) + 1 :] if output.startswith(self.root + "/") else output
        return f"{self.root}/{folder}/" + re.sub(r"(\.zarr|\.csv|\.json|\.png|\.pt)?/?$", "", relative) + suffix

    def log(self, output: str) -> str:
        """Log file of the job writing ``output`` (a path or pattern from this catalogue)."""
        return self._side(output, "logs", ".log")

    def benchmark(self, output: str) -> str:
        """Benchmark file (time and memory, Snakemake's ``benchmark:``) of the job writing ``output``."""
        return self._side(output, "benchmarks", ".tsv")
