// The C entries of nanoseek's kernels (int4.cpp, int8.cpp, mla.cpp, float.cpp), as ops.cpp calls them, and what the sources share; see each source for what they do.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

// the sum of an AVX2 vector's 8 floats
__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// One block of 32 fp32 inputs to int8 codes q = round(v / d) in order (rounded to nearest even, as lrintf), d = max|v| / 127
// as llama.cpp's q8_0 (int8.cpp and int4.cpp quantize activations so); a block holding a NaN or an infinity gets codes 0
// and d NaN, so the products it enters are NaN, as a float product's would be. (Scalar, with calls to lrintf and fmaxf,
// this was 2% of a DeepSeek-V2-Lite int8 token, and a third of an int4 product's fixed cost.)
__attribute__((target("avx2,fma"))) static inline __m256i block_codes_avx2(const float* v, float* d) {
    const __m256 sign = _mm256_set1_ps(-0.f), huge = _mm256_set1_ps(3.402823466e+38f);
    __m256 x[4], amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        x[i] = _mm256_loadu_ps(v + 8 * i);
        const __m256 a = _mm256_andnot_ps(sign, x[i]);
        amax = _mm256_max_ps(amax, a);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, huge, _CMP_NLE_UQ));  // (NaN or infinite)
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    const bool finite = _mm256_movemask_ps(bad) == 0;
    const __m256 inv = _mm256_set1_ps(top > 0.f && finite ? 127.f / top : 0.f);
    __m256i c[4];
    for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], inv));
    // packing works within 128-bit lanes: its 4-byte groups hold inputs 0-3, 8-11, 16-19, 24-27, 4-7, 12-15, ...
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    *d = finite ? top / 127.f : __builtin_nanf("");
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Pick<n>::fn for n = 1..8 (more: 8), where a kernel is a template on its row or token count: the instance for n
template <template <int> class Pick>
static auto pick(int n) -> decltype(Pick<1>::fn) {
    switch (n) {
        case 1: return Pick<1>::fn;
        case 2: return Pick<2>::fn;
        case 3: return Pick<3>::fn;
        case 4: return Pick<4>::fn;
        case 5: return Pick<5>::fn;
        case 6: return Pick<6>::fn;
        case 7: return Pick<7>::fn;
        default: return Pick<8>::fn;
    }
}

// The (token, slot) pairs of a mixture-of-experts layer grouped by the chunk (expert) each reads, chunk [P] in [0, C):
// in plan (3 * C + 1 + P int64), count[c] is where chunk c's pairs start in `pairs`, order[..used] the chunks that have
// any (used of them; at is spent once they are made).
struct ChunkPlan {
    int64_t *count, *at, *order, *pairs, used;
};
static inline ChunkPlan plan_chunks(const int64_t* chunk, int64_t P, int64_t C, int64_t* plan) {
    ChunkPlan q = {plan, plan + C + 1, plan + 2 * C + 1, plan + 3 * C + 1, 0};
    for (int64_t c = 0; c <= C; c++) q.count[c] = 0;
    for (int64_t p = 0; p < P; p++) q.count[chunk[p] + 1]++;
    for (int64_t c = 0; c < C; c++) q.count[c + 1] += q.count[c];
    for (int64_t c = 0; c < C; c++) q.at[c] = q.count[c];
    for (int64_t p = 0; p < P; p++) q.pairs[q.at[chunk[p]]++] = p;
    for (int64_t c = 0; c < C; c++)
        if (q.count[c + 1] > q.count[c]) q.order[q.used++] = c;
    return q;
}

// A mixture-of-experts layer's quantized experts for every thread of the caller's team (the schedule int8.cpp's and
// int4.cpp's experts_team entries share): step.cpp calls them within its parallel region, and the two passes are
// `omp for` loops bound to it.
// Expert e is row e of `table` (its layers' operands, its width I last, a multiple of 32; a shared expert is one row).
// Token t reads the J chunks chunk[t, :] with weights w[t, :]:
//   h[t, j, :] = silu(gate_e @ x[t]) * (up_e @ x[t]) * w[t, j],   y[t, :] = sum_j down_e @ h[t, j, :],   e = chunk[t, j]
// as float.cpp's experts compute it for stacked float weights. The first pass shares out blocks of 32 intermediate rows
// of every expert in use, each met by every token that chose it, and quantizes each pair's 32 activations into one
// block of its hidden row (shared by the team); the second shares out the output's rows in blocks of 16, each summed
// over the experts in use. F is the weights' format: F::COLUMNS the table's width; f.inputs(k, t) and f.hidden(k, p)
// point activation slot k (of 8) at token t's quantized input or pair p's hidden row; f.product(e, layer, n, K, r0,
// rows, out, ldy) multiplies rows r0.. of expert e's layer (0 gate, 1 up, 2 down; K inputs) by slots 0..n-1 into
// out[k * ldy + r]; f.store(a, p, i0, I) quantizes 32 activations into pair p's hidden row (I wide) at i0. plan:
// 3 * C + 1 + T * J
// int64 of the thread's own.
template <class F>
static void quantized_experts(F& f, int64_t T, int64_t D, const int64_t* chunk, const float* w, int64_t J,
                         const int64_t* table, int64_t C, float* y, int64_t* plan) {
    const ChunkPlan q = plan_chunks(chunk, T * J, C, plan);
    const int64_t *count = q.count, *order = q.order, *pairs = q.pairs, used = q.used, last = F::COLUMNS - 1;
    int64_t* first = q.at;  // first[o]: the first unit (32 intermediate rows) of used chunk o (at is spent)
    int64_t units = 0;
    for (int64_t o = 0; o < used; o++) first[o] = units, units += table[order[o] * F::COLUMNS + last] / 32;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        int64_t o = 0;
        while (o + 1 < used && first[o + 1] <= u) o++;
        const int64_t c = order[o], i0 = (u - first[o]) * 32, I = table[c * F::COLUMNS + last];
        for (int64_t p0 = count[c]; p0 < count[c + 1]; p0 += 8) {
            const int64_t n = count[c + 1] - p0 < 8 ? count[c + 1] - p0 : 8;
            float g[8 * 32], up[8 * 32], a[32];
            for (int64_t k = 0; k < n; k++) f.inputs((int)k, pairs[p0 + k] / J);
            f.product(c, 0, n, D, i0, 32, g, 32);
            f.product(c, 1, n, D, i0, 32, up, 32);
            for (int64_t k = 0; k < n; k++) {
                const int64_t p = pairs[p0 + k];
                for (int i = 0; i < 32; i++) {
                    const float v = g[k * 32 + i];
                    a[i] = v / (1.f + expf(-v)) * up[k * 32 + i] * w[p];
                }
                f.store(a, p, i0, I);
            }
        }
    }
#pragma omp for schedule(static)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {  // the output's rows, each block summed over the experts in use
        const int64_t n_rows = D - d0 < 16 ? D - d0 : 16;
        for (int64_t t = 0; t < T; t++)
            for (int64_t d = d0; d < d0 + n_rows; d++) y[t * D + d] = 0.f;
        for (int64_t o = 0; o < used; o++) {
            const int64_t c = order[o], I = table[c * F::COLUMNS + last];
            for (int64_t p0 = count[c]; p0 < count[c + 1]; p0 += 8) {
                const int64_t n = count[c + 1] - p0 < 8 ? count[c + 1] - p0 : 8;
                float part[8 * 16];
                for (int64_t k = 0; k < n; k++) f.hidden((int)k, pairs[p0 + k]);
                f.product(c, 2, n, I, d0, n_rows, part, 16);
                for (int64_t k = 0; k < n; k++) {
                    float* out = y + pairs[p0 + k] / J * D + d0;
                    for (int64_t r = 0; r < n_rows; r++) out[r] += part[k * 16 + r];
                }
            }
        }
    }
}

// the bytes of one row of K inputs quantized for int4.cpp's products (its Acts says what they hold)
static inline int64_t int4_acts_bytes(int64_t K) { return K + 6 * (K / 32) * (int64_t)sizeof(float); }

// One product of an int4 call: y [M, N] = x [M, K] @ W.T, M <= 8, W as int4.cpp describes it.
struct Int4Product {
    const float* x;
    int64_t M, K;
    const uint8_t* w;
    const uint8_t* s;   // scale codes [N, K/32]
    const int8_t* z;    // zero codes [N, K/32]
    const float* u;     // [N, 2]: each row's scale unit and zero unit
    int64_t N;
    float* y;
};

extern "C" int nanoseek_int4_linear_many(const Int4Product* p, int64_t count, int isa);
extern "C" int nanoseek_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint8_t* s,
                                    const int8_t* z, const float* u, int64_t N, float* y, int isa);
extern "C" int nanoseek_mla_product(int value, const float* x, int64_t xh, int64_t xr, const uint16_t* w, float* y,
                                    int64_t yh, int64_t yr, int64_t H, int64_t M, int64_t d, int64_t dv, int64_t c,
                                    int isa);
extern "C" int nanoseek_mla_key_int4(const float* q, int64_t qh, int64_t qr, const uint8_t* w, const uint8_t* s,
                                     const int8_t* z, const float* u, float* y, int64_t yh, int64_t yr, int64_t H,
                                     int64_t M, int64_t d, int64_t dv, int64_t c, int isa);
// Attention over cached rows for a few query rows, in one pass (mla.cpp): for query row j of batch row b (J = S * H
// rows, j = s * H + h), its scores against the T cached rows past[b] and the S new ones fresh[b] (keys of w numbers),
// masked by mask[b / G, s] (T + S bytes, 0: not attended), softmaxed, and the c values they weigh summed into out[b, j]:
// MLA's latents (the value the key row's own first c numbers: pv = fv = 0) or GQA's keys and values (c = w, the value
// row pv or fv elements after its key row). Strides in elements, each row's numbers adjacent; q, fresh and out fp32.
struct LatentAttention {
    const float* q;        // row j of batch row b at b * qb + j * qj
    int64_t qb, qj;
    const void* past;      // key t of batch row b at b * pb + t * pt; kind 0: fp32, 1: IEEE fp16, 2: bf16
    int64_t pb, pt, pv;
    int kind;
    const float* fresh;    // key s at b * fb + s * fs
    int64_t fb, fs, fv;
    const uint8_t* mask;   // [B / G, S, T + S] contiguous
    int64_t G, B, S, H, T, c, w;
    float scale;
    float* out;            // [B, J, c]: b * ob + j * oj
    int64_t ob, oj;
    // (team calls only) each task's cached latents shared out in this many parts, every part's running softmax kept in
    // `parts` ([tasks, splits, rows, c + 2] floats: a thread's part of a long context when there are fewer tasks than
    // threads) and merged after; 0 or 1: none
    int64_t splits;
    float* parts;
};
extern "C" int nanoseek_latent_attention(const LatentAttention* a, int isa);
extern "C" int nanoseek_latent_attention_team(const LatentAttention* a, int64_t rows, int isa);
extern "C" int nanoseek_float_linear(const float* x, int64_t M, int64_t K, const void* w, int bf16, int64_t N,
                                     float* y, int isa);
extern "C" int nanoseek_float_experts(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                      int64_t J, const float* gate_up, const float* down, int64_t C, int64_t I, float* y,
                                      int isa);
extern "C" void nanoseek_float_linear_part(const float* x, int64_t M, int64_t K, const void* w, int bf16, int64_t N,
                                           float* y, int64_t n0, int64_t n1, int isa);
extern "C" int nanoseek_float_experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                           int64_t J, const void* gate_up, const void* down, int bf16, int64_t C,
                                           int64_t I, float* y, float* h, int64_t* plan, int isa);
extern "C" int nanoseek_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
                                    float* y);
extern "C" void nanoseek_int8_quantize(const float* x, int64_t M, int64_t K, int8_t* xq, float* d);
extern "C" void nanoseek_int8_linear_part(const int8_t* const* xq, const float* const* d, int64_t M, int64_t K,
                                          const int8_t* w, const float* scale, float* y, int64_t ldy, int64_t n0,
                                          int64_t n1);
extern "C" void nanoseek_int8_experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                           int64_t J, const int64_t* table, int64_t C, int64_t Imax, float* y,
                                           int8_t* hq, float* hd, int8_t* xq, float* xd, int64_t* plan,
                                           const void** slots);
extern "C" void nanoseek_int4_quantize(const float* x, int64_t M, int64_t K, char* acts);
extern "C" void nanoseek_int4_linear_part(const char* const* acts, int64_t M, int64_t K, const uint8_t* w,
                                          const uint8_t* s, const int8_t* z, const float* u, float* y, int64_t ldy,
                                          int64_t n0, int64_t n1, int isa);
extern "C" void nanoseek_int4_experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                           int64_t J, const int64_t* table, int64_t C, int64_t Imax, float* y, char* h,
                                           char* xq, int64_t* plan, const char** slots, int isa);
extern "C" int nanoseek_mla_key_int4_team(const float* q, int64_t qh, int64_t qr, const uint8_t* w, const uint8_t* s,
                                          const int8_t* z, const float* u, float* y, int64_t yh, int64_t yr, int64_t H,
                                          int64_t M, int64_t d, int64_t dv, int64_t c, int isa);
// a whole decode step of a small MLA model with float weights (step.cpp says what the table and numbers hold)
extern "C" int nanoseek_mla_step(const int64_t* table, int64_t n_table, const double* numbers, int64_t n_numbers,
                                 const int64_t* ids, int64_t B, void* kv, int kind, int64_t rows, int64_t max_len,
                                 int64_t first_row, int64_t* lengths, float* logits, int isa);
