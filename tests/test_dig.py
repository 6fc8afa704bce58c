"""cldf.models.dig: the DiG baseline — shapes, the frozen CDM, seeded losses, real learning on the blob phantom."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import default_collate

from cldf.models.builders import build_model
from cldf.models.checkpoint import load_model
from cldf.models.data import BalancedBatchSampler, SliceDataset, split_rows, step_seed
from cldf.models.dig import DiG, build, diffusion_inputs, tapped_features, training_loss
from cldf.models.train import train_model
from cldf.store import SliceStore, read_ground_truth

from tests.fixtures_slices import make_slices

CPU = torch.device("cpu")
C, H = 2, 16
CDM_NET = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8}
CDM_TRAIN = {**CDM_NET, "steps": 100, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 50, "ema_decay": 0.99,
             "class_dropout": 0.1}
LAYERS = ["down_blocks.0", "down_blocks.1"]  # the tiny CDM's encoder: 8 and 16 channels at 8 x 8 (16 x 16 input)
SETTINGS = {
    "image_size": H, "patch_size": 2, "dim": 32, "depth": 4, "heads": 4, "cross_heads": 4,
    "feature_layers": LAYERS, "feature_channels": [8, 16], "feature_timesteps": [0, 2, 4], "consistency_t": 100,
    "cam_map": "fused", "warmup_steps": 0, "kd_temperature": 5.0, "kd_alpha": 0.2,
    "loss_weights": {"classification": 1.0, "diffusion": 1.0, "cam_distillation": 1.0,
                     "denoised_classification": 1.0, "consistency": 10.0},
}
LEARN_STEPS = 160
LEARN_WARMUP = LEARN_STEPS // 6  # the CAM losses start after 1/6 of training, as the original (epoch 10 of 60)

pytestmark = pytest.mark.usefixtures("one_thread")


def _seeded_build(settings: dict, seed: int = 0) -> DiG:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build(settings, C)


@pytest.fixture(scope="module")
def cdm() -> torch.nn.Module:
    """An untrained tiny CDM whose zero-initialised layers are randomised (its output depends on its input), frozen."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model("cdm", CDM_NET, C)
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.05)
    return net.eval().requires_grad_(False)


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, C, H, H, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    return {"image": _images(b), "label": torch.arange(b) % 2}


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def _loss(model: DiG, cdm: torch.nn.Module, seed: int, step: int = 0, settings: dict = SETTINGS,
          batch: dict | None = None) -> torch.Tensor:
    return training_loss(model, batch or _batch(), step, settings, torch.Generator().manual_seed(seed), {"cdm": cdm})


@pytest.mark.parametrize("cam_map", ["fused", "refined"])
@pytest.mark.parametrize("b", [1, 3])
def test_cam_shape_range_deterministic(cdm, b, cam_map):
    model = _seeded_build({**SETTINGS, "cam_map": cam_map}).eval()
    images = _images(3, seed=1)[:b]
    cam = model.cam(images, {"cdm": cdm})
    assert cam.shape == (b, H, H) and cam.dtype == torch.float32
    assert cam.min() >= 0 and cam.max() <= 1 and torch.allclose(cam.amax(dim=(1, 2)), torch.ones(b))
    assert torch.equal(cam, model.cam(images, {"cdm": cdm}))
    assert torch.allclose(model.cam(images[:1], {"cdm": cdm}), cam[:1], atol=1e-3)  # a slice's map ignores its batch
    p = model.positive_probability(images)
    assert p.shape == (b,) and torch.all((p > 0) & (p < 1))
    assert _no_hooks(cdm)


def test_tapped_features_stop_early_and_leave_no_hooks(cdm):
    later = []
    handle = cdm.out.register_forward_hook(lambda *_: later.append(1))
    try:
        t = torch.tensor([0, 4, 100])
        feats = tapped_features(cdm, _images(3), t, LAYERS, grid=8)
        coarse = tapped_features(cdm, _images(3), t, LAYERS, grid=4)
    finally:
        handle.remove()
    assert feats.shape == (3, 24, 8, 8) and coarse.shape == (3, 24, 4, 4)
    assert not later  # the decoder never ran
    assert _no_hooks(cdm)
    with pytest.raises(ValueError, match="unknown layer"):
        tapped_features(cdm, _images(1), torch.tensor([0]), ["down_blocks.9"], grid=8)
    assert _no_hooks(cdm)


def test_diffusion_inputs_shapes_and_one_step_denoising(cdm):
    images = _images(2)
    feats, x_hat = diffusion_inputs(cdm, images, SETTINGS, 8, torch.Generator().manual_seed(0))
    assert feats.shape == (2, 3 * 24, 8, 8) and x_hat.shape == images.shape and x_hat.abs().max() <= 1
    # timestep-major blocks of 24 channels: t = 0 and t = 2 barely differ, unlike t = 100's denoised image
    assert torch.allclose(feats[:, :24], feats[:, 24:48], atol=0.2)
    _, near = diffusion_inputs(cdm, images, {**SETTINGS, "consistency_t": 0}, 8, torch.Generator().manual_seed(0))
    assert torch.allclose(near, images, atol=0.05)  # x̂0 from t = 0 is the image
    assert (x_hat - images).abs().mean() > (near - images).abs().mean()


def test_training_loss_finite_seeded_and_cdm_frozen(cdm):
    model = _seeded_build(SETTINGS).train()
    state = torch.random.get_rng_state()
    loss = _loss(model, cdm, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is not drawn from
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in cdm.parameters())
    assert all(p.grad is not None for p in model.parameters())  # ViT, both cross-attentions, CAM head
    assert _no_hooks(cdm)
    assert torch.equal(_loss(model, cdm, seed=0), loss.detach())
    assert not torch.equal(_loss(model, cdm, seed=1), loss.detach())


def test_warmup_gates_the_cam_losses(cdm):
    model = _seeded_build(SETTINGS)
    gated = {**SETTINGS, "warmup_steps": 10}
    with torch.no_grad():
        assert _loss(model, cdm, 0, 9, gated) < _loss(model, cdm, 0, 10, gated)  # the CAM losses join at step 10
        negatives = {"image": _images(4), "label": torch.zeros(4, dtype=torch.long)}
        assert torch.equal(_loss(model, cdm, 0, 9, gated, negatives), _loss(model, cdm, 0, 10, gated, negatives))


def test_bad_settings():
    with pytest.raises(ValueError, match="cam_map"):
        build({**SETTINGS, "cam_map": "gradcam"}, C)
    with pytest.raises(ValueError, match="patch"):
        build({**SETTINGS, "patch_size": 3}, C)
    with pytest.raises(ValueError, match="cross_heads"):
        build({**SETTINGS, "cross_heads": 5}, C)
    model = build({**SETTINGS, "feature_channels": [8, 32]}, C)
    with pytest.raises(ValueError, match="feature_channels"):
        model(_images(1), torch.zeros(1, 3 * 24, 8, 8), _images(1))


# ---------------------------------------------------------------------------------------- real learning


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> tuple[Path, DiG, torch.nn.Module]:
    """The blob phantom, a CDM trained on it with the project's trainer, and DiG trained with that CDM frozen."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dig")
    slices = make_slices(out / "slices")
    train_model("cdm", slices, CDM_TRAIN, out / "cdm.pt", CPU, seed=0)
    cdm = load_model(out / "cdm.pt", CPU).eval().requires_grad_(False)
    store = SliceStore(slices)
    train, _, _ = split_rows(store, (0, 1), seed=0)
    settings = {**SETTINGS, "warmup_steps": LEARN_WARMUP}
    model = _seeded_build(settings).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dataset = SliceDataset(slices, train)
    sampler = BalancedBatchSampler((store.labels[train] != 0).astype(np.int64), 16, seed=0, steps=LEARN_STEPS)
    for step, idx in enumerate(sampler):
        generator = torch.Generator().manual_seed(step_seed(0, step))
        loss = training_loss(model, default_collate([dataset[i] for i in idx]), step, settings, generator,
                             {"cdm": cdm})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return slices, model.eval(), cdm


@pytest.mark.slow  # the learned fixture trains a CDM and DiG, ~30 s: make test-slow
def test_dig_separates_the_classes_on_held_out_slices(learned):
    slices, model, _ = learned
    store = SliceStore(slices)
    _, val, _ = split_rows(store, (0, 1), seed=0)
    probability = model.positive_probability(torch.from_numpy(store.images(val))).numpy()
    assert roc_auc_score(store.labels[val], probability) > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_dig_cam_lights_the_blobs(learned, split):
    slices, model, cdm = learned
    store = SliceStore(slices)
    rows = store.indices(split, labels=[1])
    cam = model.cam(torch.from_numpy(store.images(rows)), {"cdm": cdm}).numpy()
    truth = read_ground_truth(slices, rows).astype(bool)
    outside = store.body(rows) & ~truth
    assert cam[truth].mean() > cam[outside].mean() + 0.2
    assert np.mean([cam[i][truth[i]].mean() > cam[i][outside[i]].mean() for i in range(len(rows))]) > 0.8
    assert _no_hooks(cdm)


def test_dig_state_round_trips(cdm):
    """A DiG's state loaded into another (differently initialised) DiG gives the same CAMs."""
    model = _seeded_build(SETTINGS, seed=1).eval()
    again = _seeded_build(SETTINGS, seed=2).eval()
    images = _images(2)
    expected = model.cam(images, {"cdm": cdm})
    assert not torch.equal(again.cam(images, {"cdm": cdm}), expected)
    again.load_state_dict(copy.deepcopy(model.state_dict()))
    assert torch.equal(again.cam(images, {"cdm": cdm}), expected)
