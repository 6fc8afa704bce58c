"""Measure the pipeline's cost in one run: `python bench/run.py [--dataset synthetic] [--cores 2]`.

For each dataset: a full workflow run from scratch in its own working directory (timed), the re-run
after switching ``cldf.cam`` (timed, as a fraction of the full run), wall time and peak memory of every
rule (Snakemake's ``benchmark:`` files), throughput of feature extraction and mean-gradient maps against
the plain forward (forward + backward) cost of the same model on the same batch, feature-store bytes
per slice against full-resolution float32 features, and peak memory of decoder training and
segmentation at 1x, 2x and 4x the number of slices. Writes ``bench/results.csv`` and prints a
Markdown table. Timings are ratios within one run where they are compared: these machines are noisy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from cldf.config import DEFAULT_CONFIG, deep_merge
from cldf.store import MapStore, SliceStore

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "workflow" / "Snakefile"
SHARED_BRATS = REPO.parent / "shared" / "data" / "brats18"


def write_config(workdir: Path, overrides: dict) -> Path:
    cfg = deep_merge(yaml.safe_load(DEFAULT_CONFIG.read_text()), overrides)
    path = workdir / "config" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, config: Path, target: str, cores: int) -> float:
    """Run the workflow to ``target`` (``config`` merged over the workdir's config); return wall seconds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
                    "--configfile", str(config), "--cores", str(cores), target, "--quiet", "rules"],
                   check=True, env=env, cwd=workdir)
    return time.perf_counter() - start


def rule_benchmarks(results: Path) -> pd.DataFrame:
    """Per rule: jobs, summed wall seconds, max peak RSS (MB) from the benchmark TSVs."""
    rows = []
    for tsv in results.glob("benchmarks/**/*.tsv"):
        rel = tsv.relative_to(results / "benchmarks").parts[1:]
        rule = "/".join(p for p in rel[:-1] if not p.isdigit()) or Path(rel[-1]).stem
        if rel[0] in ("features", "mean_gradient", "saliency"):
            rule = rel[0]
        elif rel[0] == "cams":
            rule = f"cams/{rel[1]}"
        elif rel[0] == "cldf":
            rule = "cldf/" + ("segment" if Path(rel[-1]).stem.startswith("segment") else Path(rel[-1]).stem)
        data = pd.read_csv(tsv, sep="\t")
        rows.append({"rule": rule, "s": float(data["s"].iloc[-1]), "max_rss_mb": float(data["max_rss"].iloc[-1])})
    table = pd.DataFrame(rows)
    return table.groupby("rule").agg(jobs=("s", "size"), wall_s=("s", "sum"), max_rss_mb=("max_rss_mb", "max"))


def _time(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def throughput(results: Path, cfg: dict, batch: int = 8) -> dict[str, float]:
    """Feature extraction and mean-gradient maps against the plain model cost on the same batch."""
    from cldf.maps.common import feature_noise
    from cldf.maps.features import extract_features
    from cldf.maps.gradients import mean_gradient
    from cldf.models.builders import build_scheduler
    from cldf.models.checkpoint import load_model

    device = torch.device("cpu")
    slices = SliceStore(results / "slices.zarr")
    ids = np.arange(min(batch, slices.n))
    images = torch.from_numpy(slices.images(ids))
    labels = torch.from_numpy((slices.labels[ids] != 0).astype(np.int64))
    scheduler = build_scheduler()
    cdm = load_model(results / "models/cdm.pt", device)
    steps = cfg["features"]["timesteps"]
    noise = feature_noise(ids, len(steps), tuple(images.shape[1:]), 0)
    t_feat = _time(lambda: extract_features(cdm, scheduler, images, labels, steps, cfg["features"]["layers"], noise))
    x = images.repeat(len(steps), 1, 1, 1)
    tt = torch.tensor(steps).repeat_interleave(len(ids))
    with torch.inference_mode():
        t_fwd = _time(lambda: cdm(x, timesteps=tt, class_labels=labels.repeat(len(steps))))
    clf = load_model(results / "models/noisy_classifier.pt", device)
    gsteps = cfg["gradient"]["timesteps"]
    gnoise = feature_noise(ids, len(gsteps), tuple(images.shape[1:]), 0)
    t_grad = _time(lambda: mean_gradient(clf, scheduler, images, gsteps, cfg["gradient"]["reduce"], gnoise), 1)
    xg = images.repeat(len(gsteps), 1, 1, 1).requires_grad_(True)
    tg = torch.tensor(gsteps).repeat_interleave(len(ids))
    t_fb = _time(lambda: torch.autograd.grad(clf(xg, timesteps=tg)[:, 1].sum(), xg), 1)
    return {
        "features_slices_per_s": len(ids) / t_feat, "features_over_forward_bound": t_feat / t_fwd,
        "gradient_slices_per_s": len(ids) / t_grad, "gradient_over_forward_backward_bound": t_grad / t_fb,
    }


def storage(results: Path) -> dict[str, float]:
    features = MapStore(results / "features.zarr")
    n = len(features.slice_ids)
    on_disk = sum(f.stat().st_size for f in (results / "features.zarr").rglob("*") if f.is_file())
    size = int(features.attrs["image_size"])
    dense = int(features.attrs["D"]) * size * size * 4
    native = sum(int(np.prod(s)) for s in features.attrs["shapes"]) * 2
    return {"feature_store_bytes_per_slice_on_disk": on_disk / n, "feature_bytes_per_slice_native_fp16": native,
            "full_res_fp32_bytes_per_slice": dense}


MEMORY_PROBE = """
import json, sys, torch
from pathlib import Path
from cldf.segment.cluster import run_segmentation
from cldf.segment.train import train_decoder
step, res, cases, settings, out = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
if step == "decoder":
    cam = res / "cams" / (settings.pop("cam") + ".zarr")
    train_decoder(res / "slices.zarr", res / "features.zarr", cam, res / "mean_gradient.zarr", settings, Path(out),
                  torch.device("cpu"), 0, cases=cases)
else:
    run_segmentation(res / "slices.zarr", res / "features.zarr", settings.pop("decoder"),
                     res / "classifier_probs.zarr", settings, cases, None, out, torch.device("cpu"), 0)
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024)
"""


def memory_scaling(results: Path, cfg: dict, scratch: Path) -> dict[str, float]:
    """Peak RSS (MB) of decoder training and segmentation on 1/4, 1/2 and all of the cases."""
    n_cases = len(SliceStore(results / "slices.zarr").attrs["case_ids"])
    cl = cfg["cldf"]
    out = {}
    for frac, tag in ((0.25, "1x"), (0.5, "2x"), (1.0, "4x")):
        cases = list(range(max(1, int(round(n_cases * frac)))))
        # one epoch: the peak is reached within the first epoch, later epochs repeat the same batches
        dec = {"cam": cl["cam"], "selection": cl["selection"], "decoder": {**cl["decoder"], "epochs": 1}}
        seg = {**cl["cluster"], "decoder": str(results / f"cldf/{cl['cam']}/decoder.pt")}
        for step, settings, target in (("decoder", dec, scratch / f"probe_{tag}.pt"),
                                       ("segment", seg, scratch / f"probe_{tag}.zarr")):
            res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, step, str(results), json.dumps(cases),
                                  json.dumps(settings), str(target)], capture_output=True, text=True, check=True)
            out[f"{step}_peak_rss_mb_{tag}_slices"] = float(res.stdout.strip().splitlines()[-1])
    return out


def bench_dataset(
    dataset: str, cores: int, root: Path, reuse: Path | None, full_run_s: float | None
) -> tuple[list[dict], pd.DataFrame]:
    """Measure one dataset; with ``reuse``, take that finished working directory instead of a fresh run."""
    if reuse is None:
        workdir = root / dataset
        overrides = {"default_dataset": dataset}
        if dataset == "brats18_shared":
            overrides["datasets"] = {dataset: {"root": str(SHARED_BRATS.resolve())}}
        config = write_config(workdir, overrides)
        full_run_s = snakemake(workdir, config, f"results/{dataset}/metrics.csv", cores)
    else:
        workdir = reuse
        config = workdir / "config" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    results = workdir / cfg["results_dir"] / dataset
    target = f"{cfg['results_dir']}/{dataset}/metrics.csv"
    other = next(c for c in cfg["cams"]["methods"] if c != cfg["cldf"]["cam"])
    switched = root / f"{dataset}_switched_cam.yaml"
    switched.parent.mkdir(parents=True, exist_ok=True)
    switched.write_text(yaml.safe_dump({"cldf": {"cam": other}}))
    rerun = snakemake(workdir, switched, target, cores)
    rows = [{"dataset": dataset, "metric": "cam_switch_rerun_s", "value": rerun}]
    if full_run_s:
        rows += [{"dataset": dataset, "metric": "full_run_s", "value": full_run_s},
                 {"dataset": dataset, "metric": "cam_switch_rerun_fraction", "value": rerun / full_run_s}]
    for source in (throughput(results, cfg), storage(results), memory_scaling(results, cfg, root)):
        rows += [{"dataset": dataset, "metric": k, "value": v} for k, v in source.items()]
    return rows, rule_benchmarks(workdir / cfg["results_dir"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append",
                        help="synthetic and/or brats18_shared (default: both, brats18_shared only when "
                             "../shared/data/brats18 exists)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "work")
    parser.add_argument("--reuse", type=Path, help="a finished working directory to measure instead of a fresh run")
    parser.add_argument("--full-run-seconds", type=float, help="with --reuse: the measured wall time of its full run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    datasets = args.dataset or ["synthetic"] + (["brats18_shared"] if SHARED_BRATS.is_dir() else [])
    rows = []
    for ds in datasets:
        r, table = bench_dataset(ds, args.cores, args.workdir, args.reuse, args.full_run_seconds)
        rows += r
        for rule, rec in table.iterrows():
            rows += [{"dataset": ds, "metric": f"rule:{rule}:wall_s", "value": rec.wall_s},
                     {"dataset": ds, "metric": f"rule:{rule}:max_rss_mb", "value": rec.max_rss_mb}]
    out = REPO / "bench" / "results.csv"
    if out.exists():  # keep the rows of datasets not measured in this run
        kept = [r for r in csv.DictReader(out.open()) if r["dataset"] not in datasets]
        rows = [{**r, "value": float(r["value"])} for r in kept] + rows
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["dataset", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    print("| dataset | metric | value |\n|---|---|---|")
    for row in rows:
        print(f"| {row['dataset']} | {row['metric']} | {row['value']:.4g} |")
    print(f"\nwritten {out}; machine: {os.cpu_count()} cores, torch threads per job 1, "
          f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
