"""Measure the pipeline's cost in one run: `python bench/run.py [--dataset synthetic] [--cores 2]`.

For each dataset: a full workflow run from scratch in its own working directory (timed), the re-run
after switching ``cldf.cam`` (timed, as a fraction of the full run), wall time and peak memory of every
benchmarked job, summed per artifact (Snakemake's ``benchmark:`` files), throughput of feature extraction
and mean-gradient maps against the plain forward (forward + backward) cost of the same model on the same
batch, feature-store bytes per stored slice (on disk, and the layers' native float16 arrays) against
full-resolution float32 features, and peak memory of decoder training (``cldf decoder``'s call, one epoch,
on 1/4, 1/2 and all of its training slices) and of segmentation (``cldf segment``'s call, labelled
protocol, features computed on the fly, on 1/4, 1/2 and all of the test slices). With ``--reuse`` a
finished working directory is measured instead of a fresh run (``--configfile``: the config it was run
with, when not its ``config/config.yaml``). Writes ``bench/results.csv`` and prints a Markdown table.
Timings are ratios within one run where they are compared: these machines are noisy.
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

from cldf.catalogue import Catalogue
from cldf.config import DEFAULT_CONFIG, deep_merge
from cldf.data.splits import training_rows
from cldf.plan import Plan
from cldf.registry import MAPS
from cldf.segment.features import layer_names
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


def load_config(configs: list[Path]) -> dict:
    """The config the workflow sees: the repository's ``config/config.yaml`` with ``configs`` merged over it
    in order (what ``snakemake --configfile`` does)."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for path in configs:
        cfg = deep_merge(cfg, yaml.safe_load(path.read_text()) or {})
    return cfg


def snakemake(workdir: Path, configs: list[Path], target: str, cores: int) -> float:
    """Run the workflow to ``target`` (``configs`` merged in order over the repository's config); return wall
    seconds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
                    "--configfile", *map(str, configs), "--cores", str(cores), "--quiet", "rules", "--", target],
                   check=True, env=env, cwd=workdir)
    return time.perf_counter() - start


def rule_benchmarks(benchmarks: Path) -> pd.DataFrame:
    """Per artifact (the job's output relative to the dataset, shards summed: ``models/cdm``, ``features``,
    ``cams/gradcam``, ``cldf/layercam/tuning``, ``cldf/layercam/labelled`` ...): jobs, summed wall seconds and
    max peak RSS (MB), from the benchmark TSVs of one dataset (``benchmarks``: their folder)."""
    rows = []
    for tsv in benchmarks.rglob("*.tsv"):
        rel = tsv.relative_to(benchmarks).with_suffix("").parts
        if rel[0] == "shards":  # a shard job of a per-shard artifact: shards/<artifact>/<shard>
            rel = tuple(p for p in rel[1:] if not p.isdigit())
        data = pd.read_csv(tsv, sep="\t")
        rows.append({"rule": "/".join(rel), "s": float(data["s"].iloc[-1]),
                     "max_rss_mb": float(data["max_rss"].iloc[-1])})
    table = pd.DataFrame(rows, columns=["rule", "s", "max_rss_mb"])
    return table.groupby("rule").agg(jobs=("s", "size"), wall_s=("s", "sum"), max_rss_mb=("max_rss_mb", "max"))


def _time(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _load_net(cat: Catalogue, dataset: str, kind: str, slices: SliceStore, device: torch.device):
    """A trained network of the run, checked against its slices as ``cldf``'s steps do."""
    from cldf.models.checkpoint import load_model

    return load_model(cat.path("model", dataset=dataset, model=kind), device, kind,
                      {"image_size": slices.image_size, "in_channels": slices.channels})


def throughput(workdir: Path, dataset: str, cfg: dict, batch: int = 8) -> dict[str, float]:
    """Feature extraction (CDM, conditioned on the labels) and mean-gradient maps against the plain model
    cost on the same batch."""
    from cldf.maps.common import feature_noise
    from cldf.maps.features import conditioning_labels, extract_features
    from cldf.maps.gradients import mean_gradient
    from cldf.models.builders import build_scheduler

    device = torch.device("cpu")
    cat = Catalogue(str(workdir / cfg["results_dir"]))
    slices = SliceStore(cat.path("slices", dataset=dataset))
    ids = np.arange(min(batch, slices.n))
    images = torch.from_numpy(slices.images(ids))
    labels = conditioning_labels(slices.labels[ids])
    scheduler = build_scheduler()
    cdm = _load_net(cat, dataset, "cdm", slices, device)
    steps = cfg["features"]["timesteps"]
    noise = feature_noise(ids, len(steps), tuple(images.shape[1:]), 0)
    t_feat = _time(lambda: extract_features(cdm, scheduler, images, labels, steps, cfg["features"]["layers"], noise))
    x = images.repeat(len(steps), 1, 1, 1)
    tt = torch.tensor(steps).repeat_interleave(len(ids))
    with torch.inference_mode():
        t_fwd = _time(lambda: cdm(x, timesteps=tt, class_labels=labels.repeat(len(steps))))
    clf = _load_net(cat, dataset, "noisy_classifier", slices, device)
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


def storage(workdir: Path, dataset: str, cfg: dict) -> dict[str, float]:
    """Bytes per slice of the features store (it holds the decoder's training and validation slices only;
    segmentation computes its features on the fly): on disk (every file of the store, ``slice_ids`` and
    metadata included), of its ``layer_k`` arrays at their native resolution and dtype (float16), and of
    the same features upsampled to full resolution as float32 (what one decoder batch holds per slice)."""
    path = Path(Catalogue(str(workdir / cfg["results_dir"])).path("map", dataset=dataset, map="features"))
    features = MapStore(path)
    n = len(features.slice_ids)
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    layers = [features.group[name] for name in layer_names(features)]
    size = int(features.attrs["image_size"])
    dense = sum(int(a.shape[1]) for a in layers) * size * size * 4
    native = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in layers)
    return {"feature_store_bytes_per_slice_on_disk": on_disk / max(n, 1),
            "feature_bytes_per_slice_native_fp16": native, "full_res_fp32_bytes_per_slice": dense}


MEMORY_PROBE = """
import json, sys
import numpy as np, torch
from cldf.models.checkpoint import load_model
from cldf.segment.features import ComputedFeatures, StoredFeatures, decoder_inputs
from cldf.store import MapStore, SliceStore
torch.set_num_threads(1)
step, p = sys.argv[1], json.loads(sys.argv[2])
device = torch.device("cpu")
slices = SliceStore(p["slices"])
if step == "decoder":  # as `cldf decoder` (rule decoder_ablation) calls it
    from cldf.segment.train import train_decoder
    features = decoder_inputs(StoredFeatures(p["features"], slices.image_size, device), slices, p)
    train_decoder(p["slices"], features, p["cam"], p["mg"], p["settings"], p["out"], p["seed"], p["cap"])
else:  # as `cldf segment` (rule segment_shard) calls it, labelled protocol
    from cldf.segment.cluster import run_segmentation
    cdm = load_model(p["cdm"], device, "cdm", {"image_size": slices.image_size, "in_channels": slices.channels})
    features = decoder_inputs(ComputedFeatures(cdm, slices, p["features_settings"], "label", p["seed"], device,
                                               MapStore(p["probs"])), slices, p)
    ids = np.asarray(p["ids"], dtype=np.int64)
    run_segmentation(p["slices"], features, p["decoders"], p["settings"], ids, slices.labels[ids] != 0, p["out"],
                     device, p["seed"])
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024)
"""


def _probe(step: str, params: dict) -> float:
    """Peak RSS (MB) of one decoder training or segmentation in a fresh process."""
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, step, json.dumps(params)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {step} failed:\n{res.stderr[-3000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def memory_scaling(workdir: Path, dataset: str, cfg: dict, scratch: Path) -> dict[str, float]:
    """Peak RSS (MB) of decoder training (``cldf.cam``'s CLDF decoder, the tuned settings, one epoch) on 1/4,
    1/2 and all of its training slices, and of segmentation (labelled protocol) on 1/4, 1/2 and all of the
    test slices. The decoder's features store is read whole into memory when small
    (:class:`cldf.segment.features.StoredFeatures`), whatever the number of slices it trains on."""
    from cldf.evaluate.choices import chosen, read_selection
    from cldf.evaluate.choose import cluster_settings, decoder_settings

    plan = Plan({**cfg, "results_dir": str(workdir / cfg["results_dir"])})  # paths under the working directory
    cat = plan.catalogue
    cam, seed = cfg["cldf"]["cam"], int(cfg["seed"])
    slices_path = cat.path("slices", dataset=dataset)
    features_path = cat.path("map", dataset=dataset, map="features")
    slices = SliceStore(slices_path)
    stored = set(MapStore(features_path).slice_ids.tolist())
    candidate = chosen(read_selection(cat.path("tuning", dataset=dataset, cam=cam)), "decoder")
    tune = plan.tune_settings()
    dec = decoder_settings(tune["cldf"], candidate, "fused")
    # one epoch: the peak is reached within the first epoch, later epochs repeat the same batches
    dec["decoder"] = {**dec["decoder"], "epochs": 1}
    seg = plan.segment_settings()
    n_train = len(training_rows(slices, int(tune["max_train_slices"]), seed))
    test = slices.indices(split="test")
    common = {"slices": slices_path, "seed": seed, "with_image": bool(cfg["cldf"]["decoder"]["with_image"]),
              "image_context": int(cfg["cldf"]["decoder"]["image_context"])}
    out = {}
    for frac, tag in ((0.25, "1x"), (0.5, "2x"), (1.0, "4x")):
        cap = max(1, int(round(n_train * frac)))
        if set(training_rows(slices, cap, seed).tolist()) <= stored:  # a sample of the stored slices only
            out[f"decoder_peak_rss_mb_{tag}_slices"] = _probe("decoder", {
                **common, "features": features_path, "cam": plan.final_map(dataset, MAPS[cam]),
                "mg": cat.path("map", dataset=dataset, map="mean_gradient"), "settings": dec, "cap": cap,
                "out": str(scratch / f"probe_{tag}.pt")})
        else:
            print(f"bench: decoder training on {cap} slices reads slices the features store lacks; not measured",
                  file=sys.stderr)
        ids = test[: max(1, int(round(len(test) * frac)))]
        out[f"segment_peak_rss_mb_{tag}_slices"] = _probe("segment", {
            **common, "cdm": cat.path("model", dataset=dataset, model="cdm"), "features_settings": seg["features"],
            "probs": cat.path("map", dataset=dataset, map="classifier_probs"), "decoders": plan.decoders(dataset, cam),
            "settings": cluster_settings(seg["cluster"], candidate), "ids": ids.tolist(),
            "out": str(scratch / f"probe_{tag}.zarr")})
    return out


def bench_dataset(
    dataset: str, cores: int, root: Path, reuse: Path | None, reuse_config: Path | None, full_run_s: float | None
) -> tuple[list[dict], pd.DataFrame]:
    """Measure one dataset; with ``reuse``, take that finished working directory (run with ``reuse_config``,
    default its ``config/config.yaml``) instead of a fresh run."""
    root = root.resolve()
    if reuse is None:
        workdir = root / dataset
        overrides = {"default_dataset": dataset}
        if dataset == "brats18_shared":
            overrides["datasets"] = {dataset: {"root": str(SHARED_BRATS.resolve())}}
        config = write_config(workdir, overrides)
        cfg = load_config([config])
        target = Catalogue(cfg["results_dir"]).path("metrics", dataset=dataset)
        full_run_s = snakemake(workdir, [config], target, cores)
    else:
        workdir = reuse.resolve()
        config = (reuse_config or workdir / "config" / "config.yaml").resolve()
        cfg = load_config([config])
    target = Catalogue(cfg["results_dir"]).path("metrics", dataset=dataset)
    other = next(c for c in cfg["cams"]["methods"] if c != cfg["cldf"]["cam"])
    switched = root / f"{dataset}_switched_cam.yaml"
    switched.parent.mkdir(parents=True, exist_ok=True)
    switched.write_text(yaml.safe_dump({"cldf": {"cam": other}}))
    rerun = snakemake(workdir, [config, switched], target, cores)
    rows = [{"dataset": dataset, "metric": "cam_switch_rerun_s", "value": rerun}]
    if full_run_s:
        rows += [{"dataset": dataset, "metric": "full_run_s", "value": full_run_s},
                 {"dataset": dataset, "metric": "cam_switch_rerun_fraction", "value": rerun / full_run_s}]
    for source in (throughput(workdir, dataset, cfg), storage(workdir, dataset, cfg),
                   memory_scaling(workdir, dataset, cfg, root)):
        rows += [{"dataset": dataset, "metric": k, "value": v} for k, v in source.items()]
    cat = Catalogue(str(workdir / cfg["results_dir"]))
    return rows, rule_benchmarks(Path(cat.benchmark(cat.path("metrics", dataset=dataset))).parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append",
                        help="synthetic and/or brats18_shared (default: both, brats18_shared only when "
                             "../shared/data/brats18 exists)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "work")
    parser.add_argument("--reuse", type=Path, help="a finished working directory to measure instead of a fresh run")
    parser.add_argument("--configfile", type=Path,
                        help="with --reuse: the config it was run with (default: its config/config.yaml)")
    parser.add_argument("--full-run-seconds", type=float, help="with --reuse: the measured wall time of its full run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    datasets = args.dataset or ["synthetic"] + (["brats18_shared"] if SHARED_BRATS.is_dir() else [])
    rows = []
    for ds in datasets:
        r, table = bench_dataset(ds, args.cores, args.workdir, args.reuse, args.configfile, args.full_run_seconds)
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
