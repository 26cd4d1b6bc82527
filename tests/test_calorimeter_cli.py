"""``pyhybrid run calorimeter``: HDF5 output, metadata, reproducibility, calibration."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from pyhybrid.cli import main
from pyhybrid.io import read_events

ARGS = ["run", "calorimeter", "--events", "2500", "--batch", "1000", "--energy", "20", "--layers", "60",
        "--layers-per-segment", "10", "--cells", "3", "--cell-size", "150", "--impact-spread", "2",
        "--precision", "float64"]


def run(tmp_path, name, *extra):
    path = tmp_path / name
    result = CliRunner().invoke(main, ARGS + ["-o", str(path), *extra])
    assert result.exit_code == 0, result.output
    return read_events(path), result.output


def test_writes_cells_with_metadata_and_calibrates(tmp_path):
    events, output = run(tmp_path, "a.h5", "--seed", "4")
    assert "2500 showers" in output
    assert events.n_events == 2500
    assert events.fixed["cells"].shape == (2500, 6, 3, 3) and events.fixed["cells"].dtype == np.float64
    np.testing.assert_allclose(events.fixed["energy"], 20.0)
    assert abs(events.fixed["impact"].std() - 2.0) < 0.1
    parameters = events.metadata["parameters"]
    assert parameters["absorber"] == "lead" and parameters["n_layers"] == 60 and events.metadata["seed"] == 4
    # 60 x (2 mm lead + 4 mm scintillator) = 22 X0 and 450 mm wide: nearly contained, so the calibrated
    # sum is ~ E and its spread ~ the stochastic term.
    calibrated = events.fixed["cells"].sum(axis=(1, 2, 3)) / parameters["visible_fraction"]
    assert 0.97 < calibrated.mean() / 20.0 < 1.0
    expected = parameters["stochastic_term"] / np.sqrt(20.0)
    assert abs(calibrated.std() / calibrated.mean() / expected - 1) < 0.15


def test_n_layers_is_the_python_name_of_layers(tmp_path):
    path = tmp_path / "n.h5"
    result = CliRunner().invoke(main, ["run", "calorimeter", "--events", "10", "--n-layers", "12", "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert read_events(path).metadata["parameters"]["n_layers"] == 12


def test_same_seed_reproduces_and_batches_differ(tmp_path):
    a, _ = run(tmp_path, "a.h5", "--seed", "7")
    b, _ = run(tmp_path, "b.h5", "--seed", "7")
    c, _ = run(tmp_path, "c.h5", "--seed", "8")
    np.testing.assert_array_equal(a.fixed["cells"], b.fixed["cells"])
    assert not np.array_equal(a.fixed["cells"], c.fixed["cells"])
    assert not np.array_equal(a.fixed["cells"][:1000], a.fixed["cells"][1000:2000])


def test_rejects_bad_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["run", "calorimeter", "--energy", "0.01", "-o", str(tmp_path / "x.h5")])
    assert result.exit_code != 0 and "'--energy': 0.01 is not in the range x>=0.1" in result.output
    result = runner.invoke(main, ["run", "calorimeter", "--layers", "10", "--layers-per-segment", "3",
                                  "-o", str(tmp_path / "x.h5")])
    assert result.exit_code == 2 and "--layers (10) must be a multiple of --layers-per-segment (3)" in result.output
    for option in ("--energy", "--noise", "--cell-size", "--impact-spread"):
        result = runner.invoke(main, ["run", "calorimeter", option, "inf", "-o", str(tmp_path / "x.h5")])
        assert result.exit_code == 2 and "finite" in result.output, (option, result.output)
    for options, message in [(["--absorber", "scintillator", "--active", "lead"], "must not have a lower Z"),
                             (["--cells", "16"], "'--cells': 16 is not in the range 1<=x<=15"),
                             (["--layers", "100000"], "'--layers' / '--n-layers': 100000 is not in the range 1<=x<=1000")]:
        result = runner.invoke(main, ["run", "calorimeter", *options, "-o", str(tmp_path / "x.h5")])
        assert result.exit_code == 2 and message in result.output, (options, result.output)
