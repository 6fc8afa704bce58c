"""cldf.models: builders, checkpoints, data, training (real learning on tiny synthetic slices), sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cldf.store
from cldf.models.builders import build_model, build_scheduler, count_parameters
from cldf.models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from cldf.models.data import BalancedBatchSampler, SliceDataset, split_rows
from cldf.models.sample import BRIGHT_LEVEL, sample_images, save_sample_grid
from cldf.models.train import resume_path, train_model
from cldf.store import SliceStore

from tests.fixtures_slices import make_slices

CPU = torch.device("cpu")
NET = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8}
TINY = {
    "cdm": {**NET, "steps": 100, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 50, "ema_decay": 0.99,
            "class_dropout": 0.1},
    "noisy_classifier": {**NET, "steps": 150, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 50},
    "cam_classifier": {"widen_factor": 0.25, "steps": 120, "batch_size": 16, "lr": 3e-3, "checkpoint_every": 50},
    "fsl_unet": {"channels": [8, 16, 32], "steps": 150, "batch_size": 16, "lr": 3e-3, "checkpoint_every": 50},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    return make_slices(tmp_path_factory.mktemp("slices") / "slices")


@pytest.fixture(scope="module")
def trained(slices, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every kind trained once on the tiny store (shared by the tests below)."""
    out = tmp_path_factory.mktemp("models")
    torch.set_num_threads(1)
    return {k: (out / f"{k}.pt", train_model(k, slices, TINY[k], out / f"{k}.pt", CPU, seed=0)) for k in TINY}


@pytest.mark.parametrize("size", [16, 32])
def test_builders_shapes(size):
    x = torch.randn(3, 2, size, size)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 1, 2])
    settings = {**NET, "image_size": size}
    assert build_model("cdm", settings, 2)(x, timesteps=t, class_labels=y).shape == (3, 2, size, size)
    assert build_model("noisy_classifier", settings, 2)(x, timesteps=t).shape == (3, 2)
    cam = build_model("cam_classifier", {"widen_factor": 0.25}, 2)
    assert cam(x).shape == (3, 2)
    assert {f"layer{k}" for k in range(1, 5)} <= {name for name, _ in cam.named_modules()}
    assert build_model("fsl_unet", {"channels": [8, 16, 32]}, 2)(x).shape == (3, 1, size, size)


def test_builder_errors():
    with pytest.raises(ValueError, match="image_size"):
        build_model("noisy_classifier", NET, 2)
    with pytest.raises(ValueError, match="divisible"):
        build_model("noisy_classifier", {**NET, "image_size": 18}, 2)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("vae", NET, 2)


def test_scheduler():
    s = build_scheduler()
    assert s.num_train_timesteps == 1000
    abar = s.alphas_cumprod
    assert abar.shape == (1000,) and abar[0] > 0.999 and abar[-1] < 1e-4 and torch.all(abar[1:] < abar[:-1])


def test_checkpoint_roundtrip_and_errors(tmp_path):
    model = build_model("cam_classifier", {"widen_factor": 0.25}, 2)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    payload = {"kind": "cam_classifier", "settings": {"widen_factor": 0.25}, "in_channels": 2,
               "state_dict": model.state_dict(), "ema_state_dict": ema, "step": 3}
    path = tmp_path / "m.pt"
    save_checkpoint(path, payload)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert load_checkpoint(path)["step"] == 3
    loaded = load_model(path, CPU)
    assert not loaded.training
    assert torch.equal(loaded.state_dict()["fc.weight"], ema["fc.weight"])
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_model(tmp_path / "missing.pt", CPU)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_model(tmp_path / "bad.pt", CPU)
    torch.save({"kind": "cam_classifier", "code": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled.pt"):
        load_checkpoint(tmp_path / "pickled.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is corrupt .*; delete it and re-run"):
        load_model(tmp_path / "truncated.pt", CPU)
    with pytest.raises(CheckpointError, match=r"holds a 'cam_classifier', expected a 'cdm'"):
        load_model(path, CPU, kind="cdm")
    save_checkpoint(path, {**payload, "image_size": 256})
    with pytest.raises(CheckpointError) as info:
        load_model(path, CPU, expect={"image_size": 64, "in_channels": 2})
    assert str(info.value) == (
        f"checkpoint {path} was made for image_size 256, in_channels 2 but this run has image_size 64, "
        "in_channels 2 (another preset or dataset); delete it and re-run to rebuild it"
    )


def test_split_rows_and_fallback(slices, tmp_path):
    st = SliceStore(slices)
    train, val, source = split_rows(st, (0, 1), seed=0)
    assert source == "val split"
    assert set(st.split[train]) == {"train"} and set(st.split[val]) == {"val"}
    assert -1 not in st.labels[train] and -1 not in st.labels[val]
    no_val = make_slices(tmp_path / "noval", n_cases=6, splits=("train",) * 5 + ("test",))
    st2 = SliceStore(no_val)
    train2, val2, source2 = split_rows(st2, (0, 1), seed=0)
    assert "val split empty" in source2 and len(val2) > 0
    assert not set(st2.case_index[train2]) & set(st2.case_index[val2])


def test_balanced_sampler_is_stateless_and_sharded():
    groups = np.array([0] * 90 + [1] * 10)
    full = list(BalancedBatchSampler(groups, 8, seed=1, steps=50))
    assert len(full) == 50
    assert list(BalancedBatchSampler(groups, 8, seed=1, steps=50, start_step=20)) == full[20:]
    picked = np.concatenate(full)
    assert 0.35 < (groups[picked] == 1).mean() < 0.65
    ranks = [list(BalancedBatchSampler(groups, 8, seed=1, steps=50, rank=r, world_size=2)) for r in (0, 1)]
    assert all(sorted(a + b) == sorted(f) for a, b, f in zip(*ranks, full))
    with pytest.raises(ValueError, match="divisible"):
        BalancedBatchSampler(groups, 7, seed=1, steps=5, world_size=2)


def test_dataset_cached_equals_lazy(slices):
    st = SliceStore(slices)
    rows = st.indices("train")[:10]
    cached = SliceDataset(slices, rows, with_masks=True)
    lazy = SliceDataset(slices, rows, with_masks=True, cache_limit_bytes=0)
    assert cached.cached and not lazy.cached
    a, b = cached[3], lazy[3]
    assert a["image"].shape == (2, 16, 16) and a["mask"].shape == (1, 16, 16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "mask" not in SliceDataset(slices, rows)[0]


def test_weak_models_never_read_masks(slices, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("ground truth read by a weakly supervised model")

    monkeypatch.setattr(cldf.store, "read_ground_truth", forbidden)
    for kind in ("cdm", "noisy_classifier", "cam_classifier"):
        train_model(kind, slices, {**TINY[kind], "steps": 2}, tmp_path / f"{kind}.pt", CPU, seed=0)
    with pytest.raises(AssertionError, match="ground truth"):
        train_model("fsl_unet", slices, {**TINY["fsl_unet"], "steps": 2}, tmp_path / "fsl.pt", CPU, seed=0)


def test_training_outputs(trained):
    for kind, (path, metrics) in trained.items():
        assert path.exists() and not resume_path(path).exists()
        assert json.loads(path.with_suffix(".json").read_text()) == json.loads(json.dumps(metrics))
        csv = path.with_suffix(".loss.csv").read_text().splitlines()
        assert csv[0] == "step,loss" and len(csv) == TINY[kind]["steps"] + 1
        assert path.with_suffix(".loss.png").read_bytes()[:4] == b"\x89PNG"
        assert metrics["val_source"] == "val split" and metrics["val_slices"] > 0
        payload = load_checkpoint(path)
        assert "optimizer" not in payload and payload["step"] == TINY[kind]["steps"]
        model = load_model(path, CPU)
        assert count_parameters(model) == metrics["parameters"]
    assert load_checkpoint(trained["cdm"][0])["ema_state_dict"] is not None


def test_cam_classifier_learns(trained):
    metrics = trained["cam_classifier"][1]
    assert metrics["val_auc"] >= 0.9 and metrics["val_accuracy"] >= 0.85


def test_noisy_classifier_learns(trained):
    metrics = trained["noisy_classifier"][1]
    assert metrics["val_auc_t_le_200"] >= 0.9
    assert metrics["val_auc_t_le_200"] >= metrics["val_auc"] - 0.05  # low noise is the easier regime


def test_cdm_learns_and_samples(trained, tmp_path):
    path, metrics = trained["cdm"]
    losses = np.loadtxt(path.with_suffix(".loss.csv"), delimiter=",", skiprows=1)[:, 1]
    assert losses[-20:].mean() < 0.6 * losses[:10].mean()
    assert metrics["val_eps_mse"] < 0.5
    cdm = load_model(path, CPU)
    gen = torch.Generator().manual_seed(0)
    images = sample_images(cdm, build_scheduler(), 3, 1, 16, 2, gen, steps=10)
    assert images.shape == (3, 2, 16, 16) and images.abs().max() <= 1
    again = sample_images(cdm, build_scheduler(), 3, 1, 16, 2, torch.Generator().manual_seed(0), steps=10)
    assert torch.equal(images, again)
    stats = save_sample_grid(path, tmp_path / "grid.png", 4, CPU, seed=0, steps=10, guidance_scale=3.0)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert stats["channel"] == "flair"  # the tiny store's channels are flair, t1
    for y in (0, 1):  # the statistics are those of the FLAIR channel of the paired samples of each class
        flair = sample_images(cdm, build_scheduler(), 4, y, 16, 2, torch.Generator().manual_seed(0), 10, 3.0)[:, 0]
        assert stats[f"bright_fraction_y{y}"] == pytest.approx(float((flair > BRIGHT_LEVEL).float().mean()))


def test_fsl_unet_learns(trained):
    assert trained["fsl_unet"][1]["val_dice_positive_mean"] >= 0.5


def test_training_leaves_global_rng_alone(slices, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_model("cam_classifier", slices, {**TINY["cam_classifier"], "steps": 2}, tmp_path / "c.pt", CPU, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_training_is_seeded(slices, tmp_path):
    settings = {**TINY["cam_classifier"], "steps": 3}
    torch.manual_seed(1)
    train_model("cam_classifier", slices, settings, tmp_path / "a.pt", CPU, seed=4)
    torch.manual_seed(2)
    train_model("cam_classifier", slices, settings, tmp_path / "b.pt", CPU, seed=4)
    a, b = load_checkpoint(tmp_path / "a.pt")["state_dict"], load_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
