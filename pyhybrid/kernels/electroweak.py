"""Standard-Model inputs for leading-order matrix elements (Dr.Jit, no torch).

Parameters (:class:`SMParameters`) are plain attributes holding Python floats
or Dr.Jit arrays (usually 1-lane arrays that broadcast over events), so that
Dr.Jit AD can differentiate matrix elements with respect to each of them.

Conventions
-----------
* Z propagator with a fixed width: 1 / (s - mZ^2 + i mZ GammaZ).
* Couplings in units of the positron charge e (e^2 = 4 pi alpha):
  photon -Q_f (sign irrelevant for |M|^2 as only products Q_e Q_f enter),
  Z: g_L = (T3 - Q sin^2 thetaW) / (sin thetaW cos thetaW),
     g_R = -Q sin^2 thetaW / (sin thetaW cos thetaW).
* ``alpha`` is the electromagnetic coupling used everywhere (default
  alpha(mZ) ~ 1/128.9). In the G_mu scheme use :func:`alpha_from_gf`,
  alpha = sqrt(2) G_F mZ^2 sin^2 thetaW cos^2 thetaW / pi (tree-level mW = mZ cos thetaW).
* Final-state fermions of e+e- processes are massless (5 light quark flavours).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from pyhybrid.kernels import dual as dm

__all__ = ["Fermion", "FERMIONS", "QUARKS", "SMParameters", "DEFAULTS", "alpha_from_gf",
           "check_parameter_value", "fermion", "z_couplings"]


@dataclass(frozen=True)
class Fermion:
    """Quantum numbers of a fermion: PDG id, charge Q [e], weak isospin T3, number of colours."""

    name: str
    pdg: int
    charge: float
    isospin: float
    colours: int


FERMIONS = {
    f.name: f
    for f in (
        Fermion("e", 11, -1.0, -0.5, 1),
        Fermion("mu", 13, -1.0, -0.5, 1),
        Fermion("d", 1, -1.0 / 3.0, -0.5, 3),
        Fermion("u", 2, 2.0 / 3.0, 0.5, 3),
        Fermion("s", 3, -1.0 / 3.0, -0.5, 3),
        Fermion("c", 4, 2.0 / 3.0, 0.5, 3),
        Fermion("b", 5, -1.0 / 3.0, -0.5, 3),
    )
}
#: The five light quark flavours of e+e- -> q qbar (treated massless).
QUARKS = ("d", "u", "s", "c", "b")


def fermion(name: str) -> Fermion:
    """Look up a fermion by name; unknown names raise a ValueError listing the known ones."""
    try:
        return FERMIONS[name]
    except KeyError:
        raise ValueError(f"unknown flavour {name!r}; known: {', '.join(FERMIONS)}") from None


@dataclass
class SMParameters:
    """Inputs of the LO matrix elements (GeV; couplings dimensionless).

    Attributes may be Python floats or Dr.Jit arrays (1 lane or N lanes).
    """

    mz: Any = 91.1876
    gamma_z: Any = 2.4952
    alpha: Any = 1.0 / 128.9
    sin2_theta_w: Any = 0.2312
    alpha_s: Any = 0.118
    top_mass: Any = 172.5

    def check(self) -> "SMParameters":
        """ValueError for an attribute given as a number that is not a valid value (see
        :func:`check_parameter_value`); Dr.Jit arrays are left to the caller. Returns self."""
        for entry in fields(self):
            value = getattr(self, entry.name)
            if isinstance(value, numbers.Real):
                check_parameter_value(entry.name, float(value))
        return self


def check_parameter_value(name: str, value: float) -> None:
    """ValueError unless ``value`` is finite and in range: sin2_theta_w in (0, 1), every other
    parameter (masses, width, couplings, G_F) positive."""
    if not math.isfinite(value):
        raise ValueError(f"parameter {name} must be finite, got {value}")
    if name == "sin2_theta_w":
        if not 0.0 < value < 1.0:
            raise ValueError(f"parameter sin2_theta_w must lie in (0, 1), got {value}")
    elif value <= 0.0:
        raise ValueError(f"parameter {name} must be positive, got {value}")


#: Default values (LEP Z mass and width, alpha(mZ), effective sin^2 thetaW, alpha_s(mZ), m_top).
DEFAULTS = SMParameters()
#: Fermi constant [GeV^-2] (PDG), for the G_mu scheme.
GF = 1.1663788e-5


def alpha_from_gf(gf, mz, sin2_theta_w):
    """Tree-level alpha in the G_mu scheme: sqrt(2) G_F mZ^2 sin^2 cos^2 / pi (gf in GeV^-2, mz in GeV)."""
    return math.sqrt(2.0) / math.pi * gf * mz * mz * sin2_theta_w * (1.0 - sin2_theta_w)


def z_couplings(f: Fermion, sin2_theta_w):
    """(g_L, g_R) of the Z to fermion ``f`` in units of e (see the module docstring); ``sin2_theta_w``
    may be a float, a Dr.Jit array or a :class:`~pyhybrid.kernels.dual.Dual`."""
    norm = 1.0 / dm.sqrt(sin2_theta_w * (1.0 - sin2_theta_w))
    g_left = (f.isospin - f.charge * sin2_theta_w) * norm
    g_right = (-f.charge * sin2_theta_w) * norm
    return g_left, g_right
