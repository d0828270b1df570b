// Label check and conversion (SPEC sections 1 and 4): every label must be an integer in [0, K).
//
// lgm_labels_{f32,f64,i32,i64}: label (N,) of that dtype -> int32 (N,); the first offending index
// is left in *first_bad (which the launcher sets to N beforehand), so one 4-byte read tells the
// host whether, and where, the batch is bad. Launch: block 256, grid ceil(N / 256).

namespace lgm {

template <typename L>
__device__ __forceinline__ void labels_to_int32(
    // data
    const L* __restrict__ label, int* __restrict__ label_out, int* __restrict__ first_bad,
    // shapes
    int n, int num_classes) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const L v = label[i];
    // The range test comes first: it rejects NaN (every comparison is false) and makes the
    // conversion to int below well defined; a round trip then rejects fractions.
    bool ok = v >= L(0) && v < L(num_classes);
    const int k = ok ? (int)v : 0;
    ok = ok && L(k) == v;
    label_out[i] = k;
    if (!ok) atomicMin(first_bad, (int)i);
}

}  // namespace lgm

// Exported entry points, one per label dtype (extern "C": no name mangling, found by name).

extern "C" __global__ void lgm_labels_f32(
    // data
    const float* __restrict__ label, int* __restrict__ label_out, int* __restrict__ first_bad,
    // shapes
    int n, int num_classes) {
    lgm::labels_to_int32<float>(label, label_out, first_bad, n, num_classes);
}

extern "C" __global__ void lgm_labels_f64(
    // data
    const double* __restrict__ label, int* __restrict__ label_out, int* __restrict__ first_bad,
    // shapes
    int n, int num_classes) {
    lgm::labels_to_int32<double>(label, label_out, first_bad, n, num_classes);
}

extern "C" __global__ void lgm_labels_i32(
    // data
    const int* __restrict__ label, int* __restrict__ label_out, int* __restrict__ first_bad,
    // shapes
    int n, int num_classes) {
    lgm::labels_to_int32<int>(label, label_out, first_bad, n, num_classes);
}

extern "C" __global__ void lgm_labels_i64(
    // data
    const long long* __restrict__ label, int* __restrict__ label_out, int* __restrict__ first_bad,
    // shapes
    int n, int num_classes) {
    lgm::labels_to_int32<long long>(label, label_out, first_bad, n, num_classes);
}
