"""The synthetic phantom (cldf.data.phantom): layout, determinism, tumour signal, difficulty."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cldf.atomic import MARKER
from cldf.config import DEFAULT_CONFIG, dataset_settings, load_config
from cldf.data.phantom import generate_phantom
from cldf.data.splits import assign_splits
from cldf.io.layouts import list_cases
from cldf.io.nifti import read_case

MODALITIES = ("flair", "t1", "t1ce", "t2")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, float]:
    """The default synthetic dataset (40 cases of 64 × 64 × 12) and the seconds it took to generate."""
    ds = dataset_settings(load_config(DEFAULT_CONFIG), "synthetic")
    ds["root"] = str(tmp_path_factory.mktemp("phantom") / "raw")
    start = time.perf_counter()
    generate_phantom(ds["root"], ds["phantom"]["n_cases"], ds["phantom"]["shape"], ds["phantom"]["seed"])
    return ds, time.perf_counter() - start


def test_layout_and_reader(phantom) -> None:
    ds, seconds = phantom
    root = Path(ds["root"])
    assert sorted(p.name for p in root.iterdir()) == [MARKER, *list_cases(ds)]  # marked as made by cldf
    assert sorted(p.name for p in (root / "Synth_000").iterdir()) == sorted(
        f"Synth_000_{m}.nii.gz" for m in (*MODALITIES, "seg")
    )
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    img = nib.load(str(root / "Synth_000/Synth_000_flair.nii.gz"))
    assert img.shape == (64, 64, 12) and img.get_data_dtype() == np.int16
    case = read_case(ds, "Synth_000")
    assert case.image.shape == (4, 64, 64, 12) and nib.aff2axcodes(case.canonical_affine) == ("R", "A", "S")
    assert seconds < 60  # about 8 s on one free core


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_phantom(tmp_path / name, n_cases=2, shape=(32, 32, 12), seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert len(files) == 10
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_labels_and_tumour_free_cases(phantom) -> None:
    ds, _ = phantom
    cases = [read_case(ds, c) for c in list_cases(ds)]
    free = [c.id for c in cases if not c.seg.any()]
    assert len(free) == len(cases) // 10
    for case in cases:
        assert set(np.unique(case.seg).tolist()) <= {0, 1, 2, 4}
        brain = case.image.max(axis=0) > 0
        assert not case.seg[~brain].any() and np.all(case.image[:, ~brain] == 0)
    sizes = sorted(int((c.seg > 0).sum()) for c in cases if c.seg.any())
    assert sizes[-1] > 10 * sizes[0]  # small to large tumours


def test_tumour_signal_is_present_but_imperfect(phantom) -> None:
    ds, _ = phantom
    aucs, enhancing = [], []
    for case_id in list_cases(ds):
        case = read_case(ds, case_id)
        if not case.seg.any():
            continue
        brain = case.image.max(axis=0) > 0
        flair = case.image[0][brain]
        aucs.append(roc_auc_score(case.seg[brain] > 0, flair))
        if (case.seg == 4).any() and (case.seg == 1).any():
            enhancing.append(case.image[2][case.seg == 4].mean() > case.image[2][case.seg == 1].mean())
    aucs = np.asarray(aucs)
    assert np.median(aucs) > 0.7  # oedema is FLAIR-hyperintense
    assert aucs.max() < 0.99  # but a FLAIR threshold never separates tumour from tissue cleanly
    assert np.mean(enhancing) > 0.5  # T1ce: enhancing rim brighter than necrosis


def test_the_test_split_holds_at_least_eight_tumour_cases(phantom) -> None:
    ds, _ = phantom
    split = assign_splits(list_cases(ds), ds["split"])
    tumours = [c for c in list_cases(ds) if split[c] == "test" and read_case(ds, c).seg.any()]
    assert len(tumours) >= 8


def test_healthy_structures_are_as_bright_as_oedema_in_flair(phantom) -> None:
    """Mimics: in tumour-free cases part of the brain is as FLAIR-bright as the oedema of tumour cases,
    so a FLAIR threshold marks healthy tissue; and each tumour slice's FLAIR Otsu mask is imperfect."""
    ds, _ = phantom
    cases = [read_case(ds, c) for c in list_cases(ds)]
    oedema = np.concatenate([c.image[0][c.seg == 2] for c in cases if (c.seg == 2).any()])
    level = np.median(oedema)
    for case in (c for c in cases if not c.seg.any()):
        brain = case.image.max(axis=0) > 0
        assert (case.image[0][brain] > level).mean() > 0.01, case.id
