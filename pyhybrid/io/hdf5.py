"""HDF5 event files (h5py; no torch).

Layout (readable with plain h5py; see docs/hdf5_layout.md)::

    /                       attrs: format="pyhybrid-events", format_version, pyhybrid_version,
                                   units (JSON), parameters (JSON), seed, created (ISO 8601 UTC)
    /n_events               int64[1]   events committed so far (the only length a reader trusts)
    /complete               uint8[1]   1 once the writer was closed normally; 0 while it writes and after
                                       a run that was interrupted or failed (its events are still valid)
    /fixed/<name>           dtype[n_rows, *shape]       one row per event
    /jagged/<name>/offsets  int64[n_rows + 1]           event i owns values[offsets[i]:offsets[i+1]]
    /jagged/<name>/values   dtype[n_values]             flat values of all events (awkward/uproot style)

Appending is crash-safe: a batch is written and flushed first, and only then is
``/n_events`` raised and flushed. A writer killed at any point leaves a file whose
first ``n_events`` events are complete; rows beyond that are ignored by
:func:`read_events`. The file is opened in SWMR mode so that its on-disk state
stays consistent between flushes.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping

import h5py
import numpy as np

FORMAT = "pyhybrid-events"
FORMAT_VERSION = 1
DEFAULT_UNITS = {"energy": "GeV", "momentum": "GeV", "length": "mm", "time": "ns",
                 "magnetic_field": "T", "charge": "e"}


class LayoutError(ValueError):
    """An HDF5 file does not follow the pyhybrid event layout."""


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable")


def _metadata_attributes(metadata: dict) -> dict:
    """The file attributes of :class:`EventWriter` (raises TypeError for non-JSON metadata)."""
    from pyhybrid import __version__

    reserved = sorted({"format", "format_version", "pyhybrid_version", "created"} & set(metadata))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are written by EventWriter itself")
    seed = metadata.pop("seed", None)
    if seed is not None and not int(seed) >= 0:
        raise ValueError(f"metadata seed must be >= 0 or None, got {seed}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "pyhybrid_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(),
            "units": json.dumps({**DEFAULT_UNITS, **metadata.pop("units", {})}),
            "parameters": json.dumps(metadata.pop("parameters", {}), default=_json_default),
            "seed": -1 if seed is None else int(seed),
            "extra": json.dumps(metadata, default=_json_default)}


class EventWriter:
    """Append events in batches to a new HDF5 file.

    Parameters
    ----------
    path: output file. An existing file is an error (nothing written earlier is lost) unless
        ``overwrite=True``.
    fixed: ``{name: (per_event_shape, dtype)}`` for fixed-size per-event arrays.
    jagged: ``{name: dtype}`` for variable-length per-event lists.
    metadata: ``parameters`` (dict), ``seed`` (int), ``units`` (dict) and any
        other JSON-serialisable entries, stored as file attributes.
    chunk_events: HDF5 chunk length along the event axis.
    compression: h5py compression filter ("gzip", "lzf" or None).

    Use as a context manager; each :meth:`append` is durable when it returns. A run that fails
    (an exception leaves the ``with`` block) before any event was appended leaves no file behind.
    """

    def __init__(self, path: str | os.PathLike, *, fixed: Mapping[str, tuple] | None = None,
                 jagged: Mapping[str, object] | None = None, metadata: Mapping | None = None,
                 chunk_events: int = 4096, compression: str | None = "gzip",
                 overwrite: bool = False):
        fixed = dict(fixed or {})
        jagged = dict(jagged or {})
        if not fixed and not jagged:
            raise ValueError("EventWriter needs at least one fixed or jagged array")
        overlap = set(fixed) & set(jagged)
        if overlap:
            raise ValueError(f"names used for both fixed and jagged arrays: {sorted(overlap)}")
        bad_names = [name for name in [*fixed, *jagged] if not isinstance(name, str) or not name or "/" in name]
        if bad_names:
            raise ValueError(f"array names must be non-empty strings without '/', got {bad_names}")
        if chunk_events < 1:
            raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")
        # Checked before the file is opened: a bad argument must not truncate an existing file.
        for name, (shape, dtype) in fixed.items():
            _check_dtype(f"fixed array {name!r}", dtype)
            if not all(isinstance(size, (int, np.integer)) and size >= 0 for size in tuple(shape)):
                raise ValueError(f"fixed array {name!r}: per-event shape must be non-negative integers, got {shape!r}")
        for name, dtype in jagged.items():
            _check_dtype(f"jagged array {name!r}", dtype)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"output file {path} exists")
        self.path = os.fspath(path)
        self._fixed_shapes = {name: tuple(shape) for name, (shape, _) in fixed.items()}
        self._jagged_names = list(jagged)
        self.n_events = 0
        # Serialised before the file is opened: bad metadata must not truncate an existing file.
        attributes = _metadata_attributes(dict(metadata or {}))
        self._file = h5py.File(self.path, "w" if overwrite else "w-", libver="latest")
        self._file.attrs.update(attributes)
        options = {"compression": compression} if compression else {}
        self._file.create_dataset("n_events", data=np.zeros(1, np.int64))
        self._file.create_dataset("complete", data=np.zeros(1, np.uint8))
        group = self._file.create_group("fixed")
        for name, (shape, dtype) in fixed.items():
            group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                 chunks=(chunk_events, *shape), **options)
        group = self._file.create_group("jagged")
        for name, dtype in jagged.items():
            sub = group.create_group(name)
            sub.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,),
                               chunks=(chunk_events,))
            sub.create_dataset("values", shape=(0,), maxshape=(None,), dtype=dtype,
                               chunks=(chunk_events * 16,), **options)
        self._file.swmr_mode = True
        self._file.flush()

    def append(self, n_events: int, fixed: Mapping[str, np.ndarray] | None = None,
               jagged: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """Append ``n_events`` events.

        ``fixed[name]``: array of shape ``(n_events, *shape)``;
        ``jagged[name]``: ``(counts, values)`` with ``counts`` of shape
        ``(n_events,)`` (non-negative integers) and ``values`` flat of length ``counts.sum()``.
        Every declared array must be given.
        """
        fixed = dict(fixed or {})
        jagged = dict(jagged or {})
        if set(fixed) != set(self._fixed_shapes):
            raise ValueError(f"fixed arrays must be exactly {sorted(self._fixed_shapes)}, got {sorted(fixed)}")
        if set(jagged) != set(self._jagged_names):
            raise ValueError(f"jagged arrays must be exactly {sorted(self._jagged_names)}, got {sorted(jagged)}")
        for name, values in fixed.items():
            values = np.asarray(values)
            want = (n_events, *self._fixed_shapes[name])
            if values.shape != want:
                raise ValueError(f"fixed array {name!r} must have shape {want}, got {values.shape}")
            _check_storable(f"fixed array {name!r}", values, self._file["fixed"][name].dtype)
        for name, (counts, values) in jagged.items():
            counts = np.asarray(counts)
            if counts.shape != (n_events,) or not np.issubdtype(counts.dtype, np.integer) or (
                    counts.size and counts.min() < 0):
                raise ValueError(f"jagged array {name!r}: counts must be {n_events} non-negative integers")
            if np.asarray(values).shape != (int(counts.sum()),):
                raise ValueError(f"jagged array {name!r}: values must be flat with counts.sum() entries")
            _check_storable(f"jagged array {name!r}", np.asarray(values),
                            self._file["jagged"][name]["values"].dtype)

        start = self.n_events
        for name, values in fixed.items():
            dataset = self._file["fixed"][name]
            dataset.resize(start + n_events, axis=0)
            dataset[start:] = values
        for name, (counts, values) in jagged.items():
            group = self._file["jagged"][name]
            offsets, flat = group["offsets"], group["values"]
            first = int(offsets[start])
            offsets.resize(start + n_events + 1, axis=0)
            offsets[start + 1:] = first + np.cumsum(counts, dtype=np.int64)
            flat.resize(first + int(np.sum(counts)), axis=0)
            flat[first:] = values
        self._file.flush()
        # Commit point: readers trust only n_events, raised after the data are on disk.
        self.n_events = start + n_events
        self._file["n_events"][0] = self.n_events
        self._file.flush()

    def close(self) -> None:
        """Mark the file complete and close it."""
        self._close(complete=True)

    def _close(self, complete: bool) -> None:
        if self._file.id.valid:
            if complete:
                self._file["complete"][0] = 1
            self._file.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._close(complete=exc_type is None)  # an interrupted or failed run stays marked incomplete
        if exc_type is not None and self.n_events == 0:
            with contextlib.suppress(OSError):  # the original exception is the one to see
                os.remove(self.path)


def _check_dtype(what: str, dtype) -> None:
    try:
        kind = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what}: {dtype!r} is not a numpy dtype") from None
    if not (np.issubdtype(kind, np.number) or kind == np.bool_) or np.issubdtype(kind, np.complexfloating):
        raise TypeError(f"{what}: dtype must be a real number or bool type, got {kind}")


def _check_storable(what: str, values: np.ndarray, dtype: np.dtype) -> None:
    """Values that the dataset's dtype would silently change: fractions or NaN into an integer
    dataset, integers outside its range, non-numbers (a float dataset takes any real number;
    float64 into float32 rounds, as declared)."""
    if np.issubdtype(dtype, np.integer):
        if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
            raise TypeError(f"{what} is stored as {dtype}, got {values.dtype} values: round and cast them first")
        limits = np.iinfo(dtype)
        if values.size and (values.min() < limits.min or values.max() > limits.max):
            raise ValueError(f"{what}: values outside the range of {dtype} [{limits.min}, {limits.max}]")
    elif not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_) or \
            np.issubdtype(values.dtype, np.complexfloating):
        raise TypeError(f"{what} is stored as {dtype}, got {values.dtype} values")


@dataclass
class EventFile:
    """Contents of a pyhybrid event file (all arrays in memory, numpy)."""

    n_events: int
    fixed: dict[str, np.ndarray] = field(default_factory=dict)
    jagged: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    #: True once the writer closed normally; False for a run that is still writing, was interrupted or
    #: failed (its n_events events are valid all the same); None for files written before the flag.
    complete: bool | None = None

    def event_list(self, name: str, index: int) -> np.ndarray:
        """Values of jagged array ``name`` for event ``index``."""
        offsets, values = self.jagged[name]
        return values[offsets[index]:offsets[index + 1]]


def read_events(path: str | os.PathLike) -> EventFile:
    """Read and validate a pyhybrid event file; errors name what is missing or wrong
    (:class:`LayoutError`; FileNotFoundError for a missing file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as error:
        raise LayoutError(f"{path}: not a readable HDF5 file ({error})") from error
    with handle as f:
        if f.attrs.get("format") != FORMAT:
            raise LayoutError(f"{path}: attribute 'format' is {f.attrs.get('format')!r}, expected {FORMAT!r}")
        for key in ("format_version", "pyhybrid_version", "created", "units", "parameters", "seed"):
            if key not in f.attrs:
                raise LayoutError(f"{path}: missing file attribute {key!r}")
        for key in ("n_events", "fixed", "jagged"):
            kind = h5py.Dataset if key == "n_events" else h5py.Group
            if not isinstance(f.get(key), kind):
                raise LayoutError(f"{path}: missing {'dataset' if key == 'n_events' else 'group'} /{key}")
        count = f["n_events"]
        if count.shape != (1,) or not np.issubdtype(count.dtype, np.integer) or count[0] < 0:
            raise LayoutError(f"{path}: /n_events must hold one integer >= 0, got shape {count.shape} "
                              f"dtype {count.dtype}" + (f" value {count[0]}" if count.shape == (1,) else ""))
        n = int(count[0])

        def json_attribute(key: str, default=None):
            try:
                return json.loads(f.attrs[key] if default is None else f.attrs.get(key, default))
            except (TypeError, ValueError) as error:
                raise LayoutError(f"{path}: file attribute {key!r} is not JSON ({error})") from None

        try:
            seed, version = int(f.attrs["seed"]), int(f.attrs["format_version"])
        except (TypeError, ValueError) as error:
            raise LayoutError(f"{path}: file attributes 'seed' and 'format_version' must be integers ({error})") \
                from None
        metadata = {
            **json_attribute("extra", "{}"),
            "format_version": version,
            "pyhybrid_version": str(f.attrs["pyhybrid_version"]),
            "created": str(f.attrs["created"]),
            "units": json_attribute("units"),
            "parameters": json_attribute("parameters"),
            "seed": None if seed < 0 else seed,
        }
        complete = f.get("complete")
        result = EventFile(n_events=n, metadata=metadata,
                           complete=None if not isinstance(complete, h5py.Dataset) else bool(complete[0]))
        for name, dataset in f["fixed"].items():
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim < 1:
                raise LayoutError(f"{path}: /fixed/{name} must be a dataset with one row per event")
            if dataset.shape[0] < n:
                raise LayoutError(f"{path}: /fixed/{name} has {dataset.shape[0]} rows, n_events is {n}")
            result.fixed[name] = dataset[:n]
        for name, group in f["jagged"].items():
            for part in ("offsets", "values"):
                if not isinstance(group, h5py.Group) or not isinstance(group.get(part), h5py.Dataset) \
                        or group[part].ndim != 1:
                    raise LayoutError(f"{path}: missing /jagged/{name}/{part} (a one-dimensional dataset)")
            offsets = group["offsets"]
            if not np.issubdtype(offsets.dtype, np.integer):
                raise LayoutError(f"{path}: /jagged/{name}/offsets must be integers, got {offsets.dtype}")
            if offsets.shape[0] < n + 1:
                raise LayoutError(f"{path}: /jagged/{name}/offsets has {offsets.shape[0]} entries, needs {n + 1}")
            offsets = offsets[: n + 1]
            if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
                raise LayoutError(f"{path}: /jagged/{name}/offsets must start at 0 and not decrease")
            if group["values"].shape[0] < offsets[-1]:
                raise LayoutError(f"{path}: /jagged/{name}/values is shorter than offsets[-1]={offsets[-1]}")
            result.jagged[name] = (offsets, group["values"][: offsets[-1]])
    return result
