"""Attributes of the ``lgm`` operator: parsing and validation, framework-free.

MXNet hands every attribute over as a string; the Gluon block and the symbolic builder hand over
Python values. Both go through :func:`parse_options`, which never evaluates its input as code and
names the attribute, the expectation and the value in every error (SPEC section 4).
"""
import dataclasses
import math
from dataclasses import dataclass

__all__ = ["LGMOptions", "parse_options", "ATTRIBUTE_DEFAULTS"]

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


def _parse_bool(name, value):
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key not in _TRUE:
        raise ValueError(f"lgm: attribute {name} must be a boolean (True/False/1/0), got {value!r}")
    return _TRUE[key]


def _parse_float(name, value):
    if isinstance(value, bool):
        raise ValueError(f"lgm: attribute {name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"lgm: attribute {name} must be a real number, got {value!r}") from None


def _parse_int(name, value):
    if isinstance(value, bool):
        raise ValueError(f"lgm: attribute {name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
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


def parse_options(attrs):
    """Parse and validate a mapping of attribute name -> value (strings or Python values).

    Returns an :class:`LGMOptions`; raises ``ValueError`` naming the attribute, the rule and the
    value for an unknown attribute, a missing ``num_classes``, or a value that breaks a rule.
    """
    unknown = sorted(set(attrs) - set(ATTRIBUTE_DEFAULTS))
    if unknown:
        raise ValueError(f"lgm: unknown attribute(s) {', '.join(unknown)}; "
                         f"known: {', '.join(ATTRIBUTE_DEFAULTS)}")
    if "num_classes" not in attrs:
        raise ValueError("lgm: attribute num_classes is required (an integer >= 1)")
    num_classes = _parse_int("num_classes", attrs["num_classes"])
    if num_classes < 1:
        raise ValueError(f"lgm: attribute num_classes must be an integer >= 1, got {num_classes}")
    values = dict(ATTRIBUTE_DEFAULTS, **attrs)
    alpha = _parse_float("alpha", values["alpha"])
    if math.isnan(alpha) or alpha < 0 or math.isinf(alpha):
        raise ValueError(f"lgm: attribute alpha must be a finite float >= 0, got {values['alpha']!r}")
    lo = _parse_float("logvar_min", values["logvar_min"])
    hi = _parse_float("logvar_max", values["logvar_max"])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"lgm: attributes logvar_min < logvar_max must be finite floats, "
                         f"got logvar_min={values['logvar_min']!r}, "
                         f"logvar_max={values['logvar_max']!r}")
    return LGMOptions(
        num_classes=num_classes,
        alpha=alpha,
        logvar_min=lo,
        logvar_max=hi,
        logdet_logits=_parse_bool("logdet_logits", values["logdet_logits"]),
        logdet_lkd=_parse_bool("logdet_lkd", values["logdet_lkd"]),
        isotropic=_parse_bool("isotropic", values["isotropic"]),
        with_label=_parse_bool("with_label", values["with_label"]),
    )
