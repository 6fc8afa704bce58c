"""The artifact catalogue: every file the pipeline writes for a dataset, where it lives, what makes it.

Paths are patterns relative to ``results_dir``; ``{dataset}``, ``{shard}``, ``{model}``, ``{map}``, ``{cam}``,
``{selection}``, ``{protocol}`` and ``{baseline}`` are wildcards (Snakemake's, in the rules); ``{case}`` and
``{nnunet_dataset}`` name files that a job writes beside its declared output (a manifest lists them). Rules, the
experiment plan, the CLI and the tests ask :class:`Catalogue` for paths; no other module spells an
artifact's file name. Every artifact is written atomically (:mod:`cldf.atomic`); each job also writes a log
(and, for the heavy ones, a benchmark) whose path :meth:`Catalogue.log` / :meth:`Catalogue.benchmark`
derive from its output.
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
                 "images, body masks, labels, case/slice ids, split; train/val ground truth in a sub-group"),
        Artifact("test_truth", "{dataset}/test_truth" + ZARR, "zarr", "slices",
                 "masks of the test slices (read by evaluation only)"),
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
                 "one registered per-slice map (CAMs under cams/, a per-layer CAM as cams/<name>_layers)"),
        Artifact("fused_cam", "{dataset}/cams/{cam}" + ZARR, "zarr", "fuse_cam",
                 "a per-layer CAM fused over the layers chosen on validation"),
        Artifact("layer_choices", "{dataset}/choices/layers_{cam}.csv", "csv", "choose_layers",
                 "the layers a per-layer CAM (LayerCAM) is fused over: chosen on validation"),
        Artifact("map_choices", "{dataset}/choices/maps.csv", "csv", "baselines",
                 "thresholds of the baseline maps and the intensity channel: chosen on validation"),
        Artifact("decoder", "{dataset}/cldf/{cam}/{selection}/decoder.pt", "checkpoint", "decoder",
                 "CLDF's pixel decoder for one pixel-selection mode (fused = CLDF; cam, mg = the ablations)"),
        Artifact("tuning", "{dataset}/cldf/{cam}/tuning.csv", "csv", "tune_decoder",
                 "the decoder settings tried on validation (selection quantile, optimiser)"),
        Artifact("unlabelled_choices", "{dataset}/cldf/{cam}/unlabelled.csv", "csv", "choose_unlabelled",
                 "CDM conditioning and gate threshold of the unlabelled protocol, chosen on validation"),
        Artifact("selection", "{dataset}/selection.csv", "csv", "selection",
                 "every choice made on validation: choice, value, val_dice, chosen"),
        Artifact("cldf_mask_shard", "{dataset}/shards/cldf/{cam}/{protocol}/{shard}" + ZARR, "zarr", "segment_shard",
                 "K-means masks of one shard's test slices under one protocol, CLDF's decoder (temporary)"),
        Artifact("cldf_masks", "{dataset}/cldf/{cam}/masks_{protocol}" + ZARR, "zarr", "cldf_masks",
                 "K-means masks of the test slices under one protocol: array CLDF"),
        Artifact("ablation_mask_shard", "{dataset}/shards/cldf/{cam}/ablations/{shard}" + ZARR, "zarr", "ablation_shard",
                 "K-means masks of one shard's test slices by the selection ablations' decoders (temporary)"),
        Artifact("ablation_masks", "{dataset}/cldf/{cam}/ablation_masks_labelled" + ZARR, "zarr", "ablation_masks",
                 "K-means masks of the test slices, labelled protocol, Table 3: arrays cam_cl, mg_cl"),
        Artifact("baseline_masks", "{dataset}/baselines/{baseline}/masks" + ZARR, "zarr", "baselines",
                 "test masks of a thresholded map, the intensity threshold, or the fully supervised UNet"),
        Artifact("nifti", "{dataset}/cldf/{cam}/nifti", "nifti-dir", "nifti",
                 "CLDF masks of the test cases (unlabelled protocol) as NIfTI in each case's own geometry"),
        Artifact("metrics", "{dataset}/metrics.csv", "csv", "metrics", "the comparison table, both protocols"),
        Artifact("metrics_per_slice", "{dataset}/metrics_per_slice.csv", "csv", "metrics",
                 "Dice, IoU, HD95 per protocol, method and test slice"),
        Artifact("metrics_per_case", "{dataset}/metrics_per_case.csv", "csv", "metrics",
                 "mean Dice, IoU, HD95 per protocol, method and test case"),
        Artifact("differences", "{dataset}/differences.csv", "csv", "metrics",
                 "the default CLDF row minus every other row, paired by case, with a bootstrap interval"),
        Artifact("metrics_3d", "{dataset}/metrics_3d.csv", "csv", "metrics_3d",
                 "3-D Dice and HD95 (mm) per protocol, method and test case, in the scan's own geometry"),
        Artifact("figure", "{dataset}/figure.png", "png", "figure", "the qualitative figure (paper Fig. 3)"),
        Artifact("ablation", "{dataset}/ablation.csv", "csv", "ablation",
                 "CLDF with one lever changed at a time: validation Dice, test Dice with its interval"),
        Artifact("table2", "{dataset}/table2.csv", "csv", "table2",
                 "paper Table 2: CLDF with the decoder's features from each network (columns of ablation.csv)"),
        Artifact("table3", "{dataset}/table3.csv", "csv", "table3",
                 "paper Table 3: CAM alone, CAM + CL, MG + CL, CAM ∧ MG + CL per CAM (labelled protocol)"),
        Artifact("labels_check", "{dataset}/labels_check.csv", "csv", "labels_check",
                 "per case: how often the labels table (labels_csv) disagrees with the masks"),
        Artifact("pseudo_mask_shard", "{dataset}/shards/pseudo_masks/{shard}.csv", "csv", "pseudo_mask_shard",
                 "manifest rows of one shard's pseudo-masks (temporary; the NIfTI files go to pseudo_masks/)"),
        Artifact("pseudo_masks", "{dataset}/pseudo_masks/manifest.csv", "csv", "pseudo_masks",
                 "case, path, n_slices, n_positive_slices, foreground_voxels of every case's pseudo-mask"),
        Artifact("pseudo_mask", "{dataset}/pseudo_masks/{case}.nii.gz", "nifti", "pseudo_mask_shard",
                 "CLDF mask of one case (labelled slices as labelled, the others unlabelled) in its own geometry"),
        Artifact("nnunet", "{dataset}/nnunet/manifest.csv", "csv", "nnunet",
                 "case, label, image_0000, ... of the nnU-Net v2 raw dataset beside it"),
        Artifact("nnunet_raw", "{dataset}/nnunet/{nnunet_dataset}", "nnunet-dir", "nnunet",
                 "nnU-Net v2 raw dataset Dataset<id>_<name>: imagesTr, labelsTr (the pseudo-masks), dataset.json"),
        Artifact("predict_shard", "{dataset}/shards/predict/{shard}.csv", "csv", "predict_shard",
                 "manifest rows of one shard of new scans (temporary; the NIfTI files go to predict/)"),
        Artifact("predict", "{dataset}/predict/manifest.csv", "csv", "predict",
                 "case, path, foreground_voxels of the masks of the new scans (predict_root)"),
        Artifact("prediction", "{dataset}/predict/{case}.nii.gz", "nifti", "predict_shard",
                 "CLDF mask of one new scan (unlabelled protocol) in its own geometry"),
    ]
}


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
        values = {k: str(v) for k, v in fixed.items()}
        return f"{self.root}/" + ARTIFACTS[name].pattern.format_map(_Keep(values))

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
