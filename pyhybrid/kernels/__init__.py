"""Physics kernels written in Dr.Jit. Nothing in this package imports torch."""
