"""Units and physical constants (GeV, mm, ns, Tesla, charge in e), as in ACTS/hepunits."""

GeV = 1.0
MeV = 1e-3
mm = 1.0
cm = 10.0
m = 1000.0
ns = 1.0
T = 1.0

#: Curvature constant per mm: p_T [GeV] = B_CURVATURE * B [T] * R [mm], 0.299792458e-3 GeV/(T mm)
#: (= 0.299792458 GeV/(T m)).
B_CURVATURE = 0.299792458e-3
SPEED_OF_LIGHT = 299.792458  # mm/ns
ELECTRON_MASS = 0.51099895e-3  # GeV
MUON_MASS = 0.1056583755  # GeV
PION_MASS = 0.13957039  # GeV
