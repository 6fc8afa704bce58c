"""Training of the four networks: one seeded, resumable, optionally distributed loop.

Reproducibility and resumption: every random draw of training step ``s`` on rank ``r`` (batch
composition, flips, timesteps, noise, class-label dropout, dropout layers) comes from seeds derived from
``(seed, s, r)`` (:func:`cldf.models.data.step_seed`), so the step counter is the complete RNG state.
A resume file ``out.with_suffix('.ckpt')`` with model, EMA, optimizer, grad-scaler, step and loss
history is written every ``checkpoint_every`` steps; re-running after a kill continues from it and ends
with the same weights as an uninterrupted run. It is only trusted when kind, settings, seed, slice
store and number of processes match.

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1) the loop joins a process group (NCCL on CUDA,
Gloo on CPU), wraps the net in DistributedDataParallel and gives each rank its share of every global
batch of ``batch_size`` slices; only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.schedulers import DDPMScheduler
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cldf import store
from cldf.models.builders import MODEL_KINDS, NULL_CLASS, build_model, build_scheduler, count_parameters
from cldf.models.checkpoint import load_checkpoint, save_checkpoint
from cldf.models.data import BalancedBatchSampler, SliceDataset, split_rows, step_seed

VAL_BATCH = 64
INIT_TAG, VAL_TAG = 10**6, 10**6 + 1
"""Stream tags of :func:`step_seed` for weight initialisation and validation noise (never a rank)."""
LOW_NOISE_T = 200
"""The noisy classifier is also validated at t ≤ 200, the range the mean-gradient map uses."""


@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@contextmanager
def _distributed(device: torch.device) -> Iterator[_Dist]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (and leave it afterwards)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield _Dist(0, 1, device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield _Dist(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created:
            dist.destroy_process_group()


class _EMA:
    """Exponential moving average of a network's weights (buffers are copied).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, n_updates: int) -> None:
        d = min(self.decay, (1 + n_updates) / (10 + n_updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


def _loss(
    kind: str,
    model: nn.Module,
    scheduler: DDPMScheduler,
    batch: dict[str, torch.Tensor],
    settings: Mapping[str, Any],
    generator: torch.Generator,
) -> torch.Tensor:
    """Training loss of one batch (``image`` (B, C, H, W), ``label`` (B,), ``mask`` (B, 1, H, W) for FSL)."""
    x0, y = batch["image"], batch["label"]
    device = x0.device
    if kind in ("cdm", "noisy_classifier"):
        t = torch.randint(0, scheduler.num_train_timesteps, (len(x0),), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        if kind == "noisy_classifier":
            return F.cross_entropy(model(x_t, timesteps=t), y)
        drop = torch.rand(len(x0), device=device, generator=generator) < float(settings["class_dropout"])
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        return F.mse_loss(model(x_t, timesteps=t, class_labels=y), noise)
    if kind == "cam_classifier":
        return F.cross_entropy(model(x0), y)
    return DiceCELoss(sigmoid=True)(model(x0), batch["mask"])


def _augment(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random left-right flips (p = ½ per slice) of ``image`` and, when present, ``mask``."""
    image = batch["image"]
    flip = (torch.rand(len(image), device=image.device, generator=generator) < 0.5)[:, None, None, None]
    out = dict(batch)
    for key in ("image", "mask"):
        if key in batch:
            out[key] = torch.where(flip, batch[key].flip(-1), batch[key])
    return out


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


@torch.no_grad()
def evaluate_model(
    kind: str,
    model: nn.Module,
    scheduler: DDPMScheduler,
    dataset: SliceDataset,
    device: torch.device,
    seed: int,
) -> dict[str, Any]:
    """Validation metrics of a trained net on ``dataset`` (fixed noise draws from ``seed``).

    cdm: ``val_eps_mse`` (mean ε-prediction MSE at uniform t, conditioned on the true label);
    noisy_classifier: ``val_accuracy``/``val_auc`` at uniform t and ``val_accuracy_t_le_200``/
    ``val_auc_t_le_200``; cam_classifier: ``val_accuracy``/``val_auc``; fsl_unet: ``val_dice``
    (pooled over all pixels) and ``val_dice_positive_mean`` (mean over slices with target).
    AUC is None when the validation slices hold one class only.
    """
    model.eval()
    generator = torch.Generator(device).manual_seed(step_seed(seed, 0, VAL_TAG))
    loader = DataLoader(dataset, batch_size=VAL_BATCH, shuffle=False)
    labels, sq_err, n_err = [], 0.0, 0
    probs: dict[str, list[np.ndarray]] = {"all": [], "low": []}
    inter = total = 0.0
    dice_pos: list[np.ndarray] = []
    for batch in loader:
        x0, y = batch["image"].to(device), batch["label"].to(device)
        labels.append(y.cpu().numpy())
        if kind in ("cdm", "noisy_classifier"):
            t_all = torch.randint(0, scheduler.num_train_timesteps, (len(x0),), device=device, generator=generator)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            if kind == "cdm":
                pred = model(scheduler.add_noise(x0, noise, t_all), timesteps=t_all, class_labels=y)
                sq_err += float(((pred.float() - noise) ** 2).sum())
                n_err += noise.numel()
                continue
            t_low = torch.randint(0, LOW_NOISE_T + 1, (len(x0),), device=device, generator=generator)
            for name, t in (("all", t_all), ("low", t_low)):
                logits = model(scheduler.add_noise(x0, noise, t), timesteps=t)
                probs[name].append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
        elif kind == "cam_classifier":
            probs["all"].append(torch.softmax(model(x0).float(), 1)[:, 1].cpu().numpy())
        else:
            pred = (model(x0) > 0).float()
            gt = batch["mask"].to(device)
            inter += float((pred * gt).sum())
            total += float(pred.sum() + gt.sum())
            has_target = gt.flatten(1).sum(1) > 0
            per_slice = 2 * (pred * gt).flatten(1).sum(1) / (pred.flatten(1).sum(1) + gt.flatten(1).sum(1)).clamp_min(1)
            dice_pos.append(per_slice[has_target].cpu().numpy())
    y_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if kind == "cdm":
        return {"val_eps_mse": sq_err / max(n_err, 1)}
    if kind == "fsl_unet":
        pos = np.concatenate(dice_pos) if dice_pos else np.zeros(0)
        return {
            "val_dice": 2 * inter / total if total > 0 else 1.0,
            "val_dice_positive_mean": float(pos.mean()) if len(pos) else None,
        }
    out: dict[str, Any] = {}
    for name, suffix in (("all", ""), ("low", f"_t_le_{LOW_NOISE_T}")):
        if not probs[name]:
            continue
        p = np.concatenate(probs[name])
        out[f"val_accuracy{suffix}"] = float(((p > 0.5) == (y_all == 1)).mean())
        out[f"val_auc{suffix}"] = _auc(y_all, p)
    return out


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_loss_curve(losses: Sequence[float], csv_path: Path, png_path: Path, title: str) -> None:
    """Write the per-step training loss as CSV (``step,loss``) and a PNG plot (raw + moving average)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=np.float64)
    _atomic_write(csv_path, lambda p: p.write_text("step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in zip(steps, values))))
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, lw=0.5, alpha=0.4, label="loss")
    window = max(1, min(50, len(values) // 10))
    if len(values) >= window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"moving mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    _atomic_write(png_path, lambda p: fig.savefig(p, format="png", dpi=100))


def resume_path(out: str | os.PathLike) -> Path:
    """The periodic resume checkpoint of a training run writing ``out``."""
    return Path(out).with_suffix(".ckpt")


def train_model(
    kind: str,
    slices_path: str | os.PathLike,
    settings: Mapping[str, Any],
    out: str | os.PathLike,
    device: torch.device,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train network ``kind`` on the ``train`` split of ``slices_path`` and write ``out`` (+ .json, .loss.csv/.png).

    ``settings``: the preset entry of ``kind`` (architecture keys, ``steps``, ``batch_size`` (global, split
    over processes), ``lr``, ``checkpoint_every``, ``ema_decay`` (CDM; optional for the others),
    ``class_dropout`` (CDM); optional ``flip`` (random left-right flips, default True) and
    ``num_workers`` (DataLoader workers, default 0)). ``on_step(step, loss)`` is called after every
    optimisation step (1-based). Returns the recorded metrics (rank 0; other ranks return ``{}``).
    The caller's global torch RNG state is left untouched.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    forked = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with _distributed(device) as ctx, torch.random.fork_rng(devices=forked):
        return _train(kind, Path(slices_path), dict(settings), Path(out), ctx, seed, on_step)


def _train(
    kind: str,
    slices_path: Path,
    settings: dict[str, Any],
    out: Path,
    ctx: _Dist,
    seed: int,
    on_step: Callable[[int, float], None] | None,
) -> dict[str, Any]:
    device = ctx.device
    started = time.perf_counter()
    slices = store.SliceStore(slices_path)
    settings["image_size"] = slices.image_size
    label_filter = None if kind == "fsl_unet" else (0, 1)
    train_rows, val_rows, val_source = split_rows(slices, label_filter, seed)
    train_labels = slices.labels[train_rows]
    if kind != "fsl_unet" and len(np.unique(train_labels)) < 2:
        raise ValueError(f"{slices_path}: training {kind} needs positive and negative training slices; "
                         f"found labels {sorted(set(train_labels.tolist()))}")

    steps, batch_size = int(settings["steps"]), int(settings["batch_size"])
    torch.manual_seed(step_seed(seed, 0, INIT_TAG))
    model = build_model(kind, settings, slices.channels).to(device)
    ema = _EMA(model, float(settings["ema_decay"])) if "ema_decay" in settings else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    scheduler = build_scheduler(settings)

    fingerprint = {"kind": kind, "settings": settings, "seed": seed, "slices": str(slices_path.resolve()),
                   "n_slices": slices.n, "world_size": ctx.world_size}
    resume_file = resume_path(out)
    start_step, losses = 0, []
    if resume_file.exists():
        state = load_checkpoint(resume_file)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["state_dict"])
            if ema is not None:
                ema.model.load_state_dict(state["ema_state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_step, losses = int(state["step"]), state["losses"].tolist()
            if ctx.is_main:
                print(f"[{kind}] resuming from {resume_file} at step {start_step}/{steps}", file=sys.stderr)
        elif ctx.is_main:
            warnings.warn(f"{resume_file} belongs to a different run (settings, seed or data changed); starting afresh")
    ctx.barrier()

    net: nn.Module = model
    if ctx.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = SliceDataset(slices_path, train_rows, with_masks=kind == "fsl_unet")
    groups = (train_labels != 0).astype(np.int64)
    sampler = BalancedBatchSampler(groups, batch_size, seed, steps, start_step, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=int(settings.get("num_workers", 0)))

    def resume_payload(step: int) -> dict[str, Any]:
        return {"kind": kind, "settings": settings, "in_channels": slices.channels, "step": step,
                "state_dict": model.state_dict(), "ema_state_dict": ema.model.state_dict() if ema else None,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "losses": torch.tensor(losses, dtype=torch.float64), "fingerprint": fingerprint}

    flip = bool(settings.get("flip", True))
    every = int(settings["checkpoint_every"])
    net.train()
    bar = tqdm(total=steps, initial=start_step, desc=kind, disable=not ctx.is_main, dynamic_ncols=True)
    for step, batch in zip(range(start_step, steps), loader):
        generator = torch.Generator(device).manual_seed(step_seed(seed, step, ctx.rank))
        torch.manual_seed(step_seed(seed, step, ctx.world_size + ctx.rank))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if flip:
            batch = _augment(batch, generator)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss = _loss(kind, net, scheduler, batch, settings, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model, step)
        value = loss.detach().float()
        if ctx.world_size > 1:
            dist.all_reduce(value)
            value /= ctx.world_size
        losses.append(float(value))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if (step + 1) % every == 0 and step + 1 < steps and ctx.is_main:
            save_checkpoint(resume_file, resume_payload(step + 1))
    bar.close()
    train_seconds = time.perf_counter() - started

    metrics: dict[str, Any] = {}
    if ctx.is_main:
        final = ema.model if ema is not None else model
        val_set = SliceDataset(slices_path, val_rows, with_masks=kind == "fsl_unet")
        tail = losses[-max(1, min(50, len(losses) // 10)) :]
        metrics = {
            "kind": kind, "steps": steps, "batch_size": batch_size, "seed": seed, "world_size": ctx.world_size,
            "device": str(device), "parameters": count_parameters(model), "train_slices": len(train_rows),
            "train_positive": int((train_labels == 1).sum()), "val_slices": len(val_rows), "val_source": val_source,
            "final_loss": float(np.mean(tail)) if tail else math.nan, "resumed_from_step": start_step,
            "train_seconds_this_run": train_seconds,
            "seconds_per_step_this_run": train_seconds / max(steps - start_step, 1),
            **evaluate_model(kind, final, scheduler, val_set, device, seed),
        }
        payload = {"kind": kind, "settings": settings, "in_channels": slices.channels,
                   "modalities": list(slices.modalities), "image_size": slices.image_size, "step": steps,
                   "seed": seed, "state_dict": model.state_dict(),
                   "ema_state_dict": ema.model.state_dict() if ema else None}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_loss_curve(losses, out.with_suffix(".loss.csv"), out.with_suffix(".loss.png"), f"{kind} training loss")
        _atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
        save_checkpoint(out, payload)
        resume_file.unlink(missing_ok=True)
    ctx.barrier()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cldf.models.train --kind K --slices S --out O --settings-json J [--device D] [--seed N]``.

    ``--settings-json`` is a JSON object or the path of a JSON file. Works under ``torchrun``.
    """
    from cldf.config import resolve_device

    parser = argparse.ArgumentParser(prog="python -m cldf.models.train", description=main.__doc__)
    parser.add_argument("--kind", required=True, choices=MODEL_KINDS)
    parser.add_argument("--slices", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--settings-json", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    text = args.settings_json
    settings = json.loads(Path(text).read_text() if not text.lstrip().startswith("{") else text)
    train_model(args.kind, args.slices, settings, args.out, resolve_device(args.device), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
