"""SEAM (cldf.models.seam): shapes, the PCM affinity, the loss terms, hooks, and a real learning check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
import torch
from torch import nn

from cldf.models.seam import SEAM, build, loss_terms, training_loss
from cldf.store import SliceStore, read_ground_truth

from .fixtures_slices import make_slices

CPU_PRESET = {
    "widen_factor": 0.125, "conv1_stride": 1, "max_pool": False, "dilated_stages": 1, "dropout": 0.5,
    "scale": 0.5, "er_weight": 1.0, "ecr_weight": 1.0, "ecr_top_fraction": 0.2,
    "infer_scales": [0.5, 1.0, 1.5, 2.0], "steps": 200, "batch_size": 16, "lr": 1.0e-3, "checkpoint_every": 100,
}
PAPER_PRESET = {
    **CPU_PRESET, "widen_factor": 1.0, "conv1_stride": 2, "max_pool": True, "dilated_stages": 2,
    "steps": 10000, "batch_size": 16, "lr": 1.0e-4, "checkpoint_every": 1000,
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (see ``conftest.one_thread``)."""


def _model(size: int = 32, channels: int = 4, **overrides) -> SEAM:
    torch.manual_seed(0)
    return build({**CPU_PRESET, "image_size": size, **overrides}, channels)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("batch", [1, 3])
def test_cam_shape_range_and_determinism(batch):
    model = _model().eval()
    images = torch.rand(batch, 4, 32, 32) * 2 - 1
    maps = model.cam(images)
    assert maps.shape == (batch, 32, 32) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert torch.equal(maps, model.cam(images))
    assert torch.allclose(maps[:1], model.cam(images[:1]), atol=1e-5)  # independent of the batch
    probs = model.positive_probability(images)
    assert probs.shape == (batch,) and bool(((probs >= 0) & (probs <= 1)).all())
    assert _hooks(model) == 0


@pytest.mark.parametrize(("preset", "size", "grid"), [(CPU_PRESET, 64, 16), (PAPER_PRESET, 256, 32)])
def test_presets_cam_grid(preset, size, grid):
    """CPU preset: output stride 4 (16 x 16 CAM at 64); paper preset: output stride 8, the original's."""
    model = build({**preset, "widen_factor": 0.0625, "image_size": size}, 4).eval()
    with torch.no_grad():
        cam, refined = model(torch.zeros(1, 4, size, size))
    assert cam.shape == (1, 1, grid, grid) and refined.shape == (1, 2, grid, grid)


def test_pcm_affinity_rows_are_convex_weights():
    model = _model()
    images = torch.rand(2, 4, 32, 32) * 2 - 1
    mid, late, last = model.features(images)
    affinity = model.pcm.affinity(images, mid, late, last.shape[-2:])
    n = last.shape[-2] * last.shape[-1]
    assert affinity.shape == (2, n, n) and affinity.dtype == torch.float32
    assert bool((affinity >= 0).all())
    torch.testing.assert_close(affinity.sum(dim=2), torch.ones(2, n), atol=1e-4, rtol=0)
    seeds = torch.rand(2, 2, *last.shape[-2:])
    refined = model.pcm(seeds, images, mid, late)
    assert refined.shape == seeds.shape
    assert bool((refined <= seeds.amax(dim=(2, 3), keepdim=True) + 1e-5).all())
    assert bool((refined >= seeds.amin(dim=(2, 3), keepdim=True) - 1e-5).all())


class _ShiftedImageCAM(nn.Module):
    """A CAM equal to the first image channel shifted by ``shift`` pixels: scale-equivariant for shift 0 only
    (a shift of k pixels at full size is k/2 pixels at half size)."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = images[:, :1].roll(self.shift, dims=-1)
        target = torch.sigmoid(cam)
        return cam, torch.cat([1 - target, target], dim=1)


def test_equivariance_loss_vanishes_for_an_equivariant_cam():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centres = torch.tensor([[20.0, 30.0], [40.0, 44.0]])
    blob = torch.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 60.0)
    images = blob[:, None].repeat(1, 4, 1, 1) * 2 - 1
    labels = torch.tensor([1, 1])
    equivariant = float(loss_terms(_ShiftedImageCAM(0), images, labels, CPU_PRESET)["equivariance"])
    shifted = float(loss_terms(_ShiftedImageCAM(6), images, labels, CPU_PRESET)["equivariance"])
    assert equivariant < 0.005 and shifted > 10 * equivariant, (equivariant, shifted)
    assert float(loss_terms(_ShiftedImageCAM(6), images, torch.tensor([0, 0]), CPU_PRESET)["equivariance"]) == 0


def test_loss_terms_reach_their_own_parameters():
    """Classification and equivariance train backbone and CAM; the PCM terms train the PCM only (as in the
    original, which detaches the CAM and the features it feeds the PCM)."""
    model = _model().train()
    images = torch.rand(4, 4, 32, 32) * 2 - 1
    terms = loss_terms(model, images, torch.tensor([0, 1, 1, 0]), CPU_PRESET)
    assert set(terms) == {"classification", "min_pool", "equivariance", "cross"}
    pcm = {id(p) for p in model.pcm.parameters()}
    for name, reaches_pcm in [("classification", False), ("equivariance", False), ("cross", True), ("min_pool", True)]:
        grads = torch.autograd.grad(terms[name], list(model.parameters()), retain_graph=True, allow_unused=True)
        touched = {id(p) for p, g in zip(model.parameters(), grads) if g is not None and bool(g.abs().sum() > 0)}
        assert touched and (touched <= pcm if reaches_pcm else not touched & pcm), name


def test_training_loss_is_finite_under_autocast():
    model = _model().train()
    batch = {"image": torch.rand(4, 4, 32, 32) * 2 - 1, "label": torch.tensor([0, 1, 1, 0])}
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = training_loss(model, batch, 0, CPU_PRESET, torch.Generator().manual_seed(0), {})
    loss.backward()
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    assert _hooks(model) == 0


@pytest.mark.slow  # 22 s of training: make test-slow (SEAM's losses and inference are tested above)
def test_seam_learns_to_localise_the_blobs(tmp_path: Path):
    """The CPU preset trained briefly on the blob store: the refined CAM is higher on the blobs than elsewhere
    in the body (weakly: SEAM's cross-regularisation spreads the map over the body early in training), and
    positives rank above negatives. The equivariance term is 0 for the flat CAM of the
    untrained net, grows as a CAM forms, then falls: at the end it is well below its peak."""
    size = 64
    path = make_slices(tmp_path / "slices", size=size, channels=4, seed=1)
    slices = SliceStore(path)
    rows = slices.indices(split="train", labels=[0, 1])
    images = torch.from_numpy(slices.images(rows))
    labels = torch.from_numpy(slices.labels[rows].astype(np.int64))
    model = _model(size=size)
    fixed = (images[:16], labels[:16])
    equivariance = []
    optimiser = torch.optim.AdamW(model.parameters(), lr=CPU_PRESET["lr"])
    generator = torch.Generator().manual_seed(0)
    for step in range(100):
        if step % 10 == 0:
            equivariance.append(_equivariance(model, *fixed))
        model.train()
        pick = torch.randint(0, len(rows), (8,), generator=generator)
        loss = training_loss(model, {"image": images[pick], "label": labels[pick]}, step, CPU_PRESET, generator, {})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert _equivariance(model, *fixed) < 0.75 * max(equivariance), equivariance
    model.eval()
    positive = labels == 1
    maps = model.cam(images[positive]).numpy()
    truth = read_ground_truth(path, rows[positive.numpy()]).astype(bool)
    body = slices.body(rows[positive.numpy()])
    inside, outside = maps[truth].mean(), maps[body & ~truth].mean()
    print(f"inside {inside:.3f} outside {outside:.3f}")
    assert inside > 1.3 * outside, (inside, outside)  # untrained: a flat map, ratio 1
    probs = model.positive_probability(images).numpy()
    assert roc_auc_score(positive.numpy(), probs) > 0.8  # ranks positives above negatives (calibration aside)


def _equivariance(model: SEAM, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The equivariance term in eval mode (no dropout), without gradients."""
    model.eval()
    with torch.no_grad():
        return float(loss_terms(model, images, labels, CPU_PRESET)["equivariance"])
