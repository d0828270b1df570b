// Device helpers and tile sizes shared by the L-GM kernels (SPEC sections 1-2).
//
// Every kernel that contracts over N x K x D works on an output tile with 256 threads: the
// threads form a 16 x 16 grid and each owns 4 x 4 outputs of a 64 x 64 tile (the forward in
// float32: 8 samples x 4 classes of a 128 x 64 tile, Blocking<float>::kRowsPer). The contracted
// dimension is walked in steps of Blocking<T>::kStep through shared memory, two buffers deep: the
// next step's tile is read from global memory into registers while the current one is used, and
// stored to the other buffer after (the parameter kernel, short of registers, stores it before),
// so each step needs one barrier. Every tile but the last along the contracted dimension is full:
// those are read with no bounds tests (the forward's and the parameter kernel's through pointers
// that move a step per fetch; backward_dx takes two steps an iteration there, at fixed buffer
// addresses). Each block of steps is summed separately before it is added to the running total:
// blocked summation, whose rounding error grows like B + L / B instead of L for a contraction of
// length L in blocks of B.
//
// Shared tiles are laid out so that each thread reads 16 bytes at a time (float4 / double2)
// along the contracted dimension, or along 4 contiguous outputs; rows along which 16 threads read
// different 16-byte words are padded to a stride that puts those words in different banks.
namespace lgm {

constexpr int kThreads = 256;  // threads per block of the tiled kernels
constexpr int kTile = 64;      // edge of an output tile
constexpr int kPer = 4;        // outputs per thread along each tile edge

// Step length along the contracted dimension and the register budget, per dtype: two buffers
// of three 64 x kStep tiles stay under the 48 KiB of static shared memory, and float32 is held to
// 128 registers so that two blocks fit on an SM.
template <typename T>
struct Blocking;
template <>
struct Blocking<float> {
    static constexpr int kStep = 16;
    static constexpr int kMinBlocks = 2;  // __launch_bounds__: at most 128 registers
    static constexpr int kRowsPer = 8;    // forward: samples per thread (one sum per output)
    static constexpr int kForwardStep = 8;  // forward: with 8 x 4 outputs, 16 spills
};
template <>
struct Blocking<double> {
    static constexpr int kStep = 8;
    static constexpr int kMinBlocks = 1;
    static constexpr int kRowsPer = 4;
    static constexpr int kForwardStep = 8;
};

// (mu, iv) of one element of the interleaved mean_iv (K, D, 2) buffer, read in one load.
template <typename T>
struct Pair;
template <>
struct Pair<float> {
    using type = float2;
};
template <>
struct Pair<double> {
    using type = double2;
};

// Elements per 16-byte shared-memory load.
template <typename T>
struct Vec {
    static constexpr int kWidth = 16 / sizeof(T);
};

// v[0..3] = p[0..3], in 16-byte loads (p is 16-byte aligned).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
    const double2 a = reinterpret_cast<const double2*>(p)[0];
    const double2 b = reinterpret_cast<const double2*>(p)[1];
    v[0] = a.x;
    v[1] = a.y;
    v[2] = b.x;
    v[3] = b.y;
}
// v[0..W-1] = p[0..W-1] for the W = Vec<T>::kWidth elements of one 16-byte load.
__device__ __forceinline__ void load_vec(const float* p, float (&v)[4]) { load4(p, v); }
__device__ __forceinline__ void load_vec(const double* p, double (&v)[2]) {
    const double2 q = *reinterpret_cast<const double2*>(p);
    v[0] = q.x;
    v[1] = q.y;
}

// The clamp of SPEC section 1, c = clip(s, logvar_min, logvar_max). Written with comparisons
// rather than fmin/fmax so that a NaN log-variance stays NaN instead of turning into a bound.
template <typename T>
__device__ __forceinline__ T clamp_log_var(T s, T logvar_min, T logvar_max) {
    return s < logvar_min ? logvar_min : (s > logvar_max ? logvar_max : s);
}

// The gradient through the clamp: g on the closed interval [logvar_min, logvar_max], exactly 0
// outside it (and for a NaN log-variance). A select, not a factor: no gradient passes a blocked
// entry, not even a NaN or Inf arriving from upstream (SPEC section 2).
template <typename T>
__device__ __forceinline__ T clamp_gradient(T g, T s, T logvar_min, T logvar_max) {
    return (s >= logvar_min && s <= logvar_max) ? g : T(0);
}

// 2^(e - bits) for v = f 2^e, 0.5 <= f < 1: a power of two 2^(bits - 1) to 2^bits times below v
// (0 for v = 0; v is finite and >= 0 here).
__device__ __forceinline__ float power_of_two_below(float v, int bits) {
    int e = 0;
    const float f = frexpf(v, &e);
    return f > 0.0f ? ldexpf(1.0f, e - bits) : 0.0f;
}
__device__ __forceinline__ double power_of_two_below(double v, int bits) {
    int e = 0;
    const double f = frexp(v, &e);
    return f > 0.0 ? ldexp(1.0, e - bits) : 0.0;
}
__device__ __forceinline__ float rint_of(float v) { return rintf(v); }
__device__ __forceinline__ double rint_of(double v) { return rint(v); }

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

// a * b + c with one rounding, so the GPU and the CPU simulator round alike (no reliance on the
// compiler's choice to contract).
__device__ __forceinline__ float fma_of(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_of(double a, double b, double c) { return fma(a, b, c); }

// The class of a label value of any real dtype: an integer in [0, K), else -1. The range test
// comes first: it rejects NaN (every comparison is false) and makes the conversion to int well
// defined; a round trip then rejects fractions.
template <typename L>
__device__ __forceinline__ int class_of(L v, int num_classes) {
    const bool in_range = v >= L(0) && v < L(num_classes);
    const int k = in_range ? (int)v : 0;
    return (in_range && L(k) == v) ? k : -1;
}

// a[k, j] of a (K, D) per-class array, or a[k, 0] of an isotropic (K, 1) one.
template <typename T>
__device__ __forceinline__ T per_class_at(const T* __restrict__ a, int k, int j, int dim,
                                          int isotropic) {
    return a[isotropic ? (long long)k : (long long)k * dim + j];
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

// Sum over the 32 lanes of a warp, in a fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Maximum over the 32 lanes of a warp (a NaN may or may not win; callers test finiteness apart).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other > v ? other : v;
    }
    return v;
}

// Calls visit(e), on every thread of the block, for each e in [begin, end) with marked(e), in
// increasing order: the block tests 256 indices at a time and each warp's ballot marks its share
// in flags (kThreads / 32 words of shared memory). Every thread of the block must call it.
template <typename Marked, typename Visit>
__device__ __forceinline__ void for_each_marked(int begin, int end, unsigned* flags,
                                                Marked marked, Visit visit) {
    for (int base = begin; base < end; base += kThreads) {
        const int e = base + (int)threadIdx.x;
        const unsigned hit = __ballot_sync(0xffffffffu, e < end && marked(e));
        if (threadIdx.x % 32 == 0) flags[threadIdx.x / 32] = hit;
        __syncthreads();
        for (int w = 0; w < kThreads / 32; ++w) {
            unsigned todo = flags[w];
            while (todo) {
                const int found = base + 32 * w + __ffs((int)todo) - 1;
                todo &= todo - 1;
                visit(found);
            }
        }
        __syncthreads();  // before the next chunk's ballots overwrite flags
    }
}

// A sample's row code (lgm::row_flags): its class id (-1: none), or -3 - id when one of its
// features is not finite.
__device__ __forceinline__ bool code_is_bad(int code) { return code < -1; }
__device__ __forceinline__ int class_of_code(int code) { return code < -1 ? -3 - code : code; }

}  // namespace lgm
