"""`cldf <step> …`: one subcommand per pipeline step; what the Snakemake rules call.

Every step receives exactly the settings it depends on as JSON (``--settings``), so the workflow's
parameter rerun trigger re-runs a step only when its own settings change. Expected failures (bad
input data, bad config, missing or incomplete artifacts) end with one line ``cldf <step>: error: …``
and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

LOG = logging.getLogger("cldf")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text[:80]!r}") from err


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()] if text else []


def _device(args: argparse.Namespace):
    from cldf.config import resolve_device

    return resolve_device(args.device)


def _model(path: str, kind: str, args: argparse.Namespace):
    """The trained network at ``path``, checked to be a ``kind`` made for the slices of ``args.slices``."""
    from cldf.models.checkpoint import load_model
    from cldf.store import SliceStore

    slices = SliceStore(args.slices)
    return load_model(path, _device(args), kind, {"image_size": slices.image_size, "in_channels": slices.channels})


# --- data ---------------------------------------------------------------------------------------


def cmd_phantom(args: argparse.Namespace) -> None:
    from cldf.data.phantom import generate_phantom

    ds = args.dataset
    ph = ds["phantom"]
    generate_phantom(ds["root"], ph["n_cases"], ph["shape"], ph["seed"], tuple(ds["modalities"]))
    Path(args.manifest).write_text(json.dumps({"root": ds["root"], **ph}, indent=2) + "\n")


def cmd_slices_shard(args: argparse.Namespace) -> None:
    from cldf.data.slices import build_shard
    from cldf.io.layouts import list_cases

    all_cases = list_cases(args.dataset)
    build_shard(args.dataset, [all_cases[i] for i in args.cases], all_cases, args.out)


def cmd_slices_gather(args: argparse.Namespace) -> None:
    from cldf.data.slices import gather

    gather(args.shards, args.out, args.manifest, args.skipped, args.split)


# --- models -------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    from cldf.models.train import train_model

    train_model(args.kind, args.slices, args.settings, Path(args.out), _device(args), args.seed)


def cmd_samples(args: argparse.Namespace) -> None:
    from cldf.models.sample import save_sample_grid

    stats = save_sample_grid(args.cdm, args.out, args.n_per_class, _device(args), args.seed,
                             guidance_scale=args.guidance)
    LOG.info("sample statistics: %s", stats)


def cmd_predict_fsl(args: argparse.Namespace) -> None:
    from cldf.models.predict import predict_fsl

    predict_fsl(args.slices, args.model, args.out, _device(args))


# --- maps ---------------------------------------------------------------------------------------


def cmd_map(args: argparse.Namespace) -> None:
    from cldf.maps.run import run_map
    from cldf.registry import MAPS

    method = MAPS[args.map]
    model = _model(args.model, method.model, args)
    run_map(args.slices, method, model, args.settings, args.cases, args.out, _device(args), args.seed)


def cmd_gather(args: argparse.Namespace) -> None:
    from cldf.store import gather_stores

    gather_stores(args.shards, args.out)


# --- segmentation -------------------------------------------------------------------------------


def cmd_decoder(args: argparse.Namespace) -> None:
    from cldf.segment.train import train_decoder

    stats = train_decoder(
        args.slices, args.features, args.cam, args.mg, args.settings, Path(args.out), _device(args), args.seed
    )
    LOG.info("decoder training: %s", stats)


def cmd_segment(args: argparse.Namespace) -> None:
    from cldf.segment.cluster import run_segmentation

    run_segmentation(
        args.slices, args.features, args.decoder, args.probs, args.settings, args.cases, ["test"], args.out,
        _device(args), args.seed,
    )


def cmd_baseline(args: argparse.Namespace) -> None:
    from cldf.segment.baselines import run_threshold_baseline
    from cldf.store import SliceStore

    test_ids = SliceStore(args.slices).indices(split="test")
    run_threshold_baseline(args.slices, args.map, args.out, slice_ids=test_ids, probs_path=args.probs)


def cmd_nifti(args: argparse.Namespace) -> None:
    from cldf.segment.export import write_case_masks

    write_case_masks(args.slices, args.masks, args.out)


# --- evaluation ---------------------------------------------------------------------------------


def cmd_metrics(args: argparse.Namespace) -> None:
    from cldf.evaluate.table import evaluate_methods

    evaluate_methods(args.slices, args.methods, args.out, args.per_slice)


def cmd_figure(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from cldf.evaluate.figures import figure_grid
    from cldf.segment.selection import select_pixels
    from cldf.store import MapStore, SliceStore

    slices = SliceStore(args.slices)
    cam, mg = MapStore(args.cam), MapStore(args.mg)
    sel = args.selection

    def fused_selection(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fg, bg = select_pixels(
            torch.from_numpy(cam.read("maps", ids).astype(np.float32)),
            torch.from_numpy(mg.read("maps", ids).astype(np.float32)),
            torch.from_numpy(slices.labels[ids].astype(np.int64)),
            torch.from_numpy(slices.body(ids)),
            sel["mode"], sel["threshold"], sel["quantile"],
        )
        return fg.numpy(), bg.numpy()

    table = pd.read_csv(args.metrics).set_index("method")
    best = table.loc[list(args.baselines), "dice_mean"].idxmax()
    figure_grid(args.slices, {
        "CAM": args.cam, "MG": args.mg, "fused selection": fused_selection, "CLDF": args.cldf,
        f"best baseline ({best})": args.baselines[best],
    }, args.out)


def _model_kinds() -> list[str]:
    from cldf.registry import MODEL_KINDS

    return list(MODEL_KINDS)


def _map_names() -> list[str]:
    from cldf.registry import MAPS

    return list(MAPS)


Command = tuple[Callable[[argparse.Namespace], None], list[tuple[tuple[str, ...], dict[str, Any]]]]

_SLICES = (("--slices",), {"required": True, "help": "the slice store"})
_OUT = (("--out",), {"required": True})
_SETTINGS = (("--settings",), {"type": _json, "required": True, "help": "step settings as JSON"})
_CASES = (("--cases",), {"type": _ints, "default": "", "help": "comma-separated case indices of the shard"})

COMMANDS: dict[str, tuple[str, Command]] = {
    "phantom": ("generate the synthetic BraTS-layout phantom", (cmd_phantom, [
        (("--dataset",), {"type": _json, "required": True}), (("--manifest",), {"required": True})])),
    "slices-shard": ("NIfTI cases of one shard → slice store", (cmd_slices_shard, [
        (("--dataset",), {"type": _json, "required": True}), _CASES, _OUT])),
    "slices-gather": ("gather slice shards → the slice store + manifest CSV + skipped cases", (cmd_slices_gather, [
        (("--shards",), {"nargs": "+", "required": True}), _OUT, (("--manifest",), {"required": True}),
        (("--skipped",), {"required": True, "help": "skipped_cases.csv"}),
        (("--split",), {"type": _json, "required": True, "help": "the dataset's split settings"})])),
    "train": ("train one model (cdm, noisy_classifier, cam_classifier, fsl_unet)", (cmd_train, [
        (("--kind",), {"required": True, "choices": _model_kinds()}),
        _SLICES, _SETTINGS, _OUT])),
    "samples": ("class-conditional CDM samples as a PNG grid", (cmd_samples, [
        (("--cdm",), {"required": True}), (("--n-per-class",), {"type": int, "default": 8}),
        (("--guidance",), {"type": float, "default": 3.0, "help": "classifier-free guidance scale"}), _OUT])),
    "predict-fsl": ("masks of the fully supervised UNet on the test split", (cmd_predict_fsl, [
        _SLICES, (("--model",), {"required": True}), _OUT])),
    "map": ("one registered per-slice map (features, gradients, a CAM, ...) of one shard", (cmd_map, [
        _SLICES, (("--map",), {"required": True, "choices": _map_names()}),
        (("--model",), {"required": True, "help": "the trained network the map reads"}), _SETTINGS, _CASES, _OUT])),
    "gather": ("gather row-aligned shard stores", (cmd_gather, [
        (("--shards",), {"nargs": "+", "required": True}), _OUT])),
    "decoder": ("train the contrastive pixel decoder", (cmd_decoder, [
        _SLICES, (("--features",), {"required": True}),
        (("--cam",), {"default": None, "help": "CAM store (selection modes fused and cam)"}),
        (("--mg",), {"default": None, "help": "mean-gradient store (selection modes fused and mg)"}), _SETTINGS, _OUT])),
    "segment": ("K-means masks of the test slices of one shard", (cmd_segment, [
        _SLICES, (("--features",), {"required": True}), (("--decoder",), {"required": True}),
        (("--probs",), {"default": None, "help": "classifier probabilities (gate)"}), _SETTINGS, _CASES, _OUT])),
    "baseline": ("threshold a map store into test masks", (cmd_baseline, [
        _SLICES, (("--map",), {"required": True}), (("--probs",), {"default": None}), _OUT])),
    "nifti": ("write masks back as NIfTI in each case's original geometry", (cmd_nifti, [
        _SLICES, (("--masks",), {"required": True}), _OUT])),
    "metrics": ("the comparison table", (cmd_metrics, [
        _SLICES, (("--methods",), {"type": _json, "required": True}), _OUT,
        (("--per-slice",), {"required": True})])),
    "figure": ("the qualitative figure (paper Fig. 3)", (cmd_figure, [
        _SLICES, (("--cam",), {"required": True}), (("--mg",), {"required": True}),
        (("--cldf",), {"required": True}), (("--metrics",), {"required": True}),
        (("--baselines",), {"type": _json, "required": True, "help": "method name → masks store"}),
        (("--selection",), {"type": _json, "required": True, "help": "cldf.selection settings"}), _OUT])),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cldf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (help_text, (func, options)) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        for flags, kwargs in options:
            p.add_argument(*flags, **kwargs)
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: all)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cldf.errors import CldfError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (CldfError, OSError) as err:
        print(f"cldf {args.step}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
