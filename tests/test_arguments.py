"""Arguments as users pass them: numpy integers where a count is expected (e.g. from np.arange or
a config array), a single name where a list of names is expected; bools and fractions are refused."""
import numpy as np
import pytest
import torch

import pyhybrid.nn as pn
from pyhybrid import engine
from pyhybrid.estimators import HistogramObservable, ScoreFunction
from pyhybrid.kernels.backend import check_integer
from pyhybrid.nn.matrix_element import rambo_momenta


def test_numpy_integers_are_accepted_as_counts():
    momenta, weight = rambo_momenta(91.2, torch.zeros(2, dtype=torch.float64), np.int64(5), seed=np.uint32(3))
    assert momenta.shape == (5, 4, 4) and weight.shape == (5,)
    events = pn.PartonShower(max_particles=np.int32(32))(np.int64(3), seed=np.int64(1))
    assert events.n_particles.shape == (3,)
    calorimeter = pn.SamplingCalorimeter(n_layers=np.int64(4), layers_per_segment=np.int64(2),
                                         quadrature_points=np.int16(4))
    assert calorimeter.expected_cells(torch.tensor([10.0])).shape[1] == 2


@pytest.mark.parametrize("bad", [True, 2.5, "3", -1, 0])
def test_counts_refuse_bools_fractions_strings_and_non_positive_values(bad):
    with pytest.raises(ValueError, match="n_events must be a positive integer"):
        rambo_momenta(91.2, torch.zeros(2, dtype=torch.float64), bad)
    with pytest.raises(ValueError, match=r"max_steps must be a positive integer"):
        pn.Propagator(pn.UniformField(), pn.barrel([30.0]), max_steps=bad)
    with pytest.raises(ValueError, match=r"threads must be a positive integer"):
        engine.set_threads(bad)


def test_integer_bounds_are_named_in_the_error():
    assert check_integer(np.int64(7), "k", 2, 9) == 7 and type(check_integer(np.int64(7), "k", 2)) is int
    with pytest.raises(ValueError, match=r"k must be an integer in \[2, 9\], got 10"):
        check_integer(10, "k", 2, 9)
    with pytest.raises(ValueError, match=r"k must be an integer >= 2, got 1"):
        check_integer(1, "k", 2)


def test_a_single_name_is_one_name_not_its_letters():
    calorimeter = pn.SamplingCalorimeter(trainable="absorber_thickness")
    assert [name for name, _ in calorimeter.named_parameters()] == ["absorber_thickness"]
    tracker = pn.TrackerDesign([40.0, 80.0, 120.0], trainable="radii")
    assert [name for name, _ in tracker.named_parameters(recurse=False)] == ["radii"]
    estimate = ScoreFunction().estimate(pn.PartonShower(), HistogramObservable("log10_y23", (-3.0, -2.0, -1.0)),
                                        n_events=100, seed=1, parameters="alpha_s")
    assert list(estimate.derivatives) == ["alpha_s"]
