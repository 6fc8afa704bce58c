"""Configuration checks: the schema and the cross-key checks refuse bad values at start, in one line."""

from __future__ import annotations

import copy

import pytest

from cldf.config import DEFAULT_CONFIG, ConfigError, deep_merge, load_config, validate_config

BASE = load_config(DEFAULT_CONFIG)


def _with(**override) -> dict:
    return deep_merge(copy.deepcopy(BASE), override)


def _norm(method: str, lower: float, upper: float) -> dict:
    return _with(datasets={"brats21": {"normalisation": {"method": method, "lower": lower, "upper": upper}}})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_norm("percentile", 99.5, 0.5), "config key datasets.brats21.normalisation: lower (99.5) must be below upper (0.5)"),
        (_norm("percentile", 1.0, 1.0), "config key datasets.brats21.normalisation: lower (1) must be below upper (1)"),
        (_norm("percentile", 0.5, 150), "config key datasets.brats21.normalisation: percentiles must lie in [0, 100]"),
        (_norm("window", 40, 40), "config key datasets.brats21.normalisation: lower (40) must be below upper (40)"),
        (_with(results_dir=""), "config key results_dir: must name a directory, got an empty string"),
        (_with(results_dir="res{dataset}"), "config key results_dir: 'res{dataset}' contains '{}'"),
        (_with(cldf={"cam": "scorecam"}, cams={"methods": ["gradcam"]}), "config key cldf.cam: 'scorecam' is not in cams.methods"),
        (_with(datasets={"brats21": {"split": {"val_fraction": 0.5, "test_fraction": 0.5}}}),
         "val_fraction + test_fraction must be < 1"),
        (_with(features={"layers": ["up_blocks.0"]}),
         "config key choices.feature_layers: ['up_blocks.1', 'up_blocks.2'] reads ['up_blocks.1', 'up_blocks.2'], "
         "which features.layers ['up_blocks.0'] does not tap"),
    ],
)
def test_bad_values_are_refused_with_one_line(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_windows_and_percentiles_that_make_sense_pass() -> None:
    validate_config(_norm("percentile", 0.0, 100.0))
    validate_config(_norm("window", -160, 240))
    validate_config(_with(results_dir="my results; $HOME & co"))
