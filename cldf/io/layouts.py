"""Dataset layouts: which cases a dataset root holds and where each case's files are.

Layouts
-------
``brats`` / ``synthetic``
    ``<root>/<case>/<case>_{modality}.nii.gz`` and ``<root>/<case>/<case>_seg.nii.gz`` (``.nii`` too).
    BraTS 2018-2021 use this naming (``BraTS2021_00000_flair.nii.gz``, ``Brats18_CBICA_AAB_1_t1ce.nii.gz``);
    the synthetic phantom (:mod:`cldf.data.phantom`) is written in it with case ids ``Synth_000``, ...
``flare``
    ``<root>/TrainingImg/<case>_0000.nii.gz`` (CT) and ``<root>/TrainingMask/<case>.nii.gz`` (labels).

Slabs
-----
With ``slabs: {count: n, block: b}`` a dataset with too few scans for case-level splits reads each scan
as ``n`` pseudo-cases ``<case>_slab0`` ... ``<case>_slab{n-1}``: the scan's slices in blocks of ``b``
consecutive slices (along the slicing axis), dealt to the pseudo-cases in turn (block ``j`` to
``j mod n``), so every pseudo-case spans the whole scan and sees every organ level; the splits are drawn
over pseudo-cases. Neighbouring blocks of one patient are alike, so a test pseudo-case is no held-out
patient: this checks that the pipeline runs on a single scan, it does not measure quality. New scans to
predict are never cut.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cldf.atomic import MARKER
from cldf.io.errors import DataError

LOG = logging.getLogger("cldf.io")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
FLARE_IMAGES = "TrainingImg"
FLARE_MASKS = "TrainingMask"
FLARE_IMAGE_SUFFIX = "_0000"
SLAB = "_slab"

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


def masks_optional(ds: Mapping[str, Any]) -> bool:
    """Whether a case may come without its mask file: the dataset's labels come from a table
    (``labels_csv``), or ``ds`` describes new scans to predict (``predict``, set by the plan)."""
    return bool(ds.get("labels_csv") or ds.get("predict"))


def _root(ds: Mapping[str, Any]) -> Path:
    root = Path(ds["root"])
    if not root.is_dir():
        key, hint = ("predict_root", "put the new scans there, in the dataset's layout") if ds.get("predict") else \
            ("root", _WHERE_TO_PUT[ds["layout"]])
        raise DataError(f"dataset root {root} does not exist (config key datasets.{ds['name']}.{key}); {hint}")
    return root


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _limit(ds: Mapping[str, Any], cases: list[str]) -> list[str]:
    max_cases = ds.get("max_cases")
    return cases[: int(max_cases)] if max_cases else cases


def _is_brats_case(entry: Path) -> bool:
    """A BraTS case is a directory ``<case>`` holding at least one ``<case>_*.nii[.gz]`` file."""
    if not entry.is_dir() or entry.name.startswith("."):
        return False
    prefix = entry.name + "_"
    return any(p.name.startswith(prefix) and _strip_nifti(p.name) is not None for p in entry.iterdir())


def _ignore(entry: Path, why: str) -> None:
    if entry.name != MARKER:
        LOG.warning("ignoring %s: %s", entry, why)


def _brats_cases(ds: Mapping[str, Any], root: Path) -> list[str]:
    cases = []
    for entry in sorted(root.iterdir()):
        if _is_brats_case(entry):
            cases.append(entry.name)
        else:
            _ignore(entry, f"not a case directory (no {entry.name}_<modality>.nii.gz inside)")
    if not cases:
        raise DataError(
            f"dataset root {root} (config key datasets.{ds['name']}.root) holds no case directories; "
            f"expected <root>/<case>/<case>_{{{','.join(ds['modalities'])},seg}}.nii.gz"
        )
    return cases


def _flare_cases(ds: Mapping[str, Any], root: Path) -> list[str]:
    images = root / FLARE_IMAGES
    if not images.is_dir():
        raise DataError(
            f"{images} does not exist: a FLARE root (config key datasets.{ds['name']}.root) needs "
            f"{FLARE_IMAGES}/ and {FLARE_MASKS}/"
        )
    cases = []
    for entry in sorted(images.iterdir()):
        stem = _strip_nifti(entry.name)
        if entry.is_file() and stem is not None and stem.endswith(FLARE_IMAGE_SUFFIX) and not stem.startswith("."):
            cases.append(stem[: -len(FLARE_IMAGE_SUFFIX)])
        else:
            _ignore(entry, f"not a <case>{FLARE_IMAGE_SUFFIX}.nii.gz image")
    if not cases:
        raise DataError(f"{images} holds no <case>{FLARE_IMAGE_SUFFIX}.nii.gz files")
    return cases


def slab_count(ds: Mapping[str, Any]) -> int:
    """Pseudo-cases per scan: ``ds["slabs"]["count"]`` (1 when unset, and always 1 for new scans to predict)."""
    return 1 if ds.get("predict") or not ds.get("slabs") else int(ds["slabs"]["count"])


def slab_of(ds: Mapping[str, Any], case_id: str) -> tuple[str, int] | None:
    """``(scan id, k)`` of the pseudo-case id ``<scan>_slab<k>``; None for a dataset without slabs."""
    n = slab_count(ds)
    if n == 1:
        return None
    scan, sep, k = case_id.rpartition(SLAB)
    if not sep or not k.isdigit() or int(k) >= n:
        raise DataError(f"case id {case_id!r} is not a pseudo-case <case>{SLAB}<k> (k < {n}) of dataset {ds['name']}")
    return scan, int(k)


def slab_slices(ds: Mapping[str, Any], k: int, depth: int) -> np.ndarray:
    """bool (depth,): the slices of pseudo-case ``k`` of a scan ``depth`` slices deep (blocks dealt in turn)."""
    block, n = int(ds["slabs"]["block"]), slab_count(ds)
    return (np.arange(depth) // block) % n == k


def _scan_ids(ds: Mapping[str, Any]) -> list[str]:
    layout = ds["layout"]
    if layout == "synthetic":
        return _limit(ds, [synthetic_case_id(i) for i in range(int(ds["phantom"]["n_cases"]))])
    if layout == "brats":
        return _limit(ds, _brats_cases(ds, _root(ds)))
    if layout == "flare":
        return _limit(ds, _flare_cases(ds, _root(ds)))
    raise DataError(f"config key datasets.{ds['name']}.layout: unknown layout {layout!r}")


def list_cases(ds: Mapping[str, Any]) -> list[str]:
    """Sorted case ids of dataset ``ds`` (the first ``max_cases`` scans when set), from directory listings only.

    Entries that are not cases (``__MACOSX/``, ``.DS_Store``, a ``README.txt``, a folder without
    ``<case>_*.nii.gz`` files) are ignored with a warning on the ``cldf.io`` logger, never read as cases.
    With ``slabs`` each scan gives ``slabs.count`` pseudo-cases ``<case>_slab0`` ... (module docstring).
    """
    scans = _scan_ids(ds)
    n = slab_count(ds)
    return scans if n == 1 else [f"{scan}{SLAB}{k}" for scan in scans for k in range(n)]


def _find_nifti(directory: Path, stem: str, missing_ok: bool) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return path
    if missing_ok:
        return None
    raise DataError(f"missing file {directory / (stem + NIFTI_SUFFIXES[0])} (or .nii)")


def _expected_files(ds: Mapping[str, Any], case_id: str) -> dict[str, tuple[Path, str]]:
    """``{modality or "seg": (directory, file stem)}`` of one case (of its scan, for a slab)."""
    slab = slab_of(ds, case_id)
    case_id = case_id if slab is None else slab[0]
    root = _root(ds)
    if ds["layout"] in ("brats", "synthetic"):
        folder = root / case_id
        return {name: (folder, f"{case_id}_{name}") for name in [*ds["modalities"], "seg"]}
    if ds["layout"] == "flare":
        if len(ds["modalities"]) != 1:
            raise DataError(
                f"config key datasets.{ds['name']}.modalities: the FLARE layout has one CT channel, "
                f"got {ds['modalities']}"
            )
        return {
            ds["modalities"][0]: (root / FLARE_IMAGES, f"{case_id}{FLARE_IMAGE_SUFFIX}"),
            "seg": (root / FLARE_MASKS, case_id),
        }
    raise DataError(f"config key datasets.{ds['name']}.layout: unknown layout {ds['layout']!r}")


def case_files(ds: Mapping[str, Any], case_id: str, missing_ok: bool = False) -> dict[str, Path]:
    """Files of one case: ``{modality: path, ..., "seg": path}``.

    A missing file is a :class:`DataError` naming it, or, with ``missing_ok``, left out of the result; the
    mask is left out when missing where masks are optional (:func:`masks_optional`).
    """
    optional = {"seg"} if masks_optional(ds) else set()
    found = {name: _find_nifti(folder, stem, missing_ok or name in optional)
             for name, (folder, stem) in _expected_files(ds, case_id).items()}
    return {name: path for name, path in found.items() if path is not None}
