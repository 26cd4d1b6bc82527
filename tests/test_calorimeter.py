"""Sampling calorimeter (GFLASH): physics against analytic and published numbers, the torch
reference, gradients (gradcheck, pathwise vs common-random-number finite differences), errors."""
from __future__ import annotations

import math

import drjit as dr
import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import gammainc

from pyhybrid.kernels import calorimeter as kernel
from pyhybrid.kernels.backend import cuda_available, kernel_types
from pyhybrid.nn.calorimeter import MATERIALS, SamplingCalorimeter
from reference import torch_calorimeter as reference

F64 = torch.float64


def small_calorimeter(dtype=F64, **overrides) -> SamplingCalorimeter:
    """Tungsten/silicon, 4 readout segments of 3 layers, 4x4 cells of 12 mm (shared by several tests)."""
    options = dict(absorber_thickness=3.5, active_thickness=0.5, n_layers=12, layers_per_segment=3, n_cells=4,
                   cell_size=12.0, noise=0.003, dtype=dtype,
                   trainable=("absorber_thickness", "active_thickness", "absorber_radiation_length",
                              "active_moliere_radius", "cell_size", "noise"))
    options.update(overrides)
    return SamplingCalorimeter("tungsten", "silicon", **options)


def deep_calorimeter(noise: float = 0.0) -> SamplingCalorimeter:
    """Lead/liquid argon 2 mm / 4 mm, 104 layers (40 X0), 3x3 cells of 400 mm: contains > 99.9 %."""
    return SamplingCalorimeter("lead", "liquid_argon", absorber_thickness=2.0, active_thickness=4.0, n_layers=104,
                               layers_per_segment=8, n_cells=3, cell_size=400.0, noise=noise, dtype=F64)


def kernel_normals(n_showers: int, calo: SamplingCalorimeter, seed: int):
    """The Dr.Jit kernel's own standard normals for ``seed`` as torch tensors."""
    types = kernel_types("cpu", "float64")
    z1, z2 = kernel.shower_normals(types, n_showers, seed)
    s = calo.segmentation
    cells = kernel.cell_normals(types, n_showers * s.n_segments, s.cells_per_segment, seed)
    dr.eval(z1, z2, cells)
    cells = torch.stack([c.torch() for c in cells], -1).reshape(n_showers, s.n_segments, s.n_cells, s.n_cells)
    return torch.stack([z1.torch(), z2.torch()], -1), cells


def design_dict(calo: SamplingCalorimeter) -> dict:
    return {name: getattr(calo, name).detach() for name in reference.DESIGN_FIELDS}


# ---------------------------------------------------------------- physics


def test_longitudinal_profile_matches_incomplete_gamma():
    """Segment energies of a laterally unbounded calorimeter = E * visible fraction * [P(a, b t2) - P(a, b t1)]."""
    calo = SamplingCalorimeter("lead", "scintillator", absorber_thickness=2.0, active_thickness=4.0, n_layers=30,
                               layers_per_segment=3, n_cells=1, cell_size=1e7, dtype=F64, quadrature_points=8)
    energy = torch.tensor([1.0, 10.0, 100.0], dtype=F64)
    normals = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-1.2, 0.3]], dtype=F64)
    with torch.no_grad():
        cells = calo.expected_cells(energy, None, normals).reshape(3, -1)
        medium = {k: float(v) for k, v in calo.medium().items()}
    types = kernel_types("cpu", "float64")
    design = kernel.Design.from_columns([types.Float(float(v)) for v in calo.design_tensor().detach()[0]])
    distribution = kernel.profile_distribution(types.Float(energy.numpy()), kernel.effective_medium(design))
    _, alpha, beta = kernel.fluctuated_profile(distribution, types.Float(normals[:, 0].numpy()),
                                               types.Float(normals[:, 1].numpy()))
    edges = np.arange(calo.segmentation.n_segments + 1) * 3 * medium["layer_thickness"] / medium["radiation_length"]
    for i in range(3):
        expected = np.diff(gammainc(alpha[i], beta[i] * edges)) * float(energy[i]) * medium["visible_fraction"]
        np.testing.assert_allclose(cells[i].numpy(), expected, rtol=1e-6, atol=1e-9 * float(energy[i]))


def test_square_fraction_matches_numerical_integration():
    radius = 7.0

    def density(y, x):
        return radius**2 / (math.pi * (x * x + y * y + radius**2) ** 2)

    types = kernel_types("cpu", "float64")
    for x1, x2, y1, y2 in [(0.0, 5.0, 0.0, 9.0), (-12.0, 3.0, 2.0, 4.0), (20.0, 40.0, -35.0, -10.0)]:
        corners = [kernel.square_fraction(types.Float(u), types.Float(v), radius)[0] for u, v in
                   ((x2, y2), (x1, y2), (x2, y1), (x1, y1))]
        value = corners[0] - corners[1] - corners[2] + corners[3]
        expected, _ = integrate.dblquad(density, x1, x2, y1, y2, epsabs=1e-12)
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-13)
    total = kernel.square_fraction(types.Float(1e9), types.Float(1e9), radius)[0]
    assert total == pytest.approx(0.25, abs=1e-8)  # one quadrant of a normalised profile


def test_radial_containment_matches_pdg_rule_of_thumb():
    """PDG: ~90 % of an EM shower's energy lies within one Moliere radius, ~99 % within 3.5 R_M."""
    types = kernel_types("cpu", "float64")
    design = kernel.Design.from_materials(MATERIALS["lead"], MATERIALS["liquid_argon"], absorber_thickness=2.0,
                                          active_thickness=4.0, cell_size=1.0)
    medium = kernel.effective_medium(design)
    depth = np.linspace(1e-3, 60.0, 6000)
    for energy in (10.0, 100.0):
        e = types.Float(np.full(depth.size, energy))
        distribution = kernel.profile_distribution(e, medium)
        _, alpha, beta = kernel.fluctuated_profile(distribution, 0.0, 0.0)
        mean_alpha = dr.exp(distribution.mean_log_alpha)
        t = types.Float(depth)
        tau = t * beta / alpha * mean_alpha / (mean_alpha - 1.0)
        core, tail, weight = kernel.radial_profile(e, medium, tau)
        density = dr.exp(alpha * dr.log(beta) - dr.lgamma(alpha) + (alpha - 1.0) * dr.log(t) - beta * t)
        contained = []
        for k in (1.0, 3.5):
            r = k * medium.moliere_radius
            fraction = weight * r * r / (r * r + core * core) + (1.0 - weight) * r * r / (r * r + tail * tail)
            contained.append(float(np.sum(np.array(density * fraction)) / np.sum(np.array(density))))
        assert 0.88 < contained[0] < 0.94, (energy, contained)
        assert 0.98 < contained[1] < 0.995, (energy, contained)


def test_kernel_matches_torch_reference():
    calo = small_calorimeter()
    n, seed = 7, 42
    energy = torch.linspace(1.0, 80.0, n, dtype=F64)
    impact = torch.randn(n, 2, dtype=F64) * 5.0
    shower_normals, cell_normals = kernel_normals(n, calo, seed)
    design = design_dict(calo)
    s = calo.segmentation
    means = reference.cell_means(energy, impact, design, shower_normals, s.n_layers, s.layers_per_segment, s.n_cells,
                                 calo.quadrature_points)
    expected = reference.add_fluctuations(means, design, cell_normals)
    with torch.no_grad():
        simulated = calo(energy, impact, seed=seed)
        mean_cells = calo.expected_cells(energy, impact, shower_normals)
    torch.testing.assert_close(simulated, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean_cells, means, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        medium = calo.medium()
    ref_medium = reference.effective_medium(design)
    for ours, theirs in (("radiation_length", "x0"), ("moliere_radius", "rm"), ("critical_energy", "ec"),
                         ("atomic_number", "z"), ("visible_fraction", "visible")):
        assert float(medium[ours]) == pytest.approx(float(ref_medium[theirs]), rel=1e-14)


def test_mean_response_is_the_visible_fraction_and_linear():
    calo = deep_calorimeter()
    energy = torch.tensor([2.0, 10.0, 50.0, 200.0], dtype=F64)
    with torch.no_grad():
        response = calo.expected_cells(energy).sum((1, 2, 3)) / energy / calo.visible_fraction()
    assert float(calo.depth_in_radiation_lengths().detach()) == pytest.approx(40.0, rel=1e-2)
    assert torch.all(response > 0.999) and torch.all(response < 1.0)


def test_one_deep_readout_segment_integrates_like_thin_ones():
    """A single 40 X0 segment gets one node per 2.5 X0 (17): the same response as 8-layer segments
    with the default 6 nodes each (6 nodes for the deep segment were 3 % off and non-linear)."""
    energy = torch.tensor([2.0, 10.0, 50.0, 200.0], dtype=F64)
    responses = []
    for layers_per_segment, nodes in ((104, 17), (8, 6)):
        calo = SamplingCalorimeter("lead", "liquid_argon", absorber_thickness=2.0, active_thickness=4.0, n_layers=104,
                                   layers_per_segment=layers_per_segment, n_cells=1, cell_size=2000.0, dtype=F64)
        assert calo._nodes_per_segment() == nodes
        with torch.no_grad():
            responses.append(calo.expected_cells(energy).sum((1, 2, 3)) / energy / calo.visible_fraction())
    torch.testing.assert_close(responses[0], responses[1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("noise", [0.0, 0.01], ids=["sampling", "sampling+noise"])
def test_energy_resolution_matches_stochastic_term(noise):
    """sigma/E = (c_s sqrt(d_active/f_mip))/sqrt(E) (+) sqrt(n_cells) noise / (visible fraction E) in a
    containing calorimeter, at 2, 10 and 50 GeV (20000 showers each: 0.5 % statistical precision)."""
    calo = deep_calorimeter(noise)
    with torch.no_grad():
        a = float(calo.stochastic_term())
        visible = float(calo.visible_fraction())
    n_cells = calo.segmentation.n_segments * calo.segmentation.cells_per_segment
    assert a == pytest.approx(0.027 * math.sqrt(4.0 / (4 * 0.2105 / (4 * 0.2105 + 2 * 1.273))), rel=1e-3)
    n = 20000
    for e in (2.0, 10.0, 50.0):
        with torch.no_grad():
            total = calo(torch.full((n,), e, dtype=F64), seed=int(e)).sum((1, 2, 3)) / visible
        measured = float(total.std() / total.mean())
        predicted = math.sqrt(a * a / e + n_cells * (noise / (visible * e)) ** 2)
        assert measured == pytest.approx(predicted, rel=4.0 / math.sqrt(2 * n) + 0.005), (e, measured, predicted)


def test_seeds_reproduce_and_float32_agrees_with_float64():
    energy = torch.tensor([3.0, 30.0], dtype=F64)
    calo64, calo32 = small_calorimeter(), small_calorimeter(torch.float32)
    with torch.no_grad():
        a, b, c = calo64(energy, seed=5), calo64(energy, seed=5), calo64(energy, seed=6)
        single = calo32(energy.float(), seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(single.double(), a, rtol=2e-4, atol=2e-6)


# ---------------------------------------------------------------- gradients


def test_gradcheck_expected_cells():
    calo = small_calorimeter()
    energy = torch.tensor([2.0, 30.0], dtype=F64, requires_grad=True)
    impact = torch.tensor([[1.0, -3.0], [5.0, 2.0]], dtype=F64, requires_grad=True)
    normals = torch.tensor([[0.3, -0.5], [1.0, 0.2]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(calo.expected_cells, (energy, impact, normals), eps=1e-6, atol=1e-8,
                                    rtol=1e-5, fast_mode=True)
    names = [name for name, _ in calo.named_parameters()]

    def cells_of_design(*values):
        return torch.func.functional_call(calo, dict(zip(names, values)), (energy.detach(), impact.detach()),
                                          {"seed": 9})

    values = tuple(p.detach().clone().requires_grad_() for p in calo.parameters())
    assert torch.autograd.gradcheck(cells_of_design, values, eps=1e-6, atol=1e-8, rtol=1e-5, fast_mode=True)


def test_gradcheck_sampled_cells_in_energy_and_impact():
    calo = small_calorimeter()
    energy = torch.tensor([3.0, 20.0], dtype=F64, requires_grad=True)
    impact = torch.tensor([[1.0, -3.0], [5.0, 2.0]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, i: calo(e, i, seed=9), (energy, impact), eps=1e-6, atol=1e-8,
                                    rtol=1e-5, fast_mode=True)


class _CellsAndMedium(torch.nn.Module):
    def __init__(self, calo):
        super().__init__()
        self.calo = calo

    def forward(self, energy, impact):
        medium = torch.stack(list(self.calo.medium().values()))
        return torch.cat([self.calo(energy, impact, seed=9).flatten(), medium, self.calo.stochastic_term()[None]])


def test_gradcheck_the_other_design_fields():
    """The design fields that small_calorimeter does not train, through the cells, medium() and stochastic_term()."""
    names = ("sampling_coefficient", "absorber_density", "absorber_atomic_number", "absorber_mip_dedx",
             "absorber_moliere_radius", "active_radiation_length")
    module = _CellsAndMedium(small_calorimeter(trainable=names))
    energy, impact = torch.tensor([3.0, 20.0], dtype=F64), torch.tensor([[1.0, -3.0], [5.0, 2.0]], dtype=F64)

    def outputs(*values):
        return torch.func.functional_call(module, {f"calo.{n}": v for n, v in zip(names, values)}, (energy, impact))

    values = tuple(module.calo.get_parameter(name).detach().clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(outputs, values, eps=1e-6, atol=1e-8, rtol=1e-5, fast_mode=True)


def test_vjp_with_the_forward_means_equals_the_recomputing_vjp():
    """The module keeps the forward's expected cells for its VJP (cell_energies_and_means) instead of
    computing them again: same cells and the same gradients, bit for bit."""
    calo = small_calorimeter()
    types = kernel_types("cpu", "float64")
    energy, x, y = types.Float(2.0, 30.0, 7.0), types.Float(1.0, 5.0, -2.0), types.Float(-3.0, 2.0, 0.5)
    design = kernel.Design.from_columns([types.Float(float(v)) for v in calo.design_tensor()[0].detach()])
    s = calo.segmentation
    cells, means = kernel.cell_energies_and_means(energy, x, y, design, s, 4)
    assert all(dr.all(a == b) for a, b in zip(cells, kernel.cell_energies(energy, x, y, design, s, 4)))
    lanes = dr.width(cells[0])  # one per shower and readout segment
    cotangents = [(dr.arange(types.Float, lanes) - 5.0) * (0.01 * (k + 1)) for k in range(len(cells))]
    kept = kernel.cells_vjp(cotangents, energy, x, y, design, s, seed=4, means=means)
    again = kernel.cells_vjp(cotangents, energy, x, y, design, s, seed=4)
    for name in ("energy", "impact_x", "impact_y", "z1", "z2"):
        assert dr.all(kept[name] == again[name]), name
    assert all(dr.all(a == b) for a, b in zip(kept["design"], again["design"]))
    assert dr.any(kept["energy"] != 0.0) and any(dr.any(g != 0.0) for g in kept["design"])


def test_pathwise_gradient_matches_common_random_number_differences():
    """d/dtheta E[L] for L = mean((E_rec - E)^2 / E): per-seed pathwise gradients equal the central
    differences of the same seed's loss (common random numbers), and their mean over seeds -- the
    gradient estimate -- agrees with the finite-difference derivative of the expectation."""
    calo = small_calorimeter()
    energy = torch.linspace(2.0, 40.0, 64, dtype=F64)
    names = [name for name, _ in calo.named_parameters()]
    base = {name: p.detach().clone() for name, p in calo.named_parameters()}

    def loss(values: dict, seed: int) -> torch.Tensor:
        calo.load_state_dict(values, strict=False)
        reconstructed = calo(energy, seed=seed).sum((1, 2, 3)) / calo.visible_fraction()
        return ((reconstructed - energy) ** 2 / energy).mean()

    pathwise, differences = [], []
    for seed in range(6):
        calo.zero_grad()
        loss(base, seed).backward()
        pathwise.append(torch.stack([calo.get_parameter(n).grad for n in names]))
        fd = []
        for name in names:
            h = 1e-6 * float(base[name])
            with torch.no_grad():
                up = loss({**base, name: base[name] + h}, seed)
                down = loss({**base, name: base[name] - h}, seed)
            fd.append((up - down) / (2 * h))
        differences.append(torch.stack(fd))
    calo.load_state_dict(base, strict=False)
    pathwise, differences = torch.stack(pathwise), torch.stack(differences)
    torch.testing.assert_close(pathwise, differences, rtol=1e-5, atol=1e-9)
    spread = (pathwise - differences).std(0) / math.sqrt(len(pathwise)) + 1e-9
    assert torch.all((pathwise.mean(0) - differences.mean(0)).abs() < 3 * spread + 1e-6 * differences.mean(0).abs())


# ---------------------------------------------------------------- errors and devices


def test_bad_inputs_raise_clear_errors():
    calo = small_calorimeter()
    good = torch.tensor([5.0], dtype=F64)
    with pytest.raises(ValueError, match="energy contains NaN"):
        calo(torch.tensor([float("nan")], dtype=F64))
    with pytest.raises(ValueError, match="energy must be >= 0.1 GeV"):
        calo(torch.tensor([0.01], dtype=F64))
    with pytest.raises(TypeError, match="energy must have dtype torch.float64"):
        calo(good.float())
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        small_calorimeter(dtype=torch.float16)
    with pytest.raises(ValueError, match=r"impact must have shape \(1, 2\)"):
        calo(good, torch.zeros(1, 3, dtype=F64))
    with pytest.raises(ValueError, match="unknown material 'unobtainium'"):
        SamplingCalorimeter("unobtainium")
    with pytest.raises(ValueError, match="n_layers .* must be a multiple of layers_per_segment"):
        SamplingCalorimeter(n_layers=10, layers_per_segment=3)
    with pytest.raises(ValueError, match="not design fields"):
        SamplingCalorimeter(trainable=("thickness",))
    with pytest.raises(ValueError, match="seed must be an integer"):
        calo(good, seed=1.5)
    with torch.no_grad():
        calo.absorber_thickness.fill_(-1.0)
    with pytest.raises(ValueError, match="absorber_thickness must be positive"):
        calo(good)


@pytest.mark.skipif(not cuda_available() or not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    calo = small_calorimeter()
    energy = torch.tensor([3.0, 30.0, 90.0], dtype=F64)
    with torch.no_grad():
        cpu = calo.expected_cells(energy)
        cuda = calo.to("cuda").expected_cells(energy.cuda())
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-10, atol=1e-13)
    energy = energy.cuda().requires_grad_()
    calo(energy, seed=1).sum().backward()
    assert torch.isfinite(energy.grad).all() and energy.grad.device.type == "cuda"


def test_empty_batch_gives_empty_cells_with_zero_gradients():
    calo = deep_calorimeter()
    energy = torch.zeros(0, dtype=F64, requires_grad=True)
    for cells in (calo(energy, seed=1), calo.expected_cells(energy)):
        assert cells.shape == (0, 13, 3, 3)
        cells.sum().backward()
    assert energy.grad.shape == (0,)
    assert all(p.grad is not None and p.grad == 0 for p in calo.parameters())


def test_materials_reproduce_the_pdg_critical_energies():
    """R_M = E_s X0 / E_c (PDG's definition): each material's X0 and Moliere radius give PDG's electron
    critical energy (iron's R_M was 16.93 mm, E_c 22.0 MeV; PDG: 17.19 mm, 21.68 MeV)."""
    from pyhybrid.kernels.calorimeter import MATERIALS

    pdg_critical_energy_mev = {"lead": 7.43, "tungsten": 7.97, "iron": 21.68, "copper": 19.42,
                               "liquid_argon": 32.84, "scintillator": 93.11, "silicon": 40.19}
    assert set(pdg_critical_energy_mev) == set(MATERIALS)
    for name, material in MATERIALS.items():
        assert material.critical_energy * 1e3 == pytest.approx(pdg_critical_energy_mev[name], rel=2e-3), name
