// int4 x int8 products for decoding on x86 CPUs: y [M, N] = x [M, K] @ W.T, M <= 8, where W is held as
// nanoseek's int4 layer holds it (see nanoseek/quant.py): codes [N, K/2] (byte j of a row: input 2j in the
// low nibble, 2j+1 in the high one), per group of 32 inputs a scale code (uint8) and a zero code (int8)
// [N, K/32], and per row two fp32 units [N, 2]: W[n, k] = zero_unit[n] * zero_code + code * scale_unit[n] * scale_code.
//
// The activations are quantized to int8 per block of 32 inputs (d = max|x| / 127, as llama.cpp's q8_0),
// split by nibble position so that a byte's two codes meet their own inputs, and each block's sum is
// kept in fp32. The codes count as centred (c - 8), so the activations' rounding errors meet weights
// around zero rather than all of one sign (half the error of uncentred codes). With scale = S * sc and
// zero = Z * zc per group:
//   y[m, n] = sum_g scale * d[m, g] * ((codes - 8) . xq)[g] + (zero + 8 * scale) * sum(x[m, g])
//           = S * (sum_g sc * d * (codes . xq) + 8 * sum_g sc * (sum(x) - d * sum(xq))) + Z * sum_g zc * sum(x),
// the per-group sums taken after the products. The integer dot products are unsigned (codes
// 0..15) times signed (xq) bytes, summed in int32:
// AVX-512 VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd (their int16 pairs reach at most
// 2 * 15 * 127, no saturation). Rows of W are split between OpenMP threads (torch's own runtime: the
// same libgomp.so.1 is already loaded when this library is).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"  // Int4Product: one product of a call

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
// Streaming the codes from memory, one core keeps too few cache lines in flight on its own: the codes
// PREFETCH bytes ahead (and the scales and zeros a few rows ahead) are asked into L2 early. On a 2-vCPU
// Zen4, 24 [8960, 1536] weights in turn: 266-271 us each against 303 without (28 -> 32 GB/s).
#define PREFETCH 4096
#define PREFETCH_ROWS 4
#define AVX2 __attribute__((target("avx2,fma")))

// one block of 32 inputs of row m: its int8 codes split by nibble position, its scale d (written 4 times: one per
// int32 lane of the group's dot product), its sum and what rounding left of it (sum - d * sum(xq))
AVX2 static void quantize_block(const float* v, int8_t* lo, int8_t* hi, float* d, float* sum, float* resid) {
    float scale;
    const __m256i codes = block_codes_avx2(v, &scale);
    // each 128-bit lane's even bytes to its low half, odd ones to its high half; then the halves' order 0 2 1 3
    const __m256i split = _mm256_shuffle_epi8(codes, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                                      0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    const __m256i parts = _mm256_permute4x64_epi64(split, 0xD8);
    _mm_storeu_si128((__m128i*)lo, _mm256_castsi256_si128(parts));
    _mm_storeu_si128((__m128i*)hi, _mm256_extracti128_si256(parts, 1));
    // the codes' sum: biased to unsigned bytes, summed 8 at a time against zero
    const __m256i eights = _mm256_sad_epu8(_mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80)), _mm256_setzero_si256());
    const __m128i two = _mm_add_epi64(_mm256_castsi256_si128(eights), _mm256_extracti128_si256(eights, 1));
    const int total = (int)(_mm_cvtsi128_si64(two) + _mm_extract_epi64(two, 1)) - 32 * 128;
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8)),
                             _mm256_add_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24)));
    for (int i = 0; i < 4; i++) d[i] = scale;
    *sum = hsum_avx2(s);
    *resid = *sum - scale * total;
}

// The quantized activations of up to 8 rows, each row's where it lies: one row of K inputs is int4_acts_bytes(K) bytes
// (kernels.h), its codes split by nibble position lo [K/2] and hi [K/2], then each block's scale once per lane [K/8],
// each block's sum [K/32] and what rounding left of it [K/32] (fp32).
struct Acts {
    const int8_t *lo[8], *hi[8];
    const float *d[8], *sum[8], *resid[8];
};

static Acts acts_of(const char* const* rows, int64_t M, int64_t K) {
    Acts a;
    for (int64_t m = 0; m < M && m < 8; m++) {
        a.lo[m] = (const int8_t*)rows[m], a.hi[m] = a.lo[m] + K / 2;
        a.d[m] = (const float*)(rows[m] + K), a.sum[m] = a.d[m] + K / 8, a.resid[m] = a.sum[m] + K / 32;
    }
    return a;
}

// row m of x [M, K] quantized into its record (see Acts)
static void quantize_row(const float* x, int64_t K, char* row) {
    int8_t *lo = (int8_t*)row, *hi = lo + K / 2;
    float *d = (float*)(row + K), *sum = d + K / 8, *resid = sum + K / 32;
    for (int64_t g = 0; g < K / 32; g++) quantize_block(x + 32 * g, lo + 16 * g, hi + 16 * g, d + 4 * g, sum + g, resid + g);
}

// a row's offsets over groups g..G (see the top), scaled by the row's units u, added to `total` (AVX2: the groups past
// its last 8)
static inline float add_offsets(float total, const uint8_t* sr, const int8_t* zr, const float* sum, const float* resid,
                                int64_t g, int64_t G, const float* u) {
    float zs = 0.f, rs = 0.f;
    for (; g < G; g++) {
        zs += zr[g] * sum[g];
        rs += sr[g] * resid[g];
    }
    return total + u[0] * 8.f * rs + u[1] * zs;
}

// Each row goes 16 groups (512 inputs, 256 bytes of codes) at a time: their scale and zero codes converted once
// (and their share of the offsets taken then), then four 64-byte steps of 4 groups each, every int32 lane picking
// its group's scale out of the 16; the row's products and offsets are summed as one vector at its end. (Converting
// 4 scales a step and 3 horizontal sums a row measured 7-10% slower at one row.)
template <int M>
VNNI static void rows_avx512(const uint8_t* w, const uint8_t* s, const int8_t* z, const float* u, int64_t n0,
                             int64_t n1, int64_t N, int64_t K, Acts a, float* y) {
    const int64_t G = K / 32, KB = K / 2;  // (G a multiple of 4: K of 128)
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512i spread[4];  // step j's lanes: groups 4j.., 4 lanes each
    for (int j = 0; j < 4; j++)
        spread[j] = _mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), _mm512_set1_epi32(4 * j));
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* wr = w + n * KB;
        const uint8_t* sr = s + n * G;
        const int8_t* zr = z + n * G;
        __m512 acc[M], zacc[M], racc[M];  // products; zero codes * sums; scale codes * residues
        for (int m = 0; m < M; m++) acc[m] = zacc[m] = racc[m] = _mm512_setzero_ps();
        _mm_prefetch((const char*)(sr + PREFETCH_ROWS * G), _MM_HINT_T1);
        _mm_prefetch((const char*)(zr + PREFETCH_ROWS * G), _MM_HINT_T1);
        for (int64_t g0 = 0; g0 < G; g0 += 16) {
            const __mmask16 in = G - g0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g0)) - 1);
            const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(in, sr + g0)));
            const __m512 zc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(in, zr + g0)));
            for (int m = 0; m < M; m++) {
                zacc[m] = _mm512_fmadd_ps(zc, _mm512_maskz_loadu_ps(in, a.sum[m] + g0), zacc[m]);
                racc[m] = _mm512_fmadd_ps(sc, _mm512_maskz_loadu_ps(in, a.resid[m] + g0), racc[m]);
            }
            const int steps = G - g0 >= 16 ? 4 : (int)(G - g0) / 4;
            for (int j = 0; j < steps; j++) {
                const int64_t c = 16 * g0 + 64 * j;  // 64 bytes of codes: 4 groups, 4 int32 lanes each
                _mm_prefetch((const char*)(wr + c + PREFETCH), _MM_HINT_T1);
                __m512i b = _mm512_loadu_si512(wr + c);
                __m512i lo = _mm512_and_si512(b, nibble);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
                __m512 sv = _mm512_permutexvar_ps(spread[j], sc);
                for (int m = 0; m < M; m++) {
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(a.lo[m] + c));
                    dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(a.hi[m] + c));
                    __m512 dv = _mm512_loadu_ps(a.d[m] + c / 4);
                    acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dv), sv, acc[m]);
                }
            }
        }
        const __m512 su = _mm512_set1_ps(u[2 * n]), zu = _mm512_set1_ps(u[2 * n + 1]), eight = _mm512_set1_ps(8.f);
        for (int m = 0; m < M; m++)
            y[m * N + n] = _mm512_reduce_add_ps(_mm512_fmadd_ps(zu, zacc[m], _mm512_mul_ps(su, _mm512_fmadd_ps(eight, racc[m], acc[m]))));
    }
}

AVX2 static inline float row_total_avx2(__m256 dots, const uint8_t* sr, const int8_t* zr, const float* sum,
                                        const float* resid, int64_t G, const float* u) {
    __m256 zacc = _mm256_setzero_ps(), racc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        __m128i zc = _mm_loadl_epi64((const __m128i*)(zr + g)), sc = _mm_loadl_epi64((const __m128i*)(sr + g));
        zacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(zc)), _mm256_loadu_ps(sum + g), zacc);
        racc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)), _mm256_loadu_ps(resid + g), racc);
    }
    __m256 v = _mm256_mul_ps(_mm256_set1_ps(u[0]), _mm256_fmadd_ps(_mm256_set1_ps(8.f), racc, dots));
    v = _mm256_fmadd_ps(_mm256_set1_ps(u[1]), zacc, v);
    return add_offsets(hsum_avx2(v), sr, zr, sum, resid, g, G, u);
}

// one step of a row: 32 bytes of codes at c (2 groups, 4 int32 lanes each), their scales in sv, into the sums acc [M]
template <int M>
AVX2 static inline __attribute__((always_inline)) void step_avx2(const uint8_t* wr, const Acts& a, int64_t c, __m256 sv,
                                                                 __m256* acc) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i b = _mm256_loadu_si256((const __m256i*)(wr + c));
    const __m256i lo = _mm256_and_si256(b, nibble);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
    for (int m = 0; m < M; m++) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(a.lo[m] + c))),
                                           _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(a.hi[m] + c))));
        const __m256 dv = _mm256_mul_ps(_mm256_loadu_ps(a.d[m] + c / 4), sv);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), dv, acc[m]);
    }
}

// Each row goes 64 bytes of codes (4 groups) a pass: their 4 scale codes converted at once, then two 32-byte steps
// (2 groups each, 4 int32 lanes a group) whose lanes pick their group's scale; a row whose codes end with half a pass
// takes one more step. (One step a pass, each converting its 2 scale codes, took 1.3x the instructions: 8-9% slower at
// one row on a 2-vCPU Zen3. Two sums, alternate steps in each, were no faster, and would make a row's rounding depend on
// how many rows share its pass: one sum keeps a row's numbers the same in any batch.)
template <int M>
AVX2 static void rows_avx2(const uint8_t* w, const uint8_t* s, const int8_t* z, const float* u, int64_t n0,
                           int64_t n1, int64_t N, int64_t K, Acts a, float* y) {
    const int64_t G = K / 32, KB = K / 2;
    const __m256i first = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), second = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* wr = w + n * KB;
        const uint8_t* sr = s + n * G;
        __m256 acc[M];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        _mm_prefetch((const char*)(sr + PREFETCH_ROWS * G), _MM_HINT_T1);
        _mm_prefetch((const char*)(z + (n + PREFETCH_ROWS) * G), _MM_HINT_T1);
        int64_t c = 0;
        for (; c + 64 <= KB; c += 64) {
            _mm_prefetch((const char*)(wr + c + PREFETCH), _MM_HINT_T1);
            int32_t s4;  // the 4 groups' scale codes
            memcpy(&s4, sr + c / 16, 4);
            const __m256 sc = _mm256_castps128_ps256(_mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(s4))));
            step_avx2<M>(wr, a, c, _mm256_permutevar8x32_ps(sc, first), acc);
            step_avx2<M>(wr, a, c + 32, _mm256_permutevar8x32_ps(sc, second), acc);
        }
        if (c < KB) {  // half a pass
            uint16_t s2;
            memcpy(&s2, sr + c / 16, 2);
            const __m256 sc = _mm256_castps128_ps256(_mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(s2))));
            step_avx2<M>(wr, a, c, _mm256_permutevar8x32_ps(sc, first), acc);
        }
        for (int m = 0; m < M; m++)
            y[m * N + n] = row_total_avx2(acc[m], sr, z + n * G, a.sum[m], a.resid[m], G, u + 2 * n);
    }
}

typedef void (*RowsFn)(const uint8_t*, const uint8_t*, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                       Acts, float*);

template <int M> struct Avx512 { static constexpr RowsFn fn = rows_avx512<M>; };
template <int M> struct Avx2 { static constexpr RowsFn fn = rows_avx2<M>; };

// Several products in one parallel region (a mixture-of-experts layer's chosen experts: one call for all
// their gate and up projections, one for their down projections, rather than a call and a fork of the
// threads per weight). Products with the same x, M and K share its quantized activations. The rows of
// all the weights, weighed by K (the bytes each reads), are split evenly between the threads, so a
// thread's rows run on from one weight into the next.
// isa: 2 = AVX-512 VNNI (used where K is a multiple of 128), 1 = AVX2 (K a multiple of 64). Returns 0, or
// 1 for arguments it does not take (the caller checks them first), 2 when out of memory.
extern "C" int nanoseek_int4_linear_many(const Int4Product* p, int64_t count, int isa) {
    if (count < 1) return 0;
    // per product: the product whose activations it uses (itself, or an earlier one with the same x), where
    // those lie in buf, and the cost (inputs read) of the rows before its own; per product that owns its
    // activations, in order: its index and its first block to quantize
    int64_t* first = (int64_t*)malloc(count * 5 * sizeof(int64_t));
    if (!first) return 2;
    int64_t *offset = first + count, *cost = offset + count, *owner = cost + count, *start = owner + count;
    int64_t bytes = 0, nblocks = 0, total = 0, owners = 0;
    for (int64_t i = 0; i < count; i++) {
        const Int4Product& q = p[i];
        if (q.M < 1 || q.M > 8 || q.N < 1 || q.K < 64 || q.K % 64 || (isa != 1 && isa != 2)) {
            free(first);
            return 1;
        }
        first[i] = i;
        for (int64_t j = 0; j < i; j++)
            if (p[j].x == q.x && p[j].M == q.M && p[j].K == q.K) {
                first[i] = j;
                break;
            }
        if (first[i] == i) {
            offset[i] = bytes;
            bytes += q.M * int4_acts_bytes(q.K);
            owner[owners] = i;
            start[owners++] = nblocks;
            nblocks += q.M * (q.K / 32);
        }
        cost[i] = total;
        total += q.N * q.K;
    }
    char* buf = (char*)malloc(bytes);
    if (!buf) {
        free(first);
        return 2;
    }
#pragma omp parallel
    {
#pragma omp for
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t lo_o = 0, hi_o = owners - 1;  // the last owner whose first block is <= b
            while (lo_o < hi_o) {
                int64_t mid = (lo_o + hi_o + 1) / 2;
                if (start[mid] <= b) lo_o = mid; else hi_o = mid - 1;
            }
            const int64_t i = owner[lo_o];
            const Int4Product& q = p[i];
            const int64_t G = q.K / 32, r = b - start[lo_o], m = r / G, g = r % G;
            int8_t* lo = (int8_t*)(buf + offset[i] + m * int4_acts_bytes(q.K));
            float* d = (float*)((char*)lo + q.K);
            quantize_block(q.x + m * q.K + g * 32, lo + g * 16, lo + q.K / 2 + g * 16, d + 4 * g, d + q.K / 8 + g,
                           d + q.K / 8 + G + g);
        }
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t from = total / nt * t + (t < total % nt ? t : total % nt);
        int64_t to = from + total / nt + (t < total % nt);
        for (int64_t i = 0; i < count; i++) {
            const Int4Product& q = p[i];
            const int64_t K = q.K, c0 = cost[i];
            int64_t n0 = from > c0 ? (from - c0 + K - 1) / K : 0, n1 = to > c0 ? (to - c0 + K - 1) / K : 0;
            n0 = n0 < q.N ? n0 : q.N;
            n1 = n1 < q.N ? n1 : q.N;
            if (n0 >= n1) continue;
            const char* rows[8];
            for (int64_t m = 0; m < q.M; m++) rows[m] = buf + offset[first[i]] + m * int4_acts_bytes(K);
            RowsFn fn = isa == 2 && K % 128 == 0 ? pick<Avx512>((int)q.M) : pick<Avx2>((int)q.M);
            fn(q.w, q.s, q.z, q.u, n0, n1, q.N, K, acts_of(rows, q.M, K), q.y);
        }
    }
    free(buf);
    free(first);
    return 0;
}

// One product of any number of rows (in runs of 8, each quantizing its own rows), without the caller
// building a table: a decode step's every other int4 layer (a 1.5B model makes ~200 such calls a token).
extern "C" int nanoseek_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint8_t* s,
                                    const int8_t* z, const float* u, int64_t N, float* y, int isa) {
    if (M < 1) return M == 0 ? 0 : 1;
    const int64_t count = (M + 7) / 8;
    Int4Product one[8];
    Int4Product* p = count <= 8 ? one : (Int4Product*)malloc(count * sizeof(Int4Product));
    if (!p) return 2;
    for (int64_t i = 0; i < count; i++) {
        const int64_t m0 = 8 * i;
        p[i] = {x + m0 * K, M - m0 < 8 ? M - m0 : 8, K, w, s, z, u, N, y + m0 * N};
    }
    int code = nanoseek_int4_linear_many(p, count, isa);
    if (p != one) free(p);
    return code;
}

// x [M, K] fp32 (K a multiple of 64) quantized into M records of int4_acts_bytes(K) bytes each, one after the other, on the
// calling thread: what nanoseek_int4_linear_part reads
extern "C" void nanoseek_int4_quantize(const float* x, int64_t M, int64_t K, char* acts) {
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, acts + m * int4_acts_bytes(K));
}

// rows n0..n1 of W against M quantized activation rows (acts[m], records as nanoseek_int4_quantize writes them), 8 rows
// a pass over the weight, on the calling thread: y[m * ldy + n]. How a caller that runs its own threads (step.cpp) shares
// a product out. Unchecked (K a multiple of 64; isa as nanoseek_int4_linear_many's).
extern "C" void nanoseek_int4_linear_part(const char* const* acts, int64_t M, int64_t K, const uint8_t* w,
                                          const uint8_t* s, const int8_t* z, const float* u, float* y, int64_t ldy,
                                          int64_t n0, int64_t n1, int isa) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int rows = (int)(M - m0 < 8 ? M - m0 : 8);
        RowsFn fn = isa == 2 && K % 128 == 0 ? pick<Avx512>(rows) : pick<Avx2>(rows);
        fn(w, s, z, u, n0, n1, ldy, K, acts_of(acts + m0, rows, K), y + m0 * ldy);
    }
}

namespace {
// int4 experts for kernels.h's quantized_experts: a row of the table holds gate_proj's codes, scale codes, zero codes and
// units, then up_proj's, down_proj's, then the width I
struct Int4Experts {
    static constexpr int COLUMNS = 13;
    const int64_t* table;
    const char *x, *h;  // the tokens' records [T] (D inputs) and the pairs' hidden ones [T * J] (Imax inputs)
    int64_t D, Imax;
    const char** slots;  // 8
    int isa;
    void inputs(int k, int64_t t) { slots[k] = x + t * int4_acts_bytes(D); }
    void hidden(int k, int64_t p) { slots[k] = h + p * int4_acts_bytes(Imax); }
    void product(int64_t e, int layer, int64_t n, int64_t K, int64_t r0, int64_t rows, float* out, int64_t ldy) {
        const int64_t* op = table + e * COLUMNS + 4 * layer;
        const int64_t G = K / 32;
        nanoseek_int4_linear_part(slots, n, K, (const uint8_t*)op[0] + r0 * (K / 2), (const uint8_t*)op[1] + r0 * G,
                                  (const int8_t*)op[2] + r0 * G, (const float*)op[3] + 2 * r0, out, ldy, 0, rows, isa);
    }
    void store(const float* a, int64_t p, int64_t i0, int64_t I) {  // 32 activations: block i0 / 32 of pair p's record
        int8_t* lo = (int8_t*)(h + p * int4_acts_bytes(Imax));  // (laid out for its expert's width I)
        float* d = (float*)((char*)lo + I);
        const int64_t g = i0 / 32;
        quantize_block(a, lo + 16 * g, lo + I / 2 + 16 * g, d + 4 * g, d + I / 8 + g, d + I / 8 + I / 32 + g);
    }
};
}  // namespace

// A mixture-of-experts layer's int4 experts (int64 table [C, 13], as MoE's int4 table: each projection's codes, scale
// codes, zero codes and units, then the width I, a multiple of 64), for every thread of the caller's team: kernels.h's
// quantized_experts. h: the pairs' hidden records [T * J] of Imax inputs (int4_acts_bytes(Imax) each), shared by the team;
// each thread brings its own xq (T records of D inputs), plan (3 * C + 1 + T * J int64) and slots (8 pointers).
extern "C" void nanoseek_int4_experts_team(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                           int64_t J, const int64_t* table, int64_t C, int64_t Imax, float* y, char* h,
                                           char* xq, int64_t* plan, const char** slots, int isa) {
    nanoseek_int4_quantize(x, T, D, xq);
    Int4Experts f{table, xq, h, D, Imax, slots, isa};
    quantized_experts(f, T, D, chunk, w, J, table, C, y, plan);
}
