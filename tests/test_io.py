"""Readers, layouts and input validation (cldf.io), and the errors bad inputs produce."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cldf.config import DEFAULT_CONFIG, dataset_settings, load_config
from cldf.data.phantom import generate_phantom
from cldf.data.slices import build_shard, gather
from cldf.io.errors import DataError
from cldf.io.layouts import case_files, list_cases
from cldf.io.nifti import read_case


def settings(name: str, **overrides) -> dict:
    ds = dataset_settings(load_config(DEFAULT_CONFIG), name)
    ds.update(overrides)
    return ds


# --- real data -----------------------------------------------------------------------------------


def test_brats_layout_lists_sorted_cases(shared_data: Path) -> None:
    ds = settings("brats18_shared", root=str(shared_data / "brats18"))
    cases = list_cases(ds)
    assert len(cases) == 20 and cases == sorted(cases)
    assert list_cases({**ds, "max_cases": 3}) == cases[:3]
    files = case_files(ds, cases[0])
    assert set(files) == {"flair", "t1", "t1ce", "t2", "seg"}
    assert files["t1ce"].name == f"{cases[0]}_t1ce.nii.gz"


def test_read_brats_case_is_canonical_and_matches_nibabel(shared_data: Path) -> None:
    ds = settings("brats18_shared", root=str(shared_data / "brats18"))
    case_id = list_cases(ds)[0]
    case = read_case(ds, case_id)
    assert case.image.shape == (4, 240, 240, 155) and case.image.dtype == np.float32
    assert case.seg.shape == (240, 240, 155) and case.seg.dtype == np.uint8
    assert nib.aff2axcodes(case.canonical_affine) == ("R", "A", "S")
    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")  # BraTS files are stored LPS
    direct_seg = nib.load(str(case_files(ds, case_id)["seg"]))
    values, counts = np.unique(np.asarray(direct_seg.dataobj), return_counts=True)
    got_values, got_counts = np.unique(case.seg, return_counts=True)
    assert values.tolist() == got_values.tolist() and counts.tolist() == got_counts.tolist()
    canonical_t1ce = nib.as_closest_canonical(nib.load(str(case_files(ds, case_id)["t1ce"])))
    np.testing.assert_array_equal(case.image[2], np.asarray(canonical_t1ce.dataobj, dtype=np.float32))
    np.testing.assert_array_equal(case.seg, np.asarray(nib.as_closest_canonical(direct_seg).dataobj))
    assert case.shape == (240, 240, 155) and case.spacing == (1.0, 1.0, 1.0)


def test_read_flare_case(shared_data: Path) -> None:
    ds = settings("flare21_kidney", root=str(shared_data / "flare_like"))
    assert list_cases(ds) == ["totalseg_example"]
    case = read_case(ds, "totalseg_example")
    assert case.image.shape == (1, 122, 101, 112)
    assert nib.aff2axcodes(case.canonical_affine) == ("R", "A", "S")
    direct = np.asarray(nib.load(str(shared_data / "flare_like/TrainingMask/totalseg_example.nii.gz")).dataobj)
    assert np.bincount(case.seg.ravel()).tolist() == np.bincount(direct.ravel()).tolist()
    assert set(np.unique(case.seg).tolist()) == {0, 1, 2, 3}
    assert case.image.min() < -500  # HU (air), not rescaled


def test_synthetic_case_ids_need_no_disk() -> None:
    ds = settings("synthetic", root="/nonexistent/phantom")
    assert list_cases(ds) == [f"Synth_{i:03d}" for i in range(ds["phantom"]["n_cases"])]
    assert list_cases({**ds, "max_cases": 2}) == ["Synth_000", "Synth_001"]


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.fixture()
def tiny(tmp_path: Path) -> dict:
    """A 2-case BraTS-layout dataset (phantom cases with a positive slice) under tmp_path/raw."""
    generate_phantom(tmp_path / "raw", n_cases=5, shape=(40, 40, 16), seed=3)
    ds = settings("brats21", root=str(tmp_path / "raw"), image_size=32, min_body_fraction=0.0)
    keep = [c for c in list_cases(ds) if (read_case(ds, c).seg > 0).sum(axis=(0, 1)).max() > 0.01 * 40 * 40][:2]
    assert len(keep) == 2
    for c in set(list_cases(ds)) - set(keep):
        shutil.rmtree(tmp_path / "raw" / c)
    return ds


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    old = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), str(path))


def _flair(ds: dict, case: str) -> Path:
    return Path(ds["root"]) / case / f"{case}_flair.nii.gz"


def _seg(ds: dict, case: str) -> Path:
    return Path(ds["root"]) / case / f"{case}_seg.nii.gz"


def _missing_modality(ds, case):
    _flair(ds, case).unlink()


def _corrupt(ds, case):
    raw = gzip.decompress(_flair(ds, case).read_bytes())
    _flair(ds, case).write_bytes(gzip.compress(raw[:400]))  # header survives, voxel data truncated


def _not_gzip(ds, case):
    _flair(ds, case).write_bytes(b"this is not a NIfTI file")


def _shape_mismatch(ds, case):
    data = np.asarray(nib.load(str(_flair(ds, case))).dataobj)
    _rewrite(_flair(ds, case), data[:, :, :-1])


def _affine_mismatch(ds, case):
    img = nib.load(str(_flair(ds, case)))
    affine = img.affine.copy()
    affine[0, 3] += 5.0
    _rewrite(_flair(ds, case), np.asarray(img.dataobj), affine)


def _nan_voxels(ds, case):
    data = np.asarray(nib.load(str(_flair(ds, case))).dataobj).astype(np.float32)
    data[5, 5, 5] = np.nan
    _rewrite(_flair(ds, case), data)


def _bad_label(ds, case):
    seg = np.asarray(nib.load(str(_seg(ds, case))).dataobj).copy()
    seg[seg == 2] = 3
    _rewrite(_seg(ds, case), seg)


BAD_INPUTS = {
    "missing modality": (_missing_modality, r"missing file .*_flair\.nii\.gz"),
    "corrupt gzip": (_corrupt, r"_flair\.nii\.gz: unreadable NIfTI"),
    "not a nifti": (_not_gzip, r"_flair\.nii\.gz: unreadable NIfTI"),
    "shape mismatch": (_shape_mismatch, r"_flair\.nii\.gz: shape .* differs from the mask"),
    "affine mismatch": (_affine_mismatch, r"_flair\.nii\.gz: affine differs from the mask"),
    "NaN voxels": (_nan_voxels, r"_flair\.nii\.gz: 1 NaN/Inf voxel"),
    "unexpected label": (_bad_label, r"_seg\.nii\.gz: unexpected label value\(s\) \[3\]"),
}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "raw")


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises_one_line_error_and_writes_nothing(tiny: dict, tmp_path: Path, kind: str) -> None:
    damage, pattern = BAD_INPUTS[kind]
    cases = list_cases(tiny)
    damage(tiny, cases[1])
    out = tmp_path / "shard"
    with pytest.raises(DataError, match=pattern) as info:
        build_shard(tiny, cases, cases, out)
    assert "\n" not in str(info.value) and cases[1] in str(info.value)
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, DataError)
    assert _leftovers(tmp_path) == []


def test_case_without_positive_slice_is_valid_data(tiny: dict, tmp_path: Path) -> None:
    """Like Brats18_CBICA_ARZ_1: the target never covers more than positive_min_fraction of a slice."""
    cases = list_cases(tiny)
    seg = np.asarray(nib.load(str(_seg(tiny, cases[1]))).dataobj).copy()
    small = np.zeros_like(seg)
    small[20, 20, 5] = 1  # one voxel of tumour: an ambiguous slice, no positive one
    _rewrite(_seg(tiny, cases[1]), small)
    build_shard(tiny, cases, cases, tmp_path / "shard")
    gather([tmp_path / "shard"], tmp_path / "slices", tmp_path / "truth", tmp_path / "manifest.csv", tmp_path / "skipped.csv",
           {"val_fraction": 0.0, "test_fraction": 0.5, "seed": 0})
    from cldf.store import SliceStore

    store = SliceStore(tmp_path / "slices")
    labels = store.labels[store.case_index == 1]
    assert len(labels) > 0 and not (labels == 1).any() and (labels == -1).sum() == 1 and (labels == 0).any()
    assert (tmp_path / "skipped.csv").read_text() == "case,reason\n"


def _missing_mask(ds, case):
    _seg(ds, case).unlink()


SKIPPED = {
    "missing modality": (_missing_modality, "missing file"),
    "missing mask": (_missing_mask, "missing file"),
    "NaN voxels": (_nan_voxels, "NaN/Inf"),
    "unexpected label": (_bad_label, "unexpected label value"),
}


@pytest.mark.parametrize("kind", list(SKIPPED))
def test_bad_case_is_skipped_logged_and_listed(
    tiny: dict, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage, reason = SKIPPED[kind]
    cases = list_cases(tiny)
    damage(tiny, cases[0])
    ds = {**tiny, "on_bad_case": "skip"}
    build_shard(ds, cases[:1], cases, tmp_path / "s0")
    assert f"skipping case {cases[0]}" in caplog.text and reason in caplog.text
    build_shard(ds, cases[1:], cases, tmp_path / "s1")
    gather([tmp_path / "s0", tmp_path / "s1"], tmp_path / "slices", tmp_path / "truth", tmp_path / "manifest.csv",
           tmp_path / "skipped.csv", {"val_fraction": 0.0, "test_fraction": 0.0, "seed": 0})
    from cldf.store import SliceStore

    store = SliceStore(tmp_path / "slices")
    assert set(store.case_index.tolist()) == {1}
    assert reason in store.cases[0]["skipped"] and store.cases[1]["id"] == cases[1]
    assert store.cases[0]["split"] is None and store.cases[1]["split"] == "train"
    skipped = pd.read_csv(tmp_path / "skipped.csv")
    assert skipped.case.tolist() == [cases[0]] and reason in skipped.reason[0]


def test_split_is_drawn_from_kept_cases_and_an_empty_asked_split_stops(tiny: dict, tmp_path: Path) -> None:
    cases = list_cases(tiny)
    _nan_voxels(tiny, cases[0])
    ds = {**tiny, "on_bad_case": "skip"}
    build_shard(ds, cases, cases, tmp_path / "s")
    split = {"val_fraction": 0.0, "test_fraction": 0.5, "seed": 0}
    with pytest.raises(DataError) as info:  # one kept case cannot fill both train and test
        gather([tmp_path / "s"], tmp_path / "slices", tmp_path / "truth", tmp_path / "m.csv", tmp_path / "k.csv", split)
    message = str(info.value)
    assert "split 'test' is empty" in message and cases[0] in message and "NaN" in message and "\n" not in message
    assert not (tmp_path / "slices").exists()
    listed = {"val_fraction": 0.0, "test_fraction": 0.0, "seed": 0, "test_cases": [cases[0]]}
    with pytest.raises(DataError, match="split 'test' is empty"):
        gather([tmp_path / "s"], tmp_path / "slices", tmp_path / "truth", tmp_path / "m.csv", tmp_path / "k.csv", listed)
    gather([tmp_path / "s"], tmp_path / "slices", tmp_path / "truth", tmp_path / "m.csv", tmp_path / "k.csv",
           {"val_fraction": 0.0, "test_fraction": 0.0, "seed": 0})  # a split left at 0 may be empty


def test_every_case_skipped_gives_no_store(tiny: dict, tmp_path: Path) -> None:
    cases = list_cases(tiny)
    for c in cases:
        _nan_voxels(tiny, c)
    ds = {**tiny, "on_bad_case": "skip"}
    build_shard(ds, cases, cases, tmp_path / "s0")
    with pytest.raises(DataError, match="every case was skipped"):
        gather([tmp_path / "s0"], tmp_path / "slices", tmp_path / "truth", tmp_path / "manifest.csv", tmp_path / "k.csv",
               {"val_fraction": 0.0, "test_fraction": 0.0, "seed": 0})
    assert not (tmp_path / "slices").exists() and not (tmp_path / "manifest.csv").exists()


def test_stray_entries_are_ignored_with_a_log_line(tiny: dict, caplog: pytest.LogCaptureFixture) -> None:
    root = Path(tiny["root"])
    cases = list_cases(tiny)
    (root / "__MACOSX" / cases[0]).mkdir(parents=True)
    (root / "__MACOSX" / f"._{cases[0]}_flair.nii.gz").write_bytes(b"resource fork")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "README.txt").write_text("BraTS sample")
    (root / "notes").mkdir()
    with caplog.at_level("WARNING", logger="cldf.io"):
        assert list_cases(tiny) == cases
    for stray in ("__MACOSX", ".DS_Store", "README.txt", "notes"):
        assert f"ignoring {root / stray}: not a case directory" in caplog.text


def test_flare_strays_ignored_and_missing_mask_is_a_bad_case(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, masks = tmp_path / "TrainingImg", tmp_path / "TrainingMask"
    images.mkdir()
    masks.mkdir()
    volume = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4))
    for case in ("A", "B"):
        nib.save(volume, images / f"{case}_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), np.eye(4)), masks / "A.nii.gz")
    (images / ".DS_Store").write_bytes(b"\0")
    (images / "notes.txt").write_text("x")
    ds = settings("flare21_kidney", root=str(tmp_path))
    with caplog.at_level("WARNING", logger="cldf.io"):
        assert list_cases(ds) == ["A", "B"]
    assert "notes.txt: not a <case>_0000.nii.gz image" in caplog.text
    with pytest.raises(DataError, match=r"missing file .*TrainingMask/B\.nii\.gz"):
        case_files(ds, "B")
    assert set(case_files(ds, "B", missing_ok=True)) == {"ct"}


def test_missing_root_names_config_key(tmp_path: Path) -> None:
    ds = settings("brats21", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere does not exist \(config key datasets\.brats21\.root\).*BraTS2021"):
        list_cases(ds)
    with pytest.raises(DataError, match="config key datasets.flare21_kidney.root"):
        list_cases(settings("flare21_kidney", root=str(tmp_path / "nowhere")))


def test_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no case directories"):
        list_cases(settings("brats21", root=str(tmp_path)))
    with pytest.raises(DataError, match="TrainingImg does not exist"):
        list_cases(settings("flare21_kidney", root=str(tmp_path)))
    (tmp_path / "TrainingImg").mkdir()
    with pytest.raises(DataError, match="holds no <case>_0000.nii.gz"):
        list_cases(settings("flare21_kidney", root=str(tmp_path)))
