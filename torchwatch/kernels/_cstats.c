/*
 * Activation statistics of a dense CPU tensor in one read.
 *
 * The tensor is walked in blocks of TW_BLOCK elements, small enough to stay in L1 if a block
 * must be visited again, so main memory is read once. Per block:
 *
 *   one pass   min, max, smallest |x|, the count of the most often hit underflow threshold
 *              (and of zeros, after a block that held one), and the sums of d and d*d for
 *              d = x - shift, the shift being the mean of a few samples of the block, so the
 *              variance never suffers from sum/sum-of-squares cancellation however large the
 *              mean is (scaled by a power of two where the values are far from 1);
 *   again      the moments only, from L1, where the shift or scale proved poor (rare);
 *   counts     subnormal / would-underflow / would-overflow, only when the pass shows the
 *              block can hold any (its smallest nonzero |x| or its largest |x| crosses a
 *              threshold).
 *
 * bfloat16 blocks are read as they are (each 32-bit lane holds two elements); float16 blocks are
 * converted to float32 first (F16C inside the pass measured slower), float64 takes the exact path.
 *
 * Blocks are merged with Chan's parallel formula. A block holding NaN/Inf, or only values
 * near the bottom of the float range, takes the portable exact path (double arithmetic), which is
 * also the whole kernel on CPUs without AVX2 and the reference the tests compare against.
 *
 * The caller passes the address of a dense tensor and its length; it is the caller's job to
 * keep the tensor alive and to pass the right dtype code. The GIL is released while reading.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* TW_PORTABLE_ONLY builds the kernel as on a CPU that is not x86-64 (ARM): the exact path only
   (a test builds it so, since CI runs on x86-64). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TW_PORTABLE_ONLY)
#include <immintrin.h>
#define TW_X86 1
#endif

/* torch.set_flush_denormal(True) sets DAZ and FTZ on the thread that calls it: a subnormal input
   would read as 0 there (so be neither counted nor summed), and not on torch's other threads, so
   the statistics would depend on which thread read which chunk. The kernel reads with both off,
   and gives each thread its mode back. */
#ifdef TW_X86
#define TW_DAZ_FTZ 0x8040u
static inline unsigned exact_fp_begin(void) {
    unsigned mode = _mm_getcsr();
    if (mode & TW_DAZ_FTZ) _mm_setcsr(mode & ~TW_DAZ_FTZ);
    return mode;
}
static inline void exact_fp_end(unsigned mode) {
    if (mode & TW_DAZ_FTZ) _mm_setcsr(mode);
}
#else
static inline unsigned exact_fp_begin(void) { return 0; }
static inline void exact_fp_end(unsigned mode) { (void)mode; }
#endif

/* Elements per block. Each block costs ~100-250 ns beyond its pass (its samples, the checks and
   Chan merge after it, the pass's own reductions): at 2,048 elements that was 15-25% of a call on
   activations in L2 (calls 18-25% faster at 8,192, 14-18% at 4,096; inside EfficientNet-Lite0's
   forward 1.11x -> 1.03x the floor's read, Intel Xeon, AVX-512). 4,096 float32 (16 KB) and the next
   block prefetched behind it still fit a 32 KB L1, where rare passes re-read a block. */
#define TW_BLOCK 4096
/* Prefetch distance of the pass, in elements: one block, so that while a block is read the next
   one is brought into L1 line by line, and its samples (taken before it is read) are there when
   they are needed. On activations just written to L2/L3 (Intel Xeon, 2 threads) a distance of
   2,048 read 8 MB at +20..30% against the 512 used before, and no different on ones in L2. */
#define TW_PREFETCH TW_BLOCK
#define TW_MAXCAST 8
/* Blocks whose largest |x| is below this take the exact path (their scaled squares would
   still be fine, but such blocks are rare and the exact path is simpler to trust). */
#define TW_FAST_MIN 0x1p-60f

enum { TW_F32 = 0, TW_F64 = 1, TW_F16 = 2, TW_BF16 = 3 };
/* Vector paths, best last: the portable exact path, AVX2 (+FMA, F16C), AVX-512F. */
enum { TW_LEVEL_PORTABLE = 0, TW_LEVEL_AVX2 = 1, TW_LEVEL_AVX512 = 2 };

typedef struct {
    int k;                        /* number of cast dtypes */
    double tiny;                  /* smallest normal of the tensor's own dtype */
    double under[TW_MAXCAST];     /* 0 < |x| <= under[i]  -> becomes 0 when cast */
    double over[TW_MAXCAST];      /* finite, |x| > over[i] -> beyond the cast dtype's max */
    float tinyf, underf[TW_MAXCAST], overf[TW_MAXCAST];
    int inline_under;             /* index of the largest underflow threshold, -1 if none */
} plan_t;

typedef struct {
    int64_t nfin, nan, posinf, neginf, zeros, subnormal;
    int64_t under[TW_MAXCAST], over[TW_MAXCAST];
    double mean, m2, min, max;    /* over finite elements */
} acc_t;

static void chan_merge(acc_t *acc, int64_t nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    if (acc->nfin == 0) {
        acc->nfin = nb; acc->mean = mean_b; acc->m2 = m2_b;
        return;
    }
    int64_t n = acc->nfin + nb;
    double delta = mean_b - acc->mean;
    double wb = (double)nb / (double)n;
    acc->mean += delta * wb;
    acc->m2 += m2_b + delta * delta * (double)acc->nfin * wb;
    acc->nfin = n;
}

static void merge_range(acc_t *acc, double mn, double mx) {
    if (mn < acc->min) acc->min = mn;
    if (mx > acc->max) acc->max = mx;
}

static void acc_reset(acc_t *acc) {
    memset(acc, 0, sizeof *acc);
    acc->min = INFINITY;
    acc->max = -INFINITY;
}

static void acc_merge(acc_t *dst, const acc_t *src, int k) {
    chan_merge(dst, src->nfin, src->mean, src->m2);
    merge_range(dst, src->min, src->max);
    dst->nan += src->nan; dst->posinf += src->posinf; dst->neginf += src->neginf;
    dst->zeros += src->zeros; dst->subnormal += src->subnormal;
    for (int i = 0; i < k; i++) { dst->under[i] += src->under[i]; dst->over[i] += src->over[i]; }
}

/* ---- portable exact path ------------------------------------------------------------ */

#define TW_EXACT_BLOCK(NAME, T, ABS, MAXV)                                                  \
static void NAME(const T *x, int n, const plan_t *p, acc_t *acc) {                          \
    double s = 0, mn = INFINITY, mx = -INFINITY;                                            \
    int64_t nfin = 0;                                                                       \
    for (int i = 0; i < n; i++) {                                                           \
        double v = (double)x[i], a = ABS(x[i]);                                             \
        if (!(a <= MAXV)) {                                                                 \
            if (v != v) acc->nan++;                                                         \
            else if (v > 0) acc->posinf++;                                                  \
            else acc->neginf++;                                                             \
            continue;                                                                       \
        }                                                                                   \
        nfin++; s += v;                                                                     \
        if (v < mn) mn = v;                                                                 \
        if (v > mx) mx = v;                                                                 \
        if (v == 0) { acc->zeros++; continue; }                                             \
        if (a < p->tiny) acc->subnormal++;                                                  \
        for (int k = 0; k < p->k; k++) {                                                    \
            acc->under[k] += a <= p->under[k];                                              \
            acc->over[k] += a > p->over[k];                                                 \
        }                                                                                   \
    }                                                                                       \
    if (nfin == 0) return;                                                                  \
    double m = s / (double)nfin, sd = 0, sq = 0;                                            \
    for (int i = 0; i < n; i++) {                                                           \
        if (!(ABS(x[i]) <= MAXV)) continue;                                                 \
        double d = (double)x[i] - m;                                                        \
        sd += d; sq += d * d;                                                               \
    }                                                                                       \
    double m2 = sq - sd * sd / (double)nfin;                                                \
    chan_merge(acc, nfin, m + sd / (double)nfin, m2 > 0 ? m2 : 0);                          \
    merge_range(acc, mn, mx);                                                               \
}

TW_EXACT_BLOCK(exact_block_f32, float, fabsf, FLT_MAX)
TW_EXACT_BLOCK(exact_block_f64, double, fabs, DBL_MAX)

/* A float16 as float32. Finite values by rebasing the exponent with one exact multiplication
   (2^112; a subnormal float16 lands on a float32 subnormal first, so the kernel must read with
   denormals kept: see exact_fp_begin). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, rest = h & 0x7fffu, bits;
    float f;
    if (rest >= 0x7c00u) {                      /* Inf, NaN (its payload kept) */
        bits = sign | 0x7f800000u | ((rest & 0x3ffu) << 13);
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    bits = rest << 13;
    memcpy(&f, &bits, sizeof f);
    f *= 0x1p112f;
    memcpy(&bits, &f, sizeof bits);
    bits |= sign;                               /* (no branch on the sign: it is random in real data) */
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Element i of a float32 or bfloat16 array, as float32. */
static inline float load_one(const void *x, int dtype, int i) {
    return dtype == TW_BF16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* A block of n elements of a float32 or bfloat16 tensor (float16 blocks are converted to float32
   first: see run_range). The pass reads it as it is; the rarer passes after it read float32,
   which a bfloat16 block gets on first need (f32()). */
typedef struct {
    const void *src;
    int dtype, n, level;
    float *scratch;                             /* TW_BLOCK floats */
    const float *x;                             /* the block as float32, once there is one */
} block_t;

static void to_f32(const void *src, int dtype, int n, int level, float *dst);

static const float *f32(block_t *b) {
    if (b->x == NULL) {
        to_f32(b->src, b->dtype, b->n, b->level, b->scratch);
        b->x = b->scratch;
    }
    return b->x;
}

typedef struct {
    int e;
    int set;
    int zeros;                                  /* the block before held a zero: count them inline */
    int nonneg;                                 /* ... and no negative value (x is |x|) */
} guess_t;      /* what a chunk's vector pass learned from its block before (see simd_block) */

/* Blocks read a second time since import (benchmarks report them, tests check the guesses):
   [TW_AGAIN_MOMENTS] for their moments (a poor shift or scale), [TW_AGAIN_ROUTE] because the
   route guessed from the block before and the samples was wrong (a ReLU block holding a negative
   value, or zeros found after a pass that did not count them). Relaxed atomics: the counts are
   exact, their order with other memory irrelevant. */
enum { TW_AGAIN_MOMENTS = 0, TW_AGAIN_ROUTE = 1 };
static long long read_again[2];

static inline void count_again(int why) {
#if defined(__GNUC__) || defined(__clang__)
    __atomic_fetch_add(&read_again[why], 1, __ATOMIC_RELAXED);
#else
    read_again[why]++;
#endif
}

/* ---- AVX2 path ----------------------------------------------------------------------- */

#ifdef TW_X86
#define TW_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TW_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

TW_AVX2 static inline int64_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return (int64_t)(uint32_t)_mm_cvtsi128_si32(s);
}

TW_AVX2 static inline double hsum_ps_as_pd(__m256 v) {
    __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                              _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

TW_AVX2 static inline double hsum_pd(__m256d v) {
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

TW_AVX2 static inline float hmin_ps(__m256 v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

TW_AVX2 static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

TW_AVX2 static inline uint32_t hmin_epu32(__m256i v) {
    __m128i m = _mm_min_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0xb1));
    return (uint32_t)_mm_cvtsi128_si32(m);
}

/* Number of x with 0 < |x| <= t (or < t when strict). x is finite here. */
TW_AVX2 static int64_t count_small(const float *x, int n, float t, int strict) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 vt = _mm256_set1_ps(t), zero = _mm256_setzero_ps();
    __m256i c = _mm256_setzero_si256();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), absmask);
        __m256 in = strict ? _mm256_cmp_ps(a, vt, _CMP_LT_OQ) : _mm256_cmp_ps(a, vt, _CMP_LE_OQ);
        in = _mm256_and_ps(in, _mm256_cmp_ps(a, zero, _CMP_NEQ_OQ));
        c = _mm256_sub_epi32(c, _mm256_castps_si256(in));
    }
    int64_t r = hsum_epi32(c);
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        r += a != 0 && (strict ? a < t : a <= t);
    }
    return r;
}

/* Number of x with |x| > t. x is finite here. */
TW_AVX2 static int64_t count_large(const float *x, int n, float t) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 vt = _mm256_set1_ps(t);
    __m256i c = _mm256_setzero_si256();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), absmask);
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(a, vt, _CMP_GT_OQ)));
    }
    int64_t r = hsum_epi32(c);
    for (; i < n; i++) r += fabsf(x[i]) > t;
    return r;
}

/* Number of zeros; *nzbits becomes the smallest nonzero |x| bit pattern (0 if none). */
TW_AVX2 static int64_t count_zeros(const float *x, int n, uint32_t *nzbits) {
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff), one = _mm256_set1_epi32(1);
    const __m256i izero = _mm256_setzero_si256();
    __m256i c = izero, nzmin = _mm256_set1_epi32(-1);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), absmask);
        c = _mm256_sub_epi32(c, _mm256_cmpeq_epi32(a, izero));
        /* |x| bits - 1 as unsigned: zero wraps to the maximum and never wins the min */
        nzmin = _mm256_min_epu32(nzmin, _mm256_sub_epi32(a, one));
    }
    int64_t r = hsum_epi32(c);
    uint32_t m = hmin_epu32(nzmin) + 1u;
    for (; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        bits &= 0x7fffffffu;
        if (bits == 0) r++;
        else if (m == 0 || bits < m) m = bits;
    }
    *nzbits = m;
    return r;
}

/* The one pass over a block: min, max, the count of |x| <= tinl (the inline underflow
   threshold; -1 counts nothing), the sums of d and d*d for d = (x - shift) * scale, shift and
   scale guessed before the block (from the block before it), and either the smallest |x| bits
   or, in blocks expected to hold zeros (ReLU outputs), the count of zeros and the smallest
   nonzero |x| bits (0 if none). fma(x, scale, -shift * scale) rounds exactly like
   (x - shift) * scale: scale is a power of two. */
typedef struct {
    float mn, mx;
    uint32_t abits;
    int64_t nsmall, nzero;
    double sd, sq;
} fused_t;

/* The tail of the pass, and the reference for its vector bodies. */
static void fused_tail(const void *x, int dtype, int i, int n, float tinl, float scale, float shift, int zeros,
                       fused_t *r) {
    for (; i < n; i++) {
        float v = load_one(x, dtype, i);
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        bits &= 0x7fffffffu;
        if (v < r->mn) r->mn = v;
        if (v > r->mx) r->mx = v;
        if (zeros && bits == 0) r->nzero++;
        else if (bits < r->abits || (zeros && r->abits == 0)) r->abits = bits;
        r->nsmall += fabsf(v) <= tinl;
        double d = ((double)v - (double)shift) * (double)scale;
        r->sd += d; r->sq += d * d;
    }
}

/* 16 elements from x[i] as float32, in two vectors. bfloat16 blocks are read as they are (no
   float32 copy first), as the top halves of 32-bit lanes: the even elements shifted up and the odd
   ones masked, one operation per 8 (the statistics do not depend on the elements' order). */
TW_AVX2 static inline __attribute__((always_inline)) void load16_avx2(const void *x, int i, const int SRC, __m256 *v,
                                                                     __m256 *w) {
    if (SRC == TW_BF16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
        *v = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        *w = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xffff0000u)));
    } else {
        *v = _mm256_loadu_ps((const float *)x + i);
        *w = _mm256_loadu_ps((const float *)x + i + 8);
    }
}

/* min_ps(a, m) returns m when a is NaN, so NaN never reaches the running min/max (a block
   holding NaN or Inf is caught by its sums). |x| bits compare like |x|, so an integer min gives
   the smallest |x|; with ZEROS, the min of |x| bits - 1 as unsigned (a zero wraps to the top)
   gives the smallest nonzero one. Sums of d stay in float lanes for 256 elements, then go to
   double. */
TW_AVX2 static inline __attribute__((always_inline)) void fused_avx2_body(
    const void *x, int n, float tinl, float scale, float shift, const int SRC, const int ZEROS, const int SCALED,
    const int SHIFTED, const int NONNEG, fused_t *r) {
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff), izero = _mm256_setzero_si256();
    const __m256i one = _mm256_set1_epi32(1);
    const __m256 fzero = _mm256_setzero_ps();
    const __m256 tin = _mm256_set1_ps(tinl), vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(-shift * scale);
    const __m256 vsub = _mm256_set1_ps(shift);
    __m256 vmn = _mm256_set1_ps(INFINITY), vmx = _mm256_set1_ps(-INFINITY);
    __m256i amin = _mm256_set1_epi32(ZEROS ? -1 : 0x7fffffff), small = izero, nz = izero;
    __m256d sdv = _mm256_setzero_pd(), sqv = sdv;
    int i = 0;
    while (i + 16 <= n) {
        __m256 d0 = _mm256_setzero_ps(), d1 = d0, q0 = d0, q1 = d0;
        int end = i + 256 < n ? i + 256 : n;
        for (; i + 16 <= end; i += 16) {
            _mm_prefetch((const char *)x + (size_t)(i + TW_PREFETCH) * (SRC == TW_F32 ? 4 : 2), _MM_HINT_T0);
            __m256 v, w;
            load16_avx2(x, i, SRC, &v, &w);
            __m256 a = SCALED ? _mm256_fmadd_ps(v, vscale, vshift) : SHIFTED ? _mm256_sub_ps(v, vsub) : v;
            __m256 b = SCALED ? _mm256_fmadd_ps(w, vscale, vshift) : SHIFTED ? _mm256_sub_ps(w, vsub) : w;
            d0 = _mm256_add_ps(d0, a);
            d1 = _mm256_add_ps(d1, b);
            q0 = _mm256_fmadd_ps(a, a, q0);
            q1 = _mm256_fmadd_ps(b, b, q1);
            /* NONNEG: no negative value expected (the caller checks the min after): |x| is x */
            __m256i av = NONNEG ? _mm256_castps_si256(v) : _mm256_and_si256(_mm256_castps_si256(v), absmask);
            __m256i aw = NONNEG ? _mm256_castps_si256(w) : _mm256_and_si256(_mm256_castps_si256(w), absmask);
            /* pair first, then fold into the running value: one dependent op per iteration */
            vmn = _mm256_min_ps(_mm256_min_ps(v, w), vmn);
            vmx = _mm256_max_ps(_mm256_max_ps(v, w), vmx);
            if (ZEROS) {
                /* with NONNEG a -0.0 keeps its sign bit: its bits - 1 (0x7fffffff) lose the min to
                   every other value, and the float compare counts it as the zero it is */
                amin = _mm256_min_epu32(_mm256_min_epu32(_mm256_sub_epi32(av, one), _mm256_sub_epi32(aw, one)), amin);
                __m256i zv = NONNEG ? _mm256_castps_si256(_mm256_cmp_ps(v, fzero, _CMP_EQ_OQ)) : _mm256_cmpeq_epi32(av, izero);
                __m256i zw = NONNEG ? _mm256_castps_si256(_mm256_cmp_ps(w, fzero, _CMP_EQ_OQ)) : _mm256_cmpeq_epi32(aw, izero);
                nz = _mm256_sub_epi32(nz, _mm256_add_epi32(zv, zw));
            } else {
                amin = _mm256_min_epu32(_mm256_min_epu32(av, aw), amin);
            }
            __m256i sv = _mm256_castps_si256(_mm256_cmp_ps(_mm256_castsi256_ps(av), tin, _CMP_LE_OQ));
            __m256i sw = _mm256_castps_si256(_mm256_cmp_ps(_mm256_castsi256_ps(aw), tin, _CMP_LE_OQ));
            small = _mm256_sub_epi32(small, _mm256_add_epi32(sv, sw));
        }
        __m256 d = _mm256_add_ps(d0, d1), q = _mm256_add_ps(q0, q1);
        sdv = _mm256_add_pd(sdv, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(d)), _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1))));
        sqv = _mm256_add_pd(sqv, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(q)), _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1))));
    }
    r->sd = hsum_pd(sdv);
    r->sq = hsum_pd(sqv);
    r->mn = hmin_ps(vmn);
    r->mx = hmax_ps(vmx);
    r->abits = hmin_epu32(amin) + (ZEROS ? 1u : 0u);
    r->nsmall = hsum_epi32(small);
    r->nzero = ZEROS ? hsum_epi32(nz) : 0;
    fused_tail(x, SRC, i, n, tinl, scale, shift, ZEROS, r);
}

/* The body specialised for its switches: the source dtype (float32 or bfloat16), zeros, scaled,
   shifted (and NONNEG for ReLU blocks, below). Unscaled (scale 1), x - shift is one subtraction,
   which on AVX2 CPUs that split 256-bit operations (AMD Zen 1) leaves the multiply ports to the
   squares, minimum and maximum; with shift 0 (a block centred near 0) it is none. */
#define TW_FUSED_SWITCHES(BODY, SRC)                                                            \
    do {                                                                                        \
        int scaled = scale != 1.0f, shifted = shift != 0.0f;                                    \
        if (zeros && scaled) BODY(x, n, tinl, scale, shift, SRC, 1, 1, 1, 0, r);                \
        else if (zeros && shifted) BODY(x, n, tinl, scale, shift, SRC, 1, 0, 1, 0, r);          \
        else if (zeros) BODY(x, n, tinl, scale, shift, SRC, 1, 0, 0, 0, r);                     \
        else if (scaled) BODY(x, n, tinl, scale, shift, SRC, 0, 1, 1, 0, r);                    \
        else if (shifted) BODY(x, n, tinl, scale, shift, SRC, 0, 0, 1, 0, r);                   \
        else BODY(x, n, tinl, scale, shift, SRC, 0, 0, 0, 0, r);                                \
    } while (0)
#define TW_FUSED_DISPATCH(BODY)                                                                 \
    do {                                                                                        \
        if (dtype == TW_BF16) TW_FUSED_SWITCHES(BODY, TW_BF16);                                 \
        else TW_FUSED_SWITCHES(BODY, TW_F32);                                                   \
    } while (0)
/* The ReLU block's body (x taken as its own |x|: zeros, unscaled, NONNEG) per dtype and shift. */
#define TW_NONNEG_DISPATCH(BODY)                                                                \
    do {                                                                                        \
        if (dtype == TW_BF16 && shift != 0.0f) BODY(x, n, tinl, 1.0f, shift, TW_BF16, 1, 0, 1, 1, r); \
        else if (dtype == TW_BF16) BODY(x, n, tinl, 1.0f, shift, TW_BF16, 1, 0, 0, 1, r);             \
        else if (shift != 0.0f) BODY(x, n, tinl, 1.0f, shift, TW_F32, 1, 0, 1, 1, r);                 \
        else BODY(x, n, tinl, 1.0f, shift, TW_F32, 1, 0, 0, 1, r);                                    \
    } while (0)

TW_AVX2 static void fused_avx2(const void *x, int dtype, int n, float tinl, float scale, float shift, int zeros,
                               fused_t *r) {
    TW_FUSED_DISPATCH(fused_avx2_body);
}

/* fused_avx2_body for a ReLU block: as fused_avx512_nonneg below (two operations fewer per 16
   elements; -0.0 needs no mask here, see the body). */
TW_AVX2 static void fused_avx2_nonneg(const void *x, int dtype, int n, float tinl, float shift, fused_t *r) {
    TW_NONNEG_DISPATCH(fused_avx2_body);
}

/* Pass B: sums of d and d*d for d = x * scale - shift * scale (f32 lanes, folded into double
   every 256 elements). */
TW_AVX2 static void pass_b_avx2(const float *x, int n, float scale, float shift, double *sd, double *sq) {
    const __m256 vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(-shift * scale);
    int i = 0;
    while (i + 16 <= n) {
        __m256 d0 = _mm256_setzero_ps(), d1 = d0, q0 = d0, q1 = d0;
        int end = i + 256 < n ? i + 256 : n;
        for (; i + 16 <= end; i += 16) {
            __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), vscale, vshift);
            __m256 b = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), vscale, vshift);
            d0 = _mm256_add_ps(d0, a);
            d1 = _mm256_add_ps(d1, b);
            q0 = _mm256_fmadd_ps(a, a, q0);
            q1 = _mm256_fmadd_ps(b, b, q1);
        }
        *sd += hsum_ps_as_pd(d0) + hsum_ps_as_pd(d1);
        *sq += hsum_ps_as_pd(q0) + hsum_ps_as_pd(q1);
    }
    for (; i < n; i++) {
        double d = ((double)x[i] - (double)shift) * (double)scale;
        *sd += d; *sq += d * d;
    }
}

/* 32 elements from x[i] as float32, in two vectors, as load16_avx2 does. */
TW_AVX512 static inline __attribute__((always_inline)) void load32_avx512(const void *x, int i, const int SRC,
                                                                         __m512 *v, __m512 *w) {
    if (SRC == TW_BF16) {
        __m512i raw = _mm512_loadu_si512((const void *)((const uint16_t *)x + i));
        *v = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
        *w = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32((int)0xffff0000u)));
    } else {
        *v = _mm512_loadu_ps((const float *)x + i);
        *w = _mm512_loadu_ps((const float *)x + i + 16);
    }
}

/* The same two passes, 32 elements per iteration in 512-bit registers, for CPUs with AVX-512F;
   counts come from compare masks. Same results as the AVX2 passes up to the order of float
   additions in the shift and the moments. */
TW_AVX512 static inline __attribute__((always_inline)) void fused_avx512_body(
    const void *x, int n, float tinl, float scale, float shift, const int SRC, const int ZEROS, const int SCALED,
    const int SHIFTED, const int NONNEG, fused_t *r) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff), izero = _mm512_setzero_si512();
    const __m512i minus1 = _mm512_set1_epi32(-1);
    const __m512 tin = _mm512_set1_ps(tinl), vscale = _mm512_set1_ps(scale), vshift = _mm512_set1_ps(-shift * scale);
    const __m512 vsub = _mm512_set1_ps(shift);
    __m512 vmn = _mm512_set1_ps(INFINITY), vmx = _mm512_set1_ps(-INFINITY);
    /* NONNEG: the bits as signed integers. A negative nonzero value is a negative integer and wins
       the (signed) min of the nonzero lanes, which tells the caller to read the block again; without
       one, that min is the smallest nonzero x, the max of the bits is the largest x (-0.0, the most
       negative integer, never wins it), and the min of x is 0 if there is a zero: no float min/max. */
    __m512i imax = _mm512_set1_epi32(INT32_MIN);
    __m512i amin = _mm512_set1_epi32(ZEROS && !NONNEG ? -1 : 0x7fffffff);
    __m512i small = izero, nz = izero;      /* per-lane counts, from compare masks */
    __m512d sdv = _mm512_setzero_pd(), sqv = sdv;
    int i = 0;
    while (i + 32 <= n) {
        __m512 d0 = _mm512_setzero_ps(), d1 = d0, q0 = d0, q1 = d0;
        int end = i + 512 < n ? i + 512 : n;  /* 16 terms per float lane, as on AVX2 */
        for (; i + 32 <= end; i += 32) {
            _mm_prefetch((const char *)x + (size_t)(i + TW_PREFETCH) * (SRC == TW_F32 ? 4 : 2), _MM_HINT_T0);
            __m512 v, w;
            load32_avx512(x, i, SRC, &v, &w);
            __m512 a = SCALED ? _mm512_fmadd_ps(v, vscale, vshift) : SHIFTED ? _mm512_sub_ps(v, vsub) : v;
            __m512 b = SCALED ? _mm512_fmadd_ps(w, vscale, vshift) : SHIFTED ? _mm512_sub_ps(w, vsub) : w;
            d0 = _mm512_add_ps(d0, a);
            d1 = _mm512_add_ps(d1, b);
            q0 = _mm512_fmadd_ps(a, a, q0);
            q1 = _mm512_fmadd_ps(b, b, q1);
            /* NONNEG: no negative value expected (the caller checks the min after): |x| is x */
            __m512i av = NONNEG ? _mm512_castps_si512(v) : _mm512_and_si512(_mm512_castps_si512(v), absmask);
            __m512i aw = NONNEG ? _mm512_castps_si512(w) : _mm512_and_si512(_mm512_castps_si512(w), absmask);
            if (NONNEG) {
                imax = _mm512_max_epi32(_mm512_max_epi32(av, aw), imax);
            } else {
                vmn = _mm512_min_ps(_mm512_min_ps(v, w), vmn);
                vmx = _mm512_max_ps(_mm512_max_ps(v, w), vmx);
            }
            if (ZEROS) {                    /* nonzero lanes: the smallest |x| among them, and their count */
                __mmask16 fv = _mm512_test_epi32_mask(av, NONNEG ? absmask : av);  /* -0.0 is a zero */
                __mmask16 fw = _mm512_test_epi32_mask(aw, NONNEG ? absmask : aw);
                amin = NONNEG ? _mm512_mask_min_epi32(amin, fv, amin, av) : _mm512_mask_min_epu32(amin, fv, amin, av);
                amin = NONNEG ? _mm512_mask_min_epi32(amin, fw, amin, aw) : _mm512_mask_min_epu32(amin, fw, amin, aw);
                nz = _mm512_mask_sub_epi32(nz, fv, nz, minus1);
                nz = _mm512_mask_sub_epi32(nz, fw, nz, minus1);
            } else {
                amin = _mm512_min_epu32(_mm512_min_epu32(av, aw), amin);
            }
            small = _mm512_mask_sub_epi32(small, _mm512_cmp_ps_mask(_mm512_castsi512_ps(av), tin, _CMP_LE_OQ), small, minus1);
            small = _mm512_mask_sub_epi32(small, _mm512_cmp_ps_mask(_mm512_castsi512_ps(aw), tin, _CMP_LE_OQ), small, minus1);
        }
        __m512 d = _mm512_add_ps(d0, d1), q = _mm512_add_ps(q0, q1);
        sdv = _mm512_add_pd(sdv, _mm512_cvtps_pd(_mm512_castps512_ps256(d)));
        sdv = _mm512_add_pd(sdv, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1))));
        sqv = _mm512_add_pd(sqv, _mm512_cvtps_pd(_mm512_castps512_ps256(q)));
        sqv = _mm512_add_pd(sqv, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(q), 1))));
    }
    r->sd = _mm512_reduce_add_pd(sdv);
    r->sq = _mm512_reduce_add_pd(sqv);
    r->nsmall = (uint32_t)_mm512_reduce_add_epi32(small);
    r->nzero = ZEROS ? i - (uint32_t)_mm512_reduce_add_epi32(nz) : 0;
    if (NONNEG) {
        int32_t lo = _mm512_reduce_min_epi32(amin), hi = _mm512_reduce_max_epi32(imax);
        float lo_f, hi_f;
        memcpy(&lo_f, &lo, sizeof lo_f);
        memcpy(&hi_f, &hi, sizeof hi_f);
        r->abits = lo == INT32_MAX ? 0 : (uint32_t)lo;          /* 0: no nonzero element */
        r->mn = lo < 0 ? -1.0f                                 /* a negative value: read again */
              : r->nzero ? 0.0f : lo == INT32_MAX ? INFINITY : lo_f;
        r->mx = hi >= 0 ? hi_f : i ? 0.0f : -INFINITY;        /* (hi < 0: only -0.0, or nothing) */
    } else {
        r->mn = _mm512_reduce_min_ps(vmn);
        r->mx = _mm512_reduce_max_ps(vmx);
        r->abits = (uint32_t)_mm512_reduce_min_epu32(amin);
        if (ZEROS && r->abits == 0xffffffffu) r->abits = 0;   /* no nonzero element */
    }
    fused_tail(x, SRC, i, n, tinl, scale, shift, ZEROS, r);
}

TW_AVX512 static void fused_avx512(const void *x, int dtype, int n, float tinl, float scale, float shift, int zeros,
                                   fused_t *r) {
    TW_FUSED_DISPATCH(fused_avx512_body);
}

/* An unscaled zeros block after a block with no negative value (ReLU outputs): x is taken as its
   own |x|: two operations fewer per 32 elements, per 16 on AVX2 (the loop 7-11% faster in L1,
   benchmarks/kernel_loop.c; ReLU6 outputs ~5% faster inside EfficientNet-Lite0's forward), and on
   AVX-512 two more: its min and max come from integer ones it needs anyway (see the body). Valid only if the
   block holds no negative value: the caller checks its min (-0.0 is not below 0, and counts as a
   zero here as everywhere) and reads the block again if not. A NaN can hide a negative value from
   the min, but then the sums are NaN and the block is measured again by the exact path anyway. */
TW_AVX512 static void fused_avx512_nonneg(const void *x, int dtype, int n, float tinl, float shift, fused_t *r) {
    TW_NONNEG_DISPATCH(fused_avx512_body);
}

TW_AVX512 static void pass_b_avx512(const float *x, int n, float scale, float shift, double *sd, double *sq) {
    const __m512 vscale = _mm512_set1_ps(scale), vshift = _mm512_set1_ps(-shift * scale);
    int i = 0;
    while (i + 32 <= n) {
        __m512 d0 = _mm512_setzero_ps(), d1 = d0, q0 = d0, q1 = d0;
        int end = i + 256 < n ? i + 256 : n;
        for (; i + 32 <= end; i += 32) {
            __m512 a = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), vscale, vshift);
            __m512 b = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), vscale, vshift);
            d0 = _mm512_add_ps(d0, a);
            d1 = _mm512_add_ps(d1, b);
            q0 = _mm512_fmadd_ps(a, a, q0);
            q1 = _mm512_fmadd_ps(b, b, q1);
        }
        __m512 d = _mm512_add_ps(d0, d1), q = _mm512_add_ps(q0, q1);
        *sd += _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(d)))
             + _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1))));
        *sq += _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(q)))
             + _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(q), 1))));
    }
    for (; i < n; i++) {
        double d = ((double)x[i] - (double)shift) * (double)scale;
        *sd += d; *sq += d * d;
    }
}

/* The shift and scale of a block's moments. The shift is the mean of TW_SAMPLES elements spread
   evenly over the block itself: a block of a convolution's output often spans two channels whose
   means differ by several of its standard deviations, so the block before is a poor guess (it
   was for 28% of EfficientNet-Lite0's blocks, each read twice more; 0.4% with 32 samples). The
   scale is the power of two near the largest |x| of the block before (or of the samples, for a
   chunk's first block); within 2^+-TW_SCALE_SLACK of 1 the moments are taken unscaled. A block
   checks the guess afterwards and re-reads itself (from L1) with its own mean and scale where it
   was poor. The samples are read from lines the block before prefetched (prefetching them on
   their own, a block ahead, had cost ~20% of the reading rate of activations coming from L3:
   32 scattered lines at once held up the stream's own; gathering them into vectors gained a
   further 3-5% only, and gathers are slow on Intel CPUs with the GDS microcode mitigation). */
#define TW_SAMPLES 32

/* Every stride-th element of x[0:n], from stride / 2, is a sample: TW_SAMPLES of a full block.
   The stride is odd: rows of real activations are a multiple of a power of two long (768, 3072),
   and a stride of 128 landed on the same 6 features of every 768-wide row, whose mean is not the
   row's (BERT-base: 11% of the blocks read again, every block of its token-type embeddings); an
   odd stride meets the features of such a row at 32 different places. */
static inline int sample_stride(int n) {
    return n / TW_SAMPLES > 0 ? (n / TW_SAMPLES) | 1 : 1;
}

/* The mean and the largest |x| of the finite samples of x[0:n] (0, 0 if none is finite), and
   whether one of them is zero (*zero) and one is below zero (*neg). (Testing the samples 8 at a
   time from a buffer made calls 2-3% faster: not kept.) */
static void sample_block(const void *x, int dtype, int n, float *mean, float *top, int *zero, int *neg) {
    int stride = sample_stride(n), m = 0, z = 0, ng = 0;
    double s = 0, t = 0;
    for (int i = stride / 2; i < n; i += stride) {
        double v = load_one(x, dtype, i);
        if (!(fabs(v) <= FLT_MAX)) continue;
        s += v; m++;
        z |= v == 0;                            /* -0.0 too */
        ng |= v < 0;                            /* not -0.0 */
        if (fabs(v) > t) t = fabs(v);
    }
    *mean = m ? (float)(s / m) : 0.0f;
    *top = (float)t;
    *zero = z;
    *neg = ng;
}

/* The guessed scale may be off by this many powers of two, and the shift by this fraction of
   the block's standard deviation, before the block is read again with its own: then the sums
   of squares are at most 1 + 1/4 times what the block's own mean would give, so rounding in
   them costs the variance at most 25% more than that (a few float32 ulps). */
#define TW_SCALE_SLACK 24
#define TW_SHIFT_SLACK 0.25

TW_AVX2 static void simd_block(block_t *b, const plan_t *p, acc_t *acc, guess_t *g) {
    const void *x = b->src;
    const int n = b->n, dtype = b->dtype, level = b->level;
    /* The largest underflow threshold (fp8's, if any) is hit by almost every block of real
       activations, so it is counted inline; the rarer ones get a pass only when needed. */
    const int inl = p->inline_under;
    const float tinl = inl >= 0 ? p->underf[inl] : -1.0f;
    float shift, top;
    int sample_zero, sample_neg;
    sample_block(x, dtype, n, &shift, &top, &sample_zero, &sample_neg);
    /* Samples centred near 0 (|mean| <= 1/16 of their largest |x|: for normal data about a sixth
       of their sd) take no shift: the pass saves a subtraction per vector, and the block's own
       check below re-reads it in the rare case its mean proves to be more than half its sd. */
    if (16.0f * fabsf(shift) <= top) shift = 0.0f;
    /* Zeros are counted inline if the block before held one or a sample is one, and x is taken as
       its own |x| if neither that block nor a sample was negative: so a chunk's first block of a
       ReLU output no longer takes the general pass and then a second one for its zeros. */
    const int zeros = g->zeros || sample_zero;
    const int nonneg = !sample_neg && (!g->set || g->nonneg);
    if (!g->set) {
        g->e = 0;
        if (top > 0) frexpf(top, &g->e);
        if (g->e > 126) g->e = 126;             /* keep the scale a normal float: samples may be */
        if (g->e < -126) g->e = -126;           /* subnormal, or within a factor 2 of FLT_MAX */
        g->set = 1;
    }
    int e_used = abs(g->e) <= TW_SCALE_SLACK ? 0 : g->e;  /* 0: unscaled */
    float scale = ldexpf(1.0f, -e_used);
    fused_t a = {0};
    const int relu = zeros && nonneg && e_used == 0;           /* x taken as its own |x| */
    if (relu && level >= TW_LEVEL_AVX512) fused_avx512_nonneg(x, dtype, n, tinl, shift, &a);
    else if (relu) fused_avx2_nonneg(x, dtype, n, tinl, shift, &a);
    if (relu && a.mn < 0) count_again(TW_AGAIN_ROUTE);
    if (!relu || a.mn < 0) {        /* or a negative value after all: with |x| (every field is assigned) */
        if (level >= TW_LEVEL_AVX512) fused_avx512(x, dtype, n, tinl, scale, shift, zeros, &a);
        else fused_avx2(x, dtype, n, tinl, scale, shift, zeros, &a);
    }
    float mn = a.mn, mx = a.mx;
    uint32_t abits = a.abits;
    int64_t nsmall = a.nsmall;
    double sd = a.sd, sq = a.sq;
    /* Finite sums mean no NaN/Inf (they would propagate); the exact path counts them. */
    if (!(fabs(sd) <= DBL_MAX && sq <= DBL_MAX)) {
        g->set = 0;
        exact_block_f32(f32(b), n, p, acc);
        return;
    }
    float amax = -mn > mx ? -mn : mx;
    if (amax == 0) {                            /* padding: every element is zero */
        chan_merge(acc, n, 0.0, 0.0);
        merge_range(acc, 0.0, 0.0);
        acc->zeros += n;
        g->zeros = g->nonneg = 1;
        return;
    }
    if (amax < TW_FAST_MIN) {                   /* squares would fall below float range */
        exact_block_f32(f32(b), n, p, acc);
        return;
    }
    int e;
    frexpf(amax, &e);
    if (e > 126) e = 126;                       /* keep scale a normal float */
    const double dn = (double)n;
    /* The guess was poor: the moments again, of (x - this block's mean) scaled by its own
       power of two, so squares neither overflow nor go subnormal. */
    if (abs(e - e_used) > TW_SCALE_SLACK || sd * sd / dn > TW_SHIFT_SLACK * (sq - sd * sd / dn)) {
        /* the block's own mean first (not from the guess's sums: a far-off shift leaves
           nothing of x in x - shift), then the moments around it */
        count_again(TW_AGAIN_MOMENTS);
        scale = ldexpf(1.0f, -e);
        e_used = e;
        for (int round = 0; round < 2; round++) {
            shift = round ? (float)(sd / dn * ldexp(1.0, e)) : 0.0f;
            sd = sq = 0;
            if (level >= TW_LEVEL_AVX512) pass_b_avx512(f32(b), n, scale, shift, &sd, &sq);
            else pass_b_avx2(f32(b), n, scale, shift, &sd, &sq);
        }
    }
    const double inv = ldexp(1.0, e_used);
    const double mean = (double)shift + sd / dn * inv;
    double m2 = (sq - sd * sd / dn) * inv * inv;
    chan_merge(acc, n, mean, m2 > 0 ? m2 : 0);
    merge_range(acc, mn, mx);
    g->e = e;

    /* Zeros are counted inline after a block that held one (ReLU outputs, padding) or where a
       sample is one, else only when the smallest |x| is 0; elsewhere the smallest |x| is the
       smallest nonzero one. */
    int64_t nzero = a.nzero;
    if (!zeros && abits == 0) {
        count_again(TW_AGAIN_ROUTE);
        nzero = count_zeros(f32(b), n, &abits);
    }
    g->zeros = nzero > 0;
    g->nonneg = mn >= 0;
    float minabs_nz;
    memcpy(&minabs_nz, &abits, sizeof minabs_nz);
    acc->zeros += nzero;
    if (minabs_nz < p->tinyf) acc->subnormal += count_small(f32(b), n, p->tinyf, 1);
    for (int k = 0; k < p->k; k++) {
        if (k == inl) acc->under[k] += nsmall - nzero;
        else if (minabs_nz <= p->underf[k]) acc->under[k] += count_small(f32(b), n, p->underf[k], 0);
        if (amax > p->overf[k]) acc->over[k] += count_large(f32(b), n, p->overf[k]);
    }
}

TW_AVX2 static void simd_half_to_float(const uint16_t *src, float *dst, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    }
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

TW_AVX512 static void simd512_half_to_float(const uint16_t *src, float *dst, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    }
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

TW_AVX512 static void simd512_bf16_to_float(const uint16_t *src, float *dst, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i)));
        _mm512_storeu_si512((void *)(dst + i), _mm512_slli_epi32(w, 16));
    }
    for (; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

TW_AVX2 static void simd_bf16_to_float(const uint16_t *src, float *dst, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(w, 16));
    }
    for (; i < n; i++) dst[i] = bf16_to_float(src[i]);
}
#endif

static int simd_cpu = TW_LEVEL_PORTABLE;    /* the best level this CPU runs, set once at import */
static int simd_level = TW_LEVEL_PORTABLE;  /* the level in use (tests and benchmarks lower it) */

static int cpu_simd_level(void) {
#ifdef TW_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return TW_LEVEL_PORTABLE;
    return __builtin_cpu_supports("avx512f") ? TW_LEVEL_AVX512 : TW_LEVEL_AVX2;
#else
    return TW_LEVEL_PORTABLE;
#endif
}

/* n elements of a float16 or bfloat16 array as float32, into dst. */
static void to_f32(const void *data, int dtype, int n, int level, float *dst) {
    const uint16_t *src = (const uint16_t *)data;
#ifdef TW_X86
    if (level >= TW_LEVEL_AVX512 && dtype == TW_F16) simd512_half_to_float(src, dst, n);
    else if (level >= TW_LEVEL_AVX512) simd512_bf16_to_float(src, dst, n);
    else if (level && dtype == TW_F16) simd_half_to_float(src, dst, n);
    else if (level) simd_bf16_to_float(src, dst, n);
    else
#else
    (void)level;                                /* one path only */
#endif
    for (int i = 0; i < n; i++)
        dst[i] = dtype == TW_F16 ? half_to_float(src[i]) : bf16_to_float(src[i]);
}

/* One chunk's blocks, one after another, into acc. */
static void run_range(const void *data, Py_ssize_t n, int dtype, const plan_t *p, int level, acc_t *acc) {
    const unsigned mode = exact_fp_begin();
    float scratch[TW_BLOCK];
#ifdef TW_X86
    guess_t guess = {0, 0, 0, 0};
#endif
    const int elsize = dtype == TW_F64 ? 8 : dtype == TW_F32 ? 4 : 2;
    for (Py_ssize_t off = 0; off < n; off += TW_BLOCK) {
        int nb = (int)(n - off < TW_BLOCK ? n - off : TW_BLOCK);
        const char *at = (const char *)data + off * elsize;
        if (dtype == TW_F64) {
            exact_block_f64((const double *)at, nb, p, acc);
            continue;
        }
        block_t b = {at, dtype, nb, level, scratch, dtype == TW_F32 ? (const float *)at : NULL};
        if (dtype == TW_F16) {      /* F16C inside the pass ran at 0.6x of converting first (Xeon, AVX2 and AVX-512) */
            b.src = f32(&b);
            b.dtype = TW_F32;
        }
#ifdef TW_X86
        if (level) { simd_block(&b, p, acc, &guess); continue; }
#endif
        exact_block_f32(f32(&b), nb, p, acc);
    }
    exact_fp_end(mode);
}




/* ---- chunks, and torch's own OpenMP threads ----------------------------------------------
 *
 * A tensor is cut into chunks whose size depends on its length alone; each chunk is measured
 * into an accumulator of its own and the chunks are merged in order. So the result is the same
 * bit for bit whatever the number of threads, and those threads are torch's intra-op ones: the
 * OpenMP runtime that torch loaded is found at import (its GOMP_parallel entry point, which GNU
 * libgomp, LLVM libomp and Intel's runtime all export) and runs the chunks on the team torch's
 * own operators use from this thread, omp_get_max_threads() of them (torch.set_num_threads sets
 * it). Between operators those workers spin waiting for the next parallel region, so the
 * statistics take them as an operator would; a thread pool of our own would fight them for the
 * cores instead (measured: no faster inside a forward). Where no such runtime is loaded, or
 * inside a parallel region, the chunks run on the calling thread. Each thread reads a
 * contiguous share of the chunks (see job_run). */
#define TW_CHUNK (8 * TW_BLOCK)     /* elements per chunk, at least */
#define TW_MAXCHUNKS 256            /* per call: the chunk size grows beyond TW_CHUNK * TW_MAXCHUNKS */

typedef void (*omp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
static omp_parallel_t omp_parallel;  /* GOMP_parallel(fn, data, num_threads, flags), or NULL */
static int (*omp_max_threads)(void);
static int (*omp_in_parallel)(void);
static int (*omp_thread_num)(void);
static char omp_runtime[512];        /* the runtime's file, for parallel_info() */
static int use_threads = 1;          /* 0: the calling thread alone (benchmarks compare) */
static int min_shares = 1;           /* shares per call at least (tests: more shares than threads) */

typedef struct {
    const char *data;
    Py_ssize_t n, chunk;
    int dtype, level, nchunks, elsize;
    const plan_t *p;
    acc_t *accs;
    int next;                        /* the next share to take (atomic), outside torch's team */
    int team;                        /* run by omp_parallel: shares by OpenMP thread number */
    int shares;                      /* contiguous shares: one per thread running the job, or more */
    char claimed[TW_MAXCHUNKS];      /* chunks taken (atomic test-and-set) */
} job_t;

/* Claim chunk c (atomic test-and-set): 1 if this thread is the first to. */
static int claim(job_t *j, int c) {
#if defined(__GNUC__) || defined(__clang__)
    return !__atomic_test_and_set(&j->claimed[c], __ATOMIC_RELAXED);
#else
    return j->claimed[c] ? 0 : (j->claimed[c] = 1);   /* no atomics: one thread only */
#endif
}

static void run_chunk(job_t *j, int c) {
    Py_ssize_t off = (Py_ssize_t)c * j->chunk, len = j->n - off < j->chunk ? j->n - off : j->chunk;
    acc_reset(&j->accs[c]);
    run_range(j->data + off * j->elsize, len, j->dtype, j->p, j->level, &j->accs[c]);
}

/* Each thread takes a contiguous share of the chunks and reads it front to back, so its reads
   are one stream that the prefetches run ahead of, across chunk boundaries; a thread done with
   its share takes what is left of the others' from their far end (a thread held up by the OS
   does not hold the call up). Which thread reads a chunk changes nothing in its result. In
   torch's team, thread i takes the i-th share: torch's own operators split a tensor the same
   way, so the part of an activation a core just wrote (and will read next) is the part it reads
   here, from its own L2. */
static void job_run(void *arg) {
    job_t *j = (job_t *)arg;
    int slot;
    if (j->team) {
        slot = omp_thread_num();
    } else {
#if defined(__GNUC__) || defined(__clang__)
        slot = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
#else
        slot = j->next++;
#endif
    }
    if (slot >= j->shares) slot = j->shares - 1;
    int lo = (int)((long long)j->nchunks * slot / j->shares), hi = (int)((long long)j->nchunks * (slot + 1) / j->shares);
    for (int c = lo; c < hi && claim(j, c); c++) run_chunk(j, c);
    for (int t = 1; t < j->shares; t++) {
        int other = (slot + t) % j->shares;
        int olo = (int)((long long)j->nchunks * other / j->shares), ohi = (int)((long long)j->nchunks * (other + 1) / j->shares);
        for (int c = ohi - 1; c >= olo; c--)
            if (claim(j, c)) run_chunk(j, c);
    }
}

static const int ELSIZE[] = {4, 8, 2, 2};

/* How many threads chunks of this call may use (1: the calling thread alone). */
static int threads_for(int nchunks) {
    if (nchunks < 2 || !use_threads || omp_parallel == NULL || omp_in_parallel()) return 1;
    int t = omp_max_threads();
    return t < nchunks ? t : nchunks;
}

static void run(const void *data, Py_ssize_t n, int dtype, const plan_t *p, int level, acc_t *acc) {
    Py_ssize_t per = (n + TW_MAXCHUNKS - 1) / TW_MAXCHUNKS;
    Py_ssize_t chunk = (per + TW_BLOCK - 1) / TW_BLOCK * TW_BLOCK;
    if (chunk < TW_CHUNK) chunk = TW_CHUNK;
    int nchunks = (int)((n + chunk - 1) / chunk);
    if (nchunks < 2) {
        run_range(data, n, dtype, p, level, acc);
        return;
    }
    acc_t accs[TW_MAXCHUNKS];
    int threads = threads_for(nchunks), shares = threads > min_shares ? threads : min_shares;
    job_t job = {(const char *)data, n, chunk, dtype, level, nchunks, ELSIZE[dtype], p, accs, 0, threads > 1,
                 shares < nchunks ? shares : nchunks, {0}};
    if (threads > 1) omp_parallel(job_run, &job, (unsigned)threads, 0);
    else job_run(&job);
    for (int c = 0; c < nchunks; c++) acc_merge(acc, &accs[c], p->k);
}

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#if defined(__linux__)
#include <link.h>

/* The first loaded library whose file name names an OpenMP runtime (torch loaded it privately). */
static int find_omp_library(struct dl_phdr_info *info, size_t size, void *out) {
    (void)size;
    const char *name = info->dlpi_name, *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    if (strstr(base, "libgomp") || strstr(base, "libomp") || strstr(base, "libiomp")) {
        snprintf((char *)out, sizeof omp_runtime, "%s", name);
        return 1;
    }
    return 0;
}
#endif

static void find_omp_runtime(void) {
    void *handle = NULL;
    void *entry = dlsym(RTLD_DEFAULT, "GOMP_parallel");
    Dl_info info;
    if (entry != NULL && dladdr(entry, &info) && info.dli_fname != NULL)
        snprintf(omp_runtime, sizeof omp_runtime, "%s", info.dli_fname);
#if defined(__linux__)
    else
        dl_iterate_phdr(find_omp_library, omp_runtime);
#endif
    if (omp_runtime[0] == 0) return;
    /* every entry point from that one runtime: already loaded, never a second copy */
    handle = dlopen(omp_runtime, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == NULL) { omp_runtime[0] = 0; return; }
    omp_parallel_t par = (omp_parallel_t)dlsym(handle, "GOMP_parallel");
    int (*max_threads)(void) = (int (*)(void))dlsym(handle, "omp_get_max_threads");
    int (*in_parallel)(void) = (int (*)(void))dlsym(handle, "omp_in_parallel");
    int (*thread_num)(void) = (int (*)(void))dlsym(handle, "omp_get_thread_num");
    if (par == NULL || max_threads == NULL || in_parallel == NULL || thread_num == NULL) { omp_runtime[0] = 0; return; }
    omp_thread_num = thread_num;
    omp_max_threads = max_threads;
    omp_in_parallel = in_parallel;
    omp_parallel = par;
}
#else
static void find_omp_runtime(void) {}
#endif

/* ---- Python interface ----------------------------------------------------------------- */

static int read_thresholds(PyObject *seq, double *out, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL) return -1;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast);
    if (k > TW_MAXCAST) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "at most %d cast dtypes, got %zd", TW_MAXCAST, k);
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1.0 && PyErr_Occurred()) { Py_DECREF(fast); return -1; }
    }
    Py_DECREF(fast);
    return (int)k;
}

/* Plan: the thresholds of one source dtype, parsed once. */
typedef struct {
    PyObject_HEAD
    plan_t plan;
} PlanObject;

static int plan_init(PlanObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tiny", "under", "over", NULL};
    double tiny;
    PyObject *under, *over;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dOO", kwlist, &tiny, &under, &over)) return -1;
    plan_t *p = &self->plan;
    memset(p, 0, sizeof *p);
    int ku = read_thresholds(under, p->under, "under must be a sequence of floats");
    if (ku < 0) return -1;
    int ko = read_thresholds(over, p->over, "over must be a sequence of floats");
    if (ko < 0) return -1;
    if (ku != ko) {
        PyErr_Format(PyExc_ValueError, "%d underflow but %d overflow thresholds", ku, ko);
        return -1;
    }
    p->k = ku;
    p->tiny = tiny;
    const unsigned mode = exact_fp_begin();     /* a subnormal threshold must not become 0 */
    p->tinyf = (float)tiny;
    p->inline_under = -1;
    for (int k = 0; k < p->k; k++) {
        p->underf[k] = (float)p->under[k];
        p->overf[k] = (float)p->over[k];
        if (p->under[k] > 0 && (p->inline_under < 0 || p->under[k] > p->under[p->inline_under]))
            p->inline_under = k;
    }
    exact_fp_end(mode);
    return 0;
}

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "torchwatch.kernels._cstats.Plan",
    .tp_doc = PyDoc_STR("Plan(tiny, under, over): thresholds for one source dtype."),
    .tp_basicsize = sizeof(PlanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)plan_init,
};

static PyObject *acc_to_tuple(const acc_t *acc, int k) {
    PyObject *u = PyTuple_New(k), *o = PyTuple_New(k);
    if (u == NULL || o == NULL) { Py_XDECREF(u); Py_XDECREF(o); return NULL; }
    for (int i = 0; i < k; i++) {
        PyTuple_SET_ITEM(u, i, PyLong_FromLongLong(acc->under[i]));
        PyTuple_SET_ITEM(o, i, PyLong_FromLongLong(acc->over[i]));
    }
    return Py_BuildValue("LLLLLLddddNN", (long long)acc->nfin, (long long)acc->nan,
                         (long long)acc->posinf, (long long)acc->neginf, (long long)acc->zeros,
                         (long long)acc->subnormal, acc->mean, acc->m2, acc->min, acc->max, u, o);
}

static int tuple_to_acc(PyObject *raw, acc_t *acc, int k) {
    PyObject *u, *o;
    long long v[6];
    if (!PyArg_ParseTuple(raw, "LLLLLLddddOO", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                          &acc->mean, &acc->m2, &acc->min, &acc->max, &u, &o))
        return -1;
    acc->nfin = v[0]; acc->nan = v[1]; acc->posinf = v[2]; acc->neginf = v[3];
    acc->zeros = v[4]; acc->subnormal = v[5];
    if (!PyTuple_Check(u) || !PyTuple_Check(o) || PyTuple_GET_SIZE(u) != k || PyTuple_GET_SIZE(o) != k) {
        PyErr_Format(PyExc_ValueError, "expected %d underflow and overflow counts", k);
        return -1;
    }
    for (int i = 0; i < k; i++) {
        acc->under[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(u, i));
        acc->over[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(o, i));
    }
    return PyErr_Occurred() ? -1 : 0;
}

PyDoc_STRVAR(tensor_stats_doc,
"tensor_stats(address, numel, dtype_code, plan, exact) -> tuple\n\n"
"Statistics of `numel` dense elements at `address` (dtype codes: 0 f32, 1 f64, 2 f16,\n"
"3 bf16). Returns (finite, nan, posinf, neginf, zeros, subnormal, mean, m2, min, max,\n"
"underflow counts, overflow counts). `exact` forces the portable path.");

/* Measure n elements of a dense tensor into acc. Only work longer than a chunk releases the GIL:
   for less, releasing and taking it back costs more than it frees (cold, inside a forward). */
static int measure(unsigned long long address, Py_ssize_t n, int dtype, const plan_t *p, int exact, acc_t *acc) {
    if (dtype < TW_F32 || dtype > TW_BF16) {
        PyErr_Format(PyExc_ValueError, "bad dtype code %d", dtype);
        return -1;
    }
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "negative numel %zd", n);
        return -1;
    }
    acc_reset(acc);
    int level = exact ? TW_LEVEL_PORTABLE : simd_level;
    if (n <= TW_CHUNK) {
        run((const void *)(uintptr_t)address, n, dtype, p, level, acc);
    } else {
        Py_BEGIN_ALLOW_THREADS
        run((const void *)(uintptr_t)address, n, dtype, p, level, acc);
        Py_END_ALLOW_THREADS
    }
    return 0;
}

static PyObject *tensor_stats(PyObject *self, PyObject *args) {
    unsigned long long address;
    Py_ssize_t n;
    int dtype, exact;
    PlanObject *plan;
    (void)self;
    if (!PyArg_ParseTuple(args, "KniO!p", &address, &n, &dtype, &PlanType, &plan, &exact)) return NULL;
    acc_t acc;  /* the plan is kept alive by args while the GIL is released */
    if (measure(address, n, dtype, &plan->plan, exact, &acc) < 0) return NULL;
    return acc_to_tuple(&acc, plan->plan.k);
}

/* Accumulator: running totals of raw measurements; merging happens under the GIL. */
typedef struct {
    PyObject_HEAD
    int k;
    int closed;                   /* its window was cut: measurements go to the next one */
    long long calls;
    acc_t acc;
} AccObject;

static int accobj_init(AccObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"k", NULL};
    int k;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &k)) return -1;
    if (k < 0 || k > TW_MAXCAST) {
        PyErr_Format(PyExc_ValueError, "k must be in [0, %d], got %d", TW_MAXCAST, k);
        return -1;
    }
    self->k = k;
    self->closed = 0;
    self->calls = 0;
    acc_reset(&self->acc);
    return 0;
}

static PyObject *accobj_add(AccObject *self, PyObject *raw) {
    acc_t one;
    acc_reset(&one);
    if (tuple_to_acc(raw, &one, self->k) < 0) return NULL;
    acc_merge(&self->acc, &one, self->k);
    self->calls++;
    Py_RETURN_NONE;
}

static PyObject *accobj_state(AccObject *self, PyObject *unused) {
    (void)unused;
    PyObject *raw = acc_to_tuple(&self->acc, self->k);
    if (raw == NULL) return NULL;
    return Py_BuildValue("LN", self->calls, raw);
}

/* Measure a tensor straight into the totals (no tuple built and parsed back). The merge runs
   with the GIL held, as close() does, so a measurement lands either before its window is cut or,
   returned as a raw tuple, in the caller's hands for the next window. */
static PyObject *accobj_measure(AccObject *self, PyObject *args) {
    unsigned long long address;
    Py_ssize_t n;
    int dtype, exact;
    PlanObject *plan;
    PyObject *detail = Py_None, *name = Py_None;
    if (!PyArg_ParseTuple(args, "KniO!p|OO", &address, &n, &dtype, &PlanType, &plan, &exact, &detail, &name))
        return NULL;
    if (plan->plan.k != self->k)
        return PyErr_Format(PyExc_ValueError, "a plan with %d cast dtypes for an accumulator of %d", plan->plan.k, self->k);
    if (detail != Py_None && !PyList_Check(detail))
        return PyErr_Format(PyExc_TypeError, "detail must be a list or None");
    acc_t one;
    if (measure(address, n, dtype, &plan->plan, exact, &one) < 0) return NULL;
    if (detail != Py_None) {  /* the call's own measurements, kept beside the window's totals */
        PyObject *raw = acc_to_tuple(&one, self->k);
        if (raw == NULL) return NULL;
        PyObject *item = PyTuple_Pack(2, name, raw);
        Py_DECREF(raw);
        if (item == NULL) return NULL;
        int failed = PyList_Append(detail, item);
        Py_DECREF(item);
        if (failed < 0) return NULL;
    }
    if (self->closed) return acc_to_tuple(&one, self->k);
    acc_merge(&self->acc, &one, self->k);
    self->calls++;
    if (one.nan == 0 && one.posinf == 0 && one.neginf == 0) Py_RETURN_NONE;
    return Py_BuildValue("(LLL)", (long long)one.nan, (long long)one.posinf, (long long)one.neginf);
}

static PyObject *accobj_close(AccObject *self, PyObject *unused) {
    (void)unused;
    self->closed = 1;
    Py_RETURN_NONE;
}

static PyMethodDef acc_methods[] = {
    {"measure", (PyCFunction)accobj_measure, METH_VARARGS,
     "measure(address, numel, dtype_code, plan, exact[, detail, name]): merge a tensor's statistics; None,\n"
     "or (nan, posinf, neginf) when it held any; after close(), the raw tuple, merged nowhere. With a list\n"
     "detail, (name, raw tuple) of this measurement is also appended to it."},
    {"close", (PyCFunction)accobj_close, METH_NOARGS, "Its window was cut: later measure() calls return their raw tuple."},
    {"add", (PyCFunction)accobj_add, METH_O, "Merge one raw measurement (counts as one call)."},
    {"state", (PyCFunction)accobj_state, METH_NOARGS, "(calls, raw totals)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AccType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "torchwatch.kernels._cstats.Accumulator",
    .tp_doc = PyDoc_STR("Accumulator(k): totals of raw measurements with k cast dtypes."),
    .tp_basicsize = sizeof(AccObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)accobj_init,
    .tp_methods = acc_methods,
};

PyDoc_STRVAR(id_counts_doc,
"id_counts(address, numel, state_address, exact, hashed, ring, per_call)\n"
"Fold `numel` int64 values at `address` into an id sketch state (int64): [count, min, max,\n"
"ring position, counts[exact + hashed], ring[ring]]. Values in [0, exact) are counted exactly,\n"
"others in bucket ((v mod p) * a + b) mod p mod hashed (p = 2^31 - 1); `per_call` evenly spaced\n"
"values go to the ring. Same arithmetic as the torch path of torchwatch.monitors.ids.");

static PyObject *id_counts(PyObject *self, PyObject *args) {
    unsigned long long address, state_address;
    Py_ssize_t n;
    long long exact, hashed, ring, per_call;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnKLLLL", &address, &n, &state_address, &exact, &hashed, &ring, &per_call))
        return NULL;
    if (n < 0 || exact < 1 || hashed < 1 || ring < 1 || per_call < 1)
        return PyErr_Format(PyExc_ValueError, "id_counts: bad sizes");
    const int64_t *v = (const int64_t *)(uintptr_t)address;
    int64_t *s = (int64_t *)(uintptr_t)state_address;
    Py_BEGIN_ALLOW_THREADS
    int64_t *counts = s + 4, *ringbuf = s + 4 + exact + hashed;
    const int64_t P = 2147483647LL;
    int64_t lo = s[1], hi = s[2];
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t x = v[i];
        if (x < lo) lo = x;
        if (x > hi) hi = x;
        if (x >= 0 && x < exact) {
            counts[x]++;
        } else {
            int64_t r = x % P;
            if (r < 0) r += P;
            uint64_t h = ((uint64_t)r * 1103515245ULL + 12345ULL) % (uint64_t)P % (uint64_t)hashed;
            counts[exact + (int64_t)h]++;
        }
    }
    s[0] += n;
    s[1] = lo;
    s[2] = hi;
    if (n > 0) {
        Py_ssize_t m = n < per_call ? n : (Py_ssize_t)per_call;
        Py_ssize_t step = n / m > 1 ? n / m : 1;
        for (Py_ssize_t j = 0; j < m; j++) ringbuf[(s[3] + j) % ring] = v[j * step];
        s[3] += m;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Per-channel float64 sums of a float32 input (the input monitor's channel means). Every value
   is converted exactly and added in float64, as torch's sum(dtype=float64) does, in a fixed order
   for a given layout and vector level: the error stays within float64's summation bound. torch's
   own reduction over dims (0, 2, 3) of an image batch ran at ~3.5 GB/s here, about seven times
   the cost of reading the batch once; these loops run at the rate of the read. */

#ifdef TW_X86
/* Sum of n contiguous values, sixteen float64 lanes at a time. */
TW_AVX2 static double row_sum_avx2(const float *x, Py_ssize_t n) {
    __m256d a = _mm256_setzero_pd(), b = a, c = a, d = a;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
        a = _mm256_add_pd(a, _mm256_cvtps_pd(_mm256_castps256_ps128(u)));
        b = _mm256_add_pd(b, _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1)));
        c = _mm256_add_pd(c, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        d = _mm256_add_pd(d, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_add_pd(a, b), _mm256_add_pd(c, d)));
    double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; i < n; i++) s += (double)x[i];
    return s;
}
#endif

static double row_sum(const float *x, Py_ssize_t n, int level) {
#ifdef TW_X86
    if (level) return row_sum_avx2(x, n);
#else
    (void)level;
#endif
    double p[4] = {0, 0, 0, 0};
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) p[j] += (double)x[i + j];
    double s = (p[0] + p[1]) + (p[2] + p[3]);
    for (; i < n; i++) s += (double)x[i];
    return s;
}

/* acc[j] += x[j]: element by element (no reassociation), so the compiler's vectors at either
   level give the same sums. */
#ifdef TW_X86
TW_AVX2 static void add_span_avx2(double *acc, const float *x, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++) acc[j] += (double)x[j];
}
#endif

static void add_span(double *acc, const float *x, Py_ssize_t n, int level) {
#ifdef TW_X86
    if (level) { add_span_avx2(acc, x, n); return; }
#else
    (void)level;
#endif
    for (Py_ssize_t j = 0; j < n; j++) acc[j] += (double)x[j];
}

#define TW_CHANNEL_SETS 8   /* interleaved partial sums per channel when channels are innermost */

PyDoc_STRVAR(channel_sums_doc,
"channel_sums(address, outer, channels, inner, sums_address, exact)\n"
"Add to float64 sums[channels] the sums over o and i of the float32 values x[(o * channels + c)\n"
"* inner + i] at `address`: (N, C, prod(rest)) for a contiguous tensor, (N * H * W, C, 1) for a\n"
"channels-last one. float64 accumulation of exactly converted values; `exact`: the portable path.");

static PyObject *channel_sums(PyObject *self, PyObject *args) {
    unsigned long long address, sums_address;
    Py_ssize_t outer, channels, inner;
    int exact;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnnKp", &address, &outer, &channels, &inner, &sums_address, &exact))
        return NULL;
    if (outer < 0 || channels < 1 || inner < 1)
        return PyErr_Format(PyExc_ValueError, "channel_sums: bad sizes (outer %zd, channels %zd, inner %zd)",
                            outer, channels, inner);
    const float *x = (const float *)(uintptr_t)address;
    double *sums = (double *)(uintptr_t)sums_address;
    int level = exact ? TW_LEVEL_PORTABLE : simd_level;
    double *sets = NULL;
    if (inner < 16) {   /* short rows: interleave whole rows into TW_CHANNEL_SETS partial sums */
        sets = (double *)calloc((size_t)channels * inner * TW_CHANNEL_SETS, sizeof(double));
        if (sets == NULL) return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    const unsigned mode = exact_fp_begin();
    if (sets == NULL) {
        for (Py_ssize_t o = 0; o < outer; o++)
            for (Py_ssize_t c = 0; c < channels; c++)
                sums[c] += row_sum(x + (o * channels + c) * inner, inner, level);
    } else {
        const Py_ssize_t row = channels * inner, span = row * TW_CHANNEL_SETS;
        Py_ssize_t o = 0;
        for (; o + TW_CHANNEL_SETS <= outer; o += TW_CHANNEL_SETS) add_span(sets, x + o * row, span, level);
        for (; o < outer; o++) add_span(sets + (o % TW_CHANNEL_SETS) * row, x + o * row, row, level);
        for (Py_ssize_t c = 0; c < channels; c++) {
            double s = 0;
            for (int k = 0; k < TW_CHANNEL_SETS; k++)
                for (Py_ssize_t i = 0; i < inner; i++) s += sets[k * row + c * inner + i];
            sums[c] += s;
        }
    }
    exact_fp_end(mode);
    Py_END_ALLOW_THREADS
    free(sets);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(logit_quality_doc,
"logit_quality(address, rows, classes, abstain_below, sums_address, pred_address, conf_address)\n"
"For `rows` x `classes` float32 logits: per row the softmax confidence (max probability), margin\n"
"(top-1 minus top-2 probability), entropy, argmax. Adds to float64 sums[7]: confidence, its\n"
"square, margin, entropy, entropy / log(classes), abstentions (confidence < abstain_below) over\n"
"finite rows, and the number of rows with NaN/Inf; writes int64 pred[rows] and float32\n"
"conf[rows] (NaN for non-finite rows; not written when conf_address is 0).");

static PyObject *logit_quality(PyObject *self, PyObject *args) {
    unsigned long long address, sums_address, pred_address, conf_address;
    Py_ssize_t rows, k;
    double abstain;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnndKKK", &address, &rows, &k, &abstain, &sums_address, &pred_address,
                          &conf_address))
        return NULL;
    if (rows < 0 || k < 2) return PyErr_Format(PyExc_ValueError, "logit_quality: bad shape");
    const float *z = (const float *)(uintptr_t)address;
    double *sums = (double *)(uintptr_t)sums_address;
    int64_t *pred = (int64_t *)(uintptr_t)pred_address;
    float *conf_out = (float *)(uintptr_t)conf_address;
    Py_BEGIN_ALLOW_THREADS
    const double log_k = log((double)k);
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *row = z + r * k;
        int finite = 1;
        Py_ssize_t arg = 0;
        double m1 = -INFINITY, m2 = -INFINITY;
        for (Py_ssize_t i = 0; i < k; i++) {
            double x = row[i];
            if (!isfinite(x)) finite = 0;
            if (x > m1) { m2 = m1; m1 = x; arg = i; }
            else if (x > m2) m2 = x;
        }
        pred[r] = arg;
        if (!finite) {
            sums[6] += 1.0;
            if (conf_out) conf_out[r] = NAN;
            continue;
        }
        double total = 0.0, weighted = 0.0;
        for (Py_ssize_t i = 0; i < k; i++) {
            double d = (double)row[i] - m1, e = exp(d);
            total += e;
            weighted += e * d;
        }
        double conf = 1.0 / total, second = exp(m2 - m1) / total;
        double entropy = log(total) - weighted / total;
        sums[0] += conf;
        sums[1] += conf * conf;
        sums[2] += conf - second;
        sums[3] += entropy;
        sums[4] += entropy / log_k;
        sums[5] += conf < abstain ? 1.0 : 0.0;
        if (conf_out) conf_out[r] = (float)conf;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *simd_available(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyBool_FromLong(simd_level > TW_LEVEL_PORTABLE);
}

static PyObject *get_simd_level(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return Py_BuildValue("ii", simd_level, simd_cpu);
}

static PyObject *set_simd_level(PyObject *self, PyObject *arg) {
    (void)self;
    long level = PyLong_AsLong(arg);
    if (level == -1 && PyErr_Occurred()) return NULL;
    if (level < TW_LEVEL_PORTABLE || level > simd_cpu)
        return PyErr_Format(PyExc_ValueError, "vector level %ld is not available on this CPU (0 .. %d)", level, simd_cpu);
    int before = simd_level;
    simd_level = (int)level;
    return PyLong_FromLong(before);
}

static PyObject *parallel_info(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    if (omp_parallel == NULL) return Py_BuildValue("(Oi)", Py_None, 1);
    return Py_BuildValue("(si)", omp_runtime, omp_max_threads());
}

static PyObject *set_threads(PyObject *self, PyObject *arg) {
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    int before = use_threads;
    use_threads = on;
    return PyBool_FromLong(before);
}

static PyObject *set_shares(PyObject *self, PyObject *arg) {
    (void)self;
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    if (k < 1 || k > TW_MAXCHUNKS) return PyErr_Format(PyExc_ValueError, "shares must be in [1, %d], got %ld", TW_MAXCHUNKS, k);
    int before = min_shares;
    min_shares = (int)k;
    return PyLong_FromLong(before);
}

static PyObject *get_read_again(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
#if defined(__GNUC__) || defined(__clang__)
    return Py_BuildValue("LL", __atomic_load_n(&read_again[TW_AGAIN_MOMENTS], __ATOMIC_RELAXED),
                         __atomic_load_n(&read_again[TW_AGAIN_ROUTE], __ATOMIC_RELAXED));
#else
    return Py_BuildValue("LL", read_again[TW_AGAIN_MOMENTS], read_again[TW_AGAIN_ROUTE]);
#endif
}

static PyMethodDef methods[] = {
    {"tensor_stats", tensor_stats, METH_VARARGS, tensor_stats_doc},
    {"simd_available", simd_available, METH_NOARGS, "Whether the kernel runs a vector path (AVX2 or AVX-512)."},
    {"simd_level", get_simd_level, METH_NOARGS, "(level in use, best level of this CPU): 0 portable, 1 AVX2, 2 AVX-512."},
    {"set_simd_level", set_simd_level, METH_O, "Use vector level 0, 1 or 2 (at most the CPU's); returns the previous one."},
    {"parallel_info", parallel_info, METH_NOARGS,
     "(OpenMP runtime file or None, threads a call may use from this thread)."},
    {"set_threads", set_threads, METH_O,
     "Whether large tensors may use torch's OpenMP threads; returns the previous setting."},
    {"set_shares", set_shares, METH_O,
     "Cut a call into at least this many contiguous shares (1: one per thread); returns the previous setting.\n"
     "Shares no thread started are taken by the others (tests run more shares than threads)."},
    {"read_again", get_read_again, METH_NOARGS,
     "Blocks read a second time since import: (for their moments: a poor shift or scale guess,\n"
     "because of a wrong route guess: a ReLU block with a negative value, or zeros not counted in the pass)."},
    {"id_counts", id_counts, METH_VARARGS, id_counts_doc},
    {"logit_quality", logit_quality, METH_VARARGS, logit_quality_doc},
    {"channel_sums", channel_sums, METH_VARARGS, channel_sums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cstats", "Single-pass CPU activation statistics.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cstats(void) {
    simd_cpu = simd_level = cpu_simd_level();
    find_omp_runtime();
    PyTypeObject *types[] = {&PlanType, &AccType};
    const char *names[] = {"Plan", "Accumulator"};
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "BLOCK", TW_BLOCK) < 0 || PyModule_AddIntConstant(m, "CHUNK", TW_CHUNK) < 0)
        goto fail;
    for (int i = 0; i < 2; i++) {
        if (PyType_Ready(types[i]) < 0) goto fail;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            goto fail;
        }
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
