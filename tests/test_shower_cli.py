"""``pyhybrid run shower``: jagged particle lists and event shapes in HDF5, metadata, bad options."""
import numpy as np
from click.testing import CliRunner

from pyhybrid.cli import main
from pyhybrid.io import read_events


def test_run_shower_writes_particle_lists(tmp_path):
    path = tmp_path / "shower.h5"
    result = CliRunner().invoke(main, ["run", "shower", "--events", "2500", "--batch-size", "1000", "--seed", "7",
                                       "--precision", "float64", "-o", str(path)])
    assert result.exit_code == 0, result.output
    events = read_events(path)
    assert events.n_events == 2500
    assert events.metadata["parameters"]["alpha_s_mz"] == 0.118 and events.metadata["seed"] == 7
    assert events.metadata["parameters"]["batch_size"] == 1000
    offsets, energies = events.jagged["E"]
    counts = np.diff(offsets)
    assert counts.min() >= 2 and np.array_equal(counts, events.fixed["n_emissions"] + 2)
    for i in (0, 999, 1000, 2499):  # events on both sides of a batch boundary
        momenta = np.stack([events.event_list(name, i) for name in ("E", "px", "py", "pz")], axis=1)
        assert np.allclose(momenta.sum(0), [91.2, 0, 0, 0], atol=1e-9)
        pid = events.event_list("pid", i)
        col, acol = events.event_list("col", i), events.event_list("acol", i)
        assert sorted(col[col > 0]) == sorted(acol[acol > 0])
        assert np.count_nonzero(pid == 21) == len(pid) - 2 * np.count_nonzero((pid > 0) & (pid < 6))
    assert np.all((events.fixed["thrust"] > 0.5) & (events.fixed["thrust"] <= 1.0))
    y = events.fixed["y23"]
    assert np.all(y[counts >= 3] > 0) and np.all(y[counts < 3] == 0)
    # batches draw different random numbers: no repeated events
    first = [tuple(np.round(events.event_list("px", i), 9)) for i in range(2500)]
    assert len(set(first)) == 2500


def test_run_shower_rejects_out_of_range_parameters(tmp_path):
    runner = CliRunner()
    for option, value, message in (("--alpha-s", "0.4", "alpha_s must lie"), ("--t0", "0.05", "t0 must exceed"),
                                   ("--sqrt-s", "2000", "sqrt_s must lie")):
        result = runner.invoke(main, ["run", "shower", option, value, "-o", str(tmp_path / "x.h5")])
        assert result.exit_code != 0 and message in result.output, result.output
    result = runner.invoke(main, ["run", "shower", "--events", "2000", "--max-particles", "4",
                                  "-o", str(tmp_path / "x.h5")])
    assert result.exit_code != 0 and "max-particles" in result.output
    assert not (tmp_path / "x.h5").exists()  # no empty file left by the failed run
