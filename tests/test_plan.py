"""The experiment plan and the artifact catalogue, without Snakemake."""

from __future__ import annotations

import copy

import pytest

from cldf.catalogue import ARTIFACTS, Catalogue, wildcards
from cldf.config import DEFAULT_CONFIG, deep_merge, load_config
from cldf.plan import Plan
from cldf.registry import MAPS, SEGMENTERS, cam_methods, map_settings

CONFIG = load_config(DEFAULT_CONFIG)


def _plan(**override) -> Plan:
    return Plan(deep_merge(copy.deepcopy(CONFIG), override), lister=lambda ds: [f"c{i}" for i in range(7)])


def test_catalogue_paths_and_patterns() -> None:
    cat = Catalogue("out dir/")
    assert cat.path("slices", dataset="d") == "out dir/d/slices.zarr"
    assert cat.pattern("map_shard", map="features") == "out dir/{dataset}/shards/features/{shard}.zarr"
    assert cat.path("decoder", dataset="d", selection="fused", cam="gradcam") == "out dir/d/cldf/gradcam/decoder.pt"
    assert cat.path("decoder", dataset="d", selection="mg") == "out dir/d/cldf/ablation-mg/decoder.pt"
    assert cat.log(cat.pattern("map_shard")) == "out dir/logs/{dataset}/shards/{map}/{shard}.log"
    assert cat.benchmark(cat.path("model", dataset="d", model="cdm")) == "out dir/benchmarks/d/models/cdm.tsv"
    with pytest.raises(KeyError, match="shard"):
        cat.path("slice_shard", dataset="d")


def test_every_artifact_has_a_distinct_pattern_and_a_producer() -> None:
    patterns = [a.pattern for a in ARTIFACTS.values()]
    assert len(set(patterns)) == len(patterns)
    for artifact in ARTIFACTS.values():
        assert artifact.producer and artifact.description and "dataset" in wildcards(artifact.pattern)


def test_shards_cover_every_case_once() -> None:
    plan = _plan(shard_size=3)
    assert plan.n_shards("synthetic") == 3
    assert [plan.shard_cases("synthetic", k) for k in plan.shards("synthetic")] == [[0, 1, 2], [3, 4, 5], [6]]


def test_table_rows_derive_from_the_registry_and_the_config() -> None:
    plan = _plan(cams={"methods": ["gradcam", "layercam"]}, cldf={"cam": "gradcam"})
    rows = plan.table_rows("synthetic")
    assert set(rows) == {"GradCAM", "LayerCAM", "MG", "CDM saliency", "CLDF", "GradCAM+CL", "MG+CL",
                         "FSL UNet (upper bound)"}
    assert rows["CLDF"] == {"masks": "results/synthetic/cldf/gradcam/masks.zarr", "cam": "gradcam"}
    assert rows["MG+CL"] == {"masks": "results/synthetic/cldf/ablation-mg/masks.zarr", "cam": ""}
    assert rows["LayerCAM"] == {"masks": "results/synthetic/baselines/layercam/masks.zarr", "cam": "layercam"}
    assert set(plan.figure_baselines("synthetic")) == {"GradCAM", "LayerCAM", "MG", "CDM saliency"}
    assert len(rows) == len(plan.baseline_maps()) + len(SEGMENTERS)


def test_default_target_is_the_default_dataset_s_table_figure_nifti_and_samples() -> None:
    plan = _plan(results_dir="r")
    assert plan.default_targets() == ["r/synthetic/metrics.csv", "r/synthetic/figure.png",
                                      "r/synthetic/cldf/layercam/nifti", "r/synthetic/models/cdm_samples.png"]


def test_each_step_gets_only_the_settings_it_depends_on() -> None:
    plan = _plan()
    assert set(plan.map_settings("cams/layercam")) == {"layercam_layers", "batch_size"}
    assert set(plan.map_settings("cams/scorecam")) == {"layers", "scorecam_channels", "batch_size"}
    assert plan.map_settings("features") == CONFIG["features"]
    assert plan.decoder_settings("mg")["selection"]["mode"] == "mg"
    changed = _plan(cams={"layercam_layers": ["layer2"]})
    for name in cam_methods():
        same = map_settings(plan.config, MAPS[name]) == map_settings(changed.config, MAPS[name])
        assert same == (name != "layercam"), name


def test_phantom_dataset_reads_its_manifest_real_ones_their_files(tmp_path) -> None:
    plan = _plan()
    assert plan.raw_inputs("synthetic", 0) == ["results/synthetic/phantom.json"]
