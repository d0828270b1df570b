// The CPU path's passes outside the matrix products (SPEC sections 1-2), multi-threaded with
// OpenMP, framework-free: plain arrays in, plain arrays out. lgm_op/cpu_kernels.py builds this
// file with g++; lgm_op/cpu.py runs the matrix products through NumPy's BLAS between the passes:
//
//   prepare (features and classes)
//   forward:   (BLAS, one batched product) S = xc (mc iv)^T, A = xc^2 iv^T  ->  forward_epilogue
//   backward:  backward_weights  ->  (BLAS) [Q | P] = G [mc iv | iv], [GX | GX2] = G^T [xc | xc^2]
//              ->  backward_features (dx), backward_classes (dmu, dlog_var)
//
// Everything is on operands shifted by a centroid of the class means (xc = x - shift,
// mc = mu - shift; cpu.py explains why), and the entries the expansion cannot give exactly (the
// label column, an entry whose expansion may have cancelled, rows and classes that are not
// finite) are computed directly in double from the unshifted inputs. Each function is a template
// over the storage type T (and the backward's work type W of the matrix products), exported per
// type by LGM_EXPORT_* at the end.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>

typedef int64_t i64;

#define LGM_API __attribute__((visibility("default")))

namespace {

// Below this many elements (about a millisecond of work) a pass runs on the calling thread.
// Under OMP_WAIT_POLICY=PASSIVE, which MXNet wants, an OpenMP region wakes sleeping threads
// (measured 12-52 us a region here) that then compete with MXNet's engine and NumPy's BLAS
// threads for the cores. Measured inside MXNet on 2 cores, interleaved with the stock-op peer
// (peer / op): 128 x 100 x 384 1.05-1.16 with every pass on one thread vs 0.89-0.91 from 2^15
// on; 256 x 1000 x 128 1.16-1.26 vs 0.96-1.06; 512 x 10000 x 512 1.06-1.14 either way (the
// products dominate there).
const i64 kParallelWork = 1 << 20;
// The threshold in force: kParallelWork unless lgm_set_parallel_work changed it (the tests run
// every pass threaded on small arrays that way).
std::atomic<i64> parallel_work{kParallelWork};
// A calling thread's own threshold, when it set one and it is lower (0: none): the PyTorch binding's
// threads, whose OpenMP threads spin between PyTorch's operators, gain from threading smaller
// passes than MXNet's, which sleep (OMP_WAIT_POLICY=PASSIVE).
thread_local i64 thread_parallel_work = 0;
// The centroid is the mean of at most this many evenly spaced class means (cpu.py: _centroid).
const i64 kCentroidRows = 63;

inline bool parallel_for(i64 work) {
    const i64 limit = parallel_work.load(std::memory_order_relaxed);
    return work >= (thread_parallel_work ? std::min(thread_parallel_work, limit) : limit);
}

// clip(v, lo, hi) with NaN kept (as np.clip), in a form the compiler vectorises
template <typename T>
inline T clamp(T v, T lo, T hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

struct Shape {
    i64 n, k, d;
    i64 sd;        // columns of log_var: d (diagonal) or 1 (isotropic)
};

// exp(x) for a whole array (out may be x), in a form the compiler vectorises: x = k ln2 + r with
// |r| <= ln2/2, exp(r) by its Taylor series (to degree 13 in double, 7 in float: truncation far
// below an ulp), 2^k from the exponent bits; within 2 ulps of the correctly rounded result. An
// array with an argument beyond the polynomial's range (or infinite, or NaN) goes through
// std::exp instead.
template <typename T>
bool exp_in_range(const T* x, i64 count, T limit) {
    i64 outside = 0;  // a count, not a flag: the compiler vectorises the sum (NaN is outside)
#pragma omp simd reduction(+ : outside)
    for (i64 e = 0; e < count; ++e) outside += !(std::fabs(x[e]) <= limit);
    return outside == 0;
}

inline void exp_array(const double* x, i64 count, double* out) {
    if (!exp_in_range(x, count, 700.0)) {
        for (i64 e = 0; e < count; ++e) out[e] = std::exp(x[e]);
        return;
    }
    const double inv_ln2 = 1.4426950408889634, ln2_hi = 0.6931471803691238,
                 ln2_lo = 1.9082149292705877e-10, shifter = 6755399441055744.0;  // 1.5 * 2^52
    const int64_t shifter_bits = __builtin_bit_cast(int64_t, shifter);
#pragma omp simd
    for (i64 e = 0; e < count; ++e) {
        const double v = x[e];
        double kf = (v * inv_ln2 + shifter) - shifter;        // round to nearest
        double r = (v - kf * ln2_hi) - kf * ln2_lo;
        double p = 1.0 / 6227020800.0;
        p = p * r + 1.0 / 479001600.0;
        p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;
        p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        int64_t bits = (__builtin_bit_cast(int64_t, kf + shifter) - shifter_bits + 1023) << 52;
        out[e] = p * __builtin_bit_cast(double, bits);
    }
}

inline void exp_array(const float* x, i64 count, float* out) {
    if (!exp_in_range(x, count, 87.0f)) {
        for (i64 e = 0; e < count; ++e) out[e] = std::exp(x[e]);
        return;
    }
    const float inv_ln2 = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-6f,
                shifter = 12582912.0f;                                      // 1.5 * 2^23
    const int32_t shifter_bits = __builtin_bit_cast(int32_t, shifter);
#pragma omp simd
    for (i64 e = 0; e < count; ++e) {
        const float v = x[e];
        float kf = (v * inv_ln2 + shifter) - shifter;
        float r = (v - kf * ln2_hi) - kf * ln2_lo;
        float p = 1.0f / 5040.0f;
        p = p * r + 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
        p = p * r + 1.0f / 24.0f;
        p = p * r + 1.0f / 6.0f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        int32_t bits = (__builtin_bit_cast(int32_t, kf + shifter) - shifter_bits + 127) << 23;
        out[e] = p * __builtin_bit_cast(float, bits);
    }
}

// The inverse variances in double, exp(-clip(s)) as the float64 answer has them, for the
// entries computed directly: a class's row is computed on its first use in a step, by one
// thread (others wait for it), into cache (K, sd); ready: (K,) 0 = not yet, 1 = being computed,
// 2 = ready (prepare_classes resets it).
template <typename T>
struct InverseVariances {
    const T* s;
    i64 sd;
    double lo, hi;
    double* cache;
    uint8_t* ready;

    const double* row(i64 k) const {
        double* out = cache + k * sd;
        if (__atomic_load_n(ready + k, __ATOMIC_ACQUIRE) == 2) return out;
        uint8_t expected = 0;
        if (__atomic_compare_exchange_n(ready + k, &expected, uint8_t(1), false,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            const T* sk = s + k * sd;
            for (i64 j = 0; j < sd; ++j) out[j] = -clamp(double(sk[j]), lo, hi);
            exp_array(out, sd, out);
            __atomic_store_n(ready + k, uint8_t(2), __ATOMIC_RELEASE);
            return out;
        }
        while (__atomic_load_n(ready + k, __ATOMIC_ACQUIRE) != 2) {
        }
        return out;
    }
};

// Half the squared Mahalanobis distance of entry (i, k), directly, in double.
template <typename T>
double direct_half_distance(const T* x, const T* mu, const InverseVariances<T>& ivs,
                            const Shape& sh, i64 i, i64 k) {
    const T* xi = x + i * sh.d;
    const T* mk = mu + k * sh.d;
    const double* iv = ivs.row(k);
    // sums of non-negative terms (or NaN): any order gives the same special values, and the
    // vector lanes' partial sums are at least as accurate as one running sum
    double acc = 0;
    if (sh.sd == 1) {
#pragma omp simd reduction(+ : acc)
        for (i64 j = 0; j < sh.d; ++j) {
            double diff = double(xi[j]) - double(mk[j]);
            acc += diff * diff;
        }
        return 0.5 * acc * iv[0];
    }
#pragma omp simd reduction(+ : acc)
    for (i64 j = 0; j < sh.d; ++j) {
        double diff = double(xi[j]) - double(mk[j]);
        acc += diff * diff * iv[j];
    }
    return 0.5 * acc;
}

// 1. shift: (D,) the mean of the sampled class means that are finite and not far beyond the
// typical one (max |mu_kj| at most 16x the median of those maxima); zeros if none is finite.
template <typename T>
void centroid(const T* mu, const Shape& sh, T* shift) {
    i64 m = std::min(sh.k, kCentroidRows);
    std::vector<i64> rows(m);
    double step = m > 1 ? double(sh.k - 1) / double(m - 1) : 0.0;
    for (i64 r = 0; r < m; ++r)
        rows[r] = sh.k <= kCentroidRows ? r : (r == m - 1 ? sh.k - 1 : i64(r * step));
    std::vector<T> size(m);
    std::vector<T> finite;
    for (i64 r = 0; r < m; ++r) {
        const T* row = mu + rows[r] * sh.d;
        T top = 0;
        i64 nan = 0;  // a count and a max reduction: both vectorise
#pragma omp simd reduction(max : top) reduction(+ : nan)
        for (i64 j = 0; j < sh.d; ++j) {
            T a = std::fabs(row[j]);
            nan += a != a;
            top = a > top ? a : top;
        }
        size[r] = nan ? std::numeric_limits<T>::quiet_NaN() : top;
        if (std::isfinite(size[r])) finite.push_back(size[r]);
    }
    std::fill(shift, shift + sh.d, T(0));
    if (finite.empty()) return;
    std::sort(finite.begin(), finite.end());
    i64 f = i64(finite.size());
    T median = f % 2 ? finite[f / 2] : T((finite[f / 2 - 1] + finite[f / 2]) / T(2));
    T limit = T(16) * median;
    std::vector<double> sum(sh.d, 0.0);
    i64 kept = 0;
    for (i64 r = 0; r < m; ++r) {
        if (!(std::isfinite(size[r]) && size[r] <= limit)) continue;
        const T* row = mu + rows[r] * sh.d;
        for (i64 j = 0; j < sh.d; ++j) sum[j] += double(row[j]);
        ++kept;
    }
    for (i64 j = 0; j < sh.d; ++j) shift[j] = T(sum[j] / double(kept));
}

// 2. xcx: (N, D + sd) = [xc | xc^2] (diagonal) or [xc | |xc|^2] (isotropic), xc = x - shift;
// norm: (N,) |xc|^2; bad_row: (N,) 1 where the row is not finite or its squares could overflow in
// the products (no inverse variance exceeds exp(-logvar_min)); such rows are zeroed.
template <typename T>
void prepare_features(const T* x, const T* mu, const Shape& sh, double logvar_min, T* shift,
                      T* xcx, T* norm, uint8_t* bad_row) {
    centroid(mu, sh, shift);
    const i64 width = sh.d + sh.sd;
    const double biggest_iv = std::exp(-logvar_min);
#pragma omp parallel for schedule(static) if (parallel_for(sh.n * sh.d))
    for (i64 i = 0; i < sh.n; ++i) {
        const T* xi = x + i * sh.d;
        T* xc = xcx + i * width;
        double acc = 0;  // non-negative terms: the lanes' order changes no special value
#pragma omp simd reduction(+ : acc)
        for (i64 j = 0; j < sh.d; ++j) {
            T v = xi[j] - shift[j];
            xc[j] = v;
            acc += double(v) * double(v);
        }
        T nrm = T(acc);
        bool bad = !std::isfinite(double(nrm) * biggest_iv);
        bad_row[i] = bad;
        if (bad) {
            std::fill(xc, xc + width, T(0));
            norm[i] = 0;
            continue;
        }
        norm[i] = nrm;
        if (sh.sd == 1) {
            xc[sh.d] = nrm;
        } else {
            for (i64 j = 0; j < sh.d; ++j) xc[sh.d + j] = xc[j] * xc[j];
        }
    }
}

// 3. Per class: ivm (K, D + sd) = [mc iv | iv] with iv = exp(-clip(s, logvar_min, logvar_max))
// in T and mc = mu - shift; sq (K,) = sum_j mc^2 iv; half_log_det (K,) = 0.5 log|Sigma_k| of the
// clamped log-variances (NaN kept). A class whose terms are not finite (its mean or log-variance
// is not, or they overflow) is flagged in bad_class and zeroed in ivm and sq so the products stay
// finite; its entries are computed directly. iv_ready: (K,) reset for InverseVariances.
template <typename T>
void prepare_classes(const T* mu, const T* s, const T* shift, const Shape& sh, double logvar_min,
                     double logvar_max, T* ivm, T* sq, T* half_log_det, uint8_t* bad_class,
                     uint8_t* iv_ready) {
    const i64 width = sh.sd + sh.d;
    const T lo = T(logvar_min), hi = T(logvar_max);
#pragma omp parallel for schedule(static) if (parallel_for(sh.k * sh.d))
    for (i64 k = 0; k < sh.k; ++k) {
        const T* mk = mu + k * sh.d;
        const T* sk = s + k * sh.sd;
        T* row = ivm + k * width;
        T* iv = row + sh.d;
        double log_det = 0;  // finite terms (clamped) or NaN
#pragma omp simd reduction(+ : log_det)
        for (i64 j = 0; j < sh.sd; ++j) {
            T clamped = clamp(sk[j], lo, hi);
            log_det += double(clamped);
            iv[j] = -clamped;
        }
        exp_array(iv, sh.sd, iv);
        if (sh.sd == 1) log_det *= double(sh.d);
        double acc = 0;  // terms m^2 iv >= 0, or NaN, or inf (then flagged bad below)
#pragma omp simd reduction(+ : acc)
        for (i64 j = 0; j < sh.d; ++j) {
            T m = mk[j] - shift[j];
            T mi = m * iv[sh.sd == 1 ? 0 : j];
            row[j] = mi;
            acc += double(m) * double(mi);
        }
        half_log_det[k] = T(0.5 * log_det);
        T b = T(acc);
        bool bad = !std::isfinite(b);
        bad_class[k] = bad;
        if (bad) {
            std::fill(row, row + width, T(0));
            b = 0;
        }
        sq[k] = b;
        iv_ready[k] = 0;
    }
}

struct ForwardOptions {
    double alpha;          // margin (0: none)
    double inv_tau;        // an expanded entry is kept when 2d >= (A + B) / tau
    int logdet_logits, logdet_lkd;
};

// 5. logits (N, K) and lkd (N,) from a_part = A = (x^2) iv^T (N, K) (diagonal; null when
// isotropic, where A = |x|^2 iv_k is formed here) and s_mciv = x (mu iv)^T (N, K); ivm as
// prepare_classes makes it. label: (N,) or null (the label-free form: lkd then uses the
// predicted class, the first largest logit).
template <typename T>
void forward_epilogue(const T* x, const i64* label, const T* mu,
                      const InverseVariances<T>& ivs, const Shape& sh, const T* a_part,
                      const T* s_mciv, const T* norm, const T* ivm, const T* sq,
                      const T* half_log_det, const uint8_t* bad_row, const uint8_t* bad_class,
                      ForwardOptions o, T* logits, T* lkd) {
    const bool iso = sh.sd == 1;
    const T inv_tau = T(o.inv_tau), minus_half = T(-0.5), log_det_scale = o.logdet_logits;
#pragma omp parallel if (parallel_for(sh.n * sh.k))
    {
        std::vector<uint8_t> direct(sh.k);
#pragma omp for schedule(static)
        for (i64 i = 0; i < sh.n; ++i) {
            T* row = logits + i * sh.k;
            const T* srow = s_mciv + i * sh.k;
            const T nrm = norm[i];
            // (a) the expansion, and where it may have cancelled (a class's log-det term is
            // finite unless the class is bad, whose entries are replaced in (b))
            const i64 classes = sh.k;          // a local bound: the byte stores below could
            uint8_t* flag = direct.data();     // alias sh as far as the compiler knows
            if (iso)
                for (i64 k = 0; k < classes; ++k) row[k] = nrm * ivm[k * (sh.d + 1) + sh.d];
            const T* arow = iso ? row : a_part + i * sh.k;   // (read before row is written)
            for (i64 k = 0; k < classes; ++k) {
                T t = arow[k] + sq[k];
                T two_d = T(-2) * srow[k] + t;
                flag[k] = uint8_t(!(two_d >= t * inv_tau)) | bad_class[k];
                row[k] = two_d * minus_half - log_det_scale * half_log_det[k];
            }
            const i64 y = label ? label[i] : -1;
            if (y >= 0) direct[y] = 1;
            if (bad_row[i]) std::fill(direct.begin(), direct.end(), uint8_t(1));
            // (b) those entries directly; the label's with the margin
            double d_label = 0;
            for (i64 k = 0; k < sh.k; ++k) {
                if (k + 8 <= sh.k) {  // eight flags at a time: most are 0
                    uint64_t word;
                    std::memcpy(&word, flag + k, 8);
                    if (word == 0) {
                        k += 7;
                        continue;
                    }
                }
                if (!direct[k]) continue;
                double d = direct_half_distance(x, mu, ivs, sh, i, k);
                double value = (k == y ? -(1.0 + o.alpha) : -1.0) * d;
                if (o.logdet_logits) value -= double(half_log_det[k]);
                row[k] = T(value);
                if (k == y) d_label = d;
            }
            i64 yl = y;
            if (yl < 0) {  // label-free: the predicted class (np.argmax: the first NaN, else max)
                yl = 0;
                for (i64 k = 0; k < sh.k; ++k) {
                    if (row[k] != row[k]) { yl = k; break; }
                    if (row[k] > row[yl]) yl = k;
                }
                d_label = direct_half_distance(x, mu, ivs, sh, i, yl);
            }
            if (o.logdet_lkd) d_label += double(half_log_det[yl]);
            lkd[i] = T(d_label);
        }
    }
}

// Entries that the backward takes out of G and adds directly: the label column, and every entry
// of a bad row or class. row_start: (N + 1,) offsets of each row's entries.
inline void direct_row_starts(const i64* label, const uint8_t* bad_row, const uint8_t* bad_class,
                              const Shape& sh, i64* row_start) {
    i64 bad_classes = 0;
    for (i64 k = 0; k < sh.k; ++k) bad_classes += bad_class[k];
    row_start[0] = 0;
    for (i64 i = 0; i < sh.n; ++i) {
        i64 count = bad_row[i] ? sh.k : bad_classes + (bad_class[label[i]] ? 0 : 1);
        row_start[i + 1] = row_start[i] + count;
    }
}

// 6. G = dL/dd (N, K) in the work type W, with the direct entries set to 0 and listed in
// (entry_class, entry_weight) at row_start (the weight is their dL/dd, the margin and the lkd
// gradient included); g_col (K,) the column sums of G and gz_col (K,) those of grad_logits, in
// double.
template <typename T, typename W>
void backward_weights(const T* grad_logits, const T* grad_lkd, const i64* label, const Shape& sh,
                      const uint8_t* bad_row, const uint8_t* bad_class, double alpha,
                      const i64* row_start, W* g, i64* entry_class, double* entry_weight,
                      double* g_col, double* gz_col) {
    const bool parallel = parallel_for(sh.n * sh.k);
    const int threads = parallel ? omp_get_max_threads() : 1;
    std::vector<double> partial(size_t(threads) * 2 * sh.k, 0.0);
    std::vector<i64> bad_classes;
    for (i64 k = 0; k < sh.k; ++k)
        if (bad_class[k]) bad_classes.push_back(k);
#pragma omp parallel num_threads(threads) if (parallel)
    {
        double* gc = partial.data() + size_t(omp_get_thread_num()) * 2 * sh.k;
        double* zc = gc + sh.k;
#pragma omp for schedule(static)
        for (i64 i = 0; i < sh.n; ++i) {
            const T* gz = grad_logits + i * sh.k;
            W* gi = g + i * sh.k;
            for (i64 k = 0; k < sh.k; ++k) {
                W v = -W(gz[k]);
                gi[k] = v;
                zc[k] += double(gz[k]);
            }
            const i64 y = label[i];
            i64 e = row_start[i];
            auto take = [&](i64 k) {
                double w = double(gi[k]);
                if (k == y) w = w * (1.0 + alpha) + double(grad_lkd[i]);
                entry_class[e] = k;
                entry_weight[e] = w;
                ++e;
                gi[k] = 0;
            };
            if (bad_row[i]) {
                for (i64 k = 0; k < sh.k; ++k) take(k);
            } else {
                bool label_taken = false;      // in class order: the bad classes and the label
                for (i64 k : bad_classes) {
                    if (!label_taken && y < k) {
                        take(y);
                        label_taken = true;
                    }
                    if (k == y) label_taken = true;
                    take(k);
                }
                if (!label_taken) take(y);
            }
            // the column sums of what is left in G (the row is still in cache)
            for (i64 k = 0; k < sh.k; ++k) gc[k] += double(gi[k]);
        }
    }
#pragma omp parallel for schedule(static) if (parallel_for(sh.k * threads))
    for (i64 k = 0; k < sh.k; ++k) {
        double a = 0, b = 0;
        for (int t = 0; t < threads; ++t) {
            a += partial[size_t(t) * 2 * sh.k + k];
            b += partial[size_t(t) * 2 * sh.k + sh.k + k];
        }
        g_col[k] = a;
        gz_col[k] = b;
    }
}

// 7. dx (N, D) = xc * P - Q + the direct entries' sum_k w_ik iv_k (x_i - mu_k), from
// pq = [Q | P] = G [mc iv | iv]: (N, D + sd).
template <typename T, typename W>
void backward_features(const T* x, const T* mu, const InverseVariances<T>& ivs, const Shape& sh,
                       const T* xcx, const W* pq, const i64* row_start, const i64* entry_class,
                       const double* entry_weight, T* dx) {
    const i64 width = sh.d + sh.sd, pq_width = sh.sd + sh.d;
#pragma omp parallel if (parallel_for(sh.n * sh.d))
    {
        std::vector<double> acc(sh.d);
#pragma omp for schedule(static)
        for (i64 i = 0; i < sh.n; ++i) {
            const T* xc = xcx + i * width;
            const W* q = pq + i * pq_width;
            const W* p = q + sh.d;
            for (i64 j = 0; j < sh.d; ++j)
                acc[j] = double(xc[j]) * double(p[sh.sd == 1 ? 0 : j]) - double(q[j]);
            const T* xi = x + i * sh.d;
            for (i64 e = row_start[i]; e < row_start[i + 1]; ++e) {
                const i64 k = entry_class[e];
                const T* mk = mu + k * sh.d;
                const double* iv = ivs.row(k);
                const double w = entry_weight[e];
                if (sh.sd == 1) {
                    const double wv = w * iv[0];
                    for (i64 j = 0; j < sh.d; ++j) acc[j] += wv * (double(xi[j]) - double(mk[j]));
                } else {
                    for (i64 j = 0; j < sh.d; ++j)
                        acc[j] += w * iv[j] * (double(xi[j]) - double(mk[j]));
                }
            }
            T* out = dx + i * sh.d;
            for (i64 j = 0; j < sh.d; ++j) out[j] = T(acc[j]);
        }
    }
}

struct BackwardOptions {
    int logdet_logits, logdet_lkd;
    int need_mean, need_log_var;
};

// 8. dmu (K, D) and dlog_var (K, sd) from gx = [GX | GX2] = G^T [xc | xc^2 (or |xc|^2)]:
// (K, D + sd), the column sums, the lkd gradients by class and the direct entries (grouped by
// class here); mc = mu - shift as prepare_classes forms it. Log-variances the clamp blocks (its
// value differs from the input, or is NaN) get exactly 0.
template <typename T, typename W>
void backward_classes(const T* x, const i64* label, const T* mu, const T* s,
                      const InverseVariances<T>& ivs, const T* grad_lkd, const Shape& sh,
                      const T* shift, const T* ivm, const W* gx, i64 gx_width, const double* g_col, const double* gz_col, const i64* row_start,
                      const i64* entry_class, const double* entry_weight, BackwardOptions o,
                      T* dmu, T* dlog_var) {
    const i64 entries = row_start[sh.n];
    // the direct entries by class (a counting sort), and the lkd gradients summed by class
    std::vector<i64> class_start(sh.k + 1, 0), order(entries), entry_row(entries);
    std::vector<double> gl_class(sh.k, 0.0);
    for (i64 i = 0; i < sh.n; ++i) {
        gl_class[label[i]] += double(grad_lkd[i]);
        for (i64 e = row_start[i]; e < row_start[i + 1]; ++e) {
            entry_row[e] = i;
            ++class_start[entry_class[e] + 1];
        }
    }
    for (i64 k = 0; k < sh.k; ++k) class_start[k + 1] += class_start[k];
    {
        std::vector<i64> fill(class_start.begin(), class_start.end() - 1);
        for (i64 e = 0; e < entries; ++e) order[fill[entry_class[e]]++] = e;
    }
    const i64 iv_width = sh.sd + sh.d;
    const bool iso = sh.sd == 1;
    const T lo = T(ivs.lo), hi = T(ivs.hi);
#pragma omp parallel if (parallel_for(sh.k * sh.d))
    {
        std::vector<double> dm(sh.d), ds(sh.d);
#pragma omp for schedule(dynamic, 16)
        for (i64 k = 0; k < sh.k; ++k) {
            const T* ivk = ivm + k * iv_width + sh.d;   // iv (ivm is [mc iv | iv])
            const T* mk = mu + k * sh.d;
            const W* gxk = gx + k * gx_width;
            const double gc = g_col[k];
            double g_log_det = 0;
            if (o.logdet_logits) g_log_det -= 0.5 * gz_col[k];
            if (o.logdet_lkd) g_log_det += 0.5 * gl_class[k];
            if (iso) g_log_det *= double(sh.d);
            double ssq_iso = iso ? double(gxk[sh.d]) : 0.0;
            double* dmk = dm.data();
            double* dsk = ds.data();
            if (iso) {
                const double iv = double(ivk[0]);
                for (i64 j = 0; j < sh.d; ++j) {
                    const double m = double(T(mk[j] - shift[j])), gxj = double(gxk[j]);
                    dmk[j] = (m * gc - gxj) * iv;                  // -sum_i G_ik (xc_i - mc_k)
                    ssq_iso -= m * (2.0 * gxj - m * gc);
                }
            } else {  // the same per feature, in a form the compiler vectorises
#pragma omp simd
                for (i64 j = 0; j < sh.d; ++j) {
                    const double m = double(T(mk[j] - shift[j])), gxj = double(gxk[j]);
                    const double iv = double(ivk[j]);
                    dmk[j] = (m * gc - gxj) * iv;                  // -sum_i G_ik (xc_i - mc_k)
                    const double cross = m * (2.0 * gxj - m * gc);
                    dsk[j] = -0.5 * (double(gxk[sh.d + j]) - cross) * iv + g_log_det;
                }
            }
            double ds_iso = iso ? -0.5 * ssq_iso * double(ivk[0]) + g_log_det : 0.0;
            if (class_start[k + 1] > class_start[k]) {
                const double* iv64 = ivs.row(k);
                for (i64 p = class_start[k]; p < class_start[k + 1]; ++p) {
                    const i64 e = order[p];
                    const T* xi = x + entry_row[e] * sh.d;
                    const double w = entry_weight[e];
                    if (iso) {
                        for (i64 j = 0; j < sh.d; ++j) {
                            const double diff = double(xi[j]) - double(mk[j]);
                            const double wj = w * iv64[0] * diff;
                            dmk[j] -= wj;
                            ds_iso -= 0.5 * wj * diff;
                        }
                    } else {
#pragma omp simd
                        for (i64 j = 0; j < sh.d; ++j) {
                            const double diff = double(xi[j]) - double(mk[j]);
                            const double wj = w * iv64[j] * diff;
                            dmk[j] -= wj;
                            dsk[j] -= 0.5 * wj * diff;
                        }
                    }
                }
            }
            if (o.need_mean) {
                T* out = dmu + k * sh.d;
#pragma omp simd
                for (i64 j = 0; j < sh.d; ++j) out[j] = T(dmk[j]);
            }
            if (o.need_log_var) {
                T* out = dlog_var + k * sh.sd;
                const T* sk = s + k * sh.sd;
                // the clamp passes no gradient where it changed the value (or it is NaN)
                if (iso) {
                    out[0] = clamp(sk[0], lo, hi) == sk[0] ? T(ds_iso) : T(0);
                } else {
#pragma omp simd
                    for (i64 j = 0; j < sh.d; ++j) {
                        const T v = sk[j];
                        out[j] = clamp(v, lo, hi) == v ? T(dsk[j]) : T(0);
                    }
                }
            }
        }
    }
}

}  // namespace

// ------------------------------------------------------------------------------------------
// exported entry points, one per type (T) or pair of types (T, W); suffix f: float, d: double,
// fd: float storage with double products. The direct entries' inverse variances come from
// (s, logvar_min, logvar_max, iv_cache (K, sd), iv_ready (K,)): see InverseVariances.

#define LGM_IVS(T) InverseVariances<T>{s, sd, logvar_min, logvar_max, iv_cache, iv_ready}

#define LGM_EXPORT_T(T, sfx)                                                                    \
    extern "C" LGM_API void lgm_prepare_##sfx(                                                  \
        const T *x, const T *mu, const T *s, i64 n, i64 k, i64 d, i64 sd, double logvar_min,    \
        double logvar_max, T *shift, T *xcx, T *norm, uint8_t *bad_row, T *ivm, T *sq,          \
        T *half_log_det, uint8_t *bad_class, uint8_t *iv_ready) {                               \
        const Shape sh{n, k, d, sd};                                                            \
        prepare_features(x, mu, sh, logvar_min, shift, xcx, norm, bad_row);                     \
        prepare_classes(mu, s, shift, sh, logvar_min, logvar_max, ivm, sq, half_log_det,        \
                        bad_class, iv_ready);                                                   \
    }                                                                                           \
    extern "C" LGM_API void lgm_forward_epilogue_##sfx(                                         \
        const T *x, const i64 *label, const T *mu, const T *s, double logvar_min,               \
        double logvar_max, double *iv_cache, uint8_t *iv_ready, i64 n, i64 k, i64 d, i64 sd,    \
        const T *a_part, const T *s_mciv, const T *norm, const T *ivm, const T *sq,             \
        const T *half_log_det, const uint8_t *bad_row, const uint8_t *bad_class, double alpha,  \
        double inv_tau, int logdet_logits, int logdet_lkd, T *logits, T *lkd) {                 \
        forward_epilogue(x, label, mu, LGM_IVS(T), Shape{n, k, d, sd}, a_part, s_mciv, norm,    \
                         ivm, sq, half_log_det, bad_row, bad_class,                             \
                         ForwardOptions{alpha, inv_tau, logdet_logits, logdet_lkd}, logits,     \
                         lkd);                                                                  \
    }

#define LGM_EXPORT_TW(T, W, sfx)                                                                \
    extern "C" LGM_API void lgm_backward_weights_##sfx(                                         \
        const T *grad_logits, const T *grad_lkd, const i64 *label, i64 n, i64 k, i64 d, i64 sd, \
        const uint8_t *bad_row, const uint8_t *bad_class, double alpha, const i64 *row_start,   \
        W *g, i64 *entry_class, double *entry_weight, double *g_col, double *gz_col) {          \
        backward_weights(grad_logits, grad_lkd, label, Shape{n, k, d, sd}, bad_row, bad_class,  \
                         alpha, row_start, g, entry_class, entry_weight, g_col, gz_col);        \
    }                                                                                           \
    extern "C" LGM_API void lgm_backward_features_##sfx(                                        \
        const T *x, const T *mu, const T *s, double logvar_min, double logvar_max,              \
        double *iv_cache, uint8_t *iv_ready, i64 n, i64 k, i64 d, i64 sd, const T *xcx,         \
        const W *pq, const i64 *row_start, const i64 *entry_class, const double *entry_weight,  \
        T *dx) {                                                                                \
        backward_features(x, mu, LGM_IVS(T), Shape{n, k, d, sd}, xcx, pq, row_start,            \
                          entry_class, entry_weight, dx);                                       \
    }                                                                                           \
    extern "C" LGM_API void lgm_backward_classes_##sfx(                                         \
        const T *x, const i64 *label, const T *mu, const T *s, double logvar_min,               \
        double logvar_max, double *iv_cache, uint8_t *iv_ready, const T *grad_lkd, i64 n,       \
        i64 k, i64 d, i64 sd, const T *shift, const T *ivm, const W *gx, i64 gx_width,          \
        const double *g_col, const double *gz_col, const i64 *row_start,                        \
        const i64 *entry_class, const double *entry_weight, int logdet_logits, int logdet_lkd,  \
        int need_mean, int need_log_var, T *dmu, T *dlog_var) {                                 \
        backward_classes(x, label, mu, s, LGM_IVS(T), grad_lkd, Shape{n, k, d, sd}, shift, ivm, \
                         gx, gx_width, g_col, gz_col, row_start, entry_class, entry_weight,     \
                         BackwardOptions{logdet_logits, logdet_lkd, need_mean, need_log_var},   \
                         dmu, dlog_var);                                                        \
    }

// Labels (N,) of a real type as int64 class ids in out; returns the index of the first label
// that is not an integer in [0, K) (NaN and infinities included), or -1 when all are.
template <typename L>
i64 labels(const L* label, i64 n, i64 k, i64* out) {
    for (i64 i = 0; i < n; ++i) {
        const L v = label[i];
        if constexpr (std::is_floating_point<L>::value) {
            if (!(v >= L(0) && v < L(k)) || std::floor(v) != v) return i;  // NaN fails v >= 0
        } else {
            if (v < L(0) || v >= L(k)) return i;
        }
        out[i] = i64(v);
    }
    return -1;
}

#define LGM_EXPORT_LABELS(L, sfx)                                                               \
    extern "C" LGM_API i64 lgm_labels_##sfx(const L *label, i64 n, i64 k, i64 *out) {           \
        return labels(label, n, k, out);                                                        \
    }
LGM_EXPORT_LABELS(float, f)
LGM_EXPORT_LABELS(double, d)
LGM_EXPORT_LABELS(int32_t, i)
LGM_EXPORT_LABELS(int64_t, l)

// Sets the number of elements from which a pass runs on several threads (0: kParallelWork);
// returns the previous one.
extern "C" LGM_API i64 lgm_set_parallel_work(i64 elements) {
    return parallel_work.exchange(elements > 0 ? elements : kParallelWork);
}

// Sets the calling thread's own threshold (0: none; the lower of it and the process-wide one
// applies); returns the previous one.
extern "C" LGM_API i64 lgm_set_thread_parallel_work(i64 elements) {
    const i64 previous = thread_parallel_work;
    thread_parallel_work = elements > 0 ? elements : 0;
    return previous;
}

// How many threads a pass over this many elements uses on the calling thread (for tests).
extern "C" LGM_API i64 lgm_threads_for(i64 elements) {
    return parallel_for(elements) ? omp_get_max_threads() : 1;
}

extern "C" LGM_API void lgm_direct_row_starts(const i64 *label, const uint8_t *bad_row,
                                              const uint8_t *bad_class, i64 n, i64 k,
                                              i64 *row_start) {
    direct_row_starts(label, bad_row, bad_class, Shape{n, k, 0, 0}, row_start);
}

LGM_EXPORT_T(float, f)
LGM_EXPORT_T(double, d)
LGM_EXPORT_TW(float, float, f)
LGM_EXPORT_TW(float, double, fd)
LGM_EXPORT_TW(double, double, d)
