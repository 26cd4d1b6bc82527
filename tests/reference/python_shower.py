"""Scalar pure-Python reference of the e+e- -> q qbar dipole shower and its observables.

Deliberately straightforward and written independently of the Dr.Jit kernels
(pyhybrid.kernels.shower / observables), following the structure of the
tutorial shower of S. Hoeche (arXiv:1411.4085):

* hard process from the textbook gamma/Z formula
  dsigma/dcos ~ N_c [A0 (1 + cos^2) + A1 cos] (A0, A1 with the chi1, chi2 propagator terms)
  with accept-reject sampling of the angle;
* competition between dipoles by generating one trial scale per
  (emitter, spectator, splitting function) and keeping the largest (the kernel sums
  the overestimates instead -- both are exact veto algorithms);
* transverse momenta built in the dipole rest frame with boosts;
* Durham y_{n,n+1} by exhaustive pair search, thrust by the exact pair-plane algorithm.

Used by the tests for chi2 compatibility of the distributions and as the speed
baseline quoted in benchmarks/shower.md. One event at a time, lists of floats.
"""
from __future__ import annotations

import math
import random

CA, CF, TR = 3.0, 4.0 / 3.0, 0.5
MZ, GAMMA_Z, SIN2W = 91.1876, 2.4952, 0.2312
QUARK_MASS = {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.3, 5: 4.75}


# ---------------------------------------------------------------- four-vectors as lists [E, x, y, z]

def add(a, b):
    return [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]


def scale(a, f):
    return [a[0] * f, a[1] * f, a[2] * f, a[3] * f]


def mdot(a, b):
    return a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3]


def cross(a, b):
    return [0.0, a[2] * b[3] - a[3] * b[2], a[3] * b[1] - a[1] * b[3], a[1] * b[2] - a[2] * b[1]]


def pabs(a):
    return math.sqrt(a[1] * a[1] + a[2] * a[2] + a[3] * a[3])


def boost(v, frame, inverse=False):
    """v seen in the rest frame of `frame` (inverse: from that rest frame back)."""
    m = math.sqrt(mdot(frame, frame))
    sign = 1.0 if inverse else -1.0
    b = [sign * frame[1] / frame[0], sign * frame[2] / frame[0], sign * frame[3] / frame[0]]
    gamma = frame[0] / m
    bp = b[0] * v[1] + b[1] * v[2] + b[2] * v[3]
    b2 = b[0] ** 2 + b[1] ** 2 + b[2] ** 2
    factor = (gamma - 1.0) * bp / b2 + gamma * v[0] if b2 > 0 else 0.0
    return [gamma * (v[0] + bp), v[1] + factor * b[0], v[2] + factor * b[1], v[3] + factor * b[2]]


# ---------------------------------------------------------------- strong coupling

class AlphaS:
    """Two-loop alpha_s(t), thresholds at mb = 4.75 and mc = 1.3 GeV."""

    def __init__(self, asmz, mz=MZ, mb=4.75, mc=1.3):
        self.asmz, self.mz2, self.mb2, self.mc2 = asmz, mz * mz, mb * mb, mc * mc
        self.asmb = self._run(self.mb2, self.mz2, asmz, 5)
        self.asmc = self._run(self.mc2, self.mb2, self.asmb, 4)

    @staticmethod
    def _run(t, tref, asref, nf):
        b0 = (11.0 / 6.0 * CA - 2.0 / 3.0 * TR * nf) / (2.0 * math.pi)
        b1 = (17.0 / 6.0 * CA * CA - (5.0 / 3.0 * CA + CF) * TR * nf) / (2.0 * math.pi) ** 2
        w = 1.0 + b0 * asref * math.log(t / tref)
        return asref / w * (1.0 - b1 / b0 * asref * math.log(w) / w)

    def __call__(self, t):
        if t >= self.mb2:
            return self._run(t, self.mz2, self.asmz, 5)
        if t >= self.mc2:
            return self._run(t, self.mb2, self.asmb, 4)
        return self._run(t, self.mc2, self.asmc, 3)


# ---------------------------------------------------------------- splitting functions per dipole end

class Pqq:
    def __init__(self, flavour):
        self.flavours = (flavour, flavour, 21)

    def value(self, z, y):
        return CF * (2.0 / (1.0 - z * (1.0 - y)) - (1.0 + z))

    def estimate(self, z):
        return CF * 2.0 / (1.0 - z)

    def integral(self, zm, zp):
        return CF * 2.0 * math.log((1.0 - zm) / (1.0 - zp))

    def generate_z(self, zm, zp):
        return 1.0 + (zp - 1.0) * math.pow((1.0 - zm) / (1.0 - zp), random.random())


class Pgg:
    flavours = (21, 21, 21)

    def value(self, z, y):
        return CA / 2.0 * (2.0 / (1.0 - z * (1.0 - y)) - 2.0 + z * (1.0 - z))

    def estimate(self, z):
        return CA / (1.0 - z)

    def integral(self, zm, zp):
        return CA * math.log((1.0 - zm) / (1.0 - zp))

    def generate_z(self, zm, zp):
        return 1.0 + (zp - 1.0) * math.pow((1.0 - zm) / (1.0 - zp), random.random())


class Pgq:
    def __init__(self, flavour):
        self.flavours = (21, flavour, -flavour)

    def value(self, z, y):
        return TR / 2.0 * (1.0 - 2.0 * z * (1.0 - z))

    def estimate(self, z):
        return TR / 2.0

    def integral(self, zm, zp):
        return TR / 2.0 * (zp - zm)

    def generate_z(self, zm, zp):
        return zm + (zp - zm) * random.random()


class Particle:
    def __init__(self, pid, mom, col):
        self.pid, self.mom, self.col = pid, mom, col

    def connected(self, other):
        return (self.col[0] > 0 and self.col[0] == other.col[1]) or \
               (self.col[1] > 0 and self.col[1] == other.col[0])


# ---------------------------------------------------------------- hard process

def flavour_terms(sqrt_s):
    """[(pdg, A0, A1)] of dsigma/dcos ~ A0 (1 + cos^2) + A1 cos for the five light quarks."""
    s = sqrt_s * sqrt_s
    kappa = 1.0 / (4.0 * SIN2W * (1.0 - SIN2W))
    denominator = (s - MZ * MZ) ** 2 + GAMMA_Z ** 2 * MZ ** 2
    chi1 = kappa * s * (s - MZ * MZ) / denominator
    chi2 = kappa * kappa * s * s / denominator
    ve, ae = -0.5 + 2.0 * SIN2W, -0.5
    terms = []
    for pdg, charge, t3 in ((1, -1 / 3, -0.5), (2, 2 / 3, 0.5), (3, -1 / 3, -0.5), (4, 2 / 3, 0.5), (5, -1 / 3, -0.5)):
        vf, af = t3 - 2.0 * charge * SIN2W, t3
        a0 = charge ** 2 - 2.0 * charge * ve * vf * chi1 + (ae ** 2 + ve ** 2) * (af ** 2 + vf ** 2) * chi2
        a1 = -4.0 * charge * ae * af * chi1 + 8.0 * ae * ve * af * vf * chi2
        terms.append((pdg, a0, a1))
    return terms


def hard_process(sqrt_s):
    """e- (+z) e+ -> q qbar at LO: [quark, antiquark] particles."""
    terms = flavour_terms(sqrt_s)
    r = random.random() * sum(a0 for _, a0, _ in terms)
    for pdg, a0, a1 in terms:
        r -= a0
        if r < 0:
            break
    while True:
        c = 2.0 * random.random() - 1.0
        if random.random() * (2.0 + abs(a1 / a0)) < 1.0 + c * c + a1 / a0 * c:
            break
    sin = math.sqrt(1.0 - c * c)
    phi = 2.0 * math.pi * random.random()
    e = 0.5 * sqrt_s
    q = [e, e * sin * math.cos(phi), e * sin * math.sin(phi), e * c]
    return [Particle(pdg, q, [501, 0]), Particle(-pdg, [e, -q[1], -q[2], -q[3]], [0, 501])]


# ---------------------------------------------------------------- shower

class Shower:
    def __init__(self, alpha_s_mz=0.118, t0=1.0):
        self.t0 = t0
        self.alpha = AlphaS(alpha_s_mz)
        self.alpha_max = self.alpha(t0)
        self.kernels = [Pqq(fl) for fl in (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5)]
        self.kernels += [Pgq(fl) for fl in (1, 2, 3, 4, 5)]
        self.kernels += [Pgg()]

    def make_kinematics(self, z, y, phi, pijt, pkt):
        q = add(pijt, pkt)
        rkt = math.sqrt(mdot(q, q) * y * z * (1.0 - z))
        kt1 = cross(pijt, pkt)
        if pabs(kt1) < 1e-6 * pabs(pijt) * pabs(pkt):
            kt1 = cross(pijt, [0.0, 1.0, 0.0, 0.0] if abs(pijt[1]) < 0.9 * pijt[0] else [0.0, 0.0, 1.0, 0.0])
        kt1 = scale(kt1, rkt * math.cos(phi) / pabs(kt1))
        kt2cms = cross(boost(pijt, q), kt1)
        kt2cms = scale(kt2cms, rkt * math.sin(phi) / pabs(kt2cms))
        kt2 = boost(kt2cms, q, inverse=True)
        pi = add(add(scale(pijt, z), scale(pkt, (1.0 - z) * y)), add(kt1, kt2))
        pj = add(add(scale(pijt, 1.0 - z), scale(pkt, z * y)), scale(add(kt1, kt2), -1.0))
        return pi, pj, scale(pkt, 1.0 - y)

    def make_colours(self, flavours, col_ij, col_k):
        self.colour += 1
        if flavours[0] != 21:
            if flavours[0] > 0:
                return [self.colour, 0], [col_ij[0], self.colour]
            return [0, self.colour], [self.colour, col_ij[1]]
        if flavours[1] == 21:
            if col_ij[0] == col_k[1]:
                if col_ij[1] == col_k[0] and random.random() > 0.5:
                    return [col_ij[0], self.colour], [self.colour, col_ij[1]]
                return [self.colour, col_ij[1]], [col_ij[0], self.colour]
            return [col_ij[0], self.colour], [self.colour, col_ij[1]]
        return [col_ij[0], 0], [0, col_ij[1]]

    def run(self, event, t_start):
        self.colour = 501
        t = t_start
        while t > self.t0:
            t_trial = self.t0
            chosen = None
            for split in event:
                for spect in event:
                    if spect is split or not split.connected(spect):
                        continue
                    m2 = 2.0 * mdot(split.mom, spect.mom)
                    if m2 < 4.0 * self.t0:
                        continue
                    zp = 0.5 * (1.0 + math.sqrt(1.0 - 4.0 * self.t0 / m2))
                    for kernel in self.kernels:
                        if kernel.flavours[0] != split.pid:
                            continue
                        g = self.alpha_max / (2.0 * math.pi) * kernel.integral(1.0 - zp, zp)
                        tt = t * math.pow(random.random(), 1.0 / g)
                        if tt > t_trial:
                            t_trial, chosen = tt, (split, spect, kernel, m2, zp)
            t = t_trial
            if t <= self.t0:
                break
            split, spect, kernel, m2, zp = chosen
            z = kernel.generate_z(1.0 - zp, zp)
            y = t / m2 / z / (1.0 - z)
            if y >= 1.0:
                continue
            if kernel.flavours[0] == 21 and kernel.flavours[1] != 21 and t < QUARK_MASS[kernel.flavours[1]] ** 2:
                continue
            f = (1.0 - y) * self.alpha(t) * kernel.value(z, y)
            g = self.alpha_max * kernel.estimate(z)
            if f / g > random.random():
                phi = 2.0 * math.pi * random.random()
                pi, pj, pk = self.make_kinematics(z, y, phi, split.mom, spect.mom)
                col_i, col_j = self.make_colours(kernel.flavours, split.col, spect.col)
                event.append(Particle(kernel.flavours[2], pj, col_j))
                split.pid, split.mom, split.col = kernel.flavours[1], pi, col_i
                spect.mom = pk

    def generate(self, sqrt_s=91.2):
        event = hard_process(sqrt_s)
        self.run(event, sqrt_s * sqrt_s)
        return event


# ---------------------------------------------------------------- observables

def durham_resolutions(momenta, s, n_max=5):
    """[y23, y34, ..., y_{n_max, n_max+1}] of the exclusive Durham algorithm (E scheme); 0 if undefined."""
    jets = [list(p) for p in momenta]
    values = {}
    while len(jets) > 2:
        best, pair = None, None
        for a in range(len(jets)):
            for b in range(a + 1, len(jets)):
                pa, pb = jets[a], jets[b]
                cos = (pa[1] * pb[1] + pa[2] * pb[2] + pa[3] * pb[3]) / (pabs(pa) * pabs(pb))
                y = 2.0 * min(pa[0] ** 2, pb[0] ** 2) * (1.0 - cos) / s
                if best is None or y < best:
                    best, pair = y, (a, b)
        values[len(jets) - 1] = best
        a, b = pair
        jets[a] = add(jets[a], jets[b])
        del jets[b]
    return [values.get(n, 0.0) for n in range(2, n_max + 1)]


def thrust(momenta):
    """max_n sum |p.n| / sum |p| by the exact algorithm over planes through pairs of momenta."""
    vectors = [p[1:] for p in momenta]
    norm = sum(math.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2) for v in vectors)
    best = 0.0
    n = len(vectors)
    for a in range(n):
        for b in range(a + 1, n):
            va, vb = vectors[a], vectors[b]
            axis = (va[1] * vb[2] - va[2] * vb[1], va[2] * vb[0] - va[0] * vb[2], va[0] * vb[1] - va[1] * vb[0])
            total = [0.0, 0.0, 0.0]
            for c in range(n):
                if c == a or c == b:
                    continue
                v = vectors[c]
                sign = 1.0 if v[0] * axis[0] + v[1] * axis[1] + v[2] * axis[2] > 0 else -1.0
                total = [total[0] + sign * v[0], total[1] + sign * v[1], total[2] + sign * v[2]]
            for sa in (1.0, -1.0):
                for sb in (1.0, -1.0):
                    x = [total[i] + sa * va[i] + sb * vb[i] for i in range(3)]
                    best = max(best, x[0] ** 2 + x[1] ** 2 + x[2] ** 2)
    return math.sqrt(best) / norm


def generate(n_events, alpha_s_mz=0.118, t0=1.0, sqrt_s=91.2, seed=1):
    """Showered events: list of lists of Particle (pid, mom [E, px, py, pz], col [col, acol])."""
    random.seed(seed)
    shower = Shower(alpha_s_mz, t0)
    return [shower.generate(sqrt_s) for _ in range(n_events)]
