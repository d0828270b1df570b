"""lgm-op: the large-margin Gaussian mixture (L-GM) loss as an MXNet operator.

``import lgm_op`` registers ``op_type='lgm'`` for ``mx.sym.Custom`` / ``mx.nd.Custom`` and exposes
the Gluon block :class:`LGMLoss` and the symbolic builder :func:`lgm`. The framework-free layers
(``lgm_op.cpu``, ``lgm_op.cuda``, ``lgm_op.cudasim``) import without MXNet, so the kernels can be
used and tested on a machine that only has CuPy.
"""
from .options import LGMOptions, parse_options
from .cpu import lgm_forward_cpu, lgm_backward_cpu

__version__ = "0.1.0"
__all__ = ["LGMOptions", "parse_options", "lgm_forward_cpu", "lgm_backward_cpu", "__version__"]

try:
    import mxnet as _mxnet  # noqa: F401
except ImportError:  # a CuPy-only machine: the kernel layers still work
    _mxnet = None

if _mxnet is not None:
    from .op import LGMOp, LGMOpProp  # noqa: F401  (registers op_type='lgm')
    from .symbol import lgm  # noqa: F401
    from .gluon import LGMLoss  # noqa: F401
    __all__ += ["LGMOp", "LGMOpProp", "lgm", "LGMLoss"]
