"""``pyhybrid run me``: cross section printout, HDF5 events, LHE files read by pylhe, errors."""
from __future__ import annotations

import re

import numpy as np
import pylhe
import pytest
from click.testing import CliRunner

from pyhybrid.commands.me import command
from pyhybrid.io import read_events


def _run(*args):
    return CliRunner().invoke(command, ["--points", "20000", "--adapt", "2", "--iterations", "2", *args])


def test_ee_qqg_events_to_hdf5_and_lhe(tmp_path):
    output, lhe = tmp_path / "qqg.h5", tmp_path / "qqg.lhe"
    result = _run("--process", "ee_qqg", "--events", "500", "-o", str(output), "--lhe", str(lhe), "--seed", "3")
    assert result.exit_code == 0, result.output
    sigma, error = (float(x) for x in re.search(r"sigma = (\S+) \+- (\S+) pb", result.output).groups())
    events = read_events(output)
    assert events.n_events == 500
    momenta, pdg, colour = events.fixed["momenta"], events.fixed["pdg"], events.fixed["colour"]
    assert momenta.shape == (500, 5, 4) and pdg.shape == (500, 5) and colour.shape == (500, 5, 2)
    np.testing.assert_allclose(momenta[:, :2].sum(1), momenta[:, 2:].sum(1), atol=1e-9)
    assert set(np.abs(pdg[:, 2])) <= {1, 2, 3, 4, 5} and np.all(pdg[:, 3] == -pdg[:, 2]) and np.all(pdg[:, 4] == 21)
    assert events.metadata["parameters"]["process"] == "ee_qqg"
    assert events.metadata["cross_section_pb"] == pytest.approx(sigma, rel=1e-5)
    assert events.metadata["seed"] == 3

    lhe_file = pylhe.LHEFile.fromfile(str(lhe))
    process = lhe_file.init.procInfo[0]
    assert process.xSection == pytest.approx(sigma, rel=1e-5) and process.error == pytest.approx(error, rel=1e-3)
    lhe_events = list(lhe_file.events)
    assert len(lhe_events) == 500
    assert sum(e.eventinfo.weight for e in lhe_events) == pytest.approx(sigma, rel=1e-6)
    first = lhe_events[0].particles
    assert [p.id for p in first] == list(pdg[0])
    assert [int(p.status) for p in first] == [-1, -1, 1, 1, 1]
    assert [p.px for p in first] == pytest.approx(list(momenta[0, :, 1]), abs=1e-8)
    # colour flow q(501) -> g(502, 501) -> qbar(0, 502)
    assert [(p.color1, p.color2) for p in first[2:]] == [(501, 0), (0, 502), (502, 501)]


def test_an_interrupted_run_leaves_an_lhe_file_that_is_not_taken_for_a_complete_one(tmp_path, monkeypatch):
    """Ctrl-C after the first batch: the HDF5 file is marked incomplete, the LHE file keeps its events
    but has no closing tag (its weights assume all requested events), so LHE readers reject it."""
    import xml.etree.ElementTree as ElementTree

    import pyhybrid.kernels.hard_process as hard_process

    batches = hard_process.HardProcess.unweighted_batches

    def interrupted(self, *args, **kwargs):
        for chunk in batches(self, *args, **kwargs):
            yield chunk
            raise KeyboardInterrupt

    monkeypatch.setattr(hard_process.HardProcess, "unweighted_batches", interrupted)
    output, lhe = tmp_path / "int.h5", tmp_path / "int.lhe"
    result = _run("--process", "ee_mumu", "--events", "200000", "-o", str(output), "--lhe", str(lhe))
    assert result.exit_code != 0
    events = read_events(output)
    assert 0 < events.n_events < 200000 and events.complete is False
    text = lhe.read_text()
    assert text.count("<event>") == events.n_events and "</LesHouchesEvents>" not in text
    assert f"INCOMPLETE: the run stopped after {events.n_events} of 200000 events" in text
    with pytest.raises(ElementTree.ParseError):
        ElementTree.fromstring(text)


def test_gg_tt_colour_flows_and_masses(tmp_path):
    lhe = tmp_path / "tt.lhe"
    result = _run("--process", "gg_tt", "--sqrt-s", "600", "--events", "400", "-o", str(tmp_path / "tt.h5"),
                  "--lhe", str(lhe))
    assert result.exit_code == 0, result.output
    flows = set()
    for event in pylhe.LHEFile.fromfile(str(lhe)).events:
        gluon1, gluon2, top, antitop = event.particles
        assert top.m == pytest.approx(172.5) and antitop.m == pytest.approx(172.5)
        colour_of_top = gluon1 if gluon1.color1 == top.color1 else gluon2
        assert colour_of_top.color1 == top.color1
        flows.add(colour_of_top is gluon1)
        # every colour tag appears exactly once as colour and once as anticolour on the incoming side or out
        assert antitop.color2 in (gluon1.color2, gluon2.color2)
    assert flows == {True, False}


def test_cross_section_only_and_options(tmp_path):
    result = _run("--process", "ee_mumu", "--sqrt-s", "10", "--events", "0", "--gf", "1.1663788e-5")
    assert result.exit_code == 0, result.output
    assert "sigma =" in result.output


@pytest.mark.parametrize("args, message", [
    (["--process", "ee_qq", "--flavour", "t"], "unknown flavour 't'"),
    (["--process", "qq_tt", "--sqrt-s", "300"], "sqrt_s must exceed"),
    (["--process", "ee_qqg", "--y-cut", "0.5"], "y_cut must lie in"),
    (["--alpha", "0.0078", "--gf", "1.2e-5"], "either --alpha or --gf"),
    (["--sin2w", "1.5"], "'--sin2w': 1.5 is not in the range 0<x<1"),
    (["--mz", "-91"], "'--mz': -91.0 is not in the range x>0"),
    (["--gamma-z", "nan"], "'--gamma-z': 'nan' is not a finite number"),
    (["--events", "0", "--lhe", "y.lhe"], "an LHE file needs events"),
    (["--mapping", "rambo", "--precision", "float32"], "needs --precision float64"),
    (["--lhe", "x.h5"], "the LHE file must differ from the HDF5 output"),
])
def test_bad_input_gives_clear_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = _run(*args, "-o", "x.h5")
    assert result.exit_code != 0
    assert message in result.output
