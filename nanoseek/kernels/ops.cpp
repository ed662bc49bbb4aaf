// CPU implementations of nanoseek's operators (their schemas and fakes are defined in kernels/__init__.py) in
// C++, so that a call reaches the kernels without Python: from a compiled graph (whose C++ wrapper calls the
// operator) and eagerly. nanoseek::int4_linear, one int4 product: a 1.5B model's decode step makes ~200 such
// calls; through a Python implementation each cost ~10 us more than the kernel, through this ~2. Likewise
// nanoseek::int8_avx2_linear, one int8 product where fbgemm's are not exact (AVX2 without VNNI).
// nanoseek::int4_experts, a whole int4 mixture-of-experts layer for a few tokens (what MoE.int4_routed and the
// shared experts' own layers do through Python): one DeepSeek-V2-Lite layer for one token took 1.47-1.60 ms
// against 1.84-1.94 on a 2-vCPU Zen4 (its 43 MB of int4 weights read at ~30 GB/s take ~1.45).
// The one source built against torch's headers; without them the library is built from the others,
// int4_linear gets its Python implementation (kernels.int4_products) and int4_experts none.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_softmax.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

static int isa_here = 0;  // the instruction set to run (kernels.int4_isa), told when the library is loaded
extern "C" void nanoseek_set_isa(int isa) { isa_here = isa; }

// x [rows, K] (float) @ W.T -> [rows, N] fp32; W as codes uint8 [N, K/2], scale codes uint8 and zero codes int8
// [N, K/32], units fp32 [N, 2] (int4.cpp says what they mean)
static at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, const at::Tensor& units) {
    TORCH_CHECK(isa_here > 0, "nanoseek's int4 kernel is not available here");
    const int64_t M = x.dim() == 2 ? x.size(0) : 0, K = x.dim() == 2 ? x.size(1) : 0, N = qweight.size(0);
    bool ok = x.dim() == 2 && x.is_floating_point() && x.device().is_cpu() && K % 64 == 0;
    const std::vector<std::tuple<const at::Tensor*, at::ScalarType, int64_t>> wants = {
        {&qweight, at::kByte, K / 2}, {&scales, at::kByte, K / 32}, {&zeros, at::kChar, K / 32}, {&units, at::kFloat, 2}};
    for (const auto& [t, dtype, width] : wants)
        ok = ok && t->scalar_type() == dtype && t->dim() == 2 && t->size(0) == N && t->size(1) == width &&
             t->is_contiguous() && t->device().is_cpu();
    TORCH_CHECK_VALUE(ok, "int4 kernel: x ", x.scalar_type(), " ", x.sizes(), ", qweight ", qweight.scalar_type(), " ",
                      qweight.sizes(), ", scales ", scales.scalar_type(), " ", scales.sizes(), ", zeros ",
                      zeros.scalar_type(), " ", zeros.sizes(), ", units ", units.scalar_type(), " ", units.sizes(),
                      ": wants x float [rows, K] on the CPU, K a multiple of 64, uint8 [N, K/2] codes, uint8 scale ",
                      "codes and int8 zero codes [N, K/32], fp32 units [N, 2], all contiguous");
    at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({M, N}, xf.options());
    int code = nanoseek_int4_linear(xf.data_ptr<float>(), M, K, qweight.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
                                    zeros.data_ptr<int8_t>(), units.data_ptr<float>(), N, y.data_ptr<float>(), isa_here);
    TORCH_CHECK(code == 0, "int4 kernel failed (code ", code, ") on a product [M, K, N] [", M, ", ", K, ", ", N, "]");
    return y;
}


// x [rows, K] (float) @ W.T -> [rows, N] fp32; W as int8 codes [N, K] times fp32 scales [N] (int8.cpp), K a multiple
// of 32, AVX2
static at::Tensor int8_avx2_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
    TORCH_CHECK(isa_here > 0, "nanoseek's int8 kernel is not available here");
    const int64_t M = x.dim() == 2 ? x.size(0) : 0, K = x.dim() == 2 ? x.size(1) : 0;
    const int64_t N = qweight.dim() == 2 ? qweight.size(0) : 0;
    TORCH_CHECK_VALUE(x.dim() == 2 && x.is_floating_point() && x.device().is_cpu() && K % 32 == 0 && K > 0 &&
                          qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.size(1) == K &&
                          qweight.is_contiguous() && qweight.device().is_cpu() && scales.scalar_type() == at::kFloat &&
                          scales.dim() == 1 && scales.size(0) == N && scales.is_contiguous() && scales.device().is_cpu(),
                      "int8 kernel: x ", x.scalar_type(), " ", x.sizes(), ", qweight ", qweight.scalar_type(), " ",
                      qweight.sizes(), ", scales ", scales.scalar_type(), " ", scales.sizes(), ": wants x float [rows, K] ",
                      "on the CPU, K a multiple of 32, int8 codes [N, K] and fp32 scales [N], contiguous");
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({M, N}, xf.options());
    int code = nanoseek_int8_linear(xf.data_ptr<float>(), M, K, qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), N,
                                    y.data_ptr<float>());
    TORCH_CHECK(code == 0, "int8 kernel failed (code ", code, ") on a product [M, K, N] [", M, ", ", K, ", ", N, "]");
    return y;
}

// A mixture-of-experts layer whose experts are all int4 layers the kernel takes, for a few tokens (decoding),
// in one call: x [T, D] float, each token's chosen experts `indices` [T, k] and their gate weights `weights`
// [T, k]; table int64 [C, 13], a row per expert (the `routed` experts first, then any shared ones, which every
// token runs with weight 1): its gate, up and down projections' codes, scales, zeros and units (addresses, as
// QuantLinear holds them), then its intermediate size I. Returns sum over a token's experts of
// down(weight * silu(gate(x)) * up(x)), [T, D] in x's dtype. Every expert's gate and up products go in one
// kernel call, their down products in a second, each expert's weights read once for all the tokens that chose it.
static at::Tensor int4_experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& indices,
                               const at::Tensor& table, int64_t routed) {
    TORCH_CHECK(isa_here > 0, "nanoseek's int4 kernel is not available here");
    TORCH_CHECK_VALUE(x.dim() == 2 && x.is_floating_point() && x.device().is_cpu() && x.size(1) % 64 == 0 &&
                          indices.dim() == 2 && indices.size(0) == x.size(0) && !indices.is_floating_point() &&
                          weights.sizes() == indices.sizes() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                          table.size(1) == 13 && table.is_contiguous() && 0 < routed && routed <= table.size(0),
                      "int4_experts: x ", x.scalar_type(), " ", x.sizes(), ", weights ", weights.sizes(), ", indices ",
                      indices.scalar_type(), " ", indices.sizes(), ", table ", table.scalar_type(), " ", table.sizes(),
                      ", routed ", routed, ": wants x float [T, D] on the CPU (D a multiple of 64), weights and indices ",
                      "[T, k], an int64 table [experts, 13] with the routed ones first");
    const at::Tensor xf = x.to(at::kFloat).contiguous(), w = weights.to(at::kFloat).contiguous(),
                     idx = indices.to(at::kLong).contiguous();
    const int64_t T = x.size(0), D = x.size(1), k = indices.size(1), shared = table.size(0) - routed;
    const int64_t* rows = table.data_ptr<int64_t>();
    const int64_t* chosen = idx.data_ptr<int64_t>();
    // the (token, expert) pairs grouped by expert, then each shared expert's T tokens: each such run's expert,
    // first slot and length; each slot's token and weight
    std::vector<int64_t> count(routed, 0), first(routed, 0);
    for (int64_t p = 0; p < T * k; p++) {
        TORCH_CHECK_VALUE(0 <= chosen[p] && chosen[p] < routed, "int4_experts: expert ", chosen[p], " of ", routed);
        count[chosen[p]]++;
    }
    struct Run { int64_t expert, slot, n; };
    std::vector<Run> runs;
    for (int64_t e = 0, slot = 0; e < routed; slot += count[e], e++)
        if (count[e]) runs.push_back({e, first[e] = slot, count[e]});
    // one token whose experts are distinct (as a router picks them): every run reads x's one row
    const bool one_row = T == 1 && *std::max_element(count.begin(), count.end()) <= 1;
    for (int64_t a = 0; a < shared; a++) runs.push_back({routed + a, T * k + a * T, T});
    const int64_t slots = T * (k + shared);
    std::vector<int64_t> token_of(slots);
    std::vector<float> weight_of(slots, 1.0f);
    std::vector<int64_t> next(first);
    for (int64_t p = 0; p < T * k; p++) {
        int64_t s = next[chosen[p]]++;
        token_of[s] = p / k;
        weight_of[s] = w.data_ptr<float>()[p];
    }
    for (int64_t s = T * k; s < slots; s++) token_of[s] = (s - T * k) % T;
    // the inputs each routed run reads: a single token's row is every run's (its activations quantized once),
    // else the runs' tokens gathered in slot order; shared experts read x itself
    at::Tensor gathered = one_row ? xf : xf.index_select(0, at::from_blob(token_of.data(), {T * k}, at::kLong));
    const float* xs = gathered.data_ptr<float>();
    std::vector<int64_t> offset;  // each run's place in the intermediate activations
    int64_t width = 0;
    for (const Run& r : runs) {
        const int64_t* row = rows + r.expert * 13;
        for (int64_t j = 0; j < 12; j++)
            TORCH_CHECK_VALUE(row[j] != 0, "int4_experts: the table is out of date (its experts moved or were loaded "
                              "since it was made)");
        const int64_t I = row[12];
        TORCH_CHECK_VALUE(I > 0 && I % 64 == 0, "int4_experts: intermediate size ", I, " (a multiple of 64)");
        offset.push_back(width);
        width += r.n * I;
    }
    at::Tensor act = at::empty({2, width}, xf.options());  // gate then up outputs, run after run
    float *gate_out = act.data_ptr<float>(), *up_out = gate_out + width;
    std::vector<Int4Product> products;
    auto add = [&](const float* in, int64_t in_width, int64_t n, int64_t layer, int64_t out_width, float* out,
                   const int64_t* row) {
        for (int64_t m0 = 0; m0 < n; m0 += 8)
            products.push_back({in + m0 * in_width, std::min<int64_t>(8, n - m0), in_width,
                                (const uint8_t*)row[4 * layer], (const uint8_t*)row[4 * layer + 1],
                                (const int8_t*)row[4 * layer + 2], (const float*)row[4 * layer + 3], out_width,
                                out + m0 * out_width});
    };
    for (size_t i = 0; i < runs.size(); i++) {
        const Run& r = runs[i];
        const int64_t* row = rows + r.expert * 13;
        const float* in = r.expert >= routed ? xf.data_ptr<float>() : one_row ? xs : xs + r.slot * D;
        for (int64_t layer : {0, 1}) add(in, D, r.n, layer, row[12], (layer ? up_out : gate_out) + offset[i], row);
    }
    int code = nanoseek_int4_linear_many(products.data(), products.size(), isa_here);
    TORCH_CHECK(code == 0, "int4 kernel failed (code ", code, ") on an MoE layer's gate and up products");
    at::Tensor h = act[0];
    at::silu_(h).mul_(act[1]);  // the intermediate activations, run after run
    // each routed pair's gate weight scales its intermediate activations, as MLP.forward does (scaling the output
    // instead quantized other activations for the down products: a code rounded the other way moved a whole row)
    for (size_t i = 0; i < runs.size(); i++) {
        const Run& r = runs[i];
        if (r.expert >= routed) continue;
        const int64_t I = rows[r.expert * 13 + 12];
        float* hr = h.data_ptr<float>() + offset[i];
        for (int64_t j = 0; j < r.n; j++)
            for (int64_t c = 0; c < I; c++) hr[j * I + c] *= weight_of[r.slot + j];
    }
    at::Tensor out = at::empty({slots, D}, xf.options());
    products.clear();
    for (size_t i = 0; i < runs.size(); i++) {
        const Run& r = runs[i];
        const int64_t* row = rows + r.expert * 13;
        add(h.data_ptr<float>() + offset[i], row[12], r.n, 2, D, out.data_ptr<float>() + r.slot * D, row);
    }
    code = nanoseek_int4_linear_many(products.data(), products.size(), isa_here);
    TORCH_CHECK(code == 0, "int4 kernel failed (code ", code, ") on an MoE layer's down products");
    at::Tensor y = at::zeros({T, D}, xf.options());
    float *yp = y.data_ptr<float>(), *op = out.data_ptr<float>();
    for (int64_t s = 0; s < slots; s++) {
        float* dst = yp + token_of[s] * D;
        const float* src = op + s * D;
        for (int64_t j = 0; j < D; j++) dst[j] += src[j];
    }
    return y.to(x.scalar_type());
}

// MLA's attention over its cached latents while decoding (MLA.absorbed_attention in nanoseek/model/attention.py
// says what it computes) with fp32 activations, for at most 8 query rows (B * S), kv_b_proj's weight in bf16
// (mla_attention) or in int4 (mla_attention_int4): mla.cpp's (and for int4 the value product int4.cpp's) products
// turn each query into the latent space and each latent output back to the head's values; torch's batched products
// score and weigh the latents. q_nope [B, S, H, d] and q_pe [B, S, H, r] (rotated), past [B, T, c + r] (rows may be
// spaced apart; fp32, or fp16 from a half-precision cache) and fresh [B, S, c + r] (the new tokens' latents, fp32),
// mask [B, S, T + S] (true: may attend). Returns [B, S, H, dv] fp32.
struct MlaShape {
    int64_t B, S, H, d, r, c, dv, T, M;
};

// a mask of bools, or of bytes 0/1 (KVCache.mask's)
static bool mask_ok(const at::Tensor& mask) {
    return mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte;
}

// the cached latents fp32, fp16 or bf16 (a half-precision cache), the new ones fp32
static bool latents_ok(const at::Tensor& past, const at::Tensor& fresh) {
    const at::ScalarType kind = past.scalar_type();
    return (kind == at::kFloat || kind == at::kHalf || kind == at::kBFloat16) && fresh.scalar_type() == at::kFloat;
}

// the kernel over cached rows (mla.cpp; kernels.h's LatentAttention) into out [B, J, c]: q [B, J, w], past [B, T, w]
// and fresh [B, S, w] with each row's numbers adjacent, mask [B / G, S, T + S] contiguous; values pv (past) and fv
// (fresh) elements after their keys
static void latent_kernel(const at::Tensor& q, const at::Tensor& past, const at::Tensor& fresh, const at::Tensor& mask,
                          int64_t S, int64_t H, int64_t c, double scale, at::Tensor& out, int64_t pv = 0,
                          int64_t fv = 0, int64_t G = 1) {
    const int kind = past.scalar_type() == at::kHalf ? 1 : past.scalar_type() == at::kBFloat16 ? 2 : 0;
    const LatentAttention a{q.data_ptr<float>(), q.stride(0), q.stride(1), past.data_ptr(), past.stride(0),
                            past.stride(1), pv, kind, fresh.data_ptr<float>(), fresh.stride(0), fresh.stride(1), fv,
                            (const uint8_t*)mask.data_ptr(), G, q.size(0), S, H, past.size(1), c, q.size(2),
                            (float)scale, out.data_ptr<float>(), out.stride(0), out.stride(1)};
    int code = nanoseek_latent_attention(&a, isa_here);
    TORCH_CHECK(code == 0, "attention kernel failed (code ", code, ") on the attention over the cache");
}

// the checks both weights' forms share; `weight` says what the weight must be, `ok_weight` whether it is
static MlaShape mla_check(const char* op, const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& past,
                          const at::Tensor& fresh, const at::Tensor& mask, int64_t c, int64_t dv, bool ok_weight,
                          const char* weight) {
    TORCH_CHECK(isa_here > 0, "nanoseek's MLA kernel is not available here");
    const bool ranks = q_nope.dim() == 4 && q_pe.dim() == 4 && past.dim() == 3 && fresh.dim() == 3 && mask.dim() == 3;
    MlaShape m{};
    if (ranks)
        m = {q_nope.size(0), q_nope.size(1), q_nope.size(2), q_nope.size(3), q_pe.size(3), c, dv, past.size(1),
             q_nope.size(0) * q_nope.size(1)};
    bool ok = ranks && ok_weight && m.dv > 0 && 0 < m.M && m.M <= 8 && 0 < c && c <= 1024 &&
              mask_ok(mask);
    for (const at::Tensor* t : {&q_nope, &q_pe, &past, &fresh})
        ok = ok && t->device().is_cpu();
    ok = ok && q_nope.scalar_type() == at::kFloat && q_pe.scalar_type() == at::kFloat && latents_ok(past, fresh);
    ok = ok && q_pe.sizes() == at::IntArrayRef({m.B, m.S, m.H, m.r}) && past.size(0) == m.B &&
         past.size(2) == c + m.r && fresh.sizes() == at::IntArrayRef({m.B, m.S, c + m.r}) &&
         mask.sizes() == at::IntArrayRef({m.B, m.S, m.T + m.S});
    TORCH_CHECK_VALUE(ok, op, ": q_nope ", q_nope.sizes(), ", q_pe ", q_pe.sizes(), ", past ", past.sizes(),
                      ", fresh ", fresh.sizes(), ", mask ", mask.sizes(), ": wants fp32 [B, S, H, d], [B, S, H, r], ",
                      "[B, T, c + r], [B, S, c + r] (the cached latents fp32, fp16 or bf16, the new ones fp32) on the CPU ",
                      "(B * S <= 8), a bool or uint8 mask [B, S, T + S], ", weight);
    return m;
}

// The queries' rows for the key product, read where they lie (a slice of the query projection's output) when its
// M = B * S rows are evenly spaced and each head's d values adjacent, else a copy; and the tensor it writes, the
// queries in the latent space with their rotary part beside them, (B, S*H, c + r) (the rotary part copied in now)
static std::pair<at::Tensor, at::Tensor> mla_queries(const at::Tensor& q_nope, const at::Tensor& q_pe, const MlaShape& m) {
    const bool in_place = q_nope.stride(3) == 1 && (m.B == 1 || q_nope.stride(0) == m.S * q_nope.stride(1));
    at::Tensor q = at::empty({m.B, m.S * m.H, m.c + m.r}, q_nope.options());
    q.narrow(-1, m.c, m.r).view({m.B, m.S, m.H, m.r}).copy_(q_pe);
    return {in_place ? q_nope : q_nope.contiguous(), q};
}

// between the two products: the scores of q (B, S*H, c + r) against the past and the new latents, masked and
// softmaxed, and the latents they weigh, (B, S*H, c) contiguous: (M, H, c), in one pass over the latents (mla.cpp;
// torch's batched products and softmax for latents wider than it takes).
static at::Tensor mla_latent_outputs(const at::Tensor& q, const at::Tensor& past, const at::Tensor& fresh,
                                     const at::Tensor& mask, const MlaShape& m, double scale) {
    if (isa_here > 0 && m.c + m.r <= 1024 + 128 && q.is_contiguous() && past.stride(2) == 1 && fresh.stride(2) == 1 &&
        mask.is_contiguous()) {
        at::Tensor out = at::empty({m.B, m.S * m.H, m.c}, q.options());
        latent_kernel(q, past, fresh, mask, m.S, m.H, m.c, scale, out);
        return out;
    }
    const at::Tensor pf = past.to(at::kFloat), &ff = fresh;
    at::Tensor scores = at::cat({at::bmm(q, pf.transpose(1, 2)), at::bmm(q, ff.transpose(1, 2))}, -1);
    scores = scores.view({m.B, m.S, m.H, m.T + m.S}).mul_(scale).masked_fill_(mask.logical_not().unsqueeze(2), -INFINITY);
    const at::Tensor probs = at::_softmax(scores, -1, false).view({m.B, m.S * m.H, m.T + m.S});
    return at::baddbmm(at::bmm(probs.narrow(-1, m.T, m.S), ff.narrow(-1, 0, m.c)), probs.narrow(-1, 0, m.T),
                       pf.narrow(-1, 0, m.c))
        .contiguous();
}

// w [H, d + dv, c] in bf16
static at::Tensor mla_attention(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& past,
                                const at::Tensor& fresh, const at::Tensor& mask, const at::Tensor& w, double scale) {
    const bool ok_w = w.dim() == 3 && q_nope.dim() == 4 && w.size(0) == q_nope.size(2) && w.is_contiguous() &&
                      w.scalar_type() == at::kBFloat16;
    const int64_t c = w.dim() == 3 ? w.size(2) : 0, dv = ok_w ? w.size(1) - q_nope.size(3) : 0;
    const MlaShape m = mla_check("mla_attention", q_nope, q_pe, past, fresh, mask, c, dv, ok_w,
                                 "a contiguous bf16 w [H, d + dv, c] (c <= 1024)");
    auto [q_rows, q] = mla_queries(q_nope, q_pe, m);
    int code = nanoseek_mla_product(0, q_rows.data_ptr<float>(), q_rows.stride(2), q_rows.stride(1),
                                    (const uint16_t*)w.data_ptr(), q.data_ptr<float>(), c + m.r, m.H * (c + m.r), m.H,
                                    m.M, m.d, dv, c, isa_here);
    TORCH_CHECK(code == 0, "MLA kernel failed (code ", code, ")");
    const at::Tensor out_latent = mla_latent_outputs(q, past, fresh, mask, m, scale);
    at::Tensor out = at::empty({m.B, m.S, m.H, dv}, q.options());
    code = nanoseek_mla_product(1, out_latent.data_ptr<float>(), c, m.H * c, (const uint16_t*)w.data_ptr(),
                                out.data_ptr<float>(), dv, m.H * dv, m.H, m.M, m.d, dv, c, isa_here);
    TORCH_CHECK(code == 0, "MLA kernel failed (code ", code, ")");
    return out;
}

// kv_b_proj in int4 as QuantLinear holds it: qweight uint8 [H * (d + dv), c/2], scales uint8 and zeros int8
// [H * (d + dv), c/32], units fp32 [H * (d + dv), 2] (c a multiple of 64)
static at::Tensor mla_attention_int4(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& past,
                                     const at::Tensor& fresh, const at::Tensor& mask, const at::Tensor& qweight,
                                     const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& units,
                                     double scale) {
    const int64_t H = q_nope.dim() == 4 ? q_nope.size(2) : 0, d = q_nope.dim() == 4 ? q_nope.size(3) : 0;
    const int64_t N = qweight.dim() == 2 ? qweight.size(0) : 0, c = qweight.dim() == 2 ? 2 * qweight.size(1) : 0;
    bool ok_w = H > 0 && N % H == 0 && N / H > d && c % 64 == 0;
    const std::vector<std::tuple<const at::Tensor*, at::ScalarType, int64_t>> wants = {
        {&qweight, at::kByte, c / 2}, {&scales, at::kByte, c / 32}, {&zeros, at::kChar, c / 32}, {&units, at::kFloat, 2}};
    for (const auto& [t, dtype, width] : wants)
        ok_w = ok_w && t->scalar_type() == dtype && t->dim() == 2 && t->size(0) == N && t->size(1) == width &&
               t->is_contiguous() && t->device().is_cpu();
    const int64_t dv = ok_w ? N / H - d : 0;
    const MlaShape m = mla_check("mla_attention_int4", q_nope, q_pe, past, fresh, mask, c, dv, ok_w,
                                 "kv_b_proj's int4 qweight uint8 [H * (d + dv), c/2], scales uint8 and zeros int8 "
                                 "[H * (d + dv), c/32], units fp32 [H * (d + dv), 2], contiguous (c a multiple of 64, "
                                 "at most 1024)");
    const uint8_t *w = qweight.data_ptr<uint8_t>(), *s = scales.data_ptr<uint8_t>();
    const int8_t* z = zeros.data_ptr<int8_t>();
    const float* u = units.data_ptr<float>();
    auto [q_rows, q] = mla_queries(q_nope, q_pe, m);
    int code = nanoseek_mla_key_int4(q_rows.data_ptr<float>(), q_rows.stride(2), q_rows.stride(1), w, s, z, u,
                                     q.data_ptr<float>(), c + m.r, m.H * (c + m.r), m.H, m.M, m.d, dv, c, isa_here);
    TORCH_CHECK(code == 0, "MLA kernel failed (code ", code, ")");
    // the value product: each head's dv value rows against its M latent outputs, one int4 product a head (all in
    // one kernel call), reading and writing head-major rows [H, M, *]
    const at::Tensor out_latent = mla_latent_outputs(q, past, fresh, mask, m, scale);  // (M, H, c)
    const at::Tensor x = m.M == 1 ? out_latent : out_latent.view({m.M, m.H, c}).transpose(0, 1).contiguous();
    at::Tensor y = at::empty({m.H, m.M, dv}, q.options());
    std::vector<Int4Product> products;
    for (int64_t h = 0; h < m.H; h++) {
        const int64_t row = h * (m.d + dv) + m.d;  // the head's first value row
        products.push_back({x.data_ptr<float>() + h * m.M * c, m.M, c, w + row * (c / 2), s + row * (c / 32),
                            z + row * (c / 32), u + 2 * row, dv, y.data_ptr<float>() + h * m.M * dv});
    }
    code = nanoseek_int4_linear_many(products.data(), products.size(), isa_here);
    TORCH_CHECK(code == 0, "int4 kernel failed (code ", code, ") on MLA's value product");
    return m.M == 1 ? y.view({m.B, m.S, m.H, dv}) : y.transpose(0, 1).contiguous().view({m.B, m.S, m.H, dv});
}

// The attention between the products alone, for MLA's absorbed attention in Python (a float kv_b_proj): q [B, S*H, c + r]
// (the queries in the latent space with their rotary parts), past [B, T, c + r] (fp32, fp16 or bf16), fresh [B, S, c + r]
// (fp32), mask [B, S, T + S]; -> [B, S*H, c].
static at::Tensor mla_latent_attention(const at::Tensor& q, const at::Tensor& past, const at::Tensor& fresh,
                                       const at::Tensor& mask, int64_t c, double scale) {
    TORCH_CHECK(isa_here > 0, "nanoseek's MLA kernel is not available here");
    bool ok = q.dim() == 3 && past.dim() == 3 && fresh.dim() == 3 && mask.dim() == 3 && mask_ok(mask);
    for (const at::Tensor* t : {&q, &past, &fresh})
        ok = ok && t->device().is_cpu() && t->stride(2) == 1;
    ok = ok && q.scalar_type() == at::kFloat && latents_ok(past, fresh);
    const int64_t B = ok ? q.size(0) : 0, S = ok ? fresh.size(1) : 0, T = ok ? past.size(1) : 0, w = ok ? q.size(2) : 0;
    ok = ok && S > 0 && q.size(1) % S == 0 && 0 < c && c <= w && c <= 1024 && w <= 1024 + 128 && past.size(0) == B && past.size(2) == w &&
         fresh.size(0) == B && fresh.size(2) == w && mask.sizes() == at::IntArrayRef({B, S, T + S});
    TORCH_CHECK_VALUE(ok, "mla_latent_attention: q ", q.sizes(), ", past ", past.sizes(), ", fresh ", fresh.sizes(),
                      ", mask ", mask.sizes(), ", c ", c, ": wants fp32 [B, S*H, w], [B, T, w], [B, S, w] (the cached latents ",
                      "fp32, fp16 or bf16, the new ones fp32) on the CPU (each row's w numbers adjacent), a bool or uint8 ",
                      "mask [B, S, T + S], 0 < c <= min(w, 1024), w <= 1152");
    const at::Tensor qc = q.contiguous(), mc = mask.contiguous();
    at::Tensor out = at::empty({B, q.size(1), c}, qc.options());
    latent_kernel(qc, past, fresh, mc, S, q.size(1) / S, c, scale, out);
    return out;
}

// Grouped-query attention over the cache while decoding (GQA.cached_attention in nanoseek/model/attention.py): q
// [B, S, H, d] (rotated), past [B, 2 * Hkv, T, d] (the cache's keys and values of each kv head in turn, read where they
// lie: fp32, fp16 or bf16), fresh [B, S, 2 * Hkv, d] (the new tokens' own), mask [B, S, T + S]; -> [B, S, H, d] in q's
// dtype. One pass of mla.cpp's kernel over each sequence's kv heads (a batch row each, its H / Hkv query heads the
// rows), each key and value read once, widened to fp32 as it is loaded.
static at::Tensor gqa_attention(const at::Tensor& q, const at::Tensor& past, const at::Tensor& fresh,
                                const at::Tensor& mask, double scale) {
    TORCH_CHECK(isa_here > 0, "nanoseek's attention kernel is not available here");
    bool ok = q.dim() == 4 && past.dim() == 4 && fresh.dim() == 4 && mask.dim() == 3 && mask_ok(mask) &&
              q.is_floating_point() && fresh.is_floating_point();
    for (const at::Tensor* t : {&q, &past, &fresh, &mask})
        ok = ok && t->device().is_cpu();
    const at::ScalarType kind = ok ? past.scalar_type() : at::kFloat;
    ok = ok && (kind == at::kFloat || kind == at::kHalf || kind == at::kBFloat16) && past.stride(3) == 1;
    const int64_t B = ok ? q.size(0) : 0, S = ok ? q.size(1) : 0, H = ok ? q.size(2) : 0, d = ok ? q.size(3) : 0;
    const int64_t Hkv = ok ? past.size(1) / 2 : 0, T = ok ? past.size(2) : 0;
    ok = ok && S > 0 && Hkv > 0 && past.size(1) == 2 * Hkv && H % Hkv == 0 && 0 < d && d <= 1024 &&
         past.size(0) == B && past.size(3) == d && fresh.sizes() == at::IntArrayRef({B, S, 2 * Hkv, d}) &&
         mask.sizes() == at::IntArrayRef({B, S, T + S});
    TORCH_CHECK_VALUE(ok, "gqa_attention: q ", q.sizes(), ", past ", past.scalar_type(), " ", past.sizes(), ", fresh ",
                      fresh.sizes(), ", mask ", mask.sizes(), ": wants q [B, S, H, d], past [B, 2 * Hkv, T, d] (fp32, ",
                      "fp16 or bf16, each row's d numbers adjacent), fresh [B, S, 2 * Hkv, d], a bool or uint8 mask ",
                      "[B, S, T + S], all on the CPU, H a multiple of Hkv, d <= 1024");
    const int64_t g = H / Hkv;
    // batch rows (sequence, kv head): each one's keys 2 * past.stride(1) apart (the cache's layout; else a copy), its
    // values past.stride(1) after its keys; the queries and new entries laid out alike (copies only when S > 1)
    const at::Tensor kv = past.stride(0) == Hkv * 2 * past.stride(1) ? past : past.contiguous();
    const at::Tensor keys = at::from_blob(kv.data_ptr(), {B * Hkv, T, d}, {2 * kv.stride(1), kv.stride(2), 1},
                                          kv.options());
    const at::Tensor rows = q.to(at::kFloat).view({B, S, Hkv, g, d}).permute({0, 2, 1, 3, 4}).contiguous()
                                .view({B * Hkv, S * g, d});
    const at::Tensor own = fresh.to(at::kFloat).view({B, S, Hkv, 2, d}).permute({0, 2, 1, 3, 4}).contiguous()
                               .view({B * Hkv, S, 2 * d});
    at::Tensor out = at::empty({B * Hkv, S * g, d}, rows.options());
    latent_kernel(rows, keys, own, mask.contiguous(), S, g, d, scale, out, kv.stride(1), d, Hkv);
    const at::Tensor y = S == 1 ? out.view({B, S, H, d})
                                : out.view({B, Hkv, S, g, d}).permute({0, 2, 1, 3, 4}).reshape({B, S, H, d});
    return y.to(q.scalar_type());
}

// A small float mixture-of-experts layer for a few tokens over its stacked experts (float.cpp; what
// MoE.selected_experts computes): x [T, D], the routed experts' weights and indices [T, k], gate_up [2 * chunks * I, D]
// and down [D, chunks * I] with the routed experts' chunks first and the shared ones (every token's, weight 1) after.
// Returns [T, D] in x's dtype.
static at::Tensor float_experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& indices,
                                const at::Tensor& gate_up, const at::Tensor& down, int64_t routed, int64_t chunks) {
    TORCH_CHECK(isa_here > 0, "nanoseek's expert kernel is not available here");
    const int64_t width = isa_here == 2 ? 16 : 8;
    bool ok = x.dim() == 2 && x.is_floating_point() && x.device().is_cpu() && indices.dim() == 2 &&
              indices.size(0) == x.size(0) && !indices.is_floating_point() && weights.sizes() == indices.sizes() &&
              0 < routed && routed <= chunks && gate_up.dim() == 2 && down.dim() == 2;
    const int64_t T = ok ? x.size(0) : 0, D = ok ? x.size(1) : 0, I = ok ? down.size(1) / chunks : 0;
    for (const at::Tensor* t : {&gate_up, &down})
        ok = ok && t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu();
    ok = ok && I > 0 && D % width == 0 && I % width == 0 && down.size(0) == D && down.size(1) == chunks * I &&
         gate_up.size(0) == 2 * chunks * I && gate_up.size(1) == D;
    TORCH_CHECK_VALUE(ok, "float_experts: x ", x.scalar_type(), " ", x.sizes(), ", weights ", weights.sizes(),
                      ", indices ", indices.sizes(), ", gate_up ", gate_up.scalar_type(), " ", gate_up.sizes(), ", down ",
                      down.scalar_type(), " ", down.sizes(), ", routed ", routed, ", chunks ", chunks, ": wants x float ",
                      "[T, D] on the CPU, weights and indices [T, k], fp32 contiguous gate_up [2 * chunks * I, D] and down ",
                      "[D, chunks * I], D and I multiples of ", width, ", 0 < routed <= chunks");
    const int64_t k = indices.size(1), J = k + chunks - routed;
    const at::Tensor xf = x.to(at::kFloat).contiguous(), wf = weights.to(at::kFloat).contiguous(),
                     idx = indices.to(at::kLong).contiguous();
    std::vector<int64_t> chunk(T * J);
    std::vector<float> scale(T * J);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < J; j++) {
            const int64_t e = j < k ? idx.data_ptr<int64_t>()[t * k + j] : routed + j - k;
            TORCH_CHECK_VALUE(0 <= e && e < routed + (j >= k) * (chunks - routed), "float_experts: expert index ", e,
                              " out of range [0, ", routed, ")");
            chunk[t * J + j] = e;
            scale[t * J + j] = j < k ? wf.data_ptr<float>()[t * k + j] : 1.f;
        }
    at::Tensor y = at::empty({T, D}, xf.options());
    int code = nanoseek_float_experts(xf.data_ptr<float>(), T, D, chunk.data(), scale.data(), J, gate_up.data_ptr<float>(),
                                      down.data_ptr<float>(), chunks, I, y.data_ptr<float>(), isa_here);
    TORCH_CHECK(code == 0, "expert kernel failed (code ", code, ")");
    return y.to(x.scalar_type());
}

// x [M, K] (float) @ weight.T -> [M, N] in x's dtype, for an fp32 or bf16 weight [N, K] (bf16: computed in fp32, the
// weight widened as it is read): nanoseek's kernel for up to FLOAT_LINEAR_ROWS rows (float.cpp), torch's product for
// more, or where the kernel does not take the operands.
// On a 2-vCPU AMD EPYC Zen4, against torch.mm: [2048, 256] (the shipped model's head)
// 1 row 31-33 us against 53-77 (torch.mv 52-59), 2 rows 39-41 against 101-108, 4: 55 against 108, 8: 106 against
// 148-153, 16: 205 against 232, 32: 404 against 397; [1536, 1536] 1 row 121-125 against 157-168, 8: 424 against 720,
// 16: 836 against 1,189, 32: 1,592 against 2,090; [256, 128] 16 rows 18 against 15 (its short rows)
static constexpr int64_t FLOAT_LINEAR_ROWS = 16;

static at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight) {
    TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.is_floating_point(),
                      "float_linear: x ", x.scalar_type(), " ", x.sizes(), ", weight ", weight.scalar_type(), " ",
                      weight.sizes(), ": wants x float [M, K] and weight [N, K]");
    const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
    const bool bf16 = weight.scalar_type() == at::kBFloat16;
    if (isa_here == 0 || M > FLOAT_LINEAR_ROWS || K % (isa_here == 2 ? 16 : 8) ||
        (weight.scalar_type() != at::kFloat && !bf16) || !weight.is_contiguous() || !weight.device().is_cpu() ||
        !x.device().is_cpu())
        return at::mm(x, weight.t().to(x.scalar_type()));
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({M, N}, xf.options());
    int code = nanoseek_float_linear(xf.data_ptr<float>(), M, K, weight.data_ptr(), bf16, N, y.data_ptr<float>(), isa_here);
    TORCH_CHECK(code == 0, "float linear kernel failed (code ", code, ")");
    return y.to(x.scalar_type());
}

// A forward's staged cache entries written in place (KVCache.store): staged[i] [B, S, heads, width] into layer
// first_layer + i of kv [layers, rows, heads, max_len, width] (contiguous, the same dtype), rows first_row.., at the
// positions pos [B, S]. One call for what torch does in a stack and an index_put_ (on a 2-vCPU Zen4, the shipped model's
// compiled decoding: storing and committing a step 45 against 65 us at batch 1, 45-68 against 91-143 at batch 8; the
// index_put_ alone took 28-48)
static void cache_write(const at::Tensor& kv, at::TensorList staged, const at::Tensor& pos, int64_t first_layer,
                        int64_t first_row) {
    TORCH_CHECK_VALUE(kv.dim() == 5 && kv.is_contiguous() && kv.device().is_cpu() && pos.dim() == 2 &&
                          pos.scalar_type() == at::kLong && pos.device().is_cpu(),
                      "cache_write: kv ", kv.sizes(), ", pos ", pos.scalar_type(), " ", pos.sizes(),
                      ": wants a contiguous CPU kv [layers, rows, heads, max_len, width] and int64 positions [B, S]");
    const int64_t L = kv.size(0), R = kv.size(1), H = kv.size(2), P = kv.size(3), W = kv.size(4);
    const int64_t B = pos.size(0), S = pos.size(1), n = (int64_t)staged.size(), item = kv.element_size();
    TORCH_CHECK_VALUE(0 <= first_layer && first_layer + n <= L && 0 <= first_row && first_row + B <= R,
                      "cache_write: layers ", first_layer, "+", n, " of ", L, ", rows ", first_row, "+", B, " of ", R);
    const at::Tensor where = pos.contiguous();
    const int64_t* p = where.data_ptr<int64_t>();
    for (int64_t j = 0; j < B * S; j++)
        TORCH_CHECK_VALUE(0 <= p[j] && p[j] < P, "cache_write: position ", p[j], " outside [0, ", P, ")");
    char* base = (char*)kv.data_ptr();
    for (int64_t i = 0; i < n; i++) {
        TORCH_CHECK_VALUE(staged[i].sizes() == at::IntArrayRef({B, S, H, W}) && staged[i].scalar_type() == kv.scalar_type() &&
                              staged[i].device().is_cpu(),
                          "cache_write: entries ", staged[i].scalar_type(), " ", staged[i].sizes(), ": wants ",
                          kv.scalar_type(), " [", B, ", ", S, ", ", H, ", ", W, "]");
        const at::Tensor src = staged[i].contiguous();
        const char* from = (const char*)src.data_ptr();
        for (int64_t b = 0; b < B; b++)
            for (int64_t s = 0; s < S; s++)
                for (int64_t h = 0; h < H; h++)
                    memcpy(base + ((((first_layer + i) * R + first_row + b) * H + h) * P + p[b * S + s]) * W * item,
                           from + ((b * S + s) * H + h) * W * item, W * item);
    }
}

// A whole decode step of a small MLA model with float weights (step.cpp): ids (B token ids, each selected row's last)
// -> logits [B, V] fp32 and each row's greedy choice [B] (int64, the first largest logit, as argmax picks it), the new
// latents written into kv [layers, rows, 1, max_len, c + r] (fp32, fp16 or bf16, contiguous) for rows first_row.. at
// their lengths (lengths [rows] int64, each advanced by one). table (int64) and numbers (float64) describe the model
// as nanoseek/inference/native.py writes them; the weights they point to are the caller's to keep alive and unchanged
// in shape.
static std::tuple<at::Tensor, at::Tensor> mla_step(at::IntArrayRef ids, const at::Tensor& kv, const at::Tensor& lengths,
                                                   int64_t first_row, const at::Tensor& table, const at::Tensor& numbers,
                                                   int64_t vocab) {
    TORCH_CHECK(isa_here > 0, "nanoseek's decode step is not available here");
    const at::ScalarType kind = kv.scalar_type();
    const bool ok = !ids.empty() && kv.dim() == 5 && kv.size(2) == 1 && kv.is_contiguous() && kv.device().is_cpu() &&
                    (kind == at::kFloat || kind == at::kHalf || kind == at::kBFloat16) && lengths.dim() == 1 &&
                    lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.size(0) == kv.size(1) &&
                    lengths.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 1 &&
                    table.is_contiguous() && numbers.scalar_type() == at::kDouble && numbers.dim() == 1 &&
                    numbers.is_contiguous() && vocab > 0;
    TORCH_CHECK_VALUE(ok, "mla_step: ", ids.size(), " ids, kv ", kind, " ", kv.sizes(), ", lengths ",
                      lengths.scalar_type(), " ", lengths.sizes(), ": wants token ids, a contiguous CPU cache [layers, ",
                      "rows, 1, max_len, width] in fp32, fp16 or bf16, int64 lengths [rows], an int64 table and float64 ",
                      "numbers");
    const int64_t B = (int64_t)ids.size();
    at::Tensor logits = at::empty({B, vocab}, lengths.options().dtype(at::kFloat));
    at::Tensor best = at::empty({B}, lengths.options());
    const int code = nanoseek_mla_step(table.data_ptr<int64_t>(), table.numel(), numbers.data_ptr<double>(),
                                       numbers.numel(), ids.data(), B, kv.data_ptr(),
                                       kind == at::kHalf ? 1 : kind == at::kBFloat16 ? 2 : 0, kv.size(1), kv.size(3),
                                       first_row, lengths.data_ptr<int64_t>(), logits.data_ptr<float>(), isa_here);
    TORCH_CHECK_VALUE(code != 2, "mla_step: token ids must be in [0, ", vocab, ")");
    TORCH_CHECK_VALUE(code != 3, "mla_step: a row's cache is full (", kv.size(3), " positions)");
    TORCH_CHECK_VALUE(code == 0, "mla_step: rows ", first_row, "+", B, " of ", kv.size(1),
                      ", or a table this library does not read");
    const float* l = logits.data_ptr<float>();
    for (int64_t b = 0; b < B; b++) {  // (a NaN counts as the largest, as argmax has it)
        int64_t top = 0;
        for (int64_t v = 1; v < vocab && !std::isnan(l[b * vocab + top]); v++)
            if (l[b * vocab + v] > l[b * vocab + top] || std::isnan(l[b * vocab + v])) top = v;
        best.data_ptr<int64_t>()[b] = top;
    }
    return {logits, best};
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
    m.impl("mla_step", &mla_step);
    m.impl("cache_write", &cache_write);
    m.impl("float_linear", &float_linear);
    m.impl("mla_latent_attention", &mla_latent_attention);
    m.impl("gqa_attention", &gqa_attention);
    m.impl("int4_linear", &int4_linear);
    m.impl("int8_avx2_linear", &int8_avx2_linear);
    m.impl("int4_experts", &int4_experts);
    m.impl("mla_attention", &mla_attention);
    m.impl("mla_attention_int4", &mla_attention_int4);
    m.impl("float_experts", &float_experts);
}
