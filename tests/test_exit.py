"""A script that ends while MXNet work is still pending exits cleanly once lgm_op is imported.

MXNet 1.9's exit handler stops the custom-operator worker threads before it waits for the engine,
so a Python custom operator still pending at exit hangs the process or aborts it (exit status 134,
``terminate called without an active exception``): the stock-operator test shows that MXNet's own
behaviour, the others that importing lgm_op prevents it. Every script runs in its own process with
a timeout (see docs/reliability.md, "Process exit").
"""
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120   # seconds per script: a clean run takes a few, a hung one never ends

# One lgm forward and backward call completes; four more are queued behind matrix products when
# the script ends, nothing read. Without the exit hook (atexit.unregister) this hung or aborted in 6
# of 8 runs on the development machine.
PENDING_LGM = """
import sys
import mxnet as mx
import numpy as np
import lgm_op

rng = np.random.default_rng(int(sys.argv[1]))
n, k, d = 37, 5, 7


def call(x):
    label = mx.nd.array(rng.integers(0, k, n))
    mean = mx.nd.array(rng.standard_normal((k, d)))
    log_var = mx.nd.zeros((k, d))
    for a in (x, mean, log_var):
        a.attach_grad()
    with mx.autograd.record():
        logits, lkd = mx.nd.Custom(x, label, mean, log_var, op_type="lgm", num_classes=k, alpha=0.1)
    mx.autograd.backward([logits, lkd])
    return logits, lkd, x.grad


call(mx.nd.array(rng.standard_normal((n, d))))[2].wait_to_read()
w = mx.nd.ones((1000, 1000))
for step in range(4):
    h = w
    for _ in range(3):
        h = mx.nd.dot(h, w) / 1000
    kept = call(h[:n, :d])
print("end of script", flush=True)
"""

# A stock Python custom operator: one call completes, one is queued behind matrix products when the
# script ends. With MXNet alone this aborts in every run seen (the engine thread that releases the
# operator calls into an interpreter that is finalizing).
PENDING_STOCK = """
import sys
import mxnet as mx
if "with-lgm" in sys.argv:
    import lgm_op

class Double(mx.operator.CustomOp):
    def forward(self, is_train, req, in_data, out_data, aux):
        self.assign(out_data[0], req[0], in_data[0] * 2)

@mx.operator.register("double_for_exit_test")
class DoubleProp(mx.operator.CustomOpProp):
    def list_outputs(self):
        return ["out"]
    def infer_shape(self, shapes):
        return shapes, [shapes[0]], []
    def create_operator(self, ctx, shapes, dtypes):
        return Double()

x = mx.nd.ones((1200, 1200))
done = mx.nd.Custom(x, op_type="double_for_exit_test")
done.wait_to_read()
y = x
for _ in range(6):
    y = mx.nd.dot(y, x) / 1200
pending = mx.nd.Custom(y, op_type="double_for_exit_test")
print("end of script", flush=True)
"""

# A call that fails, still pending and never read at exit.
PENDING_FAILURE = """
import mxnet as mx
import lgm_op
x = mx.nd.ones((4, 3))
bad = mx.nd.array([0, 1, 9, 2])
logits, lkd = mx.nd.Custom(x, bad, mx.nd.zeros((3, 3)), mx.nd.zeros((3, 3)), op_type="lgm", num_classes=3)
print("end of script", flush=True)
"""


def run_script(tmp_path, text, *args):
    """(exit status or 'hung', stdout, stderr) of ``text`` run as a script in a fresh process."""
    script = tmp_path / f"script_{abs(hash(text))}.py"
    if not script.exists():
        script.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    with subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=TIMEOUT)
            return child.returncode, out, err
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, err = child.communicate()
            return "hung", out, err


def test_pending_lgm_work_exits_cleanly_20_runs(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda i: run_script(tmp_path, PENDING_LGM, str(i)), range(20)))
    for i, (status, out, err) in enumerate(runs):
        assert "end of script" in out, f"run {i} did not reach its end:\n{err[-3000:]}"
        assert status == 0, f"run {i}: exit status {status}\n{err[-3000:]}"
        assert "terminate called" not in err and "Error" not in err, f"run {i}:\n{err[-3000:]}"


@pytest.mark.skipif(os.environ.get("LGM_OP_SHOW_MXNET_EXIT_RACE") != "1",
                    reason="MXNet's own exit race shows on some machines and loads and not on "
                           "others (6 clean exits in a row seen): opt in with "
                           "LGM_OP_SHOW_MXNET_EXIT_RACE=1")
def test_stock_custom_op_alone_does_not_exit_cleanly_mxnet_behaviour(tmp_path):
    """MXNet 1.9.1's own behaviour, which lgm_op cannot change, only prevent (next test). It is a
    race: most runs abort or hang where it shows, some exit cleanly, so up to 6 runs are tried
    for one that shows it (each clean run is printed); every run must reach the end of the
    script."""
    statuses = []
    for _ in range(6):
        status, out, err = run_script(tmp_path, PENDING_STOCK)
        assert "end of script" in out, err[-3000:]
        statuses.append(status)
        if status in (-signal.SIGABRT, "hung"):
            if status == -signal.SIGABRT:
                assert "terminate called without an active exception" in err
            return
        print(f"stock custom op exited with status {status}")
    raise AssertionError(f"6 runs of the stock custom op without lgm_op all exited: {statuses}")


def test_stock_custom_op_exits_cleanly_once_lgm_op_is_imported(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda i: run_script(tmp_path, PENDING_STOCK, "with-lgm"), range(4)))
    for i, (status, out, err) in enumerate(runs):
        assert "end of script" in out, f"run {i}:\n{err[-3000:]}"
        assert status == 0, f"run {i}: exit status {status}\n{err[-3000:]}"


def test_a_failure_still_pending_at_exit_is_reported(tmp_path):
    status, out, err = run_script(tmp_path, PENDING_FAILURE)
    assert "end of script" in out, err[-3000:]
    assert status == 0, f"exit status {status}\n{err[-3000:]}"
    assert "lgm_op: MXNet work still pending at exit failed:" in err, err[-3000:]
    assert "label" in err and "got 9" in err, err[-3000:]
