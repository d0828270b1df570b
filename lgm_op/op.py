"""The MXNet binding: ``op_type='lgm'`` as a CustomOp / CustomOpProp.

This layer only validates, converts, dispatches on the context and honours ``req``; the math lives
in ``cpu.py`` (NumPy/BLAS) and ``cuda.py`` (the CUDA kernels). On a CPU context with the
environment variable ``LGM_OP_CUDASIM=1`` the CUDA kernels run through the CPU simulator
(``lgm_op.cudasim``), so the whole operator can be tested with the GPU code on a machine without a
GPU.

Arguments: ``data`` (N, D), ``label`` (N,) (absent when ``with_label=False``), ``mean`` (K, D),
``log_var`` (K, D) or (K, 1); auxiliary state ``margin_iter`` (1,) when the margin follows a
schedule. Outputs: ``logits`` (N, K), ``lkd`` (N,).
"""
import ctypes
import os
import threading

import mxnet as mx
import numpy as np

from . import errors
from .checks import check_float_dtype, check_shapes, check_sizes, param_shapes
from .cpu import CPUState, lgm_backward_cpu, lgm_forward_cpu
from .options import parse_attributes
from .schedule import check_iteration

__all__ = ["LGMOp", "LGMOpProp", "SIMULATOR_ENV"]

SIMULATOR_ENV = "LGM_OP_CUDASIM"
# MXNet builds without INT64_TENSOR_SIZE (the pip wheels) index every array with int32
_MAX_ELEMENTS, _SIZE_LIMIT = ((2 ** 63 - 1, "MXNet holds")
                              if mx.runtime.Features().is_enabled("INT64_TENSOR_SIZE") else
                              (2 ** 31 - 1, "this MXNet build holds (built without "
                                            "INT64_TENSOR_SIZE)"))
_SIMULATOR_VALUES = {None: "cpu", "0": "cpu", "1": "sim"}


def _backend(ctx):
    """'gpu', 'sim' (the CUDA kernels on the CPU simulator) or 'cpu' (NumPy/BLAS)."""
    if ctx.device_type == "gpu":
        return "gpu"
    value = os.environ.get(SIMULATOR_ENV)
    if value not in _SIMULATOR_VALUES:
        raise ValueError(f"lgm: environment variable {SIMULATOR_ENV} must be unset, 0 (NumPy "
                         f"path) or 1 (CUDA kernels on the CPU simulator), got {value!r}")
    return _SIMULATOR_VALUES[value]


class LGMOp(mx.operator.CustomOp):
    """One bound instance of the operator; created by :class:`LGMOpProp` for a context."""

    def __init__(self, opts, schedule, backend, shapes=None, dtypes=None):
        super().__init__()
        self.opts = opts
        self.schedule = schedule
        self.backend = backend
        # the options of the last forward, its margin included: backward differentiates that
        self._last_opts = opts
        # the thread that issued the call: a failure's message is delivered to its error there
        self._thread = threading.current_thread()
        # the CPU path's operands, kept from a forward for the backward of the same step
        self._state = CPUState()
        # the arrays' layouts as MXNet inferred them for this instance: (shape, dtype) of each
        # input and output, so the callbacks need not ask MXNet for them (entries None: ask)
        self._inputs, self._outputs = _layouts(opts, shapes, dtypes)

    def _functions(self):
        """The framework-free forward and backward of this backend, with the keywords only the
        CPU path takes (its operands kept from forward for backward)."""
        if self.backend == "cpu":
            return lgm_forward_cpu, lgm_backward_cpu, {"state": self._state}
        from .cuda import lgm_backward_cuda, lgm_forward_cuda
        return lgm_forward_cuda, lgm_backward_cuda, {}

    def _split(self, in_data):
        if self.opts.with_label:
            return in_data
        x, mu, s = in_data
        return x, None, mu, s

    def _margin(self, is_train, aux):
        """The options with this step's margin, and the schedule counter's next value (None when
        it does not move: no schedule, or not a training step with labels)."""
        opts = self.opts
        if self.schedule.is_constant or not (is_train and opts.with_label):
            return opts.replace_alpha(opts.margin(is_train)), None
        iteration = check_iteration(aux[0].asscalar())
        return opts.replace_alpha(self.schedule.value(opts.alpha, iteration)), iteration + 1

    def forward(self, is_train, req, in_data, out_data, aux):
        with errors.recording("forward", self._thread):
            opts, next_iteration = self._margin(is_train, aux)
            self._last_opts = opts
            forward, _, extra = self._functions()
            arrays = _Arrays(self.backend, in_data[0], self._inputs)
            targets = [arrays.target(dst, r, layout)
                       for dst, r, layout in zip(out_data, req, self._outputs)]
            # the label check is read at the one synchronisation that ends the callback
            if self.backend != "cpu":
                extra = {"defer_check": True}
            x, label, mu, s = self._split(arrays.read_all(in_data, self._inputs))
            result = forward(x, label, mu, s, opts, bool(is_train),
                             out=tuple(t.buffer for t in targets), **extra)
            arrays.finish(targets)
            if self.backend != "cpu":
                result[2]()
            # only a step that succeeded moves the schedule (a rejected batch leaves it as it was)
            if next_iteration is not None:
                aux[0][:] = next_iteration

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        with errors.recording("backward", self._thread):
            opts = self._last_opts
            _, backward, extra = self._functions()
            arrays = _Arrays(self.backend, in_data[0], self._inputs)
            if opts.with_label:  # no gradient flows to the label
                label_target = arrays.target(in_grad[1], req[1], self._inputs[1])
                if label_target.buffer is not None and req[1] != "add":
                    label_target.buffer[...] = 0
                pick = (0, 2, 3)
            else:  # label-free form: the class the forward predicted
                pick = (0, 1, 2)
            grad_req = [req[i] for i in pick]
            targets = [arrays.target(in_grad[i], req[i], self._inputs[i]) for i in pick]
            need = tuple(r != "null" for r in grad_req)
            if any(need):
                x, label, mu, s = self._split(arrays.read_all(in_data, self._inputs))
                gz, gl = arrays.read_all(out_grad, self._outputs)
                y = label if opts.with_label else arrays.xp.argmax(
                    arrays.read(out_data[0], self._outputs[0]), axis=1)
                backward(x, y, mu, s, gz, gl, opts, True,
                         need=need, out=tuple(t.buffer for t in targets), **extra)
            arrays.finish(targets)


class _Target:
    """Where a result goes: ``buffer`` is MXNet's own output memory (req write / inplace), a
    temporary added to it at the end (req add), or None (req null)."""

    def __init__(self, view, req, xp):
        self.view = view
        self.req = req
        if req == "null":
            self.buffer = None
        elif req == "add":  # the computation writes every entry: no need to copy the old ones
            self.buffer = xp.empty_like(view)
        else:
            self.buffer = view


class _Arrays:
    """Views of MXNet's NDArray buffers as the arrays a backend computes on, without copies.

    cpu / sim: NumPy arrays over the host memory of the NDArrays the callback gets (inputs
    read-only). gpu: CuPy arrays over MXNet's device buffers through DLPack, on the NDArray's
    device, synchronised once by ``finish``. ``first``: the callback's first input (data), whose
    shape is checked against ``inputs``, the layouts the operator was created with (a layout
    that is None: that view asks MXNet for its array's shape and dtype).
    """

    def __init__(self, backend, first, inputs):
        self.backend = backend
        if backend == "gpu":
            import cupy
            self.xp = cupy
            self._device = cupy.cuda.Device(first.context.device_id)
            self._device.use()  # the callback thread starts on device 0
        else:
            self.xp = np
        if inputs[0] is not None and first.shape != inputs[0][0]:  # pragma: no cover (MXNet's own)
            raise ValueError(f"lgm: data has shape {first.shape}, the operator was created for "
                             f"{inputs[0][0]}")

    def read(self, nd, layout=None):
        if self.backend == "gpu":
            return self.xp.from_dlpack(nd.to_dlpack_for_read())
        view = _host_view(nd, layout)
        view.flags.writeable = False
        return view

    def read_all(self, nds, layouts):
        return [self.read(nd, layout) for nd, layout in zip(nds, layouts)]

    def target(self, nd, req, layout=None):
        if req == "null":
            return _Target(None, req, self.xp)
        if self.backend == "gpu":
            return _Target(self.xp.from_dlpack(nd.to_dlpack_for_write()), req, self.xp)
        return _Target(_host_view(nd, layout), req, self.xp)

    def finish(self, targets):
        for t in targets:
            if t.req == "add":
                t.view += t.buffer
        # MXNet treats outputs as ready once the callback returns: wait for our kernels.
        if self.backend == "gpu":
            self.xp.cuda.get_current_stream().synchronize()


def _layouts(opts, shapes, dtypes):
    """([(shape, dtype) of each input], [that of each output]) from the shapes and dtypes MXNet
    created the operator with; every entry None when they are not given or not all known (each
    view then asks MXNet)."""
    unknown = [None] * (4 if opts.with_label else 3), [None, None]
    if shapes is None or dtypes is None or len(shapes) != len(dtypes):
        return unknown
    inputs = []
    for shape, dtype in zip(shapes, dtypes):
        # MXNet passes its type codes (ints; -1: unknown); NumPy dtypes are taken as they are
        if isinstance(dtype, (int, np.integer)):
            dtype = _MX_TO_NP.get(int(dtype))
        if dtype is None or not shape or min(shape) <= 0:
            return unknown
        inputs.append((tuple(int(e) for e in shape), np.dtype(dtype)))
    n, dtype = inputs[0][0][0], inputs[0][1]
    return inputs, [((n, opts.num_classes), dtype), ((n,), dtype)]


_GET_DATA = mx.base._LIB.MXNDArrayGetData
_MX_TO_NP = mx.ndarray.ndarray._DTYPE_MX_TO_NP


def _host_view(nd, layout=None):
    """A NumPy array over the host memory of a dense CPU NDArray (no copy); ``layout``: its
    (shape, dtype) when known, which saves asking MXNet.

    Inside a custom-op callback the inputs are computed and the outputs are MXNet's own buffers,
    so their memory can be read and written directly (MXNet waits for the callback to return).
    """
    shape, dtype = layout if layout is not None else (nd.shape, np.dtype(nd.dtype))
    count = 1
    for extent in shape:
        count *= extent
    if count == 0:
        return np.empty(shape, dtype)
    ptr = ctypes.c_void_p()
    mx.base.check_call(_GET_DATA(nd.handle, ctypes.byref(ptr)))
    return np.ndarray(shape, dtype, (ctypes.c_byte * (count * dtype.itemsize)).from_address(
        ptr.value))


@mx.operator.register("lgm")
class LGMOpProp(mx.operator.CustomOpProp):
    """Shape/type inference and creation of :class:`LGMOp`; attributes as in SPEC section 3."""

    def __init__(self, **attrs):
        super().__init__(need_top_grad=True)
        # An exception here would abort the process (MXNet calls this from C++ with no handler):
        # keep what went wrong and raise it from the first inference callback, which MXNet reports.
        self._error = None
        self.opts = None
        self.schedule = None
        try:
            self.opts, self.schedule = parse_attributes(attrs)
        except ValueError as exc:
            self._error = exc
        self._with_label = self.opts.with_label if self.opts else str(
            attrs.get("with_label", "True")).strip().lower() not in ("false", "0")
        self._with_aux = bool(self.schedule) and not self.schedule.is_constant

    def _check(self):
        if self._error is not None:
            raise self._error

    def list_arguments(self):
        return ["data", "label", "mean", "log_var"] if self._with_label else [
            "data", "mean", "log_var"]

    def list_outputs(self):
        return ["logits", "lkd"]

    def list_auxiliary_states(self):
        return ["margin_iter"] if self._with_aux else []

    def infer_shape(self, in_shape):
        with errors.recording("infer_shape"):
            self._check()
            shapes = dict(zip(self.list_arguments(), [tuple(s) for s in in_shape]))
            data = shapes["data"]
            if not data:  # unknown (infer_shape_partial): complete it from the others if they tell
                data = self._data_shape_from(shapes)
                if data is None:
                    return self._partial_shapes(shapes)
            if len(data) == 2 and min(data) <= 0:
                raise ValueError(f"lgm: data must have a known, non-zero shape (N, D), got {data} "
                                 "(MXNet 1.x reads a 0 dimension as unknown, so an empty batch "
                                 "cannot be bound)")
            n, dim = check_shapes(self.opts, data,
                                  shapes.get("label") or None,
                                  shapes["mean"] or None, shapes["log_var"] or None)
            mean, log_var = param_shapes(self.opts.num_classes, dim, self.opts.isotropic)
            logits = (n, self.opts.num_classes)
            check_sizes({"data": data, "mean": mean, "log_var": log_var, "logits": logits},
                        _MAX_ELEMENTS, _SIZE_LIMIT)
            args = [data, (n,), mean, log_var] if self._with_label else [data, mean, log_var]
            aux = [(1,)] if self._with_aux else []
            return args, [logits, (n,)], aux

    def _data_shape_from(self, shapes):
        """(N, D) from the label's and the parameters' shapes, or None when they leave it open."""
        n = _batch_size(shapes)
        dims = [shape[1] for name, shape in shapes.items() if name in ("mean", "log_var")
                and len(shape) == 2 and shape[1] > 0 and not (name == "log_var" and
                                                              self.opts.isotropic)]
        return None if n is None or not dims else (n, dims[0])

    def _partial_shapes(self, shapes):
        """What is known while ``data``'s shape is not: unknown shapes stay unknown (())."""
        n = _batch_size(shapes)
        args = [shapes[name] for name in self.list_arguments()]
        outputs = [(n, self.opts.num_classes), (n,)] if n else [(), ()]
        return args, outputs, [(1,)] if self._with_aux else []

    def infer_type(self, in_type):
        with errors.recording("infer_type"):
            self._check()
            types = dict(zip(self.list_arguments(), in_type))
            dtype = check_float_dtype("data", types["data"]).type
            for name in ("mean", "log_var"):
                given = types[name]
                if given is not None and np.dtype(given) != dtype:
                    raise ValueError(f"lgm: {name} must have the dtype of data "
                                     f"({np.dtype(dtype).name}), "
                                     f"got {np.dtype(given).name}")
            args = [dtype] * len(in_type)
            if self._with_label:
                label = types["label"]
                if np.dtype(label).kind not in "fiu":
                    raise ValueError(f"lgm: label must have a real dtype, got {np.dtype(label).name}")
                args[1] = np.dtype(label).type
            # the schedule's counter is float64 whatever the data: it counts exactly to 2^53
            aux = [np.float64] if self._with_aux else []
            return args, [dtype, dtype], aux

    def infer_storage_type(self, in_stype):
        with errors.recording("infer_storage_type"):
            self._check()
            _check_dense(zip(self.list_arguments(), in_stype))
            return (["default"] * len(in_stype), ["default"] * len(self.list_outputs()),
                    ["default"] * len(self.list_auxiliary_states()))

    def infer_storage_type_backward(self, ograd_stype, in_stype, out_stype, igrad_stype,
                                    aux_stype):
        with errors.recording("infer_storage_type_backward"):
            self._check()
            outputs, arguments = self.list_outputs(), self.list_arguments()
            _check_dense(zip([f"the gradient of {name}" for name in outputs], ograd_stype))
            _check_dense(zip([f"the gradient of {name}" for name in arguments], igrad_stype))
            return [["default"] * len(stypes) for stypes in
                    (ograd_stype, in_stype, out_stype, igrad_stype, aux_stype)]


    def create_operator(self, ctx, shapes, dtypes):
        with errors.recording("create_operator"):
            self._check()
            return LGMOp(self.opts, self.schedule, _backend(ctx), shapes, dtypes)


def _batch_size(shapes):
    """N from the label's shape when it is known, else None."""
    label = shapes.get("label", ())
    return label[0] if len(label) == 1 and label[0] > 0 else None


def _check_dense(named_stypes):
    """Every array the operator reads or writes is dense: sparse storage is a clear error."""
    for name, stype in named_stypes:
        if stype not in ("default", "undefined"):
            raise ValueError(f"lgm: {name} must have default (dense) storage, got {stype} "
                             "storage (convert it with .tostype('default'))")
