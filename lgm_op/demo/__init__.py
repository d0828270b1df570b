"""The demo: the L-GM loss against softmax cross-entropy on MNIST digits, with 2-D features.

``python -m lgm_op.demo`` (or ``bash scripts/demo.sh``) trains a LeNet++-style network in a
symbolic ``Module`` graph four ways (the full L-GM loss, its likelihood term without the log-det,
no likelihood term, plain softmax) and draws the learned feature distributions with the class
Gaussians. Beside them it trains a detector, the full L-GM loss with an 8-D feature, and scores
abnormal inputs by their likelihood under it and under the 2-D full variant. Figures,
``summary.json`` and checkpoints (with the margin schedule's state) go to ``--out``.

Modules: ``data`` (the shipped digits, an IDX reader, abnormal inputs), ``network`` (the graphs),
``train`` (Module training and prediction), ``scores`` (likelihood score, AUROC), ``plots``,
``cli`` (the command line).
"""
