# Config validation, the experiment plan (cldf.plan) and the names every rule file shares.

import shlex
import sys

from cldf.config import ConfigError, validate_config
from cldf.io.errors import DataError
from cldf.plan import MODEL_KINDS, Plan, as_json
from cldf.registry import DECODERS, FEATURE_SOURCES, MAPS, METHOD_NETWORKS, SEGMENTERS


def stop(message):
    """End the workflow with one line on stderr (no traceback): bad config or missing data."""
    print(f"cldf: error: {message}", file=sys.stderr)
    sys.exit(1)


try:
    validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
except ConfigError as err:
    stop(f"invalid configuration: {err}")

PLAN = Plan(config)
CAT = PLAN.catalogue
DEVICE = config["device"]
SEED = config["seed"]
GPU = PLAN.gpus()  # the local profile caps the `gpu` resource at 1: GPU jobs run one at a time
TRAIN_THREADS = PLAN.train_threads()


def planned(method, *args):
    """Ask the plan; bad data or config found while planning ends the run with one line."""
    try:
        return method(*args)
    except (DataError, ConfigError) as err:
        stop(str(err))


def shard_paths(name, dataset, **fixed):
    """The per-shard artifact ``name`` of every shard of ``dataset``."""
    return [CAT.path(name, dataset=dataset, shard=k, **fixed) for k in planned(PLAN.shards, dataset)]


def shard_cases(wildcards):
    """Comma-separated global case indices of one shard (what `cldf … --cases` takes)."""
    return ",".join(str(i) for i in planned(PLAN.shard_cases, wildcards.dataset, wildcards.shard))


MAPS_BY_STORE = {m.store: m for m in MAPS.values()}
CONDA_ENV = "../envs/cldf.yaml"
"""The environment of every rule under `--use-conda`; without it the rules run in the current one."""



def final_cam(wildcards):
    """The store of the CAM that CLDF starts from (a per-layer CAM is read fused over the chosen layers)."""
    return PLAN.final_map(wildcards.dataset, MAPS[wildcards.cam])


MEAN_GRADIENT = CAT.pattern("map", map="mean_gradient")
PROBS = CAT.pattern("map", map="classifier_probs")
FEATURES = CAT.pattern("map", map="features")
SELECTION = CAT.pattern("selection")


def row_masks(wildcards):
    """The mask stores of every row of the comparison table."""
    return sorted({row["masks"] for row in PLAN.rows(wildcards.dataset)})


def tagged_choices(dataset):
    """Choices made for the other CAMs CLDF starts from: path -> CAM (named choice@CAM in selection.csv)."""
    return {CAT.path(name, dataset=dataset, cam=cam): cam for cam in PLAN.cldf_cams()[1:]
            for name in ("tuning", "unlabelled_choices")}


def feature_networks(dataset):
    """The trained networks decoder features may come from (Tables 2 and the levers): kind -> checkpoint."""
    return {kind: CAT.path("model", dataset=dataset, model=kind) for kind in FEATURE_SOURCES}

# --- users' own data (rules/own_data.smk) ---------------------------------------------------------


def given_source(wildcards):
    """The selection.csv the choices of a dataset without masks come from (selection_from), or nothing."""
    return planned(PLAN.given_source, wildcards.dataset)


def source_option(wildcards, input):
    """The `--source` option of `cldf given-…` when the choices come from a selection.csv."""
    return f"--source {shlex.quote(input.source[0])}" if input.source else ""


def choices_option(wildcards, input):
    """The `--choices` option of `cldf segment`: the unlabelled protocol's choices, when the job reads them."""
    return f"--choices {shlex.quote(input.choices[0])}" if input.choices else ""


def nifti_folder(name):
    """The folder of the per-case NIfTI files of artifact ``name`` (pseudo_mask, prediction)."""
    return lambda w: os.path.dirname(CAT.path(name, dataset=w.dataset, case="-"))


def labels_checked(wildcards):
    """labels_check.csv where a dataset has both a labels table and masks (built with its pseudo-masks)."""
    ds = planned(PLAN.dataset, wildcards.dataset)
    both = ds.get("labels_csv") and planned(PLAN.has_masks, wildcards.dataset)
    return [CAT.path("labels_check", dataset=wildcards.dataset)] if both else []


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    shard=r"\d+",
    cam="|".join(m.name for m in PLAN.cams()),
    model="|".join(MODEL_KINDS),
    map="|".join(m.store for m in PLAN.maps()),
    protocol="labelled|unlabelled",
