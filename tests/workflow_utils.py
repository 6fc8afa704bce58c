"""Helpers to run the Snakemake workflow on small configs from tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import yaml

from cldf.catalogue import Catalogue
from cldf.config import DEFAULT_CONFIG, deep_merge

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

TEST_CONFIG = REPO / ".test" / "config.yaml"
"""The tiny end-to-end configuration (overrides of config/config.yaml)."""
TINY: dict[str, Any] = {k: v for k, v in yaml.safe_load(TEST_CONFIG.read_text()).items() if k != "results_dir"}
"""Its sizes without its results directory: what most workflow tests run."""


def tiny_config(tmp_path: Path, overrides: Mapping[str, Any] | None = None, base: Mapping[str, Any] = TINY) -> Path:
    """Write ``<tmp_path>/config/config.yaml``: the default config merged with ``base`` and ``overrides``.

    The workflow then runs with ``tmp_path`` as its working directory, so results and Snakemake's
    metadata stay there and tests never share state.
    """
    with open(DEFAULT_CONFIG) as fh:
        cfg = yaml.safe_load(fh)
    cfg = deep_merge(cfg, base)
    if overrides:
        cfg = deep_merge(cfg, overrides)
    path = tmp_path / "config" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_snakemake(
    config: Path, args: list[str], check: bool = True, timeout: int = 1500, quiet: bool = True
) -> subprocess.CompletedProcess:
    """Run the workflow with the directory holding ``config/config.yaml`` as working directory."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    workdir = config.parent.parent
    res = subprocess.run(
        [*SNAKEMAKE, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(config), *(["--quiet", "rules"] if quiet else []), *args],
        cwd=workdir, capture_output=True, text=True, env=env, timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def planned_jobs(config: Path, args: list[str] | None = None) -> Counter:
    """Rule name → number of jobs that a dry run plans."""
    res = run_snakemake(config, ["-n", *(args or [])])
    jobs: Counter = Counter()
    for line in (res.stdout + res.stderr).splitlines():  # the job-stats table (printed twice: read it once)
        m = re.match(r"^\s*(\w+)\s+(\d+)\s*$", line)
        if m and m.group(1) == "total":
            break
        if m:
            jobs[m.group(1)] += int(m.group(2))
    return jobs


def planned_wildcards(config: Path, rule: str, wildcard: str) -> list[str]:
    """The values of ``wildcard`` of the jobs of ``rule`` that a dry run plans."""
    res = run_snakemake(config, ["-n"], quiet=False)
    values, current = [], None
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith(("rule ", "localrule ")):
            current = line.split()[1].rstrip(":")
        elif current == rule and line.strip().startswith("wildcards:"):
            fields = dict(part.split("=", 1) for part in line.strip()[len("wildcards:"):].split(", "))
            values.append(fields[wildcard].strip())
    return sorted(set(values))


def artifact(workdir: Path, name: str, results_dir: str = "results", **wildcards: object) -> Path:
    """Where artifact ``name`` of the catalogue lies in a test's working directory."""
    return Path(workdir) / Catalogue(results_dir).path(name, **wildcards)
