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


def _chosen(path: str, choice: str) -> Any:
    from cldf.evaluate.choices import chosen, read_selection

    return chosen(read_selection(path), choice)


# --- data ---------------------------------------------------------------------------------------


def cmd_phantom(args: argparse.Namespace) -> None:
    from cldf.atomic import write_text
    from cldf.data.phantom import generate_phantom

    ds = args.dataset
    ph = ds["phantom"]
    generate_phantom(ds["root"], ph["n_cases"], ph["shape"], ph["seed"], tuple(ds["modalities"]))
    write_text(args.manifest, json.dumps({"root": ds["root"], **ph}, indent=2) + "\n")


def cmd_slices_shard(args: argparse.Namespace) -> None:
    from cldf.data.slices import build_shard
    from cldf.io.layouts import list_cases

    all_cases = list_cases(args.dataset)
    build_shard(args.dataset, [all_cases[i] for i in args.cases], all_cases, args.out)


def cmd_slices_gather(args: argparse.Namespace) -> None:
    from cldf.data.slices import gather

    gather(args.shards, args.out, args.test_truth, args.manifest, args.skipped, args.split)


# --- models -------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    from cldf.models.train import train_model

    context = {}
    for item in args.context:
        kind, _, path = item.partition("=")
        context[kind] = _model(path, kind, args).requires_grad_(False)
    train_model(args.kind, args.slices, args.settings, Path(args.out), _device(args), args.seed, context=context)


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
    from cldf.config import ConfigError
    from cldf.maps.run import run_map
    from cldf.registry import MAPS

    method = MAPS[args.map]
    if len(args.model) != len(method.models):
        raise ConfigError(f"map {method.name} reads {len(method.models)} network(s) {method.models}, got {args.model}")
    nets = {kind: _model(path, kind, args) for kind, path in zip(method.models, args.model)}
    model = nets[method.models[0]] if isinstance(method.model, str) else nets
    run_map(args.slices, method, model, args.settings, args.cases, args.out, _device(args), args.seed)


def cmd_gather(args: argparse.Namespace) -> None:
    from cldf.store import gather_stores

    gather_stores(args.shards, args.out)


def cmd_fuse_cam(args: argparse.Namespace) -> None:
    from cldf.maps.layers import candidate_layers, fuse_store

    names = candidate_layers(args.settings["layercam_layers"])
    fuse_store(args.map, names, _chosen(args.choices, f"layers:{args.name}"), args.out)


# --- choices made on validation ----------------------------------------------------------------


def cmd_choose_layers(args: argparse.Namespace) -> None:
    from cldf.evaluate.choices import choose_layers, write_rows

    write_rows(choose_layers(args.slices, args.map, args.name, args.settings), args.out)


def cmd_tune(args: argparse.Namespace) -> None:
    import torch

    from cldf.evaluate.choices import write_rows
    from cldf.evaluate.choose import tune_decoder
    from cldf.segment.features import StoredFeatures, decoder_inputs
    from cldf.store import SliceStore

    device, workers = _device(args), 1
    if device.type == "cpu":  # the threads train candidates side by side, one each: same rows whatever --threads
        workers = args.threads or 1
        torch.set_num_threads(1)
    s = args.settings
    slices = SliceStore(args.slices)
    features = decoder_inputs(StoredFeatures(args.features, slices.image_size, device), slices, s["cldf"]["decoder"])
    rows = tune_decoder(args.slices, features, args.cam, args.mg, s["cldf"], s["choices"], args.out, args.seed,
                        int(s["max_train_slices"]), workers=workers)
    write_rows(rows, args.rows_out)


def cmd_choose_unlabelled(args: argparse.Namespace) -> None:
    from cldf.evaluate.choices import write_rows
    from cldf.evaluate.choose import choose_unlabelled

    cdm = _model(args.cdm, "cdm", args)
    s = args.settings
    rows = choose_unlabelled(args.slices, cdm, args.decoder, args.probs, s, _chosen(args.tuning, "decoder"),
                             _device(args), args.seed)
    write_rows(rows, args.out)


def cmd_selection(args: argparse.Namespace) -> None:
    import pandas as pd

    from cldf.evaluate.choices import read_selection, write_rows

    frames = [read_selection(p) for p in args.parts]
    for item in args.tagged:  # choices made for another CAM CLDF starts from: decoder@amecam, ...
        cam, _, path = item.partition("=")
        frame = read_selection(path)
        frames.append(frame.assign(choice=frame.choice + "@" + cam))
    write_rows(pd.concat(frames, ignore_index=True).to_dict("records"), args.out)


# --- segmentation -------------------------------------------------------------------------------


def cmd_decoder(args: argparse.Namespace) -> None:
    from cldf.evaluate.choices import chosen, read_selection
    from cldf.evaluate.choose import decoder_settings
    from cldf.segment.features import StoredFeatures, decoder_inputs
    from cldf.segment.train import train_decoder
    from cldf.store import SliceStore

    s = args.settings
    slices = SliceStore(args.slices)
    features = decoder_inputs(StoredFeatures(args.features, slices.image_size, _device(args)), slices,
                              s["cldf"]["decoder"])
    settings = decoder_settings(s["cldf"], chosen(read_selection(args.tuning), "decoder"), args.mode)
    _, checkpoint = train_decoder(args.slices, features, args.cam, args.mg, settings, args.out, args.seed,
                                  int(s["max_train_slices"]))
    LOG.info("decoder training: %s", checkpoint["stats"])


def cmd_segment(args: argparse.Namespace) -> None:
    from cldf.evaluate.choose import cluster_settings
    from cldf.segment.cluster import run_segmentation
    from cldf.segment.features import ComputedFeatures, decoder_inputs
    from cldf.store import MapStore, SliceStore

    slices = SliceStore(args.slices)
    ids = slices.indices(split="test", cases=args.cases)
    if args.protocol == "labelled":
        conditioning, segment = "label", slices.labels[ids] != 0
    elif not args.choices:
        from cldf.config import ConfigError

        raise ConfigError("the unlabelled protocol needs --choices (its CDM conditioning is chosen on validation)")
    else:
        conditioning, segment = _chosen(args.choices, "conditioning"), ids >= 0
    features = decoder_inputs(ComputedFeatures(_model(args.cdm, "cdm", args), slices, args.settings["features"],
                                               conditioning, args.seed, _device(args), MapStore(args.probs)),
                              slices, args.settings)
    cluster = cluster_settings(args.settings["cluster"], _chosen(args.tuning, "decoder"))
    run_segmentation(args.slices, features, args.decoders, cluster, ids, segment, args.out, _device(args), args.seed)


def cmd_baselines(args: argparse.Namespace) -> None:
    from cldf.evaluate.choices import choose_thresholds, chosen, write_rows
    from cldf.segment.baselines import run_threshold_baseline
    from cldf.store import SliceStore

    rows = write_rows(choose_thresholds(args.slices, args.maps, args.settings), args.choices_out)
    slices = SliceStore(args.slices)
    ids = slices.indices(split="test")
    for name, out in args.masks.items():
        if name in args.maps:
            run_threshold_baseline(args.slices, args.maps[name], out, ids, chosen(rows, f"threshold:{name}"))
        else:  # the intensity row
            modality, polarity = str(chosen(rows, "intensity")).split(":")
            run_threshold_baseline(args.slices, None, out, ids, "otsu", (slices.modalities.index(modality), polarity))


def cmd_nifti(args: argparse.Namespace) -> None:
    from cldf.segment.export import write_case_masks

    write_case_masks(args.slices, args.masks, args.array, args.out, args.probs, float(_chosen(args.choices, "gate")))


# --- evaluation ---------------------------------------------------------------------------------


def cmd_metrics(args: argparse.Namespace) -> None:
    from cldf.evaluate.table import evaluate

    outputs = {"metrics": args.out, "per_slice": args.per_slice, "per_case": args.per_case,
               "differences": args.differences}
    evaluate(args.slices, args.test_truth, args.probs, float(_chosen(args.choices, "gate")), args.rows,
             args.settings["reference"], outputs, int(args.settings["bootstrap"]), args.seed)


def cmd_metrics_3d(args: argparse.Namespace) -> None:
    from cldf.evaluate.volumes import volume_table

    volume_table(args.slices, args.dataset, args.probs, float(_chosen(args.choices, "gate")), args.rows, args.out)


def cmd_figure(args: argparse.Namespace) -> None:
    from cldf.evaluate.figures import paper_figure

    paper_figure(args.slices, args.test_truth, args.cam, args.mg, args.cldf, args.metrics, args.baselines,
                 args.settings, _chosen(args.choices, "decoder"), args.out)


def cmd_ablation(args: argparse.Namespace) -> None:
    from cldf.evaluate.ablation import Ablation, chosen_settings, run_ablation

    s = args.settings
    base = chosen_settings(s["cldf"], _chosen(args.tuning, "decoder"), s["features"], int(s["max_train_slices"]))
    networks = {kind: _model(path, kind, args) for kind, path in (item.partition("=")[::2] for item in args.networks)}
    ablation = Ablation(args.slices, args.test_truth, args.features, networks, {"cam": args.cam, "mg": args.mg},
                        base, _device(args), args.seed)
    run_ablation(ablation, s["levers"], args.out, int(s["bootstrap"]))


def cmd_table3(args: argparse.Namespace) -> None:
    from cldf.evaluate.selection_study import selection_table

    selection_table(args.slices, args.test_truth, args.rows, args.out, int(args.settings["bootstrap"]), args.seed)


def cmd_tables(args: argparse.Namespace) -> None:
    from cldf.evaluate.report import tables

    sys.stdout.write(tables(args.results, args.ablation))


def cmd_readme_tables(args: argparse.Namespace) -> None:
    from cldf.atomic import write_text
    from cldf.evaluate.readme import machine, splice
    from cldf.evaluate.report import tables

    readme = Path(args.readme)
    write_text(readme, splice(readme.read_text(), args.tag, tables(args.results), args.results, machine()))
    LOG.info("README block %r now holds the tables of %s", args.tag, args.results)


Command = tuple[Callable[[argparse.Namespace], None], list[tuple[tuple[str, ...], dict[str, Any]]]]


def _option(name: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return ((f"--{name}",), {"required": True, **kwargs})


def _model_kinds() -> list[str]:
    from cldf.registry import MODEL_KINDS

    return list(MODEL_KINDS)


def _map_names() -> list[str]:
    from cldf.registry import MAPS

    return list(MAPS)


_SLICES = _option("slices", help="the slice store")
_OUT = _option("out")
_SETTINGS = _option("settings", type=_json, help="step settings as JSON")
_CASES = (("--cases",), {"type": _ints, "default": "", "help": "comma-separated case indices of the shard"})
_CHOICES = _option("choices", help="a CSV of choices made on validation")
_JSON = {"type": _json}

COMMANDS: dict[str, tuple[str, Command]] = {
    "phantom": ("generate the synthetic BraTS-layout phantom", (cmd_phantom, [
        _option("dataset", **_JSON), _option("manifest")])),
    "slices-shard": ("NIfTI cases of one shard → slice store", (cmd_slices_shard, [
        _option("dataset", **_JSON), _CASES, _OUT])),
    "slices-gather": ("gather slice shards → the slice store, test truth, manifest, skipped cases", (cmd_slices_gather, [
        _option("shards", nargs="+"), _OUT, _option("test-truth"), _option("manifest"), _option("skipped"),
        _option("split", **_JSON, help="the dataset's split settings")])),
    "train": ("train one model (cdm, noisy_classifier, cam_classifier, fsl_unet)", (cmd_train, [
        _option("kind", choices=_model_kinds()), _SLICES, _SETTINGS, _OUT,
        (("--context",), {"nargs": "*", "default": [], "help": "frozen networks the training reads, KIND=PATH"})])),
    "samples": ("class-conditional CDM samples as a PNG grid", (cmd_samples, [
        _option("cdm"), (("--n-per-class",), {"type": int, "default": 8}),
        (("--guidance",), {"type": float, "default": 3.0, "help": "classifier-free guidance scale"}), _OUT])),
    "predict-fsl": ("masks of the fully supervised UNet on the test split", (cmd_predict_fsl, [
        _SLICES, _option("model"), _OUT])),
    "map": ("one registered per-slice map (features, gradients, a CAM, ...) of one shard", (cmd_map, [
        _SLICES, _option("map", choices=_map_names()),
        _option("model", nargs="+", help="the trained network(s) the map reads, in the registered order"),
        _SETTINGS, _CASES, _OUT])),
    "gather": ("gather row-aligned shard stores", (cmd_gather, [_option("shards", nargs="+"), _OUT])),
    "fuse-cam": ("fuse a per-layer CAM over the layers chosen on validation", (cmd_fuse_cam, [
        _option("map"), _option("name"), _CHOICES, _SETTINGS, _OUT])),
    "choose-layers": ("choose the layers a per-layer CAM is fused over, on validation", (cmd_choose_layers, [
        _SLICES, _option("map"), _option("name"), _SETTINGS, _OUT])),
    "tune": ("train CLDF's decoder for every candidate setting, keep the best on validation", (cmd_tune, [
        _SLICES, _option("features"), _option("cam"), _option("mg"), _SETTINGS, _OUT, _option("rows-out")])),
    "choose-unlabelled": ("choose the unlabelled protocol's CDM conditioning and gate on validation", (
        cmd_choose_unlabelled, [_SLICES, _option("cdm"), _option("decoder"), _option("tuning"), _option("probs"),
                                _SETTINGS, _OUT])),
    "selection": ("concatenate the choices into selection.csv", (cmd_selection, [
        _option("parts", nargs="+"), (("--tagged",), {"nargs": "*", "default": [],
                                                     "help": "CAM=PATH: choices made for another CAM (choice@CAM)"}), _OUT])),
    "decoder": ("train an ablation decoder with the settings chosen for CLDF", (cmd_decoder, [
        _SLICES, _option("features"), (("--cam",), {"default": None}), (("--mg",), {"default": None}),
        _option("mode", choices=["cam", "mg"]), _option("tuning"), _SETTINGS, _OUT])),
    "segment": ("K-means masks of one shard's test slices under one protocol", (cmd_segment, [
        _SLICES, _option("cdm"), _option("decoders", **_JSON), _option("protocol", choices=["labelled", "unlabelled"]),
        _option("choices", required=False, help="the unlabelled protocol's choices (CSV); unlabelled protocol only"),
        _option("tuning"), _option("probs"), _SETTINGS, _CASES, _OUT])),
    "baselines": ("choose thresholds and the intensity channel on validation; threshold maps into test masks", (
        cmd_baselines, [_SLICES, _option("maps", **_JSON, help="map name → store"),
                        _option("masks", **_JSON, help="map name or 'intensity' → masks store"), _SETTINGS,
                        _option("choices-out")])),
    "nifti": ("write test masks back as NIfTI in each case's original geometry", (cmd_nifti, [
        _SLICES, _option("masks"), _option("array"), _option("probs"), _CHOICES, _OUT])),
    "metrics": ("the comparison table under both protocols", (cmd_metrics, [
        _SLICES, _option("test-truth"), _option("probs"), _CHOICES, _option("rows", **_JSON), _SETTINGS, _OUT,
        _option("per-slice"), _option("per-case"), _option("differences")])),
    "metrics-3d": ("3-D Dice and HD95 (mm) in each test scan's own geometry", (cmd_metrics_3d, [
        _SLICES, _option("dataset", **_JSON), _option("probs"), _CHOICES, _option("rows", **_JSON), _OUT])),
    "figure": ("the qualitative figure (paper Fig. 3)", (cmd_figure, [
        _SLICES, _option("test-truth"), _option("cam"), _option("mg"), _option("cldf"), _option("metrics"),
        _option("baselines", **_JSON, help="method → masks store"), _CHOICES, _SETTINGS, _OUT])),
    "ablation": ("CLDF with one lever changed at a time (ablation.csv, table2.csv): validation and test Dice", (cmd_ablation, [
        _SLICES, _option("test-truth"), _option("features"), _option("networks", nargs="+", help="KIND=PATH"),
        _option("cam"), _option("mg"), _option("tuning"), _SETTINGS, _OUT])),
    "table3": ("paper Table 3: CAM alone, CAM + CL, MG + CL, CAM ∧ MG + CL per CAM", (cmd_table3, [
        _SLICES, _option("test-truth"), _option("rows", **_JSON), _SETTINGS, _OUT])),
    "tables": ("print the result tables of results/<dataset> as Markdown", (cmd_tables, [
        (("results",), {"help": "a dataset's results folder, e.g. results/synthetic"}),
        (("--ablation",), {"action": "store_true", "help": "print the lever table (ablation.csv) only"})])),
    "readme-tables": ("replace a README block by `cldf tables results/<dataset>`, naming this machine", (
        cmd_readme_tables, [
            (("results",), {"help": "a dataset's results folder, computed on this machine"}),
            _option("tag", help="the block's tag: demo, brats18, flare"),
            (("--readme",), {"default": "README.md"})])),
}

from cldf.cli_own import COMMANDS as OWN_DATA_COMMANDS  # noqa: E402  users' own data (cldf/cli_own.py)

COMMANDS.update(OWN_DATA_COMMANDS)


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
