"""The Snakemake workflow: config validation, dry runs, a real slicing run, bad targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from cldf.store import SliceStore

from cldf.catalogue import Catalogue

from .workflow_utils import REPO, artifact, planned_jobs, run_snakemake, tiny_config


def test_dry_run_of_default_target_plans_every_stage(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    jobs = planned_jobs(cfg)
    for rule in ["phantom", "slices_shard", "slices", "train_model", "map_shard", "gather_map", "fuse_cam",
                 "choose_layers", "tune_decoder", "choose_unlabelled", "selection", "segment_shard",
                 "cldf_masks", "baselines", "fsl_masks", "nifti", "metrics", "metrics_3d", "figure"]:
        assert jobs.get(rule, 0) >= 1, f"rule {rule} missing from the plan: {jobs}"
    # the CDM, two classifiers, the fully supervised UNet, and AME-CAM's, SEAM's and DiG's networks
    assert jobs["train_model"] == 4 + 3
    # Table 3's decoders (CAM alone, MG alone) and the CDM's samples are built on request only
    assert not {"decoder_ablation", "ablation_shard", "cdm_samples"} & set(jobs)
    # features, gradients, probabilities, CDM saliency, CDM (Hu et al.), SEAM, DiG + the five configured CAMs
    n_maps = 7 + 5
    assert jobs["map_shard"] == n_maps * jobs["slices_shard"] and jobs["gather_map"] == n_maps
    assert jobs["segment_shard"] == 2 * jobs["slices_shard"]  # both protocols
    assert jobs["baselines"] == 1 and jobs["choose_layers"] == 1  # every thresholded map in one job; LayerCAM's layers


def test_config_typo_names_the_key(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, {"cldf": {"decoder": {"epohcs": 3}}})
    res = run_snakemake(cfg, ["-n"], check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "epohcs" in out and "cldf.decoder" in out


def test_config_wrong_type_names_the_key(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, {"features": {"batch_size": "eight"}})
    res = run_snakemake(cfg, ["-n"], check=False)
    assert res.returncode != 0
    assert "features.batch_size" in res.stdout + res.stderr


def test_brats21_without_data_says_where_to_put_it(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, {"datasets": {"brats21": {"root": str(tmp_path / "nowhere")}}})
    res = run_snakemake(cfg, ["-n", "results/brats21/metrics.csv"], check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "datasets.brats21.root" in out and "BraTS2021_XXXXX" in out
    assert str(tmp_path / "nowhere") in out


def test_real_run_of_slices_target(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    slices = artifact(tmp_path, "slices", dataset="synthetic")
    run_snakemake(cfg, ["--cores", "2", str(slices.relative_to(tmp_path))])
    store = SliceStore(slices)
    settings = yaml.safe_load(cfg.read_text())
    assert store.image_size == settings["presets"]["cpu"]["image_size"]
    assert set(store.split) <= {"train", "val", "test"}
    assert (store.labels == 1).any() and (store.labels == 0).any()
    # a case lives in exactly one split
    for case in set(store.case_index):
        assert len(set(store.split[store.case_index == case])) == 1
    assert (tmp_path / "results/synthetic/slices.csv").exists()
    assert not list((tmp_path / "results/synthetic").glob(".*tmp*")), "temporary store left behind"


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "cldf.cli", "gather", "--shards", str(tmp_path / "missing"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert res.returncode == 1
    assert res.stderr.strip().startswith("cldf gather: error:")
    assert "Traceback" not in res.stderr


def test_slurm_profile_plans_shard_jobs_with_their_resources(tmp_path: Path) -> None:
    """Dry run through snakemake-executor-plugin-slurm: nothing is submitted."""
    cfg = tiny_config(tmp_path, {"train_gpus": 2, "device": "cuda"})  # the submit host needs no GPU
    table3 = str(artifact(tmp_path, "table3", dataset="synthetic").relative_to(tmp_path))
    res = run_snakemake(cfg, ["-n", "-p", "--workflow-profile", "none", "--profile", str(REPO / "profiles/slurm"),
                              "all", table3], quiet=False)
    text = res.stdout + res.stderr
    resources: dict[str, list[str]] = {}
    rule = None
    for line in text.splitlines():
        if line.startswith("rule "):
            rule = line[5:].rstrip(":")
        elif line.strip().startswith("resources:") and rule:
            resources.setdefault(rule, []).append(line)
    assert len(resources["map_shard"]) == 12 * len(resources["slices_shard"]) >= 24  # one job per map and shard
    for line in resources["train_model"]:
        assert "slurm_partition=CHANGE_ME_gpu_partition" in line and "gpu=2" in line and "cpus_per_task=8" in line
    gpu_rules = ["map_shard", "tune_decoder", "decoder_ablation", "segment_shard", "ablation_shard", "choose_unlabelled",
                 "fsl_masks"]
    for line in sum((resources[r] for r in gpu_rules), []):
        assert "slurm_partition=CHANGE_ME_gpu_partition" in line and "gpu=1" in line
    for line in resources["slices_shard"]:
        assert "slurm_partition=CHANGE_ME_cpu_partition" in line and "mem_mb=4000" in line
    assert "torchrun --standalone --nproc_per_node 2 -m cldf.cli train" in text


def test_results_dir_with_spaces_and_shell_characters_works(tmp_path: Path) -> None:
    results = "my results; $HOME & 'co'"
    cfg = tiny_config(tmp_path, {"results_dir": results})
    slices = artifact(tmp_path, "slices", results, dataset="synthetic")
    run_snakemake(cfg, ["--cores", "2", str(slices.relative_to(tmp_path))])
    store = SliceStore(slices)
    assert store.n > 0 and (tmp_path / results / "synthetic/skipped_cases.csv").read_text() == "case,reason\n"
    assert (tmp_path / Catalogue(results).log(Catalogue(results).path("slices", dataset="synthetic"))).exists()


def test_skipped_case_is_listed_and_strays_ignored_in_a_real_run(tmp_path: Path) -> None:
    from cldf.data.phantom import generate_phantom

    generate_phantom(tmp_path / "data", n_cases=5, shape=(40, 40, 16), seed=3)
    (tmp_path / "data/Synth_002/Synth_002_t1.nii.gz").unlink()
    (tmp_path / "data/__MACOSX").mkdir()
    (tmp_path / "data/README.txt").write_text("sample")
    brats = {"root": str(tmp_path / "data"), "on_bad_case": "skip", "image_size": 32,
             "split": {"val_fraction": 0.0, "test_fraction": 0.25}}
    cfg = tiny_config(tmp_path, {"datasets": {"brats21": brats}})
    slices = artifact(tmp_path, "slices", dataset="brats21")
    res = run_snakemake(cfg, ["--cores", "2", str(slices.relative_to(tmp_path))], quiet=False)
    assert "ignoring" in res.stdout + res.stderr and "README.txt" in res.stdout + res.stderr
    skipped = (tmp_path / "results/brats21/skipped_cases.csv").read_text().splitlines()
    assert skipped[0] == "case,reason" and len(skipped) == 2 and skipped[1].startswith("Synth_002,missing file")
    store = SliceStore(slices)
    assert [c["id"] for c in store.cases] == [f"Synth_{i:03d}" for i in range(5)]
    assert store.cases[2]["split"] is None and 2 not in set(store.case_index.tolist())
    assert sorted({c["split"] for c in store.cases if c["split"]}) == ["test", "train"]
