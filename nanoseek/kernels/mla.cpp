// MLA's absorbed products while decoding (see nanoseek/model/attention.py, MLA.absorbed_attention), for a few
// rows of fp32 activations against kv_b_proj's weight kept in bf16: w [H, d + dv, c], per head its key half
// w_uk (rows 0..d-1) and its value half w_uv (rows d..d+dv-1), each row c long.
//   key:   y [H, M, c]  = q [H, M, d] @ w_uk     (each query into the latent space)
//   value: y [H, M, dv] = o [H, M, c] @ w_uv.T   (each latent output back to the head's values)
// torch has no product of fp32 activations with bf16 weights on a CPU, and its fp32 batched products of
// this shape read the (twice as large) fp32 weight at 12-30 GB/s. Here the heads are split between the
// threads and each weight row is read once, widened to fp32 (a bf16 is the top half of an fp32) into a
// buffer that stays in L1, then met by every row of activations. Plain loops, which the compiler
// vectorizes for the instruction set of the function they are inlined into (AVX-512 or AVX2 + FMA).
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define MAX_ROWS 8
#define MAX_C 1024  // the latent width c (kv_lora_rank) at most: DeepSeek-V2/V3 have 512

#define INLINE static inline __attribute__((always_inline))

INLINE void widen(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        uint32_t u = (uint32_t)src[k] << 16;
        memcpy(dst + k, &u, 4);
    }
}

// one head: q [M, d], w its [d + dv, c] rows, y [M, c] (held in L1 while the rows stream by)
INLINE void key_head(const float* q, const uint16_t* w, float* y, int64_t M, int64_t d, int64_t c) {
    float row[MAX_C];
    for (int64_t k = 0; k < M * c; k++) y[k] = 0.f;
    for (int64_t r = 0; r < d; r++) {
        widen(w + r * c, row, c);
        for (int64_t m = 0; m < M; m++) {
            const float a = q[m * d + r];
            float* ym = y + m * c;
            for (int64_t k = 0; k < c; k++) ym[k] += a * row[k];
        }
    }
}

// one head: o [M, c], w its [d + dv, c] rows, y [M, dv]
INLINE void value_head(const float* o, const uint16_t* w, float* y, int64_t M, int64_t d, int64_t dv, int64_t c) {
    float row[MAX_C];
    for (int64_t j = 0; j < dv; j++) {
        widen(w + (d + j) * c, row, c);
        for (int64_t m = 0; m < M; m++) {
            const float* om = o + m * c;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < c; k++) s += om[k] * row[k];
            y[m * dv + j] = s;
        }
    }
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX2 __attribute__((target("avx2,fma")))
AVX512 static void key_avx512(const float* q, const uint16_t* w, float* y, int64_t M, int64_t d, int64_t c) { key_head(q, w, y, M, d, c); }
AVX2 static void key_avx2(const float* q, const uint16_t* w, float* y, int64_t M, int64_t d, int64_t c) { key_head(q, w, y, M, d, c); }
AVX512 static void value_avx512(const float* o, const uint16_t* w, float* y, int64_t M, int64_t d, int64_t dv, int64_t c) {
    value_head(o, w, y, M, d, dv, c);
}
AVX2 static void value_avx2(const float* o, const uint16_t* w, float* y, int64_t M, int64_t d, int64_t dv, int64_t c) {
    value_head(o, w, y, M, d, dv, c);
}

// value = 0: the key product (x = q [H, M, d], y [H, M, c]); 1: the value product (x = o [H, M, c], y [H, M, dv]).
// isa: 2 = AVX-512, 1 = AVX2. Returns 0, or 1 for arguments it does not take (c at most MAX_C).
extern "C" int nanoseek_mla_product(int value, const float* x, const uint16_t* w, float* y, int64_t H, int64_t M,
                                    int64_t d, int64_t dv, int64_t c, int isa) {
    if (M < 1 || M > MAX_ROWS || c < 1 || c > MAX_C || d < 1 || dv < 1 || (isa != 1 && isa != 2)) return 1;
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < H; h++) {
        const uint16_t* wh = w + h * (d + dv) * c;
        if (value)
            (isa == 2 ? value_avx512 : value_avx2)(x + h * M * c, wh, y + h * M * dv, M, d, dv, c);
        else
            (isa == 2 ? key_avx512 : key_avx2)(x + h * M * d, wh, y + h * M * c, M, d, c);
    }
    return 0;
}
