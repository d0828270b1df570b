"""The installed package: kernels shipped as data, importable without CuPy or a GPU."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_installed_copy_finds_its_kernels(tmp_path):
    """A real (non-editable) install into a fresh folder ships kernels/ inside the package."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target",
                    str(target), str(ROOT)], check=True, cwd=tmp_path, timeout=280)
    probe = textwrap.dedent("""
        import sys, lgm_op
        from lgm_op.kernel_source import kernels_dir, load_source, KERNEL_FILES
        folder = kernels_dir()
        assert str(folder).startswith(sys.argv[1]), folder
        assert lgm_op.__file__.startswith(sys.argv[1]), lgm_op.__file__
        for name in KERNEL_FILES:
            text = load_source(name)
            assert "__global__" in text and '#include "' not in text, name
        print("ok", folder)
    """)
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_import_needs_no_cupy(tmp_path):
    """``import lgm_op`` registers the operator without CuPy: block it and import."""
    probe = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = None   # any import of cupy now fails
        import mxnet as mx, lgm_op
        out = mx.nd.Custom(mx.nd.ones((2, 3)), mx.nd.zeros(2), mx.nd.zeros((4, 3)),
                           mx.nd.zeros((4, 3)), op_type="lgm", num_classes=4)
        print(out[0].shape)
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(2, 4)" in out.stdout


def test_framework_free_layers_import_without_mxnet():
    """The kernel layers load on a machine that has CuPy but no MXNet."""
    probe = textwrap.dedent("""
        import sys
        sys.modules["mxnet"] = None
        import lgm_op, lgm_op.cpu, lgm_op.cuda, lgm_op.reference, lgm_op.kernel_source
        assert not hasattr(lgm_op, "LGMLoss")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
