"""Users' own data: labels from a table without masks, choices given instead of made, pseudo-masks in each
scan's own geometry, the nnU-Net v2 hand-off and predictions on new scans.

Fast tests of the pieces; the whole example of docs/OWN_DATA.md (the README's "Your own data") runs in
``test_own_data_example_end_to_end`` (slow).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cldf.config import DEFAULT_CONFIG, dataset_settings, deep_merge, load_config
from cldf.data.phantom import generate_phantom
from cldf.data.slices import build_shard, gather
from cldf.evaluate.choices import chosen
from cldf.evaluate.given import given_rows
from cldf.evaluate.labels import labels_check_table
from cldf.io.errors import DataError
from cldf.io.labels import canonical_labels, load_labels
from cldf.io.layouts import case_files, list_cases
from cldf.io.nnunet import export_nnunet
from cldf.io.nifti import read_case
from cldf.models.builders import build_model
from cldf.models.decoder import PixelDecoder, embed_slices
from cldf.plan import Plan
from cldf.segment.pseudo import (PREDICT_COLUMNS, PSEUDO_COLUMNS, CaseSegmenter, CaseSlices, ClassifierProbs,
                                 collect_manifest, predict_scans, pseudo_masks, segment_case, write_mask)
from cldf.segment.cluster import cluster_slices, prototypes_of
from cldf.segment.components import fill_holes
from cldf.segment.context import vote_slices
from cldf.store import SliceStore, StoreError, TestTruth, read_ground_truth

from .workflow_utils import REPO, planned_jobs, run_snakemake, tiny_config

SHAPE = (24, 24, 8)


_PHANTOM: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small phantom (3 cases of 24 x 24 x 8, with masks) that the tests copy what they need from."""
    root = tmp_path_factory.mktemp("phantom") / "phantom"
    generate_phantom(root, n_cases=3, shape=SHAPE, seed=3)
    _PHANTOM[:] = [root]
    yield root
    _PHANTOM.clear()


def _phantom(work: Path) -> Path:
    return _PHANTOM[0]


def _own(work: Path, n_cases: int = 3, masks: bool = False) -> dict:
    """A BraTS-layout copy of the first ``n_cases`` of the phantom (without masks unless ``masks``) in ``work``,
    and its dataset settings."""
    root = work / "own"
    for case in sorted(p for p in _phantom(work).iterdir() if p.is_dir())[:n_cases]:
        (root / case.name).mkdir(parents=True)
        for f in case.glob("*.nii.gz"):
            if masks or not f.name.endswith("_seg.nii.gz"):
                shutil.copy(f, root / case.name / f.name)
    ds = dataset_settings(load_config(DEFAULT_CONFIG), "brats21")
    ds.update(root=str(root), labels_csv=str(work / "labels.csv"), image_size=16, min_body_fraction=0.0)
    return ds


def _write_labels(work: Path, lines: list[str]) -> Path:
    path = work / "labels.csv"
    path.write_text("\n".join(["case,slice,label", *lines]) + "\n")
    return path


def _labels_from_masks(work: Path, n_cases: int = 3, every: int = 1) -> list[str]:
    """Rows case,slice,label of the phantom's masks (positive above 1 %, negative when empty; every ``every``-th)."""
    rows = []
    for k in range(n_cases):
        case = f"Synth_{k:03d}"
        seg = np.asarray(nib.load(str(_phantom(work) / case / f"{case}_seg.nii.gz")).dataobj) > 0
        fraction = seg.sum((0, 1)) / float(SHAPE[0] * SHAPE[1])
        rows += [f"{case},{z},{int(fraction[z] > 0.01)}" for z in range(0, SHAPE[2], every)
                 if fraction[z] > 0.01 or fraction[z] == 0]
    return rows


# --- the labels table ---------------------------------------------------------------------------


BAD_TABLES = {
    "missing column": ("case,slice\nSynth_000,1\n", "line 1: missing column(s) label"),
    "label not 0/1": ("case,slice,label\nSynth_000,1,1\nSynth_000,2,2\n", "line 3: label '2' is not 0 or 1"),
    "label empty": ("case,slice,label\nSynth_000,1,\n", "line 2: label '' is not 0 or 1"),
    "slice not an integer": ("case,slice,label\nSynth_000,one,1\n", "line 2: slice 'one' is not an integer index"),
    "unknown case": ("case,slice,label\nSynth_000,1,1\nSynth_042,1,0\n", "line 3: unknown case 'Synth_042'"),
    "slice out of range": ("case,slice,label\nSynth_001,8,1\n", "line 2: slice 8 is out of range for case Synth_001"),
    "negative slice": ("case,slice,label\nSynth_001,-1,1\n", "line 2: slice -1 is out of range"),
    "duplicate row": ("case,slice,label\nSynth_000,1,1\nSynth_001,1,1\nSynth_000,1,0\n",
                      "line 4: duplicate row: case Synth_000 slice 1 is already on line 2"),
    "empty file": ("", "empty file; expected the header case,slice,label"),
}


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_a_bad_labels_table_is_one_line_naming_file_line_and_problem(tmp_path: Path, name: str) -> None:
    ds = _own(tmp_path, n_cases=2)
    text, expected = BAD_TABLES[name]
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError) as err:
        load_labels(ds, list_cases(ds))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "labels.csv") in message and expected in message, message


def test_a_good_table_tolerates_blank_lines_extra_columns_and_a_bom(tmp_path: Path) -> None:
    ds = _own(tmp_path, n_cases=2)
    (tmp_path / "labels.csv").write_text("\ufeffCase, Slice ,label,note\nSynth_000,0,0,x\n\nSynth_001,7,1,\n")
    assert load_labels(ds, list_cases(ds)) == {"Synth_000": {0: 0}, "Synth_001": {7: 1}}


def test_slices_of_the_table_follow_the_stored_third_axis_into_canonical_order() -> None:
    identity = np.array([[0, 1], [1, 1], [2, 1]])
    flipped = np.array([[0, 1], [1, 1], [2, -1]])  # stored inferior-to-superior reversed
    assert canonical_labels({0: 1, 2: 0}, 4, identity).tolist() == [1, -1, 0, -1]
    assert canonical_labels({0: 1, 2: 0}, 4, flipped).tolist() == [-1, 0, -1, 1]
    with pytest.raises(DataError, match="not this scan's axial axis"):
        canonical_labels({0: 1}, 4, np.array([[2, 1], [1, 1], [0, 1]]))


def test_a_table_of_a_scan_stored_with_a_flipped_third_axis_labels_the_right_slices(tmp_path: Path) -> None:
    ds = _own(tmp_path, n_cases=2)
    case = "Synth_000"
    for path in case_files(ds, case).values():  # store the case superior-to-inferior
        img = nib.load(str(path))
        flip = np.diag([1.0, 1.0, -1.0, 1.0])
        flip[2, 3] = SHAPE[2] - 1
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, ::-1], img.affine @ flip), str(path))
    _write_labels(tmp_path, [f"{case},0,1", f"{case},7,0"])
    table = load_labels(ds, list_cases(ds))
    read = read_case(ds, case)
    assert canonical_labels(table[case], SHAPE[2], read.ornt)[[0, SHAPE[2] - 1]].tolist() == [0, 1]


# --- slicing without masks ----------------------------------------------------------------------


def _slice(work: Path, ds: dict, split: dict | None = None) -> Path:
    cases = list_cases(ds)
    build_shard(ds, cases, cases, work / "shard")
    split = split or {"val_fraction": 0.0, "test_fraction": 0.34, "seed": 0}
    gather([work / "shard"], work / "slices", work / "truth", work / "slices.csv", work / "skipped.csv", split)
    return work / "slices"


def test_without_masks_labels_come_from_the_table_and_no_ground_truth_is_reachable(tmp_path: Path) -> None:
    ds = {**_own(tmp_path), "ambiguous_slices": "drop"}
    _write_labels(tmp_path, ["Synth_000,3,1", "Synth_000,0,0", "Synth_002,5,1"])
    slices = SliceStore(_slice(tmp_path, ds))
    assert slices.n == 3 * SHAPE[2]  # unlisted slices are kept (label -1) even with ambiguous_slices: drop
    listed = {(slices.cases[c]["id"], int(z)): int(label) for c, z, label in
              zip(slices.case_index, slices.slice_index, slices.labels) if label != -1}
    assert listed == {("Synth_000", 3): 1, ("Synth_000", 0): 0, ("Synth_002", 5): 1}
    assert slices.attrs["has_masks"] is False and slices.attrs["labels_from"] == ds["labels_csv"]
    with pytest.raises(StoreError, match="has no masks"):
        read_ground_truth(tmp_path / "slices", slices.indices(split="train")[:1])
    with pytest.raises(StoreError, match="has no masks"):
        TestTruth(tmp_path / "truth")


def test_with_masks_too_the_table_wins_and_the_check_counts_disagreements(tmp_path: Path, caplog) -> None:
    ds = _own(tmp_path, masks=True)
    rows = _labels_from_masks(tmp_path)
    flipped = rows[0].rsplit(",", 1)[0] + "," + str(1 - int(rows[0][-1]))
    _write_labels(tmp_path, [flipped, *rows[1:]])
    with caplog.at_level(logging.WARNING, logger="cldf.data"):
        slices = SliceStore(_slice(tmp_path, ds))
    assert f"disagrees with the masks on 1 of {len(rows)} listed slices" in caplog.text
    table = labels_check_table(slices.cases)
    total = table[table.case == "all"].iloc[0]
    assert (total.listed, total.agree) == (len(rows), len(rows) - 1)
    assert slices.attrs["has_masks"] is True
    truth = TestTruth(tmp_path / "truth")  # the test truth's labels still come from the masks
    assert set(np.unique(truth.labels)) <= {-1, 0, 1}


# --- the plan: masks, given choices, nnU-Net, new scans -----------------------------------------


def _config(work: Path, **own: object) -> dict:
    base = load_config(DEFAULT_CONFIG)
    ds = {**base["datasets"]["brats21"], "root": str(work / "own"), "labels_csv": str(work / "labels.csv"), **own}
    return deep_merge(base, {"datasets": {"own": ds}, "default_dataset": "own"})


def test_plan_of_a_dataset_without_masks_leaves_evaluation_out_and_gives_the_choices(tmp_path: Path, caplog) -> None:
    _own(tmp_path)
    _write_labels(tmp_path, ["Synth_000,3,1"])
    config = _config(tmp_path, selection_from="brats21")
    plan = Plan(config)
    assert plan.has_masks("own") is False and plan.has_masks("brats21") is True
    assert plan.mask_free_datasets() == ["own"]
    with caplog.at_level(logging.WARNING, logger="cldf.plan"):
        targets = plan.final_targets("own")
    assert "has no masks" in caplog.text and not any("metrics" in t or "figure" in t for t in targets)
    assert plan.given_source("own") == [plan.catalogue.path("selection", dataset="brats21")]
    grids = config["choices"]
    assert plan.given_choices("tuning", "layercam") == {"decoder": [
        "decoder", {**grids["optimizer"][0], "quantile": grids["quantile"][0], **grids["cluster"][0],
                    "feature_layers": grids["feature_layers"][0], "min_component": grids["components"][0],
                    "slice_vote": grids["slice_vote"][0], "epochs": config["cldf"]["decoder"]["epochs"]}]}
    assert plan.given_choices("unlabelled", "amecam")["gate"] == ["gate@amecam", grids["gate"][0]]
    assert plan.given_choices("layers", "layercam") == {"layers:layercam": ["layers:layercam", grids["layercam_layers"][0]]}
    assert plan.nnunet_settings("own")["folder"].endswith("own/nnunet/Dataset501_own")
    assert str(tmp_path / "labels.csv") in plan.raw_inputs("own", 0)


def test_plan_checks_the_table_at_the_start(tmp_path: Path) -> None:
    _own(tmp_path)
    _write_labels(tmp_path, ["Synth_000,3,7"])
    with pytest.raises(DataError, match="line 2: label '7' is not 0 or 1"):
        Plan(_config(tmp_path)).raw_inputs("own", 0)


def test_plan_of_new_scans_needs_predict_root(tmp_path: Path) -> None:
    _own(tmp_path)
    _write_labels(tmp_path, [])
    plan = Plan(_config(tmp_path))
    with pytest.raises(Exception, match="predict_root: not set"):
        plan.predict_cases("own")
    plan = Plan(_config(tmp_path, predict_root=str(tmp_path / "own"), nnunet={"id": 7, "name": "Brains"}))
    assert plan.predict_cases("own") == ["Synth_000", "Synth_001", "Synth_002"]
    assert len(plan.predict_inputs("own", 0)) == 3 * 4
    assert plan.nnunet_settings("own")["folder"].endswith("Dataset007_Brains")


def test_given_choices_come_from_the_source_or_the_defaults(tmp_path: Path, caplog) -> None:
    source = tmp_path / "selection.csv"
    pd.DataFrame([{"choice": "gate", "value": "0.3", "val_dice": 0.7, "chosen": True},
                  {"choice": "gate", "value": "0.5", "val_dice": 0.6, "chosen": False}]).to_csv(source, index=False)
    choices = {"gate": ["gate", 0.5], "conditioning": ["conditioning", "null_class"]}
    with caplog.at_level(logging.WARNING, logger="cldf.given"):
        rows = given_rows(choices, source)
    assert chosen(rows, "gate") == 0.3 and chosen(rows, "conditioning") == "null_class"
    assert f"no masks: choice gate = 0.3, from gate of {source}" in caplog.text  # the log says which, choice by choice
    assert "no masks: choice conditioning = null_class, from the config's default (no conditioning in" in caplog.text
    assert chosen(given_rows(choices, None), "gate") == 0.5
    assert all(r["chosen"] and np.isnan(r["val_dice"]) for r in rows)


# --- NIfTI outputs and the nnU-Net folder -------------------------------------------------------


def _sliced_case(tmp_path: Path) -> tuple[dict, dict, SliceStore]:
    ds = _own(tmp_path)
    _write_labels(tmp_path, ["Synth_000,3,1"])
    slices = SliceStore(_slice(tmp_path, ds))
    return ds, slices.cases[0], slices


def test_a_mask_is_written_in_the_scan_s_own_grid_affine_and_orientation(tmp_path: Path) -> None:
    ds, meta, slices = _sliced_case(tmp_path)
    rows = slices.indices(cases=[0])
    masks = np.zeros((len(rows), 16, 16), np.uint8)
    masks[:, 4:12, 6:10] = 1
    path = tmp_path / "out" / "Synth_000.nii.gz"
    voxels = write_mask(masks, slices.slice_index[rows], meta, path)
    written, scan = nib.load(str(path)), nib.load(str(case_files(ds, "Synth_000")["flair"]))
    assert written.shape == scan.shape and np.allclose(written.affine, scan.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(scan.affine)
    assert voxels == int(np.count_nonzero(np.asarray(written.dataobj))) > 0


def test_collect_manifest_sorts_cases_and_refuses_missing_files(tmp_path: Path) -> None:
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    pd.DataFrame({"case": ["b"], "path": [str(tmp_path / "b.nii.gz")], "foreground_voxels": [1]}).to_csv(tmp_path / "1.csv", index=False)
    pd.DataFrame({"case": ["a"], "path": [str(tmp_path / "a.nii.gz")], "foreground_voxels": [2]}).to_csv(tmp_path / "0.csv", index=False)
    frame = collect_manifest([tmp_path / "1.csv", tmp_path / "0.csv"], tmp_path / "manifest.csv")
    assert list(frame.case) == ["a", "b"] and list(pd.read_csv(tmp_path / "manifest.csv").columns) == [
        "case", "path", "foreground_voxels"]
    (tmp_path / "a.nii.gz").unlink()
    with pytest.raises(DataError, match="missing"):
        collect_manifest([tmp_path / "1.csv", tmp_path / "0.csv"], tmp_path / "manifest.csv")


def _export(tmp_path: Path) -> tuple[dict, Path]:
    ds, _, slices = _sliced_case(tmp_path)
    rows = []
    for ci, meta in enumerate(slices.cases):
        ids = slices.indices(cases=[ci])
        masks = np.zeros((len(ids), 16, 16), np.uint8)
        masks[len(ids) // 2, 5:11, 5:11] = 1
        path = tmp_path / "pseudo" / f"{meta['id']}.nii.gz"
        rows.append({"case": meta["id"], "path": str(path),
                     "foreground_voxels": write_mask(masks, slices.slice_index[ids], meta, path)})
    pd.DataFrame(rows).to_csv(tmp_path / "pseudo.csv", index=False)
    folder = tmp_path / "nnunet" / "Dataset501_own"
    export_nnunet(ds, tmp_path / "pseudo.csv", folder, tmp_path / "nnunet" / "manifest.csv")
    return ds, folder


def test_nnunet_export_has_images_per_channel_labels_and_dataset_json(tmp_path: Path) -> None:
    ds, folder = _export(tmp_path)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "flair", "1": "t1", "2": "t1ce", "3": "t2"}
    assert meta["labels"] == {"background": 0, "target": 1} and meta["numTraining"] == 3
    assert meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        f"Synth_{c:03d}_{k:04d}.nii.gz" for c in range(3) for k in range(4)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"Synth_{c:03d}.nii.gz" for c in range(3)]
    manifest = pd.read_csv(tmp_path / "nnunet" / "manifest.csv")
    assert list(manifest.columns) == ["case", "label", "image_0000", "image_0001", "image_0002", "image_0003"]
    image, label = nib.load(str(folder / "imagesTr" / "Synth_001_0002.nii.gz")), nib.load(str(folder / "labelsTr" / "Synth_001.nii.gz"))
    assert image.shape == label.shape and np.allclose(image.affine, label.affine)


def test_nnunet_v2_accepts_the_exported_dataset(tmp_path: Path, capsys) -> None:
    integrity = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity",
                                    reason="nnunetv2 is not installed (pip install nnunetv2 with the CPU torch pin)")
    _, folder = _export(tmp_path)
    integrity.verify_dataset_integrity(str(folder), num_processes=1)
    assert "WARNING" not in capsys.readouterr().out


# --- on-the-fly pieces --------------------------------------------------------------------------


def test_classifier_probabilities_are_computed_once_per_slice(tmp_path: Path) -> None:
    calls = []

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return torch.stack([-x.mean((1, 2, 3)), x.mean((1, 2, 3))], dim=1)

    images = np.random.default_rng(0).uniform(-1, 1, (5, 2, 8, 8)).astype(np.float16)
    slices = CaseSlices({"images": images, "body": np.ones((5, 8, 8), np.uint8), "labels": np.full(5, -1),
                         "slice_index": np.arange(5)}, 8)
    probs = ClassifierProbs(Net(), slices, torch.device("cpu"), batch_size=2)
    first = probs.read("probs", [4, 0, 1])
    again = probs.read("probs", [0, 1, 2, 3, 4])
    assert np.allclose(again[[4, 0, 1]], first) and sum(calls) == 5 and max(calls) <= 2
    assert np.all((again > 0) & (again < 1))


def _segmenter(gate: float) -> CaseSegmenter:
    """Tiny untrained networks (4 channels, 16 x 16): what whole-case segmentation reads, without training."""
    torch.manual_seed(0)
    cdm = build_model("cdm", {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1,
                              "num_head_channels": 8}, 4)
    classifier = build_model("cam_classifier", {"widen_factor": 0.25}, 4)
    settings = {"features": {"timesteps": [1], "layers": ["up_blocks.0"]}, "with_image": False, "image_context": 0,
                "batch_size": 4}
    dim = 16  # channels of the CDM's up_blocks.0 (checked against the checkpoint's in_channels)
    decoder = PixelDecoder(dim, [16, 16]).eval()
    prototypes = {"foreground": torch.nn.functional.normalize(torch.randn(16), dim=0),
                  "background": torch.nn.functional.normalize(torch.randn(16), dim=0)}
    return CaseSegmenter(cdm=cdm, classifier=classifier, decoder=decoder,
                         checkpoint={"in_channels": dim, "prototypes": prototypes}, decoder_path="decoder.pt",
                         cluster={"k": 2, "assign": "prototype", "inside_body": False}, conditioning="null_class",
                         gate=gate, settings=settings, device=torch.device("cpu"), seed=0)


def test_pseudo_masks_and_predictions_of_whole_cases_in_each_scan_s_geometry(tmp_path: Path, one_thread) -> None:
    """Labelled 1: segmented; labelled 0: empty; unlabelled: segmented when the gate passes it. Every case gets a
    mask in its scan's own geometry; new scans are read without any label (fast: tiny untrained networks)."""
    ds = _own(tmp_path)
    _write_labels(tmp_path, ["Synth_000,3,1", "Synth_000,0,0", "Synth_001,5,0"])
    slices_path = _slice(tmp_path, ds)
    n_kept = [len(SliceStore(slices_path).indices(cases=[c])) for c in range(3)]
    everything = pseudo_masks(slices_path, _segmenter(gate=0.0), [0, 1, 2], tmp_path / "all")
    assert list(everything.columns) == list(PSEUDO_COLUMNS) and list(everything.case) == [f"Synth_{k:03d}" for k in range(3)]
    assert everything.n_slices.tolist() == [SHAPE[2]] * 3
    assert everything.n_positive_slices.tolist() == [n_kept[0] - 1, n_kept[1] - 1, n_kept[2]]  # labelled 0: empty
    for row in everything.itertuples():
        written, scan = nib.load(row.path), nib.load(str(case_files(ds, row.case)["flair"]))
        assert written.shape == scan.shape and np.allclose(written.affine, scan.affine)
        mask = np.asarray(written.dataobj)
        assert int(np.count_nonzero(mask)) == row.foreground_voxels
    assert not np.asarray(nib.load(everything.path[0]).dataobj)[:, :, 0].any()
    assert not np.asarray(nib.load(everything.path[1]).dataobj)[:, :, 5].any()
    assert everything.foreground_voxels.sum() > 0
    gated = pseudo_masks(slices_path, _segmenter(gate=1.0), [0, 1, 2], tmp_path / "gated")  # no probability reaches 1
    assert gated.n_positive_slices.tolist() == [1, 0, 0] and gated.foreground_voxels.tolist()[1:] == [0, 0]
    assert np.asarray(nib.load(gated.path[0]).dataobj)[:, :, [z for z in range(SHAPE[2]) if z != 3]].sum() == 0
    new = {**ds, "predict": True, "labels_csv": None, "ambiguous_slices": "evaluate"}
    (tmp_path / "labels.csv").unlink()  # a new scan has no label: nothing may read the table
    predicted = predict_scans(new, ["Synth_002"], _segmenter(gate=0.0), tmp_path / "predict")
    assert list(predicted.columns) == list(PREDICT_COLUMNS) and predicted.case.tolist() == ["Synth_002"]
    written = nib.load(predicted.path[0])
    assert written.shape == SHAPE and int(np.count_nonzero(np.asarray(written.dataobj))) == predicted.foreground_voxels[0]


def test_whole_case_masks_are_voted_over_neighbouring_slices_when_chosen(tmp_path: Path, one_thread) -> None:
    """With ``slice_vote`` in the clustering, a case's segmented slices (labelled and gated alike) vote on each
    other's masks; the slices left empty stay empty. With ``fill_holes`` the masks' holes are filled (the
    default k = 2 leaves none in this case, k = 3 with the "nearest" assignment leaves one)."""
    ds = _own(tmp_path)
    _write_labels(tmp_path, ["Synth_000,3,1", "Synth_000,0,0"])
    slices = SliceStore(_slice(tmp_path, ds))
    rows = slices.indices(cases=[0])
    alone = _segmenter(gate=0.0)
    masks, segmented = segment_case(alone, slices, rows)
    voted, again = segment_case(dataclasses.replace(alone, cluster={**alone.cluster, "slice_vote": 1}), slices, rows)
    expected = masks.copy()
    expected[segmented] = vote_slices(masks[segmented], np.zeros(int(segmented.sum())), slices.slice_index[rows][segmented], 1)
    assert np.array_equal(again, segmented) and not segmented.all()
    assert np.array_equal(voted, expected) and not np.array_equal(voted, masks)
    filled, _ = segment_case(dataclasses.replace(alone, cluster={**alone.cluster, "slice_vote": 1, "fill_holes": True}),
                             slices, rows)
    assert np.array_equal(filled.astype(bool), fill_holes(expected.astype(bool)))
    three = dataclasses.replace(alone, cluster={**alone.cluster, "k": 3, "assign": "nearest"})  # its masks have a hole
    unfilled, _ = segment_case(three, slices, rows)
    filled, _ = segment_case(dataclasses.replace(three, cluster={**three.cluster, "fill_holes": True}), slices, rows)
    assert np.array_equal(filled.astype(bool), fill_holes(unfilled.astype(bool)))
    assert (filled.astype(bool) & ~unfilled.astype(bool)).any()


def test_whole_case_masks_under_per_case_kmeans_cluster_labelled_and_gated_slices_together(tmp_path: Path, one_thread) -> None:
    """``scope: case``: a case's labelled positive slice (features conditioned on its label) and its gated
    unlabelled slices (conditioned on the null class) are split by one K-means over all their pixels,
    computed here from the decoder's embeddings; a new scan (held in memory) is segmented under it too."""
    ds = _own(tmp_path)
    _write_labels(tmp_path, ["Synth_000,3,1", "Synth_000,0,0"])
    slices = SliceStore(_slice(tmp_path, ds))
    rows = slices.indices(cases=[0])
    per_slice = _segmenter(gate=0.0)
    pooled = dataclasses.replace(per_slice, cluster={**per_slice.cluster, "scope": "case"})
    masks, segmented = segment_case(pooled, slices, rows)
    labels = slices.labels[rows]
    probs = ClassifierProbs(pooled.classifier, slices, pooled.device, 4)
    groups = ((rows[labels == 1], "label"), (rows[labels == -1], pooled.conditioning))
    with torch.no_grad():
        emb = torch.cat([embed_slices(pooled.decoder, feats) for ids, conditioning in groups
                         for _, feats in pooled.features(slices, conditioning, probs).batches(ids, 4)])
    prototypes = prototypes_of(pooled.checkpoint)
    order = np.concatenate([ids for ids, _ in groups])
    expected = np.zeros_like(masks)
    expected[np.searchsorted(rows, order)] = cluster_slices(emb, np.ones((len(order), slices.image_size, slices.image_size), bool), 2, prototypes, 0)
    assert np.array_equal(masks, expected) and np.array_equal(segmented, labels != 0)
    assert not np.array_equal(masks, segment_case(per_slice, slices, rows)[0])
    new = {**ds, "predict": True, "labels_csv": None, "ambiguous_slices": "evaluate"}
    predicted = predict_scans(new, ["Synth_002"], pooled, tmp_path / "predict")
    assert predicted.foreground_voxels[0] > 0


# --- the workflow: "Your own data" of the README (docs/OWN_DATA.md) ----------------------------

EXAMPLE_MARKER = "<!-- own-data example config"
TARGETS = ("pseudo_masks", "nnunet", "predict")


def example_config() -> tuple[str, dict]:
    """The dataset of the README's own-data example (its YAML block after :data:`EXAMPLE_MARKER`)."""
    for doc in (REPO / "README.md", REPO / "docs" / "OWN_DATA.md"):
        text = doc.read_text() if doc.is_file() else ""
        if EXAMPLE_MARKER in text:
            block = text.split(EXAMPLE_MARKER, 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
            datasets = yaml.safe_load(block)["datasets"]
            return next(iter(datasets.items()))
    raise AssertionError(f"no {EXAMPLE_MARKER!r} block in README.md or docs/OWN_DATA.md")


def _example_workdir(work: Path, n_cases: int, n_new: int, shape: tuple[int, int, int]) -> tuple[str, Path]:
    """The example's layout in ``work``: a mask-free copy of a phantom, its labels table (from the phantom's
    masks, every third slice left out), new scans, and ``config/config.yaml`` (the tiny sizes + the example)."""
    name, ds = example_config()
    generate_phantom(work / "phantom", n_cases=n_cases + n_new, shape=shape, seed=1)
    rows = []
    for k, case in enumerate(sorted(p for p in (work / "phantom").iterdir() if p.is_dir())):
        target = work / (ds["root"] if k < n_cases else ds["predict_root"]) / case.name
        target.mkdir(parents=True)
        for f in case.glob("*.nii.gz"):
            if not f.name.endswith("_seg.nii.gz"):
                shutil.copy(f, target / f.name)
        if k < n_cases:
            seg = np.asarray(nib.load(str(case / f"{case.name}_seg.nii.gz")).dataobj) > 0
            fraction = seg.sum((0, 1)) / float(shape[0] * shape[1])
            rows += [f"{case.name},{z},{int(fraction[z] > 0.01)}" for z in range(shape[2])
                     if z % 3 and (fraction[z] > 0.01 or fraction[z] == 0)]
    (work / ds["labels_csv"]).write_text("\n".join(["case,slice,label", *rows]) + "\n")
    return name, tiny_config(work, {"datasets": {name: ds}})


def test_own_data_workflow_plans_given_choices_and_no_ground_truth(tmp_path: Path) -> None:
    name, config = _example_workdir(tmp_path, n_cases=3, n_new=1, shape=SHAPE)
    jobs = planned_jobs(config, [f"results/{name}/{t}/manifest.csv" for t in TARGETS])
    assert {"given_layer_choices", "given_tuning", "given_unlabelled", "pseudo_mask_shard", "nnunet",
            "predict_shard"} <= set(jobs)
    assert not {"choose_layers", "baselines", "tune_decoder", "choose_unlabelled", "metrics", "labels_check"} & set(jobs)
    assert set(planned_jobs(config, [f"results/{name}/models/cdm_samples.png"])) == {
        "slices_shard", "slices", "train_model", "cdm_samples"}


def test_own_data_workflow_with_masks_too_chooses_on_validation_and_checks_the_table(tmp_path: Path) -> None:
    ds = _own(tmp_path, masks=True)
    _write_labels(tmp_path, _labels_from_masks(tmp_path, every=2))
    ds.pop("name", None)
    config = tiny_config(tmp_path, {"datasets": {"own": ds}})
    jobs = planned_jobs(config, ["results/own/pseudo_masks/manifest.csv"])
    assert {"labels_check", "tune_decoder", "choose_unlabelled", "pseudo_mask_shard"} <= set(jobs)
    assert not {"given_layer_choices", "given_tuning", "given_unlabelled"} & set(jobs)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """One run of the example's three targets on a mask-free copy of the tiny phantom (.test sizes)."""
    work = tmp_path_factory.mktemp("own_data")
    name, config = _example_workdir(work, n_cases=6, n_new=2, shape=(48, 48, 20))
    run_snakemake(config, ["--cores", "2", *(f"results/{name}/{t}/manifest.csv" for t in TARGETS)], timeout=1800)
    return work, name, example_config()[1]


def _same_geometry(mask: Path, scan: Path) -> bool:
    a, b = nib.load(str(mask)), nib.load(str(scan))
    return a.shape == b.shape and np.allclose(a.affine, b.affine) and nib.aff2axcodes(a.affine) == nib.aff2axcodes(b.affine)


@pytest.mark.slow
def test_own_data_example_end_to_end(example: tuple[Path, str, dict]) -> None:
    work, name, ds = example
    pseudo = pd.read_csv(work / f"results/{name}/pseudo_masks/manifest.csv", dtype={"case": str})
    assert list(pseudo.columns) == ["case", "path", "n_slices", "n_positive_slices", "foreground_voxels"]
    assert list(pseudo.case) == [f"Synth_{k:03d}" for k in range(6)]  # every case, training cases too
    table = pd.read_csv(work / ds["labels_csv"])
    for row in pseudo.itertuples():
        scan = work / ds["root"] / row.case / f"{row.case}_flair.nii.gz"
        assert _same_geometry(work / row.path, scan) and row.n_slices == 20
        mask = np.asarray(nib.load(str(work / row.path)).dataobj)
        assert int(np.count_nonzero(mask)) == row.foreground_voxels
        negative = table[(table.case == row.case) & (table.label == 0)].slice.to_numpy()
        assert not mask[:, :, negative].any()  # slices labelled negative get empty masks
    assert pseudo.foreground_voxels.sum() > 0
    predict = pd.read_csv(work / f"results/{name}/predict/manifest.csv", dtype={"case": str})
    assert list(predict.columns) == ["case", "path", "foreground_voxels"]
    assert list(predict.case) == ["Synth_006", "Synth_007"]
    for row in predict.itertuples():
        assert _same_geometry(work / row.path, work / ds["predict_root"] / row.case / f"{row.case}_t2.nii.gz")
    folder = work / f"results/{name}/nnunet/Dataset{ds['nnunet']['id']:03d}_{ds['nnunet']['name']}"
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 6
    assert len(list((folder / "imagesTr").iterdir())) == 6 * len(ds["modalities"])
    logs = "".join(p.read_text() for p in (work / "results/logs" / name).rglob("*.log"))
    assert "no masks: choice gate = " in logs and "from the config's default" in logs
    assert not (work / f"results/{name}/metrics.csv").exists()


@pytest.mark.slow
def test_own_data_example_passes_nnunet_v2_integrity_check(example: tuple[Path, str, dict], capsys) -> None:
    integrity = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity",
                                    reason="nnunetv2 is not installed (pip install nnunetv2 with the CPU torch pin)")
    work, name, ds = example
    folder = work / f"results/{name}/nnunet/Dataset{ds['nnunet']['id']:03d}_{ds['nnunet']['name']}"
    integrity.verify_dataset_integrity(str(folder), num_processes=1)
    assert "WARNING" not in capsys.readouterr().out
