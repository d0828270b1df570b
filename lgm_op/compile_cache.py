"""The one place where lgm_op compiles native code and keeps the result: a private per-user cache.

A shared object is built from source text and compiler arguments into
``$XDG_CACHE_HOME/lgm_op/<namespace>/`` (``~/.cache/lgm_op/<namespace>/`` when ``XDG_CACHE_HOME``
is unset, empty or relative, as the XDG base-directory specification says), then loaded with
ctypes::

    path = build_shared_object("cudasim", source, ("-O2", "-fPIC", "-shared"))
    lib = load_shared_object(path)

Rules (SPEC section 4; the reasons are in docs/reliability.md, "The compile cache"):

- **Every folder on the path is checked**, from ``/`` down, before anything is read or written:
  each must be a folder (a symbolic link is followed only when the link itself is owned by root or
  the current user; its target is checked the same way), owned by root or the current user, and
  not writable by its group or by other users, except a folder owned by root with the sticky bit
  (``/tmp``), where others cannot remove or rename what we own. ``lgm_op`` and the namespace folder
  must be real folders owned by the current user and writable by nobody else; missing folders are
  created with mode 0700. Anything else raises :class:`CacheError` naming the cache path, the
  folder and what is wrong; there is no fallback to another location, so a misconfigured cache
  never goes unnoticed. Nothing is ever created through a dangling link.
- **A cached module is verified before it is loaded.** The SHA-256 digest of the file is part of
  its name, written when it is built; at lookup and again at load the file is read and hashed, so
  a truncated, empty or altered file is never handed to the dynamic loader (which would map it
  and could die of SIGBUS): it is deleted and built again.
- **Writes are atomic.** Each build runs in its own temporary folder inside the namespace folder
  and the result is renamed into place. The name is a function of the content, so processes and
  threads that build the same module at once all end with one whole, valid file.

Nothing here imports MXNet, NumPy or CuPy.
"""
import ctypes
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

__all__ = ["CacheError", "CompileError", "build_shared_object", "cache_dir", "compile_count",
           "load_shared_object"]

# Bumped when the cache layout or the key changes, so that old entries are simply never matched.
_LAYOUT = "lgm_op compile cache 1"
_NAMESPACE = re.compile(r"[A-Za-z0-9_]+\Z")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
# <namespace>-<32 hex of the build key>-<64 hex of the file's SHA-256>.so
_ENTRY = re.compile(r"(?P<stem>[A-Za-z0-9_]+-[0-9a-f]{32})-(?P<digest>[0-9a-f]{64})\.so\Z")
_MAX_LINKS = 40   # as the kernel's own limit on symbolic links in one path lookup

_count_lock = threading.Lock()
_compiles = {}


class CacheError(RuntimeError):
    """The compile cache cannot be used: its location is unusable or unsafe, or an entry is damaged."""


class CompileError(RuntimeError):
    """The compiler rejected the source; the message carries the compiler output."""


def compile_count(namespace):
    """How many modules of ``namespace`` this process has compiled (cache hits do not count)."""
    with _count_lock:
        return _compiles.get(namespace, 0)


# ------------------------------------------------------------------------------------------------
# Where the cache is, and whether it is safe
# ------------------------------------------------------------------------------------------------
def _cache_base():
    """(the folder the cache lives in, where that folder came from), before any check."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return xdg, f"XDG_CACHE_HOME={xdg}"
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        raise CacheError("lgm_op compile cache: no location: XDG_CACHE_HOME is not an absolute path "
                         f"({xdg!r}) and the home folder is unknown ({home!r}); set XDG_CACHE_HOME "
                         "to a private folder")
    return os.path.join(home, ".cache"), f"the home folder {home}"


class _Walk:
    """Checks and creates the folders of one cache path; ``fail`` raises the error that names it."""

    def __init__(self, cache_path, origin):
        self.cache_path = cache_path
        self.origin = origin
        self.uid = os.geteuid()
        self.links = 0

    def fail(self, folder, reason):
        raise CacheError(f"lgm_op compile cache: cannot use {self.cache_path} (from {self.origin}): "
                         f"{folder} {reason}; set XDG_CACHE_HOME to a private folder")

    def shared(self, path, create):
        """Resolve ``path`` (absolute) folder by folder from ``/``, checking each under the rules for
        folders that others may own; returns the resolved path."""
        current = Path("/")
        self.check_shared(current, os.lstat(current))
        for name in Path(path).parts[1:]:
            if name == "..":
                current = current.parent   # current is resolved, so its parent is the real one
                continue
            st = self.lstat(current / name, create)
            if stat.S_ISLNK(st.st_mode):
                current = self.follow(current / name, st)
            else:
                current = current / name
                self.check_shared(current, st)
        return current

    def own(self, path):
        """Enter or create ``path``, a folder that must be ours alone; returns it."""
        st = self.lstat(path, True)
        if stat.S_ISLNK(st.st_mode):
            self.fail(path, "is a symbolic link; the cache's own folders must be real folders")
        self.check_own(path, st)
        return path

    def lstat(self, path, create):
        try:
            return os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as err:
            self.fail(path, f"cannot be examined ({err.strerror or err})")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass   # made at the same moment by another process or thread: it is checked below
        except OSError as err:
            self.fail(path, f"does not exist and cannot be created ({err.strerror or err})")
        try:
            return os.lstat(path)
        except OSError as err:
            self.fail(path, f"cannot be examined ({err.strerror or err})")

    def follow(self, link, st):
        self.links += 1
        if self.links > _MAX_LINKS:
            self.fail(link, "is part of a loop of symbolic links")
        if st.st_uid not in (0, self.uid):
            self.fail(link, f"is a symbolic link owned by uid {st.st_uid}, not by root or the "
                            f"current user (uid {self.uid})")
        target = os.path.join(link.parent, os.readlink(link))
        try:
            return self.shared(target, create=False)
        except FileNotFoundError:
            self.fail(link, f"is a symbolic link to {target}, which does not exist")

    def check_shared(self, path, st):
        self.check_folder(path, st)
        if st.st_uid not in (0, self.uid):
            self.fail(path, f"is owned by uid {st.st_uid}, not by root or the current user (uid {self.uid})")
        if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            self.fail(path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o}) and is not "
                            f"a root-owned folder with the sticky bit")

    def check_own(self, path, st):
        self.check_folder(path, st)
        if st.st_uid != self.uid:
            self.fail(path, f"is owned by uid {st.st_uid}, not by the current user (uid {self.uid})")
        if st.st_mode & 0o022:
            self.fail(path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); run "
                            f"chmod 700 on it")

    def check_folder(self, path, st):
        if not stat.S_ISDIR(st.st_mode):
            self.fail(path, "is a regular file, not a folder" if stat.S_ISREG(st.st_mode) else
                      "is not a folder (a device, socket or pipe)")


def cache_dir(namespace):
    """The folder of cached modules of ``namespace`` (a plain name such as ``"cudasim"``).

    Every folder on the path is checked (module docstring) and the missing ones are created with
    mode 0700; raises :class:`CacheError` when the location is unusable or unsafe.
    """
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ValueError(f"lgm_op compile cache: namespace must be a plain name of letters, digits "
                         f"and '_', got {namespace!r}")
    base, origin = _cache_base()
    walk = _Walk(os.path.join(base, "lgm_op", namespace), origin)
    folder = walk.shared(base, create=True)
    return walk.own(walk.own(folder / "lgm_op") / namespace)


# ------------------------------------------------------------------------------------------------
# Building, verifying, loading
# ------------------------------------------------------------------------------------------------
def _run(compiler, args, env, cwd=None):
    try:
        return subprocess.run([compiler, *args], capture_output=True, text=True, env=env, cwd=cwd)
    except FileNotFoundError:
        raise CompileError(f"lgm_op compile cache: the compiler {compiler!r} was not found") from None


@lru_cache(maxsize=None)
def _compiler_id(compiler, env_items):
    """The compiler's version line and target: part of every key, so an upgrade rebuilds."""
    env = dict(env_items) if env_items is not None else None
    version = _run(compiler, ("--version",), env).stdout.splitlines()
    machine = _run(compiler, ("-dumpmachine",), env).stdout.strip()
    return (version[0] if version else "unknown") + " " + machine


def _digest_of(fd):
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def _verified(path):
    """Whether ``path`` holds exactly the bytes its name's digest says. A file that does not is
    deleted (unless it was replaced meanwhile), so that it is built again."""
    m = _ENTRY.match(path.name)
    if m is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        good = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and _digest_of(fd) == m.group("digest")
    finally:
        os.close(fd)
    if not good:
        try:
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
        except OSError:
            pass   # already gone: another process found it damaged too
    return good


def build_shared_object(namespace, source_text, compile_args, *, extra_files=None, compiler="g++",
                        env=None):
    """Compile ``source_text`` into a shared object, or find it in the cache; returns its path.

    ``namespace``: the cache folder's name (:func:`cache_dir`). ``source_text``: the C or C++
    translation unit (str), written to ``source.cpp``. ``compile_args``: the compiler's arguments
    before ``-o <output> source.cpp`` (they must make a shared object, e.g. ``-shared -fPIC``).
    ``extra_files``: ``{file name: text}`` written beside the source (headers, a linker script);
    the compiler runs in that folder, so arguments name them relative to it (``-T shared.ld``).
    ``compiler``, ``env``: the program and its environment (``None``: this process's).

    The key of an entry is the source, the extra files, the arguments and the compiler's identity.
    The returned file has been verified against its digest. Raises :class:`CompileError` with the
    compiler's output when the compilation fails, :class:`CacheError` when the cache is unusable.
    """
    if not isinstance(source_text, str):
        raise TypeError(f"lgm_op compile cache: source_text must be a str, got {type(source_text).__name__}")
    args = tuple(compile_args)
    if not all(isinstance(a, str) for a in args):
        raise TypeError(f"lgm_op compile cache: compile_args must be strings, got {args!r}")
    files = dict(extra_files or {})
    for name, text in files.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name) or name == "source.cpp":
            raise ValueError(f"lgm_op compile cache: extra_files names must be plain file names other "
                             f"than 'source.cpp', got {name!r}")
        if not isinstance(text, str):
            raise TypeError(f"lgm_op compile cache: extra_files[{name!r}] must be a str, got "
                            f"{type(text).__name__}")
    env_items = tuple(sorted(env.items())) if env is not None else None
    folder = cache_dir(namespace)
    key = hashlib.sha256(json.dumps([_LAYOUT, compiler, _compiler_id(compiler, env_items), args,
                                     source_text, sorted(files.items())]).encode()).hexdigest()
    stem = f"{namespace}-{key[:32]}"
    for entry in sorted(folder.glob(stem + "-*.so")):
        if _verified(entry):
            return entry
    build = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    try:
        for name, text in {**files, "source.cpp": source_text}.items():
            (build / name).write_text(text, encoding="utf-8")
        proc = _run(compiler, (*args, "-o", "module.so", "source.cpp"), env, cwd=build)
        if proc.returncode != 0:
            raise CompileError(f"{namespace}: {compiler} failed to compile the source:\n" + proc.stderr.strip())
        fd = os.open(build / "module.so", os.O_RDONLY | os.O_CLOEXEC)
        try:
            digest = _digest_of(fd)
        finally:
            os.close(fd)
        target = folder / f"{stem}-{digest}.so"
        os.replace(build / "module.so", target)   # atomic; a concurrent build wrote the same bytes
    finally:
        shutil.rmtree(build, ignore_errors=True)
    with _count_lock:
        _compiles[namespace] = _compiles.get(namespace, 0) + 1
    return target


def load_shared_object(path):
    """Load a module returned by :func:`build_shared_object` with ctypes, after checking that the
    file still holds the bytes its digest names; returns the ``ctypes.CDLL``.

    Raises :class:`CacheError` when the file is damaged or missing (it is then deleted, so the next
    build makes it again) or when the dynamic loader refuses it (e.g. a cache on a ``noexec`` mount).
    """
    path = Path(path)
    if not _verified(path):
        raise CacheError(f"lgm_op compile cache: {path} is missing or does not match the digest in its "
                         f"name (truncated or altered); it has been removed, build it again")
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        raise CacheError(f"lgm_op compile cache: the dynamic loader refused {path}: {err} (is the "
                         f"cache on a file system mounted noexec? set XDG_CACHE_HOME to another "
                         f"private folder)") from None
