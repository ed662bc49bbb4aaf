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

// y[m * ldy + n] for rows n0..n1 of W and M activation rows (xq[m] [K] codes, d[m] [K/32] their scales). With one or
// two rows, two blocks a step into separate sums (one sum's multiply-adds would wait on each other's latency); more
// rows give enough sums.
template <int M>
AVX2 static void rows_avx2(const int8_t* w, const float* scale, int64_t n0, int64_t n1, int64_t K,
                           const int8_t* const* xq, const float* const* d, float* y, int64_t ldy) {
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
                    const int8_t* xr = xq[m] + 32 * g;
                    acc[m] = _mm256_fmadd_ps(block_dot(ma, a, xr), _mm256_broadcast_ss(d[m] + g), acc[m]);
                    acc2[m] = _mm256_fmadd_ps(block_dot(mb, b, xr + 32), _mm256_broadcast_ss(d[m] + g + 1), acc2[m]);
                }
            }
        for (; g < G; g++) {
            if (g % 2 == 0) _mm_prefetch((const char*)(wr + 32 * g + PREFETCH), _MM_HINT_T0);
            const __m256i a = _mm256_loadu_si256((const __m256i*)(wr + 32 * g));
            const __m256i ma = _mm256_sign_epi8(a, a);
            for (int m = 0; m < M; m++)
                acc[m] = _mm256_fmadd_ps(block_dot(ma, a, xq[m] + 32 * g), _mm256_broadcast_ss(d[m] + g), acc[m]);
        }
        for (int m = 0; m < M; m++) y[m * ldy + n] = scale[n] * hsum_avx2(_mm256_add_ps(acc[m], acc2[m]));
    }
}

typedef void (*RowsFn)(const int8_t*, const float*, int64_t, int64_t, int64_t, const int8_t* const*,
                       const float* const*, float*, int64_t);
template <int M> struct Avx2 { static constexpr RowsFn fn = rows_avx2<M>; };

// one block of 32 inputs to int8 codes and their scale (kernels.h)
AVX2 static void quantize_block(const float* v, int8_t* q, float* d) {
    _mm256_storeu_si256((__m256i*)q, block_codes_avx2(v, d));
}

// rows n0..n1 of W against M quantized activation rows (xq[m], d[m] as nanoseek_int8_quantize writes them), 8 rows a
// pass over the weight, on the calling thread: y[m * ldy + n]. How a caller that runs its own threads (step.cpp) shares
// a product out. Unchecked (K a multiple of 32).
extern "C" void nanoseek_int8_linear_part(const int8_t* const* xq, const float* const* d, int64_t M, int64_t K,
                                          const int8_t* w, const float* scale, float* y, int64_t ldy, int64_t n0,
                                          int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int rows = (int)(M - m0 < 8 ? M - m0 : 8);
        pick<Avx2>(rows)(w, scale, n0, n1, K, xq + m0, d + m0, y + m0 * ldy, ldy);
    }
}

// x [M, K] fp32 (K a multiple of 32) to int8 codes xq [M, K] and their scales d [M, K/32], on the calling thread
extern "C" void nanoseek_int8_quantize(const float* x, int64_t M, int64_t K, int8_t* xq, float* d) {
    for (int64_t b = 0; b < M * (K / 32); b++) quantize_block(x + 32 * b, xq + 32 * b, d + b);
}

// x [M, K] fp32 and y [M, N] fp32 row-major and contiguous, K a multiple of 32; any M (8 rows a pass over the weight).
// Returns 0, 1 for arguments it does not take (the caller checks them first), 2 when out of memory.
extern "C" int nanoseek_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
                                    float* y) {
    if (M < 0 || N < 0 || K < 32 || K % 32) return 1;
    if (M == 0 || N == 0) return 0;
    const int64_t G = K / 32;
    const int64_t at = (M * K + M * G * (int64_t)sizeof(float) + 7) / 8 * 8;  // (the row pointers 8-byte aligned)
    int8_t* xq = (int8_t*)malloc(at + M * (sizeof(int8_t*) + sizeof(float*)));
    if (!xq) return 2;
    float* d = (float*)(xq + M * K);
    const int8_t** xs = (const int8_t**)(xq + at);
    const float** ds = (const float**)(xs + M);
    for (int64_t m = 0; m < M; m++) xs[m] = xq + m * K, ds[m] = d + m * G;
#pragma omp parallel if (M * N * K > 1 << 15)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < M * G; b++) quantize_block(x + 32 * b, xq + 32 * b, d + b);
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t from = N / nt * t + (t < N % nt ? t : N % nt), to = from + N / nt + (t < N % nt);
        nanoseek_int8_linear_part(xs, ds, M, K, w, scale, y, N, from, to);
    }
    free(xq);
    return 0;
}

namespace {
// int8 experts for kernels.h's quantized_experts: a row of the table holds gate_proj's codes and scales, up_proj's, down_proj's,
// then the width I
struct Int8Experts {
    static constexpr int COLUMNS = 7;
    const int64_t* table;
    const int8_t *xq, *hq;  // the tokens' codes [T, D] and the pairs' hidden ones [T * J, Imax]
    const float *xd, *hd;   // their scales per block of 32
    int64_t D, Imax;
    const int8_t** codes;  // the slots: 8 rows' codes, 8 rows' scales
    const float** scales;
    void inputs(int k, int64_t t) { codes[k] = xq + t * D, scales[k] = xd + t * (D / 32); }
    void hidden(int k, int64_t p) { codes[k] = hq + p * Imax, scales[k] = hd + p * (Imax / 32); }
    void product(int64_t e, int layer, int64_t n, int64_t K, int64_t r0, int64_t rows, float* out, int64_t ldy) {
        const int64_t* op = table + e * COLUMNS + 2 * layer;
        nanoseek_int8_linear_part(codes, scales, n, K, (const int8_t*)op[0] + r0 * K, (const float*)op[1] + r0, out, ldy,
                                  0, rows);
    }
    void store(const float* a, int64_t p, int64_t i0, int64_t) {
        quantize_block(a, (int8_t*)hq + p * Imax + i0, (float*)hd + p * (Imax / 32) + i0 / 32);
    }
};
}  // namespace

// A mixture-of-experts layer's int8 experts (int64 table [C, 7]: gate_proj's codes and scales, up_proj's, down_proj's,
// then the width I, a multiple of 32), for every thread of the caller's team: kernels.h's quantized_experts. hq [T * J, Imax]
// and hd [T * J, Imax / 32], the pairs' hidden rows, are shared by the team; each thread brings its own xq [T, D] and
// xd [T, D / 32] (x quantized), plan (3 * C + 1 + T * J int64) and slots (16 pointers).
extern "C" void nanoseek_int8_experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                           int64_t J, const int64_t* table, int64_t C, int64_t Imax, float* y,
                                           int8_t* hq, float* hd, int8_t* xq, float* xd, int64_t* plan,
                                           const void** slots) {
    nanoseek_int8_quantize(x, T, D, xq, xd);
    Int8Experts f{table, xq, hq, xd, hd, D, Imax, (const int8_t**)slots, (const float**)(slots + 8)};
    quantized_experts(f, T, D, chunk, w, J, table, C, y, plan);
}
