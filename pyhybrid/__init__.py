"""pyhybrid: differentiable particle-physics kernels inside PyTorch models.

Physics kernels are written in Dr.Jit (``pyhybrid.kernels``, no torch), bridged
to torch autograd by ``pyhybrid.engine`` and exposed as ``torch.nn.Module``s in
``pyhybrid.nn``. Units: GeV, mm, ns, Tesla, charge in e.
"""
__version__ = "0.1.0"
