"""Tests of cldf.segment: selection, supervised contrastive loss, decoder, and a toy end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_otsu

import cldf.segment.cluster as cluster_module
import cldf.segment.selection as selection_module
import cldf.segment.supcon as supcon_module
from cldf.segment.cluster import cluster_slices, prototypes_of, run_segmentation, segment_ids
from cldf.segment.components import fill_holes, keep_components
from cldf.segment.context import vote_slices
from cldf.errors import PipelineError
from cldf.models.decoder import PixelDecoder, embed_slices
from cldf.segment.features import StoredFeatures, decoder_inputs, input_channels, iter_feature_batches, upsample_features
from cldf.segment.selection import activated, anchor_weights, select_pixels, select_stored
from cldf.segment.selftrain import self_train, vouched_anchors
from cldf.segment.supcon import supcon_loss
from cldf.segment.train import load_decoder, train_decoder
from cldf.store import MapStore, SliceStore, StoreError

from .fixtures_slices import write_map_store, write_slice_store


# ---------------------------------------------------------------- supervised contrastive loss


def brute_force_supcon(emb: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. L_out written as a plain double loop."""
    losses = []
    n = len(y)
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(emb[i] @ emb[a] / temperature) for a in range(n) if a != i)
        terms = [-torch.log(torch.exp(emb[i] @ emb[p] / temperature) / denominator) for p in positives]
        losses.append(sum(terms) / len(positives))
    return sum(losses) / len(losses)


def test_supcon_matches_brute_force_with_singleton_class():
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(9, 5, generator=gen, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 3])  # classes 2 and 3 have a single sample: not anchors
    for temperature in (0.1, 0.5, 1.0):
        assert torch.allclose(supcon_loss(emb, y, temperature), brute_force_supcon(emb, y, temperature))


@pytest.mark.parametrize("keep_bytes", [1 << 28, 0])  # exponentials kept for the backward, or recomputed
def test_supcon_chunked_gradients_match_brute_force(monkeypatch, keep_bytes):
    monkeypatch.setattr(supcon_module, "ANCHOR_CHUNK", 3)
    monkeypatch.setattr(supcon_module, "KEEP_BYTES", keep_bytes)
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1, 0])
    a = raw.clone().requires_grad_(True)
    supcon_loss(torch.nn.functional.normalize(a, dim=1), y, 0.2).backward()
    b = raw.clone().requires_grad_(True)
    brute_force_supcon(torch.nn.functional.normalize(b, dim=1), y, 0.2).backward()
    assert torch.allclose(a.grad, b.grad)


def test_supcon_anchor_weights_scale_each_anchor_term():
    """Weighted: ``sum w_i L_i / sum w_i`` (``sum w_i L_i`` under ``sum``), every sample still a positive and in
    the denominators; the ``L_i`` from the brute-force loop over one anchor at a time."""
    gen = torch.Generator().manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(8, 4, generator=gen, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])  # the class-2 sample is not an anchor: its weight is ignored
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.25, 1.0, 0.0, 9.0], dtype=torch.float64)
    per_anchor = torch.stack([supcon_loss(emb, y, 0.2, "sum", torch.eye(8, dtype=torch.float64)[i]) for i in range(7)])
    expected = (w[:7] * per_anchor).sum()
    assert torch.allclose(supcon_loss(emb, y, 0.2, "sum", w), expected)
    assert torch.allclose(supcon_loss(emb, y, 0.2, "mean", w), expected / w[:7].sum())
    assert torch.allclose(per_anchor.mean(), brute_force_supcon(emb, y, 0.2))
    assert torch.allclose(supcon_loss(emb, y, 0.2, "mean", torch.full((8,), 3.0, dtype=torch.float64)),
                          supcon_loss(emb, y, 0.2))
    with pytest.raises(ValueError, match="non-negative"):
        supcon_loss(emb, y, 0.2, "mean", -w)
    with pytest.raises(ValueError, match="sum to 0"):
        supcon_loss(emb, y, 0.2, "mean", torch.zeros(8, dtype=torch.float64))


def test_supcon_properties():
    gen = torch.Generator().manual_seed(2)
    y = torch.tensor([0] * 5 + [1] * 5)
    separated = torch.zeros(10, 3)
    separated[:5, 0] = 1.0
    separated[5:, 0] = -1.0
    mixed = torch.nn.functional.normalize(torch.randn(10, 3, generator=gen), dim=1)
    # Perfectly separated: every anchor's 4 positives share its direction, its 5 negatives are opposite,
    # so the loss approaches its infimum log(4) as the temperature falls.
    assert supcon_loss(separated, y, 0.05) == pytest.approx(math.log(4), abs=1e-6)
    assert supcon_loss(separated, y, 0.05) < supcon_loss(separated, y, 0.5) < supcon_loss(mixed, y, 0.5)
    # Temperature enters only through z_i.z_j / t: scaling the embeddings by 2 equals dividing t by 4.
    assert torch.allclose(supcon_loss(2 * mixed, y, 0.4), supcon_loss(mixed, y, 0.1))
    # Numerically stable at tiny temperatures (logits up to 1e4).
    assert torch.isfinite(supcon_loss(mixed, y, 1e-4))
    with pytest.raises(ValueError):
        supcon_loss(mixed[:3], torch.tensor([0, 1, 2]), 0.1)
    # The paper's equation 1 sums over anchors: every anchor here has a positive, so sum = 10 x mean.
    assert torch.allclose(supcon_loss(mixed, y, 0.5, "sum"), 10 * supcon_loss(mixed, y, 0.5))
    y_single = torch.tensor([0, 0, 0, 1])  # the lone 1 is no anchor
    assert torch.allclose(supcon_loss(mixed[:4], y_single, 0.5, "sum"), 3 * supcon_loss(mixed[:4], y_single, 0.5))


# ---------------------------------------------------------------- pixel selection


def _square(size: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    out = torch.zeros(size, size, dtype=torch.bool)
    out[r0:r1, c0:c1] = True
    return out


def test_activated_otsu_finds_high_mode_inside_body_only():
    gen = torch.Generator().manual_seed(0)
    high = _square(16, 4, 9, 4, 9)
    body = _square(16, 1, 15, 1, 15)
    maps = 0.2 + 0.05 * torch.randn(3, 16, 16, generator=gen)
    maps[0][high] += 0.6  # two Gaussian modes, 0.2 and 0.8
    maps[1][:, 0] = 1.0  # a high stripe outside the body, nothing else: not activated
    maps[2] = 0.5  # constant
    act = activated(maps, body.expand(3, 16, 16), "otsu")
    assert torch.equal(act[0], high)
    assert not act[1][:, 0].any()
    assert not act[2].any()
    quantile = activated(maps[:1], body[None], "quantile", 0.75)
    assert abs(quantile.sum().item() / body.sum().item() - 0.25) < 0.02


def test_select_pixels_fusion_labels_and_body():
    size = 12
    body = _square(size, 0, size, 0, 10).expand(3, size, size)
    a = _square(size, 2, 7, 2, 7)
    b = _square(size, 4, 9, 4, 9)
    cam = torch.where(a, 1.0, 0.0).expand(3, size, size).clone()
    mg = torch.where(b, 1.0, 0.0).expand(3, size, size).clone()
    cam[:, :, 10:] = 1.0  # outside the body
    labels = torch.tensor([1, 0, -1])
    fg, bg = select_pixels(cam, mg, labels, body, "fused", "otsu")
    assert torch.equal(fg[0], a & b)
    assert torch.equal(bg[0], body[0] & ~(a | b))
    assert not fg[1].any() and torch.equal(bg[1], body[1])  # negative slice: only background
    assert not fg[2].any() and not bg[2].any()  # ambiguous slice: nothing
    assert not (fg | bg)[:, :, 10:].any()  # outside the body: never selected
    fg_cam, bg_cam = select_pixels(cam, None, labels, body, "cam", "otsu")
    assert torch.equal(fg_cam[0], a) and torch.equal(bg_cam[0], body[0] & ~a)
    fg_mg, bg_mg = select_pixels(None, mg, labels, body, "mg", "otsu")
    assert torch.equal(fg_mg[0], b) and torch.equal(bg_mg[0], body[0] & ~b)
    with pytest.raises(ValueError):
        select_pixels(cam, None, labels, body, "fused", "otsu")


def test_select_pixels_leaves_the_unsure_band_out_with_a_looser_background_rule():
    """Top-quantile foreground, Otsu background: pixels between the two thresholds are in neither set."""
    size = 16
    body = _square(size, 0, size, 0, size)[None]
    core, rim = _square(size, 6, 10, 6, 10), _square(size, 4, 12, 4, 12)
    ramp = torch.where(rim, 0.6, 0.1) + torch.where(core, 0.3, 0.0)  # core 0.9, rim 0.6, rest 0.1
    maps = (ramp + 0.001 * torch.arange(size * size).view(size, size) / (size * size))[None]
    labels = torch.tensor([1])
    fg, bg = select_pixels(maps, maps, labels, body, "fused", "quantile", 1 - 16 / 256, background="otsu")
    assert torch.equal(fg[0], core)  # top 16 of 256 pixels: the core
    assert torch.equal(bg[0], ~rim)  # Otsu splits 0.1 from 0.6/0.9: the rim is neither
    fg_same, bg_same = select_pixels(maps, maps, labels, body, "fused", "quantile", 1 - 16 / 256)
    assert torch.equal(fg_same, fg) and torch.equal(bg_same[0], ~core)  # the default: one rule for both
    with pytest.raises(ValueError, match="background rule"):
        select_pixels(maps, maps, labels, body, "fused", "otsu", background="half")


def test_select_pixels_background_keeps_its_margin_from_every_activated_pixel():
    """``margin: m``: background pixels of a positive slice lie more than m pixels (Chebyshev) from any
    pixel a map activates; negative slices keep their whole body; the foreground is unchanged."""
    size = 16
    body = torch.ones(2, size, size, dtype=torch.bool)
    core = _square(size, 6, 10, 6, 10)
    maps = torch.where(core, 0.9, 0.1).expand(2, size, size).clone()
    labels = torch.tensor([1, 0])
    fg0, bg0 = select_pixels(maps, maps, labels, body, "fused", "otsu", background="otsu")
    fg2, bg2 = select_pixels(maps, maps, labels, body, "fused", "otsu", background="otsu", margin=2)
    assert torch.equal(fg2, fg0) and torch.equal(fg2[0], core)
    assert torch.equal(bg0[0], ~core)
    assert torch.equal(bg2[0], ~_square(size, 4, 12, 4, 12))  # the core grown by 2 on every side
    assert torch.equal(bg2[1], body[1])  # a negative slice: all background
    with pytest.raises(ValueError, match="margin"):
        select_pixels(maps, maps, labels, body, "fused", "otsu", margin=-1)


def test_select_pixels_foreground_and_background_never_overlap():
    """A top-quantile foreground above a map's Otsu threshold is never background, whatever the rules."""
    size = 16
    body = torch.ones(1, size, size, dtype=torch.bool)
    values = torch.arange(size * size, dtype=torch.float32).view(1, size, size) / (size * size)
    maps = values ** 8  # a few very bright pixels put Otsu above the 70 % quantile
    fg, bg = select_pixels(maps, maps, torch.tensor([1]), body, "fused", "quantile", 0.7, background="otsu")
    assert fg.sum() > 0 and not (fg & bg).any()


def test_select_pixels_per_case_pools_the_positive_slices_of_a_case():
    """One quantile over a case's positive slices: a slice through a large target gives more foreground
    than one through its edge; negative slices and other cases do not move the threshold."""
    size = 10
    body = torch.ones(4, size, size, dtype=torch.bool)
    maps = torch.rand(4, size, size, generator=torch.Generator().manual_seed(0)) * 0.1
    maps[0][_square(size, 0, 6, 0, 6)] += 0.9  # large target: 36 pixels
    maps[1][_square(size, 0, 2, 0, 2)] += 0.9  # its edge: 4 pixels
    maps[2] += 0.95  # a negative slice, brighter than anything
    maps[3][_square(size, 0, 6, 0, 6)] += 0.9  # another case's slice
    labels, cases = torch.tensor([1, 1, 0, 1]), np.array([0, 0, 0, 1])
    q = 1 - 40 / 200  # the top 40 pixels of the two positive slices of case 0
    fg, _ = select_pixels(maps, maps, labels, body, "fused", "quantile", q, background="otsu", cases=cases)
    assert fg[0].sum() == 36 and fg[1].sum() == 4 and not fg[2].any()
    assert fg[3].sum() == 20  # case 1 alone: its own top 20 %
    per_slice, _ = select_pixels(maps, maps, labels, body, "fused", "quantile", q, background="otsu")
    assert per_slice[0].sum() == 20 and per_slice[1].sum() == 20
    with pytest.raises(ValueError, match="one value per slice"):
        activated(maps, body, "otsu", groups=np.zeros(3))


# ---------------------------------------------------------------- decoder and features


def test_decoder_normalised_and_embed_slices_equivalent():
    torch.manual_seed(0)
    decoder = PixelDecoder(7, [16, 16, 16, 16])
    x = torch.randn(50, 7)
    emb = decoder(x)
    assert emb.shape == (50, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(50), atol=1e-5)
    feats = torch.randn(2, 7, 5, 6)
    maps = embed_slices(decoder, feats)
    assert maps.shape == (2, 16, 5, 6)
    per_pixel = decoder(feats.permute(0, 2, 3, 1).reshape(-1, 7)).reshape(2, 5, 6, 16).permute(0, 3, 1, 2)
    assert torch.allclose(maps, per_pixel, atol=1e-6)


def test_upsample_features():
    low = torch.full((2, 3, 4, 4), 2.0, dtype=torch.float16)
    full = torch.randn(2, 5, 16, 16)
    out = upsample_features([low, full], 16)
    assert out.shape == (2, 8, 16, 16) and out.dtype == torch.float32
    assert torch.all(out[:, :3] == 2.0)
    assert torch.equal(out[:, 3:], full)


# ---------------------------------------------------------------- toy end-to-end

SIZE = 32


def _disk(size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[:size, :size]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def _make_toy(root: Path, n_val: int = 0) -> dict:
    """Slices, features (8×8 and 32×32 layers), CAM and MG stores of a toy 'tumour' dataset; the first
    ``n_val`` positive training slices are validation slices instead."""
    rng = np.random.default_rng(0)
    split_names = ["val"] * n_val + ["train"] * (28 - n_val) + ["test"] * 10
    labels = np.array([1] * 20 + [0] * 8 + [1] * 8 + [0] * 2, dtype=np.int8)
    n = len(labels)
    body = np.zeros((n, SIZE, SIZE), dtype=bool)
    truth = np.zeros((n, SIZE, SIZE), dtype=bool)
    cam = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    mg = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    low = np.zeros((n, 6, 8, 8), dtype=np.float32)
    full = np.zeros((n, 4, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        body[i] = _disk(SIZE, (15.5 + rng.uniform(-1, 1), 15.5 + rng.uniform(-1, 1)), 13)
        if labels[i] == 1:
            r = rng.uniform(3, 6)
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 12 - r - 1)
            truth[i] = _disk(SIZE, (15.5 + dist * np.sin(angle), 15.5 + dist * np.cos(angle)), r) & body[i]
            # CAM: blurry and shifted; MG: a sparse, noisy, partial version of the blob.
            cam[i] = _normalise(gaussian_filter(np.roll(truth[i], (2, 2), axis=(0, 1)).astype(float), 3))
            kept = truth[i] & (rng.uniform(size=truth[i].shape) > 0.4)
            mg[i] = _normalise(gaussian_filter(kept + 0.3 * rng.uniform(size=kept.shape), 1))
        else:
            cam[i] = _normalise(gaussian_filter(rng.uniform(size=(SIZE, SIZE)), 4))
            mg[i] = _normalise(gaussian_filter(rng.uniform(size=(SIZE, SIZE)), 1))
        t, b = truth[i].astype(np.float32), body[i].astype(np.float32)
        t_low = t.reshape(8, 4, 8, 4).mean(axis=(1, 3))
        b_low = b.reshape(8, 4, 8, 4).mean(axis=(1, 3))
        low[i] = rng.normal(0, 0.5, size=low[i].shape)
        low[i, :3] += 2.0 * t_low
        low[i, 3] += 1.5 * b_low
        full[i] = rng.normal(0, 1.0, size=full[i].shape)
        full[i, :2] += 1.5 * t
        full[i, 2] += 2.0 * b
    ids = np.arange(n, dtype=np.int64)
    paths = {name: root / f"{name}" for name in ("slices", "features", "cam", "mg", "probs")}
    write_slice_store(paths["slices"], np.zeros((n, 1, SIZE, SIZE), np.float32), labels, ids, split_names, truth,
                      body=body, slice_index=np.zeros(n), modalities=["t1"])
    order = ids[::-1]  # the features store lists the slices in another order than slices
    write_map_store(paths["features"], order, {"settings": {"layers": ["a", "b"]}}, layer_0=low[order].astype(np.float16),
                    layer_1=full[order].astype(np.float16))
    for name, maps in (("cam", cam), ("mg", mg)):
        write_map_store(paths[name], ids, maps=maps.astype(np.float16))
    write_map_store(paths["probs"], ids, probs=np.where(labels == 1, 0.9, 0.1).astype(np.float32))
    split = np.array(split_names)
    return {"paths": paths, "truth": truth, "body": body, "cam": cam, "labels": labels, "split": split, "low": low}


SETTINGS = {
    "selection": {
        "mode": "fused", "threshold": "otsu", "quantile": 0.8, "max_background": 400, "max_foreground": 400
    },
    "decoder": {
        "widths": [16, 16, 16, 16], "temperature": 0.1, "optimizer": "adam", "lr": 1e-2, "loss": "mean", "epochs": 6,
        "batch_size": 4,
    },
}
CLUSTER = {"k": 2, "inside_body": True}
CPU = torch.device("cpu")


def _segment_test(data: dict, decoder: Path, out: Path) -> None:
    """Masks of the test slices, clustering the positive ones only (the labelled protocol)."""
    test = np.flatnonzero(data["split"] == "test")
    features = StoredFeatures(data["paths"]["features"], SIZE, CPU)
    run_segmentation(data["paths"]["slices"], features, {"masks": decoder}, CLUSTER, test, data["labels"][test] != 0,
                     out, CPU, seed=3)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("toy")
    data = _make_toy(root)
    p = data["paths"]
    data["decoder"] = root / "decoder.pt"
    features = StoredFeatures(p["features"], SIZE, CPU)
    _, checkpoint = train_decoder(p["slices"], features, p["cam"], p["mg"], SETTINGS, data["decoder"], 3, 1000)
    data["stats"] = checkpoint["stats"]
    _segment_test(data, data["decoder"], root / "masks")
    data["masks"] = root / "masks"
    data["root"] = root
    return data


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_iter_feature_batches_follows_requested_order(toy):
    ids = np.array([5, 0, 7], dtype=np.int64)
    batches = list(iter_feature_batches(toy["paths"]["features"], ids, 2, SIZE, torch.device("cpu")))
    assert [b[0].tolist() for b in batches] == [[5, 0], [7]]
    feats = torch.cat([f for _, f in batches])
    assert feats.shape == (3, 10, SIZE, SIZE) and feats.dtype == torch.float32
    low = torch.from_numpy(toy["low"][ids].astype(np.float16).astype(np.float32))
    assert torch.allclose(feats[:, :6], upsample_features([low], SIZE))


def test_the_decoder_sees_the_image_channels_of_neighbouring_slices_of_the_same_case(tmp_path):
    """2.5-D input (``cldf.decoder.image_context``): each pixel carries the images of slices z - r .. z + r
    of its own case, its own in the middle; a neighbour the store lacks repeats the nearest one it has."""
    # case 0: slices z = 0, 1, 2, 4 (3 missing); case 1: z = 0, 1. Slice k's image is the constant k.
    case_index, slice_index = [0, 0, 0, 0, 1, 1], [0, 1, 2, 4, 0, 1]
    images = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None, None], (6, 1, 4, 4)).copy()
    path = write_slice_store(tmp_path / "s", images, [1] * 6, case_index, ["train", "train"],
                             np.zeros((6, 4, 4), bool), slice_index=slice_index)
    slices = SliceStore(path)
    ids = np.arange(6, dtype=np.int64)
    write_map_store(tmp_path / "f", ids, {"settings": {"layers": ["a"]}}, layer_0=np.zeros((6, 2, 2, 2), np.float16))
    features = StoredFeatures(tmp_path / "f", 4, CPU)
    plain = decoder_inputs(features, slices, {"with_image": True, "image_context": 0})
    wide = decoder_inputs(features, slices, {"with_image": True, "image_context": 2})
    assert (plain.dim, wide.dim) == (3, 7) and wide.channel_groups == [("a", 2), ("image", 5)]
    batch = torch.cat([f for _, f in wide.batches(ids[::-1].copy(), 4)])[:, 2:, 0, 0]
    expected = [[4, 4, 5, 5, 5], [4, 4, 4, 5, 5], [2, 3, 3, 3, 3], [0, 1, 2, 2, 3], [0, 0, 1, 2, 2], [0, 0, 0, 1, 2]]
    assert batch.tolist() == expected
    assert torch.equal(torch.cat([f for _, f in plain.batches(ids, 6)])[:, 2:, 0, 0], torch.arange(6.0)[:, None])
    with pytest.raises(ValueError, match="image context"):
        decoder_inputs(features, slices, {"with_image": True, "image_context": -1})


def test_training_stats_and_checkpoint(toy):
    stats = toy["stats"]
    assert stats["n_train_slices"] == 28 and stats["steps"] > 0
    assert all(loss is not None and math.isfinite(loss) for loss in stats["loss"])
    assert stats["loss"][-1] < stats["loss"][0]
    decoder, checkpoint = load_decoder(toy["decoder"], torch.device("cpu"))
    assert decoder.in_dim == 10 and decoder.out_dim == 16
    fg, bg = checkpoint["prototypes"]["foreground"], checkpoint["prototypes"]["background"]
    assert fg.shape == (16,) and torch.isclose(fg.norm(), torch.tensor(1.0))
    assert float(fg @ bg) < 0.8  # the two prototypes point in clearly different directions


def test_decoder_reads_only_the_channels_of_its_feature_layers(toy):
    p, root = toy["paths"], toy["root"]
    features = StoredFeatures(p["features"], SIZE, CPU)
    assert features.channel_groups == [("a", 6), ("b", 4)]
    with_image = decoder_inputs(features, SliceStore(p["slices"]), {"with_image": True, "image_context": 0})
    assert input_channels(with_image.channel_groups, ["b"]) == [6, 7, 8, 9, 10]  # its layer and the image
    with pytest.raises(StoreError, match=r"\['c'\] missing"):
        input_channels(features.channel_groups, ["b", "c"])
    settings = {**SETTINGS, "decoder": {**SETTINGS["decoder"], "feature_layers": ["b"]}}
    train_decoder(p["slices"], features, p["cam"], p["mg"], settings, root / "b.pt", 3, 1000)
    only_b, checkpoint = load_decoder(root / "b.pt", CPU)
    assert only_b.channels == checkpoint["settings"]["channels"] == [6, 7, 8, 9] and only_b.in_dim == 10
    feats = next(features.batches(np.arange(4), 4))[1]
    changed = feats.clone()
    changed[:, :6] = torch.randn(changed[:, :6].shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(embed_slices(only_b, feats), embed_slices(only_b, changed))  # layer a is not read
    every, _ = load_decoder(toy["decoder"], CPU)
    assert not torch.allclose(embed_slices(every, feats), embed_slices(every, changed))


def test_tuning_reads_each_layer_set_and_gives_the_same_rows_with_more_workers(tmp_path):
    from cldf.evaluate.choose import tune_decoder

    p = _make_toy(tmp_path, n_val=6)["paths"]
    features = StoredFeatures(p["features"], SIZE, CPU)
    base = {"selection": {**SETTINGS["selection"], "threshold": "quantile"}, "decoder": {**SETTINGS["decoder"], "epochs": 2},
            "cluster": {"inside_body": True}}
    grids = {"quantile": [0.8], "optimizer": [{"optimizer": "adam", "lr": 1e-2, "loss": "mean"},
                                              {"optimizer": "sgd", "lr": 1.0, "loss": "sum"}],
             "feature_layers": [["a", "b"], ["b"]], "cluster": [{"k": 2, "assign": "prototype"}], "components": [0.0, 1.0],
             "slice_vote": [0, 1], "epochs": [1]}
    runs = [tune_decoder(p["slices"], features, p["cam"], p["mg"], base, grids, tmp_path / f"d{w}.pt", 3, 1000, workers=w)
            for w in (1, 2)]
    assert runs[0] == runs[1]
    values = [json.loads(r["value"]) for r in runs[0]]
    assert [v["feature_layers"] for v in values[:12]] == [["a", "b"]] * 8 + [["b"]] * 4
    assert [v["slice_vote"] for v in values] == [0, 1] * 8
    assert [v["epochs"] for v in values] == [2] * 12 + [1] * 4  # the best of 2 epochs, then scored after 1
    best = json.loads(next(r["value"] for r in runs[0][:8] if r["val_dice"] == max(x["val_dice"] for x in runs[0][:8])))
    assert values[8]["optimizer"] == best["optimizer"]  # the layer set is tried on the best
    top = values[int(np.argmax([r["val_dice"] for r in runs[0][:12]]))]
    assert all({k: v[k] for k in ("optimizer", "feature_layers")} == {k: top[k] for k in ("optimizer", "feature_layers")}
               for v in values[12:])
    assert len({r["val_dice"] for r in runs[0][12:]} - {r["val_dice"] for r in runs[0][:12]}) > 0  # other weights
    one, two = (load_decoder(tmp_path / f"d{w}.pt", CPU) for w in (1, 2))
    assert all(torch.equal(a, b) for a, b in zip(one[0].state_dict().values(), two[0].state_dict().values()))
    chosen = json.loads(next(r["value"] for r in runs[0] if r["chosen"]))
    assert one[0].channels == (list(range(10)) if chosen["feature_layers"] == ["a", "b"] else [6, 7, 8, 9])
    assert one[1]["settings"]["decoder"]["epochs"] == chosen["epochs"]


def test_a_decoder_kept_after_fewer_epochs_is_the_one_trained_for_them(tmp_path):
    from cldf.segment.train import train_decoder_epochs

    p = _make_toy(tmp_path)["paths"]
    features = StoredFeatures(p["features"], SIZE, CPU)
    settings = {**SETTINGS, "decoder": {**SETTINGS["decoder"], "epochs": 2}}
    _, alone = train_decoder(p["slices"], features, p["cam"], p["mg"], settings, None, 3, 1000)
    built = train_decoder_epochs(p["slices"], features, p["cam"], p["mg"], settings, 3, 1000, [3, 2])
    assert sorted(built) == [2, 3]
    (_, kept), (_, longer) = built[2](), built[3]()
    for name in alone["state_dict"]:
        assert torch.equal(kept["state_dict"][name], alone["state_dict"][name])
        assert not torch.equal(longer["state_dict"][name], alone["state_dict"][name])
    assert all(torch.equal(kept["prototypes"][k], alone["prototypes"][k]) for k in ("foreground", "background"))
    assert kept["stats"] == alone["stats"] and kept["settings"] == alone["settings"]
    assert longer["settings"]["decoder"]["epochs"] == 3 and len(longer["stats"]["loss"]) == 3


def test_kmeans_on_embeddings_beats_thresholded_cam(toy):
    store = MapStore(toy["masks"])
    test_ids = np.flatnonzero(toy["split"] == "test")
    assert store.slice_ids.tolist() == test_ids.tolist()
    masks = store.read("masks", test_ids).astype(bool)
    positive = toy["labels"][test_ids] == 1
    assert not masks[~positive].any()  # known negative: not clustered
    assert not (masks & ~toy["body"][test_ids]).any()
    dice_cldf, dice_cam = [], []
    for row, i in enumerate(test_ids[positive]):
        truth = toy["truth"][i]
        dice_cldf.append(_dice(masks[positive][row], truth))
        cam = toy["cam"][i].astype(np.float16).astype(np.float32)
        dice_cam.append(_dice((cam > threshold_otsu(cam[toy["body"][i]])) & toy["body"][i], truth))
    assert np.mean(dice_cldf) > 0.75
    assert np.mean(dice_cldf) > np.mean(dice_cam) + 0.15, (np.mean(dice_cldf), np.mean(dice_cam))


def test_same_seed_same_decoder_and_masks(toy):
    p, root = toy["paths"], toy["root"]
    train_decoder(p["slices"], StoredFeatures(p["features"], SIZE, CPU), p["cam"], p["mg"], SETTINGS,
                  root / "again.pt", 3, 1000)
    first, _ = load_decoder(toy["decoder"], CPU)
    second, _ = load_decoder(root / "again.pt", CPU)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    _segment_test(toy, root / "again.pt", root / "again")
    ids = MapStore(toy["masks"]).slice_ids
    assert np.array_equal(MapStore(toy["masks"]).read("masks", ids), MapStore(root / "again").read("masks", ids))


def _test_slices_as_one_case(toy: dict, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The toy's slices with its test slices regrouped into one case, in a row (slice index 0, 1, ...), written
    to ``path``: (test rows, case_index (N,), slice_index (N,))."""
    n, test = len(toy["labels"]), np.flatnonzero(toy["split"] == "test")
    case_index, slice_index = np.arange(n), np.zeros(n, dtype=np.int64)
    case_index[test], slice_index[test] = test[0], np.arange(len(test))
    write_slice_store(path, np.zeros((n, 1, SIZE, SIZE), np.float32), toy["labels"], case_index,
                      list(toy["split"]), toy["truth"], body=toy["body"], slice_index=slice_index, modalities=["t1"])
    return test, case_index, slice_index


def test_segmentation_votes_over_neighbouring_slices_when_chosen(toy, tmp_path):
    """The same slices regrouped: the test slices one case, in a row; with ``slice_vote`` the masks are the
    vote of the masks segmented without it."""
    test, case_index, slice_index = _test_slices_as_one_case(toy, tmp_path / "slices")
    features = StoredFeatures(toy["paths"]["features"], SIZE, CPU)
    segmented = toy["labels"][test] != 0
    run_segmentation(tmp_path / "slices", features, {"masks": toy["decoder"]}, {**CLUSTER, "slice_vote": 2}, test,
                     segmented, tmp_path / "voted", CPU, seed=3)
    alone = MapStore(toy["masks"]).read("masks", test)
    expected = alone.copy()
    expected[segmented] = vote_slices(alone[segmented], case_index[test][segmented], slice_index[test][segmented], 2)
    voted = MapStore(tmp_path / "voted").read("masks", test)
    assert np.array_equal(voted, expected)
    assert not np.array_equal(voted, alone)


def test_segmentation_fills_the_holes_of_the_voted_masks_when_chosen(toy, tmp_path):
    """``fill_holes``: the masks are those without it, voted over neighbouring slices, with their holes filled;
    the negative slices stay empty. The toy's test slices, one case in a row, get a pixel outside the body at
    the centre of each tumour, which K-means (inside the body) never marks: a hole in the masks that enclose it."""
    n, test = len(toy["labels"]), np.flatnonzero(toy["split"] == "test")
    case_index, slice_index = np.arange(n), np.zeros(n, dtype=np.int64)
    case_index[test], slice_index[test] = test[0], np.arange(len(test))
    body = toy["body"].copy()
    for i in test[toy["labels"][test] == 1]:
        rows, cols = np.nonzero(toy["truth"][i])
        body[i, int(rows.mean()), int(cols.mean())] = False
    write_slice_store(tmp_path / "slices", np.zeros((n, 1, SIZE, SIZE), np.float32), toy["labels"], case_index,
                      list(toy["split"]), toy["truth"], body=body, slice_index=slice_index, modalities=["t1"])
    features = StoredFeatures(toy["paths"]["features"], SIZE, CPU)
    segmented = toy["labels"][test] != 0
    for radius in (0, 2):
        cluster = {**CLUSTER, "slice_vote": radius}
        run_segmentation(tmp_path / "slices", features, {"masks": toy["decoder"]}, cluster, test, segmented,
                         tmp_path / f"open{radius}", CPU, seed=3)
        run_segmentation(tmp_path / "slices", features, {"masks": toy["decoder"]}, {**cluster, "fill_holes": True}, test,
                         segmented, tmp_path / f"filled{radius}", CPU, seed=3)
        unfilled = MapStore(tmp_path / f"open{radius}").read("masks", test).astype(bool)
        filled = MapStore(tmp_path / f"filled{radius}").read("masks", test)
        assert filled.dtype == np.uint8 and not filled[~segmented].any()
        assert np.array_equal(filled.astype(bool), fill_holes(unfilled))
        holes = (filled.astype(bool) & ~unfilled).sum((1, 2))
        assert (holes[segmented] >= 1).sum() >= 3, holes  # the centres of the tumours the masks enclose, filled


def test_segmentation_per_case_runs_one_kmeans_over_the_case(toy, tmp_path):
    """``scope: case``: the test slices regrouped into one case get the masks of one K-means over all their
    body pixels (computed here from the decoder's embeddings), not those of one K-means per slice."""
    test, _, _ = _test_slices_as_one_case(toy, tmp_path / "slices")
    features = StoredFeatures(toy["paths"]["features"], SIZE, CPU)
    segmented = toy["labels"][test] != 0
    run_segmentation(tmp_path / "slices", features, {"masks": toy["decoder"]}, {**CLUSTER, "scope": "case"}, test,
                     segmented, tmp_path / "pooled", CPU, seed=3)
    decoder, checkpoint = load_decoder(toy["decoder"], CPU)
    ids = test[segmented]
    with torch.no_grad():
        emb = torch.cat([embed_slices(decoder, feats) for _, feats in features.batches(ids, 4)])
    expected = np.zeros((len(test), SIZE, SIZE), dtype=np.uint8)
    expected[segmented] = cluster_slices(emb, toy["body"][ids], CLUSTER["k"], prototypes_of(checkpoint), 3)
    pooled = MapStore(tmp_path / "pooled").read("masks", test)
    assert np.array_equal(pooled, expected)
    assert not np.array_equal(pooled, MapStore(toy["masks"]).read("masks", test))


def _three_training_cases(toy: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The toy's slices with its training slices regrouped into 3 cases, each mixing positive and negative
    slices, written to ``path``: (case_index (N,), training rows)."""
    n, train = len(toy["labels"]), np.flatnonzero(toy["split"] == "train")
    case_index = np.arange(n)
    case_index[train] = train[0] + train % 3
    write_slice_store(path, np.zeros((n, 1, SIZE, SIZE), np.float32), toy["labels"], case_index,
                      list(toy["split"]), toy["truth"], body=toy["body"], modalities=["t1"])
    return case_index, train


def test_select_stored_pools_whole_cases_but_the_slices_done(toy, tmp_path):
    case_index, train = _three_training_cases(toy, tmp_path / "slices")
    slices, p = SliceStore(tmp_path / "slices"), toy["paths"]
    cam, mg = MapStore(p["cam"]), MapStore(p["mg"])
    settings = {**SETTINGS["selection"], "threshold": "quantile", "quantile": 0.8, "background": "otsu", "scope": "case"}
    ids = train[[5, 1]]  # cases 2 and 1, unsorted
    rows, fg, _, _ = select_stored(slices, cam, mg, ids, settings)
    pooled = train[np.isin(case_index[train], case_index[ids]) & (toy["labels"][train] == 1)]
    assert np.array_equal(rows, np.union1d(ids, pooled))
    done = set(pooled[case_index[pooled] == case_index[ids[1]]].tolist())  # case 1 selected before
    later, _, _, _ = select_stored(slices, cam, mg, ids, settings, done)
    assert not done & set(later.tolist()) and set(ids.tolist()) - done <= set(later.tolist())
    per_slice, fg_alone, _, _ = select_stored(slices, cam, mg, ids, {**settings, "scope": "slice"})
    assert np.array_equal(per_slice, ids) and fg_alone.shape[0] == 2


def test_decoder_selection_per_case_pools_each_training_case(toy, tmp_path):
    """``scope: case``: the decoder's foreground is what :func:`select_pixels` picks with one quantile per
    case over the case's positive training slices (here the training slices regrouped into 3 cases)."""
    case_index, train = _three_training_cases(toy, tmp_path / "slices")
    p = toy["paths"]
    selection = {**SETTINGS["selection"], "threshold": "quantile", "quantile": 0.8, "background": "otsu"}
    counts = {}
    for scope in ("slice", "case"):
        settings = {**SETTINGS, "selection": {**selection, "scope": scope}, "decoder": {**SETTINGS["decoder"], "epochs": 1}}
        _, checkpoint = train_decoder(tmp_path / "slices", StoredFeatures(p["features"], SIZE, CPU), p["cam"], p["mg"],
                                      settings, tmp_path / f"{scope}.pt", 3, 1000)
        counts[scope] = checkpoint["stats"]["n_foreground_pixels"]
    maps = [torch.from_numpy(MapStore(p[name]).read("maps", train).astype(np.float32)) for name in ("cam", "mg")]
    labels, body = torch.from_numpy(toy["labels"][train].astype(np.int64)), torch.from_numpy(toy["body"][train])
    for scope, cases in (("slice", None), ("case", case_index[train])):
        fg, _ = select_pixels(*maps, labels, body, "fused", "quantile", 0.8, background="otsu", cases=cases)
        assert counts[scope] == int(fg.sum()), scope
    assert counts["case"] != counts["slice"]


def test_anchor_weights_are_the_maps_confidence():
    cam = torch.tensor([[[0.9, 0.6], [0.2, 0.1]], [[0.9, 0.6], [0.2, 0.1]]])
    mg = torch.tensor([[[0.7, 0.8], [0.4, 0.0]], [[0.7, 0.8], [0.4, 0.0]]])
    labels = torch.tensor([1, 0])
    fg = torch.tensor([[[True, True], [False, False]], [[False, False], [False, False]]])
    bg = torch.tensor([[[False, False], [False, True]], [[True, True], [True, True]]])
    w = anchor_weights(cam, mg, labels, fg, bg, "fused")
    expected = torch.tensor([[[0.7, 0.6], [0.0, 0.9]], [[1.0, 1.0], [1.0, 1.0]]])  # min on fg, 1 - max on bg
    assert torch.allclose(w, expected)
    assert torch.allclose(anchor_weights(cam, None, labels, fg, bg, "cam")[0], torch.tensor([[0.9, 0.6], [0.0, 0.9]]))


def test_decoder_anchor_weights_reach_the_loss(toy, tmp_path):
    """``weight: confidence`` trains another decoder than unweighted anchors from the same seed and pixels
    (the selection itself, hence the prototypes' pixel counts, is unchanged)."""
    p = toy["paths"]
    checkpoints = {}
    for weight in ("none", "confidence"):
        settings = {**SETTINGS, "selection": {**SETTINGS["selection"], "weight": weight},
                    "decoder": {**SETTINGS["decoder"], "epochs": 1}}
        _, checkpoints[weight] = train_decoder(p["slices"], StoredFeatures(p["features"], SIZE, CPU), p["cam"], p["mg"],
                                               settings, None, 3, 1000)
    stats = [checkpoints[w]["stats"] for w in ("none", "confidence")]
    assert stats[0]["n_foreground_pixels"] == stats[1]["n_foreground_pixels"] > 0
    assert stats[0]["loss"] != stats[1]["loss"]
    assert not all(torch.equal(a, b) for a, b in zip(checkpoints["none"]["state_dict"].values(),
                                                      checkpoints["confidence"]["state_dict"].values()))


def test_cluster_slice_degenerate_and_region():
    emb = torch.zeros(2, 6, 6)
    emb[0] = 1.0
    emb[1, 1:3, 1:3] = 3.0
    emb = torch.nn.functional.normalize(emb, dim=0)
    body = torch.zeros(6, 6, dtype=torch.bool)
    body[0, 0] = True
    prototypes = (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))  # foreground, background
    assert not cluster_slices(emb[None], body[None], 2, prototypes, 0).any()  # fewer pixels than k
    body[:4, :4] = True
    mask = cluster_slices(emb[None], body[None], 2, prototypes, 0)
    expected = np.zeros((1, 6, 6), dtype=bool)
    expected[0, 1:3, 1:3] = True
    assert np.array_equal(mask, expected)


def test_cluster_slices_pooled_leaves_a_slice_without_target_empty():
    """Alone, K-means must cut a slice without the target into k clusters, one of which is taken; pooled
    with a slice that holds the target, the same slice's pixels share the background's cluster."""
    emb = torch.zeros(2, 2, 4, 4)
    emb[0, 1, :2] = 1.0  # slice 0: top half the target (0, 1), bottom half background (1, 0)
    emb[0, 0, 2:] = 1.0
    emb[1, 0] = 1.0  # slice 1: background only, two shades of it
    emb[1, 1, :, :2], emb[1, 1, :, 2:] = 0.1, -0.1
    body = torch.ones(2, 4, 4, dtype=torch.bool)
    prototypes = (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    alone = np.concatenate([cluster_slices(emb[s : s + 1], body[s : s + 1], 2, prototypes, 0) for s in range(2)])
    pooled = cluster_slices(emb, body, 2, prototypes, 0)
    assert np.array_equal(pooled[0], alone[0]) and alone[0][:2].all() and not alone[0][2:].any()
    assert alone[1][:, :2].all() and not alone[1][:, 2:].any()  # the shade nearer the target taken
    assert not pooled[1].any()


def test_cluster_slices_fitted_on_a_sample_assigns_every_pixel(monkeypatch):
    """More pixels than ``MAX_FIT_POINTS``: K-means is fitted on a seeded sample and every pixel goes to its
    nearest centroid, which for two well-separated groups gives the masks of the fit on all pixels."""
    gen = torch.Generator().manual_seed(0)
    emb = 0.05 * torch.randn(3, 2, 6, 6, generator=gen)
    emb[:, 1, :3] += 1.0  # top half of each slice near the foreground prototype (0, 1)
    emb[:, 0, 3:] += 1.0  # bottom half near the background prototype (1, 0)
    body = torch.ones(3, 6, 6, dtype=torch.bool)
    prototypes = (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    every = cluster_slices(emb, body, 2, prototypes, 0)
    monkeypatch.setattr(cluster_module, "MAX_FIT_POINTS", 10)
    assert np.array_equal(cluster_slices(emb, body, 2, prototypes, 0), every)
    assert every[:, :3].all() and not every[:, 3:].any()


def test_segment_code_never_reads_ground_truth():
    package = Path(__file__).resolve().parent.parent / "cldf"
    files = [*sorted((package / "segment").glob("*.py")), package / "models" / "decoder.py"]
    assert len(files) >= 7
    for path in files:
        text = path.read_text()
        assert "ground_truth" not in text and "read_ground_truth" not in text, path.name


def test_vote_slices_keeps_pixels_a_majority_of_neighbouring_masks_mark():
    masks = np.zeros((7, 4, 4), dtype=np.uint8)
    masks[0:5, 1:3, 1:3] = 1  # case 0, slices 10-14: a block
    masks[2, 0, 0] = 1  # a speck on the middle slice only
    masks[1, 3, 3] = masks[3, 3, 3] = 1  # a pixel both neighbours of slice 12 mark, slice 12 misses
    masks[0, 0, 3] = masks[1, 0, 3] = masks[4, 0, 3] = 1  # 3 of the 5 slices 10-14, 2 of 3 around slice 11
    masks[5, 2, 2] = 1  # case 1, slice 11: not a neighbour of case 0's slices
    masks[6, 0, 3] = 1  # case 2 alone: keeps its own mask
    case, z = np.array([0, 0, 0, 0, 0, 1, 2]), np.array([10, 11, 12, 13, 14, 11, 40])
    order = np.array([2, 6, 4, 0, 5, 3, 1])  # any order of the slices gives the same masks

    def vote(radius: int) -> np.ndarray:
        return vote_slices(masks[order], case[order], z[order], radius)[np.argsort(order)]

    assert np.array_equal(vote(0), masks)
    one, two = vote(1), vote(2)
    assert one.dtype == np.uint8
    assert one[0:5, 1:3, 1:3].all() and two[0:5, 1:3, 1:3].all()
    assert not one[2, 0, 0] and not two[2, 0, 0]  # the speck goes
    assert one[2, 3, 3] and not two[2, 3, 3]  # 2 of 3 around slice 12, but 2 of 5 only
    assert one[0, 0, 3] and one[1, 0, 3] and not one[4, 0, 3]  # an end slice needs its one neighbour to agree
    assert two[2, 0, 3] and not two[3, 0, 3]  # 3 of the 5 around slice 12; 2 of the 4 around slice 13
    for voted in (one, two):  # no segmented slice around: a mask is kept as it is
        assert voted[5, 2, 2] and voted[6, 0, 3] and voted[5].sum() == 1 and voted[6].sum() == 1
    with pytest.raises(ValueError):
        vote_slices(masks, case, np.array([10, 10, 12, 13, 14, 11, 40]), 1)
    with pytest.raises(ValueError):
        vote_slices(masks, case, z, -1)


def test_keep_components_drops_islands_smaller_than_the_fraction():
    mask = np.zeros((2, 12, 12), dtype=bool)
    mask[:, 1:6, 1:6] = True  # 25 pixels
    mask[:, 8:11, 8:11] = True  # 9 pixels
    mask[:, 0, 11] = True  # 1 pixel, diagonal neighbours only of nothing
    mask[1, 6, 6] = True  # touches the big square diagonally: one 8-connected component
    assert np.array_equal(keep_components(mask, 0.0), mask)
    largest = keep_components(mask, 1.0)
    assert largest[:, 1:6, 1:6].all() and not largest[:, 8:11, 8:11].any() and not largest[:, 0, 11].any()
    assert largest[1, 6, 6] and largest[1].sum() == 26
    quarter = keep_components(mask, 0.25)
    assert quarter[:, 8:11, 8:11].all() and not quarter[:, 0, 11].any()  # 9 >= 0.25 * 25, 1 < 6.25
    assert not keep_components(np.zeros((5, 5), bool), 1.0).any()
    with pytest.raises(ValueError):
        keep_components(mask, 1.5)


def test_fill_holes_sets_the_background_a_mask_encloses():
    mask = np.zeros((2, 9, 9), dtype=bool)
    mask[:, 1:6, 1:6] = True
    mask[:, 2:4, 2:4] = False  # a hole
    mask[0, 7:9, 0:3] = True
    mask[0, 8, 1] = False  # a notch open to the border: not a hole
    mask[1, 3, 1] = False  # the ring opened to the outside: the hole is no longer enclosed
    filled = fill_holes(mask)
    assert filled[0, 1:6, 1:6].all() and not filled[0, 8, 1]
    assert np.array_equal(filled[0] & ~mask[0], np.pad(np.ones((2, 2), bool), ((2, 5), (2, 5))))
    assert np.array_equal(filled[1], mask[1])
    assert np.array_equal(fill_holes(mask[0]), filled[0])
    with pytest.raises(ValueError):
        fill_holes(np.zeros(4, bool))


def test_a_lever_that_taps_other_layers_has_the_decoder_read_them_all():
    from cldf.evaluate.ablation import lever_settings

    base = {"decoder": {"epochs": 5, "feature_layers": ["up_blocks.2"]},
            "features": {"timesteps": [1, 10], "layers": ["up_blocks.1", "up_blocks.2"]}}
    wider = lever_settings(base, {"features": {"layers": ["up_blocks.0", "up_blocks.1", "up_blocks.2"]}})
    assert "feature_layers" not in wider["decoder"] and wider["decoder"]["epochs"] == 5
    assert "feature_layers" not in lever_settings(base, {"features": {"source": "cam_classifier", "layers": ["layer1"]}})["decoder"]
    assert lever_settings(base, {"features": {"timesteps": [1]}})["decoder"]["feature_layers"] == ["up_blocks.2"]
    both = ["up_blocks.1", "up_blocks.2"]
    assert lever_settings(base, {"decoder": {"feature_layers": both}})["decoder"]["feature_layers"] == both
    assert base["decoder"]["feature_layers"] == ["up_blocks.2"]  # the chosen settings are not changed


def test_the_vote_of_decoders_keeps_the_pixels_most_masks_hold():
    from cldf.evaluate.ablation import majority

    a = np.array([[[1, 1, 0, 0]]], bool)
    b = np.array([[[1, 0, 1, 0]]], bool)
    c = np.array([[[0, 1, 1, 0]]], bool)
    assert majority([a, b, c]).tolist() == [[[True, True, True, False]]]
    assert majority([a, b]).tolist() == [[[True, False, False, False]]]  # a tie drops the pixel
    assert majority([c]) is c


def test_decoder_without_a_confident_anchor_says_so(toy, monkeypatch):
    """Anchors that all weigh 0 (maps confident in no selected pixel) leave nothing to learn: each such batch
    is skipped (the mean loss would divide by 0), and a decoder that took no step at all is an error that
    says why, not an untrained decoder passed on to K-means."""
    monkeypatch.setattr(selection_module, "anchor_weights", lambda cam, mg, labels, fg, bg, mode="fused": torch.zeros(fg.shape))
    p = toy["paths"]
    settings = {**SETTINGS, "selection": {**SETTINGS["selection"], "weight": "confidence"},
                "decoder": {**SETTINGS["decoder"], "epochs": 1, "loss": "mean"}}
    with pytest.raises(PipelineError, match="took no training step"):
        train_decoder(p["slices"], StoredFeatures(p["features"], SIZE, CPU), p["cam"], p["mg"], settings, None, 3, 1000)


def test_self_training_anchors_are_the_mask_components_the_maps_vouch_for():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:4, 1:4] = True   # touched by the maps' foreground
    mask[5:7, 5:8] = True   # no map pixel in it
    fg, bg = torch.zeros(8, 8, dtype=torch.bool), torch.ones(8, 8, dtype=torch.bool)
    fg[2, 2] = fg[0, 7] = True
    bg[0, 7] = bg[2, 2] = False
    new_fg, new_bg = vouched_anchors(fg, bg, mask)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:4, 1:4] = True
    expected[0, 7] = True   # the maps' own foreground stays
    assert torch.equal(new_fg, expected)
    assert not new_bg[5:7, 5:8].any() and not new_bg[1:4, 1:4].any()  # the unvouched component is neither
    assert int(new_bg.sum()) == 64 - 9 - 6 - 1


def test_self_training_widens_the_foreground_anchors_by_the_decoders_own_masks(toy):
    p = toy["paths"]
    features = StoredFeatures(p["features"], SIZE, CPU)
    decoder, checkpoint = load_decoder(toy["decoder"], CPU)
    same = self_train(p["slices"], features, p["cam"], p["mg"], SETTINGS, CLUSTER, decoder, checkpoint, 0, 3, 1000)
    assert same[0] is decoder  # no round: the decoder as trained on the maps' selection
    positive = np.flatnonzero((toy["split"] == "train") & (toy["labels"] == 1))
    masks = dict(zip(positive.tolist(), segment_ids(features, decoder, checkpoint, SliceStore(p["slices"]), positive,
                                                    CLUSTER, 3)))
    assert np.mean([_dice(masks[s], toy["truth"][s]) for s in positive]) > 0.6
    _, again = self_train(p["slices"], features, p["cam"], p["mg"], SETTINGS, CLUSTER, decoder, checkpoint, 1, 3, 1000)
    # the new decoder's foreground anchors hold far more pixels than the maps picked, and its prototypes move
    assert again["stats"]["n_foreground_pixels"] > 1.5 * toy["stats"]["n_foreground_pixels"]
    assert again["stats"]["n_foreground_pixels"] <= toy["stats"]["n_foreground_pixels"] + sum(int(m.sum()) for m in masks.values())
    assert not torch.equal(again["prototypes"]["foreground"], checkpoint["prototypes"]["foreground"])
