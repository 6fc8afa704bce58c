"""The result tables as Markdown (``cldf tables results/<dataset>``): what the README shows, generated.

From the CSVs of one dataset's results folder: the comparison table per protocol (Dice with its 95 %
bootstrap interval, IoU, HD95, ``n_cases``, the paper's Dice where it reports one), the differences of the
default CLDF row from every other row, the 3-D results and the choices made on validation. Numbers are
rounded to three decimals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from cldf.catalogue import ARTIFACTS
from cldf.registry import FEATURE_SOURCE_PAPER, label_of, paper_dice
from cldf.store import SliceStore


def _file(folder: Path, name: str) -> Path:
    return folder / ARTIFACTS[name].pattern.split("/", 1)[1]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def comparison(metrics: pd.DataFrame, family: str, protocol: str) -> str:
    """Table 1 of one protocol."""
    frame = metrics[metrics.protocol == protocol]
    header = ["method", "Dice (95 % CI)", "IoU", "HD95 (px)", "n_cases"]
    if protocol == "unlabelled":
        header += ["FP rate (neg.)", "gate sens.", "gate spec."]
    header.append("paper Dice")
    rows = []
    for line in frame.itertuples():
        cam = "" if pd.isna(line.cam) else str(line.cam)
        row = [label_of(line.method, cam), f"{_fmt(line.dice_mean)} ({_fmt(line.dice_ci_low)}–{_fmt(line.dice_ci_high)})",
               line.iou_mean, line.hd95_mean, int(line.n_cases)]
        if protocol == "unlabelled":
            row += [line.fp_rate_neg, line.gate_sensitivity, line.gate_specificity]
        rows.append(row + [paper_dice(line.method, family)])
    return _markdown(header, rows)


def difference_table(frame: pd.DataFrame) -> str:
    rows = [[p, label_of(o, "" if pd.isna(c) else str(c)), d, f"{_fmt(lo)} – {_fmt(hi)}"]
            for p, o, c, d, lo, hi in frame[["protocol", "other", "other_cam", "diff_mean", "ci_low", "ci_high"]].itertuples(index=False)]
    return _markdown(["protocol", "CLDF minus", "Dice difference", "95 % CI"], rows)


def volume_summary(frame: pd.DataFrame) -> str:
    grouped = frame.groupby(["protocol", "method", "cam"], sort=False, dropna=False)
    rows = [[p, label_of(m, "" if pd.isna(c) else str(c)), g.dice_3d.mean(), g.hd95_mm.mean(), len(g)]
            for (p, m, c), g in grouped]
    return _markdown(["protocol", "method", "3-D Dice", "HD95 (mm)", "cases"], rows)


def selection_table(frame: pd.DataFrame) -> str:
    picked = frame[frame["chosen"].astype(bool)]
    rows = [[c, f"`{v}`", d, int((frame.choice == c).sum())] for c, v, d in picked[["choice", "value", "val_dice"]].itertuples(index=False)]
    return _markdown(["choice", "chosen", "validation Dice", "candidates"], rows)


def ablation_table(frame: pd.DataFrame) -> str:
    rows = [[lever, f"`{changed}`" if changed != "{}" else "–", val, f"{_fmt(test)} ({_fmt(lo)}–{_fmt(hi)})"]
            for lever, changed, val, test, lo, hi in
            frame[["lever", "changed", "val_dice", "test_dice", "test_ci_low", "test_ci_high"]].itertuples(index=False)]
    return _markdown(["lever", "changed", "validation Dice", "test Dice (95 % CI)"], rows)


def feature_source_table(frame: pd.DataFrame, family: str) -> str:
    """Table 2: the feature source of each row (the chosen row's is the CDM), beside the paper's Dice."""
    rows = []
    for lever, changed, val, test, lo, hi in frame[["lever", "changed", "val_dice", "test_dice", "test_ci_low",
                                                    "test_ci_high"]].itertuples(index=False):
        source = json.loads(changed).get("features", {}).get("source", "cdm")
        name = "CDM (chosen on validation)" if source == "cdm" else lever
        rows.append([name, val, f"{_fmt(test)} ({_fmt(lo)}–{_fmt(hi)})", FEATURE_SOURCE_PAPER[source].get(family)])
    return _markdown(["decoder features from", "validation Dice", "test Dice (95 % CI)", "paper Dice"], rows)


def selection_study_table(frame: pd.DataFrame) -> str:
    """Table 3: per CAM, the pixels the decoder learns from (the paper's Table 3 gives no number we hold)."""
    rows = [[label_of(cam), selection, f"{_fmt(d)} ({_fmt(lo)}–{_fmt(hi)})", int(n)]
            for cam, selection, d, lo, hi, n in frame[["cam", "selection", "dice_mean", "dice_ci_low", "dice_ci_high",
                                                       "n_cases"]].itertuples(index=False)]
    return _markdown(["CAM", "pixels the decoder learns from", "test Dice (95 % CI)", "n_cases"], rows)


def tables(folder: str | Path, only_ablation: bool = False) -> str:
    """Every result table of one dataset's results folder, as Markdown (or the lever table alone)."""
    folder = Path(folder)
    if only_ablation:
        return ablation_table(pd.read_csv(_file(folder, "ablation"))) + "\n"
    slices = SliceStore(_file(folder, "slices"))
    family = str(slices.attrs.get("layout", ""))
    metrics = pd.read_csv(_file(folder, "metrics"))
    n_test = int(metrics["n_cases"].max()) if len(metrics) else 0
    parts = [f"Dataset `{folder.name}`: {n_test} test cases with a positive slice."]
    for protocol in dict.fromkeys(metrics.protocol):
        parts += [f"**{protocol} protocol**", comparison(metrics, family, protocol)]
    for name, title, render in (("differences", "**Differences** (paired by case)", difference_table),
                                ("metrics_3d", "**3-D, in each scan's own geometry** (mean over test cases)", volume_summary),
                                ("selection", "**Choices made on the validation split**", selection_table),
                                ("ablation", "**Levers** (CLDF with one thing changed; labelled protocol)", ablation_table),
                                ("table2", "**Table 2: feature source** (labelled protocol)",
                                 lambda f: feature_source_table(f, family)),
                                ("table3", "**Table 3: pixel selection** (labelled protocol)", selection_study_table)):
        path = _file(folder, name)
        if path.exists():
            parts += [title, render(pd.read_csv(path, dtype={"value": str}) if name == "selection" else pd.read_csv(path))]
    return "\n\n".join(parts) + "\n"
