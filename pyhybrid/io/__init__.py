"""Event I/O: HDF5 files with fixed and variable-length per-event arrays (torch-free)."""
from pyhybrid.io.hdf5 import EventFile, EventWriter, LayoutError, read_events

__all__ = ["EventFile", "EventWriter", "LayoutError", "read_events"]
