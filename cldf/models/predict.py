"""Masks of the fully supervised UNet (the upper bound of the comparison table)."""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from cldf.models.checkpoint import load_model
from cldf.store import ArrayStoreWriter, SliceStore


@torch.inference_mode()
def predict_fsl(
    slices_path: str | os.PathLike,
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    device: torch.device,
    batch_size: int = 16,
) -> None:
    """Threshold the UNet's sigmoid at 0.5 on every test slice; write ``slice_ids`` and ``masks`` (N, H, W)."""
    slices = SliceStore(slices_path)
    model = load_model(model_path, device, "fsl_unet", {"image_size": slices.image_size, "in_channels": slices.channels})
    ids = slices.indices(split="test")
    size = slices.image_size
    with ArrayStoreWriter(out, len(ids), {"slice_ids": ((), "int64"), "masks": ((size, size), "uint8")}) as w:
        w.write("slice_ids", 0, ids)
        for start in tqdm(range(0, len(ids), batch_size), desc="fsl unet", unit="batch"):
            batch = ids[start : start + batch_size]
            images = torch.from_numpy(slices.images(batch)).to(device)
            logits = model(images)[:, 0]
            w.write("masks", start, (logits > 0).cpu().numpy().astype(np.uint8))
