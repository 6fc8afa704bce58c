"""`cldf <step> …` for users' own data: given choices, the labels check, pseudo-masks, nnU-Net, new scans.

Part of the command table of :mod:`cldf.cli` (same conventions: settings as JSON, one-line errors).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

LOG = logging.getLogger("cldf")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return args.settings["given"]


def cmd_given_choices(args: argparse.Namespace) -> None:
    from cldf.evaluate.choices import write_rows
    from cldf.evaluate.given import given_rows

    write_rows(given_rows(_given(args), args.source), args.out)


def cmd_given_tune(args: argparse.Namespace) -> None:
    from cldf.cli import _device
    from cldf.evaluate.choices import chosen, write_rows
    from cldf.evaluate.given import given_decoder, given_rows
    from cldf.segment.features import StoredFeatures, decoder_inputs
    from cldf.store import SliceStore

    s = args.settings
    rows = given_rows(_given(args), args.source)
    slices = SliceStore(args.slices)
    features = decoder_inputs(StoredFeatures(args.features, slices.image_size, _device(args)), slices,
                              s["cldf"]["decoder"])
    stats = given_decoder(args.slices, features, args.cam, args.mg, s["cldf"], chosen(rows, "decoder"), args.out,
                          args.seed, int(s["max_train_slices"]))
    LOG.info("decoder training: %s", stats)
    write_rows(rows, args.rows_out)


def cmd_labels_check(args: argparse.Namespace) -> None:
    from cldf.evaluate.labels import labels_check_table
    from cldf.segment.pseudo import write_table
    from cldf.store import SliceStore

    frame = labels_check_table(SliceStore(args.slices).cases)
    LOG.info("labels table vs masks:\n%s", frame.to_string(index=False))
    write_table(frame, args.out)


def _segmenter(args: argparse.Namespace):
    from cldf.cli import _chosen, _device, _model
    from cldf.evaluate.choose import cluster_settings
    from cldf.segment.pseudo import CaseSegmenter
    from cldf.segment.train import load_decoder

    device = _device(args)
    decoder, checkpoint = load_decoder(args.decoder, device)
    return CaseSegmenter(
        cdm=_model(args.cdm, "cdm", args), classifier=_model(args.classifier, "cam_classifier", args),
        decoder=decoder, checkpoint=checkpoint, decoder_path=args.decoder,
        cluster=cluster_settings(args.settings["cluster"], _chosen(args.tuning, "decoder")),
        conditioning=_chosen(args.choices, "conditioning"), gate=float(_chosen(args.choices, "gate")),
        settings=args.settings, device=device, seed=args.seed)


def cmd_pseudo_masks(args: argparse.Namespace) -> None:
    from cldf.segment.pseudo import pseudo_masks, write_table

    write_table(pseudo_masks(args.slices, _segmenter(args), args.cases, args.folder), args.out)


def cmd_predict(args: argparse.Namespace) -> None:
    from cldf.io.layouts import list_cases
    from cldf.segment.pseudo import predict_scans, write_table

    names = list_cases(args.dataset)
    frame = predict_scans(args.dataset, [names[i] for i in args.cases], _segmenter(args), args.folder)
    write_table(frame, args.out)


def cmd_collect(args: argparse.Namespace) -> None:
    from cldf.segment.pseudo import collect_manifest

    frame = collect_manifest(args.parts, args.out)
    LOG.info("%d case(s) in %s", len(frame), args.out)


def cmd_nnunet(args: argparse.Namespace) -> None:
    from cldf.io.nnunet import export_nnunet

    frame = export_nnunet(args.dataset, args.masks, args.folder, args.out)
    LOG.info("nnU-Net v2 raw dataset %s: %d training case(s)", args.folder, len(frame))


def _opt(name: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return ((f"--{name}",), {"required": True, **kwargs})


def _cases(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()] if text else []


_SOURCE = (("--source",), {"default": None, "help": "the selection.csv the choices come from (selection_from)"})
_SETTINGS = _opt("settings", type=json.loads, help="step settings as JSON")
_CASES = (("--cases",), {"type": _cases, "default": "", "help": "comma-separated case indices of the shard"})
_NETWORKS = [_opt("slices", help="the slice store"), _opt("cdm"), _opt("classifier", help="the CAM classifier (gate)"),
             _opt("decoder"), _opt("tuning", help="tuning.csv (clustering)"),
             _opt("choices", help="unlabelled.csv (conditioning, gate)"), _SETTINGS, _CASES,
             _opt("folder", help="where the NIfTI files go"), _opt("out", help="this shard's manifest rows")]

COMMANDS = {
    "given-choices": ("choices of a dataset without masks: from another selection.csv or the defaults", (
        cmd_given_choices, [_SETTINGS, _SOURCE, _opt("out")])),
    "given-tune": ("train CLDF's decoder with the given (not tuned) settings", (cmd_given_tune, [
        _opt("slices"), _opt("features"), _opt("cam"), _opt("mg"), _SETTINGS, _SOURCE, _opt("out"), _opt("rows-out")])),
    "labels-check": ("how often the labels table disagrees with the masks, per case", (cmd_labels_check, [
        _opt("slices"), _opt("out")])),
    "pseudo-masks": ("CLDF masks of one shard's cases as NIfTI in each scan's own geometry", (
        cmd_pseudo_masks, _NETWORKS)),
    "predict": ("CLDF masks of one shard of new scans (unlabelled protocol) as NIfTI", (cmd_predict, [
        _opt("dataset", type=json.loads, help="the new scans' dataset settings"), *_NETWORKS])),
    "collect": ("the shards' manifest rows as one manifest", (cmd_collect, [_opt("parts", nargs="+"), _opt("out")])),
    "nnunet": ("an nnU-Net v2 raw dataset of the scans and their pseudo-masks", (cmd_nnunet, [
        _opt("dataset", type=json.loads), _opt("masks", help="the pseudo-masks' manifest"),
        _opt("folder", help="results/<dataset>/nnunet/Dataset<id>_<name>"), _opt("out")])),
}
