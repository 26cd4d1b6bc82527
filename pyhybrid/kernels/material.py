"""Material effects of thin detector layers on charged tracks (Dr.Jit; no torch).

Formulas (PDG Review of Particle Physics, "Passage of particles through matter"):

* Mean energy loss, Bethe formula (PDG eq. 34.5) with the full maximum energy
  transfer W_max and the Sternheimer density-effect correction delta(beta gamma):

      -<dE/dx> = K z^2 (Z/A) / beta^2 [ 1/2 ln(2 m_e c^2 beta^2 gamma^2 W_max / I^2) - beta^2 - delta/2 ],
      K = 0.307075 MeV mol^-1 cm^2.

  Valid for heavy charged particles (muons, pions, kaons, protons) with
  0.1 < beta gamma < ~1000. Not included: the spin-1/2 term and bremsstrahlung off
  atomic electrons (together +1 % at 10 GeV, +2.6 % at 100 GeV for muons in silicon),
  muon radiative losses (+2 % at 20 GeV, +15 % at 100 GeV) and electrons' bremsstrahlung.
* Multiple scattering, Highland formula (PDG eq. 34.16), the width of the
  projected scattering angle:

      theta0 = 13.6 MeV / (beta c p) |z| sqrt(x/X0) [1 + 0.038 ln(x z^2 / (X0 beta^2))].

* Energy-loss fluctuations, as ACTS: a Gaussian of the Landau full width 4 xi,
  sigma_E = 4 xi / 2.355, xi = K/2 (Z/A) rho x z^2 / beta^2.

Units: momenta, masses and energies in GeV, lengths in mm, densities in g/cm^3,
mean excitation energies in eV. All functions accept Dr.Jit arrays or Duals
(:mod:`pyhybrid.kernels.dual`) for the momentum and thickness arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import drjit as dr

from pyhybrid.kernels import dual as dm
from pyhybrid.units import ELECTRON_MASS

__all__ = ["Material", "SILICON", "BERYLLIUM", "ALUMINIUM", "MATERIALS", "K_BETHE", "density_correction",
           "energy_over_momentum", "mass_stopping_power", "stopping_power", "highland_theta0", "energy_loss_sigma",
           "interact", "Interaction"]

#: 4 pi N_A r_e^2 m_e c^2 [MeV mol^-1 cm^2].
K_BETHE = 0.307075
_LN10 = math.log(10.0)
#: |cos(incidence)| below this is clamped (grazing tracks): path in material <= 1000 x thickness.
MIN_COS_INCIDENCE = 1e-3
#: The mean energy loss of faster particles is that at this momentum [GeV]: far beyond the Bethe
#: formula's validity already, and its logarithm's argument (~p^3) would overflow float32 near 5e8 GeV
#: (a tiny q/p, e.g. a network's output, would then count as stopped in the first layer).
MAX_STOPPING_MOMENTUM = 1e5
#: Above this momentum [GeV] q/p is left unchanged: the loss in a layer is below float64's resolution of
#: q/p there, and p^2 overflows for |q/p| < ~1e-19 (float32) or 1e-154 (float64).
NEGLIGIBLE_LOSS_MOMENTUM = 1e12


@dataclass(frozen=True)
class Material:
    """A homogeneous material.

    radiation_length: X0 [mm]; z_over_a: <Z/A> [mol/g]; density [g/cm^3];
    mean_excitation: I [eV]; sternheimer: density-effect parameters
    (a, k, x0, x1, C_bar, delta0) of Sternheimer, Berger and Seltzer (1984).
    """

    name: str
    radiation_length: float
    z_over_a: float
    density: float
    mean_excitation: float
    sternheimer: tuple

    def __post_init__(self):
        for field in ("radiation_length", "z_over_a", "density", "mean_excitation"):
            if not getattr(self, field) > 0:
                raise ValueError(f"material {self.name}: {field} must be positive, got {getattr(self, field)!r}")
        if len(self.sternheimer) != 6:
            raise ValueError(f"material {self.name}: sternheimer needs (a, k, x0, x1, C_bar, delta0)")


# PDG Atomic and Nuclear Properties (X0, density, I, Sternheimer parameters).
SILICON = Material("silicon", 93.70, 14.0 / 28.0855, 2.329, 173.0, (0.1492, 3.2546, 0.2015, 2.8716, 4.4355, 0.14))
BERYLLIUM = Material("beryllium", 352.8, 4.0 / 9.012, 1.848, 63.7, (0.8039, 2.4339, 0.0592, 1.6922, 2.7847, 0.14))
ALUMINIUM = Material("aluminium", 88.97, 13.0 / 26.98, 2.699, 166.0, (0.0802, 3.6345, 0.1708, 3.0127, 4.2395, 0.12))
MATERIALS = {m.name: m for m in (SILICON, BERYLLIUM, ALUMINIUM)}


def energy_over_momentum(qop, mass: float, charge: float):
    """E/p = sqrt(1 + (m (q/p) / q)^2) from q/p [e/GeV] and the absolute charge q [e]: 1 for q/p = 0,
    finite also where p^2 would overflow."""
    mass_over_charge = mass / charge
    return dm.sqrt(1.0 + (mass_over_charge * mass_over_charge) * qop * qop)


def _kinematics(p, mass):
    """(beta gamma)^2, gamma, beta^2 from momentum and mass (beta^2 = 1 where (beta gamma)^2 overflows)."""
    bg2 = (p * p) * (1.0 / (mass * mass))
    gamma = dm.sqrt(1.0 + bg2)
    beta2 = 1.0 / (1.0 + 1.0 / bg2)
    return bg2, gamma, beta2


def density_correction(material: Material, bg2):
    """Sternheimer delta as a function of (beta gamma)^2 (x = log10(beta gamma); since 10^(2 x) is
    (beta gamma)^2, only the middle branch needs transcendental functions besides x itself)."""
    a, k, x0, x1, c_bar, delta0 = material.sternheimer
    log_bg2 = dm.log(bg2)
    x = log_bg2 * (0.5 / _LN10)
    xv = dm.value(x)
    high = log_bg2 - c_bar                                   # 2 ln(10) x - C_bar
    gap = dm.select(xv < x1, x1 - x, 1.0)
    middle = high + a * dm.exp(k * dm.log(gap))
    low = bg2 * (delta0 * 10.0 ** (-2.0 * x0))               # delta0 10^(2 (x - x0))
    return dm.select(xv < x0, low, dm.select(xv < x1, middle, high))


def mass_stopping_power(material: Material, p, mass: float, charge: float = 1.0):
    """Mean -dE/dx / rho [MeV cm^2 / g] of a particle of momentum p [GeV], mass [GeV], charge [e]."""
    bg2, gamma, beta2 = _kinematics(p, mass)
    ratio = ELECTRON_MASS / mass
    w_max = (2.0 * ELECTRON_MASS) * bg2 / (1.0 + 2.0 * ratio * gamma + ratio * ratio)
    excitation = material.mean_excitation * 1e-9
    log_term = 0.5 * dm.log((2.0 * ELECTRON_MASS / (excitation * excitation)) * bg2 * w_max)
    bracket = log_term - beta2 - 0.5 * density_correction(material, bg2)
    return (K_BETHE * charge * charge * material.z_over_a) * bracket / beta2


def stopping_power(material: Material, p, mass: float, charge: float = 1.0):
    """Mean -dE/dx [GeV/mm]."""
    return mass_stopping_power(material, p, mass, charge) * (material.density * 1e-4)


def highland_theta0(material: Material, path, p, mass: float, charge: float = 1.0):
    """Width of the projected multiple-scattering angle [rad] after ``path`` [mm]."""
    _, _, beta2 = _kinematics(p, mass)
    beta = dm.sqrt(beta2)
    x_over_x0 = path / material.radiation_length
    log_term = dm.log(x_over_x0 * (charge * charge) / beta2)
    return (0.0136 * charge) / (beta * p) * dm.sqrt(x_over_x0) * (1.0 + 0.038 * log_term)


def energy_loss_sigma(material: Material, path, p, mass: float, charge: float = 1.0):
    """Gaussian width [GeV] of the energy loss in ``path`` [mm] (Landau FWHM / 2.355, as ACTS)."""
    _, _, beta2 = _kinematics(p, mass)
    xi = (0.5 * K_BETHE * material.z_over_a * material.density * 0.1 * charge * charge) * path / beta2  # MeV
    return xi * (4.0 / (2.0 * math.sqrt(2.0 * math.log(2.0))) * 1e-3)


@dataclass
class Interaction:
    """Result of crossing a layer: new direction and q/p, variances for the covariance, stopped lanes."""

    direction: tuple
    qop: object
    theta0_squared: object
    qop_variance: object
    stopped: object


def interact(direction, qop, normal, thickness, material: Material, mass: float, charge: float, *,
             energy_loss: bool = True, deflection: tuple | None = None) -> Interaction:
    """Cross a layer of ``thickness`` [mm] with unit ``normal`` at unit ``direction``.

    The path in the material is thickness / |cos(incidence)|. ``energy_loss``:
    subtract the mean Bethe loss from the energy. ``deflection``: two standard
    normal numbers (z1, z2) per lane; the direction is turned by the projected
    angles theta0 * z1, theta0 * z2 (reparametrised: derivatives flow through
    theta0). Lanes with q/p = 0 (neutral / infinite momentum) are unchanged.
    ``stopped`` marks lanes whose energy would fall below the mass.
    """
    neutral = dm.value(qop) == 0
    safe_qop = dm.select(neutral, 1.0, qop)
    p = charge / dm.absolute(safe_qop)
    cos = dm.absolute(dm.dot(direction, normal))
    cos = dm.select(dm.value(cos) > MIN_COS_INCIDENCE, cos, MIN_COS_INCIDENCE)
    path = thickness / cos
    theta0 = highland_theta0(material, path, p, mass, charge)
    theta0 = dm.select(neutral, 0.0, theta0)
    energy = dm.sqrt(p * p + mass * mass)
    sigma_e = dm.value(energy_loss_sigma(material, path, p, mass, charge))
    pv, qv = dm.value(p), dm.value(safe_qop)
    # d(q/p)/dE = -(q/p) (E/p) / p, with E/p and 1/p from q/p: finite where p^2 overflows
    qop_variance = dr.select(neutral, 0.0, dr.square(qv * energy_over_momentum(qv, mass, charge)
                                                     * (dr.abs(qv) / charge) * sigma_e))
    stopped = dr.zeros(dr.mask_t(pv), dr.width(pv))
    new_qop = qop
    if energy_loss:
        p_loss = dm.select(pv < MAX_STOPPING_MOMENTUM, p, MAX_STOPPING_MOMENTUM)
        remaining = energy - stopping_power(material, p_loss, mass, charge) * path
        stopped = (dm.value(remaining) <= mass * (1.0 + 1e-6)) & ~neutral
        p2 = remaining * remaining - mass * mass
        p2 = dm.select(dm.value(p2) > 1e-30, p2, 1e-30)
        sign = dr.select(dm.value(safe_qop) < 0, -1.0, 1.0)
        unchanged = neutral | stopped | (pv > NEGLIGIBLE_LOSS_MOMENTUM)
        new_qop = dm.select(unchanged, qop, (charge / dm.sqrt(p2)) * sign)
    new_direction = direction
    if deflection is not None:
        e1, e2 = dm.perpendicular_basis(direction)
        z1, z2 = deflection
        turned = tuple(t + theta0 * (a * z1 + b * z2) for t, a, b in zip(direction, e1, e2))
        new_direction = dm.normalized(turned)
    return Interaction(new_direction, new_qop, dr.square(dm.value(theta0)), qop_variance, stopped)

