"""Checkpoint files: atomic writes, safe (``weights_only``) reads, model rebuilding.

A checkpoint is a dict of tensors and plain Python values only:
``kind``, ``settings`` (rebuilds the net, see :func:`cldf.models.builders.build_model`), ``in_channels``,
``state_dict``, optionally ``ema_state_dict``, ``step`` and, in a resume file, the optimizer/scaler
states and the loss history.
"""

from __future__ import annotations

import os
import pickle
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cldf.models.builders import build_model


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or incomplete; the message names the file."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary sibling file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; :class:`CheckpointError` if missing/corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; run the training step that makes it")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a cldf checkpoint ({type(err).__name__}); "
                              "delete it and re-run training") from err
    if not isinstance(payload, dict) or not {"kind", "settings", "in_channels", "state_dict"} <= payload.keys():
        raise CheckpointError(f"checkpoint {path} lacks kind/settings/in_channels/state_dict; not a cldf model")
    return payload


def model_from_payload(payload: dict[str, Any], device: torch.device, use_ema: bool = True) -> nn.Module:
    """Rebuild the network of a checkpoint payload with its (EMA, when present) weights, in eval mode."""
    model = build_model(payload["kind"], payload["settings"], int(payload["in_channels"]))
    weights = payload.get("ema_state_dict") if use_ema else None
    model.load_state_dict(weights if weights is not None else payload["state_dict"])
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: torch.device) -> nn.Module:
    """Load a trained network: EMA weights when the checkpoint has them, eval mode, on ``device``.

    Gradients stay enabled; callers that need a frozen net set ``requires_grad_(False)`` themselves.
    """
    payload = load_checkpoint(path)
    try:
        return model_from_payload(payload, device)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its stored architecture: {err}") from err
