"""The PyTorch binding: the L-GM loss as a ``torch.library`` custom op, and the ``LGMLoss`` module.

    import lgm_op.torch as lgm_torch
    logits, lkd = lgm_torch.lgm(features, label, mean, log_var, num_classes=10, alpha=0.1)

The op ``lgm_op::lgm_forward`` (data, label or None, mean, log_var, the options, training) returns
``(logits, lkd)``; its backward is the op ``lgm_op::lgm_backward``. Both have fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces them without graph breaks. Eager calls
on plain tensors take ``_LGMFunction``, an ``autograd.Function`` over the same code. The math is
the framework-free code the MXNet operator runs:

- CPU tensors: ``lgm_op.cpu`` on zero-copy NumPy views of the tensors, writing into output
  tensors allocated by PyTorch, with its matrix products through ``torch.mm`` / ``torch.bmm``
  (PyTorch's BLAS on PyTorch's threads, which then share the cores with its other operators
  instead of fighting NumPy's BLAS threads for them); the forward's operands are kept for the
  backward (in a ``CPUState`` owned by the autograd node in eager mode, in a per-thread one,
  checked byte by byte, through the custom op);
- CUDA tensors: ``lgm_op.cuda`` (the kernels of ``kernels/``, through CuPy) on zero-copy DLPack
  views, on the tensor's device and on PyTorch's current stream. Nothing is synchronised here
  but the forward's 4-byte read-back of the label check, so a bad label raises at the call.

Gradients are computed only for the inputs that need them. Bad input raises ``ValueError`` (or
``TypeError`` for an argument that is not a tensor) at the call, with the messages of SPEC
section 4. This module needs no MXNet.
"""
import contextlib
import functools
import math
import os
import threading
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels
from .checks import check_float_dtype, check_shapes
from .cpu import CPUState, lgm_backward_cpu, lgm_forward_cpu
from .cuda import lgm_backward_cuda, lgm_forward_cuda
from .options import parse_options
from .schedule import SCHEDULE_DEFAULTS, check_iteration, parse_schedule

__all__ = ["lgm", "LGMLoss"]

# torch dtypes that have a NumPy counterpart, for the shared dtype checks and messages
_NUMPY_DTYPES = {
    torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
    torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
    torch.uint8: np.uint8, torch.bool: np.bool_, torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _tensor(name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"lgm: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"lgm: {name} must be a dense (strided) tensor, got layout "
                         f"{str(value.layout).replace('torch.', '')}")


def _check_inputs(opts, data, label, mean, log_var):
    """SPEC section 4 for one call, everything but the label values (read by the backends).

    data: (N, D); label: (N,) or None; mean: (K, D); log_var: (K, D) or (K, 1).
    """
    for name, value in (("data", data), ("mean", mean), ("log_var", log_var)):
        _tensor(name, value)
    _tensor("label", label, optional=True)
    if data.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"lgm: data must be float32 or float64, got {_dtype_name(data.dtype)}")
    check_float_dtype("data", _NUMPY_DTYPES[data.dtype])
    for name, value in (("mean", mean), ("log_var", log_var)):
        if value.dtype != data.dtype:
            raise ValueError(f"lgm: {name} must have the dtype of data "
                             f"({_dtype_name(data.dtype)}), got {_dtype_name(value.dtype)}")
    if label is not None and (label.dtype.is_complex or label.dtype == torch.bool):
        raise ValueError(f"lgm: label must have a real dtype, got {_dtype_name(label.dtype)}")
    for name, value in (("label", label), ("mean", mean), ("log_var", log_var)):
        if value is not None and value.device != data.device:
            raise ValueError(f"lgm: {name} must be on the device of data ({data.device}), "
                             f"got {value.device}")
    if data.device.type not in ("cpu", "cuda"):
        raise ValueError(f"lgm: data must be on a cpu or cuda device, got {data.device}")
    check_shapes(opts, tuple(data.shape), None if label is None else tuple(label.shape),
                 tuple(mean.shape), tuple(log_var.shape))


@functools.lru_cache(maxsize=256)
def _opts(num_classes, alpha, logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic,
          with_label):
    # cached: a training loop calls the ops with the same few option sets at every step
    return parse_options(dict(num_classes=num_classes, alpha=alpha, logvar_min=logvar_min,
                              logvar_max=logvar_max, logdet_logits=logdet_logits,
                              logdet_lkd=logdet_lkd, isotropic=isotropic, with_label=with_label))


def _call_options(num_classes, with_label, options):
    """parse_options for a call of :func:`lgm`, cached by value and type (so 1 and True, equal
    as keys, are parsed apart); values that cannot be keys are parsed at every call."""
    if not torch.compiler.is_compiling():  # (Dynamo traces the parse itself, not a cache)
        key = (num_classes, type(num_classes), with_label,
               tuple(sorted((name, type(value), value) for name, value in options.items())))
        try:
            hash(key)
        except TypeError:
            pass
        else:
            return _cached_options(key)
    return parse_options(dict(options, num_classes=num_classes, with_label=with_label))


@functools.lru_cache(maxsize=256)
def _cached_options(key):
    num_classes, _, with_label, items = key
    return parse_options(dict(((name, value) for name, _, value in items),
                              num_classes=num_classes, with_label=with_label))


def _flat(opts):
    """The options as the op's scalar arguments, in its schema's order (with_label excluded)."""
    return (opts.num_classes, opts.alpha, opts.logvar_min, opts.logvar_max, opts.logdet_logits,
            opts.logdet_lkd, opts.isotropic)


# ---------------------------------------------------------------------------------------------
# zero-copy views for the framework-free backends

def _numpy(tensor):
    return None if tensor is None else tensor.detach().numpy()


@contextlib.contextmanager
def _on_cuda(tensor):
    """CuPy on the tensor's GPU and on PyTorch's current stream there, and a DLPack view maker."""
    import cupy
    device = tensor.device.index
    stream = torch.cuda.current_stream(tensor.device)
    with cupy.cuda.Device(device), cupy.cuda.ExternalStream(stream.cuda_stream, device):
        # cupy.from_dlpack hands the tensor CuPy's current stream (PyTorch's own), so PyTorch
        # inserts no wait and no copy
        yield lambda t: None if t is None else cupy.from_dlpack(t.detach())


def _torch_matmul(a, b, out):
    """out = a @ b for the CPU path's NumPy arrays (views, possibly strided or transposed), by
    torch.mm, or torch.bmm for a batch (3-D), on zero-copy tensors over them. The batch of the
    forward's two products (S and A) in one torch.bmm takes 0.83-0.95x the time of two torch.mm
    calls at 128x100x384 to 512x10000x512, 0.3x at small sizes (MKL, 2 cores, interleaved)."""
    product = torch.bmm if a.ndim == 3 else torch.mm
    product(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
    return out


_torch_matmul.batched = True   # lgm_op.cpu: the forward's two products as one batch


# the CPU path's saved operands, one holder per thread (a backward on another thread, or after
# another forward, finds other inputs there and builds its own)
_cpu_states = threading.local()


def _cpu_state():
    state = getattr(_cpu_states, "state", None)
    if state is None:
        state = _cpu_states.state = CPUState()
    return state


def _call(functions, tensors, *args, out, state=None, **kwargs):
    """Run the CPU or the CUDA function of ``functions`` on views of ``tensors`` (the leading
    array arguments, entries may be None), then ``args``, writing into the tensors ``out``.
    state: the CPU path's ``CPUState`` for this call (default: the thread's)."""
    cpu_function, cuda_function = functions
    if tensors[0].device.type == "cpu":
        cpu_function(*map(_numpy, tensors), *args, out=tuple(map(_numpy, out)),
                     state=_cpu_state() if state is None else state, **kwargs)
        return
    with _on_cuda(tensors[0]) as view:
        cuda_function(*map(view, tensors), *args, out=tuple(map(view, out)), **kwargs)


# The CPU passes run on several threads from this many elements on a PyTorch caller's thread
# (the process-wide default is 2^20, for MXNet, whose OpenMP threads sleep between operators):
# PyTorch's OpenMP threads, which the passes share, spin for a while after each of its parallel
# operators, so a region costs little there. Not under OMP_WAIT_POLICY=PASSIVE, where waking them
# costs what it costs MXNet.
_PARALLEL_WORK = 1 << 15
_threads = threading.local()


def _passes_threads():
    if getattr(_threads, "ready", False):
        return
    _threads.ready = True
    lib = cpu_kernels.kernels()
    if lib is not None and os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE":
        lib.set_thread_parallel_work(_PARALLEL_WORK)


def _forward_cpu(*args, **kwargs):
    _passes_threads()
    return lgm_forward_cpu(*args, matmul=_torch_matmul, **kwargs)


def _backward_cpu(*args, **kwargs):
    _passes_threads()
    return lgm_backward_cpu(*args, matmul=_torch_matmul, **kwargs)


_FORWARD = (_forward_cpu, lgm_forward_cuda)
_BACKWARD = (_backward_cpu, lgm_backward_cuda)


# ---------------------------------------------------------------------------------------------
# the two custom ops

@torch.library.custom_op("lgm_op::lgm_forward", mutates_args=())
def lgm_forward(data: Tensor, label: Optional[Tensor], mean: Tensor, log_var: Tensor,
                num_classes: int, alpha: float, logvar_min: float, logvar_max: float,
                logdet_logits: bool, logdet_lkd: bool, isotropic: bool,
                training: bool) -> Tuple[Tensor, Tensor]:
    """SPEC section 1: logits (N, K) and lkd (N,) for data (N, D), label (N,) of any real dtype or
    None (the label-free form: no margin, lkd of the predicted class), mean (K, D), log_var (K, D)
    or (K, 1) when isotropic. The margin applies when ``training`` and a label is given."""
    opts = _opts(num_classes, alpha, logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic,
                 label is not None)
    return _forward(data, label, mean, log_var, opts, training)


def _forward(data, label, mean, log_var, opts, training, state=None):
    """The forward of both entry points (the custom op and the eager ``_LGMFunction``)."""
    _check_inputs(opts, data, label, mean, log_var)
    n = data.shape[0]
    logits = data.new_empty((n, opts.num_classes))
    lkd = data.new_empty((n,))
    _call(_FORWARD, (data, label, mean, log_var), opts, training, out=(logits, lkd), state=state)
    return logits, lkd


@lgm_forward.register_fake
def _lgm_forward_fake(data, label, mean, log_var, num_classes, alpha, logvar_min, logvar_max,
                      logdet_logits, logdet_lkd, isotropic, training):
    opts = _opts(num_classes, alpha, logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic,
                 label is not None)
    _check_inputs(opts, data, label, mean, log_var)
    n = data.shape[0]
    return data.new_empty((n, num_classes)), data.new_empty((n,))


@torch.library.custom_op("lgm_op::lgm_backward", mutates_args=())
def lgm_backward(data: Tensor, label: Tensor, mean: Tensor, log_var: Tensor, grad_logits: Tensor,
                 grad_lkd: Tensor, num_classes: int, alpha: float, logvar_min: float,
                 logvar_max: float, logdet_logits: bool, logdet_lkd: bool, isotropic: bool,
                 with_label: bool, training: bool, need_data: bool, need_mean: bool,
                 need_log_var: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """SPEC section 2: (d data (N, D), d mean (K, D), d log_var like log_var); a gradient that is
    not needed is an empty tensor of shape (0,) and costs nothing. label: (N,) the labels, or for
    the label-free form (``with_label=False``) the classes the forward predicted."""
    opts = _opts(num_classes, alpha, logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic,
                 with_label)
    return _backward_call(data, label, mean, log_var, grad_logits, grad_lkd, opts, training,
                          (need_data, need_mean, need_log_var))


def _backward_call(data, label, mean, log_var, grad_logits, grad_lkd, opts, training, need,
                   state=None, placeholder=True):
    """The backward of both entry points: the three gradients; for one that is not needed an
    empty (0,) tensor (the op's schema returns three tensors), or None without ``placeholder``."""
    grads = _backward_outputs(data, mean, log_var, need, placeholder)
    _call(_BACKWARD, (data, label, mean, log_var, grad_logits, grad_lkd), opts, training,
          need=need, out=tuple(g if wanted else None for g, wanted in zip(grads, need)),
          state=state)
    return grads


def _backward_outputs(data, mean, log_var, need, placeholder=True):
    return tuple(like.new_empty(like.shape) if wanted else
                 (like.new_empty((0,)) if placeholder else None)
                 for like, wanted in zip((data, mean, log_var), need))


@lgm_backward.register_fake
def _lgm_backward_fake(data, label, mean, log_var, grad_logits, grad_lkd, num_classes, alpha,
                       logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic, with_label,
                       training, need_data, need_mean, need_log_var):
    return _backward_outputs(data, mean, log_var, (need_data, need_mean, need_log_var))


def _setup_context(ctx, inputs, output):
    data, label, mean, log_var, *options, training = inputs
    ctx.options = tuple(options)
    ctx.training = training
    ctx.with_label = label is not None
    if label is None:  # label-free form: the backward differentiates the predicted classes
        label = torch.argmax(output[0], dim=1)
    ctx.save_for_backward(data, label, mean, log_var)


def _backward(ctx, grad_logits, grad_lkd):
    data, label, mean, log_var = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    if not any(need):
        return (None,) * 12
    grads = lgm_backward(data, label, mean, log_var, grad_logits, grad_lkd, *ctx.options,
                         ctx.with_label, ctx.training, *need)
    dx, dmu, ds = (g if wanted else None for g, wanted in zip(grads, need))
    return (dx, None, dmu, ds) + (None,) * 8


lgm_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the eager entry point

class _LGMFunction(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager calls on plain CPU and CUDA
    tensors. A custom op's call passes through the dispatcher twice (its autograd and its
    backend kernels, forward and backward): about 0.2 ms a step more than this Function (measured
    fwd+bwd of no-op bodies, 280-320 us against 110-120 us), which at 128 x 100 x 384 is a tenth
    of the step. Under ``torch.compile`` and ``torch.jit.trace``, for tensor subclasses
    (FakeTensor and the like), under dispatch or function modes and for functorch transforms
    :func:`_apply` calls the custom op.

    The CPU path's operands live in a ``CPUState`` owned by this node: autograd's version checks
    guarantee the saved inputs are unchanged at the backward, so they are reused without the
    copy and comparison the custom op's per-thread state needs."""

    @staticmethod
    def forward(ctx, data, label, mean, log_var, opts, training):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        state = CPUState(owned=True) if any(need) and data.device.type == "cpu" else None
        logits, lkd = _forward(data, label, mean, log_var, opts, training, state=state)
        ctx.state = state
        ctx.opts, ctx.training = opts, training
        if label is None:  # label-free form: the backward differentiates the predicted classes
            label = torch.argmax(logits, dim=1)
        ctx.save_for_backward(data, label, mean, log_var)
        return logits, lkd

    @staticmethod
    def backward(ctx, grad_logits, grad_lkd):
        data, label, mean, log_var = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        if not any(need):
            return (None,) * 6
        opts = ctx.opts  # its with_label tells the label-free form (label: the predicted classes)
        if torch.is_grad_enabled():
            # create_graph=True: the backward op, whose gradients' graph refuses a second
            # backward (no formula is registered) instead of treating them as constants
            grads = lgm_backward(data, label, mean, log_var, grad_logits, grad_lkd, *_flat(opts),
                                 opts.with_label, ctx.training, *need)
        else:
            grads = _backward_call(data, label, mean, log_var, grad_logits, grad_lkd, opts,
                                   ctx.training, need, state=ctx.state, placeholder=False)
            # the operands' buffers go back now, not when the graph is collected: the next
            # step's forward then finds the same (cache-warm) memory. A second backward
            # (retain_graph=True) builds them again.
            ctx.state = None
        dx, dmu, ds = (g if wanted else None for g, wanted in zip(grads, need))
        return dx, None, dmu, ds, None, None


_PLAIN = (Tensor, nn.Parameter)


def _eager(tensors):
    """Whether a call on ``tensors`` may take ``_LGMFunction`` (else the custom op)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or (
            torch._C._is_torch_function_mode_enabled() or torch.jit.is_tracing()):
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.device.type not in ("cpu", "cuda") or
                              torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


def _apply(data, label, mean, log_var, opts, training):
    """``(logits, lkd)`` through ``_LGMFunction`` in eager mode, else the custom op."""
    if _EAGER_FUNCTION and _eager((data, label, mean, log_var)):
        return _LGMFunction.apply(data, label, mean, log_var, opts, training)
    return lgm_forward(data, label, mean, log_var, *_flat(opts), training)


# False: every call through the custom op (the tests run both ways)
_EAGER_FUNCTION = True


# ---------------------------------------------------------------------------------------------
# the functional form and the module

def lgm(data, label, mean, log_var, num_classes, training=True, **options):
    """``(logits, lkd)`` of SPEC section 1, differentiable with respect to data, mean, log_var.

    data: (N, D) float32/float64; label: (N,) class ids of any real dtype, or None for the
    label-free form (no margin; lkd of the predicted class); mean: (K, D); log_var: (K, D), or
    (K, 1) with ``isotropic=True``. training: whether the margin applies. options: alpha,
    logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic (the operator's attributes).
    Returns logits: (N, K), lkd: (N,).
    """
    if "with_label" in options:
        raise ValueError("lgm: the label-free form is chosen by label=None, not by with_label")
    opts = _call_options(num_classes, label is not None, options)
    if not isinstance(training, bool):
        raise TypeError(f"lgm: training must be a bool, got {type(training).__name__}")
    # the dispatcher would reject a non-tensor with a RuntimeError: name the argument first
    for name, value in (("data", data), ("mean", mean), ("log_var", log_var)):
        _tensor(name, value)
    _tensor("label", label, optional=True)
    return _apply(data, label, mean, log_var, opts, training)


def _load_counter(module, state_dict, prefix, *args):
    """Keep the module's step count in step with a loaded ``margin_iter``, after checking it."""
    key = prefix + "margin_iter"
    if key in state_dict:
        module._iteration = check_iteration(state_dict[key])


class LGMLoss(nn.Module):
    """Per-sample L-GM loss ``CE(softmax(logits), y) + lambda * lkd`` and the logits.

    ``loss, logits = module(features, label)`` with features: (N, D), label: (N,) class ids;
    loss: (N,), logits: (N, K). The margin applies in training mode (``module.train()``) only.

    num_classes: K. in_units: D. lambda_: weight of the likelihood term. log_var_lr_mult: the
    learning-rate multiplier of the log-variance in :meth:`parameter_groups` (the variance needs a
    lower rate). Other keyword options are the operator's attributes (alpha, logvar_min,
    logvar_max, logdet_logits, logdet_lkd, isotropic) and the margin schedule (margin_policy,
    margin_gamma, margin_step, margin_max; see ``lgm_op.schedule``).

    Parameters, initialised as the MXNet block does: ``mean`` (K, D) Xavier-uniform, ``log_var``
    (K, D) or (K, 1) zeros (variance 1). With a margin schedule, the buffer ``margin_iter`` counts
    the training steps and is saved in the ``state_dict``, so a resumed run continues the schedule.
    Under ``torch.compile`` a schedule that changes the margin recompiles when it changes.
    """

    def __init__(self, num_classes, in_units, lambda_=0.1, log_var_lr_mult=0.1, **options):
        super().__init__()
        if isinstance(in_units, bool) or not isinstance(in_units, int) or in_units < 1:
            raise ValueError(f"LGMLoss: in_units must be an integer >= 1, got {in_units!r}")
        for name, value in (("lambda_", lambda_), ("log_var_lr_mult", log_var_lr_mult)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"LGMLoss: {name} must be a finite float >= 0, got {value!r}")
        if "with_label" in options:
            raise ValueError("LGMLoss: with_label is not an option of the loss (it needs labels)")
        # a misspelled schedule name goes to parse_options, which reports it as unknown
        schedule_keys = set(options) & set(SCHEDULE_DEFAULTS)
        self.opts = parse_options(dict({k: v for k, v in options.items()
                                        if k not in schedule_keys}, num_classes=num_classes))
        self.schedule = parse_schedule({k: options[k] for k in schedule_keys})
        self.lambda_ = float(lambda_)
        self.log_var_lr_mult = float(log_var_lr_mult)
        k = self.opts.num_classes
        self.mean = nn.Parameter(torch.empty(k, in_units))
        self.log_var = nn.Parameter(torch.zeros(k, 1 if self.opts.isotropic else in_units))
        # the MXNet block's mx.init.Xavier(): uniform, fan average, magnitude 3
        nn.init.xavier_uniform_(self.mean)
        self._iteration = 0
        if not self.schedule.is_constant:
            self.register_buffer("margin_iter", torch.zeros((), dtype=torch.int64))
            self.register_load_state_dict_pre_hook(_load_counter)

    def parameter_groups(self, lr):
        """Optimizer parameter groups: ``mean`` at ``lr``; ``log_var`` at ``lr * log_var_lr_mult``
        and without weight decay, as the MXNet block's parameters are."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                math.isfinite(lr) and lr >= 0):
            raise ValueError(f"LGMLoss: lr must be a finite float >= 0, got {lr!r}")
        return [{"params": [self.mean], "lr": float(lr)},
                {"params": [self.log_var], "lr": float(lr) * self.log_var_lr_mult,
                 "weight_decay": 0.0}]

    def margin(self):
        """The margin the next training step uses (the schedule's value at ``margin_iter``)."""
        return self.schedule.value(self.opts.alpha, self._iteration)

    def forward(self, features, label):
        _tensor("label", label)
        opts = self.opts
        if self.training and not self.schedule.is_constant:
            opts = opts.replace_alpha(self.margin())
        logits, lkd = _apply(features, label, self.mean, self.log_var, opts, self.training)
        if self.training and not self.schedule.is_constant:
            # only a step that got this far moves the schedule (a rejected batch raised above)
            self._iteration += 1
            self.margin_iter.fill_(self._iteration)
        ce = F.cross_entropy(logits, label.long(), reduction="none")
        return ce + self.lambda_ * lkd, logits
