"""End to end on the tiny configuration `.test/config.yaml` (the run `make test` does).

One real run of the whole default target (small phantom, briefly trained models, a results directory
whose name holds a space and shell characters) is shared by the tests of this module: the table, the
cached maps, the NIfTI export, partial re-runs, determinism and the absence of leftovers. The quality
of the method is asserted on the full demo (`tests/test_pipeline.py`, `make test-slow`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import zarr

from cldf.catalogue import Catalogue
from cldf.config import DEFAULT_CONFIG, deep_merge
from cldf.evaluate.table import TABLE_COLUMNS
from cldf.io.layouts import case_files
from cldf.maps.run import map_rows
from cldf.plan import Plan
from cldf.store import SPLITS, MapStore, SliceStore

from .workflow_utils import REPO, TEST_CONFIG, planned_jobs, planned_wildcards, run_snakemake

CONFIG = deep_merge(yaml.safe_load(DEFAULT_CONFIG.read_text()), yaml.safe_load(TEST_CONFIG.read_text()))
CAT = Catalogue(CONFIG["results_dir"])
DS = "synthetic"


def _config(work: Path, overrides: dict | None = None) -> Path:
    """The .test config (plus overrides) as <work>/config/config.yaml."""
    path = work / "config" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(TEST_CONFIG.read_text()), overrides or {})))
    return path


def _path(work: Path, name: str, **wildcards: object) -> Path:
    return work / CAT.path(name, dataset=DS, **wildcards)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directory of one full run of the default target with the .test configuration."""
    work = tmp_path_factory.mktemp("e2e")
    run_snakemake(_config(work), ["--cores", "2"], timeout=1500)
    return work


def test_table_has_every_registered_row_under_both_protocols(work: Path) -> None:
    table = pd.read_csv(_path(work, "metrics"), keep_default_na=False)
    assert tuple(table.columns) == TABLE_COLUMNS
    rows = Plan(CONFIG).rows(DS)
    assert [tuple(r) for r in table[["protocol", "method", "cam"]].to_numpy()] == [
        (r["protocol"], r["method"], r["cam"]) for r in rows]
    assert {"CLDF", "fsl_unet", "intensity", "gradcampp", "cdm_saliency"} <= set(table.method)
    assert not {"cam_cl", "mg_cl"} & set(table.method)  # the selection ablations are Table 3's
    assert set(table.protocol) == {"labelled", "unlabelled"}
    numbers = table.replace("", np.nan)
    assert numbers.dice_mean.astype(float).between(0, 1).all() and (numbers.n_cases.astype(int) >= 1).all()
    ci = numbers[["dice_ci_low", "dice_mean", "dice_ci_high"]].astype(float)
    assert ((ci.dice_ci_low <= ci.dice_mean + 1e-12) & (ci.dice_mean <= ci.dice_ci_high + 1e-12)).all()
    unlabelled = numbers[numbers.protocol == "unlabelled"]
    gated = unlabelled[unlabelled.method != "fsl_unet"]
    assert gated.gate_sensitivity.astype(float).notna().all() and gated.fp_rate_neg.astype(float).notna().all()
    assert numbers[numbers.protocol == "labelled"].fp_rate_neg.isna().all()
    per_case = pd.read_csv(_path(work, "metrics_per_case"), keep_default_na=False)
    assert set(zip(per_case.protocol, per_case.method)) == set(zip(table.protocol, table.method))
    differences = pd.read_csv(_path(work, "differences"), keep_default_na=False)
    assert len(differences) == len(table) - 2 and set(differences.method) == {"CLDF"}
    volumes = pd.read_csv(_path(work, "metrics_3d"), keep_default_na=False)
    test_cases = {c["id"] for c in SliceStore(_path(work, "slices")).cases if c.get("split") == "test"}
    assert set(volumes.case) == test_cases and len(volumes) == len(table) * len(test_cases)
    assert volumes.dice_3d.between(0, 1).all() and (volumes.hd95_mm >= 0).all()


def test_every_choice_is_recorded_with_its_grid(work: Path) -> None:
    selection = pd.read_csv(_path(work, "selection"), dtype={"value": str})
    assert list(selection.columns) == ["choice", "value", "val_dice", "chosen"]
    grids = CONFIG["choices"]
    counts = selection.groupby("choice").size().to_dict()
    for method in Plan(CONFIG).baseline_maps():
        assert counts[f"threshold:{method.name}"] == len(grids["threshold"])
    assert counts["layers:layercam"] == len(grids["layercam_layers"])
    assert counts["intensity"] == 2 * 4  # 4 modalities, bright or dark
    quantiles = len(grids["quantile"]) if CONFIG["cldf"]["selection"]["threshold"] == "quantile" else 1
    # the optimiser (and quantile) grid reads the first layer set; its best then reads each other set; the
    # best of all is then scored after each other epoch count (no decoder more)
    first = CONFIG["cldf"]["decoder"]["epochs"]
    decoders = quantiles * len(grids["optimizer"]) + len(grids["feature_layers"]) - 1 + len(set(grids["epochs"]) - {first})
    assert counts["decoder"] == decoders * len(grids["cluster"]) * len(grids["components"]) * len(grids["slice_vote"])
    tried = [json.loads(v) for v in selection[selection.choice == "decoder"].value]
    assert [list(x) for x in dict.fromkeys(tuple(v["feature_layers"]) for v in tried)] == grids["feature_layers"]
    assert list(dict.fromkeys(v["epochs"] for v in tried)) == [first, *sorted(set(grids["epochs"]) - {first})]
    assert counts["conditioning"] == len(grids["conditioning"]) and counts["gate"] == len(grids["gate"])
    assert (selection.groupby("choice").chosen.sum() == 1).all()
    for choice, frame in selection.groupby("choice"):
        assert frame.val_dice.max() == frame[frame.chosen].val_dice.iloc[0], choice


def test_cached_maps_cover_the_slices_they_are_registered_for(work: Path) -> None:
    slices = SliceStore(_path(work, "slices"))
    for method in Plan(CONFIG).maps():
        store = MapStore(_path(work, "map", map=method.store))
        settings = Plan(CONFIG).map_settings(method.store)
        expected = map_rows(slices, method, list(range(len(slices.cases))), settings, CONFIG["seed"])
        assert np.array_equal(store.slice_ids, expected), method.name
        for name, array in store.group.arrays():
            assert np.isfinite(np.asarray(array[:], dtype=np.float32)).all(), f"{method.name}/{name}"
    features = MapStore(_path(work, "map", map="features"))
    assert not np.isin(features.slice_ids, slices.indices(split="test")).any()  # computed on the fly instead


def test_test_masks_reach_evaluation_only(work: Path) -> None:
    """In a fresh plan, the test truth is an input of the evaluation rules and of nothing else."""
    fresh = work / "fresh"
    fresh.mkdir(exist_ok=True)
    res = run_snakemake(_config(fresh), ["-n", "-p"], quiet=False)
    truth = CAT.path("test_truth", dataset=DS)
    rules, rule = set(), None
    for line in res.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("input:") and truth in line:
            rules.add(rule)
    assert rules == {"metrics", "figure"}
    package = Path(__file__).resolve().parent.parent / "cldf"
    users = {p.relative_to(package).parts[0] for p in package.rglob("*.py") if "TestTruth" in p.read_text()}
    assert users == {"evaluate", "store.py"}


def test_nifti_masks_are_in_the_original_geometry(work: Path) -> None:
    slices = SliceStore(_path(work, "slices"))
    test_cases = {slices.cases[i]["id"] for i in np.unique(slices.case_index[slices.indices(split="test")])}
    folder = _path(work, "nifti", cam=CONFIG["cldf"]["cam"])
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in test_cases)
    ds = {**CONFIG["datasets"][DS], "root": str(work / CONFIG["datasets"][DS]["root"]), "name": DS}
    for case in test_cases:
        mask, flair = nib.load(folder / f"{case}.nii.gz"), nib.load(case_files(ds, case)["flair"])
        assert mask.shape == flair.shape and np.allclose(mask.affine, flair.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_every_job_logged_and_nothing_half_written_left(work: Path) -> None:
    results = work / CONFIG["results_dir"]
    leftovers = [p for p in results.rglob(".*") if ".tmp-" in p.name or ".buffers-" in p.name]
    assert leftovers == []
    assert not (results / DS / "shards").exists() or not any((results / DS / "shards").rglob("zarr.json"))
    logs = list((results / "logs").rglob("*.log"))
    assert len(logs) >= 40 and all(p.stat().st_size > 0 for p in logs if "train" in p.name)


def test_switching_the_cam_reuses_models_features_and_gradients(work: Path) -> None:
    """Only the new CAM is recomputed (it is now needed for every slice; the old one, LayerCAM, keeps its maps
    of every slice for Table 3); features, gradients, probabilities and saliency are kept."""
    config = _config(work, {"cldf": {"cam": "gradcam"}})
    jobs = planned_jobs(config)
    maps = planned_wildcards(config, "map_shard", "map")
    _config(work)
    print(dict(jobs), maps)
    assert set(maps) == {"cams/gradcam"}
    for reused in ["phantom", "slices_shard", "slices", "train_model", "cdm_samples", "fsl_masks", "choose_layers",
                   "fuse_cam"]:
        assert jobs.get(reused, 0) == 0, f"{reused} would re-run after switching cldf.cam"
    for rerun in ["tune_decoder", "choose_unlabelled", "segment_shard", "selection", "metrics",
                  "figure", "nifti"]:
        assert jobs.get(rerun, 0) >= 1, f"{rerun} should re-run after switching cldf.cam"


def test_changing_feature_timesteps_reruns_features_not_cams(work: Path) -> None:
    jobs = planned_jobs(_config(work, {"features": {"timesteps": [1, 10, 50]}}))
    _config(work)
    print(dict(jobs))
    n_shards = Plan(CONFIG).n_shards(DS)
    n_cams = len(Plan(CONFIG).cldf_cams())
    assert jobs.get("map_shard", 0) == n_shards and jobs.get("tune_decoder", 0) == n_cams  # features only
    for reused in ["train_model", "baselines", "fsl_masks", "choose_layers"]:
        assert jobs.get(reused, 0) == 0, f"{reused} would re-run after changing features.timesteps"


def test_table3_trains_the_selection_ablations_on_request_only(work: Path) -> None:
    """The default target trains CLDF's decoder only; Table 3 adds the CAM-alone and MG-alone decoders and
    their (labelled) segmentation, reusing everything else."""
    config = _config(work)
    target = CAT.path("table3", dataset=DS)
    jobs = planned_jobs(config, [target])
    assert dict(jobs) == {"decoder_ablation": 2, "ablation_shard": Plan(CONFIG).n_shards(DS), "ablation_masks": 1,
                          "table3": 1}, dict(jobs)
    run_snakemake(config, ["--cores", "2", target])
    table = pd.read_csv(work / target, keep_default_na=False)
    assert list(table.selection) == ["CAM alone", "CAM + CL", "MG + CL", "CAM ∧ MG + CL"]
    assert table.dice_mean.between(0, 1).all()
    ablations = MapStore(_path(work, "ablation_masks", cam="layercam"))
    cldf = MapStore(_path(work, "cldf_masks", cam="layercam", protocol="labelled"))
    assert list(ablations.slice_ids) == list(cldf.slice_ids)
    assert not np.array_equal(ablations.read("cam_cl", ablations.slice_ids), cldf.read("CLDF", cldf.slice_ids))


def _cldf(workdir: Path, *args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "cldf.cli", *args, "--device", "cpu"], cwd=workdir,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_seed_lever_moves_the_scores_by_chance_alone(work: Path, tmp_path: Path) -> None:
    """A lever ``{"seed": s}`` retrains the chosen configuration with another seed for the decoder and K-means:
    with the run's own seed it gives the chosen row exactly, with another seed other scores; a lever
    ``{"vote": 1}`` is the chosen row too (:func:`test_a_vote_lever_keeps_what_most_seeds_masks_hold`), and so is
    ``{"self_train": 0}``, while a round of self-training (``{"self_train": 1}``) retrains the decoder on its own
    masks and scores otherwise."""
    cam, seed = CONFIG["cldf"]["cam"], int(CONFIG["seed"])
    levers = {"run's seed": {"seed": seed}, "another": {"seed": seed + 1}, "vote of one": {"vote": 1},
              "no self-training": {"self_train": 0}, "self-training": {"self_train": 1}}
    settings = {**Plan(CONFIG).ablation_settings(), "levers": levers, "bootstrap": 100}
    out = tmp_path / "ablation.csv"
    _cldf(work, "ablation", "--slices", str(_path(work, "slices")), "--test-truth", str(_path(work, "test_truth")),
          "--features", str(_path(work, "map", map="features")),
          "--networks", f"cdm={_path(work, 'model', model='cdm')}", "--cam", str(_path(work, "fused_cam", cam=cam)),
          "--mg", str(_path(work, "map", map="mean_gradient")), "--tuning", str(_path(work, "tuning", cam=cam)),
          "--settings", json.dumps(settings), "--out", str(out), "--seed", str(seed))
    rows = pd.read_csv(out).set_index("lever")[["val_dice", "test_dice"]]
    assert rows.loc["run's seed"].tolist() == rows.loc["chosen on validation"].tolist()
    assert rows.loc["another"].tolist() != rows.loc["chosen on validation"].tolist()
    assert rows.loc["vote of one"].tolist() == rows.loc["chosen on validation"].tolist()
    assert rows.loc["no self-training"].tolist() == rows.loc["chosen on validation"].tolist()
    assert rows.loc["self-training"].tolist() != rows.loc["chosen on validation"].tolist()


def test_a_vote_lever_keeps_what_most_seeds_masks_hold(work: Path) -> None:
    """``{"vote": 3}`` gives, slice by slice and pixel by pixel, the majority of the masks of the seed levers
    s, s+1 and s+2 (each decoder and its K-means seeded on its own), which differs from seed s's mask."""
    from cldf.evaluate.ablation import Ablation, chosen_settings, majority
    from cldf.evaluate.choices import chosen, read_selection
    from cldf.models.checkpoint import load_model

    cam, seed, s = CONFIG["cldf"]["cam"], int(CONFIG["seed"]), Plan(CONFIG).ablation_settings()
    slices = SliceStore(_path(work, "slices"))
    base = chosen_settings(s["cldf"], chosen(read_selection(_path(work, "tuning", cam=cam)), "decoder"),
                           s["features"], int(s["max_train_slices"]))
    cdm = load_model(_path(work, "model", model="cdm"), torch.device("cpu"), "cdm",
                     {"image_size": slices.image_size, "in_channels": slices.channels})
    ablation = Ablation(_path(work, "slices"), _path(work, "test_truth"), _path(work, "map", map="features"),
                        {"cdm": cdm}, {"cam": _path(work, "fused_cam", cam=cam), "mg": _path(work, "map", map="mean_gradient")},
                        base, torch.device("cpu"), seed)
    singles = [ablation.masks({"seed": seed + i}) for i in range(3)]
    voted = ablation.masks({"vote": 3})
    for part in (0, 1):
        assert np.array_equal(voted[part], majority([single[part] for single in singles]))
    assert not np.array_equal(voted[1], singles[0][1])


def test_unlabelled_rows_never_read_a_test_label(work: Path, tmp_path: Path) -> None:
    """Flip every test slice's image-level label in a copy of the slice store and re-run segmentation and
    evaluation: the unlabelled masks and rows come out unchanged; the labelled masks change."""
    plan, cam = Plan(CONFIG), CONFIG["cldf"]["cam"]
    copy = tmp_path / "slices"
    shutil.copytree(_path(work, "slices"), copy)
    store = zarr.open_group(str(copy), mode="a")
    test = np.asarray(store["split"][:]) == SPLITS.index("test")
    labels = np.asarray(store["labels"][:])
    store["labels"][:] = np.where(test, np.where(labels == 0, 1, 0), labels).astype(np.int8)
    decoders = json.dumps({k: str(work / v) for k, v in plan.decoders(DS, cam).items()})
    cases = ",".join(str(i) for i in range(len(SliceStore(copy).cases)))
    for protocol in ("labelled", "unlabelled"):
        _cldf(work, "segment", "--slices", str(copy), "--cdm", CAT.path("model", dataset=DS, model="cdm"),
              "--decoders", decoders, "--protocol", protocol, "--choices",
              CAT.path("unlabelled_choices", dataset=DS, cam=cam),
              "--tuning", CAT.path("tuning", dataset=DS, cam=cam), "--probs", CAT.path("map", dataset=DS, map="classifier_probs"),
              "--settings", json.dumps(plan.segment_settings()), "--cases", cases, "--out", str(tmp_path / protocol))
        original, again = MapStore(_path(work, "cldf_masks", cam=cam, protocol=protocol)), MapStore(tmp_path / protocol)
        same = np.array_equal(original.read("CLDF", original.slice_ids), again.read("CLDF", original.slice_ids))
        assert same == (protocol == "unlabelled"), protocol
    rows = [{**r, "masks": str(work / r["masks"])} for r in plan.rows(DS)]
    _cldf(work, "metrics", "--slices", str(copy), "--test-truth", CAT.path("test_truth", dataset=DS), "--probs",
          CAT.path("map", dataset=DS, map="classifier_probs"), "--choices", CAT.path("selection", dataset=DS),
          "--rows", json.dumps(rows), "--settings", json.dumps(plan.evaluation_settings()), "--seed", str(CONFIG["seed"]),
          "--out", str(tmp_path / "m.csv"), "--per-slice", str(tmp_path / "s.csv"), "--per-case", str(tmp_path / "c.csv"),
          "--differences", str(tmp_path / "d.csv"))
    before = pd.read_csv(_path(work, "metrics"), keep_default_na=False)
    after = pd.read_csv(tmp_path / "m.csv", keep_default_na=False)
    assert before[before.protocol == "unlabelled"].reset_index(drop=True).equals(
        after[after.protocol == "unlabelled"].reset_index(drop=True))


def test_same_seed_gives_the_same_table(work: Path) -> None:
    """Re-train CLDF's decoders, re-segment and re-evaluate: the tables are byte-identical. (The ablations'
    decoders train through the same code; the networks' own determinism is tests/test_training_resume.py's.)"""
    names = ["metrics", "metrics_per_case", "differences", "selection", "metrics_3d"]
    before = {name: _path(work, name).read_text() for name in names}
    res = run_snakemake(_config(work), ["--cores", "2", "--forcerun", "tune_decoder", "segment_shard", "baselines",
                                        "--", *(CAT.path(n, dataset=DS) for n in names)])
    for name in names:
        assert _path(work, name).read_text() == before[name], name
    # the tiny run's briefly trained CDM gives maps no better than the whole body: the re-run baselines job
    # warns, and the run ends by printing its warnings
    log = work / CAT.log(CAT.path("map_choices", dataset=DS))
    warned = [line for line in log.read_text().splitlines() if " cldf.choose WARNING map " in line]
    assert warned and "warning(s) in the logs of this run's jobs:" in res.stdout
    assert all(f"{CAT.log(CAT.path('map_choices', dataset=DS))}: {line}" in res.stdout for line in warned)


def test_readme_tables_splices_what_cldf_tables_prints(work: Path, tmp_path: Path) -> None:
    from cldf.evaluate.readme import machine, read_block

    results = str(_path(work, "metrics").parent)
    printed = subprocess.run([sys.executable, "-m", "cldf.cli", "tables", results], capture_output=True, text=True,
                             check=True).stdout
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    subprocess.run([sys.executable, "-m", "cldf.cli", "readme-tables", results, "--tag", "demo", "--readme",
                    str(readme)], check=True, capture_output=True)
    block = read_block(readme.read_text(), "demo")
    assert (block.body, block.machine, block.results) == (printed.strip(), machine(), results)
