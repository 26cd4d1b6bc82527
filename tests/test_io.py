"""HDF5 event layout: round trip, validation, and crash safety of the writer."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from pyhybrid.io import EventWriter, LayoutError, read_events

FIXED = {"momentum": ((4,), "f8"), "weight": ((), "f4")}
JAGGED = {"pdg": "i4", "energy": "f8"}


def _batch(rng, n):
    counts = rng.integers(0, 6, size=n)
    total = int(counts.sum())
    return (
        {"momentum": rng.normal(size=(n, 4)), "weight": rng.random(n).astype("f4")},
        {"pdg": (counts, rng.integers(-6, 22, size=total).astype("i4")), "energy": (counts, rng.random(total))},
    )


def test_round_trip_with_metadata(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "events.h5"
    batches = [_batch(rng, n) for n in (5, 0, 7)]
    with EventWriter(path, fixed=FIXED, jagged=JAGGED, chunk_events=4,
                     metadata={"seed": 42, "parameters": {"alpha_s": 0.118}, "kernel": "test"}) as writer:
        for fixed, jagged in batches:
            writer.append(len(fixed["weight"]), fixed, jagged)
    events = read_events(path)
    assert events.n_events == 12 and events.complete is True
    np.testing.assert_array_equal(events.fixed["momentum"], np.concatenate([b[0]["momentum"] for b in batches]))
    counts = np.concatenate([b[1]["pdg"][0] for b in batches])
    offsets, values = events.jagged["pdg"]
    np.testing.assert_array_equal(np.diff(offsets), counts)
    np.testing.assert_array_equal(values, np.concatenate([b[1]["pdg"][1] for b in batches]))
    np.testing.assert_array_equal(events.event_list("energy", 5), batches[2][1]["energy"][1][: counts[5]])
    meta = events.metadata
    assert meta["seed"] == 42 and meta["parameters"] == {"alpha_s": 0.118} and meta["kernel"] == "test"
    assert meta["units"]["length"] == "mm" and meta["pyhybrid_version"]
    with h5py.File(path) as f:  # plain h5py users see the documented layout
        assert f["fixed/momentum"].compression == "gzip"
        assert json.loads(f.attrs["units"])["energy"] == "GeV"


def test_append_rejects_wrong_shapes(tmp_path):
    rng = np.random.default_rng(2)
    with EventWriter(tmp_path / "x.h5", fixed=FIXED, jagged=JAGGED) as writer:
        fixed, jagged = _batch(rng, 3)
        with pytest.raises(ValueError, match="'momentum' must have shape \\(4, 4\\)"):
            writer.append(4, fixed, jagged)
        with pytest.raises(ValueError, match="fixed arrays must be exactly"):
            writer.append(3, {"momentum": fixed["momentum"]}, jagged)
        bad = {**jagged, "pdg": (jagged["pdg"][0], jagged["pdg"][1][:-1])}
        if jagged["pdg"][1].size:
            with pytest.raises(ValueError, match="'pdg': values must be flat"):
                writer.append(3, fixed, bad)


def test_append_rejects_values_the_stored_dtype_would_change(tmp_path):
    """Fractions, NaN or out-of-range numbers into an integer dataset, and non-numbers anywhere, are
    refused (numpy would truncate or wrap them silently); nothing is written by a refused batch."""
    rng = np.random.default_rng(4)
    with EventWriter(tmp_path / "x.h5", fixed=FIXED, jagged=JAGGED) as writer:
        fixed, jagged = _batch(rng, 3)
        counts, pdg = jagged["pdg"]
        assert pdg.size > 0
        for values, error, message in [(pdg + 0.5, TypeError, "'pdg' is stored as int32, got float64 values"),
                                       (np.full(pdg.shape, 2**40), ValueError, "outside the range of int32")]:
            with pytest.raises(error, match=message):
                writer.append(3, fixed, {**jagged, "pdg": (counts, values)})
        with pytest.raises(TypeError, match="'weight' is stored as float32, got <U3 values"):
            writer.append(3, {**fixed, "weight": np.array(["1.0", "2.0", "3.0"])}, jagged)
        assert writer.n_events == 0
        writer.append(3, {**fixed, "weight": np.array([1, 2, 3])}, {**jagged, "pdg": (counts, pdg.astype(np.int64))})
    events = read_events(tmp_path / "x.h5")
    np.testing.assert_array_equal(events.fixed["weight"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(events.jagged["pdg"][1], pdg)


def test_a_run_failing_before_its_first_batch_leaves_no_file_and_a_later_failure_keeps_the_batches(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "x.h5"
    with pytest.raises(RuntimeError, match="kernel failed"), EventWriter(path, fixed=FIXED, jagged=JAGGED):
        raise RuntimeError("kernel failed")
    assert not path.exists()
    with pytest.raises(RuntimeError, match="second batch failed"), \
            EventWriter(path, fixed=FIXED, jagged=JAGGED) as writer:
        writer.append(2, *_batch(rng, 2))
        raise RuntimeError("second batch failed")
    events = read_events(path)
    assert events.n_events == 2 and events.complete is False  # not to be mistaken for a finished run
    with h5py.File(path, "a") as f:  # files written before the flag existed
        del f["complete"]
    assert read_events(path).complete is None


def test_bad_counts_names_and_metadata_are_rejected_without_harm(tmp_path):
    rng = np.random.default_rng(3)
    with EventWriter(tmp_path / "x.h5", fixed=FIXED, jagged=JAGGED) as writer:
        fixed, jagged = _batch(rng, 2)
        fractional = (np.array([0.5, 1.5]), np.ones(2))  # sums to 2, but not counts
        with pytest.raises(ValueError, match="'energy': counts must be 2 non-negative integers"):
            writer.append(2, fixed, {**jagged, "energy": fractional})
    with pytest.raises(ValueError, match="without '/'"):
        EventWriter(tmp_path / "y.h5", fixed={"a/b": ((), "f4")})
    kept = tmp_path / "kept.h5"
    with EventWriter(kept, fixed=FIXED, jagged=JAGGED) as writer:
        writer.append(2, *_batch(rng, 2))
    with pytest.raises(FileExistsError, match="kept.h5 exists"):  # by default an existing file is kept
        EventWriter(kept, fixed=FIXED)
    # bad arguments are found before an existing file is replaced (overwrite=True)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        EventWriter(kept, fixed=FIXED, metadata={"parameters": {"x": object()}}, overwrite=True)
    assert read_events(kept).n_events == 2  # the existing file was not truncated
    for bad in ({"format_version": 7}, {"created": "yesterday"}, {"seed": -7}):
        with pytest.raises(ValueError, match="written by EventWriter|seed must be >= 0"):
            EventWriter(kept, fixed=FIXED, metadata=bad, overwrite=True)
    for bad, error, message in (({"fixed": {"x": ((3,), "notadtype")}}, TypeError, "'notadtype' is not a numpy dtype"),
                                ({"fixed": {"x": ((3,), "U8")}}, TypeError, "real number or bool"),
                                ({"fixed": {"x": ((-3,), "f8")}}, ValueError, "non-negative integers"),
                                ({"jagged": {"e": object}}, TypeError, "real number or bool"),
                                ({"fixed": FIXED, "compression": "bogus"}, ValueError, "compression must be")):
        with pytest.raises(error, match=message):
            EventWriter(kept, **bad, overwrite=True)
    assert read_events(kept).n_events == 2


def test_reader_names_layout_errors(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(LayoutError, match="attribute 'format'"):
        read_events(path)
    with EventWriter(path, fixed=FIXED, jagged=JAGGED, overwrite=True) as writer:
        writer.append(2, *_batch(np.random.default_rng(3), 2))
    with h5py.File(path, "a") as f:
        del f["jagged/pdg/offsets"]
    with pytest.raises(LayoutError, match="missing /jagged/pdg/offsets"):
        read_events(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(LayoutError, match="not a readable HDF5 file"):
        read_events(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_events(tmp_path / "missing.h5")


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f.__delitem__("n_events"), f.create_group("n_events")), "missing dataset /n_events"),
    (lambda f: f["n_events"].__setitem__(0, -3), "/n_events must hold one integer >= 0"),
    (lambda f: (f.__delitem__("n_events"), f.create_dataset("n_events", data=np.zeros(0, np.int64))),
     "/n_events must hold one integer"),
    (lambda f: f.attrs.__setitem__("units", "{not json"), "attribute 'units' is not JSON"),
    (lambda f: f.attrs.__setitem__("seed", "seven"), "'seed' and 'format_version' must be integers"),
    (lambda f: (f.__delitem__("fixed/momentum"), f.create_dataset("fixed/momentum", data=1.0)),
     "/fixed/momentum must be a dataset with one row per event"),
    (lambda f: (f.__delitem__("jagged/pdg/offsets"), f.create_group("jagged/pdg/offsets")),
     "missing /jagged/pdg/offsets"),
    (lambda f: (f.__delitem__("jagged/pdg/offsets"), f.create_dataset("jagged/pdg/offsets", data=[0.0, 1.0, 2.0])),
     "offsets must be integers"),
])
def test_reader_turns_damaged_files_into_layout_errors(tmp_path, damage, message):
    path = tmp_path / "damaged.h5"
    with EventWriter(path, fixed=FIXED, jagged=JAGGED, overwrite=True) as writer:
        writer.append(2, *_batch(np.random.default_rng(3), 2))
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(LayoutError, match=message):
        read_events(path)


WRITER_SCRIPT = """
import sys, time
import numpy as np
from pyhybrid.io import EventWriter
rng = np.random.default_rng(0)
with EventWriter(sys.argv[1], fixed={"x": ((3,), "f8")}, jagged={"e": "f8"}, chunk_events=8) as w:
    batch = 0
    while True:
        counts = np.full(10, 2)
        w.append(10, {"x": np.full((10, 3), float(batch))}, {"e": (counts, np.full(20, float(batch)))})
        print(batch, flush=True)
        batch += 1
        time.sleep(0.001 * (batch % 3))  # the kill lands while writing as often as not
"""


def test_killed_writer_keeps_finished_batches(tmp_path):
    path = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    finished = -1
    deadline = time.time() + 60
    while finished < 5 and time.time() < deadline:
        finished = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up, no close: as a crash or a scheduler kill
    proc.wait()
    assert finished >= 5
    events = read_events(path)
    assert events.n_events >= 10 * (finished + 1)
    assert events.n_events % 10 == 0 and events.complete is False
    batches = events.fixed["x"][:, 0]
    np.testing.assert_array_equal(batches, np.repeat(np.arange(events.n_events // 10), 10))
    offsets, values = events.jagged["e"]
    np.testing.assert_array_equal(values, np.repeat(np.arange(events.n_events // 10), 20))
