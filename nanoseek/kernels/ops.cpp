// The CPU implementation of the operator nanoseek::int4_linear (its schema and its fake are defined in
// kernels/__init__.py) in C++, so that a call reaches int4.cpp's kernel without Python: from a compiled
// graph (whose C++ wrapper calls the operator) and eagerly. A 1.5B model's decode step makes ~200 such
// calls; through a Python implementation each cost ~10 us more than the kernel, through this ~2.
// The one source built against torch's headers; without them the library is built from the others and the
// operator gets its Python implementation (kernels.int4_products).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("int4_linear", &int4_linear); }
