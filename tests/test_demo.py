"""The demo end to end on a tiny setting, and its building blocks (IDX reader, AUROC)."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lgm_op.demo import cli  # noqa: E402
from lgm_op.demo.data import (ABNORMAL_KINDS, SHIFT_PIXELS, abnormal_inputs,  # noqa: E402
                              load_idx_dir, normalize, read_idx, write_idx)
from lgm_op.demo.network import VARIANTS  # noqa: E402
from lgm_op.demo.scores import auroc, average_ranks  # noqa: E402
from lgm_op.demo.train import train_variant  # noqa: E402

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


def test_resume_continues_the_schedule(demo_run, tmp_path):
    import shutil

    out, summary, _ = demo_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(out, resumed)
    cli.main(["--out", resumed, "--variants", "full", "--resume"] + TINY)
    with open(os.path.join(resumed, "summary.json")) as f:
        after = json.load(f)
    steps = summary["variants"]["full"]["steps"]
    for ckpt, model in ((after["checkpoint"], after["variants"]["full"]),
                        (after["detector"]["checkpoint"], after["detector"])):
        assert ckpt["epoch"] == 2 and model["epochs_trained"] == 2
        assert ckpt["margin_iter"] == 2 * steps


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
    (["--detector-dim", "-1"], "--detector-dim must be >= 0"),
    (["--clip-gradient", "-0.5"], "--clip-gradient must be >= 0"),
    (["--clip-gradient", "nan"], "--clip-gradient must be >= 0"),
    (["--variants", "softmax", "--resume"], "--resume continues the full variant"),
    (["--variants", "full,bogus"], "variants must be a comma list"),
    (["--optimizer", "rmsprop"], "invalid choice"),
])
def test_bad_options_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


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


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path, dtype, suffix, rng):
    array = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = str(tmp_path / f"a.idx{suffix}")
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, array)


def test_idx_reader_reads_the_bytes_of_the_format(tmp_path):
    # Written by hand: magic 0x00000801 (ubyte, 1 dimension), size 3 big-endian, data.
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    np.testing.assert_array_equal(read_idx(str(path)), [7, 0, 9])
    path.write_bytes(bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2, 1, 2, 0xFF, 0xFE]))
    np.testing.assert_array_equal(read_idx(str(path)), [[258, -2]])


def test_idx_reader_rejects_bad_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ValueError, match="needs 5 data bytes"):
        read_idx(str(path))
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(path))


def test_idx_folder_loads_as_digits(tmp_path, rng):
    images = {"train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    labels = {"train": np.arange(12, dtype=np.uint8) % 10, "t10k": np.arange(5, dtype=np.uint8)}
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images["train"])
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels["train"])
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), images["t10k"])
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), labels["t10k"])
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
    assert auroc([0.0, np.inf], [np.inf]) == 0.75
    np.testing.assert_array_equal(average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_auroc_equals_pairwise_count(rng):
    normal = rng.normal(size=301).round(1)
    abnormal = rng.normal(0.4, size=157).round(1)
    pairs = abnormal[None, :] - normal[:, None]
    expected = (pairs > 0).mean() + 0.5 * (pairs == 0).mean()
    assert auroc(normal, abnormal) == pytest.approx(expected, abs=1e-12)


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="non-empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan], [1.0])

