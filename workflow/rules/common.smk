# Config validation, shard bookkeeping and input functions shared by every rule file.

import json
import math
import shlex
import shutil
import sys

from cldf.config import (
    ConfigError,
    dataset_settings,
    model_settings,
    validate_config,
)
from cldf.io.errors import DataError
from cldf.io.layouts import list_cases
from cldf.segment.selection import MODE_MAPS



def stop(message):
    """End the workflow with one line on stderr (no traceback): bad config or missing data."""
    print(f"cldf: error: {message}", file=sys.stderr)
    sys.exit(1)


try:
    validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
except ConfigError as err:
    stop(f"invalid configuration: {err}")

R = config["results_dir"]
CAMS = config["cams"]["methods"]
MODEL_KINDS = ["cdm", "noisy_classifier", "cam_classifier", "fsl_unet"]
DEVICE = config["device"]
# Jobs that use the GPU declare `gpu: GPU`; the local profile caps the resource at 1 so GPU jobs run one
# at a time. On a machine without a GPU nothing is serialised.
USES_CUDA = DEVICE.startswith("cuda") or (DEVICE == "auto" and shutil.which("nvidia-smi") is not None)
GPU = 1 if USES_CUDA else 0
# On the CPU preset one thread per job and jobs side by side beat multi-threaded jobs one after the
# other (measured on 2 cores); the paper preset's data loading and GPU jobs get more.
TRAIN_THREADS = 1 if config["model_preset"] == "cpu" else 4
SEED = config["seed"]


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    shard=r"\d+",
    cam="|".join(CAMS),
    kind="|".join(MODEL_KINDS),


def ds_settings(dataset):
    """Validated settings of one dataset (image_size resolved from the model preset)."""
    try:
        return dataset_settings(config, dataset)
    except ConfigError as err:
        stop(str(err))


_CASES = {}


def cases(dataset):
    """Case ids of a dataset, from a directory listing (or the phantom config)."""
    if dataset not in _CASES:
        try:
            _CASES[dataset] = list_cases(ds_settings(dataset))
        except DataError as err:
            stop(str(err))
    return _CASES[dataset]


def n_shards(dataset):
    return math.ceil(len(cases(dataset)) / config["shard_size"])


def shard_cases(dataset, shard):
    """Comma-separated global case indices of one shard (what `cldf … --cases` takes)."""
    size = config["shard_size"]
    start = int(shard) * size
    return ",".join(str(i) for i in range(start, min(start + size, len(cases(dataset)))))


def shard_paths(pattern, dataset, **fmt):
    return [pattern.format(R=R, dataset=dataset, shard=k, **fmt) for k in range(n_shards(dataset))]


def as_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def raw_inputs(wildcards):
    """What slicing a shard reads: the phantom manifest, or the NIfTI files of the shard's cases."""
    ds = ds_settings(wildcards.dataset)
    if ds["layout"] == "synthetic":
        return [f"{R}/{wildcards.dataset}/phantom.json"]
    from cldf.io.layouts import case_files

    idx = [int(i) for i in shard_cases(wildcards.dataset, wildcards.shard).split(",")]
    skip = ds["on_bad_case"] == "skip"  # a case with a missing file is then skipped by the job, not here
    try:
        return [str(p) for i in idx for p in case_files(ds, cases(wildcards.dataset)[i], missing_ok=skip).values()]
    except DataError as err:
        stop(str(err))


def method_masks(dataset):
    """Every row of the comparison table: method name → (mask store, cam)."""
    cam = config["cldf"]["cam"]
    rows = {"CLDF": (f"{R}/{dataset}/cldf/{cam}/masks.zarr", cam)}
    for c in CAMS:
        rows[CAM_NAMES[c]] = (f"{R}/{dataset}/baselines/{c}/masks.zarr", c)
    rows["MG"] = (f"{R}/{dataset}/baselines/mean_gradient/masks.zarr", "")
    rows["CDM saliency"] = (f"{R}/{dataset}/baselines/saliency/masks.zarr", "")
    rows[f"{CAM_NAMES[cam]}+CL"] = (f"{R}/{dataset}/cldf/{cam}/ablation-cam/masks.zarr", cam)
    rows["MG+CL"] = (f"{R}/{dataset}/cldf/ablation-mg/masks.zarr", "")
    rows["FSL UNet (upper bound)"] = (f"{R}/{dataset}/baselines/fsl_unet/masks.zarr", "")
    return rows


CAM_NAMES = {"gradcam": "GradCAM", "gradcampp": "GradCAM++", "scorecam": "ScoreCAM", "layercam": "LayerCAM"}


def final_outputs(dataset):
    cam = config["cldf"]["cam"]
    return [
        f"{R}/{dataset}/metrics.csv",
        f"{R}/{dataset}/figure.png",
        f"{R}/{dataset}/cldf/{cam}/nifti",
        f"{R}/{dataset}/models/cdm_samples.png",
    ]
