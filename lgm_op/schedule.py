"""Margin schedules: how the margin alpha changes with the training iteration. Framework-free.

The policies follow the margin policies of the original L-GM Caffe layer, plus a linear warm-up:

| policy     | alpha at iteration t                                              |
|------------|-------------------------------------------------------------------|
| ``const``  | ``alpha``                                                         |
| ``step``   | ``min(alpha * gamma ** (t // step), max)``  (step-up)             |
| ``add``    | ``min(alpha + gamma * (t // step), max)``   (add-up)              |
| ``warmup`` | ``alpha * min(1, t / step)``                (linear warm-up)      |

The iteration counter lives in the operator's auxiliary state ``margin_iter`` (one number), so it
is saved with every checkpoint (Module ``aux_params``, Gluon ``save_parameters``) and a resumed
run continues the schedule where it stopped. It is stored as float64, which holds every integer
up to 2^53 exactly (float32 stops at 2^24).
"""
import math
import numbers
import sys
from dataclasses import dataclass

__all__ = ["MarginSchedule", "parse_schedule", "check_iteration", "SCHEDULE_DEFAULTS", "POLICIES",
           "MAX_ITERATION"]

POLICIES = ("const", "step", "add", "warmup")

SCHEDULE_DEFAULTS = {
    "margin_policy": "const",
    "margin_gamma": 1.0,
    "margin_step": 1000,
    "margin_max": math.inf,
}

# the largest counter float64 holds exactly (and so the largest that can count on by one)
MAX_ITERATION = 2 ** 53

_LOG_FLOAT_MAX = math.log(sys.float_info.max)


def check_iteration(value):
    """The counter ``margin_iter`` as an int, after checking it is an integer in [0, 2^53].

    A negative, NaN, infinite or fractional value (a damaged checkpoint) is a ValueError that
    names ``margin_iter`` and the value.
    """
    number = float(value)
    if not (math.isfinite(number) and number.is_integer() and 0 <= number <= MAX_ITERATION):
        raise ValueError(f"lgm: margin_iter (the margin schedule's iteration counter) must be an "
                         f"integer in [0, 2^53], got {value!r}")
    return int(number)


@dataclass(frozen=True)
class MarginSchedule:
    """alpha(t) for a base ``alpha`` (see the module's table)."""

    policy: str = "const"
    gamma: float = 1.0
    step: int = 1000
    max: float = math.inf

    @property
    def is_constant(self):
        return self.policy == "const"

    def value(self, alpha, iteration):
        """The margin at ``iteration`` (an int >= 0) for the base value ``alpha``."""
        t = int(iteration)
        if self.policy == "const":
            return alpha
        if self.policy == "step":
            return self._step_up(alpha, t // self.step)
        if self.policy == "add":
            return min(alpha + self.gamma * (t // self.step), self.max)
        return alpha * min(1.0, t / self.step)

    def _step_up(self, alpha, steps):
        # gamma ** steps overflows a float long before the counter ends: whether the cap is
        # reached is decided on logarithms, and the power is formed only where it is finite
        if alpha == 0 or self.gamma == 1 or steps == 0:
            return min(alpha, self.max)
        if self.gamma < 1:  # decays towards 0: underflows, never overflows
            return min(alpha * self.gamma ** steps, self.max)
        if alpha >= self.max:
            return self.max
        log_growth = steps * math.log(self.gamma)
        log_value = math.log(alpha) + log_growth
        if log_value >= min(math.log(self.max), _LOG_FLOAT_MAX):
            return self.max
        return alpha * self.gamma ** steps if log_growth < _LOG_FLOAT_MAX else math.exp(log_value)

    def to_attrs(self):
        return {"margin_policy": self.policy, "margin_gamma": str(self.gamma),
                "margin_step": str(self.step), "margin_max": str(self.max)}


def _number(value, strict, integer=False):
    """A float from an attribute string (``strict``: a Python number); None when it is not one."""
    if isinstance(value, bool):
        return None
    if strict and not isinstance(value, numbers.Integral if integer else numbers.Real):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_schedule(attrs, strict=False):
    """A :class:`MarginSchedule` from attribute strings (``strict``: Python values);
    ValueError names the attribute, the rule and the value."""
    values = dict(SCHEDULE_DEFAULTS, **attrs)
    policy = values["margin_policy"]
    key = policy.strip().lower() if isinstance(policy, str) else None
    if key not in POLICIES:
        raise ValueError(f"lgm: attribute margin_policy must be one of {', '.join(POLICIES)}, "
                         f"got {policy!r}")
    gamma = _number(values["margin_gamma"], strict)
    if gamma is None or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"lgm: attribute margin_gamma must be a finite float >= 0, "
                         f"got {values['margin_gamma']!r}")
    step = _number(values["margin_step"], strict, integer=True)
    if step is None or not (math.isfinite(step) and step.is_integer() and step >= 1):
        raise ValueError(f"lgm: attribute margin_step must be an integer >= 1, "
                         f"got {values['margin_step']!r}")
    top = _number(values["margin_max"], strict)
    if top is None or math.isnan(top) or top < 0:
        raise ValueError(f"lgm: attribute margin_max must be a float >= 0 (inf: no cap), "
                         f"got {values['margin_max']!r}")
    return MarginSchedule(policy=key, gamma=gamma, step=int(step), max=top)
