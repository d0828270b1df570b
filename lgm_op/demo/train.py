"""Training and prediction with MXNet's symbolic ``Module``, one variant at a time."""
import os
import time
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from tqdm import tqdm

from .network import VARIANTS, evaluation_symbol, training_symbol

__all__ = ["Settings", "TrainResult", "train_variant", "predict", "load_checkpoint",
           "latest_checkpoint_epoch", "seed_everything"]

DATA_NAMES = ["data"]
LABEL_NAMES = ["softmax_label"]


@dataclass(frozen=True)
class Settings:
    """Everything a training run depends on (the command line, less where output goes)."""

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
    """What training one variant produced; ``arg_params``, ``aux_params``: the learned values."""

    variant: str
    module: mx.mod.Module
    arg_params: dict
    aux_params: dict
    final_loss: float
    train_accuracy: float
    nonfinite_steps: int
    steps: int
    epochs_done: int
    seconds: float

    def log_var(self):
        """The learned log-variances (K, D), or None for the softmax baseline."""
        value = self.arg_params.get("lgm_log_var")
        return None if value is None else value.asnumpy()

    def means(self):
        """The learned class means (K, D), or None for the softmax baseline."""
        value = self.arg_params.get("lgm_mean")
        return None if value is None else value.asnumpy()


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


def latest_checkpoint_epoch(prefix):
    """The largest epoch saved under ``prefix`` (``prefix-NNNN.params``), or None."""
    folder, stem = os.path.split(prefix)
    epochs = []
    for name in os.listdir(folder or "."):
        head, _, tail = name.rpartition("-")
        if head == stem and tail.endswith(".params") and tail[:-7].isdigit():
            epochs.append(int(tail[:-7]))
    return max(epochs) if epochs else None


def load_checkpoint(prefix, epoch=None):
    """(symbol, arg_params, aux_params, epoch) of a Module checkpoint (the latest by default)."""
    epoch = latest_checkpoint_epoch(prefix) if epoch is None else epoch
    if epoch is None:
        raise FileNotFoundError(f"no checkpoint {prefix}-NNNN.params")
    symbol, arg_params, aux_params = mx.model.load_checkpoint(prefix, epoch)
    return symbol, arg_params, aux_params, epoch


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


def _new_module(variant, settings, ctx, resume_prefix):
    if resume_prefix is None:
        symbol = training_symbol(variant, settings.width, settings.lambda_,
                                 settings.log_var_lr_mult, settings.feature_dim,
                                 **settings.margin_kwargs())
        return mx.mod.Module(symbol, DATA_NAMES, LABEL_NAMES, context=ctx), 0
    # Module.load restores the parameters, the auxiliary states (the margin schedule's iteration
    # counter among them) and the optimizer's momentum.
    epoch = latest_checkpoint_epoch(resume_prefix)
    if epoch is None:
        raise FileNotFoundError(f"--resume: no checkpoint {resume_prefix}-NNNN.params to resume")
    module = mx.mod.Module.load(resume_prefix, epoch, load_optimizer_states=True,
                                data_names=DATA_NAMES, label_names=LABEL_NAMES, context=ctx)
    return module, epoch


def train_variant(variant, digits, settings, resume_prefix=None, progress=True, position=0,
                  label=None):
    """Train ``variant`` on ``digits`` for ``settings.epochs`` epochs; a :class:`TrainResult`.

    Uses ``settings.optimizer`` (SGD with momentum by default, see :func:`optimizer_params`)
    with a cosine learning-rate decay over the run. A step whose loss or
    gradients are not finite is counted and not applied; a step after which a parameter is not
    finite is counted too. With ``resume_prefix`` training continues from the latest checkpoint
    under it (parameters, margin schedule state, optimizer state) for ``settings.epochs`` more epochs.
    ``progress`` shows a bar per epoch (on terminal line ``position``, for parallel runs) and
    writes a line with the loss, accuracy and log-variance range after each epoch, headed by
    ``label`` (default: the variant's name).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    seed_everything(settings.seed)
    ctx = settings.context()
    batch_size = min(settings.batch_size, len(digits.train_y))
    steps_per_epoch = len(digits.train_y) // batch_size
    total_steps = steps_per_epoch * settings.epochs
    module, begin_epoch = _new_module(variant, settings, ctx, resume_prefix)
    module.bind(data_shapes=[("data", (batch_size,) + digits.train_x.shape[1:])],
                label_shapes=[("softmax_label", (batch_size,))])
    if not module.params_initialized:  # a resumed Module already holds its parameters
        module.init_params(initializer=mx.init.Xavier(rnd_type="gaussian", factor_type="in",
                                                      magnitude=1.0))
    # The learning rate ramps up over the first epoch: with quadratic logits the gradient grows
    # with the distance of a feature from the means, and a full step on a fresh network can throw
    # the features so far out that training never recovers. Then it decays along a cosine.
    schedule = mx.lr_scheduler.CosineScheduler(
        max_update=max(total_steps, 1), base_lr=settings.lr, final_lr=0.0,
        warmup_steps=min(steps_per_epoch, total_steps // 2))
    module.init_optimizer(optimizer=settings.optimizer,
                          optimizer_params=optimizer_params(settings, schedule))
    metric = mx.metric.Accuracy(output_names=["softmax_output"], label_names=["softmax_label"])
    params = module._exec_group.param_arrays
    grads = [g for g in module._exec_group.grad_arrays if g]

    nonfinite = 0
    losses = []
    started = time.perf_counter()
    for epoch in range(begin_epoch, begin_epoch + settings.epochs):
        metric.reset()
        losses = []
        bar = tqdm(_batches(digits.train_x, digits.train_y, batch_size, settings.seed, epoch, ctx),
                   total=steps_per_epoch, disable=not progress, leave=False, position=position,
                   unit="batch",
                   desc=f"{label or variant:>8} {epoch + 1}/{begin_epoch + settings.epochs}")
        postfix = {}
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
            postfix = {"loss": f"{np.mean(losses):.4f}", "acc": f"{metric.get()[1]:.4f}"}
            log_var_range = _log_var_range(module)
            if log_var_range is not None:
                postfix["log_var"] = f"[{log_var_range[0]:+.2f}, {log_var_range[1]:+.2f}]"
            bar.set_postfix(postfix, refresh=False)
        bar.close()
        if progress:
            tqdm.write(f"{bar.desc}  " + "  ".join(f"{k} {v}" for k, v in postfix.items())
                       + f"  non-finite steps {nonfinite}")
    seconds = time.perf_counter() - started
    arg_params, aux_params = module.get_params()
    return TrainResult(variant=variant, module=module, arg_params=arg_params,
                       aux_params=aux_params,
                       final_loss=float(np.mean(losses)) if losses else float("nan"),
                       train_accuracy=float(metric.get()[1]), nonfinite_steps=nonfinite,
                       steps=total_steps, epochs_done=begin_epoch + settings.epochs,
                       seconds=seconds)


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
