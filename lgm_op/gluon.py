"""The Gluon block: ``LGMLoss`` owns the class means and log-variances and returns the loss."""
import mxnet as mx
from mxnet.gluon import HybridBlock

from .symbol import lgm_attributes

__all__ = ["LGMLoss"]


class LGMLoss(HybridBlock):
    """Per-sample L-GM loss ``CE(softmax(logits), y) + lambda * lkd`` and the logits.

    Call as ``loss, logits = block(features, label)`` with features: (N, D), label: (N,);
    loss: (N,), logits: (N, K). Works imperatively and hybridized.

    num_classes: K. in_units: D (0 defers it to the first call). lambda_: weight of the
    likelihood term. log_var_lr_mult: learning-rate multiplier of the log-variance (the variance
    needs a lower rate). Other keyword options are the operator's attributes (alpha, logvar_min,
    logvar_max, logdet_logits, logdet_lkd, isotropic, margin_policy, margin_gamma, margin_step,
    margin_max), validated here.
    """

    def __init__(self, num_classes, in_units=0, lambda_=0.1, log_var_lr_mult=0.1, prefix=None,
                 params=None, **options):
        super().__init__(prefix=prefix, params=params)
        if not lambda_ >= 0:
            raise ValueError(f"LGMLoss: lambda_ must be a float >= 0, got {lambda_!r}")
        self._attrs, self.opts, self.schedule = lgm_attributes(num_classes, **options)
        if not self.opts.with_label:
            raise ValueError("LGMLoss: with_label must be True (the loss needs labels)")
        self.lambda_ = float(lambda_)
        log_var_units = 1 if self.opts.isotropic else in_units
        with self.name_scope():
            self.mean = self.params.get("mean", shape=(num_classes, in_units),
                                        init=mx.init.Xavier(), allow_deferred_init=True)
            self.log_var = self.params.get("log_var", shape=(num_classes, log_var_units),
                                           init=mx.init.Zero(), lr_mult=log_var_lr_mult,
                                           wd_mult=0.0, allow_deferred_init=True)
            if not self.schedule.is_constant:
                self.margin_iter = self.params.get("margin_iter", shape=(1,), init=mx.init.Zero(),
                                                   grad_req="null", differentiable=False)

    def hybrid_forward(self, F, x, label, mean, log_var, margin_iter=None):
        inputs = [x, label, mean, log_var] + ([] if margin_iter is None else [margin_iter])
        out = F.Custom(*inputs, op_type="lgm", **self._attrs)
        logits, lkd = out[0], out[1]
        ce = -F.pick(F.log_softmax(logits, axis=1), label, axis=1)
        return ce + self.lambda_ * lkd, logits
