/* The CPU kernel's inner loop on data already in L1 (or L2): its arithmetic cost alone, beside a
 * plain AVX-512 sum of the same data, in ns per 32 float32 elements (two 512-bit vectors).
 *
 * On data in L1 nothing but the loop's instructions limits it, so this is the compute floor the
 * kernel reaches inside a forward where an activation is still in a core's L2 (benchmarks/
 * in_forward.py): the loop issues about 18 vector operations per 32 elements (24 in blocks with
 * zeros and a shift) where a sum issues 2, and 512-bit operations share two ports.
 *
 * Build and run (x86-64 with AVX-512F; it includes the kernel's source, so it links libpython):
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

int main(int argc, char **argv) {
    if (cpu_simd_level() < TW_LEVEL_AVX512) {
        printf("this CPU has no AVX-512F\n");
        return 0;
    }
    const int n = TW_BLOCK;
    size_t total = argc > 1 ? (size_t)atol(argv[1]) : 4096;
    if (total < (size_t)n) total = n;
    float *x = aligned_alloc(64, total * sizeof(float));
    for (size_t i = 0; i < total; i++)  /* values in [0, 1), a third of them zero */
        x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f * ((i % 3) ? 1.0f : 0.0f);
    printf("buffer %zu KB\n", total * sizeof(float) / 1024);
    double sink = 0;
    for (int zeros = 0; zeros < 2; zeros++) {
        for (int shifted = 0; shifted < 2; shifted++) {
            fused_t r = {0};
            long blocks = 0;
            double t0 = now();
            while (now() - t0 < 0.5)
                for (size_t off = 0; off + n <= total; off += n, blocks++) {
                    fused_avx512(x + off, n, 0.001f, 1.0f, shifted ? 0.3f : 0.0f, zeros, &r);
                    sink += r.sd;
                }
            double t = now() - t0;
            printf("kernel loop, zeros %d shifted %d: %5.2f ns / 32 elements, %5.1f GB/s\n", zeros, shifted,
                   t / (blocks * n / 32.0) * 1e9, blocks * n * 4.0 / t / 1e9);
        }
    }
    long blocks = 0;
    double t0 = now();
    while (now() - t0 < 0.5)
        for (size_t off = 0; off + n <= total; off += n, blocks++) sink += sum512(x + off, n);
    double t = now() - t0;
    printf("plain sum:                     %5.2f ns / 32 elements, %5.1f GB/s\n", t / (blocks * n / 32.0) * 1e9,
           blocks * n * 4.0 / t / 1e9);
    return sink == 12345.678;  /* keeps the results live */
}
