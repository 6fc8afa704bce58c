"""AME-CAM (cldf.models.amecam): shapes, phases, polarity, hooks, and that it learns on blob data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from cldf import store
from cldf.models import amecam
from tests.fixtures_slices import make_slices

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
CHANNELS = 4
SETTINGS = {"widen_factor": 0.25, "conv1_stride": 1, "max_pool": False, "classifier_steps": 60,
            "aggregation_steps": 20, "batch_size": 16, "lr": 1.0e-3, "checkpoint_every": 100,
            "image_size": SIZE}


def _model(seed: int = 0) -> amecam.AMECAM:
    torch.manual_seed(seed)
    return amecam.build(SETTINGS, CHANNELS)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Random images (n, C, SIZE, SIZE) in [-1, 1]."""
    return torch.rand(n, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    return {"image": _images(n), "label": torch.arange(n) % 2}


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    return amecam.training_loss(model, _batch(), step, SETTINGS, torch.Generator().manual_seed(0), {})


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cam_shape_range_and_determinism(batch_size: int) -> None:
    model = _model()
    _loss(model, 0).backward()  # BatchNorm statistics away from their initial values
    model.train()
    images = _images(batch_size)
    maps = model.cam(images)
    assert maps.shape == (batch_size, SIZE, SIZE) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert torch.equal(maps, model.cam(images))
    assert all(m.training for m in model.modules()), "cam() must restore the caller's mode"
    prob = model.positive_probability(images)
    assert prob.shape == (batch_size,) and ((prob > 0) & (prob < 1)).all()
    assert model.forward(images, stage="classifier").shape == (batch_size, amecam.N_EXITS)


def test_no_hooks_left_behind() -> None:
    model = _model()
    _loss(model, 0).backward()
    _loss(model, SETTINGS["classifier_steps"]).backward()
    model.set_polarity(_images(2))
    model.cam(_images(2))
    model.positive_probability(_images(2))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not module._backward_pre_hooks


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_phase_one_trains_the_classifier_only() -> None:
    model = _model()
    model.train()
    _loss(model, SETTINGS["classifier_steps"] - 1).backward()
    assert all(g is not None for g in _grads(model.classifier))
    assert all(g.abs().sum() > 0 for g in _grads(model.classifier.heads))
    assert all(g is None for g in _grads(model.aggregator))


def test_phase_two_trains_the_aggregator_only_and_keeps_the_classifier_frozen() -> None:
    model = _model()
    _loss(model, 0).backward()
    model.zero_grad(set_to_none=True)
    model.train()
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    loss = _loss(model, SETTINGS["classifier_steps"])
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in _grads(model.aggregator))
    assert any(g.abs().sum() > 0 for g in _grads(model.aggregator))
    assert all(g is None for g in _grads(model.classifier))
    after = model.classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm statistics of the frozen classifier moved"
    assert model.classifier.training, "the classifier's mode must be restored after phase 2"


@pytest.mark.parametrize("step", [0, SETTINGS["classifier_steps"]])
def test_losses_are_float32_under_autocast(step: int) -> None:
    model = _model()
    model.train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = _loss(model, step)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_c2am_loss_pieces() -> None:
    same = torch.ones(3, 10)
    assert amecam.cosine_similarity(same, same).max() == pytest.approx(amecam.SIM_RANGE[1])
    assert amecam.cosine_similarity(same, torch.zeros(2, 10)).max() == pytest.approx(amecam.SIM_RANGE[0])
    disjoint_fg, disjoint_bg = torch.eye(4)[:2], torch.eye(4)[2:]
    assert amecam.push_loss(disjoint_fg, disjoint_bg) < 1e-3 < amecam.push_loss(same, same)
    assert amecam.pull_loss(same) < 1e-3 < amecam.pull_loss(torch.eye(3))
    logits = torch.full((2, amecam.N_EXITS), 20.0)
    assert amecam.multi_exit_loss(logits, torch.ones(2, dtype=torch.long)) < 1e-6
    wrong = amecam.multi_exit_loss(logits, torch.zeros(2, dtype=torch.long))
    assert wrong == pytest.approx(20 * sum(amecam.EXIT_WEIGHTS))


def test_border_mask_is_a_ten_percent_frame() -> None:
    mask = amecam.border_mask(20, 30)
    assert mask.shape == (20, 30) and mask[0].all() and mask[:, -1].all()
    assert not mask[2:18, 3:27].any() and mask[1, 10] and mask[10, 2]


def _bright_border_map(images: torch.Tensor) -> torch.Tensor:
    maps = amecam.border_mask(SIZE, SIZE).float().expand(len(images), SIZE, SIZE).clone()
    maps[:, SIZE // 2, SIZE // 2] = 0.5
    return maps


def test_polarity_flips_a_bright_border_and_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    images = _images(2)
    assert not model.flip
    monkeypatch.setattr(model, "unflipped_cam", _bright_border_map)
    model.set_polarity(images)
    assert bool(model.flip)
    maps = model.cam(images)
    assert torch.equal(maps, 1 - _bright_border_map(images))
    assert maps[:, amecam.border_mask(SIZE, SIZE)].max() == 0
    state = model.state_dict()
    assert "flip" in state and bool(state["flip"])
    restored = _model(seed=1)
    restored.load_state_dict(state)
    assert bool(restored.flip)
    monkeypatch.setattr(model, "unflipped_cam", lambda x: 1 - _bright_border_map(x))
    model.set_polarity(images)
    assert not model.flip, "a dark border must undo an earlier flip"


def test_build_checks_the_settings() -> None:
    with pytest.raises(ValueError, match="lack"):
        amecam.build({k: v for k, v in SETTINGS.items() if k != "classifier_steps"}, CHANNELS)
    with pytest.raises(ValueError, match="steps"):
        amecam.build({**SETTINGS, "steps": 7}, CHANNELS)
    assert amecam.total_steps(SETTINGS) == 80
    amecam.build({**SETTINGS, "steps": 80}, CHANNELS)
    with pytest.raises(ValueError, match="stage"):
        _model()(_images(1), stage="decoder")


def _train(model: amecam.AMECAM, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """A plain loop over balanced batches (half positive), image-level labels only; the step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(SETTINGS["lr"]))
    generator = torch.Generator().manual_seed(0)
    groups = [torch.nonzero(labels == c)[:, 0] for c in (0, 1)]
    half = int(SETTINGS["batch_size"]) // 2
    losses = []
    model.train()
    for step in range(amecam.total_steps(SETTINGS)):
        idx = torch.cat([g[torch.randint(len(g), (half,), generator=generator)] for g in groups])
        batch = {"image": images[idx], "label": labels[idx]}
        loss = amecam.training_loss(model, batch, step, SETTINGS, generator, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow  # 12 s of training: make test-slow (AME-CAM's phases, losses and hooks are tested above)
def test_learns_the_blob(tmp_path: Path) -> None:
    path = make_slices(tmp_path / "slices", size=SIZE, channels=CHANNELS)
    slices = store.SliceStore(path)
    rows = slices.indices("train", labels=[0, 1])
    images = torch.from_numpy(slices.images(rows))
    labels = torch.from_numpy(slices.labels[rows].astype(np.int64))
    model = _model()
    losses = _train(model, images, labels)
    phase2 = losses[SETTINGS["classifier_steps"]:]
    assert np.mean(phase2[-5:]) < np.mean(phase2[:5]), "the aggregator's C2AM loss did not decrease"
    assert roc_auc_score(labels.numpy(), model.positive_probability(images).numpy()) > 0.95

    positive = rows[labels.numpy() == 1]
    pos_images = torch.from_numpy(slices.images(positive))
    model.set_polarity(pos_images)
    assert not model.flip, "exit maps are high on the blob: no flip expected"
    maps = model.cam(pos_images).numpy()
    truth = store.read_ground_truth(path, positive).astype(bool)
    outside = slices.body(positive) & ~truth
    assert maps[truth].mean() > 1.5 * maps[outside].mean()
