"""pyhybrid.nn.hybrid: the physics/surrogate/residual interface and the tracking building blocks."""
import math

import pytest
import torch

from pyhybrid.nn.hybrid import (MODES, Component, Correction, HitCorrection, LinearPlusMLP, PerigeeHits, Surrogate,
                                TrackEncoder, Whiten, canonical_frame, fit, fit_surrogate, gauss_newton_step,
                                hit_chi2, local_residuals, perigee_to_free, residual_jacobian, rotate_hits,
                                rotate_perigee)
from pyhybrid.nn.propagator import RK4, Propagator, SolenoidField, barrel

RADII = (40.0, 90.0, 160.0, 250.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def physics(scattering="none", **field):
    return PerigeeHits(Propagator(SolenoidField(2.0, **field), barrel(RADII, half_length=2000.0), stepper=RK4(50.0),
                                  scattering=scattering))


def tracks(n, seed, phi_range=math.pi):
    """Perigee parameters: pT in [1, 5] GeV, theta in [1.0, 2.1], d0 ~ 50 um, z0 ~ 20 mm."""
    g = torch.Generator().manual_seed(seed)
    pt = 1 + 4 * torch.rand(n, generator=g, dtype=torch.float64)
    theta = 1.0 + 1.1 * torch.rand(n, generator=g, dtype=torch.float64)
    charge = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return torch.stack([0.05 * torch.randn(n, generator=g, dtype=torch.float64),
                        20 * torch.randn(n, generator=g, dtype=torch.float64),
                        phi_range * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1),
                        theta, charge * torch.sin(theta) / pt], dim=1)


# ---------------------------------------------------------------- tracking geometry


def test_perigee_to_free_is_the_point_of_closest_approach():
    p = tracks(50, 1)
    position, direction, qop = perigee_to_free(p)
    torch.testing.assert_close(position[:, :2].norm(dim=1), p[:, 0].abs())
    torch.testing.assert_close(direction.norm(dim=1), torch.ones(50, dtype=torch.float64))
    # At the perigee the transverse position is perpendicular to the transverse direction.
    assert (position[:, :2] * direction[:, :2]).sum(1).abs().max() < 1e-12
    torch.testing.assert_close(position[:, 2], p[:, 1])
    torch.testing.assert_close(qop, p[:, 4])


def test_rotation_about_the_beam_axis_is_exact():
    """The canonical frame relies on it: propagating rotated tracks gives rotated hits."""
    hits_of = physics()
    p = tracks(40, 2)
    angle = torch.linspace(-3.0, 3.0, 40, dtype=torch.float64)
    with torch.no_grad():
        direct = hits_of(rotate_perigee(p, angle))
        rotated = rotate_hits(hits_of(p), angle, torch.tensor(RADII))
    assert bool(hits_of.valid.all())
    assert local_residuals(direct, rotated, torch.tensor(RADII)).abs().max() < 1e-6  # mm


def test_canonical_frame_puts_the_first_hit_at_phi_zero_and_inverts():
    hits_of = physics()
    with torch.no_grad():
        hits = hits_of(tracks(30, 3))
    radii = torch.tensor(RADII)
    rotated, phi_ref = canonical_frame(hits, radii)
    assert rotated[:, 0, 0].abs().max() < 1e-9
    back = rotate_hits(rotated, phi_ref, radii)
    assert local_residuals(back, hits, radii).abs().max() < 1e-9


def test_local_residuals_are_taken_on_the_circle():
    radii = torch.tensor([100.0])
    predicted = torch.tensor([[[100 * (math.pi - 1e-4), 5.0]]], dtype=torch.float64)
    measured = torch.tensor([[[100 * (-math.pi + 1e-4), 4.0]]], dtype=torch.float64)
    torch.testing.assert_close(local_residuals(predicted, measured, radii),
                               torch.tensor([[[-0.02, 1.0]]], dtype=torch.float64))
    chi2 = hit_chi2(local_residuals(predicted, measured, radii), torch.tensor([[0.01, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(chi2, torch.tensor([8.0], dtype=torch.float64))


# ---------------------------------------------------------------- Jacobians and fits through the propagator


def test_residual_jacobian_matches_central_differences():
    hits_of = physics()
    p = tracks(6, 4)
    with torch.no_grad():
        measured = hits_of(p)

    def residuals(q):
        return (hits_of(q) - measured).flatten(1)

    _, jac = residual_jacobian(residuals, p + 1e-3)
    steps = torch.tensor([1e-5, 1e-4, 1e-8, 1e-8, 1e-8], dtype=torch.float64)
    for k in range(5):
        shift = torch.zeros_like(p)
        shift[:, k] = steps[k]
        with torch.no_grad():
            numeric = (residuals(p + 1e-3 + shift) - residuals(p + 1e-3 - shift)) / (2 * steps[k])
        torch.testing.assert_close(jac[:, :, k], numeric, rtol=1e-5, atol=1e-5 * float(numeric.abs().max()))


def test_gauss_newton_recovers_noise_free_tracks_exactly():
    hits_of = physics()
    truth = tracks(50, 5)
    with torch.no_grad():
        measured = hits_of(truth)
    start = truth + torch.tensor([0.05, 2.0, 2e-3, 1e-2, 0.02], dtype=torch.float64) * torch.randn(
        50, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = start
    for _ in range(4):
        params, chi2 = gauss_newton_step(lambda q: ((hits_of(q) - measured) / 0.01).flatten(1), params)
    # Quadratic convergence (measured errors 1e-7 -> 1e-13) needs an exact Jacobian of the propagator.
    error = (params - truth).abs().max(0).values
    assert error[0] < 1e-9 and error[1] < 1e-9  # mm
    assert error[2] < 1e-11 and error[3] < 1e-11  # rad
    assert error[4] < 1e-11  # 1/GeV


def test_perigee_hits_gradcheck():
    hits_of = physics()
    p = tracks(2, 6).requires_grad_()
    assert torch.autograd.gradcheck(hits_of, (p,), eps=1e-7, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the Component interface


def small_correction():
    correction = Correction((5,), (len(RADII), 2), inputs="both", output_scale=0.1).double()
    p = tracks(50, 12)
    with torch.no_grad():
        return correction.calibrate(p, physics()(p))


def test_component_modes_and_errors():
    hits_of = physics()
    p = tracks(8, 7)
    surrogate = Surrogate((5,), (len(RADII), 2)).double()
    correction = small_correction()
    component = Component(physics=hits_of, surrogate=surrogate, correction=correction)
    assert component.mode == "residual" and set(MODES) == {"physics", "surrogate", "residual"}
    with torch.no_grad():
        exact = hits_of(p)
        # a fresh correction is exactly zero: the hybrid model starts as the physics model
        torch.testing.assert_close(component(p), exact, rtol=0, atol=0)
        torch.testing.assert_close(component.use("physics")(p), exact, rtol=0, atol=0)
        torch.testing.assert_close(component.use("surrogate")(p), surrogate(p), rtol=0, atol=0)
        for parameter in correction.network.parameters():
            parameter.normal_(0, 0.3)
        delta = correction(p, exact)
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(component.use("residual")(p), exact + delta)
    sampled = Component(physics=physics(scattering="sample"))
    with torch.no_grad():  # options of the physics call pass through: sampled scattering with a seed
        torch.testing.assert_close(sampled(p, seed=3), sampled.physics(p, seed=3), rtol=0, atol=0)
        assert not torch.equal(sampled(p, seed=3), sampled(p, seed=4))
    with pytest.raises(ValueError, match="mode must be one of"):
        component.mode = "both"
    # the mode is saved and restored with the state_dict (a checkpoint of a surrogate-mode model stays one)
    restored = Component(physics=physics(), surrogate=Surrogate((5,), (len(RADII), 2)).double(),
                         correction=small_correction())
    restored.load_state_dict(component.use("surrogate").state_dict())
    assert restored.mode == "surrogate"
    with torch.no_grad():
        torch.testing.assert_close(restored(p), surrogate(p), rtol=0, atol=0)
    older = {k: v for k, v in component.use("physics").state_dict().items() if not k.endswith("_extra_state")}
    restored.load_state_dict(older)  # a checkpoint from before the mode was saved: strict, the mode kept
    assert restored.mode == "surrogate"
    with pytest.raises(ValueError, match="needs physics and correction"):
        Component(surrogate=surrogate).load_state_dict({**component.use("residual").state_dict()}, strict=False)
    with pytest.raises(ValueError, match="needs surrogate"):
        Component(physics=hits_of).use("surrogate")
    with pytest.raises(ValueError, match="needs physics and correction"):
        Component(surrogate=surrogate).use("residual")
    with pytest.raises(ValueError, match="physics module or a surrogate"):
        Component()


def test_residual_component_gradients_reach_inputs_network_and_field():
    hits_of = physics(requires_grad=True)
    correction = small_correction()
    with torch.no_grad():
        for parameter in correction.network.parameters():
            parameter.normal_(0, 0.3)
    component = Component(physics=hits_of, correction=correction)
    p = tracks(1, 8).requires_grad_()
    assert torch.autograd.gradcheck(component, (p,), eps=1e-7, atol=1e-5, rtol=1e-4)
    component(p).square().sum().backward()
    assert hits_of.propagator.field.b0.grad.abs() > 0
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in correction.network.parameters())


def test_surrogate_imitates_the_propagator_and_swaps_in():
    hits_of = physics()
    train, test = tracks(2000, 9, phi_range=0.05), tracks(300, 10, phi_range=0.05)
    surrogate = Surrogate((5,), (len(RADII), 2), hidden=(64, 64)).double()
    losses = fit_surrogate(surrogate, hits_of, train, steps=200, batch_size=256, lr=2e-3)
    assert losses[-1] < losses[0]
    component = Component(physics=hits_of, surrogate=surrogate)
    with torch.no_grad():
        exact = component.use("physics")(test)
        error = component.use("surrogate")(test) - exact
    spread = (exact - exact.mean(0)).pow(2).mean().sqrt()
    # Measured: rms error 0.6 mm (mostly z on the outer layer) for hits spread by 40 mm rms: 1.5 %.
    assert error.pow(2).mean().sqrt() < 0.03 * spread


# ---------------------------------------------------------------- building blocks


def test_whiten_decorrelates_and_reduces_like_one_big_sample():
    g = torch.Generator().manual_seed(0)
    # covariance eigenvalues 1.6e-8 .. 37: strongly correlated, like the hits of one track
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.05, 0.0], [5.0, 3.0, 0.01]], dtype=torch.float64)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64) @ mixing.T + 7.0
    z = Whiten(3).double().from_samples(x)(x)
    # condition number 2e9: eigh's rounding leaves ~3e-6
    torch.testing.assert_close(torch.cov(z.T), torch.eye(3, dtype=torch.float64), atol=3e-5, rtol=0)
    doubled = Whiten(3).double().from_samples(x, reduce=lambda moment: 2 * moment)  # two workers with the same data
    torch.testing.assert_close(doubled.matrix, Whiten(3).double().from_samples(torch.cat([x, x])).matrix, rtol=1e-4,
                               atol=0)


def test_linear_plus_mlp_solves_the_linear_part_exactly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = x @ weight.T + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    model = LinearPlusMLP(6, 3, hidden=(16,)).double()
    model.fit(x, y, steps=1, ridge=0.0, lr=0.0)
    torch.testing.assert_close(model(x), y, atol=1e-10, rtol=0)


def test_track_encoder_parametrisation_and_input_errors():
    encoder = TrackEncoder(len(RADII)).double()
    p = tracks(20, 11, phi_range=0.01)
    torch.testing.assert_close(encoder.to_perigee(encoder.from_perigee(p)), p)
    with pytest.raises(ValueError, match="hits must have shape"):
        encoder(torch.zeros(3, len(RADII) + 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="hits contains NaN"):
        encoder(torch.full((3, len(RADII), 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="n_layers must be >= 3"):
        TrackEncoder(2)


def test_networks_take_inputs_of_the_other_precision_and_name_wrong_shapes():
    """A float32 network with float64 physics (and the other way round) runs in its own dtype and
    answers in the input's; q/pT beyond qpt_max gives finite float32 targets; shapes are named."""
    p = tracks(6, 12, phi_range=0.01)
    hits = physics()(p).detach()
    surrogate = Surrogate((5,), (len(RADII), 2)).calibrate(p, hits)  # float32
    assert surrogate(p).dtype == torch.float64 and surrogate(p.float()).dtype == torch.float32
    correction = Correction((5,), (len(RADII), 2), inputs="both").calibrate(p, hits)
    assert correction(p, hits).dtype == torch.float64
    encoder = TrackEncoder(len(RADII)).calibrate(hits)
    assert torch.isfinite(encoder(hits)).all() and encoder(hits).dtype == torch.float64
    beyond = p.float().clone()
    beyond[0, 4] = 2.5 * torch.sin(beyond[0, 3])  # q/pT = 2.5 > qpt_max = 2
    assert torch.isfinite(encoder.float().from_perigee(beyond)).all()
    encoder.fit_targets(hits.float(), beyond, steps=2)
    with pytest.raises(ValueError, match=r"y \(physics output\) must have shape"):
        correction(p, hits[:, :2])
    with pytest.raises(ValueError, match=r"x \(component input\) must have shape"):
        correction(p[:, :4], hits)
    with pytest.raises(ValueError, match=r"outputs must have shape \(6, 4, 2\)"):
        surrogate.calibrate(p, hits[:, :2])


def test_residual_mode_keeps_missed_layers_at_zero_and_empty_batches_give_empty_hits():
    hits_of = physics()
    correction = small_correction()
    with torch.no_grad():
        for parameter in correction.network.parameters():
            parameter.normal_(0, 0.3)
    component = Component(physics=hits_of, correction=correction)
    p = tracks(3, 13)
    p[0, 4] = 20.0 * torch.sin(p[0, 3])  # pT 0.05 GeV in 2 T: helix diameter 167 mm, misses r = 250 mm
    with torch.no_grad():
        y = component(p)
    assert not hits_of.valid[0, -1] and hits_of.valid[1:].all()
    assert (y[0, -1] == 0).all() and (y[0, 0] != 0).all()
    assert y.is_contiguous() and y.view(3, -1).shape == (3, 2 * len(RADII))
    empty = tracks(0, 1).requires_grad_()
    out = component(empty)
    assert out.shape == (0, len(RADII), 2)
    out.sum().backward()
    assert empty.grad.shape == (0, 5)

    correction = HitCorrection(RADII, layers=[2, 3]).double()
    hits = torch.randn(10, len(RADII), 2, dtype=torch.float64) * 30
    assert correction(None, hits).abs().max() == 0
    with torch.no_grad():
        for parameter in correction.network.parameters():
            parameter.normal_(0, 0.5)
    shift = correction(None, hits)
    assert shift[:, :2].abs().max() == 0 and shift[:, 2:].abs().max() > 0
    with pytest.raises(ValueError, match="layers must be indices"):
        HitCorrection(RADII, layers=[4])


def test_fit_minimises_and_validates():
    target = torch.tensor([1.0, -2.0], dtype=torch.float64)
    weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    losses = fit([weight], lambda idx: (weight - target).pow(2).sum(), 10, steps=300, batch_size=4, lr=0.05)
    assert losses[-1] < 1e-3 * losses[0]
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        fit([weight], lambda idx: weight.sum(), 10, steps=0, batch_size=4)
