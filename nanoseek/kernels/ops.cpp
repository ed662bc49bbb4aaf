// CPU implementations of nanoseek's operators (their schemas and fakes are defined in kernels/__init__.py) in
// C++, so that a call reaches the kernels without Python: from a compiled graph (whose C++ wrapper calls the
// operator) and eagerly. nanoseek::int4_linear, one int4 product: a 1.5B model's decode step makes ~200 such
// calls; through a Python implementation each cost ~10 us more than the kernel, through this ~2.
// nanoseek::int4_experts, a whole int4 mixture-of-experts layer for a few tokens (what MoE.int4_routed and the
// shared experts' own layers do through Python): one DeepSeek-V2-Lite layer for one token took 1.47-1.60 ms
// against 1.84-1.94 on a 2-vCPU Zen4 (its 43 MB of int4 weights read at ~30 GB/s take ~1.45).
// The one source built against torch's headers; without them the library is built from the others,
// int4_linear gets its Python implementation (kernels.int4_products) and int4_experts none.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

extern "C" int nanoseek_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
                                    const uint16_t* z, int64_t N, float* y, int isa);

static int isa_here = 0;  // the instruction set to run (kernels.int4_isa), told when the library is loaded
extern "C" void nanoseek_set_isa(int isa) { isa_here = isa; }

// x [rows, K] (float) @ W.T -> [rows, N] fp32; W as codes uint8 [N, K/2], scales and zeros bf16 [N, K/32]
static at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros) {
    TORCH_CHECK(isa_here > 0, "nanoseek's int4 kernel is not available here");
    const int64_t M = x.dim() == 2 ? x.size(0) : 0, K = x.dim() == 2 ? x.size(1) : 0, N = qweight.size(0);
    bool ok = x.dim() == 2 && x.is_floating_point() && x.device().is_cpu() && K % 64 == 0 &&
              qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(1) == K / 2 &&
              qweight.is_contiguous() && qweight.device().is_cpu();
    for (const at::Tensor* t : {&scales, &zeros})
        ok = ok && t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->size(0) == N && t->size(1) == K / 32 &&
             t->is_contiguous() && t->device().is_cpu();
    TORCH_CHECK_VALUE(ok, "int4 kernel: x ", x.scalar_type(), " ", x.sizes(), ", qweight ", qweight.scalar_type(), " ",
                      qweight.sizes(), ", scales ", scales.scalar_type(), " ", scales.sizes(), ", zeros ",
                      zeros.scalar_type(), " ", zeros.sizes(), ": wants x float [rows, K] on the CPU, K a multiple of 64, ",
                      "uint8 [N, K/2] codes, bf16 [N, K/32] scales and zeros, all contiguous");
    at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({M, N}, xf.options());
    int code = nanoseek_int4_linear(xf.data_ptr<float>(), M, K, qweight.data_ptr<uint8_t>(),
                                    (const uint16_t*)scales.data_ptr(), (const uint16_t*)zeros.data_ptr(), N,
                                    y.data_ptr<float>(), isa_here);
    TORCH_CHECK(code == 0, "int4 kernel failed (code ", code, ") on a product [M, K, N] [", M, ", ", K, ", ", N, "]");
    return y;
}


struct Int4Product {  // int4.cpp's: one product y [M, N] = x [M, K] @ W.T, M <= 8
    const float* x;
    int64_t M, K;
    const uint8_t* w;
    const uint16_t *s, *z;
    int64_t N;
    float* y;
};
extern "C" int nanoseek_int4_linear_many(const Int4Product* p, int64_t count, int isa);

// A mixture-of-experts layer whose experts are all int4 layers the kernel takes, for a few tokens (decoding),
// in one call: x [T, D] float, each token's chosen experts `indices` [T, k] and their gate weights `weights`
// [T, k]; table int64 [C, 10], a row per expert (the `routed` experts first, then any shared ones, which every
// token runs with weight 1): its gate, up and down projections' codes, scales and zeros (addresses, as
// QuantLinear holds them), then its intermediate size I. Returns sum over a token's experts of
// weight * down(silu(gate(x)) * up(x)), [T, D] in x's dtype. Every expert's gate and up products go in one
// kernel call, their down products in a second, each expert's weights read once for all the tokens that chose it.
static at::Tensor int4_experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& indices,
                               const at::Tensor& table, int64_t routed) {
    TORCH_CHECK(isa_here > 0, "nanoseek's int4 kernel is not available here");
    TORCH_CHECK_VALUE(x.dim() == 2 && x.is_floating_point() && x.device().is_cpu() && x.size(1) % 64 == 0 &&
                          indices.dim() == 2 && indices.size(0) == x.size(0) && !indices.is_floating_point() &&
                          weights.sizes() == indices.sizes() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                          table.size(1) == 10 && table.is_contiguous() && 0 < routed && routed <= table.size(0),
                      "int4_experts: x ", x.scalar_type(), " ", x.sizes(), ", weights ", weights.sizes(), ", indices ",
                      indices.scalar_type(), " ", indices.sizes(), ", table ", table.scalar_type(), " ", table.sizes(),
                      ", routed ", routed, ": wants x float [T, D] on the CPU (D a multiple of 64), weights and indices ",
                      "[T, k], an int64 table [experts, 10] with the routed ones first");
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
    at::Tensor gathered = T == 1 ? xf : xf.index_select(0, at::from_blob(token_of.data(), {T * k}, at::kLong));
    const float* xs = gathered.data_ptr<float>();
    std::vector<int64_t> offset;  // each run's place in the intermediate activations
    int64_t width = 0;
    for (const Run& r : runs) {
        const int64_t I = rows[r.expert * 10 + 9];
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
                                (const uint8_t*)row[3 * layer], (const uint16_t*)row[3 * layer + 1],
                                (const uint16_t*)row[3 * layer + 2], out_width, out + m0 * out_width});
    };
    for (size_t i = 0; i < runs.size(); i++) {
        const Run& r = runs[i];
        const int64_t* row = rows + r.expert * 10;
        const float* in = r.expert >= routed ? xf.data_ptr<float>() : T == 1 ? xs : xs + r.slot * D;
        for (int64_t layer : {0, 1}) add(in, D, r.n, layer, row[9], (layer ? up_out : gate_out) + offset[i], row);
    }
    int code = nanoseek_int4_linear_many(products.data(), products.size(), isa_here);
    TORCH_CHECK(code == 0, "int4 kernel failed (code ", code, ") on an MoE layer's gate and up products");
    at::Tensor h = act[0];
    at::silu_(h).mul_(act[1]);  // the intermediate activations, run after run
    at::Tensor out = at::empty({slots, D}, xf.options());
    products.clear();
    for (size_t i = 0; i < runs.size(); i++) {
        const Run& r = runs[i];
        const int64_t* row = rows + r.expert * 10;
        add(h.data_ptr<float>() + offset[i], row[9], r.n, 2, D, out.data_ptr<float>() + r.slot * D, row);
    }
    code = nanoseek_int4_linear_many(products.data(), products.size(), isa_here);
    TORCH_CHECK(code == 0, "int4 kernel failed (code ", code, ") on an MoE layer's down products");
    at::Tensor y = at::zeros({T, D}, xf.options());
    float *yp = y.data_ptr<float>(), *op = out.data_ptr<float>();
    for (int64_t s = 0; s < slots; s++) {
        float* dst = yp + token_of[s] * D;
        const float* src = op + s * D;
        const float g = weight_of[s];
        for (int64_t j = 0; j < D; j++) dst[j] += g * src[j];
    }
    return y.to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
    m.impl("int4_linear", &int4_linear);
    m.impl("int4_experts", &int4_experts);
}
