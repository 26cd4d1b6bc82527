"""Gradient estimators of the shower: statistical unbiasedness against finite differences of the
expectation with common random numbers, variances, the torch interface and bad input."""
import math

import numpy as np
import pytest
import torch

from pyhybrid.estimators import HistogramObservable, Relaxed, ScoreFunction, StochasticAD
from pyhybrid.estimators.base import leave_one_out_baseline, shapes_of
from pyhybrid.kernels.backend import kernel_types
from pyhybrid.kernels.shower import ShowerSettings, run_shower
from pyhybrid.nn.shower import PartonShower

# log10 y45 is sensitive to both alpha_s(mZ) (bulk) and the cutoff t0 (its lowest bins)
SPEC = HistogramObservable("log10_y45", (-4.5, -4.0, -3.5, -3.0, -2.0))
N_EVENTS = 40_000
SEEDS = (1, 2)
STEP = {"alpha_s": 0.01, "t0": 0.2}
N_FD = 100_000
FD_SEED = 101


def _estimate(estimator, seeds=SEEDS, n=N_EVENTS, **shower):
    """Mean gradient over seeds and its standard error, per parameter: {p: (mean (K,), error (K,))}."""
    parts = [estimator.estimate(PartonShower(**shower), SPEC, n, seed) for seed in seeds]
    out = {}
    for p in ("alpha_s", "t0"):
        d = torch.cat([e.derivatives[p] for e in parts]).numpy()
        out[p] = (d.mean(0), d.std(0) / math.sqrt(len(d)))
    return out


@pytest.fixture(scope="module")
def finite_differences():
    """Central differences of E[F] with common random numbers, for the hard bins and the sigmoid
    bins of :class:`Relaxed`: {"hard" / "soft": {p: (mean (K,), error (K,))}}."""
    types = kernel_types("cpu", "float64")
    width = Relaxed().width_for(SPEC)

    def features(alpha_s, t0):
        settings = ShowerSettings(alpha_s_mz=alpha_s, t0=t0)
        shapes = shapes_of(run_shower(types, N_FD, settings, FD_SEED))
        hard = np.stack([f.numpy() for f in SPEC.features(shapes)], axis=1)
        soft = np.stack([f.numpy() for f in SPEC.soft_features(shapes, width)[0]], axis=1)
        return hard, soft

    out = {"hard": {}, "soft": {}}
    for p, h in STEP.items():
        point = {"alpha_s": 0.118, "t0": 1.0}
        up = features(**dict(point, **{p: point[p] + h}))
        down = features(**dict(point, **{p: point[p] - h}))
        for kind, u, d in zip(("hard", "soft"), up, down):
            diff = (u - d) / (2 * h)  # per event: same seed, common random numbers
            out[kind][p] = (diff.mean(0), diff.std(0) / math.sqrt(len(diff)))
    return out


def _assert_compatible(estimate, reference, parameter, n_sigma=4.0, relative=0.0):
    mean, error = estimate[parameter]
    ref_mean, ref_error = reference[parameter]
    tolerance = n_sigma * np.sqrt(error**2 + ref_error**2) + relative * np.abs(ref_mean)
    assert np.all(np.abs(mean - ref_mean) <= tolerance), (parameter, mean, ref_mean, tolerance)
    assert np.all(error > 0) and np.all(np.isfinite(error))


@pytest.mark.parametrize("estimator", [ScoreFunction(), StochasticAD()], ids=["score-function", "stochastic-ad"])
def test_unbiased_estimators_match_finite_differences(estimator, finite_differences):
    estimate = _estimate(estimator)
    for parameter in ("alpha_s", "t0"):
        _assert_compatible(estimate, finite_differences["hard"], parameter)
    # the derivative is clearly resolved, so agreement is a real check
    mean, error = estimate["alpha_s"]
    assert np.max(np.abs(mean) / error) > 20


def test_relaxed_estimator_tracks_the_smoothed_expectation(finite_differences):
    estimate = _estimate(Relaxed())
    # neglected: moving dipole masses in the dipole choice and z range, clustering jumps
    _assert_compatible(estimate, finite_differences["soft"], "alpha_s", relative=0.15)
    _assert_compatible(estimate, finite_differences["soft"], "t0")


def test_pathwise_estimator_trades_bias_for_variance(finite_differences):
    pathwise = _estimate(Relaxed(likelihood_ratio=False), seeds=(1,))["alpha_s"]
    full = _estimate(Relaxed(), seeds=(1,))["alpha_s"]
    assert np.all(pathwise[1] < full[1])
    reference = finite_differences["soft"]["alpha_s"][0]
    assert np.abs(pathwise[0] - reference).max() > 5 * pathwise[1].max()  # ... and it is biased


def test_relaxed_cutoff_model_gives_t0_gradient_of_the_right_sign():
    estimate = _estimate(Relaxed(cutoff_width=0.1), seeds=(1,))
    mean, error = estimate["t0"]
    # raising t0 removes the softest emissions: fewer events in the lowest y45 bins
    assert mean[0] < -3 * error[0] and mean[1] < -3 * error[1]


def test_score_function_baseline_reduces_variance(finite_differences):
    plain = _estimate(ScoreFunction(baseline="none"), seeds=(1,))
    baseline = _estimate(ScoreFunction(), seeds=(1,))["alpha_s"]
    assert np.all(baseline[1] < plain["alpha_s"][1])
    for parameter in ("alpha_s", "t0"):  # without a baseline: noisier, still unbiased
        _assert_compatible(plain, finite_differences["hard"], parameter)


def test_leave_one_out_baseline_matches_brute_force():
    types = kernel_types("cpu", "float64")
    rng = np.random.default_rng(0)
    f, s = rng.uniform(size=7), rng.normal(size=7)
    (b,) = leave_one_out_baseline([types.Float(f)], types.Float(s))
    expected = [np.sum(np.delete(f * s**2, i)) / np.sum(np.delete(s**2, i)) for i in range(7)]
    assert np.allclose(b.numpy(), expected, rtol=1e-14)


def test_torch_backward_applies_the_estimator():
    shower = PartonShower()
    features = ScoreFunction()(shower, SPEC, 5000, seed=4)
    assert features.shape == (5000, SPEC.n_bins) and features.requires_grad
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    loss = (features.mean(0) * weights).sum()
    loss.backward()
    reference = ScoreFunction().estimate(shower, SPEC, 5000, seed=4)
    assert torch.allclose(features.detach(), reference.values)
    for name in ("alpha_s", "t0"):
        expected = (reference.gradient(name) * weights).sum()
        assert torch.allclose(getattr(shower, name).grad, expected, rtol=1e-10)
    # a frozen parameter is neither estimated nor given a gradient
    shower = PartonShower()
    shower.t0.requires_grad_(False)
    (StochasticAD()(shower, SPEC, 2000, seed=1).mean(0) * weights).sum().backward()
    assert shower.t0.grad is None and torch.isfinite(shower.alpha_s.grad)


def test_float32_estimates_agree_with_float64():
    e64 = ScoreFunction().estimate(PartonShower(), SPEC, 20_000, seed=3)
    e32 = ScoreFunction().estimate(PartonShower(dtype=torch.float32), SPEC, 20_000, seed=3)
    assert e32.values.dtype == torch.float32
    # same random numbers in either precision: near-identical events
    assert (e32.values.double() == e64.values).double().mean() > 0.97
    g64, g32 = e64.gradient("alpha_s"), e32.gradient("alpha_s").double()
    assert torch.all((g64 - g32).abs() < 3 * e64.standard_error("alpha_s"))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="observable must be one of"):
        HistogramObservable("y99", (0.0, 1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        HistogramObservable("log10_y23", (0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="baseline"):
        ScoreFunction(baseline="mean")
    with pytest.raises(ValueError, match="bin_width"):
        Relaxed(bin_width=-1.0)
    with pytest.raises(ValueError, match="cutoff_width"):
        Relaxed(cutoff_width=2.0)
    with pytest.raises(ValueError, match="cutoff_width must be a number in"):
        Relaxed(cutoff_width="0.1")
    with pytest.raises(ValueError, match="cutoff_width must be a number in"):
        Relaxed(cutoff_width=True)
    with pytest.raises(ValueError, match="likelihood_ratio must be True or False"):
        Relaxed(likelihood_ratio="no")
    with pytest.raises(ValueError, match="bin_width must be a positive finite number"):
        Relaxed(bin_width=math.inf)
    for edges in ("ab", b"01", ["0", "1"]):
        with pytest.raises(ValueError, match="edges must be"):
            HistogramObservable("thrust", edges)
    assert HistogramObservable("thrust", torch.tensor([0.5, 1.0], requires_grad=True)).edges == (0.5, 1.0)
    with pytest.raises(TypeError, match="observable_spec must be a HistogramObservable, got tuple"):
        ScoreFunction().estimate(PartonShower(), ("log10_y23", (-3.0, -2.0)), 100, seed=0)
    with pytest.raises(TypeError, match="shower must be a pyhybrid.nn.PartonShower, got NoneType"):
        StochasticAD()(None, SPEC, 100, seed=0)
    with pytest.raises(ValueError, match="n_events"):
        ScoreFunction().estimate(PartonShower(), SPEC, 1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ScoreFunction()(PartonShower(), SPEC, 100, seed=-1)
    with pytest.raises(ValueError, match="parameters"):
        ScoreFunction().estimate(PartonShower(), SPEC, 100, seed=0, parameters=("mz",))
    shower = PartonShower()
    with torch.no_grad():
        shower.alpha_s.fill_(0.4)
    with pytest.raises(ValueError, match="alpha_s must lie"):
        ScoreFunction()(shower, SPEC, 100, seed=0)
