// Forward of the L-GM loss, SPEC section 1: logits (N, K) and lkd (N,).
//
// lgm::forward<T, L, true>   one 64 x 64 tile of (classes, samples) per block, labels of dtype L
//                            checked on the way: the first bad index goes to *first_bad.
// lgm::forward<T, int, false> the label-free form: logits without margin, no lkd.
// lgm::lkd_rows<T>           lkd of given int32 classes, one warp per sample (the label-free
//                            form's predicted class).
// Launch: block 256; forward grid (ceil(K / 64), ceil(N / 64)); lkd_rows grid ceil(N / 8).
// mean_iv and log_det come from lgm::class_terms (lgm_class_terms.cu).
#include "lgm_common.cuh"

namespace lgm {

// One 64 x 64 tile of logits, and lkd for the samples whose label falls in the tile's classes.
// Nothing N x K x D is stored: the tile loop reads each x and (mean, iv) element once per tile.
template <typename T, typename L, bool kWithLabel>
__global__ void __launch_bounds__(kThreads, Blocking<T>::kMinBlocks) forward(
    // data
    const T* __restrict__ x, const T* __restrict__ mean_iv, const T* __restrict__ log_det,
    const L* __restrict__ label, T* __restrict__ logits, T* __restrict__ lkd,
    int* __restrict__ first_bad,
    // shapes
    int n, int num_classes, int dim,
    // options
    T alpha, int logdet_logits, int logdet_lkd) {
    using P = typename Pair<T>::type;
    constexpr int S = Blocking<T>::kStep;
    constexpr int W = Vec<T>::kWidth;
    constexpr int kLoads = kTile * S / kThreads;  // elements of each tile one thread loads
    constexpr int kLoadRows = kThreads / S;       // tile rows one pass of loads covers
    // Rows of S elements along D, padded by one 16-byte word: the 8 threads of a quarter-warp
    // read 8 consecutive class rows, whose words then fall in 8 different bank groups.
    __shared__ __align__(16) T x_tile[2][kTile][S + W];
    __shared__ __align__(16) T mean_tile[2][kTile][S + W];
    __shared__ __align__(16) T iv_tile[2][kTile][S + W];

    const int tx = threadIdx.x % 16;  // computes classes tx + 16 c
    const int ty = threadIdx.x / 16;  // computes samples ty + 16 r
    const int class0 = blockIdx.x * kTile;
    const int row0 = blockIdx.y * kTile;
    // Loading: thread t fetches column t % S of tile rows t / S + kLoadRows e, so consecutive
    // threads read consecutive features of one row. Rows past N or K load 0 (and add 0).
    const int load_col = threadIdx.x % S;
    const int load_row = threadIdx.x / S;
    const T* x_src = x + (long long)(row0 + load_row) * dim + load_col;
    const P* mean_iv_src =
        reinterpret_cast<const P*>(mean_iv) + (long long)(class0 + load_row) * dim + load_col;
    const long long pass = (long long)kLoadRows * dim;  // elements between a thread's rows

    // Step 1 (SPEC 1, d[i,k]): walk D in steps of S.
    T x_next[kLoads];
    P mean_iv_next[kLoads];
    auto fetch = [&](int j0) {
        const bool in = j0 + load_col < dim;
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            const int r = load_row + kLoadRows * e;
            x_next[e] = (in && row0 + r < n) ? x_src[e * pass + j0] : T(0);
            mean_iv_next[e] =
                (in && class0 + r < num_classes) ? mean_iv_src[e * pass + j0] : P{T(0), T(0)};
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            const int r = load_row + kLoadRows * e;
            x_tile[buf][r][load_col] = x_next[e];
            mean_tile[buf][r][load_col] = mean_iv_next[e].x;
            iv_tile[buf][r][load_col] = mean_iv_next[e].y;
        }
    };

    T acc[kPer][kPer] = {};
    const int steps = (dim + S - 1) / S;
    fetch(0);
    store(0);
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        const bool more = step + 1 < steps;
        if (more) fetch((step + 1) * S);  // in flight while this step computes
        // Blocked summation: this step's S terms are summed on their own, then added.
        T part[kPer][kPer] = {};
#pragma unroll
        for (int jj = 0; jj < S; jj += W) {
            T xv[kPer][W];
#pragma unroll
            for (int r = 0; r < kPer; ++r) load_vec(&x_tile[buf][ty + 16 * r][jj], xv[r]);
#pragma unroll
            for (int c = 0; c < kPer; ++c) {
                T mv[W], vv[W];
                load_vec(&mean_tile[buf][tx + 16 * c][jj], mv);
                load_vec(&iv_tile[buf][tx + 16 * c][jj], vv);
#pragma unroll
                for (int w = 0; w < W; ++w) {
#pragma unroll
                    for (int r = 0; r < kPer; ++r) {
                        // Direct form (x - mu)^2 iv: no cancellation however far x is from 0.
                        const T t = xv[r][w] - mv[w];
                        part[r][c] = fma_of(t * t, vv[w], part[r][c]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kPer; ++r) {
#pragma unroll
            for (int c = 0; c < kPer; ++c) acc[r][c] += part[r][c];
        }
        // The other buffer was last read in the previous step, which every thread finished
        // before the barrier that ended it.
        if (more) store(buf ^ 1);
        __syncthreads();
    }

    // Step 2 (SPEC 1, logits and lkd). Each sample's label lies in exactly one class tile, so
    // exactly one thread of the grid writes its lkd; the first class tile checks the labels.
    const T logits_ld_weight = logdet_logits ? T(0.5) : T(0);
    const T lkd_ld_weight = logdet_lkd ? T(0.5) : T(0);
    T ld[kPer];
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
        const int k = class0 + tx + 16 * c;
        ld[c] = k < num_classes ? log_det[k] : T(0);
    }
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + ty + 16 * r;
        if (i >= n) continue;
        int y = -1;
        if (kWithLabel) {
            y = class_of(label[i], num_classes);
            if (y < 0 && blockIdx.x == 0 && tx == 0) atomicMin(first_bad, i);
        }
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int k = class0 + tx + 16 * c;
            if (k >= num_classes) continue;
            const T half_d = T(0.5) * acc[r][c];
            const T margin = (k == y) ? T(1) + alpha : T(1);
            logits[(long long)i * num_classes + k] = -margin * half_d - logits_ld_weight * ld[c];
            if (kWithLabel && k == y) lkd[i] = half_d + lkd_ld_weight * ld[c];
        }
    }
}

// lkd[i] = d[i, y_i] + 0.5 ld[y_i] [logdet_lkd] for given classes y (SPEC 1); one warp per sample,
// lanes striding over D. Used by the label-free form, whose classes are known only after the
// logits (their argmax). No __launch_bounds__: with one, ptxas squeezes the double version into
// 40 registers on sm_80 and spills.
template <typename T>
__global__ void lkd_rows(
    // data
    const T* __restrict__ x, const T* __restrict__ mean_iv, const T* __restrict__ log_det,
    const int* __restrict__ label, T* __restrict__ lkd,
    // shapes
    int n, int dim,
    // options
    int logdet_lkd) {
    using P = typename Pair<T>::type;
    const int lane = threadIdx.x % 32;
    const int i = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32);
    if (i >= n) return;  // the whole warp leaves together, so the shuffles below stay full
    const int k = label[i];
    const P* terms = reinterpret_cast<const P*>(mean_iv) + (long long)k * dim;
    T dist = 0;
    for (int j = lane; j < dim; j += 32) {
        const P m = terms[j];
        const T t = x[(long long)i * dim + j] - m.x;
        dist = fma_of(t * t, m.y, dist);
    }
    dist = warp_sum(dist);
    if (lane == 0) lkd[i] = T(0.5) * dist + (logdet_lkd ? T(0.5) : T(0)) * log_det[k];
}

}  // namespace lgm
