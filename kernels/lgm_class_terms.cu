// Per-call preparation (SPEC sections 1-2), so that the tiled kernels neither clamp nor
// exponentiate nor convert while they load tiles.
//
// lgm::centroid<T>     shift (D,) = a centroid of the class means: the mean of an even sample of
//                      at most kCentroidRows means, leaving out means that are not finite or lie
//                      far beyond the typical one (so an Inf, NaN or 1e160 cannot move it); zeros
//                      if none is left. Any shift leaves the distances as they are; a central one
//                      keeps the expanded forms' terms small. One block of 256: grid 1.
// lgm::class_terms<T>  mean_iv (K, D, 2) = interleaved (mu[k, j], iv[k, j]) with iv = exp(-c),
//                      c = clip(s), broadcast over D when isotropic (one 8- or 16-byte load
//                      gives both terms of an element); log_det (K,) = ld[k] = sum_j c[k, j]
//                      (isotropic: D * c[k, 0]); and the operands of the expanded kernels, with
//                      m = mu - shift:
//                        forward (scaled):   terms = (a, -m a) with a = exp(-c / 2) = sqrt(iv),
//                                            sq[k] = B_k = sum_j (m a)^2;
//                        backward:           terms = (iv, m iv) (sq may be null), and 0 for
//                                            a bad class;
//                      bad (K,) = 1 for a class whose mean or log-variance is not finite or whose
//                      terms overflow (sum_j m^2 iv is then not finite): the expanded kernels take
//                      such classes in the direct form. One warp per class: block 256, grid
//                      ceil(K / 8).
// lgm::row_flags<T>    code (N,) = the class id (-1: none), or -3 - id for a sample with a
//                      non-finite feature, which the expanded backward kernels take in the direct
//                      form (one load gives both; lgm::class_of_code decodes it). One warp per
//                      row: block 256, grid ceil(N / 8).
// lgm::class_ids<L>    label (N,) of dtype L -> int32 class ids, -1 where the value is not a class
//                      (the backward's labels, which the forward has checked). Block 256, grid
//                      ceil(N / 256).
#include "lgm_common.cuh"

namespace lgm {

constexpr int kCentroidRows = 63;  // class means sampled for the centroid

template <typename T>
__global__ void __launch_bounds__(kThreads) centroid(
    // data
    const T* __restrict__ mean, T* __restrict__ shift,
    // shapes
    int num_classes, int dim) {
    __shared__ T size[kCentroidRows];     // max_j |mu[row, j]|, or -1 when not finite
    __shared__ long long rows[kCentroidRows];
    __shared__ int keep[kCentroidRows];
    __shared__ int kept;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int sampled = num_classes < kCentroidRows ? num_classes : kCentroidRows;
    // Step 1: the size of each sampled mean, one warp per row.
    for (int s = warp; s < sampled; s += kThreads / 32) {
        const long long row =
            sampled < 2 ? 0 : (long long)s * (num_classes - 1) / (sampled - 1);
        T biggest = 0;
        int finite = 1;
        for (int j = lane; j < dim; j += 32) {
            const T v = fabs(mean[row * dim + j]);
            finite &= isfinite(v) ? 1 : 0;
            biggest = v > biggest ? v : biggest;
        }
        biggest = warp_max(biggest);
        finite = __all_sync(0xffffffffu, finite);
        if (lane == 0) {
            rows[s] = row;
            size[s] = finite ? biggest : T(-1);
        }
    }
    __syncthreads();
    // Step 2: the median of the finite sizes (a sort of at most 63 values, by one thread);
    // rows up to 16 times the median are kept.
    if (threadIdx.x == 0) {
        T sorted[kCentroidRows];
        int count = 0;
        for (int s = 0; s < sampled; ++s) {
            if (size[s] < T(0)) continue;
            int at = count++;
            for (; at > 0 && sorted[at - 1] > size[s]; --at) sorted[at] = sorted[at - 1];
            sorted[at] = size[s];
        }
        const T median = count == 0 ? T(0)
                         : (count % 2 ? sorted[count / 2]
                                      : T(0.5) * (sorted[count / 2 - 1] + sorted[count / 2]));
        kept = 0;
        for (int s = 0; s < sampled; ++s) {
            keep[s] = size[s] >= T(0) && size[s] <= T(16) * median;
            kept += keep[s];
        }
    }
    __syncthreads();
    // Step 3: the mean of the kept rows, per feature, rounded to a multiple of a power of two
    // 8 to 16 times below the means' spread about it. Still central, and with few significant
    // bits, so that x - shift and mu - shift are exact for most features (a shift with every bit
    // set would round nearly every one of them, an error the direct form x - mu rarely has).
    for (int j = threadIdx.x; j < dim; j += kThreads) {
        T total = 0;
        for (int s = 0; s < sampled; ++s) {
            if (keep[s]) total += mean[rows[s] * dim + j];
        }
        const T centre = kept ? total / T(kept) : T(0);
        T spread = 0;
        for (int s = 0; s < sampled; ++s) {
            const T off = fabs(mean[rows[s] * dim + j] - centre);
            if (keep[s] && off > spread) spread = off;
        }
        const T grid = power_of_two_below(spread, 4);
        shift[j] = grid > T(0) ? rint_of(centre / grid) * grid : centre;
    }
}

// No __launch_bounds__: with one, ptxas keeps the double version's exp in too few registers
// and spills.
template <typename T>
__global__ void class_terms(
    // data
    const T* __restrict__ mean, const T* __restrict__ log_var, const T* __restrict__ shift,
    T* __restrict__ mean_iv, T* __restrict__ terms, T* __restrict__ log_det, T* __restrict__ sq,
    int* __restrict__ bad,
    // shapes
    int num_classes, int dim,
    // options
    T logvar_min, T logvar_max, int isotropic, int scaled) {
    const int lane = threadIdx.x % 32;
    const int k = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32);
    if (k >= num_classes) return;  // the whole warp leaves together, so the shuffles stay full
    T c_sum = 0;
    T b_sum = 0;
    for (int j = lane; j < dim; j += 32) {
        const long long at = (long long)k * dim + j;
        const T c = clamp_log_var(per_class_at(log_var, k, j, dim, isotropic), logvar_min,
                                  logvar_max);
        const T mu = mean[at];
        const T iv = exp_of(-c);
        const T m = mu - shift[j];
        mean_iv[2 * at] = mu;
        mean_iv[2 * at + 1] = iv;
        if (scaled) {
            const T a = exp_of(T(-0.5) * c);
            const T ma = m * a;
            terms[2 * at] = a;
            terms[2 * at + 1] = -ma;
            b_sum = fma_of(ma, ma, b_sum);
        } else {
            const T miv = m * iv;
            terms[2 * at] = iv;
            terms[2 * at + 1] = miv;
            b_sum = fma_of(miv, m, b_sum);
        }
        c_sum += c;
    }
    c_sum = warp_sum(c_sum);
    b_sum = warp_sum(b_sum);
    const bool is_bad = !isfinite(b_sum);
    if (is_bad && !scaled) {
        for (int j = lane; j < dim; j += 32) {
            const long long at = (long long)k * dim + j;
            terms[2 * at] = T(0);
            terms[2 * at + 1] = T(0);
        }
    }
    if (lane == 0) {
        bad[k] = is_bad ? 1 : 0;
        // Isotropic: D * c, exactly as SPEC writes it, not a sum of D equal terms.
        log_det[k] = isotropic ? T(dim) * clamp_log_var(log_var[k], logvar_min, logvar_max)
                               : c_sum;
        if (sq) sq[k] = b_sum;
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_flags(
    // data
    const T* __restrict__ x, const int* __restrict__ ids, int* __restrict__ code,
    // shapes
    int n, int dim) {
    const int lane = threadIdx.x % 32;
    const int i = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32);
    if (i >= n) return;  // the whole warp leaves together
    int finite = 1;
    for (int j = lane; j < dim; j += 32) finite &= isfinite(x[(long long)i * dim + j]) ? 1 : 0;
    finite = __all_sync(0xffffffffu, finite);
    if (lane == 0) code[i] = finite ? ids[i] : -3 - ids[i];
}

template <typename L>
__global__ void __launch_bounds__(kThreads) class_ids(
    // data
    const L* __restrict__ label, int* __restrict__ ids,
    // shapes
    int n, int num_classes) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ids[i] = class_of(label[i], num_classes);
}

}  // namespace lgm
