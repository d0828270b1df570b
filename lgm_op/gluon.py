"""The Gluon block: ``LGMLoss`` owns the class means and log-variances and returns the loss."""
import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, Parameter

from .options import check_argument
from .symbol import lgm_attributes

__all__ = ["LGMLoss"]


class _IterationCounter(Parameter):
    """The margin schedule's counter ``margin_iter`` (1,), float64 so it counts exactly to 2^53.

    Checkpoints written before it was float64 hold it as float32; such a counter is an integer
    below 2^24 (float32 counted no further), so widening it on load is exact.
    """

    def _load_init(self, data, ctx, cast_dtype=False, dtype_source="current"):
        if data.dtype == np.float32:
            data = data.astype(np.float64)
        super()._load_init(data, ctx, cast_dtype=cast_dtype, dtype_source=dtype_source)


class LGMLoss(HybridBlock):
    """Per-sample L-GM loss ``CE(softmax(logits), y) + lambda * lkd`` and the logits.

    Call as ``loss, logits = block(features, label)`` with features: (N, D), label: (N,);
    loss: (N,), logits: (N, K). Works imperatively and hybridized.

    num_classes: K (an int >= 1). in_units: D (an int; 0 defers it to the first call). lambda_:
    weight of the likelihood term (a finite float >= 0). log_var_lr_mult: learning-rate
    multiplier of the log-variance (a finite float >= 0; the variance needs a lower rate). Other
    keyword options are the operator's attributes (alpha, logvar_min, logvar_max, logdet_logits,
    logdet_lkd, isotropic, margin_policy, margin_gamma, margin_step, margin_max), validated here.
    """

    def __init__(self, num_classes, in_units=0, lambda_=0.1, log_var_lr_mult=0.1, prefix=None,
                 params=None, **options):
        super().__init__(prefix=prefix, params=params)
        self.lambda_ = check_argument("LGMLoss", "lambda_", lambda_)
        log_var_lr_mult = check_argument("LGMLoss", "log_var_lr_mult", log_var_lr_mult)
        in_units = check_argument("LGMLoss", "in_units", in_units, integer=True)
        self._attrs, self.opts, self.schedule = lgm_attributes(num_classes, **options)
        if not self.opts.with_label:
            raise ValueError("LGMLoss: with_label must be True (the loss needs labels), got False")
        k = self.opts.num_classes
        with self.name_scope():
            self.mean = self.params.get("mean", shape=(k, in_units),
                                        init=mx.init.Xavier(), allow_deferred_init=True)
            self.log_var = self.params.get("log_var", shape=(k, 1 if self.opts.isotropic
                                                             else in_units),
                                           init=mx.init.Zero(), lr_mult=log_var_lr_mult,
                                           wd_mult=0.0, allow_deferred_init=True)
            if not self.schedule.is_constant:
                self.margin_iter = self._counter()

    def _counter(self):
        name = self.params.prefix + "margin_iter"
        shared = self.params._get_impl(name)  # pylint: disable=protected-access
        if shared is not None:
            return shared
        counter = _IterationCounter(name, shape=(1,), dtype=np.float64, init=mx.init.Zero(),
                                    grad_req="null", differentiable=False)
        self.params._params[name] = counter  # pylint: disable=protected-access
        return counter

    def cast(self, dtype):
        """Cast ``mean`` and ``log_var``; the schedule's counter stays float64."""
        super().cast(dtype)
        if not self.schedule.is_constant:
            self.margin_iter.cast(np.float64)

    def hybrid_forward(self, F, x, label, mean, log_var, margin_iter=None):
        inputs = [x, label, mean, log_var] + ([] if margin_iter is None else [margin_iter])
        out = F.Custom(*inputs, op_type="lgm", **self._attrs)
        logits, lkd = out[0], out[1]
        ce = -F.pick(F.log_softmax(logits, axis=1), label, axis=1)
        return ce + self.lambda_ * lkd, logits
