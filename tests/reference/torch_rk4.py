"""Torch-eager structure-of-arrays RK4 propagation: test reference and benchmark baseline.

Deliberately straightforward: one torch tensor per component, one eager torch op
at a time, masks with ``torch.where``. Same physics and navigation as
``pyhybrid.kernels.propagation`` restricted to what the benchmark needs:
uniform or paraxial-solenoid field, classic RK4 with a fixed step, a sequence
of barrel cylinders (step limited to the straight-line distance to the next
cylinder, iterate to within tolerance, move onto it along the tangent), mean
Bethe energy loss in silicon. Units: mm, ns, GeV, T. Differentiable with
torch autograd (reverse mode through every step: memory grows with the steps).
"""
from __future__ import annotations

import math

import torch

C_CURV = 0.299792458e-3   # GeV / (T mm)
C_LIGHT = 299.792458      # mm / ns
ELECTRON_MASS = 0.51099895e-3
MUON_MASS = 0.1056583755

# Silicon: Z/A [mol/g], density [g/cm3], I [GeV], Sternheimer (a, k, x0, x1, C, delta0)
SI_Z_OVER_A, SI_DENSITY, SI_I = 14.0 / 28.0855, 2.329, 173.0e-9
SI_STERNHEIMER = (0.1492, 3.2546, 0.2015, 2.8716, 4.4355, 0.14)


def uniform_field(b):
    def field(x, y, z):
        return b[0] + 0 * x, b[1] + 0 * x, b[2] + 0 * x
    return field


def solenoid_field(b0, radius, half_length):
    """Paraxial finite solenoid: B_z = b - rho^2/4 b'', B_rho = -rho/2 b', b(0) = b0."""
    def u(zeta):
        d = zeta * zeta + radius * radius
        inv = 1.0 / torch.sqrt(d)
        return zeta * inv, radius ** 2 * inv ** 3, -3.0 * radius ** 2 * zeta * inv ** 5

    norm = b0 * (half_length ** 2 + radius ** 2) ** 0.5 / (2.0 * half_length)

    def field(x, y, z):
        up, um = u(z + half_length), u(z - half_length)
        b, b1, b2 = (norm * (p - m) for p, m in zip(up, um))
        return -0.5 * x * b1, -0.5 * y * b1, b - 0.25 * (x * x + y * y) * b2
    return field


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def rk4_step(r, t, lam, h, field):
    """Classic RK4 for dr/ds = T, dT/ds = lam T x B(r)."""
    def accel(r_s, t_s):
        return tuple(lam * c for c in _cross(t_s, field(*r_s)))

    k1 = accel(r, t)
    r2 = tuple(ri + 0.5 * h * ti for ri, ti in zip(r, t))
    t2 = tuple(ti + 0.5 * h * ki for ti, ki in zip(t, k1))
    k2 = accel(r2, t2)
    r3 = tuple(ri + 0.5 * h * ti for ri, ti in zip(r, t2))
    t3 = tuple(ti + 0.5 * h * ki for ti, ki in zip(t, k2))
    k3 = accel(r3, t3)
    r4 = tuple(ri + h * ti for ri, ti in zip(r, t3))
    t4 = tuple(ti + h * ki for ti, ki in zip(t, k3))
    k4 = accel(r4, t4)
    r_new = tuple(ri + h / 6.0 * (a + 2 * b + 2 * c + d) for ri, a, b, c, d in zip(r, t, t2, t3, t4))
    t_new = tuple(ti + h / 6.0 * (a + 2 * b + 2 * c + d) for ti, a, b, c, d in zip(t, k1, k2, k3, k4))
    return r_new, t_new


def _cylinder_distance(r, t, radius, crossed):
    """Straight-line distances (step, nearest): the first root ahead, or (crossed) the root closest to
    zero; and the root closest to zero."""
    a2 = t[0] * t[0] + t[1] * t[1]
    b = r[0] * t[0] + r[1] * t[1]
    c = r[0] * r[0] + r[1] * r[1] - radius * radius
    disc = b * b - a2 * c
    exists = disc >= 0
    sign = torch.where(b >= 0, 1.0, -1.0).to(b)
    q = -(b + sign * torch.sqrt(torch.clamp(disc, min=1e-30)))
    q = torch.where(q.abs() > 1e-30, q, -sign * 1e-30)
    near = c / q
    far = q / torch.clamp(a2, min=1e-30)
    big = torch.full_like(near, 1e30)
    ahead = torch.where(near > 0, torch.where(far > 0, torch.minimum(near, far), near),
                        torch.where(far > 0, far, big))
    step = torch.where(crossed, torch.where(exists, near, 0 * near), torch.where(exists, ahead, big))
    return step, torch.where(exists, near, big)


def bethe_silicon(p, mass):
    """Mean -dE/dx in silicon [GeV/mm] (PDG Bethe formula with Sternheimer density effect)."""
    bg2 = (p / mass) ** 2
    gamma = torch.sqrt(1 + bg2)
    beta2 = bg2 / (1 + bg2)
    ratio = ELECTRON_MASS / mass
    w_max = 2 * ELECTRON_MASS * bg2 / (1 + 2 * gamma * ratio + ratio ** 2)
    a, k, x0, x1, cbar, delta0 = SI_STERNHEIMER
    x = torch.log10(torch.sqrt(bg2))
    delta = torch.where(x < x0, delta0 * 10 ** (2 * (x - x0)),
                        torch.where(x < x1, 2 * math.log(10) * x - cbar + a * torch.clamp(x1 - x, min=0) ** k,
                                    2 * math.log(10) * x - cbar))
    bracket = 0.5 * torch.log(2 * ELECTRON_MASS * bg2 * w_max / SI_I ** 2) - beta2 - delta / 2
    return 0.307075 * SI_Z_OVER_A / beta2 * bracket * SI_DENSITY * 1e-4


def propagate_cylinders(params, radii, half_lengths, field, step, *, thickness=None, mass=MUON_MASS,
                        tolerance=1e-2, max_steps=10000):
    """Propagate params (N, 8) through cylinders in order; returns dict of tensors and the step count.

    free (N, L, 8), local (N, L, 2) = (R phi, z), path (N, L), valid (N, L); ``steps``: the
    number of track-steps taken (lanes x iterations while running). Radii, half-lengths, thickness
    and the field parameters may be tensors that require grad.
    """
    r = tuple(params[:, i] for i in range(3))
    time = params[:, 3]
    d = params[:, 4:7]
    t = tuple((d / d.norm(dim=1, keepdim=True))[:, i] for i in range(3))
    qop = params[:, 7]
    path_total = torch.zeros_like(qop)
    alive = torch.ones_like(qop, dtype=torch.bool)
    outputs = {"free": [], "local": [], "path": [], "valid": []}
    steps = 0
    for k, (radius, half_length) in enumerate(zip(radii, half_lengths)):
        lam = C_CURV * qop
        cr, ct = r, t
        s = torch.zeros_like(qop)
        rho = torch.sqrt(cr[0] ** 2 + cr[1] ** 2)
        side = torch.where(rho - radius > 0, 1.0, -1.0).to(qop)
        crossed = torch.zeros_like(alive)
        approached = torch.zeros_like(alive)
        running = torch.ones_like(alive)
        reached = torch.zeros_like(alive)
        iterations = 0

        def check(cr, ct, crossed, approached):
            rho = torch.sqrt(cr[0] ** 2 + cr[1] ** 2)
            crossed = side * (rho - radius) < 0
            approaching = side * (cr[0] * ct[0] + cr[1] * ct[1]) < 0
            approached = approached | approaching
            dist, nearest = _cylinder_distance(cr, ct, radius, crossed)
            turned = approached & ~approaching & ~crossed
            return crossed, approached, dist, nearest.abs() < tolerance, turned

        crossed, approached, dist, now_reached, turned = check(cr, ct, crossed, approached)
        reached = now_reached
        running = ~now_reached & ~turned
        while bool(running.any()) and iterations < max_steps:
            steps += int(running.sum())
            h = torch.where(dist.abs() < step, dist, torch.where(crossed, -step, step).to(dist))
            nr, nt = rk4_step(cr, ct, lam, h, field)
            cr = tuple(torch.where(running, a, b) for a, b in zip(nr, cr))
            ct = tuple(torch.where(running, a, b) for a, b in zip(nt, ct))
            s = s + torch.where(running, h, 0 * h)
            iterations += 1
            crossed, approached, dist, now_reached, turned = check(cr, ct, crossed, approached)
            reached = reached | (running & now_reached)
            running = running & ~now_reached & ~turned
        # onto the surface along the tangent
        _, dist = _cylinder_distance(cr, ct, radius, crossed)
        b = field(*cr)
        kappa = _cross(ct, b)
        pos = tuple(ri + dist * ti for ri, ti in zip(cr, ct))
        direction = tuple(ti + dist * lam * ki for ti, ki in zip(ct, kappa))
        norm = torch.sqrt(sum(v * v for v in direction))
        direction = tuple(v / norm for v in direction)
        seg = s + dist
        inv_speed = torch.sqrt(1 + (mass * qop) ** 2) / C_LIGHT
        hit_time = time + seg * inv_speed
        hit = alive & reached & (pos[2].abs() <= half_length)
        zero = torch.zeros_like(qop)
        free = torch.stack([*pos, hit_time, *direction, qop], dim=1)
        outputs["free"].append(torch.where(hit[:, None], free, zero[:, None]))
        local = torch.stack([radius * torch.atan2(pos[1], pos[0]), pos[2]], dim=1)
        outputs["local"].append(torch.where(hit[:, None], local, zero[:, None]))
        outputs["path"].append(torch.where(hit, path_total + seg, zero))
        outputs["valid"].append(hit)
        new_qop = qop
        if thickness is not None:
            p = 1.0 / qop.abs()
            rho = torch.sqrt(pos[0] ** 2 + pos[1] ** 2)
            cos = ((pos[0] * direction[0] + pos[1] * direction[1]) / rho).abs().clamp(min=1e-3)
            energy = torch.sqrt(p * p + mass * mass) - bethe_silicon(p, mass) * thickness[k] / cos
            stopped = energy <= mass * (1 + 1e-6)
            new_p = torch.sqrt(torch.clamp(energy ** 2 - mass ** 2, min=1e-30))
            new_qop = torch.where(stopped, qop, torch.sign(qop) / new_p)
            alive = alive & ~(hit & stopped)
        r = tuple(torch.where(hit, a, b) for a, b in zip(pos, r))
        t = tuple(torch.where(hit, a, b) for a, b in zip(direction, t))
        time = torch.where(hit, hit_time, time)
        qop = torch.where(hit, new_qop, qop)
        path_total = torch.where(hit, path_total + seg, path_total)
    result = {name: torch.stack(values, dim=1) for name, values in outputs.items()}
    result["steps"] = steps
    return result
