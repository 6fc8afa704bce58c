"""Tests of cldf.maps.cdm_hu: the CDM saliency as Hu et al. (2023) run it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder
from torch.nn import functional as F

from cldf.maps.cdm_hu import cdm_hu_map, embedding_rows_replaced, hu_saliency
from cldf.maps.common import Batch, feature_noise
from cldf.models.tensors import normalise_per_slice
from cldf.models.builders import build_scheduler
from cldf.models.checkpoint import load_model
from cldf.models.train import train_model
from cldf.store import SliceStore, read_ground_truth
from tests.fixtures_slices import make_slices

pytestmark = pytest.mark.usefixtures("one_thread")

C, H = 2, 16
SETTINGS = {"t_start": 100, "moves": 10, "guidance_scale": 10.0, "perturbation": 0.05, "batch_size": 4}
CPU = torch.device("cpu")


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def _cdm() -> torch.nn.Module:
    """A tiny CDM whose zero-initialised layers are randomised, so that its output depends on everything."""
    torch.manual_seed(0)
    cdm = DiffusionModelUNet(
        spatial_dims=2, in_channels=C, out_channels=C, channels=[8, 16], attention_levels=[False, True],
        num_res_blocks=1, num_head_channels=8, norm_num_groups=8, num_class_embeds=3,
    )
    with torch.no_grad():
        for p in cdm.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return _frozen(cdm)


def _classifier() -> torch.nn.Module:
    torch.manual_seed(1)
    return _frozen(DiffusionModelEncoder(
        spatial_dims=2, in_channels=C, out_channels=2, input_shape=(H, H), channels=[8, 16],
        attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
    ))


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"cdm": _cdm(), "noisy_classifier": _classifier()}


def _batch(ids: list[int], seed: int = 0) -> Batch:
    """Images determined by the slice id alone (as in a slice store)."""
    images = torch.stack([torch.rand(C, H, H, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in ids])
    return Batch(images=images, labels=np.zeros(len(ids), np.int8), slice_ids=np.asarray(ids, np.int64), seed=seed)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())


def _reference(cdm, clf, images, noise, t_start, moves, scale, p) -> torch.Tensor:
    """A literal transcription of Hu et al.'s loop: a second CDM whose label-0 row is 0.95·e1 + 0.05·e0,
    two separate trajectories (labels 1 and 0, guidance to 1 and to 0), the signed difference summed."""
    abar = build_scheduler().alphas_cumprod.float()
    model2 = copy.deepcopy(cdm)
    with torch.no_grad():
        model2.class_embedding.weight[0] = (1 - p) * cdm.class_embedding.weight[1] + p * cdm.class_embedding.weight[0]

    def move(model, x, t, y):
        a, a_prev, tt = abar[t], abar[t - 1], torch.full((x.shape[0],), t)
        with torch.no_grad():
            eps = model(x, timesteps=tt, class_labels=torch.full_like(tt, y))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x_in = x.detach().requires_grad_(True)
        grad = torch.autograd.grad(F.log_softmax(clf(x_in, timesteps=tt), dim=1)[:, y].sum(), x_in)[0]
        eps = eps - (1 - a).sqrt() * scale * grad
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    sample = sample_2 = abar[t_start].sqrt() * images + (1 - abar[t_start]).sqrt() * noise
    diff = torch.zeros_like(images)
    for t in range(t_start, t_start - moves, -1):
        sample, sample_2 = move(cdm, sample, t, 1), move(model2, sample_2, t, 0)
        diff += sample - sample_2
    return diff.sum(1)


def test_timestep_mapping_by_alpha_bar():
    """Their t = 400 of a 4000-step linear schedule is our t = 100 (nearest ᾱ, ≈ 0.896)."""
    theirs = np.cumprod(1 - np.linspace(1e-4 / 4, 0.02 / 4, 4000))[400]
    ours = build_scheduler().alphas_cumprod.double().numpy()
    assert abs(theirs - 0.896) < 1e-3
    assert int(np.argmin(np.abs(ours - theirs))) == SETTINGS["t_start"]


def test_shapes_range_and_determinism(models):
    out = cdm_hu_map(models, _batch([3, 4, 5]), SETTINGS)
    assert set(out) == {"maps"}
    maps = out["maps"]
    assert maps.shape == (3, H, H) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert torch.all(maps.amin(dim=(1, 2)) == 0) and torch.all(maps.amax(dim=(1, 2)) == 1)
    torch.testing.assert_close(cdm_hu_map(models, _batch([3, 4, 5]), SETTINGS)["maps"], maps, atol=0, rtol=0)
    assert not torch.allclose(cdm_hu_map(models, _batch([3, 4, 5], seed=1), SETTINGS)["maps"], maps)


def test_batch_invariance(models):
    together = cdm_hu_map(models, _batch([3, 4, 5]), SETTINGS)["maps"]
    alone = cdm_hu_map(models, _batch([4]), SETTINGS)["maps"]
    reordered = cdm_hu_map(models, _batch([5, 9, 3]), SETTINGS)["maps"]
    # Maps lie in [0, 1]. Batched kernels may round differently by batch size (up to 3e-4 after ten guided
    # moves on some CPUs); noise drawn per batch position instead of per slice would differ by ~0.1 or more.
    torch.testing.assert_close(alone[0], together[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(reordered[0], together[2], atol=1e-3, rtol=0)
    torch.testing.assert_close(reordered[2], together[0], atol=1e-3, rtol=0)


def test_caller_cdm_unchanged_and_no_hooks_left(models):
    cdm = models["cdm"]
    before = {k: v.clone() for k, v in cdm.state_dict().items()}
    embedding = cdm.class_embedding
    cdm_hu_map(models, _batch([1, 2]), SETTINGS)
    assert cdm.class_embedding is embedding and _no_hooks(cdm) and _no_hooks(models["noisy_classifier"])
    after = cdm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not cdm.training and all(not p.requires_grad for p in cdm.parameters())


def test_hook_removed_on_error(models):
    def broken(x, timesteps):
        raise RuntimeError("classifier failed")

    with pytest.raises(RuntimeError, match="classifier failed"):
        cdm_hu_map({"cdm": models["cdm"], "noisy_classifier": broken}, _batch([1]), SETTINGS)
    assert _no_hooks(models["cdm"])


def test_embedding_override_only_replaces_trailing_rows(models):
    cdm = models["cdm"]
    vector = torch.arange(cdm.class_embedding.embedding_dim, dtype=torch.float32)
    labels = torch.tensor([0, 1, 1, 0])
    with embedding_rows_replaced(cdm, 2, vector):
        out = cdm.class_embedding(labels)
    assert torch.equal(out[:2], cdm.class_embedding.weight[labels[:2]])
    assert torch.equal(out[2], vector) and torch.equal(out[3], vector)
    assert _no_hooks(cdm)


def test_equals_literal_transcription_and_is_signed(models):
    """Batched, hooked implementation == Hu et al.'s loop with a modified model copy; the sign matters."""
    batch = _batch([7, 8])
    noise = feature_noise(batch.slice_ids, 1, (C, H, H), batch.seed)[0]
    diff = _reference(models["cdm"], models["noisy_classifier"], batch.images, noise, 100, 10, 10.0, 0.05)
    maps = cdm_hu_map(models, batch, SETTINGS)["maps"]
    # maps in [0, 1]: rounding of batched kernels stays under 1e-3 (1.8e-4 seen on AMD EPYC); errors of
    # the method change the map by > 0.1, as the sign checks below show
    torch.testing.assert_close(maps, normalise_per_slice(diff), atol=1e-3, rtol=0)
    assert (maps - normalise_per_slice(-diff)).abs().amax() > 0.5  # flipping the sign would change the map
    assert (maps - normalise_per_slice(diff.abs())).abs().amax() > 0.1  # and so would taking |difference|


def test_trajectories_differ_only_by_embedding_and_guidance(models):
    """No perturbation and no guidance: identical trajectories, a zero map; each alone makes them differ."""
    batch = _batch([2])
    noise = feature_noise(batch.slice_ids, 1, (C, H, H), 0)[0]
    cdm, clf = models["cdm"], models["noisy_classifier"]
    assert torch.all(hu_saliency(cdm, clf, batch.images, noise, 100, 10, 0.0, 0.0) == 0)
    assert hu_saliency(cdm, clf, batch.images, noise, 100, 10, 0.0, 0.05).max() == 1
    assert hu_saliency(cdm, clf, batch.images, noise, 100, 10, 10.0, 0.0).max() == 1


def test_rejects_an_unconditional_cdm(models):
    with pytest.raises(TypeError, match="class_embedding"):
        cdm_hu_map({**models, "cdm": torch.nn.Identity()}, _batch([1]), SETTINGS)


@pytest.mark.parametrize("t_start, moves", [(100, 0), (5, 10), (1000, 10)])
def test_rejects_bad_timesteps(models, t_start, moves):
    with pytest.raises(ValueError, match="moves"):
        cdm_hu_map(models, _batch([1]), {**SETTINGS, "t_start": t_start, "moves": moves})


# ------------------------------------------------------------------------------------- real check

NET = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8}
TRAIN = {
    "cdm": {**NET, "steps": 100, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 100, "ema_decay": 0.9,
            "class_dropout": 0.1},
    "noisy_classifier": {**NET, "steps": 100, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 100},
}


def test_trained_map_is_higher_inside_the_blobs(tmp_path: Path):
    """With a briefly trained CDM and noisy classifier, the map is higher on the target than elsewhere."""
    slices = make_slices(tmp_path / "slices")
    trained = {}
    for kind, settings in TRAIN.items():
        train_model(kind, slices, settings, tmp_path / f"{kind}.pt", CPU, seed=0)
        trained[kind] = _frozen(load_model(tmp_path / f"{kind}.pt", CPU))
    store = SliceStore(slices)
    rows = store.indices(split="train", labels=[1])[:24]
    truth = read_ground_truth(slices, rows).astype(bool)
    body = store.body(rows)
    batch = Batch(torch.from_numpy(store.images(rows)), store.labels[rows], rows, seed=0)
    maps = cdm_hu_map(trained, batch, SETTINGS)["maps"].numpy()
    inside, outside = maps[truth].mean(), maps[body & ~truth].mean()
    assert inside > outside + 0.1, (inside, outside)
