"""NaN soak: the naive variance parametrisation goes non-finite, the ``lgm`` operator does not.

The failure reported with the first Gluon version of the L-GM loss: with the log-det term on and
the variance learned at the full learning rate, the variance of a class collapses, and
``log(var + 1e-8)`` reaches -inf or, once a step pushes ``var`` below zero, NaN. This script trains
the same small network on a synthetic 2-D Gaussian mixture twice per configuration:

- ``naive``: the loss of SPEC section 1 written with stock MXNet operators on a raw variance
  parameter (initialised to 1), inverse variance ``1 / (var + 1e-8)``, log-det
  ``sum log(var + 1e-8)``; stopped at the first non-finite loss or gradient;
- ``lgm``: the operator (``LGMLoss``), which learns ``log_var`` and clamps it to
  [logvar_min, logvar_max] with no gradient outside the interval.

Both learn the variance with plain SGD at ``--lr`` (``log_var_lr_mult=1``) and the network and the
class means with Adam (bounded steps, so the only unstable parameter is the variance). The network's
output features are multiplied by ``scale`` (1e-3, 1, 1e3) before the loss. At every step of the
``lgm`` run the script checks that the per-sample losses and every gradient are finite, that
entries of ``log_var`` outside the clamp received exactly zero gradient, and that the effective
``clip(log_var)`` lies in the interval.

    python scripts/nan_soak.py --steps 10000 --out soak.json

Prints a table, writes the results as JSON (``--out``); exit status 1 when the operator produced
a non-finite value or the clamp failed.
"""
import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lgm_op  # noqa: E402

NUM_CLASSES = 4
FEATURE_DIM = 2
NAIVE_EPS = 1e-8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10000, help="training steps per configuration")
    p.add_argument("--scales", type=float, nargs="+", default=[1e-3, 1.0, 1e3],
                   help="factors applied to the features")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0], help="margins")
    p.add_argument("--variance", nargs="+", default=["diagonal", "isotropic"],
                   choices=["diagonal", "isotropic"])
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate of the variance")
    p.add_argument("--net-lr", type=float, default=0.01, help="Adam rate of network and means")
    p.add_argument("--lambda", dest="lambda_", type=float, default=1.0,
                   help="weight of the likelihood term")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results here as JSON")
    return p.parse_args(argv)


class Stream:
    """Batches of a 2-D Gaussian mixture: x: (B, 2) around K centres on a circle, y: (B,)."""

    def __init__(self, seed, batch_size):
        self.rng = np.random.default_rng(seed)
        self.batch_size = batch_size
        angles = 2 * np.pi * np.arange(NUM_CLASSES) / NUM_CLASSES
        self.centres = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def next(self):
        y = self.rng.integers(0, NUM_CLASSES, self.batch_size)
        x = self.centres[y] + self.rng.normal(0.0, 1.0, (self.batch_size, 2))
        return mx.nd.array(x), mx.nd.array(y)


def network(seed):
    """Dense(16, tanh) -> Dense(2), initialised from ``seed``."""
    mx.random.seed(seed)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(16, activation="tanh", in_units=2))
    net.add(gluon.nn.Dense(FEATURE_DIM, in_units=16))
    net.initialize(mx.init.Xavier())
    return net


def naive_loss(feat, label, mean, var, alpha, lambda_):
    """Per-sample L-GM loss on a raw variance ``var`` (K, D) or (K, 1), stock operators only."""
    F = mx.nd
    iv = 1.0 / (var + NAIVE_EPS)
    diff = F.broadcast_sub(feat.expand_dims(1), mean.expand_dims(0))       # (N, K, D)
    d = 0.5 * F.sum(F.broadcast_mul(diff * diff, iv.expand_dims(0)), axis=2)  # (N, K)
    log_det = F.sum(F.broadcast_to(F.log(var + NAIVE_EPS), shape=mean.shape), axis=1)  # (K,)
    onehot = F.one_hot(label, NUM_CLASSES)
    logits = F.broadcast_sub(-(1 + alpha * onehot) * d, 0.5 * log_det.expand_dims(0))
    lkd = F.pick(d, label, axis=1) + 0.5 * F.take(log_det, label)
    return -F.pick(F.log_softmax(logits, axis=1), label, axis=1) + lambda_ * lkd


def _finite(*arrays):
    return all(np.isfinite(a.asnumpy()).all() for a in arrays)


def run_naive(cfg, args):
    """Steps until the first non-finite loss or gradient: {'first_nonfinite_step': int or None}."""
    net = network(args.seed)
    mean = gluon.Parameter("mean", shape=(NUM_CLASSES, FEATURE_DIM), init=mx.init.Xavier())
    var = gluon.Parameter("var", shape=(NUM_CLASSES, 1 if cfg["isotropic"] else FEATURE_DIM),
                          init=mx.init.One())
    mx.random.seed(args.seed + 1)
    mean.initialize()
    var.initialize()
    adam = gluon.Trainer(list(net.collect_params().values()) + [mean], "adam",
                         {"learning_rate": args.net_lr})
    sgd = gluon.Trainer([var], "sgd", {"learning_rate": args.lr})
    stream = Stream(args.seed, args.batch_size)
    for step in range(args.steps):
        x, y = stream.next()
        with autograd.record():
            loss = naive_loss(net(x) * cfg["scale"], y, mean.data(), var.data(), cfg["alpha"],
                              args.lambda_)
        loss.backward()
        grads = [p.grad() for p in net.collect_params().values()] + [mean.grad(), var.grad()]
        if not _finite(loss, *grads):
            return {"first_nonfinite_step": step, "min_var": float(var.data().min().asscalar())}
        adam.step(args.batch_size)
        sgd.step(args.batch_size)
    return {"first_nonfinite_step": None, "min_var": float(var.data().min().asscalar())}


def run_lgm(cfg, args):
    """Counts of non-finite losses / gradients and of clamp failures over ``args.steps`` steps."""
    net = network(args.seed)
    block = lgm_op.LGMLoss(NUM_CLASSES, in_units=FEATURE_DIM, lambda_=args.lambda_,
                           alpha=cfg["alpha"], isotropic=cfg["isotropic"], log_var_lr_mult=1.0)
    mx.random.seed(args.seed + 1)
    block.initialize()
    lo, hi = block.opts.logvar_min, block.opts.logvar_max
    adam = gluon.Trainer(list(net.collect_params().values()) + [block.mean], "adam",
                         {"learning_rate": args.net_lr})
    sgd = gluon.Trainer([block.log_var], "sgd", {"learning_rate": args.lr})
    stream = Stream(args.seed, args.batch_size)
    out = {"nonfinite_loss_steps": 0, "nonfinite_grad_steps": 0, "clamp_violations": 0,
           "steps_with_log_var_outside": 0, "log_var_min": np.inf, "log_var_max": -np.inf}
    for _ in range(args.steps):
        x, y = stream.next()
        with autograd.record():
            loss, _ = block(net(x) * cfg["scale"], y)
        loss.backward()
        grads = [p.grad() for p in net.collect_params().values()] + [block.mean.grad()]
        s = block.log_var.data().asnumpy()
        ds = block.log_var.grad().asnumpy()
        out["nonfinite_loss_steps"] += not _finite(loss)
        out["nonfinite_grad_steps"] += not (_finite(*grads) and np.isfinite(ds).all())
        outside = (s < lo) | (s > hi)
        out["steps_with_log_var_outside"] += bool(outside.any())
        # The clamp: no gradient beyond the interval, and the log-det the op uses stays inside it.
        effective = np.clip(s, lo, hi)
        out["clamp_violations"] += int(np.count_nonzero(ds[outside])) + int(
            np.count_nonzero((effective < lo) | (effective > hi)))
        out["log_var_min"] = min(out["log_var_min"], float(s.min()))
        out["log_var_max"] = max(out["log_var_max"], float(s.max()))
        adam.step(args.batch_size)
        sgd.step(args.batch_size)
    s = block.log_var.data().asnumpy()
    out["final_outside_fraction"] = float(((s < lo) | (s > hi)).mean())
    out["final_loss"] = float(loss.mean().asscalar())
    return out


def _git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    args = parse_args(argv)
    configs = [{"scale": s, "alpha": a, "isotropic": v == "isotropic"}
               for s, a, v in itertools.product(args.scales, args.alphas, args.variance)]
    rows = []
    header = (f"{'scale':>7} {'alpha':>5} {'variance':>9} | {'naive: first non-finite':>24} | "
              f"{'lgm: non-finite loss/grad':>25} {'clamp viol.':>11} {'log_var range':>22} "
              f"{'outside@end':>11} {'sec':>6}")
    print(f"{args.steps} steps per configuration, variance SGD lr {args.lr} (lr_mult 1), "
          f"lambda {args.lambda_}, batch {args.batch_size}")
    print(header)
    print("-" * len(header))
    for cfg in configs:
        t0 = time.perf_counter()
        naive = run_naive(cfg, args)
        t1 = time.perf_counter()
        lgm = run_lgm(cfg, args)
        t2 = time.perf_counter()
        row = dict(cfg, steps=args.steps, naive=naive, lgm=lgm, naive_seconds=t1 - t0,
                   lgm_seconds=t2 - t1)
        rows.append(row)
        first = naive["first_nonfinite_step"]
        print(f"{cfg['scale']:>7g} {cfg['alpha']:>5g} "
              f"{'isotropic' if cfg['isotropic'] else 'diagonal':>9} | "
              f"{'step ' + str(first) if first is not None else 'none':>24} | "
              f"{lgm['nonfinite_loss_steps']:>12d}/{lgm['nonfinite_grad_steps']:<12d} "
              f"{lgm['clamp_violations']:>11d} "
              f"{'[%.3g, %.3g]' % (lgm['log_var_min'], lgm['log_var_max']):>22} "
              f"{lgm['final_outside_fraction']:>11.2f} {t2 - t1:>6.1f}", flush=True)
    failed = sum(r["lgm"]["nonfinite_loss_steps"] + r["lgm"]["nonfinite_grad_steps"]
                 + r["lgm"]["clamp_violations"] for r in rows)
    total = sum(r["steps"] for r in rows)
    print(f"lgm: {total} steps, {failed} failures; naive went non-finite in "
          f"{sum(r['naive']['first_nonfinite_step'] is not None for r in rows)} of {len(rows)} "
          "configurations")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "results": rows, "lgm_total_steps": total,
                       "lgm_failures": failed, "machine": {
                           "cpus": os.cpu_count(), "processor": platform.processor(),
                           "python": platform.python_version(), "mxnet": mx.__version__,
                           "numpy": np.__version__}, "git_sha": _git_sha()}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
