"""A CPU simulator that compiles and runs unmodified CUDA kernel source with g++.

The classes mirror CuPy's ``RawModule`` / ``RawKernel`` so that one launcher drives either a GPU or
this simulator::

    mod = cudasim.RawModule(code=source, options=("-DTILE=16",))
    fn = mod.get_function("lgm_forward_f32")          # an extern "C" __global__ function
    fn(grid, block, (x_array, np.int32(n)), shared_mem=0)

Each CUDA thread runs as a fiber; blocks run one after another. See ``cudasim.h`` for the execution
model and the faults that are detected (raised as :class:`SimError`). Arguments are checked against
the parameter types of the compiled kernel: arrays (C-contiguous NumPy arrays of the matching dtype)
for pointers, NumPy scalars of the exact type for values.

Compiled modules are cached in ``$XDG_CACHE_HOME/lgm_op/cudasim`` (or ``~/.cache/lgm_op/cudasim``)
by :mod:`lgm_op.compile_cache`, which checks every folder on that path and verifies each module
before it is loaded. Nothing here imports MXNet or CuPy.
"""
import ctypes
import json
import os
import platform
import re
import subprocess
import threading
from collections import namedtuple
from pathlib import Path

import numpy as np

from .. import compile_cache
from ..compile_cache import CompileError

__all__ = ["RawModule", "RawKernel", "SimError", "CompileError", "asan_env", "asan_loaded",
           "cache_dir", "compile_count", "kernel_names"]

CXX = "g++"
HEADER = Path(__file__).with_name("cudasim.h")

# -ffp-contract=off: no implicit fused multiply-add (see cudasim.h); -fno-gnu-unique and hidden
# visibility keep every module's statics (its shared memory) its own; -fdata-sections gives each
# function-local static its own section, which the linker script below gathers as shared memory.
CXXFLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-gnu-unique",
            "-fdata-sections", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing")
if platform.machine() in ("x86_64", "AMD64"):
    # The fiber switch returns into code it never called, which a CET shadow stack would reject.
    CXXFLAGS += ("-fcf-protection=none",)
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")

LINKER_SCRIPT = """\
SECTIONS
{
  cudasim_shared : {
    PROVIDE_HIDDEN(__start_cudasim_shared = .);
    KEEP(*(cudasim_shared))
    *(.bss._ZZ*)
    PROVIDE_HIDDEN(__stop_cudasim_shared = .);
  }
}
INSERT BEFORE .bss;
"""

# extern "C" __global__ [__launch_bounds__(...)] void [__launch_bounds__(...)] NAME(
_BOUNDS = r'(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?'
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+' + _BOUNDS + r'void\s+' + _BOUNDS + r'([A-Za-z_]\w*)\s*\(')
_COMMENT = re.compile(r'//[^\n]*|/\*.*?\*/', re.S)
_EXTERN_SHARED = re.compile(r'\bextern\s+__shared__\s+([^;\[\]{}()]*?(?:__align__\s*\(\s*\d+\s*\)[^;\[\]{}()]*?)?)'
                            r'\s*\b([A-Za-z_]\w*)\s*\[\s*\]\s*;')
_ALIGN = re.compile(r'__align__\s*\(\s*\d+\s*\)')

_DTYPE_OF_CODE = {"f4": "float32", "f8": "float64", "i1": "int8", "i2": "int16", "i4": "int32",
                  "i8": "int64", "u1": "uint8", "u2": "uint16", "u4": "uint32", "u8": "uint64",
                  "b1": "bool_"}

Param = namedtuple("Param", "code ctype")


class SimError(RuntimeError):
    """A fault detected while simulating a launch (divergent barrier, deadlock, bad configuration)."""


def compile_count():
    """How many modules this process has compiled (cache hits do not count)."""
    return compile_cache.compile_count("cudasim")


# ------------------------------------------------------------------------------------------------
# Compiler, cache directory, AddressSanitizer
# ------------------------------------------------------------------------------------------------
def _compiler_env():
    """The environment for g++: without a preloaded AddressSanitizer runtime."""
    env = dict(os.environ)
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "libasan" not in p]
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def _run_cxx(*args):
    try:
        return subprocess.run([CXX, *args], capture_output=True, text=True, env=_compiler_env())
    except FileNotFoundError:
        raise CompileError(f"cudasim: the C++ compiler {CXX!r} was not found") from None


def cache_dir():
    """The per-user folder of compiled modules, ``.../lgm_op/cudasim``, created with mode 0700.

    Every folder on the path is checked; raises :class:`lgm_op.compile_cache.CacheError` (a
    RuntimeError) when one belongs to another user or others may write to it, or when the location
    cannot be used.
    """
    return compile_cache.cache_dir("cudasim")


def _libasan():
    out = _run_cxx("-print-file-name=libasan.so").stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        return None
    return os.path.realpath(out)


def asan_env():
    """Environment variables for a child process that loads modules built with ``sanitize=True``.

    Use as ``subprocess.run(..., env={**os.environ, **cudasim.asan_env()})``. Raises RuntimeError when
    g++ has no AddressSanitizer runtime.
    """
    lib = _libasan()
    if lib is None:
        raise RuntimeError(f"cudasim: {CXX} has no AddressSanitizer runtime (libasan.so not found)")
    preload = ":".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    options = ":".join(p for p in ("detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0",
                                   os.environ.get("ASAN_OPTIONS", "")) if p)
    return {"LD_PRELOAD": preload, "ASAN_OPTIONS": options}


def asan_loaded():
    """Whether this process runs with the AddressSanitizer runtime (started with :func:`asan_env`),
    so that modules built with ``sanitize=True`` can be loaded."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libasan" in f.read()
    except OSError:
        return "libasan" in os.environ.get("LD_PRELOAD", "")


# ------------------------------------------------------------------------------------------------
# Source preparation and compilation
# ------------------------------------------------------------------------------------------------
def kernel_names(code):
    """The extern "C" __global__ functions defined or declared in ``code``, in order."""
    text = _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), code)
    names = []
    for m in _KERNEL.finditer(text):
        if m.group(1) not in names:
            names.append(m.group(1))
    return names


def _rewrite_extern_shared(code):
    """``extern __shared__ T name[];`` -> a pointer into the per-module dynamic shared buffer."""
    def repl(m):
        ctype = " ".join(_ALIGN.sub(" ", m.group(1)).split())
        if not ctype:
            return m.group(0)
        text = f"{ctype}* const {m.group(2)} = static_cast<{ctype}*>(::cudasim::dynamic_shared());"
        return text + "\n" * m.group(0).count("\n")   # keep the line numbers of what follows
    return _EXTERN_SHARED.sub(repl, code)


def _macro_flags(options):
    """The -D/-U options among NVRTC-style options; the others (-arch, --use_fast_math, ...) have no
    meaning for g++ and are ignored."""
    if isinstance(options, str):
        options = (options,)
    flags = []
    for opt in options:
        if not isinstance(opt, str):
            raise TypeError(f"cudasim: options must be strings, got {opt!r}")
        for prefix, flag in (("--define-macro=", "-D"), ("--undefine-macro=", "-U"), ("-D", "-D"), ("-U", "-U")):
            if opt.startswith(prefix) and len(opt) > len(prefix):
                flags.append(flag + opt[len(prefix):])
                break
    return flags


def _entry_symbol(index, name):
    """The C identifier of the launch entry of kernel ``name``: an extern "C" name as it is, a
    template name expression (``ns::kernel<float, int>``) by its position."""
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else f"expr{index}"


def _translation_unit(code, names):
    entries = []
    for index, name in enumerate(names):
        symbol = _entry_symbol(index, name)
        entries.append(
            f'extern "C" __attribute__((visibility("default"))) int cudasim_launch__{symbol}('
            f'void* const* a, const long long* c, unsigned long long s, char* e, unsigned long long n)\n'
            f'{{ return ::cudasim::launch(&{name}, {json.dumps(name)}, a, c, s, e, n); }}\n'
            f'extern "C" __attribute__((visibility("default"))) unsigned long long cudasim_signature__{symbol}('
            f'char* b, unsigned long long n)\n'
            f'{{ return ::cudasim::signature(&{name}, b, n); }}\n')
    return ('#include "cudasim.h"\n#line 1 "kernel.cu"\n' + _rewrite_extern_shared(code) +
            '\n#line 1 "cudasim-entries"\n' + "".join(entries))


def _build(source, flags):
    """Compile ``source`` (or find it, verified, in the cache); returns the path of the shared object."""
    files = {"cudasim.h": HEADER.read_text(encoding="utf-8"), "shared.ld": LINKER_SCRIPT}
    return compile_cache.build_shared_object(
        "cudasim", source, (*flags, "-Xlinker", "-T", "-Xlinker", "shared.ld"), extra_files=files,
        compiler=CXX, env=_compiler_env())


# ------------------------------------------------------------------------------------------------
# Modules and kernels
# ------------------------------------------------------------------------------------------------
class RawModule:
    """Compiles CUDA source for the CPU simulator; ``get_function`` returns its kernels.

    ``code``: CUDA source whose kernels are ``extern "C" __global__`` functions and, as with CuPy,
    ``__global__`` templates named by ``name_expressions`` (``"ns::kernel<float, int>"``: each is
    instantiated and found by ``get_function`` under that exact text). ``options``: NVRTC-style
    options; only macro definitions (``-DNAME=VALUE``, ``-UNAME``) matter here. ``sanitize``: build
    with AddressSanitizer; the process must then run with the environment from :func:`asan_env`.
    """

    def __init__(self, code=None, *, options=(), sanitize=False, backend="nvrtc", name_expressions=None,
                 jitify=False, translate_cucomplex=False, enable_cooperative_groups=False, path=None):
        if path is not None or code is None:
            raise ValueError("cudasim: RawModule needs the source text as code=...")
        expressions = tuple(name_expressions or ())
        if any(not isinstance(e, str) or not e.strip() or '"' in e or "\n" in e for e in expressions):
            raise ValueError(f"cudasim: name_expressions must be non-empty one-line strings, got {expressions!r}")
        if not isinstance(code, str):
            raise TypeError("cudasim: code must be a str")
        if sanitize and not asan_loaded():
            raise RuntimeError("cudasim: sanitize=True needs the AddressSanitizer runtime preloaded; run the "
                               "process with the environment from cudasim.asan_env()")
        self.code = code
        self.options = tuple([options] if isinstance(options, str) else options)
        self.sanitize = bool(sanitize)
        self.kernel_names = tuple(kernel_names(code)) + tuple(e for e in expressions
                                                               if e not in kernel_names(code))
        flags = (*CXXFLAGS, *(ASAN_FLAGS if sanitize else ()), *_macro_flags(self.options))
        source = _translation_unit(code, self.kernel_names)
        self.path = _build(source, flags)
        self._lib = compile_cache.load_shared_object(self.path)
        self._kernels = {}
        self._lock = threading.Lock()

    def get_function(self, name):
        """The kernel ``name``: an ``extern "C" __global__`` function or one of the module's
        name expressions."""
        with self._lock:
            if name not in self._kernels:
                if name not in self.kernel_names:
                    raise ValueError(f"cudasim: no kernel named {name!r}; this module has "
                                     f"{', '.join(self.kernel_names) or 'none'} (only extern \"C\" "
                                     f"__global__ functions and name expressions are visible)")
                self._kernels[name] = RawKernel._from_module(self, name)
            return self._kernels[name]


class RawKernel:
    """One kernel; call it as ``kernel(grid, block, args, shared_mem=0)``.

    ``RawKernel(code, name, options=())`` builds a one-kernel module, like CuPy's class.
    """

    def __init__(self, code, name, options=(), *, sanitize=False, **kwargs):
        module = RawModule(code=code, options=options, sanitize=sanitize, **kwargs)
        self._init(module, name)

    @classmethod
    def _from_module(cls, module, name):
        self = cls.__new__(cls)
        self._init(module, name)
        return self

    def _init(self, module, name):
        if name not in module.kernel_names:
            module.get_function(name)   # raises the error that names the kernels there are
        self.module = module
        self.name = name
        lib = module._lib
        symbol = _entry_symbol(module.kernel_names.index(name), name)
        self._launch = getattr(lib, f"cudasim_launch__{symbol}")
        self._launch.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong),
                                 ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_ulonglong)
        self._launch.restype = ctypes.c_int
        sig = getattr(lib, f"cudasim_signature__{symbol}")
        sig.argtypes = (ctypes.c_char_p, ctypes.c_ulonglong)
        sig.restype = ctypes.c_ulonglong
        buf = ctypes.create_string_buffer(int(sig(None, 0)) + 1)
        sig(buf, len(buf))
        self.params = tuple(Param(*entry.split("|", 1)) for entry in buf.value.decode().split(";") if entry)

    def __repr__(self):
        return f"<cudasim.RawKernel {self.name}({', '.join(p.ctype for p in self.params)})>"

    def __call__(self, grid, block, args, *, shared_mem=0, enable_cooperative_groups=False):
        if enable_cooperative_groups:
            raise ValueError("cudasim: cooperative launches are not supported")
        config = (ctypes.c_longlong * 6)(*_dims(grid, "grid", self.name), *_dims(block, "block", self.name))
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise TypeError(f"cudasim: kernel '{self.name}': shared_mem must be a non-negative int, got {shared_mem!r}")
        argv, keep = self._marshal(args)
        err = ctypes.create_string_buffer(1024)
        rc = self._launch(argv, config, min(int(shared_mem), 2**63), err, len(err))   # releases the GIL
        del keep
        if rc != 0:
            raise SimError("cudasim: " + err.value.decode(errors="replace"))

    def _marshal(self, args):
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"cudasim: kernel '{self.name}': args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"cudasim: kernel '{self.name}' takes {len(self.params)} argument(s) "
                            f"({', '.join(p.ctype for p in self.params)}), got {len(args)}")
        argv = (ctypes.c_void_p * max(len(args), 1))()
        keep = []
        for i, (param, arg) in enumerate(zip(self.params, args)):
            where = f"cudasim: kernel '{self.name}' argument {i} ({param.ctype})"
            if param.code.startswith("*"):
                cell = ctypes.c_void_p(self._pointer(where, param.code, arg))
            else:
                data = self._scalar(where, param.code, arg)
                cell = ctypes.create_string_buffer(data, len(data))
            keep.append(cell)
            argv[i] = ctypes.addressof(cell)
        return argv, keep

    @staticmethod
    def _pointer(where, code, arg):
        if arg is None:   # a null pointer, as CuPy passes None
            return None
        if not isinstance(arg, np.ndarray):
            raise TypeError(f"{where}: expected a NumPy array or None, got {type(arg).__name__}")
        const, elem = code[1:2] == "c", code.lstrip("*c")
        if elem == "?":
            raise TypeError(f"{where}: the simulator cannot check arrays for this pointer type")
        if elem != "v" and _code_of(arg.dtype) != elem:
            raise TypeError(f"{where}: expected an array of {_DTYPE_OF_CODE[elem]}, got dtype {arg.dtype}")
        if not arg.flags.c_contiguous:
            raise ValueError(f"{where}: the array is not C-contiguous (use np.ascontiguousarray)")
        if not arg.flags.aligned:
            raise ValueError(f"{where}: the array is not aligned")
        if not const and not arg.flags.writeable:
            raise ValueError(f"{where}: the kernel may write through this pointer but the array is read-only")
        return arg.ctypes.data

    @staticmethod
    def _scalar(where, code, arg):
        if code == "?":
            raise TypeError(f"{where}: the simulator cannot pass values of this parameter type")
        expected = "np." + _DTYPE_OF_CODE[code]
        if not isinstance(arg, np.generic):
            if isinstance(arg, (bool, int, float)):
                raise TypeError(f"{where}: got a Python {type(arg).__name__}, whose C type is ambiguous; "
                                f"pass {expected}(...)")
            raise TypeError(f"{where}: expected {expected}, got {type(arg).__name__}")
        if _code_of(arg.dtype) != code:
            raise TypeError(f"{where}: expected {expected}, got np.{arg.dtype}")
        return arg.tobytes()


def _code_of(dtype):
    if dtype.kind in "fiub" and dtype.isnative:
        return dtype.kind + str(dtype.itemsize)
    return None


def _dims(value, what, kernel):
    """A grid or block size: an int or a tuple of 1 to 3 ints -> three ints."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    if is_int(value):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3 or not all(is_int(v) for v in value):
        raise TypeError(f"cudasim: kernel '{kernel}': {what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = [int(v) for v in value] + [1] * (3 - len(value))
    if any(not 0 < v < 2**62 for v in dims):
        raise SimError(f"cudasim: kernel '{kernel}': bad launch configuration: {what} {tuple(dims)} "
                       f"(every size must be at least 1)")
    return dims
