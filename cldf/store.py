"""The one place that knows the Zarr layout of every artifact.

Every artifact is a Zarr (v3) group on disk, written under a temporary name and renamed into place only
after every array was written and the group was marked complete, so a killed job never leaves a store
that later steps would trust.

Layouts
-------
``slices.zarr`` (the slice store)
    ``images`` float16 (N, C, H, W), ``body`` uint8 (N, H, W) (brain/body mask computed from the image),
    ``labels`` int8 (N,) (1 positive, 0 negative, -1 ambiguous), ``case_index`` int32 (N,),
    ``slice_index`` int32 (N,), ``split`` uint8 (N,) (codes of :data:`SPLITS`), ``slice_ids`` int64 (N,),
    ``body_fraction`` float32 (N,), and, in the sub-group ``ground_truth``, ``masks`` uint8 (N, H, W),
    ``target_fraction`` float32 (N,) and the mask-derived ``labels`` int8 (N,) of the training and validation
    slices (test rows hold zeros / -1 and :func:`read_ground_truth` refuses them). Attributes: ``case_ids``
    (every case, in order; ``case_index`` points here), ``cases`` (per-case geometry, same order; skipped
    cases carry ``skipped``), ``modalities``, ``image_size``, ``dataset``, ``labels_from`` (the labels table
    or ``masks``) and ``has_masks`` (false: no ground truth at all, :func:`read_ground_truth` and
    :class:`TestTruth` refuse).
``test_truth.zarr`` (the test truth)
    ``slice_ids`` int64 (M,) of the test slices, ``masks`` uint8 (M, H, W), ``target_fraction`` float32 (M,)
    and ``labels`` int8 (M,) derived from them. Only evaluation takes it as input (:func:`read_test_truth`).
map stores (``features.zarr``, ``mean_gradient.zarr``, ``cams/{cam}.zarr``, ``masks.zarr`` ...)
    ``slice_ids`` int64 (N,) (global rows of ``slices.zarr``) plus one or more arrays whose first axis is N.

Ground-truth masks are deliberately not reachable through :class:`SliceStore`: :func:`read_ground_truth`
reads those of training and validation slices (the fully supervised upper bound, and the choices made on
validation), :class:`TestTruth` those of the test slices (evaluation only).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Sequence

import warnings

import numpy as np
import zarr

from cldf.atomic import atomic_dir
from cldf.errors import CldfError

# Snakemake drops a `.snakemake_timestamp` file into directory outputs, and every directory cldf creates
# holds the ownership marker (cldf.atomic.MARKER); both are harmless to Zarr.
warnings.filterwarnings("ignore", message=r"Object at \.(snakemake_timestamp|cldf-owned) is not recognized")

SPLITS = ("train", "val", "test")
GROUND_TRUTH = "ground_truth"
COMPLETE = "cldf_complete"


class StoreError(CldfError, RuntimeError):
    """An artifact is missing, incomplete or inconsistent."""


def _check_writable(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot write {path}: {err}") from err
    if not os.access(parent, os.W_OK):
        raise StoreError(f"cannot write {path}: directory {parent} is not writable")


class ArrayStoreWriter:
    """Write a group of row-aligned arrays atomically.

    Parameters
    ----------
    path
        Final location of the store (a directory ending in ``.zarr``).
    n
        Number of rows (slices) of every array.
    arrays
        ``{name: (tail_shape, dtype)}``; array ``name`` gets shape ``(n, *tail_shape)`` and one chunk per row.
        Names may contain ``/`` to place an array in a sub-group.
    attrs
        JSON-serialisable attributes of the root group.

    The store is built at a temporary sibling path; on a clean exit the group is marked complete and
    renamed to ``path`` (replacing an older store); on an exception the temporary store is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n: int,
        arrays: dict[str, tuple[Sequence[int], Any]],
        attrs: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.n = int(n)
        self._specs = dict(arrays)
        self._attrs = dict(attrs or {})
        self._group: zarr.Group | None = None
        self._stack = ExitStack()

    def __enter__(self) -> "ArrayStoreWriter":
        _check_writable(self.path)
        self._stack = ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_dir(self.path))
            self._group = zarr.open_group(str(tmp), mode="a")
            for name, (tail, dtype) in self._specs.items():
                tail = tuple(int(s) for s in tail)
                self._group.create_array(
                    name,
                    shape=(self.n, *tail),
                    chunks=(1, *tail) if tail else (max(self.n, 1),),
                    dtype=dtype,
                    fill_value=0,
                )
            self._group.attrs.update({**self._attrs, COMPLETE: False})
        except OSError as err:
            self._stack.close()
            raise StoreError(f"cannot create {self.path}: {err}") from err
        except BaseException:
            self._stack.close()
            raise
        return self

    @property
    def group(self) -> zarr.Group:
        assert self._group is not None, "use ArrayStoreWriter as a context manager"
        return self._group

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Write rows ``[start, start + len(data))`` of array ``name``."""
        arr = self.group[name]
        data = np.asarray(data)
        if data.shape[1:] != arr.shape[1:]:
            raise StoreError(f"{self.path.name}/{name}: rows of shape {data.shape[1:]}, expected {arr.shape[1:]}")
        try:
            arr[start : start + len(data)] = data.astype(arr.dtype, copy=False)
        except OSError as err:
            raise StoreError(f"cannot write {self.path}: {err}") from err

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.group.attrs[COMPLETE] = True
        try:
            self._stack.__exit__(exc_type, exc, tb)
        except OSError as err:
            raise StoreError(f"cannot finish {self.path}: {err}") from err


def open_store(path: str | os.PathLike) -> zarr.Group:
    """Open a finished store read-only; raise :class:`StoreError` if it is missing or incomplete."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} does not exist or is not a Zarr store; run the step that makes it")
    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get(COMPLETE, False):
        raise StoreError(f"{path} is incomplete (a job was killed while writing it); delete it and re-run")
    return group


def gather_stores(
    shard_paths: Iterable[str | os.PathLike], out: str | os.PathLike, attrs: dict[str, Any] | None = None
) -> None:
    """Concatenate row-aligned shard stores into one store at ``out``, ordered by ``slice_ids``.

    Streams one row at a time, so memory does not grow with the number of slices. Attributes are
    ``attrs`` when given, else those of the first non-empty shard; every shard must hold the same arrays.
    A single shard (the workflow's shards are temporary) is renamed to ``out`` instead of copied.
    """
    shard_paths = list(shard_paths)
    shards = [open_store(p) for p in shard_paths]
    if not shards:
        raise StoreError(f"no shards to gather into {out}")
    if len(shards) == 1 and attrs is None and not os.path.exists(out):
        os.replace(shard_paths[0], out)  # one complete shard is the store: moved, not copied (same filesystem)
        return
    names = sorted(_array_names(shards[0]))
    for path, shard in zip(shard_paths, shards):
        if sorted(_array_names(shard)) != names:
            raise StoreError(f"shard {path} holds arrays {sorted(_array_names(shard))}, expected {names}")
    ids = np.concatenate([np.asarray(s["slice_ids"][:], dtype=np.int64) for s in shards])
    order = np.argsort(ids, kind="stable")
    owner = np.concatenate([np.full(s["slice_ids"].shape[0], k) for k, s in enumerate(shards)])
    local = np.concatenate([np.arange(s["slice_ids"].shape[0]) for s in shards])
    ref = next((s for s in shards if s["slice_ids"].shape[0] > 0), shards[0])
    if attrs is None:
        attrs = {k: v for k, v in ref.attrs.items() if k != COMPLETE}
    specs = {name: (ref[name].shape[1:], ref[name].dtype) for name in names}
    with ArrayStoreWriter(out, len(ids), specs, attrs) as writer:
        for row, src in enumerate(order):
            shard = shards[owner[src]]
            for name in names:
                writer.write(name, row, shard[name][local[src] : local[src] + 1])


def _array_names(group: zarr.Group, prefix: str = "") -> list[str]:
    names = []
    for key, member in group.members():
        if isinstance(member, zarr.Array):
            names.append(prefix + key)
        else:
            names.extend(_array_names(member, prefix + key + "/"))
    return names


class SliceStore:
    """Read access to ``slices.zarr`` without the ground truth.

    Small per-slice vectors are loaded eagerly; images and body masks are read lazily per batch.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._group = open_store(self.path)
        g = self._group
        self.n: int = int(g["labels"].shape[0])
        self.labels: np.ndarray = np.asarray(g["labels"][:], dtype=np.int8)
        self.case_index: np.ndarray = np.asarray(g["case_index"][:], dtype=np.int32)
        self.slice_index: np.ndarray = np.asarray(g["slice_index"][:], dtype=np.int32)
        self.split: np.ndarray = np.asarray(SPLITS, dtype=object)[np.asarray(g["split"][:], dtype=np.int64)]
        self.cases: list[dict[str, Any]] = list(g.attrs["cases"])
        self.modalities: list[str] = list(g.attrs["modalities"])
        self.image_size: int = int(g.attrs["image_size"])
        self.channels: int = len(self.modalities)
        self.attrs: dict[str, Any] = dict(g.attrs)

    def images(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of rows ``idx`` as float32 (B, C, H, W) in [-1, 1]."""
        return _take_rows(self._group["images"], idx).astype(np.float32)

    def body(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Body/brain masks (from the image, not the ground truth) of rows ``idx``: bool (B, H, W)."""
        return _take_rows(self._group["body"], idx).astype(bool)

    def indices(
        self,
        split: str | Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        cases: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Rows selected by split name(s), label values and case indices (all optional): int64 (M,)."""
        keep = np.ones(self.n, dtype=bool)
        if split is not None:
            keep &= np.isin(self.split, [split] if isinstance(split, str) else list(split))
        if labels is not None:
            keep &= np.isin(self.labels, list(labels))
        if cases is not None:
            keep &= np.isin(self.case_index, list(cases))
        return np.flatnonzero(keep).astype(np.int64)


def _take_rows(array: zarr.Array, idx: Sequence[int] | np.ndarray) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == 0:
        return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
    if np.all(np.diff(idx) == 1):
        return np.asarray(array[int(idx[0]) : int(idx[-1]) + 1])
    return np.asarray(array.get_orthogonal_selection((idx,) + (slice(None),) * (array.ndim - 1)))


def _check_has_masks(group: zarr.Group, path: str | os.PathLike) -> None:
    """Refuse the ground truth of a dataset without masks (labels from a table, ``has_masks`` false)."""
    if group.attrs.get("has_masks", True) is False:
        raise StoreError(f"{path}: the dataset has no masks (its labels come from {group.attrs.get('labels_from')}); "
                         "this step needs ground-truth masks")


def read_ground_truth(path: str | os.PathLike, idx: Sequence[int] | np.ndarray) -> np.ndarray:
    """Ground-truth target masks of training or validation rows ``idx``: uint8 (B, H, W).

    For the fully supervised upper bound and the choices made on validation only. Test rows are refused:
    their masks live in the test truth (:class:`TestTruth`), which only evaluation reads.
    """
    group = open_store(path)
    _check_has_masks(group, path)
    idx = np.asarray(idx, dtype=np.int64)
    if np.any(np.asarray(group["split"][:])[idx] == SPLITS.index("test")):
        raise StoreError(f"{path}: test masks are not in the slice store; only evaluation reads the test truth")
    return _take_rows(group[f"{GROUND_TRUTH}/masks"], idx)


class TestTruth:
    """The test slices' ground truth (``test_truth.zarr``): for evaluation only.

    ``slice_ids`` int64 (M,), ``labels`` int8 (M,) (1 positive, 0 negative, -1 ambiguous, from the masks).
    """

    __test__ = False  # not a pytest class

    def __init__(self, path: str | os.PathLike) -> None:
        self._store = MapStore(path)
        _check_has_masks(self._store.group, path)
        self.slice_ids = self._store.slice_ids
        self.labels = np.asarray(self._store.read("labels", self.slice_ids), dtype=np.int8)

    def masks(self, slice_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """bool (B, H, W) target masks of the given test slices, in that order."""
        return self._store.read("masks", slice_ids).astype(bool)

    def label_of(self, slice_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.labels[self._store.rows_of(slice_ids)]


class MapStore:
    """A finished row-aligned map store addressed by *global* slice ids.

    ``rows_of(slice_ids)`` translates global ids (rows of ``slices.zarr``) into rows of this store.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.group = open_store(self.path)
        self.slice_ids = np.asarray(self.group["slice_ids"][:], dtype=np.int64)
        self._row = {int(s): r for r, s in enumerate(self.slice_ids)}
        self.attrs: dict[str, Any] = dict(self.group.attrs)

    def rows_of(self, slice_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        try:
            return np.asarray([self._row[int(s)] for s in slice_ids], dtype=np.int64)
        except KeyError as err:
            raise StoreError(f"{self.path} has no entry for slice {err.args[0]}") from err

    def read(self, name: str, slice_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Array ``name`` for the given global slice ids, in that order: (B, ...)."""
        rows = self.rows_of(slice_ids)
        order = np.argsort(rows, kind="stable")
        data = _take_rows(self.group[name], rows[order])
        out = np.empty_like(data)
        out[order] = data
        return out
