"""The demo: the L-GM loss against softmax cross-entropy on MNIST digits, with 2-D features.

``python -m lgm_op.demo`` (or ``bash scripts/demo.sh``) trains a LeNet++-style network in a
symbolic ``Module`` graph four ways (the full L-GM loss, its likelihood term without the log-det,
no likelihood term, plain softmax), draws the learned feature distributions with the class
Gaussians, scores abnormal inputs by their likelihood, and writes figures, ``summary.json`` and a
checkpoint (with the margin schedule's state) to ``--out``.

Modules: ``data`` (the shipped digits, an IDX reader, abnormal inputs), ``network`` (the graphs),
``train`` (Module training and prediction), ``scores`` (likelihood score, AUROC), ``plots``,
``cli`` (the command line).
"""
