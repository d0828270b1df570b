"""The demo end to end on a tiny setting, and its building blocks (IDX files, AUROC, resume)."""
import dataclasses
import glob
import gzip
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lgm_op.demo import cli, load_predictor  # noqa: E402
from lgm_op.demo.data import (ABNORMAL_KINDS, SHIFT_PIXELS, abnormal_inputs,  # noqa: E402
                              load_digits, load_idx_dir, normalize)
from lgm_op.demo.network import VARIANTS  # noqa: E402
from lgm_op.demo.scores import auroc  # noqa: E402
from lgm_op.demo.train import ResumeError, resume_epoch, train_variant  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--train-size", "300", "--batch-size", "32", "--quiet"]
VARIANT_FIELDS = ("test_accuracy", "train_accuracy", "final_loss", "log_var_min", "log_var_max",
                  "nonfinite_steps", "steps", "epochs_trained", "seconds")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny run of all four variants through ``python -m lgm_op.demo``."""
    out = str(tmp_path_factory.mktemp("demo"))
    env = dict(os.environ, MXNET_STORAGE_FALLBACK_LOG_VERBOSE="0")
    proc = subprocess.run([sys.executable, "-m", "lgm_op.demo", "--out", out] + TINY,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(out, "summary.json")) as f:
        return out, json.load(f), proc.stdout


def _finite_numbers(tree):
    """Every number in a JSON tree (None is allowed where a variant has no such quantity)."""
    if isinstance(tree, dict):
        return [n for v in tree.values() for n in _finite_numbers(v)]
    if isinstance(tree, list):
        return [n for v in tree for n in _finite_numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_figures_are_drawn(demo_run):
    import matplotlib.image

    out, summary, _ = demo_run
    for name in (cli.FEATURES_PNG, cli.ABNORMAL_PNG):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 20_000, name
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 800, (name, pixels.shape)
        assert pixels[..., :3].std() > 0.05, f"{name} is nearly blank"
    assert summary["figures"] == {"features": os.path.join(out, cli.FEATURES_PNG),
                                  "abnormal": os.path.join(out, cli.ABNORMAL_PNG)}


def test_summary_has_every_field(demo_run):
    _, summary, stdout = demo_run
    assert list(summary["variants"]) == list(VARIANTS)
    for name, v in summary["variants"].items():
        assert set(VARIANT_FIELDS) <= set(v), name
        assert v["nonfinite_steps"] == 0, name
        assert 0.0 <= v["test_accuracy"] <= 1.0
        assert v["steps"] == 300 // 32 and v["epochs_trained"] == 1
        assert v["final_loss"] is not None and v["seconds"] > 0
        has_gaussians = name != "softmax"
        assert (v["log_var_min"] is not None) == has_gaussians, name
        assert (v["log_var_max"] is not None) == has_gaussians, name
    assert all(math.isfinite(n) for n in _finite_numbers(summary))
    detector = summary["detector"]
    assert set(VARIANT_FIELDS) <= set(detector)
    assert detector["feature_dim"] == cli.DEFAULTS["detector_dim"] and detector["variant"] == "full"
    assert detector["nonfinite_steps"] == 0 and detector["steps"] == 300 // 32
    abnormal = summary["abnormal"]
    assert abnormal["inputs"] == ABNORMAL_KINDS
    assert set(abnormal["models"]) == {"detector", "full"}
    assert abnormal["model"] == "detector"
    assert abnormal["auroc"] == abnormal["models"]["detector"]["auroc"]
    assert abnormal["models"]["full"]["feature_dim"] == 2
    for model in abnormal["models"].values():
        assert set(model["auroc"]) == set(ABNORMAL_KINDS) == {"noise", "shifted", "inverted"}
        assert all(0.0 <= a <= 1.0 for a in model["auroc"].values())
        assert set(model["score_median"]) == set(ABNORMAL_KINDS)
        assert set(model["nearest_mean_distance_median"]) == {"digits"} | set(ABNORMAL_KINDS)
        assert all(d > 0 for d in model["nearest_mean_distance_median"].values())
    assert set(summary["versions"]) >= {"lgm_op", "mxnet", "numpy"}
    assert summary["versions"]["mxnet"] == mx.__version__
    settings = summary["settings"]
    for key in ("epochs", "batch_size", "lr", "lambda_", "alpha", "margin_policy", "seed", "ctx",
                "train_size", "variants", "width", "detector_dim", "optimizer", "data", "out"):
        assert key in settings, key
    assert summary["data"]["train"] == 300 and summary["data"]["test"] == 1000
    assert "AUROC vs test digits, detector (8-D)" in stdout
    assert "AUROC vs test digits, full (2-D)" in stdout


@pytest.mark.parametrize("model", ["full", "detector"])
def test_checkpoint_keeps_the_margin_state(demo_run, model):
    out, summary, _ = demo_run
    ckpt = summary["checkpoint"] if model == "full" else summary["detector"]["checkpoint"]
    assert ckpt["round_trip_equal"]
    assert os.path.basename(ckpt["prefix"]) == cli.CHECKPOINT_NAMES[model]
    symbol, arg_params, aux_params = mx.model.load_checkpoint(ckpt["prefix"], ckpt["epoch"])
    assert "lgm_margin_iter" in aux_params and "lgm_margin_iter" in symbol.list_auxiliary_states()
    steps = summary["variants"]["full"]["steps"]
    assert int(aux_params["lgm_margin_iter"].asscalar()) == ckpt["margin_iter"] == steps
    assert {"lgm_mean", "lgm_log_var"} <= set(arg_params)
    dim = 2 if model == "full" else cli.DEFAULTS["detector_dim"]
    assert arg_params["lgm_mean"].shape == (10, dim)
    # The checkpoint binds again as a Module and hands the state back unchanged.
    module = mx.mod.Module(symbol, ["data"], ["softmax_label"])
    module.bind(data_shapes=[("data", (4, 1, 28, 28))], label_shapes=[("softmax_label", (4,))])
    module.set_params(arg_params, aux_params)
    assert module.get_params()[1]["lgm_margin_iter"].asscalar() == steps


def _interrupt_after(folder, epoch):
    """Leave ``folder`` as a run killed after ``epoch`` would: delete the later checkpoints."""
    for path in glob.glob(os.path.join(folder, "*-[0-9][0-9][0-9][0-9].*")):
        if int(path.rsplit("-", 1)[1].split(".")[0]) > epoch:
            os.remove(path)


def _tiny_settings(**changes):
    return dataclasses.replace(cli.settings_of(cli.parse_args([])),
                               **dict(dict(epochs=3, batch_size=16), **changes))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resumed_run_is_the_uninterrupted_run(tmp_path, optimizer):
    # 3 epochs straight, against 1 epoch, an interruption and a resume to 3. Same device, same
    # batches and the deterministic CPU path (test_training_is_deterministic), so a resumed run
    # that restores everything (parameters, momentum / Adam moments, margin counter, the
    # learning-rate schedule's position) is bitwise equal: any difference is a resume defect
    # (a restarted schedule, for one, moves every parameter by far more than rounding).
    digits = load_digits().shrink(64)
    settings = _tiny_settings(optimizer=optimizer)
    os.makedirs(tmp_path / "a")
    straight = train_variant("full", digits, settings, str(tmp_path / "a" / "lgm"),
                             progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _interrupt_after(str(tmp_path / "b"), 1)
    assert resume_epoch(str(tmp_path / "b" / "lgm"), "full", settings, digits) == 1
    resumed = train_variant("full", digits, settings, str(tmp_path / "b" / "lgm"), resume=True,
                            progress=False)
    assert len(straight.epoch_losses) == len(resumed.epoch_losses) == 3
    assert resumed.epoch_losses == straight.epoch_losses, (resumed.epoch_losses,
                                                           straight.epoch_losses)
    assert resumed.train_accuracy == straight.train_accuracy
    for name, value in straight.arg_params.items():
        np.testing.assert_array_equal(resumed.arg_params[name].asnumpy(), value.asnumpy(), name)
    assert resumed.aux_params["lgm_margin_iter"].asscalar() == 3 * (64 // 16)
    assert straight.aux_params["lgm_margin_iter"].asscalar() == 3 * (64 // 16)


def test_resume_refuses_what_would_not_continue_the_run(tmp_path):
    digits = load_digits().shrink(32)
    settings = _tiny_settings(epochs=2)
    prefix = str(tmp_path / "lgm")
    with pytest.raises(ResumeError, match="no run record"):
        resume_epoch(prefix, "full", settings, digits)
    train_variant("full", digits, settings, prefix, progress=False)
    with pytest.raises(ResumeError, match="has done all of its 2 epochs"):
        resume_epoch(prefix, "full", settings, digits)
    _interrupt_after(str(tmp_path), 1)
    assert resume_epoch(prefix, "full", dataclasses.replace(settings, ctx="gpu"), digits) == 1
    for changed, message in [(dict(lr=0.03), "started with lr 0.02, this one has 0.03"),
                             (dict(epochs=5), "started with epochs 2, this one has 5"),
                             (dict(seed=1), "started with seed 0, this one has 1")]:
        with pytest.raises(ResumeError, match=message) as info:
            resume_epoch(prefix, "full", dataclasses.replace(settings, **changed), digits)
        assert info.value.setting == next(iter(changed))
    with pytest.raises(ResumeError, match="train_digits 32, this one has 16"):
        resume_epoch(prefix, "full", settings, digits.shrink(16))
    with pytest.raises(ResumeError, match="variant 'full', this one has 'nolkd'"):
        resume_epoch(prefix, "nolkd", settings, digits)
    _interrupt_after(str(tmp_path), 0)
    with pytest.raises(ResumeError, match="no epoch has both a checkpoint"):
        resume_epoch(prefix, "full", settings, digits)


def test_resume_through_the_command_line(tmp_path):
    # The full variant, 2 epochs; then the same run stopped after epoch 1 and resumed: every
    # number of the summary but the times is the same. (The detector is the same code path with
    # another feature dimension; test_resumed_run_is_the_uninterrupted_run covers Adam.)
    argv = ["--variants", "full", "--detector-dim", "0", "--jobs", "1", "--epochs", "2"] + TINY[2:]
    straight = cli.run(cli.parse_args(["--out", str(tmp_path / "a")] + argv))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _interrupt_after(str(tmp_path / "b"), 1)
    resumed = cli.run(cli.parse_args(["--out", str(tmp_path / "b"), "--resume"] + argv))
    for key in set(VARIANT_FIELDS) - {"seconds"}:
        assert resumed["variants"]["full"][key] == straight["variants"]["full"][key], key
    assert resumed["abnormal"]["models"] == straight["abnormal"]["models"]
    assert resumed["checkpoint"]["margin_iter"] == straight["checkpoint"]["margin_iter"] == 2 * 9


def test_worker_processes_give_the_numbers_of_a_serial_run(demo_run, tmp_path):
    _, summary, _ = demo_run  # four variants in two worker processes
    serial = cli.run(cli.parse_args(["--out", str(tmp_path), "--variants", "softmax,nolkd",
                                     "--jobs", "1"] + TINY))
    for name in ("softmax", "nolkd"):
        for key in set(VARIANT_FIELDS) - {"seconds"}:
            assert serial["variants"][name][key] == summary["variants"][name][key], (name, key)
    for key in set(VARIANT_FIELDS) - {"seconds"}:
        assert serial["detector"][key] == summary["detector"][key], key
    assert serial["abnormal"]["auroc"] == summary["abnormal"]["auroc"]
    assert set(serial["abnormal"]["models"]) == {"detector"}  # no 2-D full variant in this run


def test_no_detector_scores_with_the_full_variant(tmp_path):
    summary = cli.run(cli.parse_args(["--out", str(tmp_path), "--variants", "full",
                                      "--detector-dim", "0", "--jobs", "1"] + TINY))
    assert "detector" not in summary
    assert summary["abnormal"]["model"] == "full" and set(summary["abnormal"]["models"]) == {"full"}
    assert not os.path.exists(os.path.join(str(tmp_path), cli.CHECKPOINT_NAMES["detector"]
                                           + "-0001.params"))


def test_no_abnormal_figure_without_an_lgm_model(tmp_path):
    summary = cli.run(cli.parse_args(["--out", str(tmp_path), "--variants", "softmax",
                                      "--detector-dim", "0", "--jobs", "1"] + TINY))
    assert "abnormal" not in summary and "checkpoint" not in summary
    assert set(summary["figures"]) == {"features"}


@pytest.mark.parametrize("argv, message", [
    (["--detector-dim", "-1"], "argument --detector-dim: must be an integer >= 0, got '-1'"),
    (["--clip-gradient", "-0.5"], "argument --clip-gradient: must be a finite number >= 0"),
    (["--clip-gradient", "nan"], "argument --clip-gradient: must be a finite number >= 0"),
    (["--lambda", "-1"], "argument --lambda: must be a finite number >= 0, got '-1'"),
    (["--lambda", "inf"], "argument --lambda: must be a finite number >= 0, got 'inf'"),
    (["--alpha", "-1"], "argument --alpha: must be a finite number >= 0, got '-1'"),
    (["--alpha", "nan"], "argument --alpha: must be a finite number >= 0, got 'nan'"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    (["--lr", "abc"], "argument --lr: must be a finite number > 0, got 'abc'"),
    (["--momentum", "1"], "argument --momentum: must be a finite number >= 0 and < 1"),
    (["--wd=-1e-4"], "argument --wd: must be a finite number >= 0"),
    (["--log-var-lr-mult", "nan"], "argument --log-var-lr-mult: must be a finite number >= 0"),
    (["--margin-gamma", "-2"], "argument --margin-gamma: must be a finite number >= 0"),
    (["--margin-max", "nan"], "argument --margin-max: must be a number >= 0, got 'nan'"),
    (["--margin-step", "0"], "argument --margin-step: must be an integer >= 1, got '0'"),
    (["--epochs", "1.5"], "argument --epochs: must be an integer >= 1, got '1.5'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--width", "-3"], "argument --width: must be an integer >= 1"),
    (["--train-size", "0"], "argument --train-size: must be an integer >= 1"),
    (["--jobs", "0"], "argument --jobs: must be an integer >= 1"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got '-1'"),
    (["--seed", str(2**32)], "argument --seed: must be an integer in [0, 4294967295]"),
    (["--ctx", "tpu"], "argument --ctx: invalid choice: 'tpu'"),
    (["--margin-policy", "warmpu"], "argument --margin-policy: invalid choice: 'warmpu'"),
    (["--variants", "softmax", "--resume"], "--resume continues the full variant"),
    (["--variants", "full,bogus"], "argument --variants: must be a comma list"),
    (["--optimizer", "rmsprop"], "invalid choice"),
    (["--out", ""], "--out '' is empty"),
    (["--out", __file__], "exists and is not a folder"),
    (["--out", os.path.join(__file__, "sub")], "cannot be created: " + __file__
     + " is not a folder"),
    (["--data", "/nonexistent/mnist"], "--data: /nonexistent/mnist is not a folder"),
    (["--data", os.path.dirname(__file__)], "no train-images-idx3-ubyte[.gz]"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_options_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err  # one line, no usage block


def test_bad_resume_names_the_option(demo_run, capsys):
    out, _, _ = demo_run  # a finished one-epoch run
    with pytest.raises(SystemExit):
        cli.parse_args(["--out", out, "--resume"] + TINY)
    assert "has done all of its 1 epochs (checkpoint 1); nothing to resume" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--out", out, "--resume", "--lr", "0.05"] + TINY)
    err = capsys.readouterr().err
    assert "started with lr 0.02, this one has 0.05 (--lr)" in err and err.count("\n") == 1


def test_a_bad_option_stops_before_any_work(tmp_path):
    # Before the checks, --lambda -1 trained to NaN and exited 0, and --alpha -1 failed only
    # after the first variant had trained.
    for option in (["--lambda", "-1"], ["--alpha", "-1"]):
        out = tmp_path / option[0].strip("-")
        proc = subprocess.run([sys.executable, "-m", "lgm_op.demo", "--out", str(out)] + option,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and option[0] in proc.stderr, proc.stderr
        assert not out.exists()


def test_progress_writes_a_line_per_epoch_off_a_terminal(capsys):
    digits = load_digits().shrink(48)
    settings = dataclasses.replace(_tiny_settings(), epochs=2)
    train_variant("nolkd", digits, settings, progress=True, label="tiny")
    captured = capsys.readouterr()  # neither stream is a terminal here
    assert "\r" not in captured.out + captured.err and "batch/s" not in captured.err
    lines = [line for line in captured.out.splitlines() if line.strip().startswith("tiny")]
    assert len(lines) == 2 and lines[1].split()[:2] == ["tiny", "2/2"], captured.out
    assert all("train acc" in line and "non-finite steps 0" in line for line in lines)


def test_predictor_of_a_checkpoint(demo_run):
    out, summary, _ = demo_run
    digits = load_digits()
    pixels = digits.test_x[:, 0] * 128.0 + 127.5  # back to 0..255 (normalize is exact on them)
    assert np.array_equal(pixels, np.rint(pixels)) and pixels.min() >= 0 and pixels.max() <= 255
    for model, dim in (("full", 2), ("detector", cli.DEFAULTS["detector_dim"])):
        predictor = load_predictor(os.path.join(out, cli.CHECKPOINT_NAMES[model]))
        result = summary["variants"]["full"] if model == "full" else summary["detector"]
        assert predictor.epoch == result["epochs_trained"] and predictor.variant == "full"
        prediction = predictor(pixels.astype(np.uint8))
        assert prediction.features.shape == (1000, dim) and prediction.logits.shape == (1000, 10)
        assert np.mean(prediction.label == digits.test_y) == result["test_accuracy"]
        np.testing.assert_array_equal(prediction.score, -prediction.logits.max(axis=1))
        flat = predictor(pixels[:7].reshape(7, 784))  # an odd batch, flat rows
        np.testing.assert_allclose(flat.logits, prediction.logits[:7], rtol=1e-5, atol=1e-5)
    median = summary["abnormal"]["models"]["full"]["digits_score_median"]
    assert np.median(load_predictor(os.path.join(out, "lgm-full"))(pixels).score) == \
        pytest.approx(median, rel=1e-5)
    for bad, message in [(pixels[:, :27], r"shape \(M, 28, 28\), \(M, 784\) or"),
                         (pixels[:0], "M >= 1"),
                         (digits.test_x[:3], "0..255"),  # already normalised: negative values
                         (np.full((2, 784), np.nan), "0..255"),
                         (np.array([["a"] * 784]), "real numbers")]:
        with pytest.raises(ValueError, match=message):
            predictor(bad)
    with pytest.raises(ResumeError, match="no run record"):
        load_predictor(os.path.join(out, "nothing-here"))


def test_training_is_deterministic(tmp_path):
    from lgm_op.demo.data import load_digits

    digits = load_digits().shrink(64)
    settings = dataclasses.replace(cli.settings_of(cli.parse_args([])), epochs=1, batch_size=16)
    first, second = (train_variant("full", digits, settings, progress=False) for _ in range(2))
    assert first.final_loss == second.final_loss
    for name, value in first.arg_params.items():
        np.testing.assert_array_equal(value.asnumpy(), second.arg_params[name].asnumpy(), name)


def test_nearest_mean_distance():
    feats = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]], dtype=np.float32)
    means = np.array([[0.0, 1.0], [10.0, 0.5]])
    np.testing.assert_allclose(cli._nearest_mean_distance(feats, means),
                               [1.0, np.hypot(3.0, 3.0), 0.5])


def test_optimizer_params():
    from lgm_op.demo.train import optimizer_params

    base = cli.settings_of(cli.parse_args([]))
    sgd = optimizer_params(base, None)
    assert sgd["momentum"] == cli.DEFAULTS["momentum"] and "clip_gradient" not in sgd
    adam = optimizer_params(dataclasses.replace(base, optimizer="adam", clip_gradient=0.5), None)
    assert "momentum" not in adam and adam["clip_gradient"] == 0.5
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam, got 'ftrl'"):
        optimizer_params(dataclasses.replace(base, optimizer="ftrl"), None)


@pytest.mark.parametrize("optimizer, clip", [("adam", 0.0), ("sgd", 1e-4)])
def test_other_optimizers_train(optimizer, clip):
    from lgm_op.demo.data import load_digits

    digits = load_digits().shrink(64)
    settings = dataclasses.replace(cli.settings_of(cli.parse_args([])), epochs=1, batch_size=16,
                                   optimizer=optimizer, clip_gradient=clip, lr=1e-3,
                                   log_var_lr_mult=1.0)
    result = train_variant("full", digits, settings, progress=False)
    assert result.nonfinite_steps == 0 and np.isfinite(result.final_loss)
    # Four steps moved the log-variances from their start (0) by at most what the learning rate
    # allows: Adam's steps are about lr each, clipped SGD's at most lr * clip / (1 - momentum).
    moved = np.abs(result.log_var()).max()
    bound = 4 * 1e-3 * (1.01 if optimizer == "adam" else clip / (1 - settings.momentum))
    assert 0 < moved <= bound


def _idx_bytes(array):
    """An MNIST IDX file of uint8 ``array``: magic 0x0000080<ndim>, big-endian sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    return (bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
            + array.tobytes())


def _write_idx(path, array):
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(_idx_bytes(array))


def test_idx_folder_loads_as_digits(tmp_path, rng):
    images = {"train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    labels = {"train": np.arange(12, dtype=np.uint8) % 10, "t10k": np.arange(5, dtype=np.uint8)}
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images["train"])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels["train"])
    _write_idx(tmp_path / "t10k-images.idx3-ubyte", images["t10k"])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels["t10k"])
    digits = load_idx_dir(str(tmp_path))
    assert digits.train_x.shape == (12, 1, 28, 28) and digits.test_x.shape == (5, 1, 28, 28)
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.float32
    np.testing.assert_array_equal(digits.test_y, labels["t10k"])
    # The training part is shuffled, but each image keeps its label.
    for x, y in zip(digits.train_x, digits.train_y):
        pixels = np.rint(x[0] * 128.0 + 127.5).astype(np.uint8)
        match = [i for i in range(12) if np.array_equal(images["train"][i], pixels)]
        assert match and labels["train"][match[0]] == y


def test_idx_folder_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx_dir(str(tmp_path))


def test_idx_folder_names_the_bad_file(tmp_path, rng):
    def folder(name, payload):
        """The four files, one of them replaced by ``payload``."""
        for part, count in (("train", 6), ("t10k", 3)):
            _write_idx(tmp_path / f"{part}-images-idx3-ubyte",
                       rng.integers(0, 256, (count, 28, 28)))
            _write_idx(tmp_path / f"{part}-labels-idx1-ubyte", np.arange(count))
        (tmp_path / name).write_bytes(payload)
        return str(tmp_path)

    for name, payload, message in [
        ("train-images-idx3-ubyte", _idx_bytes(np.zeros((6, 28, 28)))[:-5],
         "declares 6 images of 784 bytes, the file holds 4699 bytes"),
        ("t10k-labels-idx1-ubyte", b"PK\x03\x04", "not an MNIST IDX labels file"),
        ("train-images-idx3-ubyte", b"", "header empty"),
        ("t10k-images-idx3-ubyte", _idx_bytes(np.zeros((3, 28, 27))), "28 x 28 pixels"),
        ("train-labels-idx1-ubyte", _idx_bytes(np.arange(2)), "train has 6 images but 2 labels"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            load_idx_dir(folder(name, payload))
        assert name in str(info.value) or "train has" in str(info.value)
    os.remove(folder("t10k-images-idx3-ubyte", b"") + "/t10k-images-idx3-ubyte")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: not a readable gzip file"):
        load_idx_dir(str(tmp_path))


def test_abnormal_inputs(rng):
    pixels = rng.integers(0, 256, (6, 784)).astype(np.float64)
    digits = normalize(pixels)
    abnormal = abnormal_inputs(digits, seed=3)
    assert set(abnormal) == set(ABNORMAL_KINDS)
    for images in abnormal.values():
        assert images.shape == digits.shape and images.dtype == np.float32
    np.testing.assert_array_equal(abnormal["inverted"], normalize(255.0 - pixels))
    s = SHIFT_PIXELS
    np.testing.assert_array_equal(abnormal["shifted"][:, :, s:, s:], digits[:, :, :-s, :-s])
    assert (abnormal["shifted"][:, :, :s, :] == normalize(np.zeros((1, 784))).min()).all()
    noise = abnormal["noise"] * 128.0 + 127.5
    assert noise.min() >= 0.0 and noise.max() <= 255.0 and abs(noise.mean() - 127.5) < 10
    np.testing.assert_array_equal(noise, abnormal_inputs(digits, seed=3)["noise"] * 128.0 + 127.5)


def test_auroc_known_cases():
    assert auroc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.5
    assert auroc([5.0] * 4, [5.0] * 7) == 0.5
    assert auroc([0.0, 1.0], [1.0]) == 0.75  # one win, one tie


def test_auroc_equals_pairwise_count(rng):
    normal = rng.normal(size=301).round(1)
    abnormal = rng.normal(0.4, size=157).round(1)
    pairs = abnormal[None, :] - normal[:, None]
    expected = (pairs > 0).mean() + 0.5 * (pairs == 0).mean()
    assert auroc(normal, abnormal) == pytest.approx(expected, abs=1e-12)


def test_auroc_rejects_empty_and_non_finite():
    with pytest.raises(ValueError, match="non-empty"):
        auroc([], [1.0])
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite"):
            auroc([bad], [1.0])
