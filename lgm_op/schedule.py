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
run continues the schedule where it stopped.
"""
import math
from dataclasses import dataclass

__all__ = ["MarginSchedule", "parse_schedule", "SCHEDULE_DEFAULTS", "POLICIES"]

POLICIES = ("const", "step", "add", "warmup")

SCHEDULE_DEFAULTS = {
    "margin_policy": "const",
    "margin_gamma": 1.0,
    "margin_step": 1000,
    "margin_max": math.inf,
}


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
            return min(alpha * self.gamma ** (t // self.step), self.max)
        if self.policy == "add":
            return min(alpha + self.gamma * (t // self.step), self.max)
        return alpha * min(1.0, t / self.step)

    def to_attrs(self):
        return {"margin_policy": self.policy, "margin_gamma": str(self.gamma),
                "margin_step": str(self.step), "margin_max": str(self.max)}


def parse_schedule(attrs):
    """A :class:`MarginSchedule` from attribute strings (or values); ValueError names the attribute."""
    values = dict(SCHEDULE_DEFAULTS, **attrs)
    policy = str(values["margin_policy"]).strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"lgm: attribute margin_policy must be one of {', '.join(POLICIES)}, "
                         f"got {values['margin_policy']!r}")
    try:
        gamma = float(values["margin_gamma"])
        top = float(values["margin_max"])
    except (TypeError, ValueError):
        raise ValueError(f"lgm: attributes margin_gamma and margin_max must be real numbers, got "
                         f"{values['margin_gamma']!r} and {values['margin_max']!r}") from None
    try:
        step_f = float(values["margin_step"])
    except (TypeError, ValueError):
        step_f = math.nan
    if not (math.isfinite(step_f) and step_f.is_integer() and step_f >= 1):
        raise ValueError(f"lgm: attribute margin_step must be an integer >= 1, "
                         f"got {values['margin_step']!r}")
    if math.isnan(gamma) or math.isinf(gamma) or gamma < 0:
        raise ValueError(f"lgm: attribute margin_gamma must be a finite float >= 0, got {gamma!r}")
    if math.isnan(top) or top < 0:
        raise ValueError(f"lgm: attribute margin_max must be a float >= 0, got {top!r}")
    return MarginSchedule(policy=policy, gamma=gamma, step=int(step_f), max=top)
