"""One place for each fact: the checks that keep the code base in the shape docs/ARCHITECTURE.md describes."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml

from cldf.catalogue import ZARR
from cldf.config import DEFAULT_CONFIG, SCHEMA_PATH, ConfigError, deep_merge, load_config, validate_config
from cldf.registry import FEATURE_SOURCES, MAPS, cam_methods

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cldf"
CODE = [*sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "workflow").rglob("*.smk")), REPO / "workflow" / "Snakefile"]
LAYERS = ["io", "data", "models", "maps", "segment", "evaluate"]
"""Sub-packages in dependency order: a module may import its own layer and the layers before it."""


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_the_package_is_longer_than_80_lines() -> None:
    long = [f"{p.relative_to(REPO)}:{name} ({n} lines)" for p in PACKAGE.rglob("*.py") for name, n in _functions(p)
            if n > 80]
    assert long == []


def test_imports_never_go_backwards_through_the_layers() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0]
        if layer not in LAYERS:
            continue
        for imported in re.findall(r"^\s*(?:from|import) cldf\.(\w+)", path.read_text(), re.M):
            if imported in LAYERS and LAYERS.index(imported) > LAYERS.index(layer):
                wrong.append(f"{path.relative_to(REPO)} imports cldf.{imported}")
    assert wrong == []


def _files_naming(text: str, files: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in files if text in p.read_text()]


def test_artifact_file_names_are_spelled_in_the_catalogue_only() -> None:
    files = [*CODE, *sorted((REPO / "tests").rglob("*.py"))]
    assert len(_files_naming(ZARR, files)) <= 3, _files_naming(ZARR, files)
    assert "cldf/catalogue.py" in _files_naming(ZARR, files)


def test_a_method_is_named_by_its_registration_and_its_function_only() -> None:
    for method in cam_methods():
        module, function = MAPS[method].function.split(":")
        home = module.replace(".", "/") + ".py"
        assert f"def {function}(" in (REPO / home).read_text()
        assert set(_files_naming(f'"{method}"', CODE)) <= {"cldf/registry.py", home}, method
    assert len(_files_naming("gradcampp", CODE)) == 2


def test_schema_enum_of_cam_methods_is_the_registry() -> None:
    config = load_config(DEFAULT_CONFIG)
    for method in cam_methods():
        validate_config(deep_merge(copy.deepcopy(config), {"cams": {"methods": [method]}, "cldf": {"cam": method, "extra_cams": []},
                                                              "table3": {"cams": [method]}}))
    with pytest.raises(ConfigError, match="cams.methods"):
        validate_config(deep_merge(copy.deepcopy(config), {"cams": {"methods": ["ablationcam"]}}))


def test_schema_enum_of_feature_sources_is_the_registry() -> None:
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    enum = schema["$defs"]["levers"]["additionalProperties"]["properties"]["features"]["properties"]["source"]["enum"]
    assert tuple(enum) == FEATURE_SOURCES


def _schema_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, sub in (node.get("properties") or {}).items():
        keys.append(f"{prefix}{key}")
        keys += _schema_keys(sub, f"{prefix}{key}.")
    return keys


def test_every_schema_key_is_read_somewhere() -> None:
    """A key is read when its name appears quoted (``["key"]``, ``.get("key")``, ``keys=("key", ...)``) or as a
    dotted path (``"gradient.timesteps"``) in the package or the workflow, or when its whole section is passed
    on (e.g. ``config["features"]``)."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    sections = [schema, *schema["$defs"].values()]
    keys = sorted({k for section in sections for k in _schema_keys(section)})
    code = "\n".join(p.read_text() for p in CODE)
    unread = []
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        quoted = re.search(rf"[\"']{re.escape(leaf)}[\"']", code) or re.search(rf"[\"']{re.escape(key)}[.\"']", code)
        passed_on = parent and re.search(rf"[\"']{re.escape(parent.rsplit('.', 1)[-1])}[\"']\]\s*(\)|,|$)", code, re.M)
        if not quoted and not passed_on:
            unread.append(key)
    assert unread == []


def _gpu_rules() -> set[str]:
    """Rules whose resources ask for the `gpu` resource (`gpu=GPU`), and the rules derived from them."""
    gpu, derived = set(), {}
    for path in sorted((REPO / "workflow/rules").glob("*.smk")):
        text = path.read_text()
        for block in re.split(r"\n(?=rule |use rule )", text):
            head = block.split("\n", 1)[0]
            if m := re.match(r"use rule (\w+) as (\w+)", head):
                derived[m.group(2)] = m.group(1)
            elif (m := re.match(r"rule (\w+):", head)) and re.search(r"^\s+gpu=GPU\b", block, re.M):
                gpu.add(m.group(1))
    return gpu | {new for new, base in derived.items() if base in gpu}


def test_every_gpu_rule_goes_to_the_gpu_partition_of_the_cluster_profile() -> None:
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())["set-resources"]
    rules = _gpu_rules()
    assert {"train_model", "map_shard", "segment_shard", "ablation", "table2"} <= rules
    missing = sorted(r for r in rules if "gpu_partition" not in str(profile.get(r, {}).get("slurm_partition", "")))
    assert not missing, f"GPU rules without a GPU partition in profiles/slurm/config.yaml: {missing}"
