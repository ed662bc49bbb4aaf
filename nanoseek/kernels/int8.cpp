// int8 x int8 products for decoding on x86 CPUs with AVX2 (where fbgemm's int8 kernels are not exact: no VNNI, see
// quant.fbgemm_int8): y [M, N] = x [M, K] @ W.T, W held as nanoseek's int8 layer holds it (see nanoseek/quant.py):
// codes int8 [N, K] in [-127, 127] and one fp32 scale per output channel, W[n, k] = scale[n] * code.
//
// The activations are quantized to int8 per block of 32 inputs (d = max|x| / 127, as llama.cpp's q8_0 and nanoseek's
// int4 kernel), so y[m, n] = scale[n] * sum_g d[m, g] * (codes . xq)[g]. AVX2 multiplies unsigned by signed bytes
// (vpmaddubsw), so each product takes |code| and xq with the code's sign (vpsignb); pairs of products reach at most
// 2 * 127 * 127 < 2^15, summed in int16 without saturating, then in int32 (vpmaddwd). A step reads 1 byte a weight
// (q8_0: 1.06). torch's weight-only int8 kernel for CPUs (`_weight_int8pack_mm`) converts the codes to bf16 and
// multiplies in floating point: on an AVX2 CPU it reads a weight at a fraction of the memory's speed past one row.
// Rows of W are split between OpenMP threads, each quantizing a share of the activations first.
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#define AVX2 __attribute__((target("avx2,fma")))
// cache lines asked for this many bytes ahead of the codes being read (one core alone keeps too few in flight)
#define PREFETCH 2048

// (codes . xq) of one block of 32 as 8 int32 lanes, the codes' magnitudes and the block's signs given
AVX2 static inline __m256 block_dot(__m256i magnitude, __m256i codes, const int8_t* xq) {
    const __m256i signed_x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)xq), codes);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), _mm256_set1_epi16(1)));
}

// y[m * N + n] for rows n0..n1 of W and M activation rows (xq [M, K], d [M, K/32]). With one or two rows, two blocks a
// step into separate sums (one sum's multiply-adds would wait on each other's latency); more rows give enough sums.
template <int M>
AVX2 static void rows_avx2(const int8_t* w, const float* scale, int64_t n0, int64_t n1, int64_t N, int64_t K,
                           const int8_t* xq, const float* d, float* y) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* wr = w + n * K;
        __m256 acc[M], acc2[M];
        for (int m = 0; m < M; m++) acc[m] = acc2[m] = _mm256_setzero_ps();
        int64_t g = 0;
        if (M <= 2)
            for (; g + 2 <= G; g += 2) {
                _mm_prefetch((const char*)(wr + 32 * g + PREFETCH), _MM_HINT_T0);
                const __m256i a = _mm256_loadu_si256((const __m256i*)(wr + 32 * g));
                const __m256i b = _mm256_loadu_si256((const __m256i*)(wr + 32 * g + 32));
                const __m256i ma = _mm256_sign_epi8(a, a), mb = _mm256_sign_epi8(b, b);
                for (int m = 0; m < M; m++) {
                    const int8_t* xr = xq + m * K + 32 * g;
                    acc[m] = _mm256_fmadd_ps(block_dot(ma, a, xr), _mm256_broadcast_ss(d + m * G + g), acc[m]);
                    acc2[m] = _mm256_fmadd_ps(block_dot(mb, b, xr + 32), _mm256_broadcast_ss(d + m * G + g + 1), acc2[m]);
                }
            }
        for (; g < G; g++) {
            if (g % 2 == 0) _mm_prefetch((const char*)(wr + 32 * g + PREFETCH), _MM_HINT_T0);
            const __m256i a = _mm256_loadu_si256((const __m256i*)(wr + 32 * g));
            const __m256i ma = _mm256_sign_epi8(a, a);
            for (int m = 0; m < M; m++)
                acc[m] = _mm256_fmadd_ps(block_dot(ma, a, xq + m * K + 32 * g), _mm256_broadcast_ss(d + m * G + g), acc[m]);
        }
        for (int m = 0; m < M; m++) y[m * N + n] = scale[n] * hsum_avx2(_mm256_add_ps(acc[m], acc2[m]));
    }
}

typedef void (*RowsFn)(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, const int8_t*, const float*,
                       float*);
template <int M> struct Avx2 { static constexpr RowsFn fn = rows_avx2<M>; };

// one block of 32 inputs to int8 codes and their scale; a block holding a NaN or an infinity gets a NaN scale, so the
// products it enters are NaN, as a float product's would be (fmaxf passes over NaNs)
static void quantize_block(const float* v, int8_t* q, float* d) {
    float amax = 0.f;
    bool finite = true;
    for (int i = 0; i < 32; i++) {
        amax = fmaxf(amax, fabsf(v[i]));
        finite = finite && fabsf(v[i]) <= FLT_MAX;  // (false for NaN)
    }
    const float inv = amax > 0.f && finite ? 127.f / amax : 0.f;
    for (int i = 0; i < 32; i++) q[i] = (int8_t)lrintf(v[i] * inv);
    *d = finite ? amax / 127.f : NAN;
}

// x [M, K] fp32 and y [M, N] fp32 row-major and contiguous, K a multiple of 32; any M (8 rows a pass over the weight).
// Returns 0, 1 for arguments it does not take (the caller checks them first), 2 when out of memory.
extern "C" int nanoseek_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
                                    float* y) {
    if (M < 0 || N < 0 || K < 32 || K % 32) return 1;
    if (M == 0 || N == 0) return 0;
    const int64_t G = K / 32;
    int8_t* xq = (int8_t*)malloc(M * K + M * G * sizeof(float));
    if (!xq) return 2;
    float* d = (float*)(xq + M * K);
#pragma omp parallel if (M * N * K > 1 << 15)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < M * G; b++) quantize_block(x + 32 * b, xq + 32 * b, d + b);
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t from = N / nt * t + (t < N % nt ? t : N % nt), to = from + N / nt + (t < N % nt);
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int rows = (int)(M - m0 < 8 ? M - m0 : 8);
            pick<Avx2>(rows)(w, scale, from, to, N, K, xq + m0 * K, d + m0 * G, y + m0 * N);
        }
    }
    free(xq);
    return 0;
}
