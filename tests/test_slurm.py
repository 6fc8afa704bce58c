"""The tiny workflow through a real SLURM cluster: the same `metrics.csv` as a local run (`make test-slow`).

`scripts/slurm-local.sh` brings up a single-node SLURM on this machine (munged, MariaDB, slurmdbd,
slurmctld, slurmd; it installs Debian's packages when they are missing) and the run goes through
`--workflow-profile none --profile <the shipped profiles/slurm with this cluster's values>`, exactly as a
user submits it. The test skips where that cluster cannot be had (not root, no apt-get, daemons that do
not start) and stops the cluster afterwards unless it was already up before.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .workflow_utils import REPO, artifact, planned_jobs, run_snakemake, tiny_config

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "slurm-local.sh"
SHIPPED_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
# Like .test/config.yaml, a results directory with a space and shell characters: the paths must survive
# sbatch and srun (`$` needs the profile's slurm-pass-command-as-script). Not its `'` as well: with both
# `'` and `$` in a path, Snakemake's job command quotes the path with repr(), "…$HOME…", and the shell of
# the job expands it (snakemake-interface-executor-plugins 9.4, format_cli_value), whatever the profile.
RESULTS = "results (slurm); $HOME & co"
# device cpu: both runs compute the same numbers on the same device, and no job asks for a GPU whatever the host.
OVERRIDES = {"results_dir": RESULTS, "device": "cpu"}
SLURM_TOOLS = ["munged", "slurmctld", "slurmd", "slurmdbd", "sacct", "sacctmgr", "sbatch", "mariadbd"]


def _have(tool: str) -> bool:
    return shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is not None


@pytest.fixture(scope="module")
def slurm_cluster() -> dict[str, str]:
    """A running local SLURM: its environment (SLURM_CONF, SLURM_LOCAL_PARTITION, SLURM_LOCAL_ACCOUNT)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm-local.sh installs Debian packages and runs the SLURM daemons as root")
    if shutil.which("bash") is None:
        pytest.skip("scripts/slurm-local.sh needs bash")
    if not all(_have(tool) for tool in SLURM_TOOLS) and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install slurm-wlm, slurmdbd, munge, "
                    "mariadb-server")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    start = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=1200)
    if start.returncode != 0:
        tail = "; ".join(start.stderr.strip().splitlines()[-4:])
        pytest.skip(f"scripts/slurm-local.sh start failed (exit {start.returncode}): {tail}")
    env = {}
    for line in start.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    assert {"SLURM_CONF", "SLURM_LOCAL_PARTITION", "SLURM_LOCAL_ACCOUNT"} <= env.keys(), start.stdout
    yield env
    if not was_up:
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stderr
        assert not Path(env["SLURM_CONF"]).exists()  # its folder, with the daemons' pid files, is gone


def _slurm(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout


def local_profile(dest: Path, partition: str, account: str, cpus: int, mem_mb: int) -> Path:
    """The shipped profile with the site values of the local cluster, as a user adapts it.

    Partition and account become the local ones; jobs ask for no GPU (the node has none, and this run
    is on the CPU); one CPU per job, so that the node's CPUs run jobs side by side as `--cores` does
    locally; no job asks for more memory than the node has; status checks every few seconds instead
    of every 40 s (the jobs last seconds, not hours).
    """
    profile: dict[str, Any] = copy.deepcopy(yaml.safe_load(SHIPPED_PROFILE.read_text()))

    def adapt(resources: dict[str, Any]) -> None:
        for key in list(resources):
            if key == "slurm_partition":
                resources[key] = partition
            elif key == "slurm_account":
                resources[key] = account
            elif key == "gpu":
                resources[key] = 0
            elif key == "cpus_per_task":
                resources[key] = 1
            elif key == "mem_mb":
                resources[key] = min(int(resources[key]), mem_mb)

    adapt(profile["default-resources"])
    for resources in profile.get("set-resources", {}).values():
        adapt(resources)
    assert "CHANGE_ME" not in yaml.safe_dump(profile)
    profile["slurm-init-seconds-before-status-checks"] = 5
    profile["seconds-between-status-checks"] = 5
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def test_tiny_workflow_through_slurm_gives_the_local_metrics(
    slurm_cluster: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = slurm_cluster
    cpus, mem_mb = _slurm(["sinfo", "-h", "-N", "-o", "%c %m"], env).split()[:2]

    t0 = time.monotonic()
    local_cfg = tiny_config(tmp_path / "local", OVERRIDES)
    run_snakemake(local_cfg, ["--cores", "2"], timeout=1500)
    t_local = time.monotonic() - t0

    for key, value in env.items():
        monkeypatch.setenv(key, value)  # sbatch, sacct and sacctmgr of snakemake and its jobs find the cluster
    slurm_cfg = tiny_config(tmp_path / "slurm", OVERRIDES)
    profile = local_profile(tmp_path / "profile", env["SLURM_LOCAL_PARTITION"], env["SLURM_LOCAL_ACCOUNT"],
                            int(cpus), int(mem_mb) // 2)
    profile_args = ["--workflow-profile", "none", "--profile", str(profile)]
    planned = planned_jobs(slurm_cfg, profile_args)
    t0 = time.monotonic()
    res = run_snakemake(slurm_cfg, profile_args, timeout=3000, quiet=False)
    t_slurm = time.monotonic() - t0
    print(f"local run {t_local:.0f} s, SLURM run {t_slurm:.0f} s")

    local_metrics = artifact(tmp_path / "local", "metrics", RESULTS, dataset="synthetic")
    slurm_metrics = artifact(tmp_path / "slurm", "metrics", RESULTS, dataset="synthetic")
    assert slurm_metrics.read_bytes() == local_metrics.read_bytes()

    # Every job but the target rule `all` went through SLURM, and sacct (slurmdbd) saw each complete.
    log = res.stdout + res.stderr
    run_id = next(line.split("SLURM run ID:", 1)[1].strip() for line in log.splitlines() if "SLURM run ID:" in line)
    rows = _slurm(["sacct", "-X", "--parsable2", "--noheader", "--name", run_id, "--starttime", "now-1days",
                   "--format=JobIDRaw,State,Comment%200"], env).splitlines()
    jobs = [row.split("|", 2) for row in rows if row]
    assert jobs and all(state == "COMPLETED" for _, state, _ in jobs), rows
    rules = [comment.removeprefix("rule_").split("_wildcards_")[0] for _, _, comment in jobs]
    expected = {rule: n for rule, n in planned.items() if rule != "all"}
    assert {rule: rules.count(rule) for rule in set(rules)} == expected
