"""Choices made on validation (cldf.evaluate.choices) and the 3-D metrics, on small synthetic stores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cldf.evaluate.choices import (choice_rows, choose_layers, choose_thresholds, chosen, decode, encode,
                                   read_selection, write_rows)
from cldf.evaluate.metrics import dice_scores, slice_metrics, volume_metrics

from .fixtures_slices import write_map_store, write_slice_store

SIZE = 24


def test_best_candidate_wins_ties_and_no_score_go_to_the_first() -> None:
    rows = choice_rows("c", ["a", 0.3, [1, 2]], [0.2, 0.5, 0.5])
    assert [r["chosen"] for r in rows] == [False, True, False]
    assert [r["chosen"] for r in choice_rows("c", ["a", "b"], [math.nan, math.nan])] == [True, False]
    assert [r["chosen"] for r in choice_rows("c", ["a", "b"], [math.nan, 0.1])] == [False, True]
    assert chosen(rows, "c") == 0.3
    assert decode(encode({"lr": 1.0, "optimizer": "sgd"})) == {"lr": 1.0, "optimizer": "sgd"}
    assert decode(encode("otsu")) == "otsu" and decode(encode([["layer1", "layer2"]])) == [["layer1", "layer2"]]


def test_selection_rows_round_trip(tmp_path: Path) -> None:
    rows = choice_rows("threshold:x", ["otsu", 0.4], [0.1, 0.7]) + choice_rows("layers:y", [["l1"], ["l2", "l3"]], [0.3, 0.2])
    write_rows(rows, tmp_path / "s.csv")
    frame = read_selection(tmp_path / "s.csv")
    assert list(frame.columns) == ["choice", "value", "val_dice", "chosen"]
    assert chosen(frame, "threshold:x") == 0.4 and chosen(frame, "layers:y") == ["l1"]
    with pytest.raises(KeyError):
        chosen(frame, "gate")


def _val_store(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Validation slices whose target is bright in channel 0 and dark in channel 1, and a map that is
    exactly the target at 0.6 (a distractor at 0.4 fools Otsu)."""
    rng = np.random.default_rng(0)
    n = 8
    masks = np.zeros((n, SIZE, SIZE), bool)
    distractor = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        r, c = rng.integers(3, 12, size=2)
        masks[i, r : r + 6, c : c + 6] = True
        distractor[i, 16:22, 16:22] = True
    images = rng.normal(0, 0.05, (n, 2, SIZE, SIZE)).astype(np.float32)
    images[:, 0] += 0.8 * masks
    images[:, 1] -= 0.8 * masks
    path = write_slice_store(tmp_path / "slices", images, [1] * n, [0] * 4 + [1] * 4, ["val", "val"], masks)
    maps = 0.05 + 0.55 * masks + 0.35 * distractor
    return path, np.arange(n), maps.astype(np.float16)


def test_choose_maps_picks_threshold_layers_and_intensity_on_validation(tmp_path: Path) -> None:
    slices, ids, maps = _val_store(tmp_path)
    plain = write_map_store(tmp_path / "map", ids, maps=maps)
    layers = np.stack([np.zeros_like(maps), maps], axis=1)  # in grid order of first appearance: "b" empty, "a" the map
    layered = write_map_store(tmp_path / "cam", ids, layers=layers)
    grids = {"threshold": ["otsu", 0.5], "layercam_layers": [["b"], ["a", "b"]]}
    assert chosen(choose_layers(slices, layered, "cam", grids), "layers:cam") == ["a", "b"]
    rows = choose_thresholds(slices, {"m": plain}, grids)
    assert chosen(rows, "threshold:m") == 0.5  # Otsu splits at the distractor, 0.5 isolates the target
    assert [r["val_dice"] for r in rows if r["choice"] == "threshold:m"][1] == pytest.approx(1.0)
    intensity = {r["value"]: r["val_dice"] for r in rows if r["choice"] == "intensity"}
    assert set(intensity) == {"flair:bright", "flair:dark", "t1:bright", "t1:dark"}
    assert chosen(rows, "intensity") in ("flair:bright", "t1:dark")
    assert intensity["flair:bright"] > 0.9 and intensity["flair:dark"] < 0.5


def test_a_map_that_does_not_beat_the_whole_body_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    slices, ids, maps = _val_store(tmp_path)
    target = write_map_store(tmp_path / "good", ids, maps=maps)
    inverted = write_map_store(tmp_path / "inverted", ids, maps=(1 - maps).astype(np.float16))
    grids = {"threshold": ["otsu", 0.5]}
    with caplog.at_level("WARNING", logger="cldf.choose"):
        rows = choose_thresholds(slices, {"good": target, "inverted": inverted}, grids)
    scores = {name: max(r["val_dice"] for r in rows if r["choice"] == name)
              for name in ("threshold:good", "threshold:inverted")}
    # the body is every pixel here: marking it all scores 2·36 / (36 + 576) against each 6 x 6 target
    assert scores["threshold:inverted"] < 2 * 36 / (36 + SIZE**2) < scores["threshold:good"]
    flagged = [r.getMessage() for r in caplog.records if "whole body" in r.getMessage()]
    assert len(flagged) == 1 and flagged[0].startswith("map inverted:") and "0.118" in flagged[0]


def test_dice_scores_agree_with_monai_and_volume_metrics_use_mm() -> None:
    rng = np.random.default_rng(1)
    pred, gt = rng.random((5, 16, 16)) > 0.6, rng.random((5, 16, 16)) > 0.5
    pred[0] = gt[0] = False
    np.testing.assert_allclose(dice_scores(pred, gt), slice_metrics(pred, gt)["dice"].to_numpy())
    a = np.zeros((20, 20, 10), bool)
    a[5:10, 5:10, 2:6] = True
    b = np.roll(a, 2, axis=0)
    dice, hd = volume_metrics(a, b, (1.0, 1.0, 1.0))
    assert dice == pytest.approx(2 * 3 * 5 * 4 / (2 * 100)) and hd == pytest.approx(2.0)
    assert volume_metrics(a, b, (3.0, 1.0, 1.0))[1] == pytest.approx(6.0)  # the shift is along the 3 mm axis
    assert volume_metrics(a & False, a & False, (1, 1, 1)) == (1.0, 0.0)
    assert volume_metrics(a, a & False, (1, 1, 1))[0] == 0.0
