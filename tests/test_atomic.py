"""Atomic writes and safe removal: no step removes a path it did not create."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cldf.atomic import MARKER, UnsafePathError, atomic_dir, remove_owned, remove_stale_temporaries, temporary_sibling
from cldf.data.phantom import generate_phantom

from .workflow_utils import REPO


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "my_scan.nii.gz").write_bytes(b"precious")
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("also precious")
    return path


def test_phantom_refuses_to_replace_a_folder_it_did_not_create(tmp_path: Path) -> None:
    user = _user_folder(tmp_path / "my_data")
    with pytest.raises(UnsafePathError, match=f"refusing to replace {user}: .*cldf did not create"):
        generate_phantom(user, n_cases=2, shape=(16, 16, 8), seed=0)
    assert (user / "my_scan.nii.gz").read_bytes() == b"precious" and (user / "sub" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_data"]  # no temporary left either


def test_phantom_cli_refuses_the_parent_directory_in_one_line(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    _user_folder(tmp_path / "sibling")
    dataset = '{"root": "..", "modalities": ["flair"], "phantom": {"n_cases": 2, "shape": [16, 16, 8], "seed": 0}}'
    res = subprocess.run([sys.executable, "-m", "cldf.cli", "phantom", "--dataset", dataset, "--manifest", "p.json"],
                         cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "cldf phantom: error: refusing to replace ..: it is a non-empty directory that cldf did not create "
        f"(no {MARKER} marker inside); point the config at a new directory, or move it away yourself"
    ]
    assert (tmp_path / "sibling" / "my_scan.nii.gz").exists() and not (work / "p.json").exists()


def test_phantom_replaces_its_own_output_and_an_empty_folder(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    generate_phantom(root, n_cases=2, shape=(16, 16, 8), seed=0)
    assert (root / MARKER).is_file() and (root / "Synth_000").is_dir()
    generate_phantom(root, n_cases=3, shape=(16, 16, 8), seed=0)
    assert (root / "Synth_002").is_dir()


def test_failed_build_leaves_the_old_output_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_of_other_processes_are_removed_foreign_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "store"
    stale_dir = temporary_sibling(out, "buffers").with_name(".store.buffers-99999999-0123abcd")
    stale_dir.mkdir()
    (stale_dir / MARKER).touch()
    stale_file = tmp_path / ".store.tmp-99999999-89abcdef"
    stale_file.write_text("half")
    foreign = tmp_path / ".store.tmp-99999999-fedcba98"
    _user_folder(foreign)  # named like a temporary, but not marked: not ours
    mine = temporary_sibling(out)
    mine.mkdir()
    (mine / MARKER).touch()
    removed = remove_stale_temporaries(out)
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert foreign.exists() and mine.exists()


def test_remove_owned(tmp_path: Path) -> None:
    user = _user_folder(tmp_path / "user")
    with pytest.raises(UnsafePathError):
        remove_owned(user)
    assert user.exists()
    (tmp_path / "f.csv").write_text("x")
    remove_owned(tmp_path / "f.csv")
    remove_owned(tmp_path / "missing")
    assert not (tmp_path / "f.csv").exists()
