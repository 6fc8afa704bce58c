"""The experiment plan and the artifact catalogue, without Snakemake."""

from __future__ import annotations

import copy

import pytest

from cldf.catalogue import ARTIFACTS, Catalogue, wildcards
from cldf.config import DEFAULT_CONFIG, ConfigError, check_config, deep_merge, load_config
from cldf.plan import Plan
from cldf.registry import DECODERS, MAPS, SEGMENTERS, cam_methods, label_of, map_settings

CONFIG = load_config(DEFAULT_CONFIG)


def _plan(**override) -> Plan:
    return Plan(deep_merge(copy.deepcopy(CONFIG), override), lister=lambda ds: [f"c{i}" for i in range(7)])


def test_catalogue_paths_and_patterns() -> None:
    cat = Catalogue("out dir/")
    assert cat.path("slices", dataset="d") == "out dir/d/slices.zarr"
    assert cat.pattern("map_shard", map="features") == "out dir/{dataset}/shards/features/{shard}.zarr"
    assert cat.path("decoder", dataset="d", selection="fused", cam="gradcam") == "out dir/d/cldf/gradcam/fused/decoder.pt"
    assert cat.path("cldf_masks", dataset="d", cam="x", protocol="unlabelled") == "out dir/d/cldf/x/masks_unlabelled.zarr"
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


def test_rows_derive_from_the_registry_and_the_config() -> None:
    plan = _plan(cams={"methods": ["gradcam", "layercam"]}, cldf={"cam": "gradcam", "extra_cams": []})
    rows = plan.rows("synthetic")
    maps = ["gradcam", "layercam", "mean_gradient", "cdm_saliency", "cdm_hu", "seam", "dig"]
    methods = [*maps, "intensity", "CLDF", "fsl_unet"]  # CLDF's selection ablations are Table 3's rows only
    assert [(r["protocol"], r["method"]) for r in rows] == [(p, m) for p in ("labelled", "unlabelled") for m in methods]
    cldf = [r for r in rows if r["method"] == "CLDF"]
    assert [r["masks"] for r in cldf] == ["results/synthetic/cldf/gradcam/masks_labelled.zarr",
                                          "results/synthetic/cldf/gradcam/masks_unlabelled.zarr"]
    assert all(r["cam"] == "gradcam" and r["array"] == "CLDF" and r["gated"] for r in cldf)
    by = {(r["protocol"], r["method"]): r for r in rows}
    assert by["labelled", "CLDF"]["cam"] == "gradcam" and by["labelled", "layercam"]["cam"] == "layercam"
    assert by["labelled", "cdm_hu"]["cam"] == ""
    assert by["unlabelled", "fsl_unet"]["gated"] is False
    assert by["labelled", "intensity"]["masks"] == "results/synthetic/baselines/intensity/masks.zarr"
    assert len(rows) == 2 * (len(plan.baseline_maps()) + len([s for s in SEGMENTERS.values() if not s.ablation]))
    assert label_of("cam_cl", "gradcam") == "GradCAM+CL" and label_of("CLDF", "gradcam") == "CLDF (GradCAM)"
    assert label_of("mg_cl", "gradcam") == "MG+CL (tuned with GradCAM)"


def test_every_cam_cldf_starts_from_gets_its_own_decoder_rows() -> None:
    plan = _plan(cams={"methods": ["gradcam", "layercam", "amecam"]},
                 cldf={"cam": "layercam", "extra_cams": ["amecam"]}, table3={"cams": ["gradcam"]})
    decoders = [(r["protocol"], r["method"], r["cam"]) for r in plan.rows("d") if r["method"] in DECODERS.values()]
    assert decoders == [(p, "CLDF", c) for p in ("labelled", "unlabelled") for c in ("layercam", "amecam")]
    assert list(plan.decoders("d", "amecam")) == ["CLDF"]
    assert list(plan.decoders("d", "amecam", ablation=True)) == ["cam_cl", "mg_cl"]
    assert plan.cldf_cams() == ["layercam", "amecam"] and plan.decoder_cams() == ["layercam", "amecam", "gradcam"]
    # Table 3's CAM is computed for every slice (its decoders train on it), not only for evaluation
    assert plan.map_settings("cams/gradcam")["rows"] == "all"
    assert [(r["method"], r["cam"], r["protocol"]) for r in plan.table3_rows("d")] == [
        ("gradcam", "gradcam", "labelled"), ("cam_cl", "gradcam", "labelled"), ("mg_cl", "gradcam", "labelled"),
        ("CLDF", "gradcam", "labelled")]
    # the ablations' masks come from their own (labelled) segmentation, CLDF's from the comparison table's
    assert [r["masks"] for r in plan.table3_rows("d")][1:] == [
        "results/d/cldf/gradcam/ablation_masks_labelled.zarr"] * 2 + ["results/d/cldf/gradcam/masks_labelled.zarr"]


def test_a_cam_outside_cams_methods_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"config key table3.cams: 'scorecam' is not in cams.methods"):
        check_config(deep_merge(load_config(), {"cams": {"methods": ["layercam", "amecam"]},
                                                "table3": {"cams": ["scorecam"]}}))
    with pytest.raises(ConfigError, match=r"config key cldf.extra_cams: 'gradcam' is not in cams.methods"):
        check_config(deep_merge(load_config(), {"cams": {"methods": ["layercam"]}, "table3": {"cams": ["layercam"]},
                                                "cldf": {"extra_cams": ["gradcam"]}}))


def test_a_per_layer_cam_is_read_fused() -> None:
    plan = _plan()
    assert plan.final_map("d", MAPS["layercam"]) == "results/d/cams/layercam.zarr"
    assert plan.final_map("d", MAPS["gradcam"]) == "results/d/cams/gradcam.zarr"
    maps = plan.thresholded_maps("d")
    assert maps["layercam"] == "results/d/cams/layercam.zarr" and plan.per_layer_cams() == ["layercam"]
    assert set(maps) == {"gradcam", "gradcampp", "scorecam", "layercam", "amecam", "mean_gradient", "cdm_saliency",
                         "cdm_hu", "seam", "dig"}
    assert plan.baseline_masks("d")["intensity"] == "results/d/baselines/intensity/masks.zarr"


def test_default_target_builds_every_evaluation_file() -> None:
    plan = _plan(results_dir="r")
    assert plan.default_targets() == [
        "r/synthetic/metrics.csv", "r/synthetic/metrics_per_case.csv", "r/synthetic/differences.csv",
        "r/synthetic/selection.csv", "r/synthetic/metrics_3d.csv", "r/synthetic/figure.png",
        "r/synthetic/cldf/layercam/nifti"]


def test_each_step_gets_only_the_settings_it_depends_on() -> None:
    plan = _plan()
    assert set(plan.map_settings("cams/layercam_layers")) == {"layercam_layers", "batch_size", "rows"}
    assert set(plan.map_settings("cams/scorecam")) == {"layers", "scorecam_channels", "batch_size", "rows"}
    assert plan.map_settings("cams/layercam_layers")["rows"] == "all"  # CLDF starts from LayerCAM
    assert plan.map_settings("cams/scorecam")["rows"] == "evaluation"  # a baseline only
    assert set(plan.map_settings("features")) == {"timesteps", "layers", "batch_size", "max_train_slices"}
    assert set(plan.tune_settings()["choices"]) == {"quantile", "optimizer", "feature_layers", "cluster", "components", "slice_vote", "epochs"}  # quantile selection
    by_otsu = _plan(cldf={"selection": {"threshold": "otsu"}})
    assert set(by_otsu.tune_settings()["choices"]) == {"optimizer", "feature_layers", "cluster", "components", "slice_vote", "epochs"}  # Otsu selection: no quantile grid
    assert set(plan.unlabelled_settings()["choices"]) == {"conditioning", "gate"}
    changed = _plan(choices={"layercam_layers": [["layer2"]]})
    for name in cam_methods():
        same = map_settings(plan.config, MAPS[name]) == map_settings(changed.config, MAPS[name])
        assert same == (name != "layercam"), name
    assert plan.segment_settings() == _plan(choices={"gate": [0.3]}).segment_settings()


def test_phantom_dataset_reads_its_manifest() -> None:
    assert _plan().raw_inputs("synthetic", 0) == ["results/synthetic/phantom.json"]


def test_jobs_cldf_waits_for_start_first() -> None:
    plan = _plan()
    models = ["cdm", "noisy_classifier", "cam_classifier", "amecam", "fsl_unet", "seam", "dig"]
    assert [plan.priority("model", k) for k in models] == [4, 3, 2, 2, 1, 1, 1]
    assert plan.priority("map", "features") == plan.priority("map", "cams/layercam_layers") == 3
    assert plan.priority("map", "classifier_probs") == 1
    assert plan.priority("map", "cdm_saliency") == plan.priority("map", "cams/scorecam") == 0
