"""The symbolic builder: parameters and the ``lgm`` Custom node for Module graphs.

    feat = ...                                    # (N, D) features
    logits, lkd = lgm_op.lgm(feat, label, num_classes=10)
    net = mx.sym.Group([mx.sym.SoftmaxOutput(logits, label, name="softmax"),
                        mx.sym.MakeLoss(0.1 * lkd, name="lkd_loss")])
"""
import mxnet as mx

from .options import check_argument, parse_attributes

__all__ = ["lgm", "lgm_attributes"]


def lgm_attributes(num_classes, **options):
    """The Custom node's attributes as strings, validated now (a ValueError names the bad one).

    options: alpha, logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic, with_label,
    margin_policy, margin_gamma, margin_step, margin_max, as Python values (a number or a
    boolean given as a string is an error). Returns (attrs, LGMOptions, MarginSchedule).
    """
    opts, schedule = parse_attributes(dict(options, num_classes=num_classes), strict=True)
    attrs = opts.to_attrs()
    if not schedule.is_constant:
        attrs.update(schedule.to_attrs())
    return attrs, opts, schedule


def lgm(data, label, num_classes, name="lgm", mean=None, log_var=None, log_var_lr_mult=0.1,
        **options):
    """Build ``(logits, lkd)`` for ``data`` (N, D) and ``label`` (N,) (None: label-free form).

    Creates the variables ``{name}_mean`` (K, D), initialised like a dense layer's weight
    (Xavier), and ``{name}_log_var`` (K, D) or (K, 1), initialised to 0 (variance 1), with
    ``lr_mult=log_var_lr_mult`` (the variance wants a lower learning rate) and no weight decay,
    unless ``mean`` / ``log_var`` symbols are given. With a margin schedule it also creates the
    auxiliary state ``{name}_margin_iter`` (float64). ``options`` are the operator's attributes.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"lgm: name must be a non-empty string, got {name!r}")
    check_argument("lgm", "log_var_lr_mult", log_var_lr_mult)
    attrs, opts, schedule = lgm_attributes(
        num_classes, **dict({"with_label": label is not None}, **options))
    if label is not None and not opts.with_label:
        raise ValueError("lgm: the label-free form (with_label=False) takes no label, got label "
                         f"{label.name if isinstance(label, mx.sym.Symbol) else label!r}; "
                         "pass label=None")
    if label is None and opts.with_label:
        raise ValueError("lgm: with_label=True needs a label symbol, got label=None (pass "
                         "label=None without with_label for the label-free form)")
    if mean is None:
        mean = mx.sym.Variable(f"{name}_mean", init=mx.init.Xavier())
    if log_var is None:
        log_var = mx.sym.Variable(f"{name}_log_var", init=mx.init.Zero(),
                                  lr_mult=log_var_lr_mult, wd_mult=0.0)
    inputs = [data] + ([label] if opts.with_label else []) + [mean, log_var]
    if not schedule.is_constant:
        inputs.append(mx.sym.Variable(f"{name}_margin_iter", init=mx.init.Zero(),
                                      dtype="float64"))
    node = mx.sym.Custom(*inputs, op_type="lgm", name=name, **attrs)
    return node[0], node[1]
