"""Training and prediction with MXNet's symbolic ``Module``, one variant at a time.

A checkpointed run writes after every epoch the Module checkpoint ``{prefix}-NNNN.params`` and
``.states`` (parameters, the margin schedule's counter, the optimizer's momentum) and the run
record ``{prefix}-run.json``: the variant, the settings, the data and, per epoch, the optimizer's
update count, the loss, the training accuracy and the non-finite steps. A resumed run reads both
back and takes the remaining epochs on the same learning-rate schedule, so that it ends where the
uninterrupted run would have ended.
"""
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from tqdm import tqdm

from .network import VARIANTS, evaluation_symbol, training_symbol

__all__ = ["Settings", "TrainResult", "ResumeError", "train_variant", "predict",
           "load_checkpoint", "latest_checkpoint_epoch", "read_run_record", "resume_epoch",
           "seed_everything", "OPTIMIZERS"]

DATA_NAMES = ["data"]
LABEL_NAMES = ["softmax_label"]
RUN_RECORD_SUFFIX = "-run.json"
# What a resumed run may change: the device (its numbers differ by rounding only).
RESUMABLE_CHANGES = ("ctx",)


@dataclass(frozen=True)
class Settings:
    """Everything a training run depends on (the command line, less where output goes).

    ``epochs`` is the length of the whole run, which the learning-rate schedule spans; a resumed
    run trains the epochs its checkpoint has not done yet.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    optimizer: str
    clip_gradient: float
    wd: float
    lambda_: float
    alpha: float
    width: int
    feature_dim: int
    log_var_lr_mult: float
    margin_policy: str
    margin_gamma: float
    margin_step: int
    margin_max: float
    seed: int
    ctx: str

    def context(self):
        return mx.gpu(0) if self.ctx == "gpu" else mx.cpu()

    def margin_kwargs(self):
        return dict(alpha=self.alpha, margin_policy=self.margin_policy,
                    margin_gamma=self.margin_gamma, margin_step=self.margin_step,
                    margin_max=self.margin_max)


@dataclass
class TrainResult:
    """What training one variant produced; ``arg_params``, ``aux_params``: the learned values.

    ``epoch_losses`` (one mean loss per epoch), ``train_accuracy`` (of the last epoch),
    ``nonfinite_steps``, ``steps`` and ``epochs_done`` cover the whole run, the epochs of a
    checkpoint it resumed from included; ``seconds`` is the time this call trained.
    """

    variant: str
    module: mx.mod.Module
    arg_params: dict
    aux_params: dict
    epoch_losses: list
    train_accuracy: float
    nonfinite_steps: int
    steps: int
    epochs_done: int
    seconds: float

    @property
    def final_loss(self):
        """The mean loss of the last epoch (NaN where no step of it was finite)."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")

    def log_var(self):
        """The learned log-variances (K, D), or None for the softmax baseline."""
        value = self.arg_params.get("lgm_log_var")
        return None if value is None else value.asnumpy()

    def means(self):
        """The learned class means (K, D), or None for the softmax baseline."""
        value = self.arg_params.get("lgm_mean")
        return None if value is None else value.asnumpy()


class ResumeError(ValueError):
    """A checkpointed run cannot be resumed; ``setting`` names the :class:`Settings` field (or
    ``data`` / ``train_digits``) that differs from the run's, where one does."""

    def __init__(self, message, setting=None):
        super().__init__(message)
        self.setting = setting


def seed_everything(seed):
    """Seed NumPy's global generator and MXNet's (the initialisers draw from MXNet's)."""
    np.random.seed(seed)
    mx.random.seed(seed)


def _batches(x, y, batch_size, seed, epoch, ctx):
    # The order of epoch e depends only on (seed, e): every variant sees the same batches, and a
    # resumed run continues with the orders it would have seen. The incomplete last batch is
    # dropped; the next epoch's shuffle brings those digits back.
    order = np.random.RandomState([seed, epoch]).permutation(len(y))
    for start in range(0, len(y) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield mx.io.DataBatch(data=[mx.nd.array(x[idx], ctx=ctx)],
                              label=[mx.nd.array(y[idx], ctx=ctx)])


def _all_finite(arrays):
    return all(np.isfinite(a.asnumpy()).all() for a in arrays)


def _batch_loss(outputs, label):
    """The batch's mean loss CE + lambda * lkd from the graph's outputs, and whether all are finite.

    The cross-entropy is read from the softmax probabilities; a probability that underflows to 0
    (a confidently wrong sample) is floored at the smallest float32 so the reported loss stays a
    number while the gradient, which SoftmaxOutput computes from the probabilities, is unaffected.
    """
    probs = outputs[0].asnumpy()
    finite = bool(np.isfinite(probs).all())
    p_true = probs[np.arange(len(label)), label.astype(np.int64)]
    loss = -np.log(np.maximum(p_true, np.finfo(np.float32).tiny)).mean()
    if len(outputs) > 1:
        weighted_lkd = outputs[1].asnumpy()
        finite = finite and bool(np.isfinite(weighted_lkd).all())
        loss += weighted_lkd.mean()
    return float(loss), finite


def _log_var_range(module):
    arg_params, _ = module.get_params()
    log_var = arg_params.get("lgm_log_var")
    if log_var is None:
        return None
    values = log_var.asnumpy()
    return float(values.min()), float(values.max())


def _checkpoint_epochs(prefix):
    """The epochs saved under ``prefix`` (``prefix-NNNN.params``)."""
    folder, stem = os.path.split(prefix)
    epochs = []
    for name in os.listdir(folder or "."):
        head, _, tail = name.rpartition("-")
        if head == stem and tail.endswith(".params") and tail[:-7].isdigit():
            epochs.append(int(tail[:-7]))
    return epochs


def latest_checkpoint_epoch(prefix):
    """The largest epoch saved under ``prefix`` (``prefix-NNNN.params``), or None."""
    return max(_checkpoint_epochs(prefix), default=None)


def load_checkpoint(prefix, epoch=None):
    """(symbol, arg_params, aux_params, epoch) of a Module checkpoint (the latest by default)."""
    epoch = latest_checkpoint_epoch(prefix) if epoch is None else epoch
    if epoch is None:
        raise FileNotFoundError(f"no checkpoint {prefix}-NNNN.params")
    symbol, arg_params, aux_params = mx.model.load_checkpoint(prefix, epoch)
    return symbol, arg_params, aux_params, epoch


def read_run_record(prefix):
    """The run record ``{prefix}-run.json`` that a checkpointed run writes after every epoch."""
    path = prefix + RUN_RECORD_SUFFIX
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise ResumeError(f"no run record {path} (written after each epoch of a run)") from None
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path} cannot be read as a run record: {exc}") from None
    if not (isinstance(record, dict) and {"variant", "settings", "data", "train_digits",
                                          "history"} <= set(record)):
        raise ResumeError(f"{path} is not a run record (no variant, settings, data, "
                          f"train_digits and history)")
    return record


def _run_identity(variant, settings, digits):
    """What a resumed run must share with the run it continues."""
    return {"variant": variant,
            "settings": {k: v for k, v in dataclasses.asdict(settings).items()
                         if k not in RESUMABLE_CHANGES},
            "data": digits.source, "train_digits": int(len(digits.train_y))}


def resume_epoch(prefix, variant, settings, digits):
    """The epoch that the run under ``prefix`` resumes from: its latest one with both a
    checkpoint and an entry in the run record (a run stopped between the two writes loses that
    epoch only).

    Raises :class:`ResumeError` where the run was started as another variant, with other
    settings (but ``ctx``) or on other digits, where no epoch is saved, or where the run has
    done all ``settings.epochs`` epochs.
    """
    record = read_run_record(prefix)
    want = _run_identity(variant, settings, digits)
    for key in ("variant", "data", "train_digits"):
        if record[key] != want[key]:
            raise ResumeError(f"{prefix}: the run was started with {key} {record[key]!r}, "
                              f"this one has {want[key]!r}", setting=key)
    for name, value in want["settings"].items():
        if record["settings"].get(name) != value:
            raise ResumeError(f"{prefix}: the run was started with {name} "
                              f"{record['settings'].get(name)!r}, this one has {value!r}",
                              setting=name)
    saved = set(_checkpoint_epochs(prefix)) & {entry["epoch"] for entry in record["history"]}
    if not saved:
        raise ResumeError(f"{prefix}: no epoch has both a checkpoint {prefix}-NNNN.params and "
                          f"an entry in {prefix}{RUN_RECORD_SUFFIX}")
    epoch = max(saved)
    if epoch >= settings.epochs:
        raise ResumeError(f"{prefix}: the run has done all of its {settings.epochs} epochs "
                          f"(checkpoint {epoch}); nothing to resume")
    return epoch


def _save_epoch(module, prefix, identity, history):
    """Checkpoint the Module after epoch ``history[-1]['epoch']``, then the run record."""
    # Module reads the auxiliary states (the margin counter) with no ordering against the
    # operator that writes them.
    mx.nd.waitall()
    module.save_checkpoint(prefix, history[-1]["epoch"], save_optimizer_states=True)
    path = prefix + RUN_RECORD_SUFFIX
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(dict(identity, history=history), f, indent=1)
    os.replace(path + ".tmp", path)


OPTIMIZERS = ("sgd", "adam")


def optimizer_params(settings, schedule):
    """The optimizer's parameters: learning rate and its schedule, weight decay, momentum (SGD)
    and, when ``settings.clip_gradient`` > 0, element-wise clipping of the batch-mean gradient."""
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                         f"got {settings.optimizer!r}")
    params = dict(learning_rate=settings.lr, wd=settings.wd, lr_scheduler=schedule)
    if settings.optimizer == "sgd":
        params["momentum"] = settings.momentum
    if settings.clip_gradient > 0:
        params["clip_gradient"] = settings.clip_gradient
    return params


def _training_module(variant, settings, ctx, checkpoint_prefix, resume, digits):
    """(Module, epochs done, history of the epochs done) of a fresh or a resumed run."""
    if not resume:
        symbol = training_symbol(variant, settings.width, settings.lambda_,
                                 settings.log_var_lr_mult, settings.feature_dim,
                                 **settings.margin_kwargs())
        return mx.mod.Module(symbol, DATA_NAMES, LABEL_NAMES, context=ctx), 0, []
    epoch = resume_epoch(checkpoint_prefix, variant, settings, digits)
    history = [e for e in read_run_record(checkpoint_prefix)["history"] if e["epoch"] <= epoch]
    # Module.load restores the parameters, the auxiliary states (the margin schedule's counter
    # among them) and the optimizer's momentum; the update count comes from the run record.
    module = mx.mod.Module.load(checkpoint_prefix, epoch, load_optimizer_states=True,
                                data_names=DATA_NAMES, label_names=LABEL_NAMES, context=ctx)
    return module, epoch, history


def _epoch_line(module, metric, losses):
    """loss, training accuracy and log-variance range of the epoch so far, for the progress."""
    fields = {"loss": f"{np.mean(losses):.4f}" if losses else "nan",
              "train acc": f"{metric.get()[1]:.4f}"}
    log_var_range = _log_var_range(module)
    if log_var_range is not None:
        fields["log_var"] = f"[{log_var_range[0]:+.2f}, {log_var_range[1]:+.2f}]"
    return fields


def train_variant(variant, digits, settings, checkpoint_prefix=None, resume=False,
                  progress=True, position=0, label=None):
    """Train ``variant`` on ``digits`` for the run of ``settings.epochs`` epochs; a
    :class:`TrainResult`.

    Uses ``settings.optimizer`` (SGD with momentum by default, see :func:`optimizer_params`)
    with a one-epoch warm-up and a cosine learning-rate decay over the run. A step whose loss or
    gradients are not finite is counted and not applied; a step after which a parameter is not
    finite is counted too. With ``checkpoint_prefix`` the Module and the run record are saved
    after every epoch; with ``resume`` too, training continues from the latest of them (see
    :func:`resume_epoch`) and takes the run's remaining epochs, bitwise as the uninterrupted run
    would on the same device. ``progress`` writes a line after each epoch headed by ``label``
    (default: the variant's name) and, when stderr is a terminal, shows a bar per epoch (on
    terminal line ``position``, for parallel runs).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if resume and checkpoint_prefix is None:
        raise ValueError("train_variant: resume=True needs the checkpoint_prefix to resume from")
    seed_everything(settings.seed)
    ctx = settings.context()
    batch_size = min(settings.batch_size, len(digits.train_y))
    steps_per_epoch = len(digits.train_y) // batch_size
    total_steps = steps_per_epoch * settings.epochs
    module, begin_epoch, history = _training_module(variant, settings, ctx, checkpoint_prefix,
                                                    resume, digits)
    module.bind(data_shapes=[("data", (batch_size,) + digits.train_x.shape[1:])],
                label_shapes=[("softmax_label", (batch_size,))])
    if not module.params_initialized:  # a resumed Module already holds its parameters
        module.init_params(initializer=mx.init.Xavier(rnd_type="gaussian", factor_type="in",
                                                      magnitude=1.0))
    # The learning rate ramps up over the first epoch: with quadratic logits the gradient grows
    # with the distance of a feature from the means, and a full step on a fresh network can throw
    # the features so far out that training never recovers. Then it decays along a cosine. The
    # schedule is a function of the optimizer's update count, which a Module checkpoint does not
    # keep: a resumed run starts the count where the run record says the run stopped (a fresh
    # count would warm up to the full rate again, at the end of a run that had decayed it).
    schedule = mx.lr_scheduler.CosineScheduler(
        max_update=max(total_steps, 1), base_lr=settings.lr, final_lr=0.0,
        warmup_steps=min(steps_per_epoch, total_steps // 2))
    module.init_optimizer(optimizer=settings.optimizer,
                          optimizer_params=dict(optimizer_params(settings, schedule),
                                                begin_num_update=history[-1]["num_update"]
                                                if history else 0))
    metric = mx.metric.Accuracy(output_names=["softmax_output"], label_names=["softmax_label"])
    params = module._exec_group.param_arrays
    grads = [g for g in module._exec_group.grad_arrays if g]
    identity = _run_identity(variant, settings, digits)
    # Bars redraw many times a second: only on a terminal, never into a log file.
    bars = progress and sys.stderr.isatty()

    started = time.perf_counter()
    for epoch in range(begin_epoch, settings.epochs):
        metric.reset()
        losses = []
        nonfinite = 0
        desc = f"{label or variant:>8} {epoch + 1}/{settings.epochs}"
        bar = tqdm(_batches(digits.train_x, digits.train_y, batch_size, settings.seed, epoch, ctx),
                   total=steps_per_epoch, disable=not bars, leave=False, position=position,
                   unit="batch", desc=desc)
        for batch in bar:
            module.forward_backward(batch)
            loss, outputs_finite = _batch_loss(module.get_outputs(), batch.label[0].asnumpy())
            grads_finite = _all_finite(g[0] for g in grads)
            if not (outputs_finite and grads_finite):
                nonfinite += 1
                continue
            module.update()
            if not _all_finite(p[0] for p in params):
                nonfinite += 1
            module.update_metric(metric, batch.label)
            losses.append(loss)
            if bars:
                bar.set_postfix(_epoch_line(module, metric, losses), refresh=False)
        bar.close()
        history.append({"epoch": epoch + 1, "num_update": int(module._optimizer.num_update),
                        "loss": float(np.mean(losses)) if losses else float("nan"),
                        "train_accuracy": float(metric.get()[1]), "nonfinite_steps": nonfinite})
        if checkpoint_prefix is not None:
            _save_epoch(module, checkpoint_prefix, identity, history)
        if progress:
            fields = _epoch_line(module, metric, losses)
            fields["non-finite steps"] = sum(e["nonfinite_steps"] for e in history)
            tqdm.write(f"{desc}  " + "  ".join(f"{k} {v}" for k, v in fields.items()),
                       file=sys.stdout)
            sys.stdout.flush()
    seconds = time.perf_counter() - started
    mx.nd.waitall()
    arg_params, aux_params = module.get_params()
    return TrainResult(variant=variant, module=module, arg_params=arg_params,
                       aux_params=aux_params, epoch_losses=[e["loss"] for e in history],
                       train_accuracy=history[-1]["train_accuracy"] if history else float("nan"),
                       nonfinite_steps=sum(e["nonfinite_steps"] for e in history),
                       steps=total_steps, epochs_done=settings.epochs, seconds=seconds)


def predict(result, settings, images, batch_size=500):
    """(features (M, feature_dim), logits (M, 10)) of ``images`` (M, 1, 28, 28) under the trained
    variant.

    Runs the label-free evaluation graph (``is_train=False``: no margin) with the trained
    parameters.
    """
    symbol = evaluation_symbol(result.variant, settings.width, settings.alpha,
                               settings.feature_dim)
    module = mx.mod.Module(symbol, DATA_NAMES, None, context=settings.context())
    batch_size = min(batch_size, len(images))
    module.bind(data_shapes=[("data", (batch_size,) + images.shape[1:])], for_training=False)
    module.set_params(result.arg_params, result.aux_params, allow_extra=True)
    batches = mx.io.NDArrayIter(images, batch_size=batch_size, last_batch_handle="pad")
    feats, logits = module.predict(batches)
    return feats.asnumpy(), logits.asnumpy()
