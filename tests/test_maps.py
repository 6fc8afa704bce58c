"""Tests of cldf.maps: diffusion features, mean-gradient maps, CAMs, CDM saliency and the shard steps."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import zarr
from monai.networks.nets import DiffusionModelUNet, resnet18
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from monai.networks.schedulers import DDPMScheduler
from monai.visualize import GradCAM, GradCAMpp
from torch.nn import functional as F

from cldf.maps.cams import compute_cam, positive_probability
from cldf.maps.common import feature_noise
from cldf.models.tensors import normalise_per_slice
from cldf.maps.features import extract_features
from cldf.maps.gradients import mean_gradient
from cldf.maps.layers import fuse_layers, fuse_store
from cldf.maps.run import run_map
from cldf.maps.saliency import cdm_saliency, ddim_timesteps
from cldf.config import load_config
from cldf.models.builders import build_model
from cldf.registry import MAPS, METHOD_NETWORKS
from cldf.maps.common import Batch
from cldf.store import GROUND_TRUTH, ArrayStoreWriter, MapStore, SliceStore, open_store

from .fixtures_slices import write_map_store

C, H = 2, 16
LAYERS = ["up_blocks.0", "up_blocks.2"]


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def _cdm(channels: int = C) -> torch.nn.Module:
    """A tiny CDM whose zero-initialised layers (MONAI zeroes e.g. each resblock's last conv) are randomised,
    so that the output depends on the input, the timestep and the class."""
    torch.manual_seed(0)
    cdm = DiffusionModelUNet(
        spatial_dims=2, in_channels=channels, out_channels=channels, channels=[8, 16, 16],
        attention_levels=[False, False, True], num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
        num_class_embeds=3,
    )
    with torch.no_grad():
        for p in cdm.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return _freeze(cdm)


def _noisy_classifier(size: int = H, channels: int = C) -> torch.nn.Module:
    torch.manual_seed(0)
    return DiffusionModelEncoder(
        spatial_dims=2, in_channels=channels, out_channels=2, input_shape=(size, size), channels=[8, 16],
        attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
    )


def _resnet(channels: int = C) -> torch.nn.Module:
    """A tiny ResNet-18 without the stem's downsampling: layer1..4 at H, H/2, H/4, H/8."""
    torch.manual_seed(0)
    return resnet18(spatial_dims=2, n_input_channels=channels, num_classes=2, widen_factor=0.25,
                    conv1_t_stride=1, no_max_pool=True)


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, C, H, H, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def slices_path(tmp_path_factory) -> str:
    """A slice store of 3 cases x 4 slices (C=2, 16x16; train, val, test) whose ground truth is removed."""
    path = tmp_path_factory.mktemp("data") / "slices"
    n = 12
    rng = np.random.default_rng(0)
    arrays = {
        "images": ((C, H, H), np.float16), "body": ((H, H), np.uint8), "labels": ((), np.int8),
        "case_index": ((), np.int32), "slice_index": ((), np.int32), "split": ((), np.uint8),
        "slice_ids": ((), np.int64), f"{GROUND_TRUTH}/masks": ((H, H), np.uint8),
    }
    attrs = {"dataset": "toy", "modalities": ["a", "b"], "image_size": H,
             "cases": [{"id": f"c{i}", "split": s} for i, s in enumerate(["train", "val", "test"])]}
    with ArrayStoreWriter(path, n, arrays, attrs) as w:
        w.write("images", 0, rng.uniform(-1, 1, (n, C, H, H)))
        w.write("body", 0, np.ones((n, H, H)))
        w.write("labels", 0, np.tile([1, 0, -1, 1], 3))
        w.write("case_index", 0, np.repeat(np.arange(3), 4))
        w.write("slice_index", 0, np.tile(np.arange(4), 3))
        w.write("split", 0, np.repeat([0, 1, 2], 4))  # case 0 train, case 1 val, case 2 test
        w.write("slice_ids", 0, np.arange(n))
        w.write(f"{GROUND_TRUTH}/masks", 0, np.zeros((n, H, H)))
    shutil.rmtree(path / GROUND_TRUTH)  # method code must never need it
    return str(path)


# ----------------------------------------------------------------------------------------- helpers


def test_normalise_per_slice_range_and_constant():
    maps = torch.stack([torch.arange(16.0).reshape(4, 4), torch.full((4, 4), 3.0)])
    out = normalise_per_slice(maps)
    assert out[0].min() == 0 and out[0].max() == 1
    assert torch.all(out[1] == 0)


def test_feature_noise_depends_only_on_seed_and_slice():
    a = feature_noise([3, 7, 9], 2, (C, H, H), seed=1)
    b = feature_noise([9, 3], 2, (C, H, H), seed=1)
    assert a.shape == (2, 3, C, H, H)
    assert torch.equal(a[:, 0], b[:, 1]) and torch.equal(a[:, 2], b[:, 0])
    assert not torch.equal(a[:, 0], feature_noise([3], 2, (C, H, H), seed=2)[:, 0])
    assert not torch.equal(a[0, 0], a[1, 0])
    assert feature_noise([], 2, (C, H, H), seed=1).shape == (2, 0, C, H, H)


# ---------------------------------------------------------------------------------------- features


def test_extract_features_shapes_native_resolution_and_hooks(scheduler):
    cdm = _cdm()
    x, y = _images(3), torch.tensor([1, 0, 1])
    feats = extract_features(cdm, scheduler, x, y, [1, 50], LAYERS, feature_noise([0, 1, 2], 2, (C, H, H), 0))
    assert [tuple(f.shape) for f in feats] == [(3, 16, H // 2, H // 2), (3, 8, H, H)]
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in feats)
    assert _no_hooks(cdm)


def test_extract_features_timesteps_batched_equals_looped_and_batch_invariant(scheduler):
    cdm = _cdm()
    x, y = _images(4), torch.tensor([1, 0, 1, 1])
    ts = [1, 10, 100]
    noise = feature_noise(range(4), len(ts), (C, H, H), seed=0)
    batched = extract_features(cdm, scheduler, x, y, ts, LAYERS, noise)
    looped = [extract_features(cdm, scheduler, x, y, [t], LAYERS, noise[i : i + 1]) for i, t in enumerate(ts)]
    for k in range(len(LAYERS)):
        torch.testing.assert_close(batched[k], torch.stack([lp[k] for lp in looped]).mean(0), atol=1e-5, rtol=1e-5)
    single = extract_features(cdm, scheduler, x[2:3], y[2:3], ts, LAYERS, noise[:, 2:3])
    for k in range(len(LAYERS)):
        torch.testing.assert_close(batched[k][2:3], single[k], atol=1e-5, rtol=1e-5)
    again = extract_features(cdm, scheduler, x, y, ts, LAYERS, noise)
    assert all(torch.equal(a, b) for a, b in zip(batched, again))


def test_extract_features_conditions_on_labels(scheduler):
    cdm = _cdm()
    x = _images(1).repeat(2, 1, 1, 1)
    noise = feature_noise([0, 0], 1, (C, H, H), 0)
    feats = extract_features(cdm, scheduler, x, torch.tensor([0, 1]), [10], LAYERS, noise)
    assert not torch.allclose(feats[0][0], feats[0][1])


def test_extract_features_bad_layer_lists_valid_names(scheduler):
    cdm = _cdm()
    with pytest.raises(ValueError, match="up_blocks.1"):
        extract_features(cdm, scheduler, _images(1), torch.tensor([1]), [1], ["decoder.9"],
                         feature_noise([0], 1, (C, H, H), 0))
    assert _no_hooks(cdm)


# --------------------------------------------------------------------------------------- gradients


def test_mean_gradient_range_determinism_per_sample_and_reference(scheduler):
    clf = _noisy_classifier().eval()  # parameters left trainable: they must not receive gradients
    x, ts = _images(4), [10, 50, 120]
    noise = feature_noise(range(4), len(ts), (C, H, H), seed=0)
    maps = mean_gradient(clf, scheduler, x, ts, "mean_abs", noise)
    assert maps.shape == (4, H, H) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert all(p.grad is None for p in clf.parameters())
    assert torch.equal(maps, mean_gradient(clf, scheduler, x, ts, "mean_abs", noise))
    single = mean_gradient(clf, scheduler, x[1:2], ts, "mean_abs", noise[:, 1:2])
    torch.testing.assert_close(maps[1:2], single, atol=1e-5, rtol=1e-4)
    # reference: one sample, one timestep at a time
    raw = torch.zeros(4, H, H)
    for i, t in enumerate(ts):
        for b in range(4):
            xt = scheduler.add_noise(x[b : b + 1], noise[i, b : b + 1], torch.tensor([t])).requires_grad_(True)
            lp = F.log_softmax(clf(xt, timesteps=torch.tensor([t])), dim=1)[0, 1]
            raw[b] += torch.autograd.grad(lp, xt)[0][0].abs().mean(0) / len(ts)
    torch.testing.assert_close(maps, normalise_per_slice(raw), atol=1e-4, rtol=1e-4)
    for reduce in ("max_abs", "l2"):
        other = mean_gradient(clf, scheduler, x, ts, reduce, noise)
        assert other.shape == (4, H, H) and other.min() >= 0 and other.max() <= 1
    with pytest.raises(ValueError, match="mean_abs"):
        mean_gradient(clf, scheduler, x, ts, "sum", noise)


# -------------------------------------------------------------------------------------------- CAMs


@pytest.mark.parametrize("method,layers", [("gradcam", ["layer4"]), ("gradcampp", ["layer4"]),
                                           ("layercam", ["layer2", "layer3", "layer4"]), ("scorecam", ["layer3"])])
def test_cam_shapes_ranges_batch_invariance_hooks_and_grads(method, layers):
    model = _resnet().eval()  # trainable parameters must not accumulate gradients
    x = _images(4, seed=1)
    maps = compute_cam(method, model, x, layers)
    assert maps.shape == (4, H, H) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    per_sample = torch.cat([compute_cam(method, model, x[i : i + 1], layers) for i in range(4)])
    torch.testing.assert_close(maps, per_sample, atol=1e-4, rtol=1e-4)
    assert _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def _monai_reference(cls, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    cam = cls(nn_module=copy.deepcopy(model).requires_grad_(True), target_layers="layer4", postprocessing=lambda m: m)
    return normalise_per_slice(cam(x=x, class_idx=1)[:, 0])


def test_gradcam_matches_monai():
    model = _freeze(_resnet())
    x = _images(4, seed=2)
    for b in (1, 4):  # MONAI's GradCAM is batch-correct when class_idx is given
        torch.testing.assert_close(compute_cam("gradcam", model, x[:b], ["layer4"]),
                                   _monai_reference(GradCAM, model, x[:b]), atol=1e-5, rtol=1e-4)


def test_gradcampp_matches_monai_for_batch_one_and_works_for_batches():
    model = _freeze(_resnet())
    x = _images(3, seed=3)
    for i in range(3):  # MONAI adds 1e-7 to the alpha denominator, hence the looser tolerance
        torch.testing.assert_close(compute_cam("gradcampp", model, x[i : i + 1], ["layer4"]),
                                   _monai_reference(GradCAMpp, model, x[i : i + 1]), atol=2e-3, rtol=1e-3)
    assert compute_cam("gradcampp", model, x, ["layer4"]).shape == (3, H, H)


def test_layercam_fuses_layers_by_max():
    model = _freeze(_resnet())
    x = _images(2, seed=4)
    layers = ["layer2", "layer3", "layer4"]
    fused = compute_cam("layercam", model, x, layers)
    singles = torch.stack([compute_cam("layercam", model, x, [name]) for name in layers])
    torch.testing.assert_close(fused, singles.amax(0))


def test_cam_rejects_bad_method_and_layers():
    model = _freeze(_resnet())
    with pytest.raises(ValueError, match="unknown CAM method 'ablationcam'"):
        compute_cam("ablationcam", model, _images(1), ["layer4"])
    with pytest.raises(ValueError, match="exactly one"):
        compute_cam("gradcam", model, _images(1), ["layer3", "layer4"])
    with pytest.raises(ValueError, match="layer4"):
        compute_cam("gradcam", model, _images(1), ["layer9"])
    assert _no_hooks(model)


# ---------------------------------------------------------------------------------------- saliency


def test_ddim_timesteps():
    assert ddim_timesteps(200, 4) == [0, 50, 100, 150, 200]
    with pytest.raises(ValueError):
        ddim_timesteps(10, 20)


def test_cdm_saliency_range_determinism_and_batch_invariance(scheduler):
    cdm = _cdm()
    x, y = _images(3, seed=5), torch.ones(3, dtype=torch.long)
    maps = cdm_saliency(cdm, scheduler, x, y, noise_level=100, ddim_steps=3)
    assert maps.shape == (3, H, H) and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() == 1
    assert torch.equal(maps, cdm_saliency(cdm, scheduler, x, y, noise_level=100, ddim_steps=3))
    torch.testing.assert_close(maps[1:2], cdm_saliency(cdm, scheduler, x[1:2], y[1:2], 100, 3), atol=1e-4, rtol=1e-4)
    assert _no_hooks(cdm)


# --------------------------------------------------------------------------------- shard steps


def test_run_features_shards_batches_and_empty(slices_path, tmp_path):
    """The features are cached for the decoder's slices only: training and validation slices labelled 0 or 1
    (slices 0-3 train, 4-7 val, 8-11 test; every fourth slice from the third on is ambiguous)."""
    cdm, dev = _cdm(), torch.device("cpu")
    settings = {"timesteps": [1, 50], "layers": LAYERS, "batch_size": 4, "max_train_slices": 100}
    features = MAPS["features"]
    run_map(slices_path, features, cdm, settings, [0, 1, 2], tmp_path / "all", dev, seed=3)
    run_map(slices_path, features, cdm, {**settings, "batch_size": 1}, [2, 0], tmp_path / "a", dev, seed=3)
    run_map(slices_path, features, cdm, settings, [], tmp_path / "empty", dev, seed=3)
    full, part = open_store(tmp_path / "all"), MapStore(tmp_path / "a")
    assert full["slice_ids"][:].tolist() == [0, 1, 3, 4, 5, 7]
    assert part.slice_ids.tolist() == [0, 1, 3]
    assert full["layer_0"].dtype == np.float16 and full["layer_0"].shape == (6, 16, H // 2, H // 2)
    assert full["layer_1"].shape == (6, 8, H, H)
    assert full.attrs["map"] == "features" and full.attrs["settings"] == settings and full.attrs["image_size"] == H
    assert full.attrs["shapes"] == {"layer_0": [16, H // 2, H // 2], "layer_1": [8, H, H]}
    whole = MapStore(tmp_path / "all")
    for k in range(2):
        np.testing.assert_allclose(part.read(f"layer_{k}", [3, 1]).astype(np.float32),
                                   whole.read(f"layer_{k}", [3, 1]).astype(np.float32), atol=2e-3, rtol=2e-3)
        assert np.isfinite(full[f"layer_{k}"][:].astype(np.float32)).all()
    empty = open_store(tmp_path / "empty")
    assert empty["slice_ids"].shape == (0,) and empty["layer_1"].shape == (0, 8, H, H)
    run_map(slices_path, features, cdm, {**settings, "max_train_slices": 2}, [0, 1, 2], tmp_path / "cap", dev, seed=3)
    assert len(MapStore(tmp_path / "cap").slice_ids) == 2 + 3  # a seeded sample of 2 training slices, the val ones


def test_run_gradient_cam_saliency_stores(slices_path, tmp_path):
    dev = torch.device("cpu")
    run_map(slices_path, MAPS["mean_gradient"], _freeze(_noisy_classifier()),
            {"timesteps": [10, 20], "reduce": "l2", "batch_size": 3}, [1, 2], tmp_path / "mg", dev, seed=0)
    mg = open_store(tmp_path / "mg")
    assert mg["slice_ids"][:].tolist() == list(range(4, 12))
    assert mg["maps"].dtype == np.float16 and mg["maps"].shape == (8, H, H)
    assert 0 <= mg["maps"][:].min() and mg["maps"][:].max() <= 1
    cam_settings = {"layers": ["layer4"], "layercam_layers": [["layer3", "layer4"], ["layer2"]], "batch_size": 5}
    model = _freeze(_resnet())
    run_map(slices_path, MAPS["layercam"], model, cam_settings, [0, 1, 2], tmp_path / "cam", dev, seed=0)
    cam = open_store(tmp_path / "cam")
    assert cam["layers"].shape == (12, 3, H, H) and sorted(cam.array_keys()) == ["layers", "slice_ids"]
    images = torch.from_numpy(np.asarray(zarr.open_group(slices_path, mode="r")["images"][:], dtype=np.float32))
    fused = fuse_layers(cam["layers"][:].astype(np.float32), ["layer3", "layer4", "layer2"], ["layer3", "layer4"])
    np.testing.assert_allclose(fused, compute_cam("layercam", model, images, ["layer3", "layer4"]).numpy(), atol=1e-3)
    fuse_store(tmp_path / "cam", ["layer3", "layer4", "layer2"], ["layer2"], tmp_path / "fused")
    np.testing.assert_allclose(open_store(tmp_path / "fused")["maps"][:].astype(np.float32),
                               compute_cam("layercam", model, images, ["layer2"]).numpy(), atol=1e-3)
    run_map(slices_path, MAPS["gradcam"], model, cam_settings, [], tmp_path / "cam0", dev, seed=0)
    assert open_store(tmp_path / "cam0")["maps"].shape == (0, H, H)
    run_map(slices_path, MAPS["classifier_probs"], model, {"batch_size": 5}, [1, 2], tmp_path / "probs", dev, 0)
    probs = open_store(tmp_path / "probs")
    images = torch.from_numpy(np.asarray(zarr.open_group(slices_path, mode="r")["images"][4:12], dtype=np.float32))
    assert probs["slice_ids"][:].tolist() == list(range(4, 12)) and probs["probs"].dtype == np.float32
    np.testing.assert_allclose(probs["probs"][:], F.softmax(model(images), dim=1)[:, 1].detach().numpy(), atol=1e-5)
    torch.testing.assert_close(positive_probability(model, images), F.softmax(model(images), dim=1)[:, 1].detach())
    run_map(slices_path, MAPS["cdm_saliency"], _cdm(), {"noise_level": 50, "ddim_steps": 2, "batch_size": 4}, [0, 2],
            tmp_path / "sal", dev, seed=0)
    sal = open_store(tmp_path / "sal")  # the saliency baseline covers the validation and test slices only
    assert sal["slice_ids"][:].tolist() == list(range(8, 12)) and np.isfinite(sal["maps"][:].astype(np.float32)).all()


def test_every_registered_cam_runs_through_the_shard_step(slices_path, tmp_path):
    settings = {"layers": ["layer4"], "layercam_layers": [["layer3", "layer4"]], "scorecam_channels": 4, "batch_size": 6}
    resnet = _freeze(_resnet())
    cams = [m for m in MAPS.values() if m.family == "cam"]
    assert len(cams) >= 5 and any(m.model in METHOD_NETWORKS for m in cams)
    cpu = load_config()["presets"]["cpu"]
    for method in cams:
        torch.manual_seed(0)
        model = resnet if method.model == "cam_classifier" else _freeze(build_model(method.model, cpu[method.model], C))
        run_map(slices_path, method, model, settings, [0, 1], tmp_path / f"{method.name}", torch.device("cpu"), 0)
        maps = open_store(tmp_path / f"{method.name}")["layers" if method.per_layer else "maps"][:].astype(np.float32)
        assert maps.shape[0] == 8 and maps.shape[-2:] == (H, H), method.name
        assert maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0, method.name


# ---------------------------------------------------------------- real check: maps find the object

S = 32


def _blob_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (n, 1, S, S) with noise texture; half contain a bright disc. Returns images, labels, disc masks."""
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    labels = torch.arange(n) % 2
    centres = torch.randint(7, S - 7, (n, 2), generator=gen)
    disc = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2 <= 16)
    disc = disc & labels.bool()[:, None, None]
    images = -0.5 + 0.15 * torch.randn(n, 1, S, S, generator=gen) + 1.2 * disc[:, None].float()
    return images.clamp(-1, 1), labels, disc


def _inside_outside(maps: torch.Tensor, disc: torch.Tensor) -> tuple[float, float]:
    return float(maps[disc].mean()), float(maps[~disc].mean())


def test_real_cams_localise_the_object():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _resnet(channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        x, y, _ = _blob_data(16, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = _freeze(model)
    x, y, disc = _blob_data(32, gen)
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    pos = y == 1
    for method, layers, ratio in [("layercam", ["layer2", "layer3", "layer4"], 2.0), ("gradcam", ["layer4"], 2.0),
                                  ("gradcampp", ["layer4"], 1.5), ("scorecam", ["layer4"], 1.5)]:
        maps = compute_cam(method, model, x[pos], layers)
        inside, outside = _inside_outside(maps, disc[pos])
        assert inside > ratio * outside, (method, inside, outside)


def test_real_mean_gradient_localises_the_object():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    clf = _noisy_classifier(size=S, channels=1)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    clf.train()
    for _ in range(40):
        x, y, _ = _blob_data(16, gen)
        t = torch.randint(0, 200, (16,), generator=gen)
        xt = scheduler.add_noise(x, torch.randn(x.shape, generator=gen), t)
        loss = F.cross_entropy(clf(xt, timesteps=t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf = _freeze(clf)
    x, y, disc = _blob_data(16, gen)
    pos = y == 1
    ts = [10, 50, 100, 150, 200]
    maps = mean_gradient(clf, scheduler, x[pos], ts, "mean_abs", feature_noise(range(int(pos.sum())), len(ts), (1, S, S), 0))
    inside, outside = _inside_outside(maps, disc[pos])
    assert inside > 2 * outside, (inside, outside)


def test_features_computed_on_the_fly_equal_the_stored_ones(slices_path, tmp_path):
    """Segmentation computes features as it goes; under label conditioning they equal the cached ones, and
    the null-class and predicted conditionings never read a label."""
    from cldf.segment.features import ComputedFeatures, StoredFeatures, upsample_features

    cdm, dev = _cdm(), torch.device("cpu")
    settings = {"timesteps": [1, 50], "layers": LAYERS, "batch_size": 4, "max_train_slices": 100}
    ids = np.arange(12)
    run_map(slices_path, MAPS["features"], cdm, {**settings}, [0, 1, 2], tmp_path / "f", dev, seed=3)
    slices = SliceStore(slices_path)
    stored = torch.cat([f for _, f in StoredFeatures(tmp_path / "f", H, dev).batches(ids[:0], 4)] or [torch.zeros(0)])
    assert stored.numel() == 0  # the features store holds the decoder's slices only: none are in train/val here
    computed = ComputedFeatures(cdm, slices, settings, "label", 3, dev)
    assert computed.dim == 24
    feats = torch.cat([f for _, f in computed.batches(ids, 5)])
    direct = MAPS["features"].load()(cdm, Batch(torch.from_numpy(slices.images(ids)), slices.labels[ids], ids, 3),
                                     settings)
    torch.testing.assert_close(feats, upsample_features([f.half() for f in direct.values()], H), atol=2e-3, rtol=2e-3)
    probs = tmp_path / "probs"
    write_map_store(probs, ids, probs=np.linspace(0, 1, 12).astype(np.float32))
    for conditioning in ("null_class", "predicted"):
        source = ComputedFeatures(cdm, slices, settings, conditioning, 3, dev, MapStore(probs))
        first = torch.cat([f for _, f in source.batches(ids, 4)])
        slices.labels[:] = -slices.labels  # a different label for every labelled slice
        again = torch.cat([f for _, f in source.batches(ids, 4)])
        slices.labels[:] = -slices.labels
        assert torch.equal(first, again), conditioning
    with pytest.raises(ValueError, match="probability"):
        ComputedFeatures(cdm, slices, settings, "predicted", 3, dev)


def test_decoder_features_from_each_network_of_table2(slices_path):
    """Table 2's feature sources: the CAM classifier's layers on the clean image (no timestep, no class), the
    noisy classifier's encoder averaged over noise levels, the CDM; every one at the image's resolution."""
    from cldf.segment.features import ComputedFeatures, WithImage

    dev, slices, ids = torch.device("cpu"), SliceStore(slices_path), np.arange(6)
    sources = {"cam_classifier": (_resnet(), ["layer1", "layer2"], 16 + 32),
               "noisy_classifier": (_noisy_classifier(), ["down_blocks.0", "down_blocks.1"], 8 + 16),
               "cdm": (_cdm(), LAYERS, 24)}
    feats = {}
    for name, (model, layers, dim) in sources.items():
        source = ComputedFeatures(model, slices, {"source": name, "layers": layers, "timesteps": [1, 50]}, "label", 3, dev)
        assert source.dim == dim, name
        feats[name] = torch.cat([f for _, f in source.batches(ids, 4)])
        assert feats[name].shape == (6, dim, H, H) and feats[name].std() > 0, name
    resnet = sources["cam_classifier"]
    clean = ComputedFeatures(resnet[0], slices, {"source": "cam_classifier", "layers": resnet[1], "timesteps": [7]},
                             "null_class", 9, dev)
    torch.testing.assert_close(torch.cat([f for _, f in clean.batches(ids, 3)]), feats["cam_classifier"])
    with_image = WithImage(clean, slices)
    batch = next(with_image.batches(ids, 6))[1]
    assert with_image.dim == 48 + C and torch.equal(batch[:, 48:], torch.from_numpy(slices.images(ids)))
