"""The CPU benchmark's MXNet peers: the L-GM loss as a user would write it from stock operators,
and a Custom operator that does nothing (the floor of the mechanism the ``lgm`` operator uses).

Importing this module imports MXNet and registers ``op_type='lgm_noop'``.
"""
import mxnet as mx
from mxnet.gluon import HybridBlock

__all__ = ["GemmExpansionLGM", "GEMMS", "NOOP_OP_TYPE"]

GEMMS = ("dot", "fully_connected")
NOOP_OP_TYPE = "lgm_noop"


class GemmExpansionLGM(HybridBlock):
    """logits: (N, K) and lkd: (N,) of SPEC section 1, differentiated by autograd, from the GEMM
    expansion of the half squared Mahalanobis distance

        d = 0.5 (x^2 iv^T - 2 x (mu iv)^T + sum_j mu^2 iv)

    Call as ``logits, lkd = block(x, label, mean, log_var)`` with x: (N, D), label: (N,),
    mean: (K, D), log_var: (K, D) (diagonal covariance). ``gemm`` is ``'dot'`` (``F.dot`` with
    ``transpose_b``) or ``'fully_connected'`` (``F.FullyConnected``, which adds the bias in the
    same call). ``training`` fixes whether the margin applies, as ``autograd.record`` would;
    ``dtype`` is the inputs' float dtype (the one-hot mask of the margin is made in it).
    """

    def __init__(self, opts, gemm, training=True, dtype="float32", **kwargs):
        super().__init__(**kwargs)
        if opts.isotropic:
            raise ValueError("GemmExpansionLGM: opts.isotropic must be False (diagonal "
                             "covariance), got True")
        if gemm not in GEMMS:
            raise ValueError(f"GemmExpansionLGM: gemm must be one of {GEMMS}, got {gemm!r}")
        self.opts = opts
        self.gemm = gemm
        self.alpha = opts.margin(training)
        self.dtype = dtype

    def hybrid_forward(self, F, x, label, mean, log_var):
        o = self.opts
        k = o.num_classes
        c = F.clip(log_var, o.logvar_min, o.logvar_max)  # MXNet passes gradient on [min, max]
        iv = F.exp(-c)
        mean_iv = mean * iv
        half_ld = 0.5 * F.sum(c, axis=1)                 # (K,): 0.5 log |Sigma_k|
        # Everything that does not depend on the sample goes into one (K,) bias of the GEMMs,
        # so base = -d - [logdet_logits] half_ld comes out of them with a single (N, K) pass.
        bias = -0.5 * F.sum(mean * mean_iv, axis=1)
        if o.logdet_logits:
            bias = bias - half_ld
        if self.gemm == "dot":
            base = F.broadcast_add(F.dot(F.square(x), -0.5 * iv, transpose_b=True)
                                   + F.dot(x, mean_iv, transpose_b=True), bias.reshape((1, -1)))
        else:
            base = (F.FullyConnected(F.square(x), -0.5 * iv, bias, num_hidden=k)
                    + F.FullyConnected(x, mean_iv, no_bias=True, num_hidden=k))
        # Only the label column differs between logits, lkd and base: work on (N,) vectors there.
        label_base = -F.pick(base, label, axis=1)        # d[i, y_i] + [logdet_logits] half_ld
        if o.logdet_logits == o.logdet_lkd:
            lkd = label_base
        else:
            half_ld_label = F.take(half_ld, label)
            lkd = label_base + (half_ld_label if o.logdet_lkd else -half_ld_label)
        if not self.alpha:
            return base, lkd
        d_label = label_base - F.take(half_ld, label) if o.logdet_logits else label_base
        margin = F.broadcast_mul(F.one_hot(label, k, dtype=self.dtype),
                                 (self.alpha * d_label).reshape((-1, 1)))
        return base - margin, lkd


class _NoOp(mx.operator.CustomOp):
    """Writes zeros where ``req`` asks for a write and nothing otherwise, forward and backward."""

    @staticmethod
    def _zero(dsts, reqs):
        for dst, req in zip(dsts, reqs):
            if req in ("write", "inplace"):
                dst[:] = 0

    def forward(self, is_train, req, in_data, out_data, aux):
        self._zero(out_data, req)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self._zero(in_grad, req)


@mx.operator.register(NOOP_OP_TYPE)
class _NoOpProp(mx.operator.CustomOpProp):
    """The ``lgm`` operator's signature: data (N, D), label (N,), mean (K, D), log_var (K, D)
    in; logits (N, K), lkd (N,) out; upstream gradients requested."""

    def __init__(self, num_classes):
        super().__init__(need_top_grad=True)
        self.num_classes = int(num_classes)

    def list_arguments(self):
        return ["data", "label", "mean", "log_var"]

    def list_outputs(self):
        return ["logits", "lkd"]

    def infer_shape(self, in_shape):
        n, dim = in_shape[0]
        mean = (self.num_classes, dim)
        return [(n, dim), (n,), mean, mean], [(n, self.num_classes), (n,)], []

    def create_operator(self, ctx, shapes, dtypes):
        return _NoOp()
