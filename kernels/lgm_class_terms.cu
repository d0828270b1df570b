// Per-call preparation (SPEC sections 1-2), so that the tiled kernels neither clamp nor
// exponentiate nor convert while they load tiles.
//
// lgm::class_terms<T>  mean_iv (K, D, 2) = interleaved (mu[k, j], iv[k, j]) with iv = exp(-c),
//                      c = clip(s), broadcast over D when isotropic (one 8- or 16-byte load
//                      gives both terms of an element); log_det (K,) = ld[k] = sum_j c[k, j]
//                      (isotropic: D * c[k, 0]). One warp per class: block 256, grid ceil(K / 8).
// lgm::class_ids<L>    label (N,) of dtype L -> int32 class ids, -1 where the value is not a class
//                      (the backward's labels, which the forward has checked). Block 256, grid
//                      ceil(N / 256).
#include "lgm_common.cuh"

namespace lgm {

// No __launch_bounds__: with one, ptxas keeps the double version's exp in too few registers
// and spills.
template <typename T>
__global__ void class_terms(
    // data
    const T* __restrict__ mean, const T* __restrict__ log_var, T* __restrict__ mean_iv,
    T* __restrict__ log_det,
    // shapes
    int num_classes, int dim,
    // options
    T logvar_min, T logvar_max, int isotropic) {
    const int lane = threadIdx.x % 32;
    const int k = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32);
    if (k >= num_classes) return;  // the whole warp leaves together, so the shuffles stay full
    T c_sum = 0;
    for (int j = lane; j < dim; j += 32) {
        const long long at = (long long)k * dim + j;
        const T c = clamp_log_var(per_class_at(log_var, k, j, dim, isotropic), logvar_min,
                                  logvar_max);
        mean_iv[2 * at] = mean[at];
        mean_iv[2 * at + 1] = exp_of(-c);
        c_sum += c;
    }
    c_sum = warp_sum(c_sum);
    if (lane == 0) {
        // Isotropic: D * c, exactly as SPEC writes it, not a sum of D equal terms.
        log_det[k] = isotropic ? T(dim) * clamp_log_var(log_var[k], logvar_min, logvar_max)
                               : c_sum;
    }
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
