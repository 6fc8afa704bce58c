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

import copy
import importlib
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.schedulers import DDPMScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cldf import store
from cldf.atomic import atomic_file, write_text
from cldf.errors import PipelineError
from cldf.models.builders import MODEL_KINDS, NULL_CLASS, build_model, build_scheduler, count_parameters
from cldf.registry import METHOD_NETWORKS
from cldf.models.checkpoint import load_checkpoint, save_checkpoint
from cldf.models.data import BalancedBatchSampler, SliceDataset, split_rows, step_seed
from cldf.models.validate import evaluate_model

INIT_TAG = 10**6
"""Stream tag of :func:`step_seed` for weight initialisation (never a rank)."""


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
    step: int = 0,
    context: Mapping[str, nn.Module] | None = None,
) -> torch.Tensor:
    """Training loss of one batch (``image`` (B, C, H, W), ``label`` (B,), ``mask`` (B, 1, H, W) for FSL).

    A comparison method's network (:data:`cldf.registry.METHOD_NETWORKS`) computes its own loss from the
    step and the frozen networks of ``context``.
    """
    x0, y = batch["image"], batch["label"]
    device = x0.device
    if kind in METHOD_NETWORKS:
        module = importlib.import_module(f"cldf.models.{kind}")
        return module.training_loss(model, batch, step, settings, generator, context or {})
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


def write_loss_curve(losses: Sequence[float], csv_path: Path, png_path: Path, title: str) -> None:
    """Write the per-step training loss as CSV (``step,loss``) and a PNG plot (raw + moving average)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=np.float64)
    write_text(csv_path, "step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in zip(steps, values)))
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
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


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
    context: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Train network ``kind`` on the ``train`` split of ``slices_path`` and write ``out`` (+ .json, .loss.csv/.png).

    ``settings``: the preset entry of ``kind`` (architecture keys, ``steps``, ``batch_size`` (global, split
    over processes), ``lr``, ``checkpoint_every``, ``ema_decay`` (CDM; optional for the others),
    ``class_dropout`` (CDM); optional ``flip`` (random left-right flips, default True) and
    ``num_workers`` (DataLoader workers, default 0)). ``on_step(step, loss)`` is called after every
    optimisation step (1-based). ``context``: frozen networks a comparison method's training reads (DiG:
    the CDM). Returns the recorded metrics (rank 0; other ranks return ``{}``). The caller's global torch
    RNG state is left untouched.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    forked = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with _distributed(device) as ctx, torch.random.fork_rng(devices=forked):
        return _train(kind, Path(slices_path), dict(settings), Path(out), ctx, seed, on_step, dict(context or {}))


@dataclass
class _State:
    """What a training run updates: the network, its EMA copy, optimiser, grad scaler, step, loss history."""

    model: nn.Module
    ema: _EMA | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    losses: list[float] = field(default_factory=list)

    def resume_payload(self, kind: str, settings: Mapping[str, Any], in_channels: int, fingerprint: dict) -> dict:
        return {"kind": kind, "settings": settings, "in_channels": in_channels, "step": self.step,
                "state_dict": self.model.state_dict(),
                "ema_state_dict": self.ema.model.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "losses": torch.tensor(self.losses, dtype=torch.float64), "fingerprint": fingerprint}

    def restore(self, payload: Mapping[str, Any]) -> None:
        self.model.load_state_dict(payload["state_dict"])
        if self.ema is not None:
            self.ema.model.load_state_dict(payload["ema_state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.step, self.losses = int(payload["step"]), payload["losses"].tolist()


def _new_state(kind: str, settings: Mapping[str, Any], in_channels: int, device: torch.device, seed: int) -> _State:
    """A freshly initialised network (weights seeded from ``seed``) with its optimiser state."""
    torch.manual_seed(step_seed(seed, 0, INIT_TAG))
    model = build_model(kind, settings, in_channels).to(device)
    ema = _EMA(model, float(settings["ema_decay"])) if "ema_decay" in settings else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return _State(model, ema, optimizer, scaler)


def _resume(state: _State, resume_file: Path, fingerprint: dict, ctx: _Dist, kind: str) -> None:
    """Continue from ``resume_file`` when it belongs to this very run (same kind, settings, seed, data)."""
    if resume_file.exists():
        payload = load_checkpoint(resume_file)
        if payload.get("fingerprint") == fingerprint:
            state.restore(payload)
            if ctx.is_main:
                print(f"[{kind}] resuming from {resume_file} at step {state.step}", file=sys.stderr)
        elif ctx.is_main:
            warnings.warn(f"{resume_file} belongs to a different run (settings, seed or data changed); starting afresh")
    ctx.barrier()


def _training_rows(kind: str, slices: store.SliceStore, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and validation rows; the weakly supervised nets need both classes among the training rows."""
    label_filter = None if kind == "fsl_unet" else (0, 1)
    train_rows, val_rows, val_source = split_rows(slices, label_filter, seed)
    train_labels = slices.labels[train_rows]
    if kind != "fsl_unet" and len(np.unique(train_labels)) < 2:
        raise PipelineError(f"{slices.path}: training {kind} needs positive and negative training slices; "
                            f"found labels {sorted(set(train_labels.tolist()))}")
    return train_rows, val_rows, val_source


def _step(kind: str, net: nn.Module, state: _State, batch: dict, scheduler: DDPMScheduler,
          settings: Mapping[str, Any], ctx: _Dist, seed: int, context: Mapping[str, nn.Module]) -> float:
    """One optimisation step; every random draw comes from ``(seed, step, rank)``. Returns the mean loss."""
    device = ctx.device
    generator = torch.Generator(device).manual_seed(step_seed(seed, state.step, ctx.rank))
    torch.manual_seed(step_seed(seed, state.step, ctx.world_size + ctx.rank))
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if bool(settings.get("flip", True)):
        batch = _augment(batch, generator)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        loss = _loss(kind, net, scheduler, batch, settings, generator, state.step, context)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(state.model, state.step)
    value = loss.detach().float()
    if ctx.world_size > 1:
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value)


def _train(
    kind: str,
    slices_path: Path,
    settings: dict[str, Any],
    out: Path,
    ctx: _Dist,
    seed: int,
    on_step: Callable[[int, float], None] | None,
    context: dict[str, nn.Module],
) -> dict[str, Any]:
    started = time.perf_counter()
    slices = store.SliceStore(slices_path)
    settings["image_size"] = slices.image_size
    train_rows, val_rows, val_source = _training_rows(kind, slices, seed)
    steps = int(settings["steps"])
    state = _new_state(kind, settings, slices.channels, ctx.device, seed)
    scheduler = build_scheduler(settings)
    fingerprint = {"kind": kind, "settings": settings, "seed": seed, "slices": str(slices_path.resolve()),
                   "n_slices": slices.n, "world_size": ctx.world_size}
    _resume(state, resume_path(out), fingerprint, ctx, kind)
    start_step = state.step
    net: nn.Module = state.model
    if ctx.world_size > 1:
        net = DistributedDataParallel(state.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                      find_unused_parameters=kind in METHOD_NETWORKS)  # a phase leaves some unused
    groups = (slices.labels[train_rows] != 0).astype(np.int64)
    sampler = BalancedBatchSampler(groups, int(settings["batch_size"]), seed, steps, start_step, ctx.rank, ctx.world_size)
    dataset = SliceDataset(slices_path, train_rows, with_masks=kind == "fsl_unet")
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=int(settings.get("num_workers", 0)))
    net.train()
    bar = tqdm(total=steps, initial=start_step, desc=kind, disable=not ctx.is_main, dynamic_ncols=True)
    for batch in loader:
        state.losses.append(_step(kind, net, state, batch, scheduler, settings, ctx, seed, context))
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
        if on_step is not None:
            on_step(state.step, state.losses[-1])
        if state.step % int(settings["checkpoint_every"]) == 0 and state.step < steps and ctx.is_main:
            save_checkpoint(resume_path(out), state.resume_payload(kind, settings, slices.channels, fingerprint))
    bar.close()
    metrics: dict[str, Any] = {}
    if ctx.is_main:
        run = {"train_rows": train_rows, "val_rows": val_rows, "val_source": val_source, "start_step": start_step,
               "seconds": time.perf_counter() - started}
        metrics = _finish(kind, state, scheduler, slices, settings, run, out, ctx, seed, context)
    ctx.barrier()
    return metrics


def _finish(kind: str, state: _State, scheduler: DDPMScheduler, slices: store.SliceStore, settings: dict[str, Any],
            run: dict[str, Any], out: Path, ctx: _Dist, seed: int, context: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Validate, then write the metrics JSON, the loss curve and the final checkpoint; drop the resume file.

    A network with ``set_polarity`` (AME-CAM) first fixes its map's polarity on positive training slices.
    """
    steps, losses = int(settings["steps"]), state.losses
    final = state.ema.model if state.ema is not None else state.model
    if hasattr(final, "set_polarity"):
        positive = run["train_rows"][slices.labels[run["train_rows"]] == 1][:64]
        final.eval()
        final.set_polarity(torch.from_numpy(slices.images(positive)).to(ctx.device))
    val_set = SliceDataset(slices.path, run["val_rows"], with_masks=kind == "fsl_unet")
    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    train_labels = slices.labels[run["train_rows"]]
    metrics = {
        "kind": kind, "steps": steps, "batch_size": int(settings["batch_size"]), "seed": seed,
        "world_size": ctx.world_size, "device": str(ctx.device), "parameters": count_parameters(state.model),
        "train_slices": len(run["train_rows"]), "train_positive": int((train_labels == 1).sum()),
        "val_slices": len(run["val_rows"]), "val_source": run["val_source"],
        "final_loss": float(np.mean(tail)) if tail else math.nan, "resumed_from_step": run["start_step"],
        "train_seconds_this_run": run["seconds"],
        "seconds_per_step_this_run": run["seconds"] / max(steps - run["start_step"], 1),
        **evaluate_model(kind, final, scheduler, val_set, ctx.device, seed),
        **({"context": sorted(context)} if context else {}),
    }
    payload = {"kind": kind, "settings": settings, "in_channels": slices.channels,
               "modalities": list(slices.modalities), "image_size": slices.image_size, "step": steps,
               "seed": seed, "state_dict": state.model.state_dict(),
               "ema_state_dict": state.ema.model.state_dict() if state.ema else None}
    write_loss_curve(losses, out.with_suffix(".loss.csv"), out.with_suffix(".loss.png"), f"{kind} training loss")
    write_text(out.with_suffix(".json"), json.dumps(metrics, indent=2) + "\n")
    save_checkpoint(out, payload)
    resume_path(out).unlink(missing_ok=True)
    return metrics
