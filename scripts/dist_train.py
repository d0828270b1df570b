"""Data-parallel training of a small network with the L-GM loss on MXNet's parameter server.

One script for every role, as MXNet's ``tools/launch.py`` expects: a process started with
``DMLC_ROLE=scheduler`` or ``DMLC_ROLE=server`` becomes that node when it imports MXNet (and exits
when the job ends); with ``DMLC_ROLE=worker`` it trains. Without ``DMLC_ROLE`` and with
``--kvstore local`` it is the single-process run the distributed one must reproduce.

Every worker draws the same global batch of ``--batch-size`` samples at each step (from
``--seed`` and the step number) and trains on its own contiguous slice (rank r of W takes rows
[r*B/W, (r+1)*B/W)); ``Trainer.step`` is given the global batch size, so W workers take the same
steps as one process on the union of their slices. The parameters are initialised from
``--seed`` on every node, so the run is reproducible end to end.

    # single process, the reference
    python scripts/dist_train.py --kvstore local --out /tmp/lgm-ref
    # one worker of a distributed job (scheduler/server/workers: see docs/reliability.md)
    DMLC_ROLE=worker DMLC_PS_ROOT_URI=10.0.0.1 DMLC_PS_ROOT_PORT=9091 DMLC_NUM_SERVER=1 \\
        DMLC_NUM_WORKER=2 DMLC_NODE_HOST=10.0.0.2 python scripts/dist_train.py --out /tmp/lgm-dist

Writes ``{out}/params_rank{r}.npz`` (every parameter by its name, margin_iter included) and
``{out}/log_rank{r}.json`` (the per-step mean loss and the run's configuration).
"""
import argparse
import json
import math
import os
import sys

# A scheduler or server node starts serving inside this import and never returns from it.
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lgm_op  # noqa: E402  (registers op_type='lgm')

IN_UNITS = 4


def _number(kind, low, below=None):
    """An argparse type: ``kind`` (int or float) >= ``low`` (and < ``below``), finite."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (
                below is not None and value >= below):
            rule = f">= {low}" + ("" if below is None else f" and < {below}")
            raise argparse.ArgumentTypeError(f"must be a finite {kind.__name__} {rule}, "
                                             f"got {text!r}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kvstore", default="dist_sync",
                   choices=("dist_sync", "dist_device_sync", "dist_async", "local"),
                   help="a distributed kvstore, or local for a single process")
    p.add_argument("--update-on-kvstore", action="store_true",
                   help="run the optimizer on the servers (default: on the workers, after the "
                        "gradients are summed across workers)")
    p.add_argument("--steps", type=_number(int, 1), default=6)
    p.add_argument("--batch-size", type=_number(int, 1), default=32,
                   help="global batch, split over workers")
    p.add_argument("--num-classes", type=_number(int, 1), default=4)
    p.add_argument("--dim", type=_number(int, 1), default=3, help="feature dimension D")
    p.add_argument("--lr", type=_number(float, 0), default=0.1)
    p.add_argument("--momentum", type=_number(float, 0, below=1), default=0.9)
    p.add_argument("--seed", type=_number(int, 0), default=7)
    p.add_argument("--out", required=True, help="folder for params_rank{r}.npz / log_rank{r}.json")
    return p.parse_args(argv)


def build(args):
    """(net, loss block, all parameters): Dense(16, tanh) -> Dense(D) -> LGMLoss(K, D)."""
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Dense(16, activation="tanh", in_units=IN_UNITS))
        net.add(gluon.nn.Dense(args.dim, in_units=16))
    loss_block = lgm_op.LGMLoss(args.num_classes, in_units=args.dim, lambda_=0.1, alpha=0.2,
                                log_var_lr_mult=0.5, margin_policy="step", margin_gamma=2.0,
                                margin_step=2, prefix="lgm_")
    params = gluon.ParameterDict()
    params.update(net.collect_params())
    params.update(loss_block.collect_params())
    params.initialize(mx.init.Zero(), ctx=mx.cpu())
    rng = np.random.default_rng(args.seed)
    for name in sorted(params.keys()):
        p = params[name]
        if name.endswith("log_var"):
            value = rng.uniform(-0.5, 0.5, p.shape)
        elif name.endswith("margin_iter"):
            value = np.zeros(p.shape)
        else:
            value = rng.normal(0.0, 0.5, p.shape)
        p.set_data(mx.nd.array(value, dtype=p.dtype))
    return net, loss_block, params


def global_batch(args, step):
    """x: (B, IN_UNITS) drawn around one centre per class, y: (B,) float32 labels."""
    rng = np.random.default_rng([args.seed, step])
    y = rng.integers(0, args.num_classes, args.batch_size)
    centres = np.random.default_rng(args.seed).normal(0.0, 2.0, (args.num_classes, IN_UNITS))
    x = centres[y] + rng.normal(0.0, 1.0, (args.batch_size, IN_UNITS))
    return x.astype(np.float32), y.astype(np.float32)


def train(args):
    """Run ``args.steps`` steps; returns (rank, number of workers, {name: array}, [mean loss])."""
    net, loss_block, params = build(args)
    kv = mx.kv.create(args.kvstore) if args.kvstore.startswith("dist") else None
    optimizer = mx.optimizer.SGD(learning_rate=args.lr, momentum=args.momentum)
    # margin_iter is an auxiliary counter that each worker advances in its forward pass: it is
    # no gradient, so it stays out of the Trainer (and off the parameter server).
    param_list = [params[name] for name in sorted(params.keys())
                  if params[name].grad_req != "null"]  # the Trainer's index order
    if args.update_on_kvstore:
        # The optimizer is pickled to the servers without Trainer's parameter table, so the
        # Parameter lr_mult / wd_mult (log_var's lower rate) would be lost there; the optimizer's
        # own tables, keyed by the Trainer's parameter index, travel with it.
        optimizer.set_lr_mult({i: p.lr_mult for i, p in enumerate(param_list)})
        optimizer.set_wd_mult({i: p.wd_mult for i, p in enumerate(param_list)})
    trainer = gluon.Trainer(param_list, optimizer, kvstore=kv if kv is not None else args.kvstore,
                            update_on_kvstore=args.update_on_kvstore if kv is not None else None)
    rank, workers = (kv.rank, kv.num_workers) if kv is not None else (0, 1)
    if args.batch_size % workers:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of "
                         f"workers {workers}")
    share = args.batch_size // workers
    if kv is not None and not args.update_on_kvstore:
        # The Trainer sets its kvstore up inside the first step(): it broadcasts each weight
        # under key i and, in the same call, pushes and pulls the gradient under that same key.
        # With the updates on the workers, the first update then went wrong on every worker at
        # once in 4 of 20 runs (6 of 15 with stock layers and no lgm at all), never under
        # MXNet's NaiveEngine: the two transfers are evidently not ordered. Setting the kvstore
        # up and waiting for the broadcast before the first step orders them (0 of 22 runs
        # wrong; docs/reliability.md, section 5).
        trainer._init_kvstore()
        trainer._init_params()
        mx.nd.waitall()
    losses = []
    for step in range(args.steps):
        x, y = global_batch(args, step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        with autograd.record():
            loss, _ = loss_block(net(mx.nd.array(x)), mx.nd.array(y))
        loss.backward()
        trainer.step(args.batch_size)  # the global batch: W workers sum to one full-batch step
        losses.append(float(loss.mean().asscalar()))
    mx.nd.waitall()
    values = {name: p.data().asnumpy() for name, p in params.items()}
    return rank, workers, values, losses


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rank, workers, values, losses = train(args)
    np.savez(os.path.join(args.out, f"params_rank{rank}.npz"), **values)
    with open(os.path.join(args.out, f"log_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "num_workers": workers, "losses": losses,
                   "config": vars(args)}, f, indent=1)
    print(f"rank {rank}/{workers}: {args.steps} steps, final mean loss {losses[-1]:.6f}")


if __name__ == "__main__":
    main()
