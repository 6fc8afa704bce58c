"""Maps of the comparison methods' own networks (AME-CAM, SEAM, DiG; :data:`cldf.registry.METHOD_NETWORKS`)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from cldf.maps.common import Batch


def method_map(model: nn.Module, batch: Batch, settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Registered maps ``amecam``, ``seam`` and ``dig``: the network's map of the positive class, ``maps`` (B, H, W)
    in [0, 1] (at inference none of them reads another network)."""
    return {"maps": model.cam(batch.images, {})}

