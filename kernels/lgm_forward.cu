// Forward of the L-GM loss, SPEC section 1: logits (N, K) and lkd (N,).
//
// lgm::forward<T, L, true>   one 64 x 64 tile of (classes, samples) per block, labels of dtype L
//                            checked on the way: the first bad index goes to *first_bad.
// lgm::forward<T, int, false> the label-free form: logits without margin, no lkd.
// lgm::lkd_rows<T>           lkd of given int32 classes, one warp per sample (the label-free
//                            form's predicted class).
// Launch: block 256; forward grid (ceil(K / 64), ceil(N / (16 Blocking<T>::kRowsPer))), i.e.
// 128 samples a tile in float32, 64 in float64; lkd_rows grid ceil(N / 8).
// shift, terms, sq, mean_iv and log_det come from lgm_class_terms.cu (the scaled terms).
//
// The distance is computed in the scaled form d = sum_j (x'_j a_j - m_j a_j)^2, with
// x' = x - shift, m = mu - shift and a = sqrt(iv): two fused multiply-adds per (i, k, j). Each
// term's error is a few ulps of |x' a| + |m a| <= |t| + 2 |m a|, so by Cauchy-Schwarz the error of
// d is a few ulps of d + sqrt(d B_k), B_k = sum_j (m a)^2. Where the scaled form may have
// cancelled, B_k > Ratio<T>::kValue * d, the entry is recomputed in the direct form
// sum_j (x_j - mu_j)^2 iv_j (exact to a few ulps of d however close x is to mu), by the whole warp
// of the thread that holds it (by that thread alone when D <= kSerialDim); so is every entry of
// the label column (lkd and the margin logit: where training puts the features, the distance to
// the own class is tiny). Non-finite inputs stay in their own row or column in either form.
#include "lgm_common.cuh"

namespace lgm {

// Up to this many features, a thread recomputes its own direct entries; beyond, the warp does.
constexpr int kSerialDim = 32;

// Entries whose B_k exceeds kValue * d are recomputed directly: the scaled form's error is then
// at most a few (1 + sqrt(kValue)) ulps of d. float32: within a small multiple of the direct
// form's own few ulps; float64: about 1e-12 relative, against SPEC's 1e-9.
template <typename T>
struct Ratio;
template <>
struct Ratio<float> {
    static constexpr float kValue = 1.0f;
};
template <>
struct Ratio<double> {
    static constexpr double kValue = 1e8;
};

// The direct form's sum_j (x_j - mu_j)^2 iv_j over j = first, first + stride, ... < dim, for one
// sample row x and one class row of (mu, iv) pairs.
template <typename T>
__device__ __forceinline__ T direct_distance(const T* __restrict__ x,
                                             const typename Pair<T>::type* __restrict__ pairs,
                                             int dim, int first, int stride) {
    T dist = 0;
    for (int j = first; j < dim; j += stride) {
        const typename Pair<T>::type m = pairs[j];
        const T t = x[j] - m.x;
        dist = fma_of(t * t, m.y, dist);
    }
    return dist;
}

// One tile of logits (128 samples x 64 classes in float32, 64 x 64 in float64), and lkd for the
// samples whose label falls in the tile's classes.
// Nothing N x K x D is stored: the tile loop reads each x and scaled term once per tile.
template <typename T, typename L, bool kWithLabel>
__global__ void __launch_bounds__(kThreads, Blocking<T>::kMinBlocks) forward(
    // data
    const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ terms,
    const T* __restrict__ sq, const T* __restrict__ mean_iv, const T* __restrict__ log_det,
    const L* __restrict__ label, T* __restrict__ logits, T* __restrict__ lkd,
    int* __restrict__ first_bad,
    // shapes
    int n, int num_classes, int dim,
    // options
    T alpha, int logdet_logits, int logdet_lkd) {
    using P = typename Pair<T>::type;
    constexpr int S = Blocking<T>::kForwardStep;
    constexpr int W = Vec<T>::kWidth;
    constexpr int R = Blocking<T>::kRowsPer;  // samples per thread
    constexpr int kRowsTile = 16 * R;         // samples per tile
    constexpr int kXLoads = kRowsTile * S / kThreads;  // x elements one thread loads a step
    constexpr int kTLoads = kTile * S / kThreads;      // term pairs one thread loads a step
    // The tiles run along their outputs (samples; classes), one row per feature, padded by one
    // 16-byte word: each thread reads R contiguous samples and 4 contiguous classes. Two buffers
    // of the three tiles, x - shift, a = sqrt(iv) and -(mu - shift) a, in one array: a thread's
    // loads and stores lie at fixed offsets from a few indices, and the buffer is one offset more.
    constexpr int kXRow = kRowsTile + W;  // row strides
    constexpr int kTRow = kTile + W;
    constexpr int kASize = S * kTRow;     // the a tile; the x tile takes S * kXRow
    constexpr int kBufSize = S * kXRow + 2 * kASize;
    __shared__ __align__(16) T tiles[2 * kBufSize];

    const int tx = threadIdx.x % 16;  // computes classes 4 tx + c
    const int ty = threadIdx.x / 16;  // computes samples R ty + r
    const int lane = threadIdx.x % 32;
    const int class0 = blockIdx.x * kTile;
    const int row0 = blockIdx.y * kRowsTile;
    // Loading: each thread fetches kXLoads consecutive features of one sample and kTLoads of
    // one class, through one pointer per array that moves a step per fetch (the features at fixed
    // offsets from it). A row past N reads row N - 1 and a class past K class K - 1 instead:
    // such a row or class reaches only outputs that are never stored, so the loads need no
    // predicate or select of their own. Features past D (the last step only) load 0 and add 0.
    const int x_row = threadIdx.x / (S / kXLoads);
    const int x_col = threadIdx.x % (S / kXLoads) * kXLoads;
    const int t_row = threadIdx.x / (S / kTLoads);
    const int t_col = threadIdx.x % (S / kTLoads) * kTLoads;
    const T* __restrict__ x_src = x + (long long)min(row0 + x_row, n - 1) * dim + x_col;
    const P* __restrict__ t_src = reinterpret_cast<const P*>(terms) +
                                  (long long)min(class0 + t_row, num_classes - 1) * dim + t_col;
    const T* __restrict__ s_src = shift + x_col;

    // Step 1 (SPEC 1, d[i,k]): walk D in steps of S; the next step's tiles are read into
    // registers while this step computes. Every step but the last is full.
    T x_next[kXLoads];
    P terms_next[kTLoads];
    auto fetch_full = [&]() {  // the step the pointers are at; then they move a step
#pragma unroll
        for (int e = 0; e < kXLoads; ++e) x_next[e] = x_src[e] - s_src[e];
#pragma unroll
        for (int e = 0; e < kTLoads; ++e) terms_next[e] = t_src[e];
        x_src += S;
        t_src += S;
        s_src += S;
    };
    auto fetch_tail = [&](int j0) {  // the last step, at feature j0: past D, D - 1 and a select
#pragma unroll
        for (int e = 0; e < kXLoads; ++e) {
            const int j = j0 + x_col + e;
            const int at = min(j, dim - 1) - (j0 + x_col);
            const T v = x_src[at] - s_src[at];
            x_next[e] = j < dim ? v : T(0);
        }
#pragma unroll
        for (int e = 0; e < kTLoads; ++e) {
            const int j = j0 + t_col + e;
            const P v = t_src[min(j, dim - 1) - (j0 + t_col)];
            terms_next[e] = j < dim ? v : P{T(0), T(0)};
        }
    };
    auto store = [&](int buf) {
        const int at_x = buf * kBufSize + x_col * kXRow + x_row;
        const int at_t = buf * kBufSize + S * kXRow + t_col * kTRow + t_row;
#pragma unroll
        for (int e = 0; e < kXLoads; ++e) tiles[at_x + kXRow * e] = x_next[e];
#pragma unroll
        for (int e = 0; e < kTLoads; ++e) {
            tiles[at_t + kTRow * e] = terms_next[e].x;
            tiles[at_t + kASize + kTRow * e] = terms_next[e].y;
        }
    };

    T acc[R][kPer] = {};
    auto compute = [&](int buf) {
        // Blocked summation: this step's S terms are summed on their own, then added.
        T part[R][kPer] = {};
        const int at_x = buf * kBufSize + R * ty;
        const int at_t = buf * kBufSize + S * kXRow + 4 * tx;
#pragma unroll
        for (int jj = 0; jj < S; ++jj) {
            T xv[R], av[kPer], mv[kPer];
#pragma unroll
            for (int q = 0; q < R; q += 4) {
                T v[4];
                load4(&tiles[at_x + jj * kXRow + q], v);
#pragma unroll
                for (int u = 0; u < 4; ++u) xv[q + u] = v[u];
            }
            load4(&tiles[at_t + jj * kTRow], av);
            load4(&tiles[at_t + kASize + jj * kTRow], mv);
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                    const T t = fma_of(xv[r], av[c], mv[c]);  // (x' - m) a
                    part[r][c] = fma_of(t, t, part[r][c]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int c = 0; c < kPer; ++c) acc[r][c] += part[r][c];
        }
    };
    const int steps = (dim + S - 1) / S;
    if (steps > 1) {
        fetch_full();
        store(0);
    } else if (steps) {
        fetch_tail(0);
        store(0);
    }
    __syncthreads();
    // The other buffer was last read in the previous step, which every thread finished before
    // the barrier that ended it.
    int step = 0;
    for (; step + 2 < steps; ++step) {  // the next tile is full
        const int buf = step & 1;
        fetch_full();  // in flight while this step computes
        compute(buf);
        store(buf ^ 1);
        __syncthreads();
    }
    for (; step < steps; ++step) {
        const int buf = step & 1;
        const bool more = step + 1 < steps;
        if (more) fetch_tail((step + 1) * S);
        compute(buf);
        if (more) store(buf ^ 1);
        __syncthreads();
    }

    // Step 2: the labels (checked by the first class tile), and the entries to recompute
    // directly: the label column and those where the scaled form may have cancelled. Every
    // thread of the warp takes part in each ballot, so the loops below stay convergent.
    __shared__ int row_class[kRowsTile];  // the tile's samples' classes (-1: none)
    if (threadIdx.x < kRowsTile) {
        const int i = row0 + threadIdx.x;
        int y = -1;
        if (kWithLabel && i < n) {
            y = class_of(label[i], num_classes);
            if (y < 0 && blockIdx.x == 0) atomicMin(first_bad, i);
        }
        row_class[threadIdx.x] = y;
    }
    __syncthreads();
    T b[kPer];
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
        const int k = class0 + 4 * tx + c;
        b[c] = k < num_classes ? sq[k] : T(0);
    }
    const P* pairs = reinterpret_cast<const P*>(mean_iv);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = row0 + R * ty + r;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int k = class0 + 4 * tx + c;
            const bool cancelled = b[c] > Ratio<T>::kValue * acc[r][c];
            const bool direct =
                i < n && k < num_classes && (k == row_class[R * ty + r] || cancelled);
            if (dim <= kSerialDim) {
                // Few features: each thread recomputes its own entry (with many entries near
                // their class, as low-dimensional features often are, that keeps every lane busy).
                if (direct) {
                    acc[r][c] = direct_distance(x + (long long)i * dim,
                                                pairs + (long long)k * dim, dim, 0, 1);
                }
                continue;
            }
            // Otherwise the warp recomputes the entries one at a time, its lanes along D.
            unsigned todo = __ballot_sync(0xffffffffu, direct);
            while (todo) {
                const int src = __ffs((int)todo) - 1;
                todo &= todo - 1;
                const long long di = __shfl_sync(0xffffffffu, i, src);
                const long long dk = __shfl_sync(0xffffffffu, k, src);
                const T dist =
                    warp_sum(direct_distance(x + di * dim, pairs + dk * dim, dim, lane, 32));
                if (lane == src) acc[r][c] = dist;
            }
        }
    }

    // Step 3 (SPEC 1, logits and lkd). Each sample's label lies in exactly one class tile, so
    // exactly one thread of the grid writes its lkd.
    const T logits_ld_weight = logdet_logits ? T(0.5) : T(0);
    const T lkd_ld_weight = logdet_lkd ? T(0.5) : T(0);
    T ld[kPer];
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
        const int k = class0 + 4 * tx + c;
        ld[c] = k < num_classes ? log_det[k] : T(0);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int i = row0 + R * ty + r;
        if (i >= n) continue;  // rows past N: nothing to store
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int k = class0 + 4 * tx + c;
            if (k >= num_classes) continue;
            const T half_d = T(0.5) * acc[r][c];
            const int y = row_class[R * ty + r];
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
    const T dist = warp_sum(direct_distance(x + (long long)i * dim, terms, dim, lane, 32));
    if (lane == 0) lkd[i] = T(0.5) * dist + (logdet_lkd ? T(0.5) : T(0)) * log_det[k];
}

}  // namespace lgm
