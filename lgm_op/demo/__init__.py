"""The demo: the L-GM loss against softmax cross-entropy on MNIST digits, with 2-D features.

``python -m lgm_op.demo`` (or ``bash scripts/demo.sh``) trains a LeNet++-style network in a
symbolic ``Module`` graph four ways (the full L-GM loss, its likelihood term without the log-det,
no likelihood term, plain softmax) and draws the learned feature distributions with the class
Gaussians. Beside them it trains a detector, the full L-GM loss with an 8-D feature, and scores
abnormal inputs by their likelihood under it and under the 2-D full variant. Figures,
``summary.json``, per-epoch checkpoints (with the margin schedule's state) and run records go to
``--out``; ``--resume`` continues an interrupted run; :func:`load_predictor` predicts with a
checkpoint.

Modules: ``data`` (the shipped digits, MNIST IDX files, abnormal inputs), ``network`` (the
graphs), ``train`` (Module training, checkpoints, prediction), ``predictor`` (a checkpoint as a
predictor), ``scores`` (likelihood score, AUROC), ``plots``, ``cli`` (the command line).
"""
from .predictor import Prediction, Predictor, load_predictor

__all__ = ["load_predictor", "Predictor", "Prediction"]
