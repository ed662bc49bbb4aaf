"""nanoseek's int8 kernel (kernels/int8.cpp, the operator nanoseek::int8_avx2_linear), what int8 layers multiply through on
CPUs with AVX2 where fbgemm's int8 products are not exact: against the same arithmetic in float64 (the activations
quantized per block of 32 as the kernel does), against the dequantized weight, what it refuses, and where QuantLinear
takes it."""

import pytest
import torch

from conftest import operator_calls
from nanoseek import kernels, quant
from nanoseek.quant import FAST_INT8_ROWS, QuantLinear

pytestmark = pytest.mark.skipif(not kernels.int8_available(32), reason="no AVX2 or no C++ compiler here")


def layer_of(N: int, K: int, dtype=torch.float32, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(K, N, 8, dtype=dtype)
    layer.quantize_(torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g))  # (rows of different scales)
    return layer


def reference(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized per block of 32 (d = max|x| / 127, codes rounded to nearest
    even, as the kernel does in fp32), times the codes, times d and the row's scale."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = (blocks * inv).round()  # (fp32, as the kernel multiplies)
    d = (amax / 127).double()
    codes = layer.codes().double().view(-1, K // 32, 32)
    dots = torch.einsum("mgk,ngk->mng", q.double(), codes)  # (M, N, groups)
    return (dots * d.view(M, 1, K // 32)).sum(-1) * layer.scales.double()


# (N, K): R1-Distill-1.5B's down_proj's inputs, K of an odd number of blocks (a tail past the kernel's pairs of blocks),
# a block's worth of inputs, rows of no round number
SHAPES = [(64, 8960), (83, 96), (7, 32), (200, 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 8, 9, 17])
def test_int8_kernel_computes_the_product_of_its_quantized_activations(shape, rows):
    N, K = shape
    layer = layer_of(N, K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)) * 3
    x[:, :32] *= 50  # (an outlier block: its own scale, the others unharmed)
    got = torch.ops.nanoseek.int8_avx2_linear(x, layer.qweight, layer.scales)
    assert got.shape == (rows, N) and got.dtype == torch.float32
    want = reference(x, layer)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * (want.abs().max().item() if rows else 0) + 1e-6, rtol=1e-5)
    if rows:  # and near the float product of the weight the codes stand for (the activations' rounding: ~0.5%)
        exact = x.double() @ layer.dequantize(torch.float64).t()
        assert ((got.double() - exact).norm() / exact.norm()).item() < 0.02


def test_int8_kernel_takes_any_float_activations_and_refuses_what_it_cannot_read():
    layer = layer_of(40, 64)
    x = torch.randn(3, 2, 64)[:, 0]  # (rows apart)
    torch.testing.assert_close(torch.ops.nanoseek.int8_avx2_linear(x, layer.qweight, layer.scales).double(),
                               reference(x.contiguous(), layer), atol=1e-4, rtol=1e-5)
    half = torch.ops.nanoseek.int8_avx2_linear(x.bfloat16(), layer.qweight, layer.scales)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), reference(x.bfloat16().float(), layer), atol=1e-4, rtol=1e-5)
    broken = x.clone()
    broken[1, 40] = float("nan")
    out = torch.ops.nanoseek.int8_avx2_linear(broken, layer.qweight, layer.scales)  # NaN in, NaN out (that row only)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    broken[1, 40] = float("inf")
    assert torch.ops.nanoseek.int8_avx2_linear(broken, layer.qweight, layer.scales)[1].isnan().all()
    bad = [(torch.randn(3, 48), layer.qweight[:, :48].contiguous(), layer.scales),  # inputs not a multiple of 32
           (x, layer.qweight.to(torch.int16), layer.scales), (x, layer.qweight, layer.scales.double()),
           (x, layer.qweight, layer.scales[:10]), (x, layer.qweight.t(), layer.scales), (x[0], layer.qweight, layer.scales),
           (x, layer.qweight.repeat(1, 2)[:, ::2], layer.scales), (x, layer.qweight, layer.scales.repeat(2)[::2]),
           (x, layer.qweight[0], layer.scales)]  # (rows apart; scales apart; not a matrix)
    for args in bad:
        with pytest.raises(ValueError, match="wants"):
            torch.ops.nanoseek.int8_avx2_linear(*args)


@pytest.mark.skipif(quant.fbgemm_int8(), reason="fbgemm's int8 products are exact here (VNNI): int8 layers take them")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_multiply_through_the_kernel_up_to_its_rows(dtype):
    """An int8 layer takes the kernel, with or without autograd recording (the same products either way, and a gradient
    to the activations): in an fp32 model at every row count (its prompts would multiply in fp32, slower than the
    kernel), in a bf16 model up to FAST_INT8_ROWS rows, converting its weight past that."""
    layer = layer_of(96, 128, dtype=dtype)
    for rows in (1, 8, FAST_INT8_ROWS // 2, FAST_INT8_ROWS // 2 + 1, FAST_INT8_ROWS + 1):  # (2 x rows: the layer's)
        x = torch.randn(2, rows, 128, dtype=dtype)
        with torch.no_grad():
            calls = operator_calls(lambda: layer(x))
            out = layer(x)
        assert out.dtype == dtype and out.shape == (2, rows, 96)
        fp32 = dtype == torch.float32  # (bf16: the output rounded to bf16)
        kernel = fp32 or 2 * rows <= FAST_INT8_ROWS
        assert calls == ({"nanoseek::int8_avx2_linear": 1} if kernel else {})
        if kernel:
            want = reference(x.reshape(-1, 128).float(), layer).view(2, rows, 96)
            torch.testing.assert_close(out.double(), want, atol=(1e-5 if fp32 else 1e-2) * want.abs().max().item(),
                                       rtol=1e-5 if fp32 else 1e-2)
        x.requires_grad_(True)
        recorded = layer(x)
        assert torch.equal(recorded.detach(), out)
        recorded.sum().backward()
        grad = layer.dequantize().sum(0).expand_as(x)
        torch.testing.assert_close(x.grad.float(), grad, atol=1e-4 if fp32 else 0.1, rtol=1e-4 if fp32 else 0.02)


@pytest.mark.skipif(quant.fbgemm_int8(), reason="fbgemm's int8 products are exact here (VNNI): int8 layers take them")
def test_a_compiled_graph_calls_the_kernel():
    """Traced before any eager call (the layer decides inside the trace, its bf16 scales widened in the graph), in one
    graph: the operator, no graph break around it, the eager products."""
    layer = layer_of(64, 128, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        compiled(x)  # (recompiled once: the first trace set what the layer decided)
        assert operator_calls(lambda: compiled(x)) == {"nanoseek::int8_avx2_linear": 1}
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


@pytest.mark.skipif(quant.fbgemm_int8(), reason="fbgemm's int8 products are exact here (VNNI): int8 layers take them")
def test_the_kernel_reads_the_layer_as_it_is_now():
    """After a kernel call, new codes (quantize_), a loaded state and a cast each reach the kernel: the products follow
    the layer's weight as it is now, never the scales kept from before."""
    layer, other = layer_of(96, 128, seed=0), layer_of(96, 128, seed=1)
    x = torch.randn(2, 128)
    with torch.no_grad():
        layer(x)  # (keeps the fp32 scales the kernel reads)
        layer.quantize_(torch.randn(96, 128) * 3)
        torch.testing.assert_close(layer(x).double(), reference(x, layer), atol=1e-4, rtol=1e-5)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x).double(), reference(x, other), atol=1e-4, rtol=1e-5)
        layer.to(torch.bfloat16)  # bf16 scales now, widened again for the kernel
        want = reference(x.bfloat16().float(), layer)
        torch.testing.assert_close(layer(x.bfloat16()).double(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)
