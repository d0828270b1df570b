"""The demo's symbolic graphs: a LeNet++-style network with a 2-D feature and its four heads.

LeNet++ (Wen et al., 2016) stacks three stages of two 5x5 convolutions with PReLU and a 2x2 max-pool
(32-32 / 64-64 / 128-128 channels) and ends in a fully connected layer to a 2-D feature, so that
the feature distribution can be drawn. ``width`` scales the channels (the demo's default is
narrower to train on a laptop CPU in minutes); ``feature_dim`` widens the feature for the
demo's abnormal-input detector (see ``lgm_op.demo.cli``).
"""
import mxnet as mx

import lgm_op

__all__ = ["VARIANTS", "VARIANT_TITLES", "NUM_CLASSES", "FEATURE_DIM", "features",
           "training_symbol", "evaluation_symbol", "lgm_options"]

NUM_CLASSES = 10
FEATURE_DIM = 2

# variant -> (operator options, whether the likelihood term is trained); None: softmax baseline.
VARIANTS = {
    "full": ({}, True),
    "nologdet": ({"logdet_lkd": False}, True),
    "nolkd": ({}, False),
    "softmax": None,
}
VARIANT_TITLES = {
    "full": "L-GM loss",
    "nologdet": "L-GM, likelihood without log-det",
    "nolkd": "L-GM, no likelihood term (λ = 0)",
    "softmax": "softmax cross-entropy (baseline)",
}


def _prelu(x, name):
    # Initialised explicitly: the default initialisers set any "*_gamma" to 1 (a linear unit).
    gamma = mx.sym.Variable(f"{name}_gamma", init=mx.init.Constant(0.25))
    return mx.sym.LeakyReLU(x, gamma=gamma, act_type="prelu", name=name)


def features(data, width=32, feature_dim=FEATURE_DIM):
    """The LeNet++ trunk: data (N, 1, 28, 28) -> feature (N, feature_dim), named ``feature``."""
    x = data
    for stage, channels in enumerate((width, 2 * width, 4 * width), start=1):
        for part in "ab":
            name = f"conv{stage}{part}"
            x = mx.sym.Convolution(x, kernel=(5, 5), pad=(2, 2), num_filter=channels, name=name)
            x = _prelu(x, f"prelu{stage}{part}")
        x = mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max", name=f"pool{stage}")
    return mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=feature_dim, name="feature")


def lgm_options(variant, alpha, margin_policy="const", margin_gamma=1.0, margin_step=1000,
                margin_max=float("inf")):
    """The ``lgm`` node's options for an L-GM ``variant`` (margin schedule included)."""
    options, _ = VARIANTS[variant]
    schedule = {}
    if margin_policy != "const":
        schedule = dict(margin_policy=margin_policy, margin_gamma=margin_gamma,
                        margin_step=margin_step, margin_max=margin_max)
    return dict(options, alpha=alpha, **schedule)


def training_symbol(variant, width, lambda_, log_var_lr_mult, feature_dim=FEATURE_DIM,
                    **lgm_kwargs):
    """The training graph of ``variant``.

    Outputs: ``softmax_output`` (N, 10) class probabilities and, for the L-GM variants,
    ``lkd_loss_output`` (N,) = lambda * lkd. The L-GM heads apply the margin from ``lgm_kwargs``
    (see :func:`lgm_options`); ``nolkd`` keeps the likelihood output with weight 0 so that all
    L-GM variants share one graph.
    """
    data = mx.sym.Variable("data")
    label = mx.sym.Variable("softmax_label")
    feat = features(data, width, feature_dim)
    if VARIANTS[variant] is None:
        logits = mx.sym.FullyConnected(feat, num_hidden=NUM_CLASSES, name="fc_logits")
        return mx.sym.SoftmaxOutput(logits, label, name="softmax")
    _, with_lkd = VARIANTS[variant]
    logits, lkd = lgm_op.lgm(feat, label, NUM_CLASSES, name="lgm",
                             log_var_lr_mult=log_var_lr_mult, **lgm_options(variant, **lgm_kwargs))
    weight = lambda_ if with_lkd else 0.0
    return mx.sym.Group([mx.sym.SoftmaxOutput(logits, label, name="softmax"),
                         mx.sym.MakeLoss(weight * lkd, name="lkd_loss")])


def evaluation_symbol(variant, width, alpha, feature_dim=FEATURE_DIM):
    """The label-free prediction graph: outputs ``feature`` (N, feature_dim), ``logits`` (N, 10).

    For the L-GM variants this is the operator's deployment form (no label, no margin), so
    ``-max_k logits`` is the negative log-likelihood score of an input under its best class.
    """
    feat = features(mx.sym.Variable("data"), width, feature_dim)
    if VARIANTS[variant] is None:
        logits = mx.sym.FullyConnected(feat, num_hidden=NUM_CLASSES, name="fc_logits")
    else:
        options, _ = VARIANTS[variant]
        logits, _ = lgm_op.lgm(feat, None, NUM_CLASSES, name="lgm", alpha=alpha, **options)
    return mx.sym.Group([feat, logits])
