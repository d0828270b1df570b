// Forward of the L-GM loss, SPEC section 1: logits (N, K) and lkd (N,).
//
// lgm_forward_*  one 64 x 64 tile of (samples, classes) per block; labels given (int32, checked).
// lgm_logits_*   the same kernel for the label-free form: logits without margin, no lkd.
// lgm_lkd_rows_* lkd of given classes, one warp per sample (the label-free form's predicted class).
#include "lgm_common.cuh"

namespace lgm {

constexpr int kWarp = 32;

// Sum over the 32 lanes of a warp, in a fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// One 64 x 64 tile of logits, and lkd for the samples whose label falls in the tile's classes.
// Nothing N x K x D is stored: the tile loop reads each x and mean element once per tile and forms
// the inverse variance while loading, so the clamped K x D parameters never exist in memory.
template <typename T, bool kWithLabel>
__device__ __forceinline__ void forward_tile(
    // data
    const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ log_var,
    const int* __restrict__ label, T* __restrict__ logits, T* __restrict__ lkd,
    // shapes
    int n, int num_classes, int dim,
    // options
    T alpha, T logvar_min, T logvar_max, int logdet_logits, int logdet_lkd, int isotropic) {
    // x is read along rows (a broadcast within each half-warp), mean and iv along classes; the
    // class tiles are stored transposed, padded by one so that the transposing store does not
    // put a half-warp's 16 writes into one bank.
    __shared__ T x_tile[kTile][kStep];
    __shared__ T mean_tile[kStep][kTile + 1];
    __shared__ T iv_tile[kStep][kTile + 1];
    __shared__ T log_det_tile[kTile];

    const int tx = threadIdx.x % 16;  // computes classes tx + 16 c
    const int ty = threadIdx.x / 16;  // computes samples ty + 16 r
    const int row0 = blockIdx.x * kTile;
    const int class0 = blockIdx.y * kTile;

    // Step 1 (SPEC 1, d[i,k]): walk D in steps of 16. For loading, thread (tx, ty) fetches
    // feature j0 + tx of samples / classes ty + 16 r: 16 consecutive addresses per half-warp.
    T acc[kPer][kPer] = {};
    T c_sum[kPer] = {};  // this thread's share of log|Sigma_k| for classes ty + 16 r
    for (int j0 = 0; j0 < dim; j0 += kStep) {
        const int j = j0 + tx;
        for (int r = 0; r < kPer; ++r) {
            const int i = row0 + ty + 16 * r;
            x_tile[ty + 16 * r][tx] = (i < n && j < dim) ? x[(long long)i * dim + j] : T(0);
            const int k = class0 + ty + 16 * r;
            T m = 0;
            T iv = 0;  // padding classes and features add t^2 * 0
            if (k < num_classes && j < dim) {
                m = mean[(long long)k * dim + j];
                const T c = clamp_log_var(log_var_at(log_var, k, j, dim, isotropic), logvar_min,
                                          logvar_max);
                iv = exp_of(-c);
                c_sum[r] += c;
            }
            mean_tile[tx][ty + 16 * r] = m;
            iv_tile[tx][ty + 16 * r] = iv;
        }
        __syncthreads();
        // Blocked summation: this step's 16 terms are summed on their own, then added.
        T part[kPer][kPer] = {};
        for (int jj = 0; jj < kStep; ++jj) {
            T xv[kPer], mv[kPer], ivv[kPer];
            for (int r = 0; r < kPer; ++r) xv[r] = x_tile[ty + 16 * r][jj];
            for (int c = 0; c < kPer; ++c) {
                mv[c] = mean_tile[jj][tx + 16 * c];
                ivv[c] = iv_tile[jj][tx + 16 * c];
            }
            for (int r = 0; r < kPer; ++r) {
                for (int c = 0; c < kPer; ++c) {
                    // Direct form (x - mu)^2 iv: no cancellation however far x is from 0.
                    const T t = xv[r] - mv[c];
                    part[r][c] = fma_of(t * t, ivv[c], part[r][c]);
                }
            }
        }
        for (int r = 0; r < kPer; ++r) {
            for (int c = 0; c < kPer; ++c) acc[r][c] += part[r][c];
        }
        __syncthreads();
    }

    // Step 2 (SPEC 1, ld[k]): the 16 threads that loaded class ty + 16 r hold its partial sums.
    for (int r = 0; r < kPer; ++r) {
        const T total = half_warp_sum(c_sum[r]);
        const int k = class0 + ty + 16 * r;
        if (tx == 0) {
            T ld = 0;
            if (k < num_classes) {
                // Isotropic: D * c, exactly as SPEC writes it, not a sum of D equal terms.
                ld = isotropic ? T(dim) * clamp_log_var(log_var[k], logvar_min, logvar_max)
                               : total;
            }
            log_det_tile[ty + 16 * r] = ld;
        }
    }
    __syncthreads();

    // Step 3 (SPEC 1, logits and lkd). Each sample's label lies in exactly one class tile, so
    // exactly one thread of the grid writes its lkd.
    const T logits_ld_weight = logdet_logits ? T(0.5) : T(0);
    const T lkd_ld_weight = logdet_lkd ? T(0.5) : T(0);
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + ty + 16 * r;
        if (i >= n) continue;
        const int y = kWithLabel ? label[i] : -1;
        for (int c = 0; c < kPer; ++c) {
            const int k = class0 + tx + 16 * c;
            if (k >= num_classes) continue;
            const T half_d = T(0.5) * acc[r][c];
            const T ld = log_det_tile[tx + 16 * c];
            const T margin = (k == y) ? T(1) + alpha : T(1);
            logits[(long long)i * num_classes + k] = -margin * half_d - logits_ld_weight * ld;
            if (kWithLabel && k == y) lkd[i] = half_d + lkd_ld_weight * ld;
        }
    }
}

// lkd[i] = d[i, y_i] + 0.5 ld[y_i] [logdet_lkd] for given classes y (SPEC 1); one warp per sample,
// lanes striding over D. Used by the label-free form, whose classes are known only after the
// logits (their argmax).
template <typename T>
__device__ __forceinline__ void lkd_rows(
    // data
    const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ log_var,
    const int* __restrict__ label, T* __restrict__ lkd,
    // shapes
    int n, int dim,
    // options
    T logvar_min, T logvar_max, int logdet_lkd, int isotropic) {
    const int lane = threadIdx.x % kWarp;
    const int i = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / kWarp);
    if (i >= n) return;  // the whole warp leaves together, so the shuffles below stay full
    const int k = label[i];
    T dist = 0;
    T c_sum = 0;
    for (int j = lane; j < dim; j += kWarp) {
        const T c = clamp_log_var(log_var_at(log_var, k, j, dim, isotropic), logvar_min,
                                  logvar_max);
        const T t = x[(long long)i * dim + j] - mean[(long long)k * dim + j];
        dist = fma_of(t * t, exp_of(-c), dist);
        c_sum += c;
    }
    dist = warp_sum(dist);
    c_sum = warp_sum(c_sum);
    if (lane == 0) {
        const T ld = isotropic ? T(dim) * clamp_log_var(log_var[k], logvar_min, logvar_max)
                               : c_sum;
        lkd[i] = T(0.5) * dist + (logdet_lkd ? T(0.5) : T(0)) * ld;
    }
}

}  // namespace lgm

// Exported entry points, one per dtype (extern "C": no name mangling, found by name).
// lgm_forward_* / lgm_logits_*: block 256, grid (ceil(N / 64), ceil(K / 64)).
// lgm_lkd_rows_*: block 256 (8 samples), grid ceil(N / 8). It has no __launch_bounds__: with one,
// ptxas squeezes the double version into 40 registers on sm_80 and spills.

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_forward_f32(
    // data
    const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ log_var, const int* __restrict__ label, float* __restrict__ logits,
    float* __restrict__ lkd,
    // shapes
    int n, int num_classes, int dim,
    // options
    float alpha, float logvar_min, float logvar_max, int logdet_logits, int logdet_lkd,
    int isotropic) {
    lgm::forward_tile<float, true>(x, mean, log_var, label, logits, lkd, n, num_classes, dim,
                                   alpha, logvar_min, logvar_max, logdet_logits, logdet_lkd,
                                   isotropic);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_forward_f64(
    // data
    const double* __restrict__ x, const double* __restrict__ mean,
    const double* __restrict__ log_var, const int* __restrict__ label,
    double* __restrict__ logits, double* __restrict__ lkd,
    // shapes
    int n, int num_classes, int dim,
    // options
    double alpha, double logvar_min, double logvar_max, int logdet_logits, int logdet_lkd,
    int isotropic) {
    lgm::forward_tile<double, true>(x, mean, log_var, label, logits, lkd, n, num_classes, dim,
                                    alpha, logvar_min, logvar_max, logdet_logits, logdet_lkd,
                                    isotropic);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_logits_f32(
    // data
    const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ log_var, float* __restrict__ logits,
    // shapes
    int n, int num_classes, int dim,
    // options
    float logvar_min, float logvar_max, int logdet_logits, int isotropic) {
    lgm::forward_tile<float, false>(x, mean, log_var, nullptr, logits, nullptr, n, num_classes,
                                    dim, 0.0f, logvar_min, logvar_max, logdet_logits, 0,
                                    isotropic);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_logits_f64(
    // data
    const double* __restrict__ x, const double* __restrict__ mean,
    const double* __restrict__ log_var, double* __restrict__ logits,
    // shapes
    int n, int num_classes, int dim,
    // options
    double logvar_min, double logvar_max, int logdet_logits, int isotropic) {
    lgm::forward_tile<double, false>(x, mean, log_var, nullptr, logits, nullptr, n, num_classes,
                                     dim, 0.0, logvar_min, logvar_max, logdet_logits, 0,
                                     isotropic);
}

extern "C" __global__ void lgm_lkd_rows_f32(
    // data
    const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ log_var, const int* __restrict__ label, float* __restrict__ lkd,
    // shapes
    int n, int dim,
    // options
    float logvar_min, float logvar_max, int logdet_lkd, int isotropic) {
    lgm::lkd_rows<float>(x, mean, log_var, label, lkd, n, dim, logvar_min, logvar_max, logdet_lkd,
                         isotropic);
}

extern "C" __global__ void lgm_lkd_rows_f64(
    // data
    const double* __restrict__ x, const double* __restrict__ mean,
    const double* __restrict__ log_var, const int* __restrict__ label,
    double* __restrict__ lkd,
    // shapes
    int n, int dim,
    // options
    double logvar_min, double logvar_max, int logdet_lkd, int isotropic) {
    lgm::lkd_rows<double>(x, mean, log_var, label, lkd, n, dim, logvar_min, logvar_max,
                          logdet_lkd, isotropic);
}
