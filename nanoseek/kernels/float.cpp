// nanoseek's kernels for float weights and activations, a few tokens at a time (decoding), in fp32, AVX-512 or AVX2.
//
// float_linear: y [M, N] = x [M, K] @ W.T for a dense W [N, K], fp32 or bf16 (widened to fp32 as it is read: a bf16
// checkpoint's weights under fp32 activations on a CPU without bf16 instructions). Each block of R weight rows is read
// once for up to 4 tokens, R x tokens sums in registers (independent sums that hide the multiply-add's latency), the
// rows split between the threads. torch's products for a few rows (MKL's, oneDNN's, inductor's matrix-vector loop) read
// these small weights at a fraction of the cache's speed, and its bf16 products on an AVX2 CPU round the activations to
// bf16 and slow down with every row (on a 2-vCPU Zen3, R1-Distill-1.5B's [8960, 1536]: 16 GB/s at one row, 2.6 at
// eight); see float_linear in ops.cpp for when it runs.
//
// float_experts: a small float mixture-of-experts layer for a few tokens (decoding), its experts stacked as MoE.prepare_compiled_decode
// holds them: gate_up [2 * C * I, D] (every chunk's gate_proj rows, then every chunk's up_proj rows; chunk = an expert
// of width I, the shared experts' chunks last) and down [D, C * I] (down_proj side by side). Token t reads the J chunks
// chunk[t, :] with weights w[t, :] (its routed experts and gate weights, then the shared chunks with weight 1):
//   h[t, j, :] = silu(W_gate[c] @ x[t]) * (W_up[c] @ x[t]) * w[t, j],   c = chunk[t, j]
//   y[t, :]    = sum_j W_down[:, c] @ h[t, j, :]
// Two passes in one parallel region, both grouped by chunk so that tokens that chose the same expert share its weights'
// reads (the product of float_linear on each chunk's rows): the gate and up rows of every chunk some token chose (split
// between the threads), then the output's D rows in blocks, each block's down_proj segments of every chunk in use met
// by the tokens that chose it and summed into their outputs. What MoE.selected_experts and MoE.all_experts compute,
// which inductor compiles to a gathering reduction, or products over every expert: a layer of the shipped model at 8
// tokens took 72 us (a row and 8 tokens a pass, the second pass a token at a time; 104-153 now, a slower day) against
// 210 for the reduction inside a decode graph (133 compiled alone), at 64 tokens 560 against 825 for all_experts
// compiled alone (2-vCPU AMD EPYC Zen4).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2,fma")))

// float_linear: tokens met by one pass over a block of weight rows (more tokens: another pass, the block still in
// cache; 8 at a time, 2 rows a block, was 10-30% slower than 4 at 8-16 tokens), and rows a thread takes at a time
#define LINEAR_TOKENS 4
#define LINEAR_UNIT 16
// weight rows per block for T tokens: R x T sums and T inputs in the registers (32 with AVX-512, 16 with AVX2); each
// divides LINEAR_UNIT
static constexpr int rows512(int T) { return T == 1 ? 8 : 4; }
static constexpr int rows2(int T) { return T <= 2 ? 4 : 2; }

// 16 (AVX-512) or 8 (AVX2) weights from w, widened to fp32 where they are bf16 (its bits are fp32's upper half)
AVX512 static inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
AVX512 static inline __m512 load16(const uint16_t* w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)w)), 16));
}
AVX2 static inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
AVX2 static inline __m256 load8(const uint16_t* w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)w)), 16));
}

// y[t * ldy + r] = W[r] . xs[t] for R rows of W (from w, ld elements apart, K of each, K a multiple of 16) and T tokens
template <typename W, int R, int T>
AVX512 static void rows_avx512(const W* w, int64_t ld, int64_t K, const float* const* xs, float* y, int64_t ldy) {
    __m512 acc[R][T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 xv[T];
        for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(xs[t] + k);
        for (int r = 0; r < R; r++) {
            const __m512 wv = load16(w + r * ld + k);
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// the same, K a multiple of 8. PREFETCH_AVX2: the rows of the next block are asked for as these are read (one core
// alone keeps too few cache lines in flight): on a 2-vCPU Zen3, one row against 24 [8960, 1536] and 24 [1536, 8960]
// bf16 weights in turn (R1-Distill-1.5B's MLPs) read 23.2-23.7 GB/s against 20.4-22.0 without, three alternating
// process pairs
template <typename W, int R, int T>
AVX2 static void rows_avx2(const W* w, int64_t ld, int64_t K, const float* const* xs, float* y, int64_t ldy) {
    __m256 acc[R][T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xv[T];
        for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(xs[t] + k);
        if (k % (64 / sizeof(W)) == 0)  // the next block's rows asked for a cache line at a time (see PREFETCH_AVX2)
            for (int r = 0; r < R; r++) _mm_prefetch((const char*)(w + (R + r) * ld + k), _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            const __m256 wv = load8(w + r * ld + k);
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[t * ldy + r] = hsum_avx2(acc[r][t]);
}

template <typename W>
using RowsFn = void (*)(const W*, int64_t, int64_t, const float* const*, float*, int64_t);

template <typename W> struct Kind {  // the row kernels for weights of element type W, as pick takes them
    template <int T> struct Rows512 { static constexpr RowsFn<W> fn = rows_avx512<W, rows512(T), T>; };
    template <int T> struct Rows2 { static constexpr RowsFn<W> fn = rows_avx2<W, rows2(T), T>; };
    template <int T> struct Row512 { static constexpr RowsFn<W> fn = rows_avx512<W, 1, T>; };  // the rows past the last block
    template <int T> struct Row2 { static constexpr RowsFn<W> fn = rows_avx2<W, 1, T>; };
};

// y[t * ldy + r] = W[r] . xs[t] for the n rows of W (from w, ld elements apart, K of each) and T <= LINEAR_TOKENS
// tokens: blocks of R rows, the rows past the last block one at a time
template <typename W>
static void rows_times_tokens(const W* w, int64_t ld, int64_t K, int64_t n, const float* const* xs, int T, float* y,
                              int64_t ldy, int isa) {
    using Rows = Kind<W>;
    const RowsFn<W> block = isa == 2 ? pick<Rows::template Rows512>(T) : pick<Rows::template Rows2>(T);
    const RowsFn<W> one = isa == 2 ? pick<Rows::template Row512>(T) : pick<Rows::template Row2>(T);
    const int R = isa == 2 ? rows512(T) : rows2(T);
    int64_t r = 0;
    for (; r + R <= n; r += R) block(w + r * ld, ld, K, xs, y + r, ldy);
    for (; r < n; r++) one(w + r * ld, ld, K, xs, y + r, ldy);
}

// rows n0..n1 of W against every token: y[t * N + r] for r in [n0, n1), a block of LINEAR_UNIT rows met by every token
// (LINEAR_TOKENS at a time) before the next block, on the calling thread
template <typename W>
static void linear_rows(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int64_t n0, int64_t n1,
                        int isa) {
    for (int64_t r0 = n0; r0 < n1; r0 += LINEAR_UNIT) {
        const int64_t n = n1 - r0 < LINEAR_UNIT ? n1 - r0 : LINEAR_UNIT;
        for (int64_t m0 = 0; m0 < M; m0 += LINEAR_TOKENS) {
            const int T = (int)(M - m0 < LINEAR_TOKENS ? M - m0 : LINEAR_TOKENS);
            const float* xs[LINEAR_TOKENS];
            for (int t = 0; t < T; t++) xs[t] = x + (m0 + t) * K;
            rows_times_tokens(w + r0 * K, K, K, n, xs, T, y + m0 * N + r0, N, isa);
        }
    }
}

template <typename W>
static int float_linear(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int isa) {
    if (M < 0 || K < 1 || N < 0 || K % (isa == 2 ? 16 : 8) || (isa != 1 && isa != 2)) return 1;
#pragma omp parallel for schedule(static) if (M * N * K > 1 << 15)
    for (int64_t n0 = 0; n0 < N; n0 += LINEAR_UNIT) linear_rows(x, M, K, w, N, y, n0, n0 + LINEAR_UNIT < N ? n0 + LINEAR_UNIT : N, isa);
    return 0;
}

// isa 2 = AVX-512 (K a multiple of 16), 1 = AVX2 (of 8); x and y row-major, contiguous; w fp32 (bf16 = 0) or bf16 (bf16
// = 1). Returns 0, or 1 for arguments it does not take (the caller checks them first).
extern "C" int nanoseek_float_linear(const float* x, int64_t M, int64_t K, const void* w, int bf16, int64_t N, float* y,
                                     int isa) {
    return bf16 ? float_linear(x, M, K, (const uint16_t*)w, N, y, isa) : float_linear(x, M, K, (const float*)w, N, y, isa);
}

// The same product's output columns n0..n1 only (weight rows n0..n1), on the calling thread: how a caller that runs its
// own threads (step.cpp) shares a product out. Unchecked.
extern "C" void nanoseek_float_linear_part(const float* x, int64_t M, int64_t K, const void* w, int bf16, int64_t N,
                                           float* y, int64_t n0, int64_t n1, int isa) {
    if (bf16)
        linear_rows(x, M, K, (const uint16_t*)w, N, y, n0, n1, isa);
    else
        linear_rows(x, M, K, (const float*)w, N, y, n0, n1, isa);
}

// The experts' work for every thread of the team that calls it (its two passes `omp for` loops that bind to the
// caller's parallel region; called outside of one, a thread does all of it): the chunks in use and the (token, slot)
// pairs that read each, grouped by chunk, in `plan` (3 * C + 1 + T * J int64, the thread's own), h [T * J, I] the pairs'
// intermediate activations (shared by the team).
template <typename W>
static void experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w, int64_t J,
                         const W* gate_up, const W* down, int64_t C, int64_t I, float* y, float* h, int64_t* plan,
                         int isa) {
    const ChunkPlan q = plan_chunks(chunk, T * J, C, plan);
    const int64_t *count = q.count, *order = q.order, *pairs = q.pairs, used = q.used;
    // units of work in the first pass: LINEAR_UNIT rows of a chunk in use, or 8 where I is not a multiple of it (AVX2
    // takes multiples of 8, which its blocks of rows2 divide)
    const int64_t unit = I % LINEAR_UNIT ? 8 : LINEAR_UNIT, units = I / unit;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < used * units; r++) {
        const int64_t c = order[r / units], i0 = r % units * unit;
        for (int64_t p0 = count[c]; p0 < count[c + 1]; p0 += LINEAR_TOKENS) {
            const int n = (int)(count[c + 1] - p0 < LINEAR_TOKENS ? count[c + 1] - p0 : LINEAR_TOKENS);
            const float* xs[LINEAR_TOKENS];
            float g[LINEAR_TOKENS * LINEAR_UNIT], u[LINEAR_TOKENS * LINEAR_UNIT];
            for (int k = 0; k < n; k++) xs[k] = x + pairs[p0 + k] / J * D;
            rows_times_tokens(gate_up + (c * I + i0) * D, D, D, unit, xs, n, g, unit, isa);
            rows_times_tokens(gate_up + ((C + c) * I + i0) * D, D, D, unit, xs, n, u, unit, isa);
            for (int k = 0; k < n; k++) {
                const int64_t p = pairs[p0 + k];
                for (int64_t i = 0; i < unit; i++) {
                    const float a = g[k * unit + i];
                    h[p * I + i0 + i] = a / (1.f + expf(-a)) * u[k * unit + i] * w[p];
                }
            }
        }
    }
#pragma omp for schedule(static)
    for (int64_t d0 = 0; d0 < D; d0 += LINEAR_UNIT) {  // the output's rows, each block summed over the chunks in use
        const int64_t rows = D - d0 < LINEAR_UNIT ? D - d0 : LINEAR_UNIT;
        for (int64_t t = 0; t < T; t++)
            for (int64_t d = d0; d < d0 + rows; d++) y[t * D + d] = 0.f;
        for (int64_t o = 0; o < used; o++) {
            const int64_t c = order[o];
            for (int64_t p0 = count[c]; p0 < count[c + 1]; p0 += LINEAR_TOKENS) {
                const int n = (int)(count[c + 1] - p0 < LINEAR_TOKENS ? count[c + 1] - p0 : LINEAR_TOKENS);
                const float* hs[LINEAR_TOKENS];
                float part[LINEAR_TOKENS * LINEAR_UNIT];
                for (int k = 0; k < n; k++) hs[k] = h + pairs[p0 + k] * I;
                rows_times_tokens(down + d0 * C * I + c * I, C * I, I, rows, hs, n, part, rows, isa);
                for (int k = 0; k < n; k++) {
                    float* out = y + pairs[p0 + k] / J * D + d0;
                    for (int64_t r = 0; r < rows; r++) out[r] += part[k * rows + r];
                }
            }
        }
    }
}

static int experts_take(int64_t T, int64_t D, const int64_t* chunk, int64_t J, int64_t C, int64_t I, int isa) {
    const int64_t width = isa == 2 ? 16 : 8;
    if (T < 1 || J < 1 || C < 1 || D % width || I % width || (isa != 1 && isa != 2)) return 0;
    for (int64_t p = 0; p < T * J; p++)
        if (chunk[p] < 0 || chunk[p] >= C) return 0;
    return 1;
}

// isa 2 = AVX-512 (D and I multiples of 16), 1 = AVX2 (multiples of 8). Returns 0, 1 for arguments it does not
// take (the caller checks them first), 2 when out of memory.
extern "C" int nanoseek_float_experts(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                      int64_t J, const float* gate_up, const float* down, int64_t C, int64_t I, float* y,
                                      int isa) {
    if (!experts_take(T, D, chunk, J, C, I, isa)) return T == 0 ? 0 : 1;
    float* h = (float*)malloc(T * J * I * sizeof(float));
    if (!h) return 2;
    int failed = 0;
#pragma omp parallel if (T * J * I * D > 1 << 16)
    {
        int64_t* plan = (int64_t*)malloc((3 * C + 1 + T * J) * sizeof(int64_t));  // (each thread's own)
#pragma omp atomic
        failed += !plan;
#pragma omp barrier
        if (!failed) experts_team(x, T, D, chunk, w, J, gate_up, down, C, I, y, h, plan, isa);
        free(plan);
    }
    free(h);
    return failed ? 2 : 0;
}

// The same for every thread of the caller's team (step.cpp), each with its own plan buffer (3 * C + 1 + T * J int64)
// and h [T * J, I] shared; the stacked weights fp32 (bf16 = 0) or bf16 (1). Returns 1 (on every thread) for arguments
// it does not take.
extern "C" int nanoseek_float_experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                           int64_t J, const void* gate_up, const void* down, int bf16, int64_t C,
                                           int64_t I, float* y, float* h, int64_t* plan, int isa) {
    if (!experts_take(T, D, chunk, J, C, I, isa)) return 1;
    if (bf16)
        experts_team(x, T, D, chunk, w, J, (const uint16_t*)gate_up, (const uint16_t*)down, C, I, y, h, plan, isa);
    else
        experts_team(x, T, D, chunk, w, J, (const float*)gate_up, (const float*)down, C, I, y, h, plan, isa);
    return 0;
}
