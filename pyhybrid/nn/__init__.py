"""torch.nn.Modules wrapping pyhybrid's Dr.Jit kernels: drop them into training loops.

Each module takes and returns torch tensors on cpu (Dr.Jit LLVM backend) or
cuda (Dr.Jit CUDA backend), float32 or float64, with gradients through the
physics. See docs/ for each topic.
"""
from pyhybrid.nn.calorimeter import MATERIALS as CALORIMETER_MATERIALS
from pyhybrid.nn.calorimeter import Material as CalorimeterMaterial
from pyhybrid.nn.calorimeter import SamplingCalorimeter
from pyhybrid.nn.detector_design import CalorimeterDesign, EnergyRegression, TrackerDesign
from pyhybrid.nn.hybrid import (MLP, Component, Correction, HitCorrection, PerigeeHits, Surrogate, TrackEncoder,
                                fit_through_physics)
from pyhybrid.nn.matrix_element import (DifferentialCrossSection, MatrixElement, TwoBodyCrossSection,
                                        rambo_momenta, two_body_momenta)
from pyhybrid.nn.propagator import (CylinderLayer, DiskLayer, GridField, PlaneLayer, PropagationResult,
                                    Propagator, SolenoidField, UniformField, barrel, free_parameters)
from pyhybrid.nn.shower import PartonShower, ShowerEvents, event_shapes

__all__ = [
    "Propagator", "PropagationResult", "UniformField", "SolenoidField", "GridField", "CylinderLayer",
    "DiskLayer", "PlaneLayer", "barrel", "free_parameters",
    "MatrixElement", "DifferentialCrossSection", "TwoBodyCrossSection", "rambo_momenta", "two_body_momenta",
    "PartonShower", "ShowerEvents", "event_shapes",
    "SamplingCalorimeter", "CalorimeterMaterial", "CALORIMETER_MATERIALS", "CalorimeterDesign", "EnergyRegression", "TrackerDesign",
    "MLP", "Surrogate", "Correction", "Component", "PerigeeHits", "TrackEncoder", "HitCorrection",
    "fit_through_physics",
]
