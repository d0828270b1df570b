"""The compile cache (lgm_op/compile_cache.py): every folder on its path checked, unusable locations
refused with a clear error, cached modules verified before they are loaded, atomic concurrent builds.

Loading a damaged module could kill the process (SIGBUS), so those cases run in child processes with
a timeout; the child loads compile_cache.py by its path, which needs neither MXNet nor the package.
"""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lgm_op import compile_cache
from lgm_op.compile_cache import CacheError, CompileError

MODULE = Path(compile_cache.__file__)
ARGS = ("-shared", "-fPIC", "-O0")
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give folders to another user")
OTHER_UID = 4321


def source(tag, value=42):
    return f'// {tag}\nextern "C" int answer(void) {{ return {value}; }}\n'


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    """A fresh XDG_CACHE_HOME; the cache folders under it are created by the code under test."""
    path = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def private_folder(path, mode=0o700):
    path.mkdir(parents=True)
    path.chmod(mode)
    return path


# ------------------------------------------------------------------------------------------------
# Item 10: every folder on the path
# ------------------------------------------------------------------------------------------------
def test_missing_folders_are_created_private(tmp_path, monkeypatch):
    base = tmp_path / "a" / "b"
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    folder = compile_cache.cache_dir("t")
    assert folder == base / "lgm_op" / "t"
    for path in (tmp_path / "a", base, base / "lgm_op", folder):
        st = path.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (path, oct(st.st_mode))
    assert compile_cache.cache_dir("t") == folder   # the second call finds the same, checked folders


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
@pytest.mark.parametrize("where", ["above", "base", "lgm_op", "namespace"])
def test_a_folder_others_can_write_is_refused(tmp_path, monkeypatch, where, mode):
    base = tmp_path / "above" / "base"
    folders = {"above": tmp_path / "above", "base": base, "lgm_op": base / "lgm_op",
               "namespace": base / "lgm_op" / "t"}
    private_folder(folders["namespace"])
    folders[where].chmod(mode)
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    with pytest.raises(CacheError) as err:
        compile_cache.cache_dir("t")
    message = str(err.value)
    assert "compile cache" in message and str(base / "lgm_op" / "t") in message
    assert f"{folders[where]} is writable by other users (mode {mode:o})" in message


def test_a_sticky_folder_is_safe_only_when_root_owns_it(tmp_path, monkeypatch):
    shared = private_folder(tmp_path / "shared", 0o1777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared / "mine"))
    if os.geteuid() == 0:   # like /tmp: others cannot remove or rename what we create in it
        assert compile_cache.cache_dir("t") == shared / "mine" / "lgm_op" / "t"
        os.chown(shared, OTHER_UID, -1)
    with pytest.raises(CacheError, match=f"{shared} is (owned by uid {OTHER_UID}|writable by other users)"):
        compile_cache.cache_dir("t")


@AS_ROOT
@pytest.mark.parametrize("where", ["above", "base"])
def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch, where):
    base = tmp_path / "above" / "base"
    private_folder(base, 0o755)
    folder = base if where == "base" else base.parent
    os.chown(folder, OTHER_UID, -1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    with pytest.raises(CacheError, match=f"{folder} is owned by uid {OTHER_UID}, not by root or the "
                                         f"current user"):
        compile_cache.cache_dir("t")


@AS_ROOT
@pytest.mark.parametrize("where", ["lgm_op", "namespace"])
def test_cache_folders_of_another_user_are_refused(xdg, where):
    folder = private_folder(xdg / "lgm_op" / "t")
    if where == "lgm_op":
        folder = folder.parent
    os.chown(folder, OTHER_UID, -1)
    with pytest.raises(CacheError, match=f"{folder} is owned by uid {OTHER_UID}, not by the current user"):
        compile_cache.cache_dir("t")


def test_a_link_of_ours_to_a_safe_folder_is_followed(tmp_path, monkeypatch):
    real = private_folder(tmp_path / "real")
    (tmp_path / "link").symlink_to("real")   # relative, as /var/run -> ../run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "link" / "sub" / ".." / "cache"))
    assert compile_cache.cache_dir("t") == real / "cache" / "lgm_op" / "t"


def test_a_link_to_an_unsafe_folder_is_refused(tmp_path, monkeypatch):
    open_folder = private_folder(tmp_path / "open", 0o777)
    (tmp_path / "link").symlink_to(open_folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "link"))
    with pytest.raises(CacheError, match=f"{open_folder} is writable by other users"):
        compile_cache.cache_dir("t")


@AS_ROOT
def test_a_link_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    private_folder(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    os.lchown(link, OTHER_UID, -1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(link))
    with pytest.raises(CacheError, match=f"{link} is a symbolic link owned by uid {OTHER_UID}"):
        compile_cache.cache_dir("t")


def test_cache_folders_that_are_links_are_refused(xdg, tmp_path):
    private_folder(tmp_path / "elsewhere")
    xdg.mkdir(mode=0o700)
    (xdg / "lgm_op").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CacheError, match=f"{xdg / 'lgm_op'} is a symbolic link; the cache's own folders"):
        compile_cache.cache_dir("t")


def test_a_loop_of_links_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    with pytest.raises(CacheError, match="loop of symbolic links"):
        compile_cache.cache_dir("t")


# ------------------------------------------------------------------------------------------------
# Item 12: an unusable location
# ------------------------------------------------------------------------------------------------
def unusable_locations(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    return {
        "a file": (tmp_path / "file", f"{tmp_path / 'file'} is a regular file, not a folder"),
        "under a file": (tmp_path / "file" / "sub", f"{tmp_path / 'file'} is a regular file, not a folder"),
        "under /proc": (Path("/proc/lgm_op_cache"), "/proc/lgm_op_cache does not exist and cannot be created"),
        "a dangling link": (tmp_path / "dangling", f"{tmp_path / 'dangling'} is a symbolic link to "
                                                    f"{tmp_path / 'missing'}, which does not exist"),
    }


@pytest.mark.parametrize("case", ["a file", "under a file", "under /proc", "a dangling link"])
def test_an_unusable_location_names_the_cache_the_path_and_the_cause(tmp_path, monkeypatch, case):
    base, cause = unusable_locations(tmp_path)[case]
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    with pytest.raises(CacheError) as err:
        compile_cache.cache_dir("t")
    message = str(err.value)
    assert message.startswith("lgm_op compile cache: cannot use "), message
    assert f"{base / 'lgm_op' / 't'} (from XDG_CACHE_HOME={base})" in message, message
    assert cause in message, message
    assert not (tmp_path / "missing").exists()   # nothing is created through a dangling link


def test_a_relative_xdg_cache_home_is_ignored_as_the_specification_says(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert compile_cache.cache_dir("t") == tmp_path / "home" / ".cache" / "lgm_op" / "t"
    assert not (tmp_path / "relative").exists()


def test_names_are_checked():
    with pytest.raises(ValueError, match="namespace must be a plain name"):
        compile_cache.cache_dir("../t")
    with pytest.raises(ValueError, match="extra_files names must be plain file names"):
        compile_cache.build_shared_object("t", source("names"), ARGS, extra_files={"../h.h": ""})
    with pytest.raises(TypeError, match="source_text must be a str"):
        compile_cache.build_shared_object("t", source("names").encode(), ARGS)


# ------------------------------------------------------------------------------------------------
# Building, the key, compile errors
# ------------------------------------------------------------------------------------------------
def test_build_is_cached_by_source_arguments_and_files(xdg):
    count = compile_cache.compile_count("t")
    first = compile_cache.build_shared_object("t", source("key"), ARGS)
    assert first.parent == xdg / "lgm_op" / "t" and compile_cache.compile_count("t") == count + 1
    assert compile_cache.load_shared_object(first).answer() == 42
    assert compile_cache.build_shared_object("t", source("key"), ARGS) == first
    assert compile_cache.compile_count("t") == count + 1
    others = {compile_cache.build_shared_object("t", source("key"), (*ARGS, "-DX=1")),
              compile_cache.build_shared_object("t", '#include "v.h"\n' + source("key", "V"), ARGS,
                                                extra_files={"v.h": "#define V 7\n"})}
    assert first not in others and len(others) == 2 and compile_cache.compile_count("t") == count + 3
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, *(p.name for p in others)])


def test_a_compile_error_carries_the_compiler_output_and_leaves_nothing(xdg):
    with pytest.raises(CompileError, match=r"t: g\+\+ failed to compile the source:\n.*source\.cpp:1"):
        compile_cache.build_shared_object("t", "int broken( {\n", ARGS)
    assert list((xdg / "lgm_op" / "t").iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Item 11: a cached module is verified before it is loaded
# ------------------------------------------------------------------------------------------------
CHILD = """
import importlib.util, sys, threading
spec = importlib.util.spec_from_file_location("compile_cache", sys.argv[1])
cc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cc)
results = []
def work():
    path = cc.build_shared_object("t", sys.argv[2], {args!r})
    results.append((cc.load_shared_object(path).answer(), path))
threads = [threading.Thread(target=work) for _ in range(int(sys.argv[3]))]
for t in threads: t.start()
for t in threads: t.join()
for answer, path in results: print(answer, cc.compile_count("t"), path)
""".format(args=ARGS)


def run_children(tmp_path, code, processes=1, threads=1):
    """Start ``processes`` children at once, each building and loading ``code`` from ``threads``
    threads; returns each child's lines (answer, compiles in that child, path)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    children = [subprocess.Popen([sys.executable, str(script), str(MODULE), code, str(threads)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
                for _ in range(processes)]
    out = []
    for child in children:
        try:
            stdout, stderr = child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail("a child building the module did not finish in 120 s")
        assert child.returncode == 0, f"child exit status {child.returncode}:\n{stderr}"
        out.append([line.split() for line in stdout.splitlines()])
    return out


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":   # the loader would map pages past the end of the file: SIGBUS
        data = data[:len(data) // 2]
    elif how == "empty":
        data = b""
    elif how == "one byte changed":   # still loadable, but not what was built
        i = len(data) // 3
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    else:
        data = os.urandom(len(data))
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["truncated", "empty", "one byte changed", "garbage"])
def test_a_damaged_module_is_rebuilt_never_loaded(xdg, tmp_path, how):
    code = source(f"damaged {how}")
    [[(answer, compiles, built)]] = run_children(tmp_path, code)
    assert (answer, compiles) == ("42", "1")
    damage(Path(built), how)
    [[(answer, compiles, rebuilt)]] = run_children(tmp_path, code)
    assert (answer, compiles) == ("42", "1")   # the damaged file was not taken for a cache hit
    folder = Path(built).parent
    assert [p.name for p in folder.iterdir()] == [Path(rebuilt).name]   # the damaged file is gone
    [[(answer, compiles, again)]] = run_children(tmp_path, code)
    assert (answer, compiles, again) == ("42", "0", rebuilt)


def test_load_refuses_a_file_that_does_not_match_its_digest(xdg):
    path = compile_cache.build_shared_object("t", source("load check"), ARGS)
    damage(path, "garbage")
    with pytest.raises(CacheError, match=f"{path} is missing or does not match the digest in its name"):
        compile_cache.load_shared_object(path)
    assert not path.exists()


def test_concurrent_builds_of_one_module_all_get_one_whole_file(xdg, tmp_path):
    results = run_children(tmp_path, source("concurrent"), processes=4, threads=3)
    lines = [line for child in results for line in child]
    assert len(lines) == 12 and {answer for answer, _, _ in lines} == {"42"}
    assert len({path for _, _, path in lines}) == 1
    folder = xdg / "lgm_op" / "t"
    assert [p.name for p in folder.iterdir()] == [Path(lines[0][2]).name]   # no temporary leftovers


# ------------------------------------------------------------------------------------------------
# Through the operator (SPEC 4): an MXNetError naming the cache, and the next call is right
# ------------------------------------------------------------------------------------------------
THROUGH_THE_OP = """
import os, sys
import numpy as np
import mxnet as mx
import lgm_op

rng = np.random.default_rng(7)
n, k, d = 7, 3, 5
args = [mx.nd.array(rng.standard_normal((n, d)), dtype="float64"), mx.nd.array(rng.integers(0, k, n)),
        mx.nd.array(rng.standard_normal((k, d)), dtype="float64"), mx.nd.zeros((k, d), dtype="float64")]
os.environ["XDG_CACHE_HOME"] = sys.argv[1]
try:
    mx.nd.Custom(*args, op_type="lgm", num_classes=k)[0].asnumpy()
    print("no error")
except mx.MXNetError as err:
    print("error:", str(err).splitlines()[-1])
os.environ["XDG_CACHE_HOME"] = sys.argv[2]
simulated = mx.nd.Custom(*args, op_type="lgm", num_classes=k)[0].asnumpy()
os.environ["LGM_OP_CUDASIM"] = "0"
numpy_path = mx.nd.Custom(*args, op_type="lgm", num_classes=k)[0].asnumpy()
print("largest relative difference:", np.max(np.abs(simulated - numpy_path) / np.abs(numpy_path)))
"""


def test_an_unusable_cache_under_the_operator_is_an_mxnet_error_and_the_next_call_is_right(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    script = tmp_path / "through_the_op.py"
    script.write_text(THROUGH_THE_OP)
    env = {**os.environ, "LGM_OP_CUDASIM": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "file"), str(tmp_path / "good")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # MXNet prints the callback's traceback to stdout too; the script's own lines are these two.
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("error:", "largest", "no error"))]
    assert len(lines) == 2, proc.stdout
    assert lines[0] == (f"error: lgm forward: CacheError: lgm_op compile cache: cannot use "
                        f"{tmp_path / 'file' / 'lgm_op' / 'cudasim'} (from XDG_CACHE_HOME={tmp_path / 'file'}): "
                        f"{tmp_path / 'file'} is a regular file, not a folder; set XDG_CACHE_HOME to a "
                        f"private folder"), proc.stdout
    assert float(lines[1].rsplit(" ", 1)[1]) <= 1e-9, proc.stdout   # SPEC 5, float64
