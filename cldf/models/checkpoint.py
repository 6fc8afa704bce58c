"""The one checkpoint format of every network (CDM, classifiers, FSL UNet, pixel decoder).

A checkpoint is a dict of tensors and plain Python values only, read with ``weights_only=True``:
``kind`` and ``settings`` rebuild the network (:func:`cldf.models.builders.build_model`),
``in_channels`` is its input width (image channels; feature dimension D for the pixel decoder),
``image_size`` the slice size it was trained on (absent for the resolution-free decoder), ``state_dict``,
optionally ``ema_state_dict``, ``step``, ``seed`` and kind-specific extras (the decoder's ``prototypes``).
A resume file adds the optimizer/scaler states and the loss history.

Every problem with a checkpoint is one line (:class:`CheckpointError`): which file, what is wrong, and
that deleting it makes the workflow rebuild it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cldf.atomic import atomic_file
from cldf.errors import CldfError
from cldf.models.builders import build_model

REQUIRED_KEYS = ("kind", "settings", "in_channels", "state_dict")


class CheckpointError(CldfError, RuntimeError):
    """A checkpoint is missing, unreadable, incomplete or made for other data; the message names the file."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary sibling file, fsync, rename)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _describe(payload: Mapping[str, Any], keys: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {payload.get(key)!r}" for key in keys)


def load_checkpoint(
    path: str | os.PathLike, kind: str | None = None, expect: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read a checkpoint; :class:`CheckpointError` when it is missing, corrupt, of another ``kind``, or
    when one of the ``expect`` entries (e.g. ``{"image_size": 64, "in_channels": 4}``) differs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; run the step that makes it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a cldf checkpoint ({type(err).__name__}); delete it and re-run"
        ) from None
    if not isinstance(payload, dict) or not set(REQUIRED_KEYS) <= payload.keys():
        raise CheckpointError(
            f"checkpoint {path} lacks {'/'.join(REQUIRED_KEYS)}; not a cldf checkpoint: delete it and re-run"
        )
    if kind is not None and payload["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {payload['kind']!r}, expected a {kind!r}; delete it and re-run")
    expect = dict(expect or {})
    if any(payload.get(key) != value for key, value in expect.items()):
        raise CheckpointError(
            f"checkpoint {path} was made for {_describe(payload, expect)} but this run has "
            f"{', '.join(f'{k} {v!r}' for k, v in expect.items())} (another preset or dataset); "
            "delete it and re-run to rebuild it"
        )
    return payload


def model_from_payload(payload: dict[str, Any], device: torch.device, use_ema: bool = True) -> nn.Module:
    """Rebuild the network of a checkpoint payload with its (EMA, when present) weights, in eval mode."""
    model = build_model(payload["kind"], payload["settings"], int(payload["in_channels"]))
    weights = payload.get("ema_state_dict") if use_ema else None
    model.load_state_dict(weights if weights is not None else payload["state_dict"])
    return model.to(device).eval()


def load_model(
    path: str | os.PathLike,
    device: torch.device,
    kind: str | None = None,
    expect: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load a trained network: EMA weights when the checkpoint has them, eval mode, on ``device``.

    ``kind`` and ``expect`` are checked as in :func:`load_checkpoint`. Gradients stay enabled; callers that
    need a frozen net set ``requires_grad_(False)`` themselves.
    """
    payload = load_checkpoint(path, kind, expect)
    try:
        return model_from_payload(payload, device)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} does not match its stored architecture ({first}); delete it and re-run"
        ) from None
