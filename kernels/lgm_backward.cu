// Backward of the L-GM loss, SPEC section 2: dx (N, D), dmean (K, D), dlog_var (K, D) or (K, 1).
//
// lgm::backward_dx<T>      one 64 x 64 tile of (samples, features) per block, looping over
//                           classes; grid (ceil(N / 64), ceil(D / 64), class slices).
// lgm::backward_params<T>  one 64 x 64 tile of (classes, features) per block, looping over
//                          samples; grid (ceil(K / 64), ceil(D / 64), sample slices).
// lgm::sum_partials<T>     out[e] = sum_p partial[p, e] (through the clamp when asked);
//                          grid ceil(len / 256).
// Block 256 throughout. shift, terms, mean_iv and the class ids come from lgm_class_terms.cu.
//
// G = dL/dd (SPEC 2) is built from grad_logits, grad_lkd and the class ids (-1: no class) while
// loading a tile and is never stored as N x K. When one output tile per block gives too few
// blocks to fill the GPU, the launcher splits the loop (classes for dx, samples for the
// parameters) over gridDim.z; each slice writes its own partial result and sum_partials adds them
// in a fixed order. No atomics: the gradients are bitwise the same on every run.
//
// The expanded forms: with x' = x - shift and m = mu - shift, the contractions are matrix
// products, one fused multiply-add per output and update:
//     dx[i, j] = x'_ij sum_k G_ik iv_kj - sum_k G_ik (m iv)_kj
//     P[k, j] = S1 - m gsum,  Q[k, j] = S2 - m (2 S1 - m gsum),
//     S1 = sum_i G_ik x'_ij,  S2 = sum_i G_ik x'_ij^2,  gsum = sum_i G_ik.
// The label column is taken out of G and its terms are added in the direct form (x - mu): where
// training puts the features, x lies next to its own class mean and the expansion would cancel
// there. So are the samples with a non-finite feature and the classes whose mean or log-variance
// is not finite or overflows, whose terms would otherwise spread to every output (or meet as
// 0 * Inf). The other classes' terms are as exact as the reference's, within a small factor, once
// the shift has made |x'| and |m| no larger than the distances. Where the features spread far
// beyond their distances to the other classes (SPEC 5's 2-D classes 1e2 to 1e4 apart) that does
// not hold; the launcher then runs float32 inputs with few features through the float64 kernels.
#include "lgm_common.cuh"

namespace lgm {

// G[i, k] = -grad_logits[i, k] m[i, k] + grad_lkd[i] [k == y_i], with m = 1 + alpha on the label.
template <typename T>
__device__ __forceinline__ T grad_half_distance(T gz, int k, int y, T gl, T alpha) {
    return k == y ? fma_of(-gz, T(1) + alpha, gl) : -gz;
}

// dx[i, j] = sum_k G[i, k] (x[i, j] - mu[k, j]) iv[k, j] over classes
// [blockIdx.z * classes_per_split, (blockIdx.z + 1) * classes_per_split), written to
// dx_out + blockIdx.z * N * D. pairs: the terms (iv, m iv); mean_iv: (mu, iv).
template <typename T>
__global__ void __launch_bounds__(kThreads, Blocking<T>::kMinBlocks) backward_dx(
    // data
    const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ pairs,
    const T* __restrict__ mean_iv, const int* __restrict__ row_code,
    const int* __restrict__ bad_class, const T* __restrict__ grad_logits,
    const T* __restrict__ grad_lkd, T* __restrict__ dx_out,
    // shapes
    int n, int num_classes, int dim, int classes_per_split,
    // options
    T alpha) {
    using P = typename Pair<T>::type;
    constexpr int S = Blocking<T>::kStep;
    constexpr int W = Vec<T>::kWidth;
    constexpr int kLoads = kTile * S / kThreads;
    constexpr int kGCols = S / kLoads;          // loaders of one G row
    constexpr int kPRows = kThreads / kTile;    // pair rows one pass covers
    constexpr int kSums = 2;                    // accumulators per output: G iv, G (m iv)
    // All three tiles run along their 64 outputs (G along samples, padded by two 16-byte words:
    // the loaders of a warp write 8 samples of 4 classes, which then fall in different banks);
    // each thread reads 4 contiguous samples and 4 contiguous features (the pairs: iv and m iv).
    __shared__ __align__(16) T g_tile[2][S][kTile + 2 * W];
    __shared__ __align__(16) T first_tile[2][S][kTile];
    __shared__ __align__(16) T second_tile[2][S][kTile];

    const int tid = threadIdx.x;
    const int tx = tid % 16;  // computes features 4 tx + c
    const int ty = tid / 16;  // computes samples 4 ty + r
    const int row0 = blockIdx.x * kTile;
    const int col0 = blockIdx.y * kTile;
    const int k_begin = blockIdx.z * classes_per_split;
    const int k_end = min(num_classes, k_begin + classes_per_split);

    // Step 1: thread t loads G for sample row0 + t / kGCols at classes k0 + t % kGCols +
    // kGCols e, from one row pointer. A row past N reads row N - 1: its outputs are not stored,
    // and each row of G reaches only its own row of dx, so such a row needs no select.
    const int g_col = tid % kGCols;
    const int g_row = tid / kGCols;
    const int g_read = min(row0 + g_row, n - 1);
    const int y_load = class_of_code(row_code[g_read]);
    const T* __restrict__ gz_src = grad_logits + (long long)g_read * num_classes;

    // Step 2 (SPEC 2, dx): walk the classes in steps of S with blocked summation. The pairs are
    // loaded along features: thread t fetches feature t % 64 of classes t / 64 + kPRows e (a
    // feature past D reads feature D - 1, whose outputs are not stored). The tiles hold
    // +grad_logits (G with its sign flipped, undone in step 3) and 0 in the label column (its
    // term is added in step 3) and past the slice's classes; the pairs are finite (a bad
    // class's are 0), so a class past the slice, read as the slice's last, adds exactly 0. Only
    // the slice's last tile can be partial: the fetches of the others (tail = false) need no
    // clamps.
    const int p_col = tid % kTile;
    const int p_row = tid / kTile;
    const P* terms = reinterpret_cast<const P*>(pairs) + min(col0 + p_col, dim - 1);
    const long long p_stride = (long long)kPRows * dim;  // between a thread's pair rows
    T g_next[kLoads];
    P pair_next[kLoads];
    auto fetch = [&](int k0, bool tail) {
        const P* p0 = terms + (long long)(k0 + p_row) * dim;
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            const int k = k0 + g_col + kGCols * e;
            const T gz = gz_src[tail ? min(k, k_end - 1) : k];
            g_next[e] = ((!tail || k < k_end) && k != y_load) ? gz : T(0);
            const int kp = k0 + p_row + kPRows * e;
            pair_next[e] = tail ? terms[(long long)min(kp, k_end - 1) * dim] : p0[e * p_stride];
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            g_tile[buf][g_col + kGCols * e][g_row] = g_next[e];
            first_tile[buf][p_row + kPRows * e][p_col] = pair_next[e].x;
            second_tile[buf][p_row + kPRows * e][p_col] = pair_next[e].y;
        }
    };

    // acc: the slice's sums; part: the current block of steps (two in the main loop, at most
    // three at the end), added to acc at its end (blocked summation).
    T acc[kSums][kPer][kPer] = {};
    T part[kSums][kPer][kPer] = {};
    auto compute = [&](int buf) {
#pragma unroll
        for (int kk = 0; kk < S; ++kk) {
            T gv[kPer], fv[kPer], sv[kPer];
            load4(&g_tile[buf][kk][4 * ty], gv);
            load4(&first_tile[buf][kk][4 * tx], fv);
            load4(&second_tile[buf][kk][4 * tx], sv);
#pragma unroll
            for (int r = 0; r < kPer; ++r) {
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                    part[0][r][c] = fma_of(gv[r], fv[c], part[0][r][c]);
                    part[1][r][c] = fma_of(gv[r], sv[c], part[1][r][c]);
                }
            }
        }
    };
    auto fold = [&]() {
#pragma unroll
        for (int q = 0; q < kSums; ++q) {
#pragma unroll
            for (int r = 0; r < kPer; ++r) {
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                    acc[q][r][c] += part[q][r][c];
                    part[q][r][c] = T(0);
                }
            }
        }
    };
    const int steps = k_end > k_begin ? (k_end - k_begin + S - 1) / S : 0;
    if (steps) {
        fetch(k_begin, true);
        store(0);
    }
    __syncthreads();
    // Two steps an iteration while the next two tiles are full (tile `step` is in buffer 0);
    // then the rest one at a time.
    int step = 0;
    for (; step + 3 < steps; step += 2) {
        fetch(k_begin + (step + 1) * S, false);
        compute(0);
        store(1);
        __syncthreads();
        fetch(k_begin + (step + 2) * S, false);
        compute(1);
        store(0);
        __syncthreads();
        fold();
    }
    for (; step < steps; ++step) {
        const int buf = step & 1;
        const bool more = step + 1 < steps;
        if (more) fetch(k_begin + (step + 1) * S, true);
        compute(buf);
        if (more) store(buf ^ 1);
        __syncthreads();
    }
    fold();

    // Step 3: this slice's sum: x' (G iv) - G (m iv), plus in the direct form the
    // label column's term G[i, y] (x - mu_y) iv_y (from the slice that holds y) and the terms of
    // the slice's bad classes (their pairs were 0 in the tiles); a sample with a non-finite
    // feature takes every class of the slice in the direct form.
    T* out = dx_out + (long long)blockIdx.z * n * dim;
    const P* direct = reinterpret_cast<const P*>(mean_iv);
    __shared__ unsigned flagged[kThreads / 32];
    int y[kPer];
    bool row_bad[kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + 4 * ty + r;
        const int code = i < n ? row_code[i] : -1;
        y[r] = class_of_code(code);
        row_bad[r] = code_is_bad(code);
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
            if (i >= n || j >= dim) continue;
            const T xij = x[(long long)i * dim + j];
            T value = 0;
            if (row_bad[r]) {
                for (int k = k_begin; k < k_end; ++k) {
                    const T g = grad_half_distance(grad_logits[(long long)i * num_classes + k], k,
                                                   y[r], grad_lkd[i], alpha);
                    const P m = direct[(long long)k * dim + j];
                    value = fma_of(g * (xij - m.x), m.y, value);
                }
            } else {
                // the tiles held -G: x' (G iv) - G (m iv) = -x' acc0 + acc1
                value = fma_of(shift[j] - xij, acc[0][r][c], acc[1][r][c]);
                const int yr = y[r];
                if (yr >= k_begin && yr < k_end && !bad_class[yr]) {
                    const T g = grad_half_distance(grad_logits[(long long)i * num_classes + yr],
                                                   yr, yr, grad_lkd[i], alpha);
                    const P m = direct[(long long)yr * dim + j];
                    value = fma_of(g * (xij - m.x), m.y, value);
                }
            }
            acc[0][r][c] = value;
        }
    }
    // The slice's bad classes, in class order.
    for_each_marked(
        k_begin, k_end, flagged, [&](int k) { return bad_class[k] != 0; },
        [&](int kb) {
#pragma unroll
            for (int r = 0; r < kPer; ++r) {
                const int i = row0 + 4 * ty + r;
                if (i >= n || row_bad[r]) continue;
                const T g = grad_half_distance(grad_logits[(long long)i * num_classes + kb], kb,
                                               y[r], grad_lkd[i], alpha);
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                    const int j = col0 + 4 * tx + c;
                    if (j >= dim) continue;
                    const P m = direct[(long long)kb * dim + j];
                    acc[0][r][c] =
                        fma_of(g * (x[(long long)i * dim + j] - m.x), m.y, acc[0][r][c]);
                }
            }
        });
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int i = row0 + 4 * ty + r;
        if (i >= n) continue;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
            const T value = acc[0][r][c];
            if (j < dim) out[(long long)i * dim + j] = value;
        }
    }
}

// dmean and dlog_var over samples [blockIdx.z * rows_per_split, (blockIdx.z + 1) * rows_per_split):
//   P[k, j] = sum_i G[i, k] (x[i, j] - mu[k, j]),  Q[k, j] = sum_i G[i, k] (x[i, j] - mu[k, j])^2
//   dmean = -iv P,  bracket = -0.5 iv Q + gld[k]                         (SPEC 2)
// (P and Q from S1, S2 and gsum over the samples of other classes, plus the direct terms of the
// samples labelled k, of the samples with a non-finite feature, and of a bad class). With one
// slice (gridDim.z == 1) and a diagonal variance, dlog_var_out receives the final bracket * mask.
// Otherwise dmean_out / dlog_var_out are partial buffers:
//   dmean_out[z, k, j]; diagonal: dlog_var_out[z, k, j] = bracket;
//   isotropic: dlog_var_out[z * gridDim.y + blockIdx.y, k] = sum of the bracket over the tile's
//   features,
// and sum_partials finishes them (the mask is applied after the sum, as in SPEC 2). A null
// dmean_out or dlog_var_out is not written (a gradient nobody asked for).
template <typename T>
__global__ void __launch_bounds__(kThreads, Blocking<T>::kMinBlocks) backward_params(
    // data
    const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ mean_iv,
    const T* __restrict__ log_var, const int* __restrict__ row_code,
    const int* __restrict__ bad_class, const T* __restrict__ grad_logits,
    const T* __restrict__ grad_lkd, T* __restrict__ dmean_out, T* __restrict__ dlog_var_out,
    // shapes
    int n, int num_classes, int dim, int rows_per_split,
    // options
    T alpha, T logvar_min, T logvar_max, int logdet_logits, int logdet_lkd, int isotropic) {
    constexpr int S = Blocking<T>::kStep;
    constexpr int kLoads = kTile * S / kThreads;
    constexpr int kRows = kThreads / kTile;  // sample rows one pass of loads covers
    // The tiles run along their 64 outputs; each thread reads 4 contiguous classes and 4
    // contiguous features of one sample.
    // Two buffers of three S x 64 tiles, -G[i0 + ., class0 + .], x'[i0 + ., col0 + .] and x'^2,
    // in one array: a thread's stores and its loads of x' and x'^2 then lie at fixed offsets
    // from one index each, and the buffer is one more offset.
    constexpr int kTileSize = S * kTile;
    constexpr int kBufSize = 3 * kTileSize;
    __shared__ __align__(16) T tiles[2 * kBufSize];
    __shared__ double gs_parts[kRows][kTile];  // per loader row, summed in order
    __shared__ T g_sum[kTile];
    __shared__ unsigned labelled[kThreads / 32];  // for_each_marked's flags (step 3)

    const int tid = threadIdx.x;
    const int tx = tid % 16;  // computes features 4 tx + c
    const int ty = tid / 16;  // computes classes 4 ty + r
    const int class0 = blockIdx.x * kTile;
    const int col0 = blockIdx.y * kTile;
    const int i_begin = blockIdx.z * rows_per_split;
    const int i_end = min(n, i_begin + rows_per_split);
    using P = typename Pair<T>::type;
    const P* terms = reinterpret_cast<const P*>(mean_iv);  // (mu, iv)

    // Step 1 (SPEC 2, P and Q): walk the samples in steps of S with blocked summation. Thread
    // tid loads G and x at column tid % 64 of sample rows tid / 64 + kRows e (coalesced along
    // rows of grad_logits and x) and, on the way, sums the G that enters gsum (the grad_logits
    // that enter gld are that sum's negation plus the label's and the non-finite samples' terms,
    // added in step 3). The tiles hold -G = +grad_logits (the sign is undone in step 3), and 0
    // for the label and a sample with a non-finite feature. row_code: the class id of a sample,
    // or -3 - id for one with a non-finite feature.
    const int load_col = tid % kTile;
    const int load_row = tid / kTile;
    const int k_load = class0 + load_col;
    // A class past K reads class K - 1 and a feature past D feature D - 1: each column of G
    // reaches only its own class's outputs and each column of x its own feature's, which are
    // not stored, so neither needs a select (a class's gsum likewise). x_shift is finite.
    const int k_read = min(k_load, num_classes - 1);
    const int j_read = min(col0 + load_col, dim - 1);
    const T x_shift = shift[j_read];
    // gsum multiplies the means in P and Q, where the expansion cancels: each step's kLoads
    // terms are added in T and the steps' sums in double, so that the rounding of a sum of N
    // terms per loader does not dominate theirs
    double gs_sum = 0;
    T g_next[kLoads], x_next[kLoads];
    // The loaders' rows: full tiles (every tile but the slice's last) read them through
    // pointers that advance a tile per fetch; the last tile reads a row past the slice as the
    // slice's last and a select makes it 0.
    const int row_first = i_begin + load_row;
    const T* __restrict__ gz_src = grad_logits + (long long)row_first * num_classes + k_read;
    const T* __restrict__ x_src = x + (long long)row_first * dim + j_read;
    const int* __restrict__ code_src = row_code + row_first;
    const long long gz_pass = (long long)kRows * num_classes;  // between a thread's rows
    const long long x_pass = (long long)kRows * dim;
    // rows_in: the rows of the tile in the slice (the first rows_in of the thread's kLoads)
    auto take = [&](int rows_in, const T (&gz)[kLoads], const int (&code)[kLoads],
                    const T (&xv)[kLoads]) {
        T step_sum;
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            // a sample with a non-finite feature enters in step 3 only, as does the label
            const bool expand = e < rows_in && code[e] >= -1;
            const T g = (expand && k_load != code[e]) ? gz[e] : T(0);
            step_sum = e ? step_sum + g : g;
            g_next[e] = g;
            x_next[e] = expand ? xv[e] - x_shift : T(0);
        }
        gs_sum += double(step_sum);
    };
    auto fetch_full = [&]() {
        T gz[kLoads], xv[kLoads];
        int code[kLoads];
        const T* gp = gz_src;
        const T* xp = x_src;
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            gz[e] = *gp;
            xv[e] = *xp;
            code[e] = code_src[kRows * e];
            gp += gz_pass;
            xp += x_pass;
        }
        take(kLoads, gz, code, xv);
        gz_src += S * (long long)num_classes;
        x_src += S * (long long)dim;
        code_src += S;
    };
    auto fetch_tail = [&](int i0) {  // the slice's last tile, which starts at sample i0
        T gz[kLoads], xv[kLoads];
        int code[kLoads];
        const int avail = i_end - i0 - load_row;  // > -kRows: i0 < i_end
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            const int rr = min(kRows * e, avail - 1);  // rows from the pointers' row
            gz[e] = gz_src[(long long)rr * num_classes];
            code[e] = code_src[rr];
            xv[e] = x_src[(long long)rr * dim];
        }
        take((avail + kRows - 1) / kRows, gz, code, xv);
    };
    auto store = [&](int buf_at) {
        // row load_row + kRows e, column load_col: element tid + kThreads e of each tile
        const int at = buf_at + tid;
#pragma unroll
        for (int e = 0; e < kLoads; ++e) {
            tiles[at + kThreads * e] = g_next[e];
            tiles[at + kTileSize + kThreads * e] = x_next[e];
            tiles[at + 2 * kTileSize + kThreads * e] = x_next[e] * x_next[e];
        }
    };

    T p_acc[kPer][kPer] = {};  // S1, then P
    T q_acc[kPer][kPer] = {};  // S2, then Q
    auto compute = [&](int buf_at) {
        T p_part[kPer][kPer] = {};
        T q_part[kPer][kPer] = {};
        const int g_at = buf_at + 4 * ty;
        const int x_at = buf_at + kTileSize + 4 * tx;
#pragma unroll
        for (int ii = 0; ii < S; ++ii) {
            T gv[kPer], xs[kPer], x2[kPer];
            load4(&tiles[g_at + kTile * ii], gv);
            load4(&tiles[x_at + kTile * ii], xs);
            load4(&tiles[x_at + kTileSize + kTile * ii], x2);
#pragma unroll
            for (int r = 0; r < kPer; ++r) {
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                    p_part[r][c] = fma_of(gv[r], xs[c], p_part[r][c]);
                    q_part[r][c] = fma_of(gv[r], x2[c], q_part[r][c]);
                }
            }
        }
        // Blocked summation: this step's S terms are summed on their own, then added.
#pragma unroll
        for (int r = 0; r < kPer; ++r) {
#pragma unroll
            for (int c = 0; c < kPer; ++c) {
                p_acc[r][c] += p_part[r][c];
                q_acc[r][c] += q_part[r][c];
            }
        }
    };
    const int steps = i_end > i_begin ? (i_end - i_begin + S - 1) / S : 0;
    if (steps > 1) {
        fetch_full();
        store(0);
    } else if (steps) {
        fetch_tail(i_begin);
        store(0);
    }
    __syncthreads();
    // Unlike the other kernels, the next tile goes to shared memory before this step computes:
    // with 64 accumulators there is no room to hold it in registers meanwhile. The other
    // buffer was last read in the previous step, which every thread finished before the
    // barrier that ended it. Steps whose next tile is full first, then the last.
    int step = 0;
    // offset of the buffer this step computes from, the other being cur ^ kBufSize (toggled
    // rather than formed from step: two instructions fewer a step)
    int cur = 0;
    for (; step + 2 < steps; ++step) {
        fetch_full();
        store(cur ^ kBufSize);
        compute(cur);
        cur ^= kBufSize;
        __syncthreads();
    }
    for (; step < steps; ++step) {
        if (step + 1 < steps) {
            fetch_tail(i_begin + (step + 1) * S);
            store(cur ^ kBufSize);
        }
        compute(cur);
        cur ^= kBufSize;
        __syncthreads();
    }

    // Step 2 (SPEC 2, gsum): add the four loaders' sums of each class in a fixed order.
    gs_parts[load_row][load_col] = gs_sum;
    __syncthreads();
    if (tid < kTile) {
        double gs_total = 0;
        for (int p = 0; p < kRows; ++p) gs_total += gs_parts[p][tid];
        g_sum[tid] = T(gs_total);
    }
    __syncthreads();

    // Step 3: P and Q from the sums, then in the direct form and in sample order the samples of
    // the slice labelled with one of the tile's classes (their label class) and those with a
    // non-finite feature (every class), and a bad class's every sample.
    T mv[kPer][kPer];  // this thread's means, mu - shift
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int k = class0 + 4 * ty + r;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
            mv[r][c] = (k < num_classes && j < dim) ? terms[(long long)k * dim + j].x - shift[j]
                                                    : T(0);
        }
    }
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const T gs = g_sum[4 * ty + r];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const T m = mv[r][c];
            // the tiles held -G: p_acc = -S1, q_acc = -S2 and gs = -gsum
            const T s1 = p_acc[r][c];
            p_acc[r][c] = fma_of(m, gs, -s1);
            q_acc[r][c] = -fma_of(m, fma_of(m, gs, T(-2) * s1), q_acc[r][c]);
        }
    }
    // A class whose mean or log-variance is bad: every sample of the slice, directly.
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int k = class0 + 4 * ty + r;
        if (k >= num_classes || !bad_class[k]) continue;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int j = col0 + 4 * tx + c;
            if (j >= dim) continue;
            const T mu = terms[(long long)k * dim + j].x;
            T p = 0;
            T q = 0;
            for (int i = i_begin; i < i_end; ++i) {
                const T g = grad_half_distance(grad_logits[(long long)i * num_classes + k], k,
                                               class_of_code(row_code[i]), grad_lkd[i], alpha);
                const T t = x[(long long)i * dim + j] - mu;
                const T gt = g * t;
                p += gt;
                q += gt * t;  // rounded apart, as the reference: terms that overflow give
                              // +-Inf each, and NaN when both signs meet
            }
            p_acc[r][c] = p;
            q_acc[r][c] = q;
        }
    }
    // The labelled and non-finite samples, summed on their own before they are added (blocked
    // summation, as in the main loop).
    T p_direct[kPer][kPer] = {};
    T q_direct[kPer][kPer] = {};
    T gl_sum[kPer] = {};  // grad_lkd summed over the slice's samples of this thread's classes
    T gz_direct[kPer] = {};  // grad_logits of the samples left out of gsum
    for_each_marked(
        i_begin, i_end, labelled,
        [&](int i) {
            const int code = row_code[i];
            const int y = class_of_code(code);
            return (y >= class0 && y < class0 + kTile) || code_is_bad(code);
        },
        [&](int si) {
            const int scode = row_code[si];
            const bool every = code_is_bad(scode);
            const int sy = class_of_code(scode);
            if (!every && (sy - class0) / 4 != ty) return;  // another thread row's class
#pragma unroll
            for (int r = 0; r < kPer; ++r) {
                const int k = class0 + 4 * ty + r;
                if (k == sy) gl_sum[r] += grad_lkd[si];
                if (k >= num_classes || (!every && k != sy)) continue;
                const T gz = grad_logits[(long long)si * num_classes + k];
                gz_direct[r] += gz;
                if (bad_class[k]) continue;
                const T g = grad_half_distance(gz, k, sy, grad_lkd[si], alpha);
#pragma unroll
                for (int c = 0; c < kPer; ++c) {
                    const int j = col0 + 4 * tx + c;
                    if (j >= dim) continue;
                    const T t = x[(long long)si * dim + j] - terms[(long long)k * dim + j].x;
                    const T gt = g * t;
                    p_direct[r][c] += gt;
                    q_direct[r][c] = fma_of(gt, t, q_direct[r][c]);
                }
            }
        });
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            p_acc[r][c] += p_direct[r][c];
            q_acc[r][c] += q_direct[r][c];
        }
    }

    // Step 4: dmean, and the bracket of dlog_var (SPEC 2).
    const bool final_output = gridDim.z == 1;
    const long long slice = (long long)blockIdx.z * num_classes * dim;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
        const int k = class0 + 4 * ty + r;
        // gld[k] (SPEC 2): the slice's grad_logits of class k, those summed in gs and those
        // left out
        const T gz_total = gz_direct[r] + g_sum[4 * ty + r];
        const T gld = fma_of(logdet_lkd ? T(0.5) : T(0), gl_sum[r],
                             -(logdet_logits ? T(0.5) : T(0)) * gz_total);
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
