// Baseline for the GPU benchmark: the kernel design of the authors' Caffe L-GM layer, float only,
// diagonal covariance (SPEC sections 1-2). One thread per output element, each looping over the
// contracted dimension straight from global memory: no tiling, no shared memory, the inverse
// variance recomputed by every thread that needs it. This is the design the lgm kernels are
// measured against, not a second implementation of the operator.
//
// Launch: 1-D grids of 1-D blocks over the flattened outputs; indices are 64-bit because N * K
// passes 2^31 at the benchmark's largest size.

__device__ __forceinline__ float caffe_clamp(float s, float logvar_min, float logvar_max) {
    return s < logvar_min ? logvar_min : (s > logvar_max ? logvar_max : s);
}

// dL/dd[i, k] (SPEC section 2): G = -gz * m + gl * [k == y]
__device__ __forceinline__ float caffe_grad_dist(float gz, float gl, int is_label, float alpha) {
    return is_label ? -gz * (1.0f + alpha) + gl : -gz;
}

// Forward: one thread per (sample i, class k), looping over the D features.
extern "C" __global__ void caffe_lgm_forward(
    // data
    const float* __restrict__ x,        // (N, D)
    const float* __restrict__ label,    // (N,) class ids stored as floats, as Caffe keeps them
    const float* __restrict__ mean,     // (K, D)
    const float* __restrict__ log_var,  // (K, D)
    float* __restrict__ logits,         // (N, K)
    float* __restrict__ lkd,            // (N,)
    // shapes
    int num, int num_classes, int dim,
    // options
    float alpha, float logvar_min, float logvar_max, int logdet_logits, int logdet_lkd) {
    const long long pair = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pair >= (long long)num * num_classes) {
        return;
    }
    const int i = (int)(pair / num_classes);
    const int k = (int)(pair % num_classes);
    const float* xi = x + (long long)i * dim;
    const float* mk = mean + (long long)k * dim;
    const float* sk = log_var + (long long)k * dim;
    float dist = 0.0f;
    float log_det = 0.0f;
    for (int j = 0; j < dim; ++j) {
        const float c = caffe_clamp(sk[j], logvar_min, logvar_max);
        const float diff = xi[j] - mk[j];
        dist += diff * diff * expf(-c);
        log_det += c;
    }
    dist *= 0.5f;
    const int is_label = k == (int)label[i];
    const float margin = is_label ? 1.0f + alpha : 1.0f;
    logits[pair] = -margin * dist - (logdet_logits ? 0.5f * log_det : 0.0f);
    if (is_label) {
        lkd[i] = dist + (logdet_lkd ? 0.5f * log_det : 0.0f);
    }
}

// dx: one thread per (sample i, feature j), looping over the K classes.
extern "C" __global__ void caffe_lgm_backward_data(
    // data
    const float* __restrict__ x,            // (N, D)
    const float* __restrict__ label,        // (N,)
    const float* __restrict__ mean,         // (K, D)
    const float* __restrict__ log_var,      // (K, D)
    const float* __restrict__ grad_logits,  // (N, K)
    const float* __restrict__ grad_lkd,     // (N,)
    float* __restrict__ grad_x,             // (N, D)
    // shapes
    int num, int num_classes, int dim,
    // options
    float alpha, float logvar_min, float logvar_max) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)num * dim) {
        return;
    }
    const int i = (int)(idx / dim);
    const int j = (int)(idx % dim);
    const int yi = (int)label[i];
    const float xij = x[idx];
    const float gl = grad_lkd[i];
    const float* gzi = grad_logits + (long long)i * num_classes;
    float acc = 0.0f;
    for (int k = 0; k < num_classes; ++k) {
        const long long kj = (long long)k * dim + j;
        const float iv = expf(-caffe_clamp(log_var[kj], logvar_min, logvar_max));
        acc += caffe_grad_dist(gzi[k], gl, k == yi, alpha) * (xij - mean[kj]) * iv;
    }
    grad_x[idx] = acc;
}

// dmean and dlog_var: one thread per (class k, feature j), a gather loop over all N samples.
extern "C" __global__ void caffe_lgm_backward_params(
    // data
    const float* __restrict__ x,            // (N, D)
    const float* __restrict__ label,        // (N,)
    const float* __restrict__ mean,         // (K, D)
    const float* __restrict__ log_var,      // (K, D)
    const float* __restrict__ grad_logits,  // (N, K)
    const float* __restrict__ grad_lkd,     // (N,)
    float* __restrict__ grad_mean,          // (K, D)
    float* __restrict__ grad_log_var,       // (K, D)
    // shapes
    int num, int num_classes, int dim,
    // options
    float alpha, float logvar_min, float logvar_max, int logdet_logits, int logdet_lkd) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)num_classes * dim) {
        return;
    }
    const int k = (int)(idx / dim);
    const int j = (int)(idx % dim);
    const float mkj = mean[idx];
    const float s = log_var[idx];
    const float iv = expf(-caffe_clamp(s, logvar_min, logvar_max));
    float sum_g_diff = 0.0f;     // sum_i G[i,k] (x[i,j] - mu[k,j])
    float sum_g_diff2 = 0.0f;    // sum_i G[i,k] (x[i,j] - mu[k,j])^2
    float grad_log_det = 0.0f;   // dL/dlog|Sigma_k| (SPEC section 2, gld)
    for (int i = 0; i < num; ++i) {
        const int is_label = k == (int)label[i];
        const float gz = grad_logits[(long long)i * num_classes + k];
        const float gl = is_label ? grad_lkd[i] : 0.0f;
        const float g = caffe_grad_dist(gz, gl, is_label, alpha);
        const float diff = x[(long long)i * dim + j] - mkj;
        sum_g_diff += g * diff;
        sum_g_diff2 += g * diff * diff;
        grad_log_det += (logdet_logits ? -0.5f * gz : 0.0f) + (logdet_lkd ? 0.5f * gl : 0.0f);
    }
    grad_mean[idx] = -iv * sum_g_diff;
    // the clamp passes gradient on the closed interval; a factor, so NaN still propagates
    const float passes = (s >= logvar_min && s <= logvar_max) ? 1.0f : 0.0f;
    grad_log_var[idx] = (-0.5f * iv * sum_g_diff2 + grad_log_det) * passes;
}
