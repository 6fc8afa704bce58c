"""Disk and peak memory of the own-data path at 1x and 10x the cases, and the paper preset's per-slice costs.

`python bench/own_data_scale.py [--scales 1 10] [--out bench/own_data_scale.csv]`

Scale runs: the README's own-data example (docs/OWN_DATA.md) on a mask-free copy of the phantom (6 cases of
48 x 48 x 20 per 1x, .test sizes: image_size 32, 30 training steps, ``features.max_train_slices`` 150 so that
the cap binds at 10x as it does on BraTS), target ``pseudo_masks/manifest.csv``, each in a fresh working
directory under ``/tmp``, the whole run under ``/usr/bin/time -v`` (its maximum resident set size is the
largest single process), every heavy job's peak memory from Snakemake's ``benchmark:`` files (``max_rss``),
and the bytes of every artifact (``du --apparent-size`` and allocated blocks).

Paper-preset probe (no training): the bytes of one slice's stored features and the FLOPs of every per-slice
network pass at 256 x 256 (``torch.utils.flop_counter`` on the meta device), the CPU time of one CDM forward,
and the time of K-means on one slice's body pixels at 256 x 256.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.test_own_data import _example_workdir  # noqa: E402  the README example's layout and config
from tests.workflow_utils import SNAKEMAKE  # noqa: E402


def du(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a file or folder."""
    apparent = int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])
    blocks = int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True).stdout.split()[0])
    return apparent, blocks


def per_slice_arrays(results: Path, size: int) -> list[tuple[str, str, float]]:
    """Per array of the stores holding one image-sized array per slice (slices, mean-gradient maps, CAMs; the
    features are counted from the paper preset's layer shapes instead): its uncompressed bytes per slice and how
    many of its axes are image axes (of length ``size``), so that its size at another image size follows."""
    import zarr

    rows = []
    stores = [results / "slices.zarr", results / "mean_gradient.zarr", *sorted((results / "cams").glob("*.zarr"))]

    def walk(group, prefix: str) -> None:
        for name, array in group.arrays():
            if len(array.shape) > 1:
                where = f"{prefix}/{name}"
                rows.append(("per_slice_bytes", where, array.dtype.itemsize * math.prod(array.shape[1:])))
                rows.append(("per_slice_image_axes", where, sum(1 for n in array.shape[1:] if n == size)))
        for name, sub in group.groups():
            walk(sub, f"{prefix}/{name}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cldf's marker files beside the arrays are no zarr objects
        for store in stores:
            walk(zarr.open_group(str(store), mode="r"), str(store.relative_to(results)))
    return rows


def scale_run(scale: int, cores: int) -> list[tuple[str, str, float]]:
    work = Path(f"/tmp/own_data_scale_{scale}x")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    name, config = _example_workdir(work, n_cases=6 * scale, n_new=0, shape=(48, 48, 20))
    cfg = yaml.safe_load(config.read_text())
    cfg["features"]["max_train_slices"] = 150
    cfg["shard_size"] = 20
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    target = f"results/{name}/pseudo_masks/manifest.csv"
    command = ["/usr/bin/time", "-v", *SNAKEMAKE, "--snakefile", str(REPO / "workflow/Snakefile"), "--configfile",
               str(config), "--cores", str(cores), target]
    start = time.time()
    res = subprocess.run(command, cwd=work, capture_output=True, text=True,
                         env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp"})
    wall = time.time() - start
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    rows = [("cases", "", 6 * scale), ("wall_s", "", wall), ("max_rss_any_process_mb", "", rss / 1024)]
    for tsv in sorted((work / "results/benchmarks" / name).rglob("*.tsv")):
        bench = list(csv.DictReader(tsv.open(), delimiter="\t"))[0]
        rows.append(("job_max_rss_mb", str(tsv.relative_to(work / "results/benchmarks" / name)), float(bench["max_rss"])))
    results = work / "results" / name
    for entry in sorted(results.iterdir()):
        apparent, blocks = du(entry)
        rows += [("bytes_apparent", entry.name, apparent), ("bytes_allocated", entry.name, blocks)]
    apparent, blocks = du(results)
    rows += [("bytes_apparent", "total", apparent), ("bytes_allocated", "total", blocks)]
    from cldf.store import MapStore, SliceStore

    rows += per_slice_arrays(results, int(cfg["presets"]["cpu"]["image_size"]))
    rows += [("slices", "", SliceStore(results / "slices.zarr").n),
             ("feature_rows", "", len(MapStore(results / "features.zarr").slice_ids)),
             ("image_size", "", int(cfg["presets"]["cpu"]["image_size"])),
             ("max_train_slices", "", int(cfg["features"]["max_train_slices"]))]
    return [(f"{scale}x:{k}", what, v) for k, what, v in rows]


def paper_probe() -> list[tuple[str, str, float]]:
    import torch
    from sklearn.cluster import KMeans
    from torch.utils.flop_counter import FlopCounterMode

    from cldf.config import load_config, resolved_preset
    from cldf.models.builders import build_model

    config = load_config(overrides={"model_preset": "paper"})
    preset = resolved_preset(config)
    size, rows = int(preset["image_size"]), []

    def flops(model, forward, backward=False) -> int:
        with FlopCounterMode(display=False) as counter:
            out = forward(model)
            if backward:
                out.float().sum().backward()
        return counter.get_total_flops()

    meta = torch.device("meta")
    with meta:
        cdm = build_model("cdm", preset["cdm"], 4)
        noisy = build_model("noisy_classifier", {**preset["noisy_classifier"], "image_size": size}, 4)
        resnet = build_model("cam_classifier", preset["cam_classifier"], 4)
    x = torch.zeros(1, 4, size, size, device=meta)
    t, y = torch.zeros(1, dtype=torch.long, device=meta), torch.zeros(1, dtype=torch.long, device=meta)
    shapes = {}
    for layer in config["features"]["layers"]:
        dict(cdm.named_modules())[layer].register_forward_hook(lambda m, i, o, k=layer: shapes.__setitem__(k, o.shape))
    rows.append(("paper:cdm_forward_flops", "per slice and timestep", flops(cdm, lambda m: m(x, timesteps=t, class_labels=y))))
    rows.append(("paper:feature_bytes_per_slice", "float16", sum(2 * math.prod(s[1:]) for s in shapes.values())))
    xg = torch.zeros(1, 4, size, size, device=meta, requires_grad=True)
    rows.append(("paper:noisy_classifier_fwd_bwd_flops", "per slice and timestep", flops(noisy, lambda m: m(xg, timesteps=t), True)))
    rows.append(("paper:resnet_fwd_bwd_flops", "per slice", flops(resnet, lambda m: m(xg), True)))
    rows.append(("paper:cdm_params", "", sum(p.numel() for p in cdm.parameters())))
    rows += [("paper:image_size", "", size), ("paper:feature_timesteps", "", len(config["features"]["timesteps"])),
             ("paper:gradient_timesteps", "", len(config["gradient"]["timesteps"])),
             ("paper:max_train_slices", "", int(config["features"]["max_train_slices"])),
             ("paper:brats21_val_fraction", "", float(config["datasets"]["brats21"]["split"]["val_fraction"]))]
    torch.manual_seed(0)
    real = build_model("cdm", preset["cdm"], 4).eval()
    with torch.no_grad():
        start = time.time()
        real(torch.zeros(1, 4, size, size), timesteps=torch.zeros(1, dtype=torch.long), class_labels=torch.zeros(1, dtype=torch.long))
        rows.append(("paper:cdm_forward_cpu_s", f"1 slice, {torch.get_num_threads()} threads", time.time() - start))
    body = np.random.default_rng(0).normal(size=(int(0.3 * size * size), 16))  # ~30 % of a BraTS slice is brain
    start = time.time()
    KMeans(n_clusters=2, n_init=3, random_state=0).fit(body)
    rows.append(("paper:kmeans_s_per_slice", f"{len(body)} pixels x 16, k=2, n_init=3", time.time() - start))
    return rows


BRATS21_CASES, BRATS21_SLICES_PER_CASE = 1250, 155
"""BraTS 2021's training set: about 1,250 cases of 240 x 240 x 155 (issue 15's figure)."""


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def markdown(rows: list[tuple[str, str, float]], scales: list[int], command: str) -> str:
    """The measurements as a Markdown block for docs/OWN_DATA.md (every number from ``rows``)."""
    def get(metric: str, what: str | None = None) -> float | None:
        """The value of ``metric`` (of the row ``what``; by default its first row)."""
        return next((v for m, w, v in rows if m == metric and (what is None or w == what)), None)

    def what(metric: str) -> str:
        return next(w for m, w, _ in rows if m == metric)

    lines = [f"Measured with `{command}` on this machine's CPU."]
    if scales:
        first = f"{scales[0]}x"
        lines += ["", f"Scale runs: target `pseudo_masks/manifest.csv` of the example above on a mask-free phantom "
                  f"(.test sizes: {get(first + ':image_size'):.0f} x {get(first + ':image_size'):.0f} slices, "
                  f"`features.max_train_slices` {get(first + ':max_train_slices'):.0f}):", "",
                  "| cases | slices | feature rows stored | wall (s) | peak RSS, largest process (MB) "
                  "| largest job max_rss (MB) | results on disk (MB) | of which features.zarr (MB) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in scales:
        jobs = [v for m, w, v in rows if m == f"{s}x:job_max_rss_mb"]
        lines.append(f"| {get(f'{s}x:cases'):.0f} | {get(f'{s}x:slices'):.0f} | {get(f'{s}x:feature_rows'):.0f} | {get(f'{s}x:wall_s'):.0f} "
                     f"| {get(f'{s}x:max_rss_any_process_mb'):.0f} | {max(jobs):.0f} "
                     f"| {_mb(get(f'{s}x:bytes_apparent', 'total'))} | {_mb(get(f'{s}x:bytes_apparent', 'features.zarr'))} |")
    if len(scales) >= 2:
        a, b = f"{scales[0]}x", f"{scales[-1]}x"
        capped = get(b + ":feature_rows") < get(b + ":slices")
        lines += ["", f"From {a} to {b} the slices grow {get(b + ':slices') / get(a + ':slices'):.1f}x, the disk "
                  f"{get(b + ':bytes_apparent', 'total') / get(a + ':bytes_apparent', 'total'):.1f}x, the stored features "
                  f"{get(b + ':bytes_apparent', 'features.zarr') / get(a + ':bytes_apparent', 'features.zarr'):.1f}x"
                  f"{' (the cap binds)' if capped else ''}, and the peak RSS of the largest process "
                  f"{get(b + ':max_rss_any_process_mb') / get(a + ':max_rss_any_process_mb'):.2f}x."]
    if get("paper:feature_bytes_per_slice") is not None:
        size, feature = int(get("paper:image_size")), get("paper:feature_bytes_per_slice")
        n = BRATS21_CASES * BRATS21_SLICES_PER_CASE
        cap, val = get("paper:max_train_slices"), get("paper:brats21_val_fraction")
        lines += ["", f"Paper preset ({size} x {size}), per slice: stored features {feature:,.0f} bytes; one CDM "
                  f"forward {get('paper:cdm_forward_flops') / 1e9:,.1f} GFLOP "
                  f"({get('paper:cdm_forward_cpu_s'):.1f} s "
                  f"on this CPU, {what('paper:cdm_forward_cpu_s')}); noisy classifier "
                  f"forward + backward {get('paper:noisy_classifier_fwd_bwd_flops') / 1e9:,.1f} "
                  f"GFLOP per timestep; CAM classifier forward + backward "
                  f"{get('paper:resnet_fwd_bwd_flops') / 1e9:,.1f} GFLOP; K-means on one slice's body pixels "
                  f"{get('paper:kmeans_s_per_slice'):.2f} s."]
        stored = min(cap, n) + val * n
        lines += ["", f"BraTS 2021 at the paper preset ({BRATS21_CASES:,} cases x {BRATS21_SLICES_PER_CASE} = {n:,} slices), "
                  "computed from these numbers:", "",
                  f"- features for every slice would be {_gb(n * feature)} GB; cached for at most "
                  f"{cap:,.0f} training + {val:.0%} validation slices they are at most {_gb(stored * feature)} GB;"]
        if scales:
            b = f"{scales[-1]}x"
            arrays = [w for m, w, _ in rows if m == f"{b}:per_slice_bytes"]
            at_size = sum(get(f"{b}:per_slice_bytes", w) * (size / get(f"{b}:image_size")) ** get(f"{b}:per_slice_image_axes", w)
                          for w in arrays)
            stores = sorted({w.split(".zarr")[0] + ".zarr" for w in arrays})
            lines.append(f"- the other per-slice stores of this path ({', '.join(stores)}) hold {at_size:,.0f} bytes "
                         f"per slice uncompressed at {size} x {size} (from their arrays' shapes and types): at most "
                         f"{_gb(at_size * n)} GB;")
        t_feat, t_grad = get("paper:feature_timesteps"), get("paper:gradient_timesteps")
        cdm = get("paper:cdm_forward_flops")
        noisy = get("paper:noisy_classifier_fwd_bwd_flops")
        lines.append(f"- compute for every slice: features on the fly {n * t_feat * cdm / 1e15:,.0f} PFLOP "
                     f"({t_feat:.0f} CDM forwards per slice), mean-gradient maps {n * t_grad * noisy / 1e15:,.0f} PFLOP "
                     f"({t_grad:.0f} timesteps); at this CPU's measured CDM rate the features alone would take "
                     f"{n * t_feat * get('paper:cdm_forward_cpu_s') / 3600:,.0f} "
                     "CPU-hours.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--no-paper", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "own_data_scale.csv"))
    args = parser.parse_args()
    rows = [] if args.no_paper else paper_probe()
    for scale in args.scales:
        rows += scale_run(scale, args.cores)
    with open(args.out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["metric", "what", "value"])
        writer.writerows(rows)
    for row in rows:
        print(*row, sep="\t")
    command = "python bench/own_data_scale.py " + " ".join(sys.argv[1:])
    print("\n<!-- markdown for docs/OWN_DATA.md -->")
    print(markdown(rows, args.scales, command.strip()))


if __name__ == "__main__":
    main()
