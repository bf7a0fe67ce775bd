/* The CPU kernel's inner loop on data already in L1 (or L2): its arithmetic cost alone, beside a
 * plain sum of the same data at the same vector width, in ns per 32 float32 elements.
 *
 * On data in L1 nothing but the loop's instructions limits it, so this is the compute floor the
 * kernel reaches inside a forward where an activation is still in a core's L2 (benchmarks/
 * in_forward.py): the loop issues about 18 vector operations per 32 elements (24 in blocks with
 * zeros and a shift) where a sum issues 2, and 512-bit operations share two ports. The AVX2 loop
 * runs too (on AVX2-only CPUs such as AMD Zen 1, alone), beside a plain AVX2 sum.
 *
 * Build and run (x86-64 with AVX2; it includes the kernel's source, so it links libpython):
 *   gcc -O3 $(python3-config --includes) benchmarks/kernel_loop.c -o /tmp/kernel_loop \
 *       $(python3-config --embed --ldflags) -Wl,-rpath,$(python3-config --prefix)/lib
 *   /tmp/kernel_loop 4096      # elements in the buffer: 16 KB, in L1
 *   /tmp/kernel_loop 131072    # 512 KB, in L2
 */
#define PY_SSIZE_T_CLEAN
#include "../torchwatch/kernels/_cstats.c"
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

TW_AVX512 static float sum512(const float *x, int n) {
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    for (int i = 0; i + 64 <= n; i += 64) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(x + i));
        b = _mm512_add_ps(b, _mm512_loadu_ps(x + i + 16));
        c = _mm512_add_ps(c, _mm512_loadu_ps(x + i + 32));
        d = _mm512_add_ps(d, _mm512_loadu_ps(x + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

TW_AVX2 static float sum256(const float *x, int n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (int i = 0; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(x + i));
        b = _mm256_add_ps(b, _mm256_loadu_ps(x + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(x + i + 16));
        d = _mm256_add_ps(d, _mm256_loadu_ps(x + i + 24));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
}

typedef void (*loop_t)(const float *, int, float, float, float, int, fused_t *);

/* the plain sums in the loops' shape (the sum goes where the loops put theirs) */
TW_AVX512 static void sum512_loop(const float *x, int n, float tinl, float scale, float shift, int zeros, fused_t *r) {
    (void)tinl, (void)scale, (void)shift, (void)zeros;
    r->sd = sum512(x, n);
}

TW_AVX2 static void sum256_loop(const float *x, int n, float tinl, float scale, float shift, int zeros, fused_t *r) {
    (void)tinl, (void)scale, (void)shift, (void)zeros;
    r->sd = sum256(x, n);
}

/* the kernel's float32 loops */
TW_AVX512 static void kernel512_loop(const float *x, int n, float tinl, float scale, float shift, int zeros, fused_t *r) {
    fused_avx512(x, TW_F32, n, tinl, scale, shift, zeros, r);
}

TW_AVX2 static void kernel256_loop(const float *x, int n, float tinl, float scale, float shift, int zeros, fused_t *r) {
    fused_avx2(x, TW_F32, n, tinl, scale, shift, zeros, r);
}

/* zeros blocks after one without negative values (ReLU outputs): x taken as its own |x| */
TW_AVX512 static void nonneg512_loop(const float *x, int n, float tinl, float scale, float shift, int zeros, fused_t *r) {
    (void)scale;
    (void)zeros;
    fused_avx512_nonneg(x, TW_F32, n, tinl, shift, r);
}

TW_AVX2 static void nonneg256_loop(const float *x, int n, float tinl, float scale, float shift, int zeros, fused_t *r) {
    (void)scale;
    (void)zeros;
    fused_avx2_nonneg(x, TW_F32, n, tinl, shift, r);
}

static double time_loop(loop_t loop, const float *x, size_t total, int zeros, int shifted, double *sink) {
    const int n = TW_BLOCK;
    fused_t r = {0};
    long blocks = 0;
    double t0 = now();
    while (now() - t0 < 0.5)
        for (size_t off = 0; off + n <= total; off += n, blocks++) {
            loop(x + off, n, 0.001f, 1.0f, shifted ? 0.3f : 0.0f, zeros, &r);
            *sink += r.sd;
        }
    return (now() - t0) / (blocks * n / 32.0);  /* seconds per 32 elements */
}

static void report(const char *what, double t) {
    printf("%-40s %5.2f ns / 32 elements, %5.1f GB/s\n", what, t * 1e9, 128.0 / t / 1e9);
}

int main(int argc, char **argv) {
    int level = cpu_simd_level();
    if (level < TW_LEVEL_AVX2) {
        printf("this CPU has no AVX2\n");
        return 0;
    }
    size_t total = argc > 1 ? (size_t)atol(argv[1]) : 4096;
    if (total < TW_BLOCK) total = TW_BLOCK;
    float *x = aligned_alloc(64, total * sizeof(float));
    for (size_t i = 0; i < total; i++)  /* values in [0, 1), a third of them zero */
        x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f * ((i % 3) ? 1.0f : 0.0f);
    printf("buffer %zu KB\n", total * sizeof(float) / 1024);
    double sink = 0;
    char what[64];
    for (int l = level; l >= TW_LEVEL_AVX2; l--) {
        const char *name = l == TW_LEVEL_AVX512 ? "avx512" : "avx2";
        for (int zeros = 0; zeros < 2; zeros++)
            for (int shifted = 0; shifted < 2; shifted++) {
                snprintf(what, sizeof what, "%s kernel loop, zeros %d shifted %d:", name, zeros, shifted);
                report(what, time_loop(l == TW_LEVEL_AVX512 ? kernel512_loop : kernel256_loop, x, total, zeros, shifted, &sink));
            }
        for (int shifted = 0; shifted < 2; shifted++) {
            snprintf(what, sizeof what, "%s ReLU loop, zeros 1 shifted %d:", name, shifted);
            report(what, time_loop(l == TW_LEVEL_AVX512 ? nonneg512_loop : nonneg256_loop, x, total, 1, shifted, &sink));
        }
        snprintf(what, sizeof what, "%s plain sum:", name);
        report(what, time_loop(l == TW_LEVEL_AVX512 ? sum512_loop : sum256_loop, x, total, 0, 0, &sink));
    }
    return sink == 12345.678;  /* keeps the results live */
}
