"""Figures: the qualitative grid of the paper's Fig. 3.

It is drawn on a bare :class:`matplotlib.figure.Figure` (Agg canvas; no pyplot state, no display
needed) and written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cldf.registry import label_of
from cldf.store import MapStore, SliceStore, StoreError, TestTruth

CELL_INCHES = 1.6
DPI = 100
GT_COLOUR = "lime"
PRED_COLOUR = (1.0, 0.1, 0.1)
FG_COLOUR = (1.0, 0.1, 0.1)
BG_COLOUR = (0.2, 0.4, 1.0)

PanelData = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]
Panel = Union[str, os.PathLike, tuple[str, str], Callable[[np.ndarray], PanelData]]


def grid_size_pixels(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(height, width) in pixels of a :func:`figure_grid` PNG with ``n_rows`` rows and ``n_cols`` columns."""
    return round(n_rows * CELL_INCHES * DPI), round(n_cols * CELL_INCHES * DPI)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, out_png: str | os.PathLike) -> None:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def choose_rows(slices_path: str | os.PathLike, truth: TestTruth, n_rows: int, seed: int = 0) -> np.ndarray:
    """Positive test slices to show: int64 (R,), R = min(n_rows, number of positive test slices).

    Cases are taken in an order shuffled by ``seed``; each case in turn gives its slice with the largest
    remaining target (round robin), so the rows spread over cases and show clearly visible targets.
    Rows are returned sorted by global slice id.
    """
    slices = SliceStore(slices_path)
    ids = truth.slice_ids[truth.labels == 1]
    if len(ids) == 0:
        raise StoreError(f"{slices_path} has no positive test slices to show")
    area = truth.masks(ids).reshape(len(ids), -1).sum(1)
    cases = slices.case_index[ids]
    queues = []
    for case in np.random.default_rng(seed).permutation(np.unique(cases)):
        mine = np.flatnonzero(cases == case)
        queues.append(list(ids[mine[np.argsort(-area[mine], kind="stable")]]))
    chosen: list[int] = []
    while len(chosen) < min(n_rows, len(ids)):
        for queue in queues:
            if queue and len(chosen) < n_rows:
                chosen.append(int(queue.pop(0)))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _load_panel(panel: Panel, ids: np.ndarray) -> tuple[str, PanelData]:
    """Data of one panel for slices ``ids`` and its kind: "map", "mask" or "selection"."""
    if callable(panel):
        data = panel(ids)
    elif isinstance(panel, tuple):
        data = MapStore(panel[0]).read(panel[1], ids).astype(bool)
    else:
        store = MapStore(panel)
        if "masks" in store.group:
            data = store.read("masks", ids).astype(bool)
        elif "maps" in store.group:
            data = store.read("maps", ids)
        elif "fg" in store.group and "bg" in store.group:
            data = (store.read("fg", ids).astype(bool), store.read("bg", ids).astype(bool))
        else:
            raise StoreError(f"{panel} holds none of 'masks', 'maps' or 'fg'+'bg'; cannot show it")
    if isinstance(data, tuple):
        return "selection", data
    data = np.asarray(data)
    return ("mask" if data.dtype == bool else "map"), data


def _overlay(ax: Axes, mask: np.ndarray, colour: tuple[float, float, float], alpha: float) -> None:
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[mask] = (*colour, alpha)
    ax.imshow(rgba, interpolation="nearest")


def _contour(ax: Axes, mask: np.ndarray, colour: object, style: str = "solid") -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8, linestyles=style)


def figure_grid(
    slices_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    panels: dict[str, Panel],
    out_png: str | os.PathLike,
    n_rows: int = 6,
    seed: int = 0,
) -> None:
    """Qualitative grid (paper Fig. 3): one row per chosen positive test slice (see :func:`choose_rows`).

    Columns: the image (first channel, e.g. FLAIR), the ground truth, then one column per entry of
    ``panels`` in order. A panel is a store path or a callable ``ids (R,) -> data``:

    * a store with ``masks`` (N, H, W) (or ``(store, array name)``), or a callable returning a bool (R, H, W)
      array: the mask filled
      in red over the image, with the ground-truth boundary in green;
    * a store with ``maps`` (N, H, W) in [0, 1], or a callable returning a float (R, H, W) array: a heatmap
      over the image;
    * a store with ``fg`` and ``bg`` (N, H, W), or a callable returning a pair of bool (R, H, W) arrays:
      the pixel selection, foreground red and background blue.

    The PNG measures :func:`grid_size_pixels` (R, 2 + len(panels)) pixels.
    """
    truth = TestTruth(truth_path)
    ids = choose_rows(slices_path, truth, n_rows, seed)
    slices = SliceStore(slices_path)
    images = slices.images(ids)[:, 0]
    gt = truth.masks(ids)
    loaded = {name: _load_panel(panel, ids) for name, panel in panels.items()}
    titles = ["image", "ground truth", *loaded]
    n_cols = len(titles)
    fig = _new_figure(n_cols * CELL_INCHES, len(ids) * CELL_INCHES)
    axes = fig.subplots(len(ids), n_cols, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.995, top=0.94, bottom=0.005, wspace=0.03, hspace=0.03)
    for r, sid in enumerate(ids):
        case = slices.cases[int(slices.case_index[sid])]["id"]
        for c, title in enumerate(titles):
            ax = axes[r, c]
            ax.imshow(images[r], cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{case}\nz={int(slices.slice_index[sid])}", fontsize=6)
                continue
            if c == 1:
                _overlay(ax, gt[r], (0.0, 1.0, 0.0), 0.35)
                _contour(ax, gt[r], GT_COLOUR)
                continue
            kind, data = loaded[title]
            if kind == "map":
                ax.imshow(data[r].astype(np.float32), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.5,
                          interpolation="nearest")
            elif kind == "mask":
                _overlay(ax, data[r], PRED_COLOUR, 0.4)
                _contour(ax, data[r], PRED_COLOUR)
            else:
                _overlay(ax, data[0][r], FG_COLOUR, 0.5)
                _overlay(ax, data[1][r], BG_COLOUR, 0.3)
            _contour(ax, gt[r], GT_COLOUR, "dashed")
    _save_atomic(fig, out_png)


def paper_figure(
    slices_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    cam_path: str | os.PathLike,
    mg_path: str | os.PathLike,
    cldf_masks: str | os.PathLike,
    metrics_csv: str | os.PathLike,
    baselines: Mapping[str, str],
    selection: Mapping[str, Any],
    tuned: Mapping[str, Any],
    out_png: str | os.PathLike,
) -> None:
    """The paper's Fig. 3 layout: image, truth, CAM, MG, CLDF's fused pixel selection (with the settings
    chosen on validation), CLDF's masks and the best thresholded baseline (labelled protocol)."""
    from cldf.segment.selection import select_stored

    slices = SliceStore(slices_path)
    cam, mg = MapStore(cam_path), MapStore(mg_path)

    def fused_selection(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        settings = {**selection, "mode": "fused", "quantile": tuned.get("quantile"), "weight": "none"}
        rows, fg, bg, _ = select_stored(slices, cam, mg, ids, settings)
        position = {int(row): k for k, row in enumerate(rows)}  # a case pool's rows are sorted, ids need not be
        at = [position[int(i)] for i in ids]
        return fg.numpy()[at], bg.numpy()[at]

    table = pd.read_csv(metrics_csv)
    labelled = table[(table.protocol == "labelled") & table.method.isin(list(baselines))]
    best = str(labelled.sort_values("dice_mean", ascending=False, kind="stable").method.iloc[0])
    figure_grid(slices_path, truth_path, {
        "CAM": cam_path, "MG": mg_path, "fused selection": fused_selection, "CLDF": (str(cldf_masks), "CLDF"),
        f"best baseline ({label_of(best)})": baselines[best],
    }, out_png)
