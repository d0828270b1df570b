"""lgm-op: the large-margin Gaussian mixture (L-GM) loss as an MXNet operator.

``import lgm_op`` registers ``op_type='lgm'`` for ``mx.sym.Custom`` / ``mx.nd.Custom`` and exposes
the Gluon block :class:`LGMLoss` and the symbolic builder :func:`lgm`. The framework-free layers
(``lgm_op.cpu``, ``lgm_op.cuda``, ``lgm_op.cudasim``) import without MXNet, so the kernels can be
used and tested on a machine that only has CuPy.
"""
import atexit as _atexit
import sys as _sys
import time as _time

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


def _finish_pending_work():
    """At exit, wait for the work still queued in MXNet's engine, before MXNet's own exit handler.

    That handler (``MXNotifyShutdown`` in MXNet 1.9) stops the custom-operator worker threads and
    only then waits for the engine: a custom-operator call still queued behind other work can then
    find no worker and never run (the exit hangs), or its Python callback runs on an engine thread
    once the interpreter is finalizing, which ends that thread inside C++ (``terminate called
    without an active exception``, exit status 134). This holds for every Python custom operator.
    Waiting here, while the interpreter is whole, leaves nothing pending for either. A failure of
    that work, which no one read, is reported on stderr. Registered after ``import mxnet``, so it
    runs before MXNet's handler (atexit runs the last registered first); details in
    docs/reliability.md. ``atexit.unregister(lgm_op._finish_pending_work)`` opts out.
    """
    try:
        _mxnet.nd.waitall()
    except _mxnet.base.MXNetError as err:
        _sys.stderr.write(f"lgm_op: MXNet work still pending at exit failed: {err}\n")
    # The engine frees a finished operation (and with it possibly the last reference to a custom
    # operator, whose deletion calls into Python) just after it wakes waitall; there is no call
    # that waits for that. A short pause without the GIL lets such a thread finish now.
    _time.sleep(0.02)


if _mxnet is not None:
    _atexit.register(_finish_pending_work)
