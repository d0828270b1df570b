"""Prediction with a checkpoint the demo wrote: :func:`load_predictor`.

    from lgm_op.demo import load_predictor
    predictor = load_predictor("lgm-out/lgm-full")    # the latest epoch of the full variant
    out = predictor(pixels)      # pixels: (M, 28, 28), (M, 784) or (M, 1, 28, 28), 0..255
    out.label, out.score         # (M,) digits, and -max_k logits (higher: less like a digit)

The checkpoint holds the training graph (with its label input and margin); the predictor runs
the label-free deployment form of the same network on the checkpoint's parameters, with the
input scaling the network was trained on, as the run record ``{prefix}-run.json`` describes.
"""
from dataclasses import dataclass

import numpy as np

from .data import IMAGE_SHAPE, normalize
from .scores import likelihood_score
from .train import Settings, load_checkpoint, predict, read_run_record

__all__ = ["Prediction", "Predictor", "load_predictor"]

PIXELS = int(np.prod(IMAGE_SHAPE))


@dataclass(frozen=True)
class Prediction:
    """features: (M, feature_dim) network features; logits: (M, 10) of the label-free graph."""

    features: np.ndarray
    logits: np.ndarray

    @property
    def label(self):
        """(M,) the predicted digits, ``argmax_k logits``."""
        return np.argmax(self.logits, axis=1)

    @property
    def score(self):
        """(M,) the likelihood score ``-max_k logits``: higher means less like a digit."""
        return likelihood_score(self.logits)


@dataclass(frozen=True)
class Predictor:
    """A trained demo model: ``variant``, its ``settings`` and parameters from ``epoch``."""

    variant: str
    settings: Settings
    arg_params: dict
    aux_params: dict
    epoch: int

    def __call__(self, pixels, batch_size=500):
        """The :class:`Prediction` of ``pixels``: M images as MNIST stores them, values 0..255,
        shaped (M, 28, 28), (M, 784) or (M, 1, 28, 28)."""
        pixels = np.asarray(pixels)
        if pixels.shape[1:] not in ((PIXELS,), IMAGE_SHAPE[1:], IMAGE_SHAPE) or len(pixels) == 0:
            raise ValueError(f"pixels must have shape (M, 28, 28), (M, 784) or (M, 1, 28, 28) "
                             f"with M >= 1, got {pixels.shape}")
        if not np.issubdtype(pixels.dtype, np.number) or np.issubdtype(pixels.dtype,
                                                                       np.complexfloating):
            raise ValueError(f"pixels must be real numbers 0..255, got dtype {pixels.dtype}")
        low, high = float(pixels.min()), float(pixels.max())
        if not (0.0 <= low and high <= 255.0):  # also refuses NaN
            raise ValueError(f"pixels must be in 0..255 (unscaled, as MNIST stores them), got "
                             f"values from {low} to {high}")
        features, logits = predict(self, self.settings, normalize(pixels), batch_size)
        return Prediction(features, logits)


def load_predictor(prefix, epoch=None, ctx="cpu"):
    """A :class:`Predictor` of the checkpoint ``{prefix}-NNNN.params`` that ``python -m
    lgm_op.demo`` wrote (``prefix`` e.g. ``lgm-out/lgm-full`` or ``lgm-out/lgm-detector``);
    ``epoch``: None for the latest; ``ctx``: ``"cpu"`` or ``"gpu"``."""
    if ctx not in ("cpu", "gpu"):
        raise ValueError(f"ctx must be 'cpu' or 'gpu', got {ctx!r}")
    record = read_run_record(prefix)
    settings = Settings(**dict(record["settings"], ctx=ctx))
    _, arg_params, aux_params, epoch = load_checkpoint(prefix, epoch)
    return Predictor(record["variant"], settings, arg_params, aux_params, epoch)
