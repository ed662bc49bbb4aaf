"""nanoseek's own int4 CPU kernel (nanoseek/kernels): against an exact emulation of its arithmetic on each
instruction set this CPU has, at every row count and in chunks; its error against the float product; how
QuantLinear takes it (decoding rows, in and out of compiled graphs); and the fallback where it cannot be built."""

import pytest
import torch

from nanoseek import kernels, quant
from nanoseek.quant import FAST_INT4_ROWS, QuantLinear

HERE = kernels.int4_isa()
needs_kernel = pytest.mark.skipif(HERE == 0 or kernels.library() is None, reason="no AVX2 or no C++ compiler here")
ISAS = [isa for isa in (kernels.ISA_AVX2, kernels.ISA_AVX512) if isa <= HERE]


def int4_layer(K: int, N: int, group_size: int = 32, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    layer = QuantLinear(K, N, 4, group_size=group_size)
    layer.quantize_(torch.randn(N, K) * 0.05)
    return layer


def emulate(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """The kernel's arithmetic, written plainly in float64: x quantized to int8 per block of 32 (d = max|x| / 127,
    rounded half to even), integer dot products with the codes, then
    sum_g scale * d * (codes . xq) + zero * sum(x) + 8 * scale * (sum(x) - d * sum(xq))."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = (blocks * inv).round().double()  # (M, G, 32); the kernel multiplies in fp32 too, then rounds
    d = (amax / 127).double().squeeze(-1)  # (M, G)
    codes = layer.codes().double().view(layer.out_features, K // 32, 32)  # (N, G, 32)
    s, z = layer.scales.double(), layer.zeros.double()  # (N, G)
    dot = torch.einsum("mgk,ngk->mng", xq, codes)
    xsum = blocks.double().sum(-1)  # (M, G)
    resid = xsum - d * xq.sum(-1)
    return (s * d[:, None] * dot + z * xsum[:, None] + 8 * s * resid[:, None]).sum(-1)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K, N", [(64, 1), (128, 3), (256, 200), (192, 64), (1024, 70)])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17])
def test_the_kernel_computes_what_it_says_on_each_instruction_set(isa, K, N, rows):
    layer = int4_layer(K, N, seed=rows)
    x = torch.randn(rows, K) * torch.logspace(-3, 2, rows)[:, None]  # rows of very different sizes
    x[0, :32] = 0  # a block of zeros (scale 0)
    got = kernels.int4_products(x, layer.qweight, layer.scales, layer.zeros, isa=isa)
    want = emulate(x, layer)
    assert got.shape == (rows, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_the_kernel_is_as_close_to_the_float_product_as_bf16_activations():
    """Quantizing the activations to int8 per block of 32 costs about what bf16 activations do (torch's kernel):
    the centred codes keep the rounding errors from adding up (uncentred: about twice the error)."""
    layer = int4_layer(1024, 512)
    x = torch.randn(8, 1024)
    exact = x.double() @ layer.dequantize().double().t()
    ours = kernels.int4_products(x, layer.qweight, layer.scales, layer.zeros).double()
    bf16 = (x.bfloat16().double() @ layer.dequantize(torch.bfloat16).double().t())
    err, bf16_err = ((ours - exact).norm() / exact.norm()).item(), ((bf16 - exact).norm() / exact.norm()).item()
    assert err < 2 * bf16_err and err < 0.01, (err, bf16_err)


@needs_kernel
def test_quantized_layers_decode_through_the_kernel_and_never_take_torch_s_layout():
    layer = int4_layer(256, 96)
    reference = layer.dequantize()
    for rows in (1, 8, FAST_INT4_ROWS, FAST_INT4_ROWS + 1):  # the last: a prompt, the weight converted
        x = torch.randn(1, rows, 256)
        out = layer(x)
        assert layer._fast and not layer._kernel_layout
        torch.testing.assert_close(out, x @ reference.t(), atol=0.02, rtol=0.02)
        if rows <= FAST_INT4_ROWS:  # exactly the kernel's products
            torch.testing.assert_close(out[0], kernels.int4_products(x[0], layer.qweight, layer.scales, layer.zeros),
                                       rtol=0, atol=0)
    assert torch.equal(layer.state_dict()["qweight"], layer.qweight)  # held in the documented layout
    # bf16 activations go through it too, and come back in bf16
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("K, group_size", [(96, 32), (256, 64)])
def test_layers_the_kernel_cannot_take_keep_torch_s_kernel(K, group_size):
    layer = int4_layer(K, 64, group_size=group_size)
    x = torch.randn(1, K)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), atol=0.02, rtol=0.02)
    assert layer._fast is False and layer._kernel_layout


@needs_kernel
def test_a_compiled_graph_calls_the_kernel():
    layer = int4_layer(256, 128)
    x = torch.randn(3, 256)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: the operator, no graph break around it
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)


def test_without_a_compiler_int4_keeps_torch_s_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        for cxx, warns in (("/nonexistent/c++", False), ("false", True)):  # missing; present but failing
            monkeypatch.setenv("CXX", cxx)
            kernels._library.cache_clear()
            if warns and HERE:
                with pytest.warns(UserWarning, match="int4 CPU kernel could not be built"):
                    assert kernels.library() is None
            assert kernels.library() is None and not kernels.int4_available(256, 32)
            layer = int4_layer(256, 64)
            x = torch.randn(2, 256)
            torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), atol=0.02, rtol=0.02)
            assert layer._fast is False
    finally:
        kernels._library.cache_clear()
    assert quant.int4_available is kernels.int4_available
