// The C entries of nanoseek's kernels (int4.cpp, mla.cpp), as ops.cpp calls them; see each source for what they do.
#pragma once
#include <stdint.h>

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
extern "C" int nanoseek_mla_latent_attention(const float* q, int64_t qb, int64_t qj, const float* past, int64_t pb,
                                             int64_t pt, const float* fresh, int64_t fb, int64_t fs, const bool* mask,
                                             int64_t B, int64_t S, int64_t H, int64_t T, int64_t c, int64_t w,
                                             float scale, float* out, int64_t ob, int64_t oj, int isa);
extern "C" int nanoseek_float_experts(const float* x, int64_t T, int64_t D, const int64_t* chunk, const float* w,
                                      int64_t J, const float* gate_up, const float* down, int64_t C, int64_t I, float* y,
                                      int isa);
