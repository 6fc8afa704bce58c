"""Dataset layouts: which cases a dataset root holds and where each case's files are.

Layouts
-------
``brats`` / ``synthetic``
    ``<root>/<case>/<case>_{modality}.nii.gz`` and ``<root>/<case>/<case>_seg.nii.gz`` (``.nii`` too).
    BraTS 2018-2021 use this naming (``BraTS2021_00000_flair.nii.gz``, ``Brats18_CBICA_AAB_1_t1ce.nii.gz``);
    the synthetic phantom (:mod:`cldf.data.phantom`) is written in it with case ids ``Synth_000``, ...
``flare``
    ``<root>/TrainingImg/<case>_0000.nii.gz`` (CT) and ``<root>/TrainingMask/<case>.nii.gz`` (labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cldf.io.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
FLARE_IMAGES = "TrainingImg"
FLARE_MASKS = "TrainingMask"
FLARE_IMAGE_SUFFIX = "_0000"

_WHERE_TO_PUT = {
    "brats": "put the BraTS 2021 training data there as <root>/BraTS2021_XXXXX/BraTS2021_XXXXX_"
    "{flair,t1,t1ce,t2,seg}.nii.gz (or point the key at another BraTS-layout directory)",
    "flare": "put the FLARE21 training data there as <root>/TrainingImg/<case>_0000.nii.gz and "
    "<root>/TrainingMask/<case>.nii.gz",
    "synthetic": "generate it first (the workflow's `phantom` rule)",
}


def synthetic_case_id(index: int) -> str:
    """Case id of the ``index``-th phantom case: ``Synth_000``, ``Synth_001``, ..."""
    return f"Synth_{index:03d}"


def _root(ds: Mapping[str, Any]) -> Path:
    root = Path(ds["root"])
    if not root.is_dir():
        raise DataError(
            f"dataset root {root} does not exist (config key datasets.{ds['name']}.root); "
            f"{_WHERE_TO_PUT[ds['layout']]}"
        )
    return root


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _limit(ds: Mapping[str, Any], cases: list[str]) -> list[str]:
    max_cases = ds.get("max_cases")
    return cases[: int(max_cases)] if max_cases else cases


def list_cases(ds: Mapping[str, Any]) -> list[str]:
    """Sorted case ids of dataset ``ds`` (the first ``max_cases`` when set), from directory listings only."""
    layout = ds["layout"]
    if layout == "synthetic":
        return _limit(ds, [synthetic_case_id(i) for i in range(int(ds["phantom"]["n_cases"]))])
    root = _root(ds)
    if layout == "brats":
        cases = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not cases:
            raise DataError(
                f"dataset root {root} (config key datasets.{ds['name']}.root) holds no case directories; "
                f"expected <root>/<case>/<case>_{{{','.join(ds['modalities'])},seg}}.nii.gz"
            )
    elif layout == "flare":
        images = root / FLARE_IMAGES
        if not images.is_dir():
            raise DataError(
                f"{images} does not exist: a FLARE root (config key datasets.{ds['name']}.root) needs "
                f"{FLARE_IMAGES}/ and {FLARE_MASKS}/"
            )
        stems = (_strip_nifti(p.name) for p in images.iterdir())
        cases = sorted(
            s[: -len(FLARE_IMAGE_SUFFIX)] for s in stems if s is not None and s.endswith(FLARE_IMAGE_SUFFIX)
        )
        if not cases:
            raise DataError(f"{images} holds no <case>{FLARE_IMAGE_SUFFIX}.nii.gz files")
    else:
        raise DataError(f"config key datasets.{ds['name']}.layout: unknown layout {layout!r}")
    return _limit(ds, cases)


def _find_nifti(directory: Path, stem: str) -> Path:
    for suffix in NIFTI_SUFFIXES:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise DataError(f"missing file {directory / (stem + NIFTI_SUFFIXES[0])} (or .nii)")


def case_files(ds: Mapping[str, Any], case_id: str) -> dict[str, Path]:
    """Files of one case: ``{modality: path, ..., "seg": path}``; a missing file is a :class:`DataError`."""
    root = _root(ds)
    if ds["layout"] in ("brats", "synthetic"):
        folder = root / case_id
        files = {m: _find_nifti(folder, f"{case_id}_{m}") for m in ds["modalities"]}
        files["seg"] = _find_nifti(folder, f"{case_id}_seg")
        return files
    if ds["layout"] == "flare":
        if len(ds["modalities"]) != 1:
            raise DataError(
                f"config key datasets.{ds['name']}.modalities: the FLARE layout has one CT channel, "
                f"got {ds['modalities']}"
            )
        return {
            ds["modalities"][0]: _find_nifti(root / FLARE_IMAGES, f"{case_id}{FLARE_IMAGE_SUFFIX}"),
            "seg": _find_nifti(root / FLARE_MASKS, case_id),
        }
    raise DataError(f"config key datasets.{ds['name']}.layout: unknown layout {ds['layout']!r}")
