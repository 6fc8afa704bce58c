"""A synthetic BraTS-layout dataset that tests the method: 4-channel "brain MR" phantoms with tumours.

Each case is a skull-stripped ellipsoidal brain (field of view 240 × 240 × 155 mm like BraTS, stored
LPS-oriented like BraTS) with cortex, white matter, deep grey patches, sulci and ventricles, a smooth
multiplicative bias field and Rician noise. Tumours vary in size (core radius 6–30 mm, log-uniform), shape
(lumpy, elongated, or two foci) and contrast (the blend weight of tumour signal, 0.45–0.95): oedema
(label 2) around a core that is necrotic (1) with an enhancing rim (4), or non-enhancing (all 1).

Healthy structures mimic tumour in one channel each, so that no single-channel intensity threshold finds
the tumour: confluent white-matter hyperintensities and periventricular caps are as bright as oedema in
FLAIR (but normal in T1 and dimmer in T2), ventricles are as dark as the core in T1 and as bright as
oedema in T2, vessels are as bright as the enhancing rim in T1ce. About one case in ten has no tumour;
slices above and below a tumour are negative. Output is deterministic for a seed (same bytes).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from cldf.atomic import atomic_dir
from cldf.io.layouts import synthetic_case_id

FIELD_OF_VIEW_MM = (240.0, 240.0, 155.0)
# Mean intensity per tissue and modality: background, WM, GM, CSF, oedema, necrosis (1), enhancing (4).
TISSUE_MEANS = {
    "flair": (0.0, 0.50, 0.62, 0.12, 0.82, 0.70, 0.76),
    "t1": (0.0, 0.78, 0.58, 0.20, 0.50, 0.32, 0.52),
    "t1ce": (0.0, 0.72, 0.56, 0.20, 0.54, 0.30, 0.95),
    "t2": (0.0, 0.42, 0.58, 0.95, 0.82, 0.88, 0.66),
}
# Extra signal of the tumour-mimicking structures: (white-matter hyperintensities and periventricular caps,
# vessels). FLAIR-bright like oedema, but normal in T1 and dimmer than oedema in T2.
MIMICS = {"flair": (0.30, 0.0), "t1": (-0.04, 0.0), "t1ce": (0.0, 0.32), "t2": (0.14, 0.05)}
WM, GM, CSF = 1, 2, 3


def _field(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Smoothed Gaussian noise (X, Y, Z) with correlation length ``sigma_mm``, zero mean, unit std.

    Smooth fields are drawn on a grid coarsened by up to sigma/2 voxels and linearly upsampled (fast).
    """
    sigma = sigma_mm / spacing
    factor = np.maximum(1, np.floor(sigma / 2)).astype(int)
    coarse = tuple(int(np.ceil(n / k)) for n, k in zip(shape, factor))
    f = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma=sigma / factor, mode="wrap")
    if np.any(factor > 1):
        f = ndimage.zoom(f, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="nearest")
        f = f[: shape[0], : shape[1], : shape[2]]
    f -= f.mean()
    return f / (f.std() + 1e-8)


def _blur(mask: np.ndarray, sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma=sigma_mm / spacing)


def _anatomy(rng: np.random.Generator, coords: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brain tissue classes uint8 (X, Y, Z) (0 background, WM, GM, CSF), normalised depth, mimic masks."""
    shape = coords.shape[1:]
    centre = np.array(FIELD_OF_VIEW_MM) / 2 + rng.uniform(-6, 6, 3)
    radii = np.array([74.0, 90.0, 66.0]) * rng.uniform(0.9, 1.05, 3)
    r = np.sqrt(sum(((coords[k] - centre[k]) / radii[k]) ** 2 for k in range(3)))
    r = r - 0.05 * _field(rng, shape, 18.0, spacing)
    brain = r < 1.0
    depth = np.clip(1.0 - r, 0.0, 1.0)

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[brain] = WM
    tissue[(depth < 0.13 + 0.04 * _field(rng, shape, 10.0, spacing)) & brain] = GM
    tissue[(_field(rng, shape, 9.0, spacing) > 1.1) & (depth > 0.3)] = GM  # deep grey nuclei
    sulci = (_field(rng, shape, 3.0, spacing) > 1.0) & (depth < 0.12) & brain
    tissue[sulci] = CSF
    for side in (-1.0, 1.0):
        vc = centre + np.array([side * rng.uniform(8, 13), rng.uniform(-6, 6), rng.uniform(0, 8)])
        vr = np.array([5.0, 22.0, 9.0]) * rng.uniform(0.7, 1.3, 3)
        dv = np.sqrt(sum(((coords[k] - vc[k]) / vr[k]) ** 2 for k in range(3)))
        tissue[(dv < 1.0) & brain] = CSF
    wmh = (_field(rng, shape, 3.0, spacing) > 2.1) & (tissue == WM)
    confluent = _field(rng, shape, 7.0, spacing) > rng.uniform(1.2, 1.9)  # large FLAIR-bright patches
    wmh |= confluent & (tissue == WM) & (depth > 0.15)
    near_ventricles = ndimage.binary_dilation(tissue == CSF, iterations=2) & (depth > 0.3)
    if rng.random() < 0.7:  # periventricular caps
        wmh |= near_ventricles & (tissue == WM) & (_field(rng, shape, 5.0, spacing) > -0.3)
    vessels = (_field(rng, shape, 1.5, spacing) > 2.6) & brain
    return tissue, depth, wmh, vessels


def _lesion(rng: np.random.Generator, coords: np.ndarray, centre: np.ndarray, core_r: float,
            spacing: np.ndarray, stretch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Core and oedema masks (X, Y, Z) of one lumpy focus, stretched by ``stretch`` along the axes."""
    shape = coords.shape[1:]
    oedema_r = core_r * rng.uniform(1.3, 2.0)
    dist = np.sqrt(sum(((coords[k] - centre[k]) / stretch[k]) ** 2 for k in range(3)))
    core = dist / core_r + 0.35 * _field(rng, shape, core_r / 3, spacing) < 1.0
    oedema = dist / oedema_r + 0.4 * _field(rng, shape, oedema_r / 3, spacing) < 1.0
    return core, oedema


def _tumour(rng: np.random.Generator, coords: np.ndarray, spacing: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Tumour labels uint8 (X, Y, Z): 2 oedema, 1 necrosis / non-enhancing core, 4 enhancing rim.

    Core radius log-uniform in 6–30 mm; shape lumpy (1/2), elongated along a random axis (1/4) or two foci
    (1/4); the core is non-enhancing in 3 cases of 10.
    """
    candidates = np.argwhere(depth > 0.3)
    core_r = float(np.exp(rng.uniform(np.log(6.0), np.log(30.0))))
    kind = rng.choice(["lumpy", "lumpy", "elongated", "multifocal"])
    stretch = np.ones(3)
    if kind == "elongated":
        stretch[rng.integers(3)] = rng.uniform(1.6, 2.4)
    foci = 2 if kind == "multifocal" else 1
    core = np.zeros(depth.shape, dtype=bool)
    oedema = np.zeros(depth.shape, dtype=bool)
    for _ in range(foci):
        centre = coords[(slice(None), *candidates[rng.integers(len(candidates))])]
        c, o = _lesion(rng, coords, centre, core_r / np.sqrt(foci), spacing, stretch)
        core |= c
        oedema |= o
    core &= depth > 0
    oedema &= depth > 0
    seg = np.zeros(depth.shape, dtype=np.uint8)
    seg[oedema | core] = 2
    if rng.random() < 0.3:  # non-enhancing (lower-grade-like) core
        seg[core] = 1
    else:
        inside = ndimage.distance_transform_edt(core, sampling=spacing)
        seg[core] = np.where(inside[core] <= rng.uniform(2.5, 5.0), 4, 1)
    return seg


def _case(rng: np.random.Generator, shape: tuple[int, int, int], modalities: Sequence[str], with_tumour: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """int16 images (X, Y, Z) per modality and the label map uint8 (X, Y, Z) of one phantom case."""
    spacing = np.array(FIELD_OF_VIEW_MM) / np.array(shape)
    coords = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"))
    tissue, depth, wmh, vessels = _anatomy(rng, coords, spacing)
    brain = tissue > 0
    seg = _tumour(rng, coords, spacing, depth) if with_tumour else np.zeros(shape, dtype=np.uint8)
    regions = {4: _blur(seg > 0, 1.5, spacing), 5: _blur(np.isin(seg, (1, 4)), 1.2, spacing), 6: _blur(seg == 4, 0.8, spacing)}
    contrast = rng.uniform(0.45, 0.95)
    bias = np.exp(0.25 * _field(rng, shape, 60.0, spacing))
    wmh_soft, vessel_soft = _blur(wmh, 1.2, spacing), _blur(vessels, 0.8, spacing)
    tumour_texture = 0.08 * _field(rng, shape, 3.0, spacing)

    images = {}
    for m in modalities:
        means = np.asarray(TISSUE_MEANS[m], dtype=np.float32)
        value = ndimage.gaussian_filter(means[tissue], sigma=0.7)
        value += MIMICS[m][0] * wmh_soft + MIMICS[m][1] * vessel_soft
        for label, weight in regions.items():  # oedema, then core, then enhancing rim, each blended
            w = contrast * weight
            value = value * (1 - w) + (means[label] + tumour_texture) * w
        value *= (1 + 0.06 * _field(rng, shape, 2.0, spacing)) * bias * rng.uniform(0.9, 1.1)
        sigma = rng.uniform(0.04, 0.07)
        value = np.sqrt((value + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
        value[~brain] = 0
        images[m] = np.clip(np.round(value * 1000), 0, np.iinfo(np.int16).max).astype(np.int16)
    seg[~brain] = 0
    return images, seg


def _affine(shape: tuple[int, int, int]) -> np.ndarray:
    """LPS-stored affine (like BraTS): x and y axes flipped, 1/2 field of view offset."""
    spacing = np.array(FIELD_OF_VIEW_MM) / np.array(shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [FIELD_OF_VIEW_MM[0] / 2, FIELD_OF_VIEW_MM[1] / 2, -FIELD_OF_VIEW_MM[2] / 2]
    return affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 ``.nii.gz`` with a fixed gzip timestamp, so equal data give equal bytes."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=4, mtime=0) as gz:
        gz.write(img.to_bytes())


def generate_phantom(
    root: str | os.PathLike,
    n_cases: int,
    shape: Sequence[int],
    seed: int,
    modalities: Sequence[str] = ("flair", "t1", "t1ce", "t2"),
) -> None:
    """Write ``n_cases`` phantom cases to ``root`` in the BraTS layout, atomically.

    ``root/Synth_000/Synth_000_{modality}.nii.gz`` (int16 (X, Y, Z) = ``shape``) and ``..._seg.nii.gz``
    (uint8, labels {0, 1, 2, 4}). Built in a temporary sibling directory, then renamed onto ``root``,
    replacing an older phantom; a non-empty ``root`` that cldf did not create is never touched
    (:class:`cldf.atomic.UnsafePathError`). Case ``i`` draws from ``numpy.random.default_rng([seed, i])``; which
    cases are tumour-free (``max(1, n_cases // 10)`` of them when ``n_cases > 1``) from ``seed``.
    """
    unknown = [m for m in modalities if m not in TISSUE_MEANS]
    if unknown:
        raise ValueError(f"phantom modalities must be among {sorted(TISSUE_MEANS)}; got {unknown}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3 sizes >= 8, got {shape}")
    n_free = max(1, n_cases // 10) if n_cases > 1 else 0
    free = set(np.random.default_rng(seed).choice(n_cases, size=n_free, replace=False).tolist())
    affine = _affine(shape)  # type: ignore[arg-type]
    with atomic_dir(root) as tmp:
        for i in range(n_cases):
            case = synthetic_case_id(i)
            folder = tmp / case
            folder.mkdir(parents=True)
            images, seg = _case(np.random.default_rng([seed, i]), shape, modalities, i not in free)  # type: ignore[arg-type]
            for m, data in images.items():
                _save(data, affine, folder / f"{case}_{m}.nii.gz")
            _save(seg, affine, folder / f"{case}_seg.nii.gz")
