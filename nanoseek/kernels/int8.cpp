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

// A mixture-of-experts layer's experts as int8 layers, for every thread of the caller's team (step.cpp; its two passes
// are `omp for` loops that bind to the caller's parallel region). Expert e is row e of `table` (int64 [C, 7]: gate_proj's
// codes and scales, up_proj's, down_proj's, then its width I, a multiple of 32; a shared expert is one row). Token t
// reads the J chunks chunk[t, :] with weights w[t, :]:
//   h[t, j, :] = silu(gate_e @ x[t]) * (up_e @ x[t]) * w[t, j],   y[t, :] = sum_j down_e @ h[t, j, :],   e = chunk[t, j]
// as float.cpp's experts compute it for stacked float weights. The first pass shares out blocks of 32 intermediate rows
// of every expert in use, each met by every token that chose it, and quantizes each pair's 32 activations into one
// int8 block (hq [T * J, Imax] and hd [T * J, Imax / 32], shared by the team); the second shares out the output's rows
// in blocks of 16, each summed over the experts in use. Each thread brings its own xq [T, D] and xd [T, D / 32] (x
// quantized), plan (3 * C + 1 + T * J int64) and rows (2 * T * J pointers).
extern "C" void nanoseek_int8_experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                           int64_t J, const int64_t* table, int64_t C, int64_t Imax, float* y,
                                           int8_t* hq, float* hd, int8_t* xq, float* xd, int64_t* plan,
                                           const void** rows) {
    const int64_t P = T * J, GD = D / 32, GI = Imax / 32;
    const ChunkPlan q = plan_chunks(chunk, P, C, plan);
    const int64_t *count = q.count, *order = q.order, *pairs = q.pairs, used = q.used;
    int64_t* first = q.at;  // first[o]: the first unit (32 intermediate rows) of used chunk o (at is spent)
    int64_t units = 0;
    for (int64_t o = 0; o < used; o++) first[o] = units, units += table[order[o] * 7 + 6] / 32;
    nanoseek_int8_quantize(x, T, D, xq, xd);
    const int8_t** xs = (const int8_t**)rows;
    const float** ds = (const float**)(rows + P);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        int64_t o = 0;
        while (o + 1 < used && first[o + 1] <= u) o++;
        const int64_t c = order[o], i0 = (u - first[o]) * 32;
        const int64_t* e = table + c * 7;
        for (int64_t p0 = count[c]; p0 < count[c + 1]; p0 += 8) {
            const int64_t n = count[c + 1] - p0 < 8 ? count[c + 1] - p0 : 8;
            float g[8 * 32], up[8 * 32], a[32];
            for (int64_t k = 0; k < n; k++) xs[k] = xq + pairs[p0 + k] / J * D, ds[k] = xd + pairs[p0 + k] / J * GD;
            nanoseek_int8_linear_part(xs, ds, n, D, (const int8_t*)e[0] + i0 * D, (const float*)e[1] + i0, g, 32, 0, 32);
            nanoseek_int8_linear_part(xs, ds, n, D, (const int8_t*)e[2] + i0 * D, (const float*)e[3] + i0, up, 32, 0, 32);
            for (int64_t k = 0; k < n; k++) {
                const int64_t p = pairs[p0 + k];
                for (int i = 0; i < 32; i++) {
                    const float v = g[k * 32 + i];
                    a[i] = v / (1.f + expf(-v)) * up[k * 32 + i] * w[p];
                }
                quantize_block(a, hq + p * Imax + i0, hd + p * GI + i0 / 32);
            }
        }
    }
#pragma omp for schedule(static)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {  // the output's rows, each block summed over the experts in use
        const int64_t n_rows = D - d0 < 16 ? D - d0 : 16;
        for (int64_t t = 0; t < T; t++)
            for (int64_t d = d0; d < d0 + n_rows; d++) y[t * D + d] = 0.f;
        for (int64_t o = 0; o < used; o++) {
            const int64_t c = order[o], I = table[c * 7 + 6];
            const int64_t* e = table + c * 7;
            for (int64_t p0 = count[c]; p0 < count[c + 1]; p0 += 8) {
                const int64_t n = count[c + 1] - p0 < 8 ? count[c + 1] - p0 : 8;
                float part[8 * 16];
                for (int64_t k = 0; k < n; k++) xs[k] = hq + pairs[p0 + k] * Imax, ds[k] = hd + pairs[p0 + k] * GI;
                nanoseek_int8_linear_part(xs, ds, n, I, (const int8_t*)e[4] + d0 * I, (const float*)e[5] + d0, part, 16, 0,
                                          n_rows);
                for (int64_t k = 0; k < n; k++) {
                    float* out = y + pairs[p0 + k] / J * D + d0;
                    for (int64_t r = 0; r < n_rows; r++) out[r] += part[k * 16 + r];
                }
            }
        }
    }
}
