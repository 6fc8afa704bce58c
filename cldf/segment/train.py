"""Training of the pixel decoder with the supervised contrastive loss (steps 7–8).

Memory is bounded by one batch of slices: features are read at native resolution and upsampled per
batch (:mod:`cldf.segment.features`), maps and body masks are read per batch, and the foreground and
background prototypes are accumulated as running sums.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cldf.errors import PipelineError
from cldf.models.checkpoint import CheckpointError, load_checkpoint, model_from_payload, save_checkpoint
from cldf.models.decoder import PixelDecoder, embed_slices
from cldf.segment.features import StoredFeatures, input_channels
from cldf.segment.selection import MODE_MAPS, select_stored
from cldf.segment.supcon import supcon_loss
from cldf.data.splits import training_rows
from cldf.store import MapStore, SliceStore

CHECKPOINT_KIND = "pixel_decoder"
_INIT_LOCK = threading.Lock()


@dataclass
class _Source:
    """Where the decoder's training data comes from: slices, features and the maps of one selection mode.

    The pixel selection of a slice is computed once and kept (bool masks), so later epochs only upsample
    the features of each batch. ``given`` holds selections made elsewhere (slice id -> foreground and
    background bool (H, W), no anchor weights), used for those slices instead of the maps'.
    """

    slices: SliceStore
    features: StoredFeatures
    cam: MapStore | None
    mg: MapStore | None
    selection: Mapping[str, Any]
    batch_size: int
    device: torch.device
    given: Mapping[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _selected: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def _select(self, ids: np.ndarray) -> None:
        for sid in ids:
            if int(sid) in self.given and int(sid) not in self._selected:
                self._selected[int(sid)] = (*self.given[int(sid)], None)
        missing = np.asarray([i for i in ids if int(i) not in self._selected], dtype=np.int64)
        if len(missing) == 0:
            return
        missing, fg, bg, weights = select_stored(self.slices, self.cam, self.mg, missing, self.selection, self._selected)
        for k, sid in enumerate(missing):
            self._selected[int(sid)] = (fg[k], bg[k], None if weights is None else weights[k].half())

    def forget(self) -> None:
        """Drop the kept pixel selections (the next batches recompute them)."""
        self._selected.clear()

    def batches(self, ids: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None]]:
        """Yield ``(features (B, D, H, W) on device, labels long (B,), fg (B, H, W) bool, bg (B, H, W) bool,
        anchor weights float (B, H, W) or None)`` for consecutive batches of ``ids`` (weights under the selection's
        ``weight: confidence``, kept in float16); labels, masks and weights stay on the CPU."""
        for batch_ids, feats in self.features.batches(ids, self.batch_size):
            self._select(batch_ids)
            labels = torch.from_numpy(self.slices.labels[batch_ids].astype(np.int64))
            kept = [self._selected[int(s)] for s in batch_ids]
            fg, bg = torch.stack([k[0] for k in kept]), torch.stack([k[1] for k in kept])
            weights = None if kept[0][2] is None else torch.stack([k[2] for k in kept]).float()
            yield feats, labels, fg, bg, weights


def _sample_pixels(mask: torch.Tensor, max_n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """At most ``max_n`` random True pixels of ``mask`` (B, H, W): index tensors (b, h, w), each (n,)."""
    where = torch.nonzero(mask, as_tuple=False)  # (M, 3)
    if len(where) > max_n:
        where = where[torch.randperm(len(where), generator=generator)[:max_n]]
    return where[:, 0], where[:, 1], where[:, 2]


def _pixel_features(feats: torch.Tensor, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Feature vectors (n, D) of the pixels ``index`` = (b, h, w) of ``feats`` (B, D, H, W)."""
    b, h, w = (i.to(feats.device) for i in index)
    return feats[b, :, h, w]


def _make_optimizer(decoder: PixelDecoder, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(decoder.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(decoder.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'sgd'")


def _train_epoch(
    decoder: PixelDecoder,
    optimizer: torch.optim.Optimizer,
    source: _Source,
    order: np.ndarray,
    loss_settings: Mapping[str, Any],
    generator: torch.Generator,
    desc: str,
) -> tuple[float | None, int, int]:
    """One pass over the slices ``order``: (mean loss or None, skipped batches, optimiser steps).

    Per batch: at most ``max_foreground`` / ``max_background`` selected pixels are sampled and one step is
    taken on their supervised contrastive loss (foreground 1, background 0; each anchor weighted by the
    selection's weights when it has them); a batch lacking either, or whose sampled anchors all weigh 0, is
    skipped.
    """
    losses: list[float] = []
    skipped = 0
    sel = source.selection
    bar = tqdm(source.batches(order), total=-(-len(order) // source.batch_size), desc=desc, unit="batch")
    for feats, _, fg, bg, weights in bar:
        fg_index = _sample_pixels(fg, int(sel["max_foreground"]), generator)
        bg_index = _sample_pixels(bg, int(sel["max_background"]), generator)
        n_fg, n_bg = len(fg_index[0]), len(bg_index[0])
        if n_fg == 0 or n_bg == 0 or n_fg + n_bg < 3:
            skipped += 1
            continue
        x = torch.cat([_pixel_features(feats, fg_index), _pixel_features(feats, bg_index)])
        y = torch.cat([torch.ones(n_fg, dtype=torch.long), torch.zeros(n_bg, dtype=torch.long)]).to(source.device)
        w = None if weights is None else torch.cat([weights[fg_index], weights[bg_index]]).to(source.device)
        if w is not None and float(w.sum()) <= 0:  # no anchor the maps are confident in: nothing to learn
            skipped += 1
            continue
        loss = supcon_loss(decoder(x), y, float(loss_settings["temperature"]), loss_settings.get("loss", "mean"), w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return (float(np.mean(losses)) if losses else None), skipped, len(losses)


def _train_epochs(decoder: PixelDecoder, optimizer: torch.optim.Optimizer, source: _Source, ids: np.ndarray,
                  dec: Mapping[str, Any], seed: int, counts: Sequence[int]) -> dict[int, _Snapshot]:
    """``max(counts)`` passes of :func:`_train_epoch`, each over ``ids`` in a seeded random order; the decoder's
    weights after each count of ``counts`` (the weights training for that many epochs gives: nothing in an
    epoch depends on how many follow). The decoder is left in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    losses, skipped, steps, kept = [], [], 0, {}
    total = max(int(c) for c in counts)
    decoder.train()
    for epoch in range(total):
        order = ids[order_rng.permutation(len(ids))]
        loss, n_skipped, n_steps = _train_epoch(decoder, optimizer, source, order, dec, generator,
                                                f"decoder epoch {epoch + 1}/{total}")
        losses.append(loss)
        skipped.append(n_skipped)
        steps += n_steps
        if epoch + 1 in counts:
            state = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
            kept[epoch + 1] = _Snapshot(state, list(losses), list(skipped), steps)
    decoder.eval()
    return kept


@dataclass
class _Snapshot:
    """The decoder's weights after some epochs: ``state`` (its state dict, on the CPU), ``losses`` (mean loss
    per epoch), ``skipped`` (skipped batches per epoch), ``steps`` (optimiser steps)."""

    state: dict[str, torch.Tensor]
    losses: list[float | None]
    skipped: list[int]
    steps: int


@torch.no_grad()
def _prototypes(decoder: PixelDecoder, source: _Source, ids: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Normalised mean embeddings (E,) of *all* selected foreground / background pixels of ``ids``, and
    counts (``foreground``, ``background``, ``positive_slices_without_foreground``)."""
    sums = {name: torch.zeros(decoder.out_dim, dtype=torch.float64) for name in ("foreground", "background")}
    counts = {"foreground": 0, "background": 0, "positive_slices_without_foreground": 0}
    for feats, labels, fg, bg, _ in source.batches(ids):
        emb = embed_slices(decoder, feats).permute(0, 2, 3, 1).cpu()  # (B, H, W, E)
        for name, mask in (("foreground", fg), ("background", bg)):
            sums[name] += emb[mask].double().sum(dim=0)
            counts[name] += int(mask.sum())
        counts["positive_slices_without_foreground"] += int(((labels == 1) & (fg.sum(dim=(1, 2)) == 0)).sum())
    if counts["foreground"] == 0 or counts["background"] == 0:
        raise PipelineError(
            f"pixel selection found {counts['foreground']} foreground and {counts['background']} background "
            "pixels on the training slices; cannot define the prototypes (check the maps and the threshold)"
        )
    return {name: torch.nn.functional.normalize(s, dim=0).float() for name, s in sums.items()}, counts


def map_stores(selection: Mapping[str, Any], cam_path: str | os.PathLike | None,
               mg_path: str | os.PathLike | None) -> tuple[MapStore | None, MapStore | None]:
    """The CAM and mean-gradient map stores the selection's ``mode`` uses (None for a map it does not)."""
    used = MODE_MAPS[selection["mode"]]
    return (MapStore(cam_path) if "cam" in used else None), (MapStore(mg_path) if "mg" in used else None)


def train_decoder(
    slices_path: str | os.PathLike,
    features: StoredFeatures,
    cam_path: str | os.PathLike | None,
    mg_path: str | os.PathLike | None,
    settings: Mapping[str, Any],
    out: str | os.PathLike | None,
    seed: int,
    cap: int,
    anchors: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[PixelDecoder, dict[str, Any]]:
    """Train the pixel decoder on the training slices (labels 0/1) and save it with its prototypes.

    Parameters
    ----------
    slices_path, features
        The slice store and the features of the decoder's slices (:class:`StoredFeatures`, whose device
        is the decoder's).
    cam_path, mg_path
        CAM and mean-gradient map stores; the one the selection mode does not use may be None.
    settings
        ``{"selection": {mode, threshold, quantile, background, scope, weight, max_background, max_foreground},
        "decoder": {widths, temperature, optimizer, lr, loss, epochs, batch_size, [feature_layers]}}``
        (the layers it reads, :func:`cldf.segment.features.input_channels`; all when absent).
    out
        Checkpoint path (the format of :mod:`cldf.models.checkpoint`), or None to keep it in memory only:
        ``kind`` "pixel_decoder", ``settings`` (``widths``, ``channels`` read and the training settings), ``in_channels`` = D,
        ``state_dict``, ``prototypes`` (``foreground``/``background``: float32 (E,) unit vectors), ``seed``,
        ``stats``.
    seed, cap
        Seed of the initialisation, the slice order of every epoch and the pixel sampling; at most ``cap``
        training slices (:func:`training_rows`).
    anchors
        Foreground and background bool (H, W) per training slice id, used instead of the maps' selection
        (:func:`cldf.segment.selftrain.self_train`: a round of self-training); None, the maps'.

    Each epoch visits the training slices in a seeded random order (:func:`_train_epoch`); afterwards the
    prototypes are the normalised mean embeddings of all selected pixels (:func:`_prototypes`).

    Returns
    -------
    The decoder (eval mode) and its checkpoint dict; ``stats``: ``loss`` (mean loss per epoch), ``steps``,
    ``skipped_batches`` (per epoch), ``n_train_slices``, ``n_foreground_pixels``, ``n_background_pixels``,
    ``positive_slices_without_foreground``.
    """
    epochs = int(settings["decoder"]["epochs"])
    decoder, checkpoint = train_decoder_epochs(slices_path, features, cam_path, mg_path, settings, seed, cap, [epochs],
                                               anchors)[epochs]()
    if out is not None:
        save_checkpoint(out, checkpoint)
    return decoder, checkpoint


def train_decoder_epochs(
    slices_path: str | os.PathLike,
    features: StoredFeatures,
    cam_path: str | os.PathLike | None,
    mg_path: str | os.PathLike | None,
    settings: Mapping[str, Any],
    seed: int,
    cap: int,
    counts: Sequence[int],
    anchors: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[int, Callable[[], tuple[PixelDecoder, dict[str, Any]]]]:
    """One training of :func:`train_decoder` (``anchors`` as there) for ``max(counts)`` epochs (``settings["decoder"]["epochs"]`` is
    not read); for each count of ``counts``, a function that builds the decoder and checkpoint training for that
    many epochs gives (its ``settings`` naming that count; its prototypes computed only when it is called)."""
    selection, dec = settings["selection"], settings["decoder"]
    slices = SliceStore(slices_path)
    source = _Source(slices, features, *map_stores(selection, cam_path, mg_path), selection, int(dec["batch_size"]),
                     features.device, dict(anchors or {}))
    ids = training_rows(slices, cap, seed)
    if len(ids) == 0:
        raise PipelineError(f"{slices_path} has no training slice with label 0 or 1")
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # the global generator: one thread at a time
        torch.manual_seed(seed)
        decoder = PixelDecoder(features.dim, dec["widths"],
                               input_channels(features.channel_groups, dec.get("feature_layers"))).to(features.device)
    optimizer = _make_optimizer(decoder, dec["optimizer"], float(dec["lr"]))
    snapshots = _train_epochs(decoder, optimizer, source, ids, dec, seed, [int(c) for c in counts])
    if snapshots[max(snapshots)].steps == 0:
        raise PipelineError(f"the pixel decoder took no training step: no batch of the {len(ids)} training slices of "
                            f"{slices_path} held both selected foreground and background pixels (with a weight above 0 "
                            "under selection.weight: confidence); are the CAM and MG maps empty or constant?")

    lock = threading.Lock()  # the functions share ``source``: one builds at a time

    def build(count: int) -> tuple[PixelDecoder, dict[str, Any]]:
        snapshot = snapshots[count]
        with lock:
            built = copy.deepcopy(decoder)
            built.load_state_dict(snapshot.state)
            built.eval()
            checkpoint = _checkpoint(built, source, ids, {**settings, "decoder": {**dec, "epochs": count}}, snapshot, seed)
            source.forget()  # these functions may be kept a while: the selection is recomputed by the next call
        return built, checkpoint

    return {count: functools.partial(build, count) for count in snapshots}


def _checkpoint(decoder: PixelDecoder, source: _Source, ids: np.ndarray, settings: Mapping[str, Any],
                snapshot: _Snapshot, seed: int) -> dict[str, Any]:
    """The checkpoint dict of :func:`train_decoder` for a trained ``decoder`` (its prototypes computed here)."""
    prototypes, counts = _prototypes(decoder, source, ids)
    stats: dict[str, Any] = {
        "loss": snapshot.losses, "skipped_batches": snapshot.skipped, "steps": snapshot.steps,
        "n_train_slices": int(len(ids)), "n_foreground_pixels": counts["foreground"],
        "n_background_pixels": counts["background"],
        "positive_slices_without_foreground": counts["positive_slices_without_foreground"],
    }
    return {
        "kind": CHECKPOINT_KIND, "settings": {"widths": decoder.widths, "channels": decoder.channels, **_plain(settings)},
        "in_channels": source.features.dim,
        "state_dict": {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
        "prototypes": prototypes, "seed": int(seed), "stats": stats,
    }


def _plain(value: Any) -> Any:
    """``value`` with mappings turned into dicts and tuples into lists (loadable with ``weights_only``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_decoder(path: str | os.PathLike, device: torch.device) -> tuple[PixelDecoder, dict[str, Any]]:
    """Load a checkpoint written by :func:`train_decoder`: the decoder (eval mode, on ``device``) and the
    whole checkpoint dict (``prototypes``, ``settings``, ``stats`` ...)."""
    checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
    return model_from_payload(checkpoint, device), checkpoint


def check_feature_dim(checkpoint: Mapping[str, Any], path: str | os.PathLike, in_dim: int) -> None:
    """Refuse (one line) a decoder trained on features of another dimension than ``in_dim``."""
    if int(checkpoint["in_channels"]) != int(in_dim):
        raise CheckpointError(
            f"checkpoint {path} was trained on {checkpoint['in_channels']}-dimensional features, the feature store "
            f"holds {in_dim}; delete it and re-run to retrain it"
        )
