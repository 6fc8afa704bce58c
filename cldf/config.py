"""Configuration: validation against the JSON schema, preset resolution, device choice.

The workflow validates the whole config once at start (``workflow/rules/common.smk``) and passes
each step only the settings it depends on, so Snakemake's parameter rerun trigger re-runs exactly
the steps whose settings changed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from cldf.errors import CldfError
from cldf.registry import MODEL_KINDS, cam_methods

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"


class ConfigError(CldfError, ValueError):
    """The configuration is invalid; the message names the offending key."""


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: Mapping[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Validate ``config`` against the schema; raise :class:`ConfigError` naming the first bad key."""
    with open(schema_path) as fh:
        schema = yaml.safe_load(fh)
    schema["$defs"]["cam_method"] = {"enum": cam_methods()}  # the registry is the one list of CAM methods
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        err = errors[0]
        if err.validator == "additionalProperties":
            message = f"unknown key in {_key_path(err)}: {err.message}"
        else:
            message = f"config key {_key_path(err)}: {err.message}"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(message + more)
    check_config(config)


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks the schema cannot express; raise :class:`ConfigError` naming the key."""
    _check_results_dir(config["results_dir"])
    if config["model_preset"] not in config["presets"]:
        raise ConfigError(
            f"config key model_preset: {config['model_preset']!r} is not one of the presets "
            f"{sorted(config['presets'])}"
        )
    if config["default_dataset"] not in config["datasets"]:
        raise ConfigError(f"config key default_dataset: {config['default_dataset']!r} is not a declared dataset")
    for key, cams in (("cldf.cam", [config["cldf"]["cam"]]), ("cldf.extra_cams", config["cldf"]["extra_cams"]),
                      ("table3.cams", config["table3"]["cams"])):
        missing = [c for c in cams if c not in config["cams"]["methods"]]
        if missing:
            raise ConfigError(f"config key {key}: {', '.join(map(repr, missing))} is not in cams.methods {config['cams']['methods']}")
    tapped = config["features"]["layers"]
    for entry in config["choices"]["feature_layers"]:
        if not set(entry) <= set(tapped):
            raise ConfigError(f"config key choices.feature_layers: {entry} reads "
                              f"{[layer for layer in entry if layer not in tapped]}, which features.layers {tapped} "
                              "does not tap (each entry is a subset of features.layers)")
    for name, ds in config["datasets"].items():
        if ds["layout"] == "synthetic" and "phantom" not in ds:
            raise ConfigError(f"config key datasets.{name}.phantom: required for layout 'synthetic'")
        frac = ds["split"]["val_fraction"] + ds["split"]["test_fraction"]
        if frac >= 1:
            raise ConfigError(f"config key datasets.{name}.split: val_fraction + test_fraction must be < 1")
        _check_normalisation(ds["normalisation"], f"datasets.{name}.normalisation")
        if ds.get("slabs") and ds.get("labels_csv"):
            raise ConfigError(f"config key datasets.{name}.slabs: a labels table (labels_csv) lists whole scans; "
                              "use slabs without labels_csv")
        source = ds.get("selection_from")
        if source is not None and (source not in config["datasets"] or source == name):
            raise ConfigError(f"config key datasets.{name}.selection_from: {source!r} is not another declared dataset")


def _check_results_dir(results_dir: str) -> None:
    if not results_dir.strip():
        raise ConfigError("config key results_dir: must name a directory, got an empty string")
    bad = sorted(set(results_dir) & set("{}\n\r\t"))
    if bad:
        raise ConfigError(
            f"config key results_dir: {results_dir!r} contains {''.join(bad)!r}; braces are Snakemake wildcards "
            "and control characters break paths: choose another directory name"
        )


def _check_normalisation(norm: Mapping[str, Any], key: str) -> None:
    lower, upper = float(norm["lower"]), float(norm["upper"])
    if norm["method"] == "percentile" and not (0 <= lower <= 100 and 0 <= upper <= 100):
        raise ConfigError(f"config key {key}: percentiles must lie in [0, 100], got lower {lower:g}, upper {upper:g}")
    if lower >= upper:
        raise ConfigError(
            f"config key {key}: lower ({lower:g}) must be below upper ({upper:g}), or every image becomes constant"
        )


def load_config(path: str | os.PathLike = DEFAULT_CONFIG, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a YAML config, deep-merge ``overrides`` and validate it."""
    with open(path) as fh:
        config = yaml.safe_load(fh)
    if overrides:
        config = deep_merge(config, overrides)
    validate_config(config)
    return config


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolved_preset(config: Mapping[str, Any]) -> dict:
    """The chosen model preset with the ``models:`` overrides applied."""
    return deep_merge(config["presets"][config["model_preset"]], config.get("models") or {})


def dataset_settings(config: Mapping[str, Any], name: str) -> dict:
    """Settings of dataset ``name`` with ``image_size`` resolved from the preset when null."""
    if name not in config["datasets"]:
        raise ConfigError(f"unknown dataset {name!r}; declared datasets: {sorted(config['datasets'])}")
    ds = copy.deepcopy(config["datasets"][name])
    if ds.get("image_size") is None:
        ds["image_size"] = int(resolved_preset(config)["image_size"])
    ds["name"] = name
    return ds


def model_settings(config: Mapping[str, Any], kind: str) -> dict:
    """Architecture and training settings of model ``kind`` (one of :data:`MODEL_KINDS`)."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    preset = resolved_preset(config)
    if kind not in preset:
        raise ConfigError(f"preset {config['model_preset']!r} has no settings for {kind!r}")
    return dict(preset[kind])


def resolve_device(name: str = "auto"):
    """``auto`` → CUDA when available, else CPU; otherwise the named device (checked to exist)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key device: {name!r} requested but CUDA is not available on this machine")
    return device


def decoder_candidates(grids: Mapping[str, Any], rule: str) -> list[dict[str, Any]]:
    """CLDF's decoder grid (``choices``): every optimiser entry and, under the ``quantile`` selection rule,
    every selection quantile; each candidate is then clustered every way of ``grids["cluster"]``."""
    if rule != "quantile":
        return [dict(opt) for opt in grids["optimizer"]]
    return [{"quantile": q, **opt} for q in grids["quantile"] for opt in grids["optimizer"]]
