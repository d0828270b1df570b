// Backward of the L-GM loss, SPEC section 2: dx (N, D), dmean (K, D), dlog_var (K, D) or (K, 1).
//
// lgm_backward_dx_*      one 64 x 64 tile of (samples, features) per block, looping over classes.
// lgm_backward_params_*  one 64 x 64 tile of (classes, features) per block, looping over samples.
// lgm_sum_partials_*     out[e] = sum_p partial[p, e] (times the clamp mask when asked).
//
// G = dL/dd (SPEC 2) is built from grad_logits, grad_lkd and the labels while loading a tile and is
// never stored as N x K. When one output tile per block gives too few blocks to fill the GPU, the
// launcher splits the loop (classes for dx, samples for the parameters) over gridDim.z; each slice
// writes its own partial result and lgm_sum_partials adds them in a fixed order. No atomics: the
// gradients are bitwise the same on every run.
#include "lgm_common.cuh"

namespace lgm {

// G[i, k] = -grad_logits[i, k] m[i, k] + grad_lkd[i] [k == y_i], with m = 1 + alpha on the label.
template <typename T>
__device__ __forceinline__ T grad_half_distance(T gz, int k, int y, T gl, T alpha) {
    return k == y ? fma_of(-gz, T(1) + alpha, gl) : -gz;
}

// dx[i, j] = sum_k G[i, k] (x[i, j] - mu[k, j]) iv[k, j] over classes
// [blockIdx.z * classes_per_split, (blockIdx.z + 1) * classes_per_split), written to
// dx_out + blockIdx.z * N * D.
template <typename T>
__device__ __forceinline__ void backward_dx_tile(
    // data
    const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ log_var,
    const int* __restrict__ label, const T* __restrict__ grad_logits,
    const T* __restrict__ grad_lkd, T* __restrict__ dx_out,
    // shapes
    int n, int num_classes, int dim, int classes_per_split,
    // options
    T alpha, T logvar_min, T logvar_max, int isotropic) {
    __shared__ T g_tile[kTile][kStep];     // G[row0 + ., k0 + .], read as a broadcast
    __shared__ T mean_tile[kStep][kTile];  // mean[k0 + ., col0 + .]
    __shared__ T iv_tile[kStep][kTile];

    const int tid = threadIdx.x;
    const int tx = tid % 16;  // computes features tx + 16 c
    const int ty = tid / 16;  // computes samples ty + 16 r
    const int row0 = blockIdx.x * kTile;
    const int col0 = blockIdx.y * kTile;
    const int k_begin = blockIdx.z * classes_per_split;
    const int k_end = min(num_classes, k_begin + classes_per_split);

    // Step 1: this thread's x values, and the labels / grad_lkd of the rows it loads G for
    // (thread (tx, ty) loads G[ty + 16 r, k0 + tx], 16 consecutive classes per half-warp).
    T xv[kPer][kPer];
    int y_load[kPer];
    T gl_load[kPer];
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + ty + 16 * r;
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + tx + 16 * c;
            xv[r][c] = (i < n && j < dim) ? x[(long long)i * dim + j] : T(0);
        }
        y_load[r] = i < n ? label[i] : -1;
        gl_load[r] = i < n ? grad_lkd[i] : T(0);
    }

    // Step 2 (SPEC 2, dx): walk the classes in steps of 16 with blocked summation.
    T acc[kPer][kPer] = {};
    const int load_col = tid % kTile;  // mean / iv are loaded along features,
    const int load_k = tid / kTile;    // classes load_k + 4 r
    for (int k0 = k_begin; k0 < k_end; k0 += kStep) {
        for (int r = 0; r < kPer; ++r) {
            const int i = row0 + ty + 16 * r;
            const int k = k0 + tx;
            T g = 0;  // padding rows and classes contribute nothing
            if (i < n && k < k_end) {
                g = grad_half_distance(grad_logits[(long long)i * num_classes + k], k, y_load[r],
                                       gl_load[r], alpha);
            }
            g_tile[ty + 16 * r][tx] = g;
        }
        const int j = col0 + load_col;
        for (int r = 0; r < kPer; ++r) {
            const int k = k0 + load_k + 4 * r;
            T m = 0;
            T iv = 0;
            if (k < k_end && j < dim) {
                m = mean[(long long)k * dim + j];
                iv = inverse_variance(log_var_at(log_var, k, j, dim, isotropic), logvar_min,
                                      logvar_max);
            }
            mean_tile[load_k + 4 * r][load_col] = m;
            iv_tile[load_k + 4 * r][load_col] = iv;
        }
        __syncthreads();
        T part[kPer][kPer] = {};
        for (int kk = 0; kk < kStep; ++kk) {
            T gv[kPer], mv[kPer], ivv[kPer];
            for (int r = 0; r < kPer; ++r) gv[r] = g_tile[ty + 16 * r][kk];
            for (int c = 0; c < kPer; ++c) {
                mv[c] = mean_tile[kk][tx + 16 * c];
                ivv[c] = iv_tile[kk][tx + 16 * c];
            }
            for (int r = 0; r < kPer; ++r) {
                for (int c = 0; c < kPer; ++c) {
                    part[r][c] = fma_of(gv[r] * (xv[r][c] - mv[c]), ivv[c], part[r][c]);
                }
            }
        }
        for (int r = 0; r < kPer; ++r) {
            for (int c = 0; c < kPer; ++c) acc[r][c] += part[r][c];
        }
        __syncthreads();
    }

    // Step 3: store this slice's sum.
    T* out = dx_out + (long long)blockIdx.z * n * dim;
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + ty + 16 * r;
        if (i >= n) continue;
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + tx + 16 * c;
            if (j < dim) out[(long long)i * dim + j] = acc[r][c];
        }
    }
}

// dmean and dlog_var over samples [blockIdx.z * rows_per_split, (blockIdx.z + 1) * rows_per_split):
//   P[k, j] = sum_i G[i, k] (x[i, j] - mu[k, j]),  Q[k, j] = sum_i G[i, k] (x[i, j] - mu[k, j])^2
//   dmean = -iv P,  bracket = -0.5 iv Q + gld[k]                         (SPEC 2)
// With one slice (gridDim.z == 1) and a diagonal variance, dlog_var_out receives the final
// bracket * mask. Otherwise dmean_out / dlog_var_out are partial buffers:
//   dmean_out[z, k, j]; diagonal: dlog_var_out[z, k, j] = bracket;
//   isotropic: dlog_var_out[z * gridDim.y + blockIdx.y, k] = sum of the bracket over the tile's
//   features,
// and lgm_sum_partials finishes them (the mask is applied after the sum, as in SPEC 2).
template <typename T>
__device__ __forceinline__ void backward_params_tile(
    // data
    const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ log_var,
    const int* __restrict__ label, const T* __restrict__ grad_logits,
    const T* __restrict__ grad_lkd, T* __restrict__ dmean_out, T* __restrict__ dlog_var_out,
    // shapes
    int n, int num_classes, int dim, int rows_per_split,
    // options
    T alpha, T logvar_min, T logvar_max, int logdet_logits, int logdet_lkd, int isotropic) {
    __shared__ T g_tile[kStep][kTile];  // G[i0 + ., class0 + .]
    __shared__ T x_tile[kStep][kTile];  // x[i0 + ., col0 + .]
    __shared__ T gz_parts[kThreads / kTile][kTile];  // per loader row, summed in order
    __shared__ T gl_parts[kThreads / kTile][kTile];
    __shared__ T g_log_det[kTile];

    const int tid = threadIdx.x;
    const int tx = tid % 16;  // computes features tx + 16 c
    const int ty = tid / 16;  // computes classes ty + 16 r
    const int class0 = blockIdx.x * kTile;
    const int col0 = blockIdx.y * kTile;
    const int i_begin = blockIdx.z * rows_per_split;
    const int i_end = min(n, i_begin + rows_per_split);

    // Step 1: this thread's means.
    T mv[kPer][kPer];
    for (int r = 0; r < kPer; ++r) {
        const int k = class0 + ty + 16 * r;
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + tx + 16 * c;
            mv[r][c] = (k < num_classes && j < dim) ? mean[(long long)k * dim + j] : T(0);
        }
    }

    // Step 2 (SPEC 2, P and Q): walk the samples in steps of 16 with blocked summation. Thread
    // tid loads G and x at column tid % 64 of sample rows tid / 64 + 4 r (coalesced along rows of
    // grad_logits and x) and, on the way, sums the grad_logits and grad_lkd that enter gld.
    const int load_col = tid % kTile;
    const int load_row = tid / kTile;
    T gz_sum = 0;
    T gl_sum = 0;
    T p_acc[kPer][kPer] = {};
    T q_acc[kPer][kPer] = {};
    for (int i0 = i_begin; i0 < i_end; i0 += kStep) {
        for (int r = 0; r < kPer; ++r) {
            const int ii = load_row + 4 * r;
            const int i = i0 + ii;
            const int k = class0 + load_col;
            T g = 0;
            if (i < i_end && k < num_classes) {
                const T gz = grad_logits[(long long)i * num_classes + k];
                const int y = label[i];
                const T gl = grad_lkd[i];
                g = grad_half_distance(gz, k, y, gl, alpha);
                gz_sum += gz;
                if (k == y) gl_sum += gl;
            }
            g_tile[ii][load_col] = g;
            const int j = col0 + load_col;
            x_tile[ii][load_col] = (i < i_end && j < dim) ? x[(long long)i * dim + j] : T(0);
        }
        __syncthreads();
        T p_part[kPer][kPer] = {};
        T q_part[kPer][kPer] = {};
        for (int ii = 0; ii < kStep; ++ii) {
            T gv[kPer], xs[kPer];
            for (int r = 0; r < kPer; ++r) gv[r] = g_tile[ii][ty + 16 * r];
            for (int c = 0; c < kPer; ++c) xs[c] = x_tile[ii][tx + 16 * c];
            for (int r = 0; r < kPer; ++r) {
                for (int c = 0; c < kPer; ++c) {
                    const T t = xs[c] - mv[r][c];
                    const T gt = gv[r] * t;
                    p_part[r][c] += gt;
                    q_part[r][c] = fma_of(gt, t, q_part[r][c]);
                }
            }
        }
        for (int r = 0; r < kPer; ++r) {
            for (int c = 0; c < kPer; ++c) {
                p_acc[r][c] += p_part[r][c];
                q_acc[r][c] += q_part[r][c];
            }
        }
        __syncthreads();
    }

    // Step 3 (SPEC 2, gld[k]): add the four loaders' sums of each class in a fixed order.
    gz_parts[load_row][load_col] = gz_sum;
    gl_parts[load_row][load_col] = gl_sum;
    __syncthreads();
    if (tid < kTile) {
        T gz_total = 0;
        T gl_total = 0;
        for (int p = 0; p < kThreads / kTile; ++p) {
            gz_total += gz_parts[p][tid];
            gl_total += gl_parts[p][tid];
        }
        g_log_det[tid] = (logdet_lkd ? T(0.5) : T(0)) * gl_total -
                         (logdet_logits ? T(0.5) : T(0)) * gz_total;
    }
    __syncthreads();

    // Step 4: dmean, and the bracket of dlog_var (SPEC 2). The loops are unrolled by hand-given
    // pragmas: the shuffle inside keeps the compiler from doing it, and without unrolling the
    // register arrays p_acc / q_acc would be indexed dynamically and live in local memory.
    const bool final_output = gridDim.z == 1;
    const long long slice = (long long)blockIdx.z * num_classes * dim;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int k = class0 + ty + 16 * r;
        const T gld = g_log_det[ty + 16 * r];
        T bracket_sum = 0;  // isotropic: over this thread's features of the tile
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + tx + 16 * c;
            if (k >= num_classes || j >= dim) continue;
            const T s = log_var_at(log_var, k, j, dim, isotropic);
            const T iv = inverse_variance(s, logvar_min, logvar_max);
            const long long at = slice + (long long)k * dim + j;
            dmean_out[at] = -iv * p_acc[r][c];
            const T bracket = T(-0.5) * iv * q_acc[r][c] + gld;
            if (isotropic) {
                bracket_sum += bracket;
            } else {
                dlog_var_out[at] =
                    final_output ? bracket * clamp_passes(s, logvar_min, logvar_max) : bracket;
            }
        }
        if (isotropic) {
            // The 16 threads of a half-warp hold the tile's 64 features of class k.
            bracket_sum = half_warp_sum(bracket_sum);
            if (tx == 0 && k < num_classes) {
                dlog_var_out[((long long)blockIdx.z * gridDim.y + blockIdx.y) * num_classes + k] =
                    bracket_sum;
            }
        }
    }
}

// out[e] = sum_{p < parts} partial[p * len + e], in order of p; times the clamp mask of
// log_var[e] when apply_mask (log_var then has len elements: the (K, D) or (K, 1) parameter).
template <typename T>
__device__ __forceinline__ void sum_partials(
    // data
    const T* __restrict__ partial, const T* __restrict__ log_var, T* __restrict__ out,
    // shapes
    long long len, int parts,
    // options
    T logvar_min, T logvar_max, int apply_mask) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= len) return;
    T total = 0;
    for (int p = 0; p < parts; ++p) total += partial[p * len + e];
    if (apply_mask) total *= clamp_passes(log_var[e], logvar_min, logvar_max);
    out[e] = total;
}

}  // namespace lgm

// Exported entry points, one per dtype (extern "C": no name mangling, found by name).
// lgm_backward_dx_*: block 256, grid (ceil(N / 64), ceil(D / 64), class slices).
// lgm_backward_params_*: block 256, grid (ceil(K / 64), ceil(D / 64), sample slices).
// lgm_sum_partials_*: block 256, grid ceil(len / 256).

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_backward_dx_f32(
    // data
    const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ log_var,
    const int* __restrict__ label, const float* __restrict__ grad_logits,
    const float* __restrict__ grad_lkd, float* __restrict__ dx_out,
    // shapes
    int n, int num_classes, int dim, int classes_per_split,
    // options
    float alpha, float logvar_min, float logvar_max, int isotropic) {
    lgm::backward_dx_tile<float>(x, mean, log_var, label, grad_logits, grad_lkd, dx_out, n,
                              num_classes, dim, classes_per_split, alpha, logvar_min, logvar_max,
                              isotropic);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_backward_params_f32(
    // data
    const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ log_var,
    const int* __restrict__ label, const float* __restrict__ grad_logits,
    const float* __restrict__ grad_lkd, float* __restrict__ dmean_out,
    float* __restrict__ dlog_var_out,
    // shapes
    int n, int num_classes, int dim, int rows_per_split,
    // options
    float alpha, float logvar_min, float logvar_max, int logdet_logits, int logdet_lkd,
    int isotropic) {
    lgm::backward_params_tile<float>(x, mean, log_var, label, grad_logits, grad_lkd, dmean_out,
                                  dlog_var_out, n, num_classes, dim, rows_per_split, alpha,
                                  logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_sum_partials_f32(
    // data
    const float* __restrict__ partial, const float* __restrict__ log_var, float* __restrict__ out,
    // shapes
    long long len, int parts,
    // options
    float logvar_min, float logvar_max, int apply_mask) {
    lgm::sum_partials<float>(partial, log_var, out, len, parts, logvar_min, logvar_max,
                          apply_mask);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_backward_dx_f64(
    // data
    const double* __restrict__ x, const double* __restrict__ mean,
    const double* __restrict__ log_var,
    const int* __restrict__ label, const double* __restrict__ grad_logits,
    const double* __restrict__ grad_lkd, double* __restrict__ dx_out,
    // shapes
    int n, int num_classes, int dim, int classes_per_split,
    // options
    double alpha, double logvar_min, double logvar_max, int isotropic) {
    lgm::backward_dx_tile<double>(x, mean, log_var, label, grad_logits, grad_lkd, dx_out, n,
                              num_classes, dim, classes_per_split, alpha, logvar_min, logvar_max,
                              isotropic);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_backward_params_f64(
    // data
    const double* __restrict__ x, const double* __restrict__ mean,
    const double* __restrict__ log_var,
    const int* __restrict__ label, const double* __restrict__ grad_logits,
    const double* __restrict__ grad_lkd, double* __restrict__ dmean_out,
    double* __restrict__ dlog_var_out,
    // shapes
    int n, int num_classes, int dim, int rows_per_split,
    // options
    double alpha, double logvar_min, double logvar_max, int logdet_logits, int logdet_lkd,
    int isotropic) {
    lgm::backward_params_tile<double>(x, mean, log_var, label, grad_logits, grad_lkd, dmean_out,
                                  dlog_var_out, n, num_classes, dim, rows_per_split, alpha,
                                  logvar_min, logvar_max, logdet_logits, logdet_lkd, isotropic);
}

extern "C" __global__ void __launch_bounds__(lgm::kThreads) lgm_sum_partials_f64(
    // data
    const double* __restrict__ partial, const double* __restrict__ log_var,
    double* __restrict__ out,
    // shapes
    long long len, int parts,
    // options
    double logvar_min, double logvar_max, int apply_mask) {
    lgm::sum_partials<double>(partial, log_var, out, len, parts, logvar_min, logvar_max,
                          apply_mask);
}
