"""Slicing, labels, splits, gathering and the inverse geometry (cldf.data) on real data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cldf.config import DEFAULT_CONFIG, dataset_settings, load_config
from cldf.data.geometry import to_original
from cldf.data.slices import build_shard, gather, slice_labels
from cldf.data.splits import assign_splits
from cldf.io.errors import DataError
from cldf.io.layouts import case_files, list_cases
from cldf.store import SliceStore, StoreError, TestTruth, open_store, read_ground_truth


ONE_CASE = {"val_fraction": 0.0, "test_fraction": 0.0, "seed": 0}  # one case can only be a training case


def settings(name: str, **overrides) -> dict:
    ds = dataset_settings(load_config(DEFAULT_CONFIG), name)
    ds.update(overrides)
    return ds


@pytest.fixture(scope="module")
def brats_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """Two BraTS 2018 cases sliced at 64 × 64, built as two shards gathered in reverse order."""
    out = tmp_path_factory.mktemp("brats")
    ds = settings("brats18_shared", root=str(shared_data / "brats18"), image_size=64, max_cases=2,
                  split={"val_fraction": 0.0, "test_fraction": 0.5, "seed": 0})
    ids = list_cases(ds)
    build_shard(ds, ids[1:], ids, out / "s1")
    build_shard(ds, ids[:1], ids, out / "s0")
    gather([out / "s1", out / "s0"], out / "slices", out / "truth", out / "manifest.csv", out / "skipped.csv",
           ds["split"])
    return ds, out / "slices", out / "manifest.csv"


def test_slice_store_layout(brats_store) -> None:
    ds, path, _ = brats_store
    store = SliceStore(path)
    assert store.image_size == 64 and store.modalities == ["flair", "t1", "t1ce", "t2"]
    images = store.images(np.arange(store.n))
    assert images.shape == (store.n, 4, 64, 64) and images.min() >= -1 and images.max() <= 1
    body = store.body(np.arange(store.n))
    assert np.all(images.transpose(1, 0, 2, 3)[:, ~body] <= -1 + 1e-3)  # outside the body: background
    assert np.all(body.mean(axis=(1, 2)) >= ds["min_body_fraction"])
    group = open_store(path)
    np.testing.assert_array_equal(group["slice_ids"][:], np.arange(store.n))
    order = np.lexsort((store.slice_index, store.case_index))
    np.testing.assert_array_equal(order, np.arange(store.n))  # ordered by (case, slice)
    assert [c["id"] for c in store.cases] == list_cases(ds) == store.attrs["case_ids"]


def test_labels_follow_the_rule(brats_store, shared_data: Path) -> None:
    ds, path, manifest_csv = brats_store
    store = SliceStore(path)
    manifest = pd.read_csv(manifest_csv)
    assert len(manifest) == store.n
    np.testing.assert_array_equal(manifest["label"], store.labels)
    for k, case_id in enumerate(list_cases(ds)):
        seg = np.asarray(nib.load(str(case_files(ds, case_id)["seg"])).dataobj) > 0  # LPS: z is canonical z
        fraction = seg.sum(axis=(0, 1)) / (240 * 240)
        rows = store.indices(cases=[k])
        expected = slice_labels(fraction[store.slice_index[rows]], ds["positive_min_fraction"])
        np.testing.assert_array_equal(store.labels[rows], expected)
        np.testing.assert_allclose(manifest["target_fraction"][rows], fraction[store.slice_index[rows]], rtol=1e-4)
        assert set(store.labels[rows].tolist()) == {-1, 0, 1}
    masks = _masks(path, np.arange(store.n))
    assert not masks[store.labels == 0].any() and masks[store.labels == 1].any(axis=(1, 2)).all()


def _masks(path: Path, rows: np.ndarray) -> np.ndarray:
    """Ground truth of any rows: training/validation ones from the slice store, test ones from the test truth."""
    store = SliceStore(path)
    test = store.split[rows] == "test"
    out = np.zeros((len(rows), store.image_size, store.image_size), np.uint8)
    if (~test).any():
        out[~test] = read_ground_truth(path, rows[~test])
    if test.any():
        out[test] = TestTruth(path.parent / "truth").masks(rows[test])
    return out


def test_test_masks_live_in_the_test_truth_only(brats_store) -> None:
    _, path, _ = brats_store
    store = SliceStore(path)
    test = store.indices(split="test")
    assert len(test) > 0
    truth = TestTruth(path.parent / "truth")
    assert np.array_equal(truth.slice_ids, test) and np.array_equal(truth.labels, store.labels[test])
    assert truth.masks(test).any()
    with pytest.raises(StoreError, match="only evaluation reads the test truth"):
        read_ground_truth(path, test[:3])
    stored = np.asarray(open_store(path)["ground_truth/masks"][:])
    assert not stored[test].any()  # the slice store keeps no test mask


def test_no_case_in_two_splits(shared_data: Path) -> None:
    ds = settings("brats18_shared", root=str(shared_data / "brats18"))
    ids = list_cases(ds)
    split = assign_splits(ids, ds["split"])
    assert set(split) == set(ids) and sorted(split.values()).count("test") == 4
    assert split == assign_splits(list(reversed(ids)), ds["split"])
    assert assign_splits(ids, {**ds["split"], "seed": 1}) != split


def test_split_rules() -> None:
    ids = [f"c{i}" for i in range(5)]
    cfg = {"val_fraction": 0.0, "test_fraction": 0.05, "seed": 0, "val_cases": [], "test_cases": []}
    assert list(assign_splits(ids, cfg).values()).count("test") == 1  # at least one test case
    explicit = assign_splits(ids, {**cfg, "val_cases": ["c1"], "test_cases": ["c2", "c3"]})
    assert explicit == {"c0": "train", "c1": "val", "c2": "test", "c3": "test", "c4": "train"}
    with pytest.raises(DataError, match=r"unknown case\(s\) \['c9'\]"):
        assign_splits(ids, {**cfg, "test_cases": ["c9"]})
    with pytest.raises(DataError, match="both val_cases and test_cases"):
        assign_splits(ids, {**cfg, "val_cases": ["c1"], "test_cases": ["c1"]})


def test_store_splits_are_per_case(brats_store) -> None:
    _, path, _ = brats_store
    store = SliceStore(path)
    for k, meta in enumerate(store.cases):
        assert set(store.split[store.case_index == k].tolist()) == {meta["split"]}


def test_round_trip_to_original_geometry(brats_store, shared_data: Path, tmp_path: Path) -> None:
    ds, path, _ = brats_store
    case_id = list_cases(ds)[0]
    original = nib.load(str(case_files(ds, case_id)["seg"]))
    truth = np.asarray(original.dataobj) > 0

    store = SliceStore(path)  # 64 × 64: the mask survives down- and up-sampling well
    rows = store.indices(cases=[0])
    img = to_original(_masks(path, rows), store.slice_index[rows], store.cases[0])
    assert img.shape == original.shape and np.allclose(img.affine, original.affine)
    back = np.asarray(img.dataobj).astype(bool)
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.8

    full = {**ds, "image_size": 240, "max_cases": 1}  # no resize: exact on kept slices
    build_shard(full, [case_id], [case_id], tmp_path / "s")
    gather([tmp_path / "s"], tmp_path / "slices", tmp_path / "truth", tmp_path / "m.csv", tmp_path / "k.csv", ONE_CASE)
    store = SliceStore(tmp_path / "slices")
    rows = store.indices(cases=[0])
    back = np.asarray(to_original(_masks(tmp_path / "slices", rows), store.slice_index[rows], store.cases[0]).dataobj)
    kept = store.slice_index[rows]
    np.testing.assert_array_equal(back[:, :, kept].astype(bool), truth[:, :, kept])


def test_flare_kidney_slices(shared_data: Path, tmp_path: Path) -> None:
    ds = settings("flare21_kidney", root=str(shared_data / "flare_like"), image_size=32, ambiguous_slices="drop")
    ids = list_cases(ds)
    build_shard(ds, ids, ids, tmp_path / "s")
    gather([tmp_path / "s"], tmp_path / "slices", tmp_path / "truth", tmp_path / "m.csv", tmp_path / "k.csv", ONE_CASE)
    store = SliceStore(tmp_path / "slices")
    assert store.channels == 1 and set(store.labels.tolist()) == {0, 1}  # ambiguous dropped
    meta = store.cases[0]
    assert meta["square_size"] == 122 and meta["pad"] == [0, 10]
    masks = read_ground_truth(tmp_path / "slices", np.arange(store.n))
    assert masks[store.labels == 1].any(axis=(1, 2)).all() and not masks[store.labels == 0].any()
    rows = store.indices(labels=[1])
    img = to_original(masks[rows], store.slice_index[rows], meta)
    truth = np.asarray(nib.load(str(case_files(ds, ids[0])["seg"])).dataobj) == 2
    back = np.asarray(img.dataobj).astype(bool)
    kept = store.slice_index[rows]
    dice = 2 * (back[:, :, kept] & truth[:, :, kept]).sum() / (back[:, :, kept].sum() + truth[:, :, kept].sum())
    assert dice > 0.7  # 3 mm CT at 32 × 32: small organ, coarse grid


def test_one_scan_as_interleaved_pseudo_cases(shared_data: Path, tmp_path: Path) -> None:
    """``slabs``: the shared CT becomes 4 pseudo-cases that partition its slices in dealt blocks of 5, each with
    kidney slices, split like cases; the same scan without slabs keeps exactly the same slices."""
    ds = settings("flare21_kidney_shared", root=str(shared_data / "flare_like"), image_size=32)
    ids = list_cases(ds)
    assert ids == [f"totalseg_example_slab{k}" for k in range(4)]
    build_shard(ds, ids, ids, tmp_path / "s")
    gather([tmp_path / "s"], tmp_path / "slices", tmp_path / "truth", tmp_path / "m.csv", tmp_path / "k.csv", ds["split"])
    store = SliceStore(tmp_path / "slices")
    per_case = [store.slice_index[store.indices(cases=[k])] for k in range(4)]
    for k, z in enumerate(per_case):
        assert set((z // 5) % 4) == {k}  # blocks of 5 slices dealt in turn
        assert (store.labels[store.indices(cases=[k])] == 1).any()  # every pseudo-case spans the kidney
    whole = settings("flare21_kidney", root=str(shared_data / "flare_like"), image_size=32)
    build_shard(whole, list_cases(whole), list_cases(whole), tmp_path / "w")
    gather([tmp_path / "w"], tmp_path / "whole", tmp_path / "t2", tmp_path / "m2.csv", tmp_path / "k2.csv", ONE_CASE)
    np.testing.assert_array_equal(np.sort(np.concatenate(per_case)), SliceStore(tmp_path / "whole").slice_index)
    assert sorted(m["split"] for m in store.cases) == ["test", "train", "train", "val"]
    predict = {**ds, "predict": True}  # new scans are never cut
    assert list_cases(predict) == ["totalseg_example"]


def test_slabs_with_a_labels_table_is_a_config_error() -> None:
    from cldf.config import ConfigError

    overrides = {"datasets": {"flare21_kidney_shared": {"labels_csv": "labels.csv"}}}
    with pytest.raises(ConfigError, match="datasets.flare21_kidney_shared.slabs"):
        load_config(DEFAULT_CONFIG, overrides)
