// MLA's absorbed products while decoding (see nanoseek/model/attention.py, MLA.absorbed_attention), for a few
// rows of fp32 activations against kv_b_proj's weight kept in bf16: w [H, d + dv, c], per head its key half
// w_uk (rows 0..d-1) and its value half w_uv (rows d..d+dv-1), each row c long.
//   key:   y [H, M, c]  = q [H, M, d] @ w_uk     (each query into the latent space)
//   value: y [H, M, dv] = o [H, M, c] @ w_uv.T   (each latent output back to the head's values)
// x and y are read and written where they lie: row m of head h at h * head + m * row (their own strides), so the
// caller's [M, H, *] tensors need no transposed copies.
// torch has no product of fp32 activations with bf16 weights on a CPU, and its fp32 batched products of
// this shape read the (twice as large) fp32 weight at 12-30 GB/s. Here the heads are split between the
// threads and each weight element is read once and widened to fp32 (a bf16 is the top half of an fp32).
// With AVX-512 (and c a multiple of 32): the key product takes the latent width 32 columns at a time for
// every row of q, the head's d weight rows streaming by, and the value product each weight row against every
// row of o, all in registers. Otherwise plain loops, which the compiler vectorizes for AVX2 + FMA: each weight
// row widened into a buffer that stays in L1, then met by every row of activations.
//
// kv_b_proj in int4 (nanoseek's layout, int4.cpp: codes w [H * (d + dv), c/2], scale codes s and zero codes z
// [H * (d + dv), c/32], units u [H * (d + dv), 2]): the key product is `nanoseek_mla_key_int4` below, the value
// product int4.cpp's (each head's dv value rows a product of its own, the caller's). With g = k / 32 the group of
// column k, each weight is W[r, k] = u[r, 0] * s[r, g] * code[r, k] + u[r, 1] * z[r, g], so
//   y[m, k] = sum_r (q[m, r] * u[r, 0] * s[r, g]) * code[r, k] + sum_r q[m, r] * u[r, 1] * z[r, g],
// the second sum (a number per row and group) taken apart and added at the end.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "kernels.h"

#define MAX_ROWS 8
#define MAX_C 1024  // the latent width c (kv_lora_rank) at most: DeepSeek-V2/V3 have 512
#define GROUP 32  // int4: inputs per scale and zero
#define PREFETCH_ROWS 8  // int4 key product: rows asked into cache this far ahead

#define INLINE static inline __attribute__((always_inline))

INLINE void widen(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        uint32_t u = (uint32_t)src[k] << 16;
        memcpy(dst + k, &u, 4);
    }
}

// one head: q [M, d] (rows qr apart), w its [d + dv, c] rows, y [M, c] (rows yr apart; held in L1 while the rows
// stream by)
INLINE void key_head(const float* q, int64_t qr, const uint16_t* w, float* y, int64_t yr, int64_t M, int64_t d,
                     int64_t c) {
    float row[MAX_C];
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < c; k++) y[m * yr + k] = 0.f;
    for (int64_t r = 0; r < d; r++) {
        widen(w + r * c, row, c);
        for (int64_t m = 0; m < M; m++) {
            const float a = q[m * qr + r];
            float* ym = y + m * yr;
            for (int64_t k = 0; k < c; k++) ym[k] += a * row[k];
        }
    }
}

// one head: o [M, c] (rows orr apart), w its [d + dv, c] rows, y [M, dv] (rows yr apart)
INLINE void value_head(const float* o, int64_t orr, const uint16_t* w, float* y, int64_t yr, int64_t M, int64_t d,
                       int64_t dv, int64_t c) {
    float row[MAX_C];
    for (int64_t j = 0; j < dv; j++) {
        widen(w + (d + j) * c, row, c);
        for (int64_t m = 0; m < M; m++) {
            const float* om = o + m * orr;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < c; k++) s += om[k] * row[k];
            y[m * yr + j] = s;
        }
    }
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))
AVX2 static void head_avx2(int value, const float* x, int64_t xr, const uint16_t* w, float* y, int64_t yr, int64_t M,
                           int64_t d, int64_t dv, int64_t c) {
    if (value)
        value_head(x, xr, w, y, yr, M, d, dv, c);
    else
        key_head(x, xr, w, y, yr, M, d, c);
}

AVX512 INLINE __m512 bf16x16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// one head's key product: y [M, c] 16 * V columns at a time (V vectors per row of q in registers), the head's d
// weight rows streaming by, each row's V * 32 bytes read in one run
template <int M, int V>
AVX512 static void key_avx512(const float* q, int64_t qr, const uint16_t* w, float* y, int64_t yr, int64_t d, int64_t c) {
    for (int64_t k = 0; k < c; k += 16 * V) {
        __m512 acc[M][V];
        for (int m = 0; m < M; m++)
            for (int v = 0; v < V; v++) acc[m][v] = _mm512_setzero_ps();
        for (int64_t r = 0; r < d; r++) {
            __m512 a[M];
            for (int m = 0; m < M; m++) a[m] = _mm512_set1_ps(q[m * qr + r]);
            for (int v = 0; v < V; v++) {
                const __m512 wv = bf16x16(w + r * c + k + 16 * v);
                for (int m = 0; m < M; m++) acc[m][v] = _mm512_fmadd_ps(a[m], wv, acc[m][v]);
            }
        }
        for (int m = 0; m < M; m++)
            for (int v = 0; v < V; v++) _mm512_storeu_ps(y + m * yr + k + 16 * v, acc[m][v]);
    }
}

// one head's value product: y [M, dv], each of the head's dv value rows against every row of o
template <int M>
AVX512 static void value_avx512(const float* o, int64_t orr, const uint16_t* w, float* y, int64_t yr, int64_t d,
                                int64_t dv, int64_t c) {
    for (int64_t j = 0; j < dv; j++) {
        const uint16_t* row = w + (d + j) * c;
        __m512 acc[M][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        for (int64_t k = 0; k < c; k += 32) {
            const __m512 w0 = bf16x16(row + k), w1 = bf16x16(row + k + 16);
            for (int m = 0; m < M; m++) {
                acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(o + m * orr + k), w0, acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(o + m * orr + k + 16), w1, acc[m][1]);
            }
        }
        for (int m = 0; m < M; m++) y[m * yr + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    }
}

// one head's product on AVX-512, the row count a constant of the loops
// (the key product's width: as many of a row's columns at a time as leave registers for the M rows, where c has them;
// at one row V = 16 read DeepSeek-V2-Lite's key halves at 24 GB/s, V = 2 at 19)
template <int M>
AVX512 static void head_avx512(int value, const float* x, int64_t xr, const uint16_t* w, float* y, int64_t yr, int64_t d,
                               int64_t dv, int64_t c) {
    constexpr int V = M == 1 ? 16 : M == 2 ? 8 : M <= 4 ? 4 : 2;
    if (value)
        value_avx512<M>(x, xr, w, y, yr, d, dv, c);
    else if (c % (16 * V) == 0)
        key_avx512<M, V>(x, xr, w, y, yr, d, c);
    else
        key_avx512<M, 2>(x, xr, w, y, yr, d, c);
}

typedef void (*HeadFn)(int, const float*, int64_t, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t);
static const HeadFn HEAD_AVX512[MAX_ROWS] = {head_avx512<1>, head_avx512<2>, head_avx512<3>, head_avx512<4>,
                                             head_avx512<5>, head_avx512<6>, head_avx512<7>, head_avx512<8>};

// value = 0: the key product (x = q [H, M, d], y [H, M, c]); 1: the value product (x = o [H, M, c], y [H, M, dv]),
// row m of head h at h * xh + m * xr in x (h * yh + m * yr in y). isa: 2 = AVX-512, 1 = AVX2. Returns 0, or 1 for
// arguments it does not take (c at most MAX_C).
extern "C" int nanoseek_mla_product(int value, const float* x, int64_t xh, int64_t xr, const uint16_t* w, float* y,
                                    int64_t yh, int64_t yr, int64_t H, int64_t M, int64_t d, int64_t dv, int64_t c,
                                    int isa) {
    if (M < 1 || M > MAX_ROWS || c < 1 || c > MAX_C || d < 1 || dv < 1 || (isa != 1 && isa != 2)) return 1;
    const bool wide = isa == 2 && c % 32 == 0;
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < H; h++) {
        const uint16_t* wh = w + h * (d + dv) * c;
        if (wide)
            HEAD_AVX512[M - 1](value, x + h * xh, xr, wh, y + h * yh, yr, d, dv, c);
        else
            head_avx2(value, x + h * xh, xr, wh, y + h * yh, yr, M, d, dv, c);
    }
    return 0;
}

// ---- kv_b_proj in int4 ----

// the zero part of one head's key product (see the top): off [M, c/32] = sum_r q[m, r] * u[r, 1] * z[r, g]
INLINE void key_offsets_int4(const float* q, int64_t qr, const int8_t* z, const float* u, float* off, int64_t M,
                             int64_t d, int64_t G) {
    for (int64_t i = 0; i < M * G; i++) off[i] = 0.f;
    for (int64_t r = 0; r < d; r++)
        for (int64_t m = 0; m < M; m++) {
            const float a = q[m * qr + r] * u[2 * r + 1];
            for (int64_t g = 0; g < G; g++) off[m * G + g] += a * z[r * G + g];
        }
}

// one head's key product, less its zero part, on AVX2: a group (32 columns) at a time for each row of q, the head's d
// key rows of that group (16 bytes each, in L1 after the first row of q) streaming by; a row's scale folded into the
// query's number, its bytes widened to 8 int32 lanes whose low nibbles are its even columns and high nibbles its odd
// ones, summed apart and interleaved when stored. (Plain loops that dequantized each row into a buffer, which the
// compiler vectorized poorly, were 19% of a DeepSeek-V2-Lite int4 token, eagerly on a 2-vCPU Zen3.)
AVX2 static void key_head_int4_avx2(const float* q, int64_t qr, const uint8_t* w, const uint8_t* s, const float* u,
                                    float* y, int64_t yr, int64_t M, int64_t d, int64_t c) {
    const int64_t G = c / GROUP, CB = c / 2;
    const __m256i nibble = _mm256_set1_epi32(15);
    for (int64_t g = 0; g < G; g++)
        for (int64_t m = 0; m < M; m++) {
            __m256 even[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, odd[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t r = 0; r < d; r++) {
                const uint8_t* wr = w + r * CB + g * (GROUP / 2);
                const __m256 a = _mm256_set1_ps(q[m * qr + r] * (u[2 * r] * (float)s[r * G + g]));
                for (int h = 0; h < 2; h++) {  // bytes 0-7 (columns 0-15), then 8-15 (columns 16-31)
                    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wr + 8 * h)));
                    even[h] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_and_si256(b, nibble)), even[h]);
                    odd[h] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), odd[h]);
                }
            }
            float* ym = y + m * yr + g * GROUP;
            for (int h = 0; h < 2; h++) {  // lanes j of even and odd are columns 2j and 2j + 1
                const __m256 lo = _mm256_unpacklo_ps(even[h], odd[h]), hi = _mm256_unpackhi_ps(even[h], odd[h]);
                _mm256_storeu_ps(ym + 16 * h, _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(ym + 16 * h + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
            }
        }
}

// one head's key product on AVX-512: V groups (32 columns) at a time for every row of q, the head's d key rows
// streaming by. A group's 16 bytes widen to 16 int32 lanes whose low nibbles are its even columns and high nibbles
// its odd ones: the two halves are summed apart and interleaved when stored.
template <int M, int V>
AVX512 static void key_int4_avx512(const float* q, int64_t qr, const uint8_t* w, const uint8_t* s, const float* u,
                                   float* y, int64_t yr, int64_t d, int64_t c) {
    const int64_t G = c / GROUP, CB = c / 2;
    const __m512i nibble = _mm512_set1_epi32(15);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t g0 = 0; g0 < G; g0 += V) {
        __m512 even[M][V], odd[M][V];
        for (int m = 0; m < M; m++)
            for (int v = 0; v < V; v++) even[m][v] = odd[m][v] = _mm512_setzero_ps();
        for (int64_t r = 0; r < d; r++) {
            const uint8_t* wr = w + r * CB + g0 * (GROUP / 2);
            const uint8_t* sr = s + r * G + g0;
            const float su = u[2 * r];
            __m512 a[M];
            for (int m = 0; m < M; m++) a[m] = _mm512_set1_ps(q[m * qr + r]);
            if (g0 == 0)  // the first pass over the rows brings them in: rows PREFETCH_ROWS ahead asked for now
                for (int64_t at = 0; at < CB; at += 64) _mm_prefetch((const char*)(w + (r + PREFETCH_ROWS) * CB + at), _MM_HINT_T0);
            for (int v = 0; v < V; v++) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wr + v * (GROUP / 2))));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, nibble));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                const float scale = su * (float)sr[v];
                if (M == 1) {  // the group's scale folded into the query's one number
                    const __m512 as = _mm512_set1_ps(q[r] * scale);
                    even[0][v] = _mm512_fmadd_ps(as, lo, even[0][v]);
                    odd[0][v] = _mm512_fmadd_ps(as, hi, odd[0][v]);
                } else {
                    const __m512 sv = _mm512_set1_ps(scale), slo = _mm512_mul_ps(lo, sv), shi = _mm512_mul_ps(hi, sv);
                    for (int m = 0; m < M; m++) {
                        even[m][v] = _mm512_fmadd_ps(a[m], slo, even[m][v]);
                        odd[m][v] = _mm512_fmadd_ps(a[m], shi, odd[m][v]);
                    }
                }
            }
        }
        for (int m = 0; m < M; m++)
            for (int v = 0; v < V; v++) {
                float* at = y + m * yr + (g0 + v) * GROUP;
                _mm512_storeu_ps(at, _mm512_permutex2var_ps(even[m][v], first, odd[m][v]));
                _mm512_storeu_ps(at + 16, _mm512_permutex2var_ps(even[m][v], second, odd[m][v]));
            }
    }
}

// (as many groups at a time as leave registers for the M rows: 2 * M * V accumulators)
template <int M>
AVX512 static void key_head_int4_avx512(const float* q, int64_t qr, const uint8_t* w, const uint8_t* s, const float* u,
                                        float* y, int64_t yr, int64_t d, int64_t c) {
    constexpr int V = M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1;
    if ((c / GROUP) % V == 0)
        key_int4_avx512<M, V>(q, qr, w, s, u, y, yr, d, c);
    else
        key_int4_avx512<M, 1>(q, qr, w, s, u, y, yr, d, c);
}

typedef void (*KeyInt4Fn)(const float*, int64_t, const uint8_t*, const uint8_t*, const float*, float*, int64_t, int64_t,
                          int64_t);
static const KeyInt4Fn KEY_INT4_AVX512[MAX_ROWS] = {
    key_head_int4_avx512<1>, key_head_int4_avx512<2>, key_head_int4_avx512<3>, key_head_int4_avx512<4>,
    key_head_int4_avx512<5>, key_head_int4_avx512<6>, key_head_int4_avx512<7>, key_head_int4_avx512<8>};

// The key product against kv_b_proj in int4 (see the top): q [H, M, d] -> y [H, M, c], row m of head h at
// h * qh + m * qr in q (h * yh + m * yr in y), for every thread of the caller's team (its heads, and runs of 8 rows, shared
// out by an `omp for` bound to the caller's parallel region; one thread alone outside one). isa: 2 = AVX-512, 1 = AVX2.
// Returns 0, or 1 for arguments it does not take (c a multiple of 32, at most MAX_C).
extern "C" int nanoseek_mla_key_int4_team(const float* q, int64_t qh, int64_t qr, const uint8_t* w, const uint8_t* s,
                                          const int8_t* z, const float* u, float* y, int64_t yh, int64_t yr, int64_t H,
                                          int64_t M, int64_t d, int64_t dv, int64_t c, int isa) {
    if (M < 1 || c < GROUP || c > MAX_C || c % GROUP || d < 1 || dv < 1 || (isa != 1 && isa != 2)) return 1;
    const int64_t G = c / GROUP, runs = (M + MAX_ROWS - 1) / MAX_ROWS;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < H * runs; task++) {
        const int64_t h = task / runs, m0 = task % runs * MAX_ROWS, n = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
        const int64_t row0 = h * (d + dv);  // the head's first key row
        const float* qh_ = q + h * qh + m0 * qr;
        float* yh_ = y + h * yh + m0 * yr;
        const uint8_t *wh = w + row0 * (c / 2), *sh = s + row0 * G;
        const int8_t* zh = z + row0 * G;
        const float* uh = u + 2 * row0;
        if (isa == 2)
            KEY_INT4_AVX512[n - 1](qh_, qr, wh, sh, uh, yh_, yr, d, c);
        else
            key_head_int4_avx2(qh_, qr, wh, sh, uh, yh_, yr, n, d, c);
        float off[MAX_ROWS * (MAX_C / GROUP)];
        key_offsets_int4(qh_, qr, zh, uh, off, n, d, G);
        for (int64_t m = 0; m < n; m++)
            for (int64_t k = 0; k < c; k++) yh_[m * yr + k] += off[m * G + k / GROUP];
    }
    return 0;
}

// the same for a caller without a team of threads (M at most MAX_ROWS): one of its own
extern "C" int nanoseek_mla_key_int4(const float* q, int64_t qh, int64_t qr, const uint8_t* w, const uint8_t* s,
                                     const int8_t* z, const float* u, float* y, int64_t yh, int64_t yr, int64_t H,
                                     int64_t M, int64_t d, int64_t dv, int64_t c, int isa) {
    if (M > MAX_ROWS) return 1;
    int code = 0;
#pragma omp parallel
    {
        const int mine = nanoseek_mla_key_int4_team(q, qh, qr, w, s, z, u, y, yh, yr, H, M, d, dv, c, isa);
#pragma omp single
        code = mine;
    }
    return code;
}

// ---- the attention over the latents ----
// Between the two products: for row j of batch row b (J = S * H query rows, j = s * H + h, each a query in the latent
// space with its rotary part, w = c + r numbers), its scores against the T cached latents past[b] and the S new ones
// fresh[b] (each w numbers, c_kv then k_pe), masked by mask[b, s] (T + S bools, false: not attended), softmaxed, and
// the latents' first c numbers weighed by them: out[b, j] (c numbers). One pass over the latents, 16 at a time (8 with
// AVX2): their scores for up to 8 rows of one batch row, those rows' running maximum and sum updated (what was weighed
// so far rescaled when the maximum grows: flash attention's softmax), then their weighted latents, read again from L1.
// torch's batched products read the latents twice from memory, with a softmax and its masking between: a shipped-model
// layer's absorbed attention for 8 rows at 1,960 cached tokens took 490 against 910 us (Zen4, eager), and its compiled
// decode step at batch 8 after 1,950 tokens decoded 1,960-1,980 tok/s against 1,150-1,250. With AVX-512 the query rows
// go four at a time through each block (each latent loaded once for four rows): 8 batch rows x 4 heads at 1,950 cached
// tokens (the shipped shape) 326-329 against 437-439 us.
// The cached latents are fp32, IEEE fp16 (a half-precision cache, KVCache's default on a CPU: half the bytes to read
// and to keep) or bf16, widened to fp32 as they are loaded (F16C; a bf16 is the top half of an fp32); queries, scores and
// sums stay fp32. The template parameter L is the latents' element: float, uint16_t holding fp16 bits, or Bf16.
// The same pass serves grouped-query attention (GQA.cached_attention, the Qwen2/Qwen3/Llama derivatives): there a
// batch row is one key-value head of one sequence, its rows the query heads of that group, the keys its cached keys
// and the values its cached values, rows a fixed distance (pv, fv) after the keys; G such batch rows share one
// sequence's mask. On a 2-vCPU Zen4, an R1-Distill-Qwen-1.5B layer (12 heads over 2, d = 128) at 8 sequences x 2,000
// cached tokens: see GQA.cached_attention.
#define LATENT_BLOCK 16  // latents a block with AVX-512
#define LATENT_BLOCK_AVX2 16
#define LATENT_ROWS 8

AVX512 INLINE __m512 exp_avx512(__m512 x) {  // e^x for x <= 0 (-inf gives 0); relative error ~2e-7
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);  // 2^f, |f| <= 0.5: Taylor to degree 6 in f * ln 2
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022651f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), p, n);
}

// 16 vectors' sums, as one vector (lane i: the sum of v[i]'s lanes): pairs of vectors folded into one, their lanes
// added in pairs, four times over
AVX512 INLINE __m512 sums16(__m512* v) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int n = 16; n > 1; n /= 2)
        for (int i = 0; i < n / 2; i++)
            v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], even, v[2 * i + 1]),
                                 _mm512_permutex2var_ps(v[2 * i], odd, v[2 * i + 1]));
    return v[0];
}

#define LATENT_WIDTH (MAX_C + 128)  // c + r at most
static const float ZERO_ROW[LATENT_WIDTH] = {};  // a block's rows past the last latent (zero bits: 0 in fp32 and fp16)

// 16 of a latent's numbers as fp32 (where the mask says, else 0)
struct Bf16 {  // a bf16 number's bits (the top half of an fp32)
    uint16_t bits;
};
AVX512 INLINE __m512 lat16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 INLINE __m512 lat16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
AVX512 INLINE __m512 lat16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
AVX512 INLINE __m512 lat16(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
AVX512 INLINE __m512 lat16(const Bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
AVX512 INLINE __m512 lat16(const Bf16* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// What both instruction sets share: each query row's running softmax (its maximum m, its sum l and the latents it
// weighed, acc) for up to LATENT_ROWS rows, and the queries' rows with their mask
struct LatentRows {
    const float* q;
    const uint8_t* mask;
    int64_t qj, j0, nj, N, H, c, w;
    float scale;
    float m[LATENT_ROWS], l[LATENT_ROWS];
    alignas(64) float acc[LATENT_ROWS][MAX_C];  // (left uninitialised here: `start` clears what is used)

    LatentRows(const float* q, const uint8_t* mask, int64_t qj, int64_t j0, int64_t nj, int64_t N, int64_t H, int64_t c,
               int64_t w, float scale)
        : q(q), mask(mask), qj(qj), j0(j0), nj(nj), N(N), H(H), c(c), w(w), scale(scale) {}

    __attribute__((always_inline)) void start(int64_t rows, int64_t step) {  // (acc cleared to a multiple of the weighted sums' step)
        for (int64_t j = 0; j < rows; j++) {
            m[j] = -INFINITY;
            l[j] = 0.f;
            for (int64_t k = 0; k < (c + step - 1) / step * step; k++) acc[j][k] = 0.f;
        }
    }
    // row j's maximum after a block whose own is `top`: what was weighed so far rescaled when it grows; false while
    // the row has attended nothing
    __attribute__((always_inline)) bool raise(int64_t j, float top) {
        top = fmaxf(top, m[j]);
        if (top == -INFINITY) return false;
        if (top > m[j] && m[j] != -INFINITY) {
            const float alpha = expf(m[j] - top);
            l[j] *= alpha;
            for (int64_t k = 0; k < c; k++) acc[j][k] *= alpha;
        }
        m[j] = top;
        return true;
    }
    __attribute__((always_inline)) void finish(float* out, int64_t oj) const {
        for (int64_t j = 0; j < nj; j++) {
            const float inv = 1.f / l[j];  // (no position attended: 0 / 0, NaN, as a softmax over nothing gives)
            for (int64_t k = 0; k < c; k++) out[(j0 + j) * oj + k] = acc[j][k] * inv;
        }
    }
};

// a block's rows: `block` of them from row t0 of latents `stride` apart, n real (the others read zeros)
template <typename R>
INLINE void block_rows(const R** rows, const R* latents, int64_t stride, int64_t t0, int64_t n, int block) {
    for (int i = 0; i < block; i++) rows[i] = i >= n ? (const R*)ZERO_ROW : latents + (t0 + i) * stride;
}

// One block of LATENT_BLOCK latents (n real, at position t0 of the T + S attended; `rows` the keys, `vals` the values
// they weigh) for rows j0..j0 + nj - 1 (nj <= LATENT_ROWS) of a batch row. The rows go four at a time (rows past nj repeat the last one; their results are
// dropped), so each latent read from L1 meets four query rows: for the scores four latents at a time (4 x 4 sums), for
// the weighted latents 64 numbers of four rows
template <typename R>
AVX512 static void latent_block_avx512(LatentRows& r, const R* const* rows, const R* const* vals, int64_t t0, int64_t n) {
    const int64_t groups = (r.nj + 3) / 4, w = r.w, c = r.c;
    alignas(64) float p[LATENT_ROWS][LATENT_BLOCK];
    alignas(64) float sc[LATENT_ROWS][LATENT_BLOCK];
    const __mmask16 wtail = (__mmask16)((1u << (w % 16)) - 1), in = (__mmask16)((1u << n) - 1);
    for (int64_t g = 0; g < groups; g++) {  // the block's scores, four rows by four latents
        const float* qr[4];
        for (int u = 0; u < 4; u++) qr[u] = r.q + (r.j0 + (4 * g + u < r.nj ? 4 * g + u : r.nj - 1)) * r.qj;
        for (int i0 = 0; i0 < LATENT_BLOCK; i0 += 4) {
            __m512 dot[16];  // dot[u * 4 + i]: row u, latent i0 + i
            for (int e = 0; e < 16; e++) dot[e] = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= w; k += 16) {
                __m512 lat[4];
                for (int i = 0; i < 4; i++) lat[i] = lat16(rows[i0 + i] + k);
                for (int u = 0; u < 4; u++) {
                    const __m512 qk = _mm512_loadu_ps(qr[u] + k);
                    for (int i = 0; i < 4; i++) dot[u * 4 + i] = _mm512_fmadd_ps(qk, lat[i], dot[u * 4 + i]);
                }
            }
            if (wtail) {
                __m512 lat[4];
                for (int i = 0; i < 4; i++) lat[i] = lat16(rows[i0 + i] + k, wtail);
                for (int u = 0; u < 4; u++) {
                    const __m512 qk = _mm512_maskz_loadu_ps(wtail, qr[u] + k);
                    for (int i = 0; i < 4; i++) dot[u * 4 + i] = _mm512_fmadd_ps(qk, lat[i], dot[u * 4 + i]);
                }
            }
            alignas(64) float sums[16];
            _mm512_store_ps(sums, sums16(dot));
            for (int u = 0; u < 4; u++)
                for (int i = 0; i < 4; i++) sc[4 * g + u][i0 + i] = sums[u * 4 + i];
        }
    }
    const __m512 neg = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < r.nj; j++) {
        const __mmask16 seen = _mm_mask_cmpneq_epi8_mask(
            in, _mm_maskz_loadu_epi8(in, r.mask + ((r.j0 + j) / r.H) * r.N + t0), _mm_setzero_si128());  // attended
        const __m512 v = _mm512_mask_mul_ps(neg, seen, _mm512_load_ps(sc[j]), _mm512_set1_ps(r.scale));
        // the softmax's running maximum and sum; the block's weights
        if (!r.raise(j, _mm512_reduce_max_ps(v))) {  // nothing attended yet
            _mm512_store_ps(p[j], _mm512_setzero_ps());
            continue;
        }
        const __m512 e = exp_avx512(_mm512_sub_ps(v, _mm512_set1_ps(r.m[j])));
        r.l[j] += _mm512_reduce_add_ps(e);
        _mm512_store_ps(p[j], e);
    }
    for (int64_t j = r.nj; j < 4 * groups; j++) _mm512_store_ps(p[j], _mm512_setzero_ps());  // (the repeated rows)
    for (int64_t k = 0; k < c; k += 64) {  // the block's weighted latents, 64 of a row's numbers for four rows
        __mmask16 part[4];
        for (int v = 0; v < 4; v++) {
            const int64_t left = c - k - 16 * v;
            part[v] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
        }
        for (int64_t g = 0; g < groups; g++) {
            __m512 a[4][4];
            for (int u = 0; u < 4; u++)
                for (int v = 0; v < 4; v++) a[u][v] = _mm512_load_ps(r.acc[4 * g + u] + k + 16 * v);
            for (int i = 0; i < LATENT_BLOCK; i++) {
                __m512 lat[4];
                for (int v = 0; v < 4; v++) lat[v] = lat16(vals[i] + k + 16 * v, part[v]);
                for (int u = 0; u < 4; u++) {
                    const __m512 pv = _mm512_set1_ps(p[4 * g + u][i]);
                    for (int v = 0; v < 4; v++) a[u][v] = _mm512_fmadd_ps(pv, lat[v], a[u][v]);
                }
            }
            for (int u = 0; u < 4; u++)
                for (int v = 0; v < 4; v++) _mm512_store_ps(r.acc[4 * g + u] + k + 16 * v, a[u][v]);
        }
    }
}

// The same with AVX2: 8 latents at a time, 8 numbers a vector.
AVX2 INLINE __m256 exp_avx2(__m256 x) {  // e^x for x <= 0 (-inf gives 0, below -87 ~1e-38); relative error ~2e-7
    const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(1.44269504f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.5403530e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022651f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.69314718f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
}

AVX2 INLINE __m256 sums8(const __m256* v) {  // lane i: the sum of v[i]'s lanes
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

AVX2 INLINE float hmax_avx2(__m256 v) {  // the largest of v's lanes
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

AVX2 INLINE __m256i lanes_below(int64_t n) {  // maskload's mask: lanes 0..n-1
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// the first n (at most 8; none when n <= 0) of 8 numbers of a latent as fp32, the others 0
AVX2 INLINE __m256 lat8(const float* p, int64_t n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_below(n > 0 ? n : 0));
}
AVX2 INLINE __m256 lat8(const uint16_t* p, int64_t n) {
    if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    alignas(16) uint16_t part[8] = {};
    if (n > 0) memcpy(part, p, n * sizeof(uint16_t));
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)part));
}
AVX2 INLINE __m256 lat8(const Bf16* p, int64_t n) {
    alignas(16) uint16_t part[8] = {};
    if (n < 8 && n > 0) memcpy(part, p, n * sizeof(uint16_t));
    const __m128i bits = n >= 8 ? _mm_loadu_si128((const __m128i*)p) : _mm_load_si128((const __m128i*)part);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// one block of 16 latents (n real, at position t0) for the rows j0..j0 + nj - 1, four rows at a time (rows past nj
// repeat the last one; their results are dropped), so each latent converted from the cache's precision meets four
// query rows: the scores two latents at a time (4 x 2 sums), the weighted latents 16 numbers of four rows at a time
template <typename R>
AVX2 static void latent_block_avx2(LatentRows& r, const R* const* rows, const R* const* vals, int64_t t0, int64_t n) {
    constexpr int BLOCK = LATENT_BLOCK_AVX2;
    const int64_t groups = (r.nj + 3) / 4, w = r.w, c = r.c;
    alignas(32) float p[LATENT_ROWS][BLOCK];
    alignas(32) float sc[LATENT_ROWS][BLOCK];
    const __m256i wtail = lanes_below(w % 8);
    for (int64_t g = 0; g < groups; g++) {
        const float* qr[4];
        for (int u = 0; u < 4; u++) qr[u] = r.q + (r.j0 + (4 * g + u < r.nj ? 4 * g + u : r.nj - 1)) * r.qj;
        for (int i0 = 0; i0 < BLOCK; i0 += 2) {
            __m256 dot[8];  // dot[u * 2 + i]: row u, latent i0 + i
            for (int e = 0; e < 8; e++) dot[e] = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 8 <= w; k += 8) {
                const __m256 lat[2] = {lat8(rows[i0] + k, 8), lat8(rows[i0 + 1] + k, 8)};
                for (int u = 0; u < 4; u++) {
                    const __m256 qk = _mm256_loadu_ps(qr[u] + k);
                    dot[u * 2] = _mm256_fmadd_ps(qk, lat[0], dot[u * 2]);
                    dot[u * 2 + 1] = _mm256_fmadd_ps(qk, lat[1], dot[u * 2 + 1]);
                }
            }
            if (w % 8) {
                const __m256 lat[2] = {lat8(rows[i0] + k, w % 8), lat8(rows[i0 + 1] + k, w % 8)};
                for (int u = 0; u < 4; u++) {
                    const __m256 qk = _mm256_maskload_ps(qr[u] + k, wtail);
                    dot[u * 2] = _mm256_fmadd_ps(qk, lat[0], dot[u * 2]);
                    dot[u * 2 + 1] = _mm256_fmadd_ps(qk, lat[1], dot[u * 2 + 1]);
                }
            }
            alignas(32) float sums[8];
            _mm256_store_ps(sums, sums8(dot));
            for (int u = 0; u < 4; u++)
                for (int i = 0; i < 2; i++) sc[4 * g + u][i0 + i] = sums[u * 2 + i];
        }
    }
    constexpr int HALVES = BLOCK / 8;
    const __m256 neg = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < r.nj; j++) {  // each row's masked scores, its running maximum and sum, the block's weights
        const uint8_t* seen = r.mask + ((r.j0 + j) / r.H) * r.N + t0;
        int64_t bytes[HALVES] = {};  // (the mask's bytes; past its row's end, which the last block may reach, none)
        memcpy(bytes, seen, n);
        __m256 v[HALVES];
        __m256 top = neg;
        for (int h = 0; h < HALVES; h++) {
            const __m256i seen8 = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes[h])), _mm256_setzero_si256());
            v[h] = _mm256_blendv_ps(neg, _mm256_mul_ps(_mm256_load_ps(sc[j] + 8 * h), _mm256_set1_ps(r.scale)),
                                    _mm256_and_ps(_mm256_castsi256_ps(seen8), _mm256_castsi256_ps(lanes_below(n - 8 * h))));
            top = _mm256_max_ps(top, v[h]);
        }
        if (!r.raise(j, hmax_avx2(top))) {
            for (int h = 0; h < HALVES; h++) _mm256_store_ps(p[j] + 8 * h, _mm256_setzero_ps());
            continue;
        }
        __m256 sum = _mm256_setzero_ps();
        for (int h = 0; h < HALVES; h++) {
            const __m256 e = exp_avx2(_mm256_sub_ps(v[h], _mm256_set1_ps(r.m[j])));
            sum = _mm256_add_ps(sum, e);
            _mm256_store_ps(p[j] + 8 * h, e);
        }
        r.l[j] += hsum_avx2(sum);
    }
    for (int64_t j = r.nj; j < 4 * groups; j++)  // (the repeated rows)
        for (int h = 0; h < HALVES; h++) _mm256_store_ps(p[j] + 8 * h, _mm256_setzero_ps());
    for (int64_t g = 0; g < groups; g++)
        for (int64_t k = 0; k < c; k += 16) {  // the block's weighted latents, 16 of a row's numbers for four rows
            __m256 a[4][2];
            for (int u = 0; u < 4; u++)
                for (int v = 0; v < 2; v++) a[u][v] = _mm256_load_ps(r.acc[4 * g + u] + k + 8 * v);
            for (int i = 0; i < BLOCK; i++) {
                const __m256 lat[2] = {lat8(vals[i] + k, c - k), lat8(vals[i] + k + 8, c - k - 8)};
                for (int u = 0; u < 4; u++) {
                    const __m256 pv = _mm256_set1_ps(p[4 * g + u][i]);
                    a[u][0] = _mm256_fmadd_ps(pv, lat[0], a[u][0]);
                    a[u][1] = _mm256_fmadd_ps(pv, lat[1], a[u][1]);
                }
            }
            for (int u = 0; u < 4; u++)
                for (int v = 0; v < 2; v++) _mm256_store_ps(r.acc[4 * g + u] + k + 8 * v, a[u][v]);
        }
}

// whether any of the rows attends any of the n latents from position t (a block that none does is skipped: a prompt's
// future, half of a causal prompt's work, and the positions past a shorter row's length)
static inline bool attended(const LatentRows& r, int64_t t, int64_t n) {
    for (int64_t j = 0; j < r.nj; j++) {
        const uint8_t* seen = r.mask + ((r.j0 + j) / r.H) * r.N + t;
        for (int64_t i = 0; i < n; i++)
            if (seen[i]) return true;
    }
    return false;
}

// one segment of latents (count of them, `stride` apart, the first at position t of the T + S attended; the values
// each weighs `value` after it), BLOCK at a time through `block` (a call per block: its own work is thousands of
// multiply-adds)
template <int BLOCK, typename R>
static void latent_segment(LatentRows& r, const R* latents, int64_t stride, int64_t value, int64_t count, int64_t t,
                           void (*block)(LatentRows&, const R* const*, const R* const*, int64_t, int64_t)) {
    for (int64_t i0 = 0; i0 < count; i0 += BLOCK) {
        const R *rows[BLOCK], *vals[BLOCK];
        const int64_t n = count - i0 < BLOCK ? count - i0 : BLOCK;
        if (!attended(r, t + i0, n)) continue;
        block_rows(rows, latents, stride, i0, n, BLOCK);
        block_rows(vals, latents + value, stride, i0, n, BLOCK);
        block(r, rows, vals, t + i0, n);
    }
}

// the tasks (a batch row's query rows, `R` at a time, and with splits, a part of its cached latents) shared between the
// threads of the team that calls it (an `omp for` binding to the caller's parallel region; outside of one, a thread
// does them all). Split, each part's running softmax (its maximum, sum and weighted latents per row) is kept, and the
// parts of a row merged after the loop's barrier: rescaled to their common maximum and summed.
template <typename L>
static void latent_attention(const LatentAttention& a, int64_t R, int isa) {
    const int64_t J = a.S * a.H, groups = (J + R - 1) / R, N = a.T + a.S, splits = a.splits > 1 ? a.splits : 1;
    const int64_t block = isa == 2 ? LATENT_BLOCK : LATENT_BLOCK_AVX2;
    const int64_t part = (a.T + splits - 1) / splits / block * block + block;  // (cached latents a part, whole blocks)
    const L* past = (const L*)a.past;
#pragma omp for schedule(static, 1)  // (round robin: a prompt's later rows attend more)
    for (int64_t task = 0; task < a.B * groups * splits; task++) {
        const int64_t b = task / (groups * splits), j0 = task / splits % groups * R, s = task % splits;
        const int64_t t0 = s * part < a.T ? s * part : a.T, t1 = (s + 1) * part < a.T ? (s + 1) * part : a.T;
        LatentRows r{a.q + b * a.qb, a.mask + b / a.G * a.S * N, a.qj, j0, J - j0 < R ? J - j0 : R, N, a.H, a.c, a.w,
                     a.scale};
        const L* from = past + b * a.pb + t0 * a.pt;
        const bool last = s == splits - 1;  // (the new latents: the last part's)
        if (isa == 2) {  // (the weighted sums go 64 numbers at a time for four rows; with AVX2 16)
            r.start(4 * ((r.nj + 3) / 4), 64);
            latent_segment<LATENT_BLOCK>(r, from, a.pt, a.pv, t1 - t0, t0, latent_block_avx512<L>);
            if (last) latent_segment<LATENT_BLOCK>(r, a.fresh + b * a.fb, a.fs, a.fv, a.S, a.T, latent_block_avx512<float>);
        } else {
            r.start(4 * ((r.nj + 3) / 4), 32);
            latent_segment<LATENT_BLOCK_AVX2>(r, from, a.pt, a.pv, t1 - t0, t0, latent_block_avx2<L>);
            if (last) latent_segment<LATENT_BLOCK_AVX2>(r, a.fresh + b * a.fb, a.fs, a.fv, a.S, a.T, latent_block_avx2<float>);
        }
        if (splits == 1) {
            r.finish(a.out + b * a.ob, a.oj);
            continue;
        }
        for (int64_t j = 0; j < r.nj; j++) {  // this part of rows j0.. (row j at [task, j]: m, l, then c weighted sums)
            float* keep = a.parts + (task * R + j) * (a.c + 2);
            keep[0] = r.m[j], keep[1] = r.l[j];
            memcpy(keep + 2, r.acc[j], a.c * sizeof(float));
        }
    }
    if (splits == 1) return;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a.B * J; row++) {  // each row's parts merged
        const int64_t b = row / J, j = row % J, first = (b * groups + j / R) * splits;
        float top = -INFINITY, l = 0.f;
        for (int64_t s = 0; s < splits; s++) top = fmaxf(top, a.parts[((first + s) * R + j % R) * (a.c + 2)]);
        float* out = a.out + b * a.ob + j * a.oj;
        for (int64_t k = 0; k < a.c; k++) out[k] = 0.f;
        for (int64_t s = 0; s < splits; s++) {
            const float* keep = a.parts + ((first + s) * R + j % R) * (a.c + 2);
            if (keep[0] == -INFINITY) continue;  // (a part that attended nothing)
            const float alpha = expf(keep[0] - top);
            l += keep[1] * alpha;
            for (int64_t k = 0; k < a.c; k++) out[k] += keep[2 + k] * alpha;
        }
        const float inv = 1.f / l;  // (no position attended: 0 / 0, NaN, as finish gives)
        for (int64_t k = 0; k < a.c; k++) out[k] *= inv;
    }
}

static bool latent_takes(const LatentAttention* a, int isa) {
    return !((isa != 1 && isa != 2) || a->B < 1 || a->G < 1 || a->B % a->G || a->S < 1 || a->H < 1 || a->T < 0 ||
             a->c < 1 || a->c > MAX_C || a->w > LATENT_WIDTH || a->pv < 0 || a->fv < 0 || (a->pv == 0 && a->w < a->c) ||
             (a->fv == 0 && a->w < a->c) || a->kind < 0 || a->kind > 2);
}

static void latent_kind(const LatentAttention* a, int64_t R, int isa) {
    if (a->kind == 1)
        latent_attention<uint16_t>(*a, R, isa);
    else if (a->kind == 2)
        latent_attention<Bf16>(*a, R, isa);
    else
        latent_attention<float>(*a, R, isa);
}

// kernels.h's LatentAttention says what the arguments are. isa: 2 = AVX-512, 1 = AVX2. Returns 0, or 1 for arguments
// it does not take.
extern "C" int nanoseek_latent_attention(const LatentAttention* a, int isa) {
    if (!latent_takes(a, isa)) return 1;
#pragma omp parallel if (a->B * ((a->S * a->H + LATENT_ROWS - 1) / LATENT_ROWS) > 1)  // (one task: no threads to wake)
    latent_kind(a, LATENT_ROWS, isa);
    return 0;
}

// The same for every thread of the caller's team (step.cpp), `rows` query rows a task (1..8: fewer than 8 share a batch
// row's heads between the threads).
extern "C" int nanoseek_latent_attention_team(const LatentAttention* a, int64_t rows, int isa) {
    if (!latent_takes(a, isa) || rows < 1 || rows > LATENT_ROWS) return 1;
    latent_kind(a, rows, isa);
    return 0;
}
