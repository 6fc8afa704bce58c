"""The Zarr artifact layer: atomic stores, kills, gathering, read-only results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cldf.store import ArrayStoreWriter, MapStore, StoreError, gather_stores, open_store

SPEC = {"slice_ids": ((), "int64"), "maps": ((4, 4), "float16")}


def _write(path: Path, ids: list[int]) -> None:
    with ArrayStoreWriter(path, len(ids), SPEC, {"kind": "test"}) as w:
        w.write("slice_ids", 0, np.asarray(ids))
        w.write("maps", 0, np.stack([np.full((4, 4), i) for i in ids]))


def test_error_inside_the_writer_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "maps"
    with pytest.raises(RuntimeError):
        with ArrayStoreWriter(out, 2, SPEC) as w:
            w.write("slice_ids", 0, np.array([0, 1]))
            raise RuntimeError("crash mid-write")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_write_leaves_no_store_and_a_rerun_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "maps"
    script = (
        "import os, signal, numpy as np\n"
        "from cldf.store import ArrayStoreWriter\n"
        f"w = ArrayStoreWriter({str(out)!r}, 2, {SPEC!r}).__enter__()\n"
        "w.write('slice_ids', 0, np.array([0, 1]))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", script])
    assert res.returncode == -9
    assert not out.exists()
    with pytest.raises(StoreError, match="does not exist"):
        open_store(out)
    assert len(list(tmp_path.glob(".maps.tmp-*"))) == 1
    _write(out, [0, 1])
    assert open_store(out).attrs["kind"] == "test"
    assert list(tmp_path.glob(".maps.tmp-*")) == []


def test_incomplete_store_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "maps"
    _write(out, [0])
    import zarr

    zarr.open_group(str(out), mode="a").attrs["cldf_complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)


def test_gather_orders_by_slice_id(tmp_path: Path) -> None:
    _write(tmp_path / "a", [4, 0])
    _write(tmp_path / "b", [3, 1, 2])
    gather_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    store = MapStore(tmp_path / "all")
    assert store.slice_ids.tolist() == [0, 1, 2, 3, 4]
    assert store.read("maps", [3, 0])[:, 0, 0].tolist() == [3, 0]
    with pytest.raises(StoreError, match="no entry for slice 7"):
        store.read("maps", [7])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_results_dir_gives_a_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(StoreError, match="not writable"):
        _write(ro / "maps", [0])


def test_unwritable_results_location_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results directory should be")
    with pytest.raises(StoreError, match="cannot write"):
        _write(blocker / "synthetic" / "maps", [0])
