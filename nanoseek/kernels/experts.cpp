// A small float mixture-of-experts layer for a few tokens (decoding), its experts stacked as MoE.prepare_compiled_decode
// holds them: gate_up [2 * C * I, D] (every chunk's gate_proj rows, then every chunk's up_proj rows; chunk = an expert
// of width I, the shared experts' chunks last) and down [D, C * I] (down_proj side by side). Token t reads the J chunks
// chunk[t, :] with weights w[t, :] (its routed experts and gate weights, then the shared chunks with weight 1):
//   h[t, j, :] = silu(W_gate[c] @ x[t]) * (W_up[c] @ x[t]) * w[t, j],   c = chunk[t, j]
//   y[t, :]    = sum_j W_down[:, c] @ h[t, j, :]
// Two passes in one parallel region: the rows of every chunk some token chose, each row read once and met by every
// token that chose its chunk (split between the threads), then the output's D rows, each token's J segments of a
// row summed in one vector. What MoE.selected_experts and MoE.all_experts compute, which inductor compiles to a
// gathering reduction, or products over every expert: a layer of the shipped model at 8 tokens took 72 us here
// against 210 for the reduction inside a decode graph (133 compiled alone), at 64 tokens 560 against 825 for
// all_experts compiled alone (2-vCPU AMD EPYC Zen4).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#define MAX_USERS 8  // tokens met by one pass over a row
#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2,fma")))

// out[u] = row . xs[u] (n floats, a multiple of 16), for N tokens
template <int N>
AVX512 static void dots_avx512(const float* row, const float* const* xs, int64_t n, float* out) {
    __m512 acc[N];
    for (int u = 0; u < N; u++) acc[u] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
        const __m512 r = _mm512_loadu_ps(row + k);
        for (int u = 0; u < N; u++) acc[u] = _mm512_fmadd_ps(r, _mm512_loadu_ps(xs[u] + k), acc[u]);
    }
    for (int u = 0; u < N; u++) out[u] = _mm512_reduce_add_ps(acc[u]);
}

AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// the same, n a multiple of 8
template <int N>
AVX2 static void dots_avx2(const float* row, const float* const* xs, int64_t n, float* out) {
    __m256 acc[N];
    for (int u = 0; u < N; u++) acc[u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
        const __m256 r = _mm256_loadu_ps(row + k);
        for (int u = 0; u < N; u++) acc[u] = _mm256_fmadd_ps(r, _mm256_loadu_ps(xs[u] + k), acc[u]);
    }
    for (int u = 0; u < N; u++) out[u] = hsum_avx2(acc[u]);
}

typedef void (*DotsFn)(const float*, const float* const*, int64_t, float*);

template <int N> struct Dots512 { static constexpr DotsFn fn = dots_avx512<N>; };
template <int N> struct Dots2 { static constexpr DotsFn fn = dots_avx2<N>; };

// sum_j segs[j] . hs[j] (J segments of n floats)
AVX512 static float segments_avx512(const float* const* segs, const float* const* hs, int J, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < J; j++)
        for (int64_t k = 0; k < n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(segs[j] + k), _mm512_loadu_ps(hs[j] + k), acc);
    return _mm512_reduce_add_ps(acc);
}

AVX2 static float segments_avx2(const float* const* segs, const float* const* hs, int J, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < J; j++)
        for (int64_t k = 0; k < n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(segs[j] + k), _mm256_loadu_ps(hs[j] + k), acc);
    return hsum_avx2(acc);
}

// isa 2 = AVX-512 (D and I multiples of 16), 1 = AVX2 (multiples of 8). Returns 0, 1 for arguments it does not
// take (the caller checks them first), 2 when out of memory.
extern "C" int nanoseek_float_experts(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                      int64_t J, const float* gate_up, const float* down, int64_t C, int64_t I, float* y,
                                      int isa) {
    const int64_t width = isa == 2 ? 16 : 8;
    if (T < 1 || J < 1 || C < 1 || D % width || I % width || (isa != 1 && isa != 2)) return T == 0 ? 0 : 1;
    for (int64_t p = 0; p < T * J; p++)
        if (chunk[p] < 0 || chunk[p] >= C) return 1;
    // the chunks in use, each with the (token, slot) pairs that read it, grouped by chunk: count[c] is where chunk c's
    // pairs start in `pairs`, order[..used] the chunks that have any; h the pairs' intermediate activations
    const int64_t P = T * J;
    int64_t* count = (int64_t*)calloc(3 * C + 1 + P, sizeof(int64_t));
    float* h = (float*)malloc(P * I * sizeof(float));
    if (!count || !h) {
        free(count), free(h);
        return 2;
    }
    int64_t *at = count + C + 1, *order = at + C, *pairs = order + C, used = 0;
    for (int64_t p = 0; p < P; p++) count[chunk[p] + 1]++;
    for (int64_t c = 0; c < C; c++) count[c + 1] += count[c];
    for (int64_t c = 0; c < C; c++) at[c] = count[c];
    for (int64_t p = 0; p < P; p++) pairs[at[chunk[p]]++] = p;
    for (int64_t c = 0; c < C; c++)
        if (count[c + 1] > count[c]) order[used++] = c;
#pragma omp parallel if (T * J * I * D > 1 << 16)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < used * I; r++) {
            const int64_t c = order[r / I], i = r % I;
            const float* gate = gate_up + (c * I + i) * D;
            const float* up = gate_up + ((C + c) * I + i) * D;
            for (int64_t p0 = count[c]; p0 < count[c + 1]; p0 += MAX_USERS) {
                const int n = (int)(count[c + 1] - p0 < MAX_USERS ? count[c + 1] - p0 : MAX_USERS);
                const float* xs[MAX_USERS];
                float g[MAX_USERS], u[MAX_USERS];
                for (int k = 0; k < n; k++) xs[k] = x + pairs[p0 + k] / J * D;
                DotsFn dots = isa == 2 ? pick<Dots512>(n) : pick<Dots2>(n);
                dots(gate, xs, D, g);
                dots(up, xs, D, u);
                for (int k = 0; k < n; k++) {
                    const int64_t p = pairs[p0 + k];
                    h[p * I + i] = g[k] / (1.f + expf(-g[k])) * u[k] * w[p];
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++) {
            for (int64_t t = 0; t < T; t++) {
                const float* segs[64];
                const float* hs[64];
                float total = 0.f;
                for (int64_t j0 = 0; j0 < J; j0 += 64) {
                    const int n = (int)(J - j0 < 64 ? J - j0 : 64);
                    for (int k = 0; k < n; k++) {
                        segs[k] = down + d * C * I + chunk[t * J + j0 + k] * I;
                        hs[k] = h + (t * J + j0 + k) * I;
                    }
                    total += isa == 2 ? segments_avx512(segs, hs, n, I) : segments_avx2(segs, hs, n, I);
                }
                y[t * D + d] = total;
            }
        }
    }
    free(count), free(h);
    return 0;
}
