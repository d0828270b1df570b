"""The CPU simulator: real CUDA source compiled with g++, one fiber per CUDA thread."""
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lgm_op import cudasim

REPO = Path(__file__).resolve().parent.parent

# The tiled matrix multiply every other test leans on. Its two barriers are macros so the fault
# tests can compile it with one of them missing.
MATMUL = r"""
#define TILE 16
#ifndef FIRST_BARRIER
#define FIRST_BARRIER __syncthreads()
#endif
#ifndef SECOND_BARRIER
#define SECOND_BARRIER __syncthreads()
#endif

extern "C" __global__ void matmul(const float* A, const float* B, float* C, int M, int N, int K)
{
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int t = 0; t < K; t += TILE) {
        As[ty][tx] = (row < M && t + tx < K) ? A[row * K + t + tx] : 0.0f;
        Bs[ty][tx] = (col < N && t + ty < K) ? B[(t + ty) * N + col] : 0.0f;
        FIRST_BARRIER;
        for (int k = 0; k < TILE; ++k)
            acc = fmaf(As[ty][k], Bs[k][tx], acc);
        SECOND_BARRIER;
    }
    if (row < M && col < N)
        C[row * N + col] = acc;
}

"""

# Kernels that are correct; each test below drives one or two of them.
GOOD = MATMUL + r"""
__device__ __forceinline__ float warp_sum(float v)
{
    for (int offset = warpSize / 2; offset > 0; offset /= 2)
        v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// One partial sum per block: grid-stride loop, warp shuffles, then the warps' sums via shared memory.
extern "C" __global__ void __launch_bounds__(256) block_sum(const float* x, float* out, long long n)
{
    __shared__ float warp_sums[32];
    float v = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
        v += x[i];
    v = warp_sum(v);
    const unsigned lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x + warpSize - 1) / warpSize ? warp_sums[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

// Butterfly all-reduce inside segments of `width` lanes: every lane ends with its segment's sum and max.
extern "C" __global__ void butterfly(const double* x, double* sums, int* maxima, int width)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    double s = x[i];
    int m = (int)x[i];
    for (int mask = width / 2; mask > 0; mask /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, mask, width);
        m = max(m, __shfl_xor_sync(0xffffffffu, m, mask, width));
    }
    sums[i] = s;
    maxima[i] = m;
}

// Lane i reads lane i-1 (up), i+1 (down) and lane 3 (broadcast) of its warp.
extern "C" __global__ void shuffles(const long long* x, long long* up, long long* down, float* bcast)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    up[i] = __shfl_up_sync(0xffffffffu, x[i], 1);
    down[i] = __shfl_down_sync(0xffffffffu, x[i], 1);
    bcast[i] = __shfl_sync(0xffffffffu, (float)x[i], 3);
}

extern "C" __global__ void votes(const int* flags, unsigned* ballots, int* any, int* all, int* count)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int f = flags[i];
    ballots[i] = __ballot_sync(0xffffffffu, f);
    any[i] = __any_sync(0xffffffffu, f);
    all[i] = __all_sync(0xffffffffu, f);
    count[i] = __syncthreads_count(f);
}

extern "C" __global__ void atomics(const float* xf, const double* xd, const int* xi, float* sum_f,
                                   double* sum_d, int* min_i, unsigned* max_u, unsigned long long* total, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(sum_f, xf[i]);
    atomicAdd(sum_d, xd[i]);
    atomicMin(min_i, xi[i]);
    atomicMax(max_u, (unsigned)(xi[i] & 0xffff));
    atomicAdd(total, 1ull);
}

// Reverses each block's chunk through dynamically sized shared memory.
extern "C" __global__ void reverse_blocks(const float* x, float* y)
{
    extern __shared__ float buf[];
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    buf[t] = x[base + t];
    __syncthreads();
    y[base + t] = buf[blockDim.x - 1 - t];
}

// A template with a __shared__ staging array, behind extern "C" wrappers.
template <typename T>
__device__ void scale_shift(const T* x, T* y, T a, T b, int n)
{
    __shared__ T stage[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    stage[threadIdx.x] = i < n ? x[i] : T(0);
    __syncthreads();
    if (i < n) y[i] = a * stage[threadIdx.x] + b;
}
extern "C" __global__ void scale_shift_f32(const float* x, float* y, float a, float b, int n) { scale_shift(x, y, a, b, n); }
extern "C" __global__ void scale_shift_f64(const double* x, double* y, double a, double b, int n) { scale_shift(x, y, a, b, n); }

// Built-ins, in a kernel that also compiles with NVRTC.
extern "C" __global__ void builtins(const float* x, float* y, int* iy, unsigned long long* idx)
{
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const size_t g = (size_t)b * (blockDim.x * blockDim.y * blockDim.z) + t;
    const float v = __ldg(&x[g]);
    y[g] = rsqrtf(fabsf(v) + 1.0f) + __expf(-fabsf(v)) + __logf(2.0f + v * v) + __fdividef(v, 3.0f)
         + sqrtf(fmaxf(v, 0.0f)) + fminf(v, 0.5f) + (isnan(v) ? 1.0f : 0.0f) + min(v, 1.0f);
    iy[g] = __float2int_rn(v * 3.0f) + __float_as_int(__int_as_float(7)) + max(1, 2) + min(3u, 4u);
    int64_t packed = ((int64_t)b << 32) | t;
    idx[g] = (unsigned long long)packed;
    __threadfence();
    __threadfence_block();
    __syncwarp();
}
"""

# Kernels with planted faults the simulator has to expose.
FAULTY = MATMUL + r"""
// Tree reduction written for 256 threads; launched with fewer, it reads slots nobody wrote.
extern "C" __global__ void tree_sum_256(const float* x, float* out)
{
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int stride = 128; stride > 0; stride /= 2) {
        if (t < stride) s[t] += s[t + stride];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void divergent(float* y)
{
    if (threadIdx.x < 64) {
        y[threadIdx.x] = 1.0f;
        __syncthreads();
    } else {
        y[threadIdx.x] = 2.0f;
        __syncthreads();
    }
}

// Half a warp shuffles with the other half, which waits at a barrier instead.
extern "C" __global__ void shuffle_deadlock(float* y)
{
    float v = y[threadIdx.x];
    if (threadIdx.x % 32 < 16)
        v = __shfl_sync(0xffffffffu, v, 0);
    __syncthreads();
    y[threadIdx.x] = v;
}

extern "C" __global__ void warp_divergent(float* y)
{
    float v = y[threadIdx.x];
    if (threadIdx.x < 16)
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    else
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}

extern "C" __global__ void mask_without_self(float* y)
{
    y[threadIdx.x] = __shfl_sync(0x0000ffffu, y[threadIdx.x], 0);
}

extern "C" __global__ void copy(const float* x, float* y, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}
"""


@pytest.fixture(scope="module")
def good():
    return cudasim.RawModule(code=GOOD)


@pytest.fixture(scope="module")
def faulty():
    return cudasim.RawModule(code=FAULTY)


def run_matmul(fn, A, B, tile=16):
    M, K = A.shape
    N = B.shape[1]
    C = np.full((M, N), -1.0, np.float32)
    grid = ((N + tile - 1) // tile, (M + tile - 1) // tile)
    fn(grid, (tile, tile), (A, B, C, np.int32(M), np.int32(N), np.int32(K)))
    return C


def random_matrices(rng, M, N, K):
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    return A, B


# ------------------------------------------------------------------------------------------------
# Correct kernels
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(37, 45, 53), (16, 16, 16), (1, 70, 5), (33, 1, 17)])
def test_tiled_matmul_matches_numpy(good, rng, shape):
    M, N, K = shape
    A, B = random_matrices(rng, M, N, K)
    C = run_matmul(good.get_function("matmul"), A, B)
    np.testing.assert_allclose(C, A.astype(np.float64) @ B.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_tiled_matmul_timing(good, rng):
    """12 blocks of 256 threads, 20 barriers each: print how long one launch takes (not asserted)."""
    A, B = random_matrices(rng, 48, 64, 160)
    fn = good.get_function("matmul")
    run_matmul(fn, A, B)   # first launch maps the fiber stacks
    times = []
    for _ in range(10):
        start = time.perf_counter()
        C = run_matmul(fn, A, B)
        times.append(time.perf_counter() - start)
    print(f"\ncudasim tiled matmul, 12 blocks x 256 threads x 20 barriers: "
          f"best {min(times) * 1e3:.2f} ms, median {sorted(times)[5] * 1e3:.2f} ms per launch")
    np.testing.assert_allclose(C, A.astype(np.float64) @ B.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_ucontext_fallback_gives_identical_results(rng):
    mod = cudasim.RawModule(code=GOOD, options=("-DCUDASIM_USE_UCONTEXT",))
    A, B = random_matrices(rng, 40, 33, 50)
    default = cudasim.RawModule(code=GOOD)
    assert mod.path != default.path   # options are part of the cache key
    fast = run_matmul(default.get_function("matmul"), A, B)
    np.testing.assert_array_equal(run_matmul(mod.get_function("matmul"), A, B), fast)


@pytest.mark.parametrize("n, grid", [(10_000, 7), (100, 3), (256, 1)])
def test_block_reduction_with_shuffles(good, rng, n, grid):
    x = rng.standard_normal(n).astype(np.float32)
    out = np.zeros(grid, np.float32)
    good.get_function("block_sum")(grid, 256, (x, out, np.int64(n)))
    expect = [x[b * 256:][np.arange(len(x[b * 256:])) % (256 * grid) < 256].astype(np.float64).sum()
              for b in range(grid)]
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-4)
    assert np.isclose(out.sum(), x.astype(np.float64).sum(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("width", [32, 8, 2])
def test_shfl_xor_butterfly(good, rng, width):
    x = rng.integers(-1000, 1000, size=96).astype(np.float64)
    sums = np.zeros_like(x)
    maxima = np.zeros(96, np.int32)
    good.get_function("butterfly")(3, 32, (x, sums, maxima, np.int32(width)))
    groups = x.reshape(-1, width)
    np.testing.assert_array_equal(sums, np.repeat(groups.sum(axis=1), width))
    np.testing.assert_array_equal(maxima, np.repeat(groups.max(axis=1), width))


def test_shfl_up_down_and_broadcast(good):
    x = np.arange(64, dtype=np.int64) * 10
    up, down = np.zeros_like(x), np.zeros_like(x)
    bcast = np.zeros(64, np.float32)
    good.get_function("shuffles")(1, 64, (x, up, down, bcast))
    lane = np.arange(64) % 32
    np.testing.assert_array_equal(up, np.where(lane == 0, x, x - 10))       # lane 0 keeps its own value
    np.testing.assert_array_equal(down, np.where(lane == 31, x, x + 10))    # so does lane 31
    np.testing.assert_array_equal(bcast, x[(np.arange(64) // 32) * 32 + 3])


def test_votes_and_syncthreads_count(good, rng):
    flags = (rng.random(64) < 0.5).astype(np.int32)
    flags[32:] = 1
    ballots = np.zeros(64, np.uint32)
    any_, all_, count = (np.zeros(64, np.int32) for _ in range(3))
    good.get_function("votes")(1, 64, (flags, ballots, any_, all_, count))
    for w in range(2):
        f = flags[w * 32:(w + 1) * 32]
        bits = sum(int(v) << i for i, v in enumerate(f))
        assert set(ballots[w * 32:(w + 1) * 32]) == {bits}
        assert set(any_[w * 32:(w + 1) * 32]) == {int(f.any())}
        assert set(all_[w * 32:(w + 1) * 32]) == {int(f.all())}
    assert set(count) == {int(flags.sum())}


def test_atomics_from_many_blocks(good, rng):
    n = 3000
    xf = rng.integers(-8, 9, size=n).astype(np.float32)        # small integers: every order sums exactly
    xd = rng.standard_normal(n) * 2.0 ** -10
    xd = np.round(xd * 2.0 ** 20) / 2.0 ** 20
    xi = rng.integers(-10**6, 10**6, size=n).astype(np.int32)
    sum_f, sum_d = np.zeros(1, np.float32), np.zeros(1, np.float64)
    min_i, max_u = np.array([2**31 - 1], np.int32), np.zeros(1, np.uint32)
    total = np.zeros(1, np.uint64)
    good.get_function("atomics")((n + 127) // 128, 128,
                                 (xf, xd, xi, sum_f, sum_d, min_i, max_u, total, np.int32(n)))
    assert sum_f[0] == xf.sum()
    assert sum_d[0] == xd.sum()
    assert min_i[0] == xi.min()
    assert max_u[0] == (xi.astype(np.int64) & 0xFFFF).max()
    assert total[0] == n


def test_dynamic_shared_memory(good, rng):
    block, grid = 96, 5
    x = rng.standard_normal(block * grid).astype(np.float32)
    y = np.zeros_like(x)
    good.get_function("reverse_blocks")(grid, block, (x, y), shared_mem=block * 4)
    np.testing.assert_array_equal(y, x.reshape(grid, block)[:, ::-1].ravel())


@pytest.mark.parametrize("name, dtype", [("scale_shift_f32", np.float32), ("scale_shift_f64", np.float64)])
def test_template_instances(good, rng, name, dtype):
    n = 150
    x = rng.standard_normal(n).astype(dtype)
    y = np.zeros_like(x)
    fn = good.get_function(name)
    fn((n + 63) // 64, 64, (x, y, dtype(2.5), dtype(-1.0), np.int32(n)))
    np.testing.assert_array_equal(y, dtype(2.5) * x + dtype(-1.0))
    assert [p.ctype for p in fn.params][:2] == [f"const {'float' if dtype == np.float32 else 'double'}*",
                                                 "float*" if dtype == np.float32 else "double*"]


TEMPLATES = r"""
namespace ops {
// y = a x + (bias ? bias : 0): a __global__ template found by name expression, with a pointer that
// may be null.
template <typename T, int kScale>
__global__ void axpy(const T* x, const T* bias, T* y, T a, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = T(kScale) * a * x[i] + (bias ? bias[i] : T(0));
}
}  // namespace ops
"""


def test_template_kernels_by_name_expression(rng):
    names = ["ops::axpy<float, 1>", "ops::axpy<double, 2>"]
    mod = cudasim.RawModule(code=TEMPLATES, name_expressions=names)
    assert list(mod.kernel_names) == names
    for name, dtype, scale in zip(names, (np.float32, np.float64), (1, 2)):
        fn = mod.get_function(name)
        assert fn.params[3].code == np.dtype(dtype).kind + str(np.dtype(dtype).itemsize)
        x = rng.standard_normal(100).astype(dtype)
        bias = rng.standard_normal(100).astype(dtype)
        y = np.zeros(100, dtype)
        fn((2,), (64,), (x, None, y, dtype(3), np.int32(100)))
        np.testing.assert_array_equal(y, dtype(scale) * dtype(3) * x)
        fn((2,), (64,), (x, bias, y, dtype(3), np.int32(100)))
        np.testing.assert_array_equal(y, dtype(scale) * dtype(3) * x + bias)
    with pytest.raises(ValueError, match=r"no kernel named 'ops::axpy<int, 1>'"):
        mod.get_function("ops::axpy<int, 1>")
    with pytest.raises(ValueError, match="name_expressions must be non-empty one-line strings"):
        cudasim.RawModule(code=TEMPLATES, name_expressions=[""])


def test_builtins_and_3d_launch(good, rng):
    grid, block = (2, 3, 2), (4, 2, 3)
    total = 2 * 3 * 2 * 4 * 2 * 3
    x = rng.standard_normal(total).astype(np.float32)
    y, iy, idx = np.zeros(total, np.float32), np.zeros(total, np.int32), np.zeros(total, np.uint64)
    good.get_function("builtins")(grid, block, (x, y, iy, idx))
    a = np.abs(x)
    expect = (np.float32(1) / np.sqrt(a + np.float32(1)) + np.exp(-a) + np.log(np.float32(2) + x * x) + x / np.float32(3)
              + np.sqrt(np.maximum(x, 0)) + np.minimum(x, np.float32(0.5)) + np.minimum(x, np.float32(1)))
    np.testing.assert_allclose(y, expect, rtol=1e-5)
    np.testing.assert_array_equal(iy, np.rint(x * np.float32(3)).astype(np.int32) + 7 + 2 + 3)
    blocks, threads = np.divmod(np.arange(total), 24)
    np.testing.assert_array_equal(idx, (blocks.astype(np.uint64) << np.uint64(32)) | threads.astype(np.uint64))


def test_kernel_name_discovery():
    code = '''
    extern "C" __global__ void plain(float* y) {}
    extern "C" __global__ void __launch_bounds__(256) bounded_after(float* y) {}
    extern "C" __global__ __launch_bounds__(MAX_THREADS(2), 4) void bounded_before(float* y) {}
    extern "C"
    __global__
    void split_lines(float* y);
    // extern "C" __global__ void commented_out(float* y) {}
    /* extern "C" __global__ void also_commented(float* y) {} */
    __global__ void not_extern_c(float* y) {}
    extern "C" __device__ void not_a_kernel(float* y) {}
    extern "C" __global__ void plain(float* y);
    '''
    assert cudasim.kernel_names(code) == ["plain", "bounded_after", "bounded_before", "split_lines"]


def test_extern_shared_rewrite_keeps_lines():
    from lgm_op.cudasim import _rewrite_extern_shared
    code = ("extern __shared__ float a[];\n"
            "  extern __shared__ __align__(16) unsigned char b [ ] ;\n"
            "extern __shared__ volatile double\n c[];\nint after;\n")
    out = _rewrite_extern_shared(code)
    assert "float* const a = static_cast<float*>(::cudasim::dynamic_shared());" in out
    assert "unsigned char* const b = static_cast<unsigned char*>(::cudasim::dynamic_shared());" in out
    assert "volatile double* const c = static_cast<volatile double*>(::cudasim::dynamic_shared());" in out
    assert out.count("\n") == code.count("\n") and out.splitlines()[-1] == "int after;"


def test_raw_kernel_and_module_lookup(good):
    fn = good.get_function("matmul")
    assert fn.name == "matmul" and "matmul" in repr(fn)
    assert good.get_function("matmul") is fn
    alone = cudasim.RawKernel(GOOD, "matmul")   # CuPy's one-kernel form; same source, cached module
    assert alone.module.path == good.path and alone.params == fn.params
    assert set(good.kernel_names) >= {"matmul", "block_sum", "butterfly", "scale_shift_f32"}
    with pytest.raises(ValueError, match="no kernel named 'scale_shift'"):
        good.get_function("scale_shift")


# ------------------------------------------------------------------------------------------------
# Argument checking
# ------------------------------------------------------------------------------------------------
def test_argument_checks(good):
    fn = good.get_function("scale_shift_f32")
    x, y = np.zeros(8, np.float32), np.zeros(8, np.float32)
    ok = (x, y, np.float32(1), np.float32(0), np.int32(8))
    fn(1, 64, ok)

    with pytest.raises(TypeError, match=r"'scale_shift_f32' argument 1 \(float\*\): expected an array of float32, got dtype float64"):
        fn(1, 64, (x, y.astype(np.float64), np.float32(1), np.float32(0), np.int32(8)))
    with pytest.raises(TypeError, match=r"argument 4 \(int\): got a Python int, whose C type is ambiguous; pass np.int32"):
        fn(1, 64, (x, y, np.float32(1), np.float32(0), 8))
    with pytest.raises(TypeError, match=r"argument 2 \(float\): got a Python float"):
        fn(1, 64, (x, y, 1.0, np.float32(0), np.int32(8)))
    with pytest.raises(TypeError, match=r"argument 4 \(int\): expected np.int32, got np.int64"):
        fn(1, 64, (x, y, np.float32(1), np.float32(0), np.int64(8)))
    with pytest.raises(TypeError, match=r"argument 2 \(float\): expected np.float32, got np.float64"):
        fn(1, 64, (x, y, np.float64(1), np.float32(0), np.int32(8)))
    with pytest.raises(TypeError, match=r"'scale_shift_f32' takes 5 argument\(s\) \(const float\*, float\*, float, float, int\), got 4"):
        fn(1, 64, ok[:4])
    with pytest.raises(ValueError, match=r"argument 0 \(const float\*\): the array is not C-contiguous"):
        fn(1, 64, (np.zeros(16, np.float32)[::2], y, np.float32(1), np.float32(0), np.int32(8)))
    with pytest.raises(TypeError, match=r"argument 0 \(const float\*\): expected a NumPy array or None, got list"):
        fn(1, 64, ([0.0] * 8, y, np.float32(1), np.float32(0), np.int32(8)))
    readonly = np.zeros(8, np.float32)
    readonly.flags.writeable = False
    fn(1, 64, (readonly, y, np.float32(1), np.float32(0), np.int32(8)))   # fine behind const float*
    with pytest.raises(ValueError, match=r"argument 1 \(float\*\): the kernel may write"):
        fn(1, 64, (x, readonly, np.float32(1), np.float32(0), np.int32(8)))
    with pytest.raises(TypeError, match="grid must be an int or a tuple"):
        fn(1.0, 64, ok)

    atom = good.get_function("atomics")
    with pytest.raises(TypeError, match=r"argument 7 \(long long unsigned int\*\): expected an array of uint64, got dtype int64"):
        atom(1, 32, (x, np.zeros(8), np.zeros(8, np.int32), x, np.zeros(1), np.zeros(1, np.int32),
                     np.zeros(1, np.uint32), np.zeros(1, np.int64), np.int32(0)))


def test_bad_launch_configurations(good):
    fn = good.get_function("scale_shift_f32")
    args = (np.zeros(8, np.float32), np.zeros(8, np.float32), np.float32(1), np.float32(0), np.int32(8))
    with pytest.raises(cudasim.SimError, match=r"blockDim.x = 2048"):
        fn(1, 2048, args)
    with pytest.raises(cudasim.SimError, match=r"2048 threads per block"):
        fn(1, (32, 32, 2), args)
    with pytest.raises(cudasim.SimError, match=r"blockDim.z = 65"):
        fn(1, (1, 1, 65), args)
    with pytest.raises(cudasim.SimError, match=r"bad launch configuration: grid \(0, 1, 1\)"):
        fn(0, 64, args)
    with pytest.raises(cudasim.SimError, match=r"dynamic shared memory"):
        fn(1, 64, args, shared_mem=64 * 1024)
    fn(1, 64, args)


# ------------------------------------------------------------------------------------------------
# Planted faults
# ------------------------------------------------------------------------------------------------
def test_missing_first_barrier_reads_poisoned_shared_memory(rng):
    mod = cudasim.RawModule(code=FAULTY, options=("-DFIRST_BARRIER=(void)0",))
    A, B = random_matrices(rng, 37, 45, 53)
    C = run_matmul(mod.get_function("matmul"), A, B)
    assert np.isnan(C).any()


def test_missing_second_barrier_gives_wrong_result(rng):
    mod = cudasim.RawModule(code=FAULTY, options=("-DSECOND_BARRIER=(void)0",))
    A, B = random_matrices(rng, 37, 45, 53)
    C = run_matmul(mod.get_function("matmul"), A, B)
    assert not np.allclose(C, A.astype(np.float64) @ B.astype(np.float64), rtol=1e-3, atol=1e-3)


def test_planted_fault_kernels_are_right_when_used_right(faulty, rng):
    A, B = random_matrices(rng, 37, 45, 53)
    np.testing.assert_allclose(run_matmul(faulty.get_function("matmul"), A, B),
                               A.astype(np.float64) @ B.astype(np.float64), rtol=1e-5, atol=1e-5)
    x = rng.standard_normal(512).astype(np.float32)
    out = np.zeros(2, np.float32)
    faulty.get_function("tree_sum_256")(2, 256, (x, out))
    np.testing.assert_allclose(out, x.reshape(2, 256).astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-5)


def test_reduction_reading_unwritten_slot_gives_nan(faulty, rng):
    x = rng.standard_normal(400).astype(np.float32)
    out = np.zeros(2, np.float32)
    faulty.get_function("tree_sum_256")(2, 200, (x, out))   # s[200..255] never written
    assert np.isnan(out).all()


def test_divergent_syncthreads_raises_and_next_launch_works(faulty):
    y = np.zeros(128, np.float32)
    with pytest.raises(cudasim.SimError) as err:
        faulty.get_function("divergent")(1, 128, (y,))
    message = str(err.value)
    assert "divergent __syncthreads" in message and "kernel 'divergent'" in message
    assert "block (0,0,0)" in message and "thread (0,0,0)" in message and "thread (64,0,0)" in message
    x = np.arange(100, dtype=np.float32)
    z = np.zeros_like(x)
    faulty.get_function("copy")(4, 32, (x, z, np.int32(100)))
    np.testing.assert_array_equal(z, x)


def test_deadlock_raises_and_next_launch_works(faulty):
    y = np.zeros(64, np.float32)
    with pytest.raises(cudasim.SimError, match=r"deadlock.*__shfl_sync.*mask 0xffffffff|deadlock.*__syncthreads"):
        faulty.get_function("shuffle_deadlock")(1, 64, (y,))
    for _ in range(2):   # the abandoned fibers leave nothing behind
        x = np.arange(64, dtype=np.float32)
        z = np.zeros_like(x)
        faulty.get_function("copy")(2, 32, (x, z, np.int32(64)))
        np.testing.assert_array_equal(z, x)


@pytest.mark.parametrize("name, message", [
    ("warp_divergent", r"divergent warp operations: thread \(0,0,0\) waits in __shfl_xor_sync at line \d+ "
                       r"with mask 0xffffffff but thread \(16,0,0\) in __shfl_xor_sync at line \d+"),
    ("mask_without_self", r"thread \(16,0,0\) \(lane 16\) calls __shfl_sync at line \d+ with mask 0x0000ffff, "
                          r"which does not include its own lane"),
])
def test_bad_warp_operations_raise(faulty, name, message):
    with pytest.raises(cudasim.SimError, match=message):
        faulty.get_function(name)(1, 32, (np.zeros(32, np.float32),))


ASAN_CHILD = textwrap.dedent(r'''
    import sys
    sys.modules["mxnet"] = None   # lgm_op imports MXNet when present; this child does not need it
    import numpy as np
    from lgm_op import cudasim
    from tests.test_cudasim import GOOD, FAULTY
    rng = np.random.default_rng(1)
    good = cudasim.RawModule(code=GOOD, sanitize=True)
    A = rng.standard_normal((37, 53)).astype(np.float32)
    B = rng.standard_normal((53, 45)).astype(np.float32)
    C = np.zeros((37, 45), np.float32)
    good.get_function("matmul")((3, 3), (16, 16), (A, B, C, np.int32(37), np.int32(45), np.int32(53)))
    assert np.allclose(C, A.astype(np.float64) @ B.astype(np.float64), rtol=1e-5, atol=1e-5)
    faulty = cudasim.RawModule(code=FAULTY + r"""
    extern "C" __global__ void read_past_end(const float* x, float* y, int n)
    {
        const int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) y[i] = x[i + 8];
    }
    """, sanitize=True)
    try:
        faulty.get_function("divergent")(1, 128, (np.zeros(128, np.float32),))
    except cudasim.SimError:
        print("divergence detected", flush=True)
    good.get_function("matmul")((3, 3), (16, 16), (A, B, C, np.int32(37), np.int32(45), np.int32(53)))
    print("clean launches passed", flush=True)
    x, y = np.arange(100, dtype=np.float32), np.zeros(100, np.float32)
    faulty.get_function("read_past_end")(1, 128, (x, y, np.int32(100)))
    print("out-of-range read went unnoticed", flush=True)
''')


def test_out_of_range_read_caught_by_address_sanitizer():
    try:
        env = cudasim.asan_env()
    except RuntimeError as exc:
        pytest.skip(f"AddressSanitizer runtime unavailable: {exc}")
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", ASAN_CHILD], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "divergence detected" in proc.stdout and "clean launches passed" in proc.stdout, proc.stderr[-4000:]
    assert "went unnoticed" not in proc.stdout
    assert proc.returncode != 0
    assert "AddressSanitizer" in proc.stderr and "heap-buffer-overflow" in proc.stderr, proc.stderr[-4000:]


def test_sanitize_requires_preloaded_runtime():
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("this process runs with AddressSanitizer")
    with pytest.raises(RuntimeError, match="asan_env"):
        cudasim.RawModule(code=GOOD, sanitize=True)


# ------------------------------------------------------------------------------------------------
# Threads and the cache
# ------------------------------------------------------------------------------------------------
def test_concurrent_launches_from_threads(good, faulty, rng):
    A, B = random_matrices(rng, 37, 45, 53)
    expect_good = run_matmul(good.get_function("matmul"), A, B)
    expect_faulty = run_matmul(faulty.get_function("matmul"), A, B)
    results, errors = [], []

    def work(k):
        try:
            module, expect = (good, expect_good) if k % 2 else (faulty, expect_faulty)
            for _ in range(4):
                results.append(np.array_equal(run_matmul(module.get_function("matmul"), A, B), expect))
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [True] * 32


def test_cache_directory_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code = 'extern "C" __global__ void one(int* y) { y[threadIdx.x] = 1; }\n'
    before = cudasim.compile_count()
    first = cudasim.RawModule(code=code)
    folder = tmp_path / "xdg" / "lgm_op" / "cudasim"
    assert first.path.parent == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "xdg" / "lgm_op").stat().st_mode) == 0o700
    assert cudasim.compile_count() == before + 1
    mtime = first.path.stat().st_mtime_ns
    second = cudasim.RawModule(code=code)
    assert cudasim.compile_count() == before + 1
    assert second.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert [p.name for p in folder.iterdir()] == [first.path.name]   # no build leftovers
    y = np.zeros(4, np.int32)
    second.get_function("one")(1, 4, (y,))
    assert y.tolist() == [1, 1, 1, 1]

    # A damaged entry (here: in a second cache directory) is rebuilt, under the same name.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    damaged = tmp_path / "other" / "lgm_op" / "cudasim" / first.path.name
    damaged.parent.mkdir(mode=0o700, parents=True)
    damaged.write_bytes(b"not a shared object")
    third = cudasim.RawModule(code=code)
    assert third.path == damaged and cudasim.compile_count() == before + 2
    third.get_function("one")(1, 2, (y,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    os.chmod(folder, 0o777)
    with pytest.raises(RuntimeError, match="writable by other users"):
        cudasim.RawModule(code=code)
    os.chmod(folder, 0o700)
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
        with pytest.raises(RuntimeError, match="owned by uid 65534, not by the current user"):
            cudasim.RawModule(code=code)
        os.chown(folder, 0, 0)


def test_compile_error_shows_compiler_output():
    with pytest.raises(cudasim.CompileError, match=r"kernel.cu:1"):
        cudasim.RawModule(code='extern "C" __global__ void broken(float* y) { y[0] = undefined_name; }\n')
