"""Relativistic phase space for 2 -> n scattering in the centre-of-mass frame (Dr.Jit, no torch).

Normalisation: dPhi_n = (2 pi)^4 delta^4(P - sum p_i) prod_i d^3p_i / ((2 pi)^3 2 E_i),
so that sigma = (1 / 2s) * integral |M|^2 dPhi_n for massless incoming particles
(:func:`flux_factor`). Energies and momenta in GeV; the beams run along +-z.

Generators (all differentiable in ``sqrt_s``, the masses and their continuous
inputs, with Dr.Jit AD):

* :func:`two_body` -- explicit angles (cos theta, phi) of the first particle;
  returns the density dPhi_2 / (dcos theta dphi).
* :func:`three_body_massless` -- energy fractions (x1, x2) and orientation angles;
  returns dPhi_3 / (dx1 dx2 dcos theta dphi dchi).
* :func:`rambo` -- RAMBO (Kleiss, Stirling, Ellis, Comput. Phys. Commun. 40 (1986) 359)
  for n massless or massive particles from 4n uniform numbers; returns the event
  weight (flat in phase space for massless particles).
"""
from __future__ import annotations

import math
from typing import Sequence

import drjit as dr

from pyhybrid.kernels.lorentz import FourVector

__all__ = ["flux_factor", "incoming_momenta", "kallen", "check_threshold", "kinematic_residuals", "two_body",
           "three_body_massless", "rambo", "massless_volume", "RAMBO_NEWTON_TOLERANCE"]

#: Relative tolerance of the Newton solve for the massive RAMBO momentum scale.
RAMBO_NEWTON_TOLERANCE = 1e-13
_RAMBO_MAX_NEWTON = 50


def flux_factor(sqrt_s):
    """1 / (2 s) for massless incoming particles [GeV^-2]."""
    return 0.5 / (sqrt_s * sqrt_s)


def incoming_momenta(sqrt_s):
    """Massless beams (E, 0, 0, +-E) with E = sqrt_s / 2: particle 1 along +z, particle 2 along -z."""
    half = 0.5 * sqrt_s
    zero = 0.0 * half
    return FourVector(half, zero, zero, half), FourVector(half, zero, zero, -half)


def kallen(a, b, c):
    """Kallen function lambda(a, b, c) = a^2 + b^2 + c^2 - 2ab - 2bc - 2ca."""
    return a * a + b * b + c * c - 2.0 * (a * b + b * c + c * a)


def check_threshold(sqrt_s, masses: Sequence) -> None:
    """Raise ValueError unless sqrt_s > sum(masses) (floats or Dr.Jit arrays, all lanes)."""
    total_mass = sum(masses, 0.0)
    below = sqrt_s <= total_mass
    if (dr.any(below) if dr.is_array_v(below) else below):
        raise ValueError(f"sqrt_s must exceed the sum of the final-state masses ({_describe(total_mass)} GeV), "
                         f"got sqrt_s = {_describe(sqrt_s)} GeV")


def kinematic_residuals(momenta: Sequence[FourVector], masses: Sequence, n_incoming: int = 2):
    """Per-event residuals for validating 2 -> n momenta (incoming first), free of divisions.

    Returns ``(s, conservation, off_shell)``: the squared invariant mass of the
    incoming particles [GeV^2]; max_mu |sum p_in - sum p_out|_mu [GeV]; and per
    particle |p_i^2 - m_i^2| [GeV^2] (``masses`` lists all particles). NaN inputs
    give NaN residuals, so compare as ``~(residual <= bound)`` to catch them.
    """
    incoming = momenta[0]
    for p in momenta[1:n_incoming]:
        incoming = incoming + p
    difference = incoming
    for p in momenta[n_incoming:]:
        difference = difference - p
    largest = dr.maximum(dr.maximum(dr.abs(difference.E), dr.abs(difference.px)),
                         dr.maximum(dr.abs(difference.py), dr.abs(difference.pz)))
    # Adding 0 * (sum of components) keeps NaN visible whatever dr.maximum does with NaN operands.
    conservation = largest + 0.0 * (difference.E + difference.px + difference.py + difference.pz)
    off_shell = [dr.abs(p.mass2() - m * m) for p, m in zip(momenta, masses)]
    return incoming.mass2(), conservation, off_shell


def _describe(value) -> str:
    if dr.is_array_v(value):
        return f"min {dr.min(value)[0]:.6g}" if dr.width(value) > 1 else f"{value[0]:.6g}"
    return f"{value:.6g}"


def two_body(sqrt_s, mass_a, mass_b, cos_theta, phi):
    """Two-body final state with particle a at polar angle theta and azimuth phi.

    Parameters: sqrt_s [GeV] > mass_a + mass_b; masses [GeV]; cos_theta in [-1, 1];
    phi [rad]. All may be floats or Dr.Jit arrays (N lanes).

    Returns ``(p_a, p_b, density)``: the momenta in the centre-of-mass frame and
    dPhi_2 / (dcos theta dphi) = sqrt(lambda(s, ma^2, mb^2)) / (32 pi^2 s) (dimensionless).
    """
    s = sqrt_s * sqrt_s
    ma2, mb2 = mass_a * mass_a, mass_b * mass_b
    sqrt_lambda = dr.sqrt(dr.maximum(kallen(s, ma2, mb2), 0.0))
    momentum = 0.5 * sqrt_lambda / sqrt_s
    sin_theta = dr.sqrt(dr.maximum(1.0 - cos_theta * cos_theta, 0.0))
    px = momentum * sin_theta * dr.cos(phi)
    py = momentum * sin_theta * dr.sin(phi)
    pz = momentum * cos_theta
    energy_a = 0.5 * (s + ma2 - mb2) / sqrt_s
    energy_b = 0.5 * (s + mb2 - ma2) / sqrt_s
    density = sqrt_lambda / (32.0 * math.pi**2 * s)
    return FourVector(energy_a, px, py, pz), FourVector(energy_b, -px, -py, -pz), density


def three_body_massless(sqrt_s, x1, x2, cos_theta, phi, chi):
    """Massless three-body final state from energy fractions and orientation.

    x_i = 2 E_i / sqrt_s (x1 + x2 + x3 = 2; physical region x1, x2 <= 1 <= x1 + x2).
    Particle 1 points along (theta, phi); particles 2 and 3 lie in a plane
    rotated by ``chi`` about particle 1's direction. Pair invariants:
    s_23 = s (1 - x1), s_13 = s (1 - x2), s_12 = s (1 - x3).

    Returns ``(p1, p2, p3, density)`` with density
    dPhi_3 / (dx1 dx2 dcos theta dphi dchi) = s / (1024 pi^5).
    """
    x3 = 2.0 - x1 - x2
    half = 0.5 * sqrt_s
    cos12 = 1.0 - 2.0 * (1.0 - x3) / (x1 * x2)
    sin12 = dr.sqrt(dr.maximum(1.0 - cos12 * cos12, 0.0))
    e1, e2 = half * x1, half * x2
    zero = 0.0 * e1
    # Event plane: particle 1 along z, particle 2 in the (x, z) half-plane rotated by chi about z.
    p1 = FourVector(e1, zero, zero, e1)
    p2 = FourVector(e2, e2 * sin12 * dr.cos(chi), e2 * sin12 * dr.sin(chi), e2 * cos12)
    p3 = FourVector(half * x3, -p2.px, -p2.py, -e1 - p2.pz)
    sin_theta = dr.sqrt(dr.maximum(1.0 - cos_theta * cos_theta, 0.0))
    ux, uy = sin_theta * dr.cos(phi), sin_theta * dr.sin(phi)
    p1, p2, p3 = (p.rotate_z_to(ux, uy, cos_theta) for p in (p1, p2, p3))
    density = sqrt_s * sqrt_s / (1024.0 * math.pi**5)
    return p1, p2, p3, density


def massless_volume(n: int, sqrt_s):
    """Phase-space volume of n >= 2 massless particles:
    (2 pi)^(4-3n) (pi/2)^(n-1) s^(n-2) / ((n-1)! (n-2)!)  [GeV^(2n-4)]."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    s = sqrt_s * sqrt_s
    return ((2.0 * math.pi) ** (4 - 3 * n) * (0.5 * math.pi) ** (n - 1)
            / (math.factorial(n - 1) * math.factorial(n - 2))) * s ** (n - 2)


def rambo(sqrt_s, masses: Sequence, uniforms: Sequence):
    """RAMBO phase-space point for ``len(masses)`` particles in the centre-of-mass frame.

    Parameters
    ----------
    sqrt_s: centre-of-mass energy [GeV] (float or Dr.Jit array), above sum(masses).
    masses: one mass [GeV] per particle (floats or Dr.Jit arrays; 0 for massless).
    uniforms: 4 * n Dr.Jit arrays of uniform numbers in (0, 1), four per particle.

    Returns ``(momenta, weight)``: n :class:`FourVector` s and the phase-space
    weight [GeV^(2n-4)] such that E[weight * f] = integral f dPhi_n. The massless
    weight is the constant :func:`massless_volume`; for massive particles the
    massless momenta are rescaled, |p| -> xi |p|, with xi from a Newton solve of
    sum_i sqrt(m_i^2 + xi^2 q_i^2) = sqrt_s, and the weight gets the factor
    (sum |k_i| / sqrt_s)^(2n-3) prod(|k_i| / E_i) sqrt_s / sum(|k_i|^2 / E_i).
    Gradients of xi use the implicit-function theorem (one Newton step under AD
    from the converged value), so they are exact and cost no loop tape.
    """
    n = len(masses)
    if n < 2:
        raise ValueError(f"rambo needs at least 2 particles, got {n}")
    if len(uniforms) != 4 * n:
        raise ValueError(f"rambo needs 4 * n = {4 * n} uniform arrays, got {len(uniforms)}")
    # 1) n isotropic massless momenta with energy density q exp(-q).
    q = []
    for i in range(n):
        u1, u2, u3, u4 = uniforms[4 * i: 4 * i + 4]
        cos_theta = 2.0 * u1 - 1.0
        sin_theta = dr.sqrt(dr.maximum(1.0 - cos_theta * cos_theta, 0.0))
        azimuth = 2.0 * math.pi * u2
        energy = -dr.log(u3 * u4)
        q.append(FourVector(energy, energy * sin_theta * dr.cos(azimuth), energy * sin_theta * dr.sin(azimuth),
                            energy * cos_theta))
    # 2) conformal transformation: boost + scale the sum of the q onto (sqrt_s, 0, 0, 0).
    total = q[0]
    for v in q[1:]:
        total = total + v
    total_mass = total.mass()
    bx, by, bz = -total.px / total_mass, -total.py / total_mass, -total.pz / total_mass
    gamma = total.E / total_mass
    a = 1.0 / (1.0 + gamma)
    x = sqrt_s / total_mass
    momenta = []
    for v in q:
        bq = bx * v.px + by * v.py + bz * v.pz
        momenta.append(FourVector(x * (gamma * v.E + bq), x * (v.px + bx * v.E + a * bq * bx),
                                  x * (v.py + by * v.E + a * bq * by), x * (v.pz + bz * v.E + a * bq * bz)))
    weight = massless_volume(n, sqrt_s)
    if all(isinstance(m, (int, float)) and m == 0 for m in masses):
        return momenta, weight
    # 3) massive: rescale three-momenta by xi so that the energies add up to sqrt_s.
    xi = _rambo_scale(sqrt_s, masses, [p.E for p in momenta])
    energies = [dr.sqrt(m * m + xi * xi * p.E * p.E) for m, p in zip(masses, momenta)]
    moduli = [xi * p.E for p in momenta]  # |k_i| = xi q_i^0 for the massless momenta
    sum_k = sum(moduli[1:], moduli[0])
    sum_k2_over_e = sum((k * k / e for k, e in zip(moduli[1:], energies[1:])), moduli[0] * moduli[0] / energies[0])
    prod_k_over_e = 1.0
    for k, e in zip(moduli, energies):
        prod_k_over_e = prod_k_over_e * k / e
    weight = weight * (sum_k / sqrt_s) ** (2 * n - 3) * prod_k_over_e * sqrt_s / sum_k2_over_e
    massive = [FourVector(e, xi * p.px, xi * p.py, xi * p.pz) for e, p in zip(energies, momenta)]
    return massive, weight


def _rambo_scale(sqrt_s, masses, massless_energies):
    """xi in (0, 1] with sum_i sqrt(m_i^2 + xi^2 e_i^2) = sqrt_s (Newton from the right: f is convex)."""

    def residual_and_slope(xi):
        terms = [dr.sqrt(m * m + xi * xi * e * e) for m, e in zip(masses, massless_energies)]
        value = sum(terms[1:], terms[0]) - sqrt_s
        slope = sum((xi * e * e / t for e, t in zip(massless_energies, terms)), 0.0)
        return value, slope

    with dr.suspend_grad():
        mass_sum = sum(masses, 0.0)
        start = dr.sqrt(1.0 - (mass_sum / sqrt_s) ** 2)
        xi = dr.detach(start + 0.0 * massless_energies[0])
        iteration = dr.zeros(dr.uint32_array_t(type(xi)), dr.width(xi))

        def keep_going(iteration, xi):
            value, _ = residual_and_slope(xi)
            return (iteration < _RAMBO_MAX_NEWTON) & (dr.abs(value) > RAMBO_NEWTON_TOLERANCE * sqrt_s)

        def newton_step(iteration, xi):
            value, slope = residual_and_slope(xi)
            return iteration + 1, xi - value / slope

        _, xi = dr.while_loop((iteration, xi), keep_going, newton_step)
    # One Newton step under AD: same value, derivative = implicit-function derivative.
    value, slope = residual_and_slope(xi)
    return xi - value / dr.detach(slope)
