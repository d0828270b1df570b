"""Distributed data parallelism on MXNet's own parameter server, all on 127.0.0.1.

A scheduler, one server and two workers run scripts/dist_train.py with kvstore='dist_sync'; both
workers must end with identical parameters, equal (to float32 rounding) to a single process
trained on the union of their batches, with the optimizer on the workers (the script's default)
and on the servers.
"""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "dist_train.py"
LOOPBACK = "127.0.0.1"
STEPS = 5


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _reference(out_dir):
    """The single-process run, in this process."""
    spec = importlib.util.spec_from_file_location("dist_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--kvstore", "local", "--steps", str(STEPS), "--out", str(out_dir)])
    _, workers, values, _ = module.train(args)
    assert workers == 1
    return values


def _tail(path, n=2000):
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("update_on_kvstore", [False, True],
                         ids=["worker-update", "server-update"])
def test_two_workers_match_one_process(tmp_path, update_on_kvstore):
    env = dict(os.environ, DMLC_PS_ROOT_URI=LOOPBACK, DMLC_PS_ROOT_PORT=str(_free_port()),
               DMLC_NUM_SERVER="1", DMLC_NUM_WORKER="2", DMLC_NODE_HOST=LOOPBACK,
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("DMLC_INTERFACE", None)
    command = [sys.executable, str(SCRIPT), "--kvstore", "dist_sync", "--steps", str(STEPS),
               "--out", str(tmp_path)] + (["--update-on-kvstore"] if update_on_kvstore else [])
    procs = {}
    try:
        for role in ("scheduler", "server", "worker0", "worker1"):
            log = open(tmp_path / f"{role}.log", "w")
            procs[role] = subprocess.Popen(command, env=dict(env, DMLC_ROLE=role.rstrip("01")),
                                           stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # its own process group
            log.close()
        deadline = time.monotonic() + 180
        for role in ("worker0", "worker1", "server", "scheduler"):
            try:
                code = procs[role].wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{role} did not finish in time; logs:\n" + "\n".join(
                    f"--- {r}\n{_tail(tmp_path / f'{r}.log')}" for r in procs))
            assert code == 0, f"{role} exited with {code}:\n{_tail(tmp_path / f'{role}.log')}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    ranks = [dict(np.load(tmp_path / f"params_rank{r}.npz")) for r in (0, 1)]
    want = _reference(tmp_path / "reference")
    assert sorted(ranks[0]) == sorted(want)
    worst = 0.0
    for name, value in want.items():
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        np.testing.assert_allclose(ranks[0][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        worst = max(worst, float(np.max(np.abs(ranks[0][name].astype(np.float64) - value))))
    assert ranks[0]["lgm_margin_iter"][0] == STEPS
    print(f"\ndist_sync ({'server' if update_on_kvstore else 'worker'}-side update), 2 workers "
          f"vs 1 process: workers identical, largest difference {worst:.3g}")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be a finite int >= 1, got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite float >= 0, got 'nan'"),
    (["--momentum", "1"], "argument --momentum: must be a finite float >= 0 and < 1"),
    (["--batch-size", "x"], "argument --batch-size: must be a finite int >= 1, got 'x'"),
    (["--kvstore", "dist_sycn"], "argument --kvstore: invalid choice: 'dist_sycn'"),
])
def test_bad_options_are_refused(argv, message, capsys):
    spec = importlib.util.spec_from_file_location("dist_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as info:
        module.parse_args(["--out", "unused"] + argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
