// Backward of the L-GM loss, SPEC section 2: dx (N, D), dmean (K, D), dlog_var (K, D) or (K, 1).
//
// lgm::backward_dx<T>       one 64 x 64 tile of (samples, features) per block, looping over
//                           classes; grid (ceil(N / 64), ceil(D / 64), class slices).
// lgm::backward_params<T>   one 64 x 64 tile of (classes, features) per block, looping over
//                           samples; grid (ceil(K / 64), ceil(D / 64), sample slices).
// lgm::sum_partials<T>      out[e] = sum_p partial[p, e] (through the clamp when asked);
//                           grid ceil(len / 256).
// Block 256 throughout. mean_iv and the class ids come from lgm_class_terms.cu.
//
// G = dL/dd (SPEC 2) is built from grad_logits, grad_lkd and the class ids (-1: no class) while
// loading a tile and is never stored as N x K. When one output tile per block gives too few
// blocks to fill the GPU, the launcher splits the loop (classes for dx, samples for the
// parameters) over gridDim.z; each slice writes its own partial result and sum_partials adds them
// in a fixed order. No atomics: the gradients are bitwise the same on every run.
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
__global__ void __launch_bounds__(kThreads, Blocking<T>::kMinBlocks) backward_dx(
    // data
    const T* __restrict__ x, const T* __restrict__ mean_iv, const int* __restrict__ label,
    const T* __restrict__ grad_logits, const T* __restrict__ grad_lkd, T* __restrict__ dx_out,
    // shapes
    int n, int num_classes, int dim, int classes_per_split,
    // options
    T alpha) {
    using P = typename Pair<T>::type;
    constexpr int S = Blocking<T>::kStep;
    constexpr int W = Vec<T>::kWidth;
    constexpr int kLoads = kTile * S / kThreads;
    constexpr int kGRows = kThreads / S;        // G rows one pass of loads covers
    constexpr int kPRows = kThreads / kTile;    // mean / iv rows one pass covers
    // G rows run along classes, padded by one 16-byte word (as the forward's tiles); mean and iv
    // rows run along features, read 4 contiguous features per thread.
    __shared__ __align__(16) T g_tile[2][kTile][S + W];
    __shared__ __align__(16) T mean_tile[2][S][kTile];
    __shared__ __align__(16) T iv_tile[2][S][kTile];

    const int tid = threadIdx.x;
    const int tx = tid % 16;  // computes features 4 tx + c
    const int ty = tid / 16;  // computes samples ty + 16 r
    const int row0 = blockIdx.x * kTile;
    const int col0 = blockIdx.y * kTile;
    const int k_begin = blockIdx.z * classes_per_split;
    const int k_end = min(num_classes, k_begin + classes_per_split);

    // Step 1: this thread's x values, and the rows it loads G for: thread t loads
    // G[t / S + kGRows e, k0 + t % S], S consecutive classes of one row.
    const int g_col = tid % S;
    const int g_row = tid / S;
    T xv[kPer][kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + ty + 16 * r;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
            xv[r][c] = (i < n && j < dim) ? x[(long long)i * dim + j] : T(0);
        }
    }
    int y_load[kLoads];
    T gl_load[kLoads];
    const T* gz_src[kLoads];  // null past N: padding rows contribute nothing
#pragma unroll
    for (int e = 0; e < kLoads; ++e) {
        const int i = row0 + g_row + kGRows * e;
        y_load[e] = i < n ? label[i] : -1;
        gl_load[e] = i < n ? grad_lkd[i] : T(0);
        gz_src[e] = i < n ? grad_logits + (long long)i * num_classes : nullptr;
    }

    // Step 2 (SPEC 2, dx): walk the classes in steps of S with blocked summation. mean / iv are
    // loaded along features: thread t fetches feature t % 64 of classes t / 64 + kPRows e.
    const int p_col = tid % kTile;
    const int p_row = tid / kTile;
    const bool p_in = col0 + p_col < dim;
    const P* terms = reinterpret_cast<const P*>(mean_iv) + col0 + p_col;
    T g_next[kLoads];
    P mean_iv_next[kLoads];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            const int k = k0 + g_col;
            g_next[e] = (gz_src[e] && k < k_end)
                            ? grad_half_distance(gz_src[e][k], k, y_load[e], gl_load[e], alpha)
                            : T(0);
            const int kp = k0 + p_row + kPRows * e;
            mean_iv_next[e] = (p_in && kp < k_end) ? terms[(long long)kp * dim] : P{T(0), T(0)};
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            g_tile[buf][g_row + kGRows * e][g_col] = g_next[e];
            mean_tile[buf][p_row + kPRows * e][p_col] = mean_iv_next[e].x;
            iv_tile[buf][p_row + kPRows * e][p_col] = mean_iv_next[e].y;
        }
    };

    T acc[kPer][kPer] = {};
    const int steps = k_end > k_begin ? (k_end - k_begin + S - 1) / S : 0;
    fetch(k_begin);
    store(0);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        const bool more = step + 1 < steps;
        if (more) fetch(k_begin + (step + 1) * S);
        T part[kPer][kPer] = {};
#pragma unroll
        for (int kk = 0; kk < S; kk += W) {
            T gv[kPer][W];
#pragma unroll
            for (int r = 0; r < kPer; ++r) load_vec(&g_tile[buf][ty + 16 * r][kk], gv[r]);
#pragma unroll
            for (int w = 0; w < W; ++w) {
                T mv[kPer], vv[kPer];
                load4(&mean_tile[buf][kk + w][4 * tx], mv);
                load4(&iv_tile[buf][kk + w][4 * tx], vv);
#pragma unroll
                for (int r = 0; r < kPer; ++r) {
#pragma unroll
                    for (int c = 0; c < kPer; ++c) {
                        part[r][c] = fma_of(gv[r][w] * (xv[r][c] - mv[c]), vv[c], part[r][c]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kPer; ++r) {
#pragma unroll
            for (int c = 0; c < kPer; ++c) acc[r][c] += part[r][c];
        }
        if (more) store(buf ^ 1);
        __syncthreads();
    }

    // Step 3: store this slice's sum.
    T* out = dx_out + (long long)blockIdx.z * n * dim;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + ty + 16 * r;
        if (i >= n) continue;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
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
// and sum_partials finishes them (the mask is applied after the sum, as in SPEC 2). A null
// dmean_out or dlog_var_out is not written (a gradient nobody asked for).
template <typename T>
__global__ void __launch_bounds__(kThreads, Blocking<T>::kMinBlocks) backward_params(
    // data
    const T* __restrict__ x, const T* __restrict__ mean_iv, const T* __restrict__ log_var,
    const int* __restrict__ label, const T* __restrict__ grad_logits,
    const T* __restrict__ grad_lkd, T* __restrict__ dmean_out, T* __restrict__ dlog_var_out,
    // shapes
    int n, int num_classes, int dim, int rows_per_split,
    // options
    T alpha, T logvar_min, T logvar_max, int logdet_logits, int logdet_lkd, int isotropic) {
    constexpr int S = Blocking<T>::kStep;
    constexpr int kLoads = kTile * S / kThreads;
    constexpr int kRows = kThreads / kTile;  // sample rows one pass of loads covers
    // Both tiles run along their 64 outputs; each thread reads 4 contiguous classes and 4
    // contiguous features of one sample.
    __shared__ __align__(16) T g_tile[2][S][kTile];  // G[i0 + ., class0 + .]
    __shared__ __align__(16) T x_tile[2][S][kTile];  // x[i0 + ., col0 + .]
    __shared__ T gz_parts[kRows][kTile];  // per loader row, summed in order
    __shared__ T gl_parts[kRows][kTile];
    __shared__ T g_log_det[kTile];

    const int tid = threadIdx.x;
    const int tx = tid % 16;  // computes features 4 tx + c
    const int ty = tid / 16;  // computes classes 4 ty + r
    const int class0 = blockIdx.x * kTile;
    const int col0 = blockIdx.y * kTile;
    const int i_begin = blockIdx.z * rows_per_split;
    const int i_end = min(n, i_begin + rows_per_split);

    // Step 1: this thread's means.
    using P = typename Pair<T>::type;
    const P* terms = reinterpret_cast<const P*>(mean_iv);
    T mv[kPer][kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int k = class0 + 4 * ty + r;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
            mv[r][c] = (k < num_classes && j < dim) ? terms[(long long)k * dim + j].x : T(0);
        }
    }

    // Step 2 (SPEC 2, P and Q): walk the samples in steps of S with blocked summation. Thread
    // tid loads G and x at column tid % 64 of sample rows tid / 64 + kRows e (coalesced along
    // rows of grad_logits and x) and, on the way, sums the grad_logits and grad_lkd that enter
    // gld.
    const int load_col = tid % kTile;
    const int load_row = tid / kTile;
    const int k_load = class0 + load_col;
    const bool k_in = k_load < num_classes;
    const bool j_in = col0 + load_col < dim;
    T gz_sum = 0;
    T gl_sum = 0;
    T g_next[kLoads], x_next[kLoads];
    auto fetch = [&](int i0) {
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            const int i = i0 + load_row + kRows * e;
            const bool row_in = i < i_end;
            T g = 0;
            if (row_in && k_in) {
                const T gz = grad_logits[(long long)i * num_classes + k_load];
                const int y = label[i];
                const T gl = grad_lkd[i];
                g = grad_half_distance(gz, k_load, y, gl, alpha);
                gz_sum += gz;
                if (k_load == y) gl_sum += gl;
            }
            g_next[e] = g;
            x_next[e] = (row_in && j_in) ? x[(long long)i * dim + col0 + load_col] : T(0);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            g_tile[buf][load_row + kRows * e][load_col] = g_next[e];
            x_tile[buf][load_row + kRows * e][load_col] = x_next[e];
        }
    };

    T p_acc[kPer][kPer] = {};
    T q_acc[kPer][kPer] = {};
    const int steps = i_end > i_begin ? (i_end - i_begin + S - 1) / S : 0;
    fetch(i_begin);
    store(0);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        const bool more = step + 1 < steps;
        // Unlike the other kernels, the next tile goes to shared memory before this step
        // computes: with 64 accumulators there is no room to hold it in registers meanwhile.
        if (more) {
            fetch(i_begin + (step + 1) * S);
            store(buf ^ 1);
        }
        T p_part[kPer][kPer] = {};
        T q_part[kPer][kPer] = {};
#pragma unroll
        for (int ii = 0; ii < S; ++ii) {
            T gv[kPer], xs[kPer];
            load4(&g_tile[buf][ii][4 * ty], gv);
            load4(&x_tile[buf][ii][4 * tx], xs);
#pragma unroll
            for (int r = 0; r < kPer; ++r) {
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                    const T t = xs[c] - mv[r][c];
                    const T gt = gv[r] * t;
                    p_part[r][c] += gt;
                    q_part[r][c] = fma_of(gt, t, q_part[r][c]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kPer; ++r) {
#pragma unroll
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

    // Step 4: dmean, and the bracket of dlog_var (SPEC 2).
    const bool final_output = gridDim.z == 1;
    const long long slice = (long long)blockIdx.z * num_classes * dim;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int k = class0 + 4 * ty + r;
        const T gld = g_log_det[4 * ty + r];
        T bracket_sum = 0;  // isotropic: over this thread's features of the tile
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
            if (k >= num_classes || j >= dim) continue;
            const T v = terms[(long long)k * dim + j].y;
            const long long at = slice + (long long)k * dim + j;
            if (dmean_out) dmean_out[at] = -v * p_acc[r][c];
            const T bracket = T(-0.5) * v * q_acc[r][c] + gld;
            if (isotropic) {
                bracket_sum += bracket;
            } else if (dlog_var_out) {
                const T s = log_var[(long long)k * dim + j];
                dlog_var_out[at] =
                    final_output ? clamp_gradient(bracket, s, logvar_min, logvar_max) : bracket;
            }
        }
        if (isotropic) {
            // The 16 threads of a half-warp hold the tile's 64 features of class k.
            bracket_sum = half_warp_sum(bracket_sum);
            if (tx == 0 && k < num_classes && dlog_var_out) {
                dlog_var_out[((long long)blockIdx.z * gridDim.y + blockIdx.y) * num_classes + k] =
                    bracket_sum;
            }
        }
    }
}

// out[e] = sum_{p < parts} partial[p * len + e], in order of p; through the clamp of
// log_var[e] when apply_mask (log_var then has len elements: the (K, D) or (K, 1) parameter).
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_partials(
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
    if (apply_mask) total = clamp_gradient(total, log_var[e], logvar_min, logvar_max);
    out[e] = total;
}

}  // namespace lgm
