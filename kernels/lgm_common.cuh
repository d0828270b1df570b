// Device helpers and tile sizes shared by the L-GM kernels (SPEC sections 1-2).
//
// Every kernel that contracts over N x K x D works on a 64 x 64 output tile with 256 threads: the
// threads form a 16 x 16 grid and each owns 4 x 4 outputs strided by 16 (rows ty + 16 r, columns
// tx + 16 c), so the 16 threads of a half-warp touch 16 consecutive columns in shared and global
// memory. The contracted dimension is walked in steps of 16 through shared memory, and each step's
// sum is formed separately before it is added to the running total: blocked summation, whose
// rounding error grows like 16 + L / 16 instead of L for a contraction of length L.
namespace lgm {

constexpr int kThreads = 256;  // threads per block of the tiled kernels
constexpr int kTile = 64;      // edge of an output tile
constexpr int kStep = 16;      // length of one step along the contracted dimension
constexpr int kPer = 4;        // outputs per thread along each tile edge (kTile / 16)

// The clamp of SPEC section 1, c = clip(s, logvar_min, logvar_max). Written with comparisons
// rather than fmin/fmax so that a NaN log-variance stays NaN instead of turning into a bound.
template <typename T>
__device__ __forceinline__ T clamp_log_var(T s, T logvar_min, T logvar_max) {
    return s < logvar_min ? logvar_min : (s > logvar_max ? logvar_max : s);
}

// 1 where the clamp passes gradient (the closed interval), else 0. Used as a factor, not a
// select, so NaN and Inf gradients still propagate through masked entries as NumPy does.
template <typename T>
__device__ __forceinline__ T clamp_passes(T s, T logvar_min, T logvar_max) {
    return (s >= logvar_min && s <= logvar_max) ? T(1) : T(0);
}

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

// a * b + c with one rounding, so the GPU and the CPU simulator round alike (no reliance on the
// compiler's choice to contract).
__device__ __forceinline__ float fma_of(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_of(double a, double b, double c) { return fma(a, b, c); }

// Inverse variance iv = exp(-c) of the clamped log-variance.
template <typename T>
__device__ __forceinline__ T inverse_variance(T s, T logvar_min, T logvar_max) {
    return exp_of(-clamp_log_var(s, logvar_min, logvar_max));
}

// s[k, j] of a (K, D) log-variance, or s[k, 0] of an isotropic (K, 1) one.
template <typename T>
__device__ __forceinline__ T log_var_at(const T* __restrict__ log_var, int k, int j, int dim,
                                        int isotropic) {
    return log_var[isotropic ? (long long)k : (long long)k * dim + j];
}

// Sum over the 16 lanes of a half-warp (lanes that share threadIdx.x / 16). The butterfly order
// is fixed, so the result is the same on every run.
template <typename T>
__device__ __forceinline__ T half_warp_sum(T v) {
    for (int offset = 8; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

}  // namespace lgm
