"""The hand-off to supervised training: an nnU-Net v2 raw dataset from the scans and their pseudo-masks.

``<folder>/Dataset<id>_<name>/`` holds ``imagesTr/<case>_<k:04d>.nii.gz`` (channel k of the dataset's
``modalities``, the scan's own files), ``labelsTr/<case>.nii.gz`` (the pseudo-mask: 0 background, 1 target,
in the scan's own geometry) and ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
``file_ending``), the layout nnU-Net v2's ``nnUNetv2_plan_and_preprocess -d <id> --verify_dataset_integrity``
reads. A channel named ``ct`` is called ``CT`` so that nnU-Net normalises it as CT.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import pandas as pd

from cldf.atomic import atomic_dir, atomic_file
from cldf.io.layouts import case_files

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "target": 1}


def channel_names(modalities: list[str]) -> dict[str, str]:
    """``dataset.json``'s ``channel_names``: ``{"0": "flair", ...}``, ``ct`` as ``CT``."""
    return {str(k): ("CT" if m.lower() == "ct" else m) for k, m in enumerate(modalities)}


def _copy_nifti(source: Path, target: Path) -> None:
    """Copy a scan file as .nii.gz (a .nii is compressed on the way)."""
    if source.name.endswith(FILE_ENDING):
        shutil.copyfile(source, target)
        return
    image = nib.load(str(source))
    target.write_bytes(gzip.compress(image.to_bytes(), mtime=0))


def export_nnunet(ds: Mapping[str, Any], pseudo_manifest: str | os.PathLike, folder: str | os.PathLike,
                  out: str | os.PathLike) -> pd.DataFrame:
    """Write the nnU-Net v2 raw dataset ``folder`` (``.../Dataset<id>_<name>``) of every case of the pseudo-mask
    manifest, then its manifest ``out`` (``case, label, image_0000, ...``); the folder is built under a
    temporary name and replaces an older one when complete."""
    masks = pd.read_csv(pseudo_manifest, dtype={"case": str})
    modalities = list(ds["modalities"])
    folder = Path(folder)
    rows = []
    with atomic_dir(folder) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case, mask in zip(masks["case"], masks["path"]):
            files = case_files(ds, case)
            row = {"case": case, "label": str(folder / "labelsTr" / f"{case}{FILE_ENDING}")}
            shutil.copyfile(mask, tmp / "labelsTr" / f"{case}{FILE_ENDING}")
            for k, modality in enumerate(modalities):
                name = f"{case}_{k:04d}{FILE_ENDING}"
                _copy_nifti(Path(files[modality]), tmp / "imagesTr" / name)
                row[f"image_{k:04d}"] = str(folder / "imagesTr" / name)
            rows.append(row)
        dataset = {"channel_names": channel_names(modalities), "labels": LABELS, "numTraining": len(rows),
                   "file_ending": FILE_ENDING, "name": folder.name,
                   "description": f"CLDF pseudo-masks of dataset {ds['name']} (weak labels only)"}
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    frame = pd.DataFrame(rows, columns=["case", "label", *(f"image_{k:04d}" for k in range(len(modalities)))])
    with atomic_file(out) as tmp_csv:
        frame.to_csv(tmp_csv, index=False)
    return frame
