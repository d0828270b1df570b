"""Attributes of the ``lgm`` operator: parsing and validation, framework-free.

MXNet hands every attribute over as a string; the Gluon block and the symbolic builder hand over
Python values. Every front end goes through :func:`parse_attributes`, which knows every attribute
(the margin schedule's included), never evaluates its input as code and names the attribute, the
expectation and the value in every error (SPEC section 4). MXNet's own node attributes, the names
of the form ``__name__`` (``__ctx_group__`` from ``mx.AttrScope(ctx_group=...)``, ``__layout__``,
``__lr_mult__``), are accepted and ignored.
"""
import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .schedule import SCHEDULE_DEFAULTS, parse_schedule

__all__ = ["LGMOptions", "parse_attributes", "parse_options", "check_argument", "ATTRIBUTE_DEFAULTS",
           "KNOWN_ATTRIBUTES", "MAX_NUM_CLASSES", "is_framework_attribute"]

# name -> default; ``num_classes`` has none and must be given.
ATTRIBUTE_DEFAULTS = {
    "num_classes": None,
    "alpha": 0.1,
    "logvar_min": -6.0,
    "logvar_max": 6.0,
    "logdet_logits": True,
    "logdet_lkd": True,
    "isotropic": False,
    "with_label": True,
}

# every name an ``lgm`` node takes, in the order error messages list them
KNOWN_ATTRIBUTES = tuple(ATTRIBUTE_DEFAULTS) + tuple(SCHEDULE_DEFAULTS)

# MXNet 1.x stores shapes as int32: K is a dimension of the logits (N, K) and of mean (K, D)
MAX_NUM_CLASSES = 2 ** 31 - 1

_TRUE = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class LGMOptions:
    """Validated attributes of one ``lgm`` node.

    num_classes: K, the number of Gaussian components (classes).
    alpha: the margin added to the true class's distance while training.
    logvar_min, logvar_max: the closed interval the log-variance is clamped to.
    logdet_logits, logdet_lkd: whether ``-0.5 log|Sigma_k|`` enters the logits / the likelihood term.
    isotropic: ``log_var`` is (K, 1), one variance per class, instead of (K, D).
    with_label: False for the label-free deployment form (no ``label`` argument).
    """

    num_classes: int
    alpha: float = 0.1
    logvar_min: float = -6.0
    logvar_max: float = 6.0
    logdet_logits: bool = True
    logdet_lkd: bool = True
    isotropic: bool = False
    with_label: bool = True

    def margin(self, training):
        """The margin in effect: ``alpha`` while training with labels, else 0."""
        return self.alpha if (training and self.with_label) else 0.0

    def replace_alpha(self, alpha):
        """A copy with another margin (the value a schedule gives at this iteration)."""
        return self if alpha == self.alpha else dataclasses.replace(self, alpha=float(alpha))

    def to_attrs(self):
        """The attributes as the strings MXNet stores in a symbol."""
        return {name: str(getattr(self, name)) for name in ATTRIBUTE_DEFAULTS}


def is_framework_attribute(name):
    """Whether ``name`` is one of MXNet's own node attributes (``__ctx_group__``, ``__layout__``)."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _parse_bool(name, value, strict):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if not strict:
        key = str(value).strip().lower()
        if key in _TRUE:
            return _TRUE[key]
    spelled = "True or False" if strict else "True/False/1/0"
    raise ValueError(f"lgm: attribute {name} must be a boolean ({spelled}), got {value!r}")


def _parse_float(name, value, strict):
    if isinstance(value, bool) or (strict and not isinstance(value, numbers.Real)):
        raise ValueError(f"lgm: attribute {name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"lgm: attribute {name} must be a real number, got {value!r}") from None


def _parse_int(name, value, strict):
    if isinstance(value, bool) or (strict and not isinstance(value, numbers.Integral)):
        raise ValueError(f"lgm: attribute {name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        as_float = float(text)
    except ValueError:
        raise ValueError(f"lgm: attribute {name} must be an integer, got {value!r}") from None
    if not as_float.is_integer():
        raise ValueError(f"lgm: attribute {name} must be an integer, got {value!r}")
    return int(as_float)


def check_argument(owner, name, value, integer=False):
    """A builder's or block's numeric argument (not an attribute) as a float (``integer``: an int),
    after checking it is a finite number >= 0 of a number type; ValueError names ``owner``."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind) or not (
            math.isfinite(value) and value >= 0):
        what = "an integer >= 0" if integer else "a finite float >= 0"
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    return int(value) if integer else float(value)


def parse_attributes(attrs, strict=False):
    """Parse and validate a mapping of attribute name -> value: the one parser of every front end.

    attrs: the operator's attributes, margin schedule included; names of the form ``__name__``
    (MXNet's own) are ignored. strict: the values are Python values from a builder or block, so
    a number or a boolean given as a string is an error; False: MXNet's attribute strings.

    Returns ``(LGMOptions, MarginSchedule)``; raises ``ValueError`` naming the attribute, the rule
    and the value for an unknown attribute, a missing ``num_classes``, or a value that breaks a rule.
    """
    attrs = {k: v for k, v in attrs.items() if not is_framework_attribute(k)}
    unknown = sorted(set(attrs) - set(KNOWN_ATTRIBUTES))
    if unknown:
        raise ValueError(f"lgm: unknown attribute(s) {', '.join(unknown)}; "
                         f"known: {', '.join(KNOWN_ATTRIBUTES)}")
    if "num_classes" not in attrs:
        raise ValueError("lgm: attribute num_classes is required (an integer >= 1)")
    num_classes = _parse_int("num_classes", attrs["num_classes"], strict)
    if num_classes < 1:
        raise ValueError(f"lgm: attribute num_classes must be an integer >= 1, got {num_classes}")
    if num_classes > MAX_NUM_CLASSES:
        raise ValueError(f"lgm: attribute num_classes must be at most {MAX_NUM_CLASSES} (MXNet's "
                         f"shapes are int32), got {num_classes}")
    values = dict(ATTRIBUTE_DEFAULTS, **attrs)
    alpha = _parse_float("alpha", values["alpha"], strict)
    if math.isnan(alpha) or alpha < 0 or math.isinf(alpha):
        raise ValueError(f"lgm: attribute alpha must be a finite float >= 0, got {values['alpha']!r}")
    lo = _parse_float("logvar_min", values["logvar_min"], strict)
    hi = _parse_float("logvar_max", values["logvar_max"], strict)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"lgm: attributes logvar_min < logvar_max must be finite floats, "
                         f"got logvar_min={values['logvar_min']!r}, "
                         f"logvar_max={values['logvar_max']!r}")
    opts = LGMOptions(
        num_classes=num_classes,
        alpha=alpha,
        logvar_min=lo,
        logvar_max=hi,
        logdet_logits=_parse_bool("logdet_logits", values["logdet_logits"], strict),
        logdet_lkd=_parse_bool("logdet_lkd", values["logdet_lkd"], strict),
        isotropic=_parse_bool("isotropic", values["isotropic"], strict),
        with_label=_parse_bool("with_label", values["with_label"], strict),
    )
    schedule = parse_schedule({k: v for k, v in attrs.items() if k in SCHEDULE_DEFAULTS}, strict)
    return opts, schedule


def parse_options(attrs):
    """The :class:`LGMOptions` of :func:`parse_attributes` (the schedule's names are validated too)."""
    return parse_attributes(attrs)[0]
