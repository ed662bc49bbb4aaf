"""nanoseek's own int4 CPU kernel (nanoseek/kernels): against an exact emulation of its arithmetic on each
instruction set this CPU has, at every row count and in chunks; its error against the float product; how
QuantLinear takes it (decoding rows, in and out of compiled graphs); and the fallback where it cannot be built."""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import operator_calls, randomize_
from nanoseek import kernels, quant
from nanoseek.model import ModelConfig, get_preset
from nanoseek.model import moe as moe_module
from nanoseek.model.moe import MoE
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
    sum_g scale * d * (codes . xq) + zero * sum(x) + 8 * scale * (sum(x) - d * sum(xq)), where a group's scale
    and zero are its codes times the row's units."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = (blocks * inv).round().double()  # (M, G, 32); the kernel multiplies in fp32 too, then rounds
    d = (amax / 127).double().squeeze(-1)  # (M, G)
    codes = layer.codes().double().view(layer.out_features, K // 32, 32)  # (N, G, 32)
    units = layer.units.double()
    s, z = layer.scales.double() * units[:, :1], layer.zeros.double() * units[:, 1:]  # (N, G)
    dot = torch.einsum("mgk,ngk->mng", xq, codes)
    xsum = blocks.double().sum(-1)  # (M, G)
    resid = xsum - d * xq.sum(-1)
    return (s * d[:, None] * dot + z * xsum[:, None] + 8 * s * resid[:, None]).sum(-1)


SHAPES = [(64, 1), (128, 3), (256, 200), (192, 64), (640, 70), (1024, 7), (1408, 5)]  # (K, N); 640, 1408: 20, 44 groups (AVX-512 takes 16 at a time)


@needs_kernel
@pytest.mark.parametrize("isa, K, N", [(isa, K, N) for isa in ISAS for K, N in SHAPES
                                       if K % kernels.ISA_K_MULTIPLE[isa] == 0])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17])
def test_the_kernel_computes_what_it_says_on_each_instruction_set(isa, K, N, rows):
    layer = int4_layer(K, N, seed=rows)
    x = torch.randn(rows, K) * torch.logspace(-3, 2, rows)[:, None]  # rows of very different sizes
    x[0, :32] = 0  # a block of zeros (scale 0)
    got = kernels.int4_products(x, layer.qweight, layer.scales, layer.zeros, layer.units, isa=isa)
    want = emulate(x, layer)
    assert got.shape == (rows, N) and got.dtype == torch.float32
    size = (x.abs().double() @ layer.dequantize().abs().double().t())  # each output's scale: sum |x| |W|
    assert ((got.double() - want).abs() <= 1e-5 * size).all(), ((got.double() - want).abs() / size).max()


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_row_holding_a_nan_or_an_infinity_gives_nan_in_that_row_only(isa, bad):
    layer = int4_layer(256, 70)
    x = torch.randn(3, 256)
    x[1, 100] = bad
    out = kernels.int4_products(x, layer.qweight, layer.scales, layer.zeros, layer.units, isa=isa)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


@needs_kernel
def test_the_operator_is_cpp_and_gives_the_kernels_products():
    """nanoseek::int4_linear, which int4 layers call eagerly and from compiled graphs: its C++ implementation
    (ops.cpp) where this machine builds it against torch's headers, the same products as int4_products at every
    row count and input dtype, and the same refusals (a ValueError naming the operands)."""
    if shutil.which("c++") or shutil.which("g++"):  # (the toolchain torch.compile needs compiles ops.cpp too)
        assert "ops.cpp" in torch._C._dispatch_dump("nanoseek::int4_linear").split("CPU: registered at ")[1].split()[0]
    layer = int4_layer(256, 70)
    for rows in (1, 3, 8, 9, 17):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 256).to(dtype)
            got = torch.ops.nanoseek.int4_linear(x, layer.qweight, layer.scales, layer.zeros, layer.units)
            assert got.dtype == torch.float32 and torch.equal(got, kernels.int4_products(x, *layer.int4_operands()))
    x = torch.randn(2, 256)
    args = (layer.qweight, layer.scales, layer.zeros, layer.units)
    for bad in ((x[:, :192], *args), (x, layer.qweight[:, :64], *args[1:]), (x, layer.qweight.int(), *args[1:]),
                (x, layer.qweight, layer.scales.float(), *args[2:]), (x, *args[:2], layer.zeros[:5], layer.units),
                (x, *args[:3], layer.units.double()), (x, *args[:3], layer.units.t()), (x, *args[:2], layer.zeros.byte(), layer.units),
                (x, layer.qweight.t().contiguous().t(), *args[1:]), (x[0], *args), (x.long(), *args)):
        with pytest.raises(ValueError, match="int4 kernel"):
            torch.ops.nanoseek.int4_linear(*bad)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_grouped_products_equal_each_product_alone(isa, threads):
    """int4_grouped: several weights of different shapes in one call (the rows of all of them split between the
    threads together), products sharing their activations, row offsets into larger tensors, more than 8 rows:
    each output exactly what the product alone gives."""
    layers = [int4_layer(K, N, seed=i) for i, (K, N) in enumerate([(256, 70), (256, 3), (192, 130), (640, 64), (256, 9)])]
    xa, xb, xc = torch.randn(20, 256), torch.randn(5, 192), torch.randn(4, 640)
    ya, yb, yc = torch.full((30, 70), 7.0), torch.full((17, 3), 7.0), torch.full((5, 130), 7.0)
    yd, ye = torch.full((4, 64), 7.0), torch.full((2, 9), 7.0)
    # (x, x_row, layer, y, y_row, rows): two weights read the same rows of xa, one reads other rows of it
    plan = [(xa, 2, layers[0], ya, 5, 17), (xa, 2, layers[1], yb, 0, 17), (xa, 0, layers[4], ye, 0, 2),
            (xb, 1, layers[2], yc, 1, 4), (xc, 0, layers[3], yd, 0, 4)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernels.int4_grouped([(x, xr, layer.qweight, layer.scales, layer.zeros, layer.units, y, yr, n)
                              for x, xr, layer, y, yr, n in plan], isa=isa)
    finally:
        torch.set_num_threads(before)
    for x, xr, layer, y, yr, n in plan:
        alone = kernels.int4_products(x[xr:xr + n], layer.qweight, layer.scales, layer.zeros, layer.units, isa=isa)
        assert torch.equal(y[yr:yr + n], alone)
    assert (ya[:5] == 7).all() and (ya[22:] == 7).all() and (yc[0] == 7).all()  # nothing written outside


def int4_moe(seed: int = 0, **config) -> MoE:
    """A routed MoE layer (16 experts, 4 a token, 2 shared) whose experts are int4 layers the kernel takes."""
    torch.manual_seed(seed)
    moe = MoE(get_preset("tiny", **{**dict(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16,
                                           num_experts_per_tok=4, n_group=1, topk_group=1), **config})).eval()
    randomize_(moe)
    float_weights = {name: m.weight.detach().clone() for name, m in moe.named_modules() if isinstance(m, torch.nn.Linear)}
    quant.swap_linears(moe, 4)
    for name, m in moe.named_modules():
        if isinstance(m, QuantLinear):
            m.quantize_(float_weights[name])
    return moe


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 8, 20])
def test_an_moe_layer_calls_the_kernel_once_for_gate_and_up_and_once_for_down(monkeypatch, tokens):
    """Decoding int4 experts: every chosen expert's gate and up products in one kernel call, their down
    products in a second (experts chosen by several tokens read once), giving what each expert's own layers give."""
    moe = int4_moe()
    x = torch.randn(tokens, 128)
    calls = []
    grouped = moe_module.int4_grouped
    monkeypatch.setattr(moe_module, "int4_grouped", lambda products: calls.append(products) or grouped(products))
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        got = moe.routed(x, weights, indices)
        assert len(calls) == 2
        chosen = indices.unique().numel()
        assert len(calls[0]) == 2 * chosen and len(calls[1]) == chosen  # one product per expert and weight
        monkeypatch.setattr(moe_module, "INT4_GROUPED_TOKENS", 0)  # each expert's layers in turn
        want = moe.routed(x, weights, indices)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # (the same products, summed in another order)
    # under autograd the experts' own layers run (the grouped call has no backward): the same outputs, a gradient
    monkeypatch.setattr(moe_module, "INT4_GROUPED_TOKENS", 64)
    x.requires_grad_(True)
    out = moe.routed(x, weights, indices)
    torch.testing.assert_close(out.detach(), got, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert len(calls) == 2 and x.grad is not None and x.grad.abs().sum() > 0


@needs_kernel
def test_grouped_experts_read_strided_tokens_and_leave_router_gradients_to_autograd():
    moe = int4_moe()
    wide = torch.randn(1, 256)
    x = wide[:, ::2]  # one token, not contiguous
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        torch.testing.assert_close(moe.routed(x, weights, indices), moe.routed(x.contiguous(), weights, indices))
    weights, indices, _ = moe.gate(x)  # the router's weights need a gradient: the experts' own layers run
    out = moe.routed(x, weights, indices)
    assert out.requires_grad
    out.sum().backward()
    assert moe.gate.weight.grad is not None


@needs_kernel
def test_experts_the_kernel_does_not_take_are_not_grouped():
    moe = int4_moe()
    x = torch.randn(2, 128)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        assert moe.int4_routed(x, weights, indices) is not None
        assert moe.int4_routed(torch.randn(65, 128), *moe.gate(torch.randn(65, 128))[:2]) is None  # a prompt
        expert = moe.experts[int(indices[0, 0])]
        expert.up_proj._fast, expert.up_proj._operands = False, None  # as if the kernel did not take this layer
        assert moe.int4_routed(x, weights, indices) is None
        float_moe = MoE(get_preset("tiny", hidden_size=128, moe_intermediate_size=64)).eval()
        w, i, _ = float_moe.gate(x)
        assert float_moe.int4_routed(x, w, i) is None


needs_operators = pytest.mark.skipif(not kernels.int4_experts_available(), reason="the library's operators did not build here")


@needs_operators
@pytest.mark.parametrize("shared", [2, 0])
@pytest.mark.parametrize("tokens", [1, 3, 8, 20, 64])
def test_an_int4_moe_layer_is_one_operator_call_giving_each_experts_own_products(tokens, shared):
    """Decoding a layer whose experts are all int4: routed and shared experts in one call of nanoseek::int4_experts
    (ops.cpp), equal to grouping in Python (int4_routed) plus the shared experts' own layers."""
    moe = int4_moe(n_shared_experts=shared)
    x = torch.randn(1, tokens, 128)
    with torch.no_grad():
        calls = operator_calls(lambda: moe(x))
        got = moe(x)
        table = moe._int4
        moe._int4 = False  # as where the library has no operators (known: not looked at again)
        want = moe(x)
    assert isinstance(table, torch.Tensor) and table.shape == (16 + (shared > 0), 13)
    assert calls == {"nanoseek::int4_experts": 1, "nanoseek::float_linear": 1}  # (the router's product)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@needs_operators
def test_the_experts_table_follows_the_weights_and_is_left_out_where_it_does_not_apply():
    moe, other = int4_moe(seed=0), int4_moe(seed=1)
    x = torch.randn(1, 2, 128)
    with torch.no_grad():
        moe(x)
        assert isinstance(moe._int4, torch.Tensor)
        table = moe._int4
        moe.load_state_dict(other.state_dict(), assign=True)  # new tensors: the old addresses are stale
        torch.testing.assert_close(moe(x), other(x))
        assert moe._int4 is table  # rewritten in place (a compiled graph holds the tensor it was traced with)
        moe._apply(torch.clone)  # every tensor moved (as .to() does across devices): made again, in place
        assert not moe._int4_known and not table.any()  # (forgotten: a graph still holding it fails, see below)
        torch.testing.assert_close(moe(x), other(x))
        assert moe._int4 is table and table[0, 0] == moe.experts[0].gate_proj.qweight.data_ptr()
        copied = copy.deepcopy(moe)  # a copy makes its own table, pointing to its own tensors
        assert not copied._int4_known
        torch.testing.assert_close(copied(x), other(x))
        assert copied._int4[0, 0] == copied.experts[0].gate_proj.qweight.data_ptr() != table[0, 0]
        with torch.inference_mode():  # made in inference mode, still rewritten outside it
            copied._apply(torch.clone)
            copied(x)
        copied._apply(torch.clone)
        torch.testing.assert_close(copied(x), other(x))
        weights, indices, _ = moe.gate(x[0])
        assert moe.int4_table(torch.randn(65, 128), weights) is None  # a prompt: the experts convert their weights
        grad = x.clone().requires_grad_(True)
    assert moe.int4_table(grad[0], weights) is None  # autograd: each expert's own layers
    moe.train()
    assert moe.int4_table(x[0], weights) is None
    moe.eval()
    moe.experts[3].down_proj._fast, moe.experts[3].down_proj._operands = False, None  # as if the kernel did not take it
    moe._int4_known = False
    assert moe.int4_table(x[0], weights) is None and moe._int4 is False and not moe.one_operator()


@needs_operators
def test_the_experts_operator_refuses_what_it_cannot_read():
    moe = int4_moe()
    x = torch.randn(2, 128)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        table = moe.int4_table(x, weights)
    op = torch.ops.nanoseek.int4_experts
    with pytest.raises(ValueError, match="expert 16 of 16"):
        op(x, weights, torch.full_like(indices, 16), table, 16)
    with pytest.raises(ValueError, match="wants x float"):
        op(x, weights, indices, table[:, :12].contiguous(), 16)
    with pytest.raises(ValueError, match="wants x float"):
        op(x[:, :100], weights, indices, table, 16)
    with pytest.raises(ValueError, match="wants x float"):
        op(x, weights, indices, table, 18)
    moe._apply(torch.clone)  # the experts moved: the table it had is forgotten (zeroed), refused until made again
    with pytest.raises(ValueError, match="out of date"):
        op(x, weights, indices, table, 16)
    one, repeated = x[:1], torch.tensor([[3, 3, 5, 3]])  # one token choosing an expert twice: each pair still counts
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    with torch.no_grad():
        table = moe.int4_table(one, w)
        want = sum(w[0, j] * moe.experts[int(e)](one) for j, e in enumerate(repeated[0])) + moe.shared_experts(one)
        torch.testing.assert_close(op(one, w, repeated, table, 16), want, atol=1e-5, rtol=1e-5)


def mla_and_inputs(c: int, queries: str, B: int, S: int):
    """The MLA layer the kernels' tests use (3 heads, nope 48, v 40, rope 16, latent width c) and its absorbed
    attention's inputs: the queries a slice of the projection's output (read where they lie) or rows of a longer
    sequence (copied), 21 cached latents with rows spaced apart as in the cache, a random mask where every query
    sees something."""
    from nanoseek.model.attention import MLA

    config = get_preset("tiny", hidden_size=128, num_attention_heads=3, qk_nope_head_dim=48, v_head_dim=40,
                        qk_rope_head_dim=16, kv_lora_rank=c)
    mla = MLA(config, 0)
    torch.manual_seed(0)
    H, d, r, T = 3, 48, 16, 21
    if queries == "slice":  # (B, S, H, d + r) split as MLA splits it
        q_nope, q_pe = torch.randn(B, S, H, d + r).split([d, r], dim=-1)
    else:  # rows of a longer sequence
        q_nope, q_pe = torch.randn(B, S + 1, H, d)[:, :S], torch.randn(B, S, H, r)
    past = torch.randn(B + 1, 2, T + 5, c + r)[1:, 0, :T]  # (B, T, c + r): rows spaced apart, as in the cache
    new = torch.randn(B, S, c + r)
    mask = torch.rand(B, S, T + S) > 0.3
    mask[..., T] = True  # (every query sees something)
    return mla, (q_nope, q_pe, past, new, mask)


def absorbed_on(isa: int, mla, inputs) -> tuple[dict, torch.Tensor]:
    """MLA's absorbed attention run with the library on instruction set `isa`: the operators it called, its output."""
    lib = kernels._library()
    lib.nanoseek_set_isa(isa)
    try:
        calls = operator_calls(lambda: mla.absorbed_attention(*inputs))
        return calls, mla.absorbed_attention(*inputs)
    finally:
        lib.nanoseek_set_isa(HERE)


@needs_operators
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, S", [(1, 1), (3, 1), (2, 4), (1, 8)])
@pytest.mark.parametrize("c", [80, 96, 256])
@pytest.mark.parametrize("queries", ["slice", "gapped"])
@pytest.mark.parametrize("latents", ["fp32", "fp16"])
def test_mla_attention_over_bf16_kv_b_equals_the_float_attention(isa, B, S, c, queries, latents):
    """nanoseek::mla_attention (MLA's absorbed attention in C++, mla.cpp's products against kv_b_proj's weight in
    bf16) gives what the attention in Python gives with that weight widened to fp32: past read in place from a
    cache, masked positions left out, on each instruction set; the latent width c taking AVX-512's paths (a multiple
    of 32, of 256 for the widest) or not; the queries a slice of the projection's output (read where they lie) or
    rows not evenly spaced (copied); the cached latents fp32 or fp16 (a half-precision cache, its mask in bytes)."""
    mla, inputs = mla_and_inputs(c, queries, B, S)
    if latents == "fp16":
        inputs = (*inputs[:2], inputs[2].half(), inputs[3], inputs[4].to(torch.uint8))
    q_nope, q_pe, past, new, mask = inputs
    H, d, r, T = 3, 48, 16, 21
    mla.kv_b_proj.weight.data = torch.randn_like(mla.kv_b_proj.weight).bfloat16()
    calls, got = absorbed_on(isa, mla, inputs)
    assert calls == {"nanoseek::mla_attention": 1}
    assert got.is_contiguous()  # as its fake says (a compiled graph reads it so)
    mla.kv_b_proj.weight.data = mla.kv_b_proj.weight.data.float()
    torch.testing.assert_close(got, mla.absorbed_attention(q_nope, q_pe, past, new, mask), atol=1e-4, rtol=1e-4)
    w = mla.kv_b_proj.weight.data.bfloat16().view(H, d + 40, c)
    op = torch.ops.nanoseek.mla_attention
    for bad in [(q_nope, q_pe, past, new, mask, w.float()), (q_nope.double(), q_pe, past, new, mask, w),
                (q_nope, q_pe, past, new, mask[..., 1:], w), (q_nope, q_pe, past[..., 1:], new, mask, w),
                (q_nope, q_pe, past, new.half(), mask, w),  # (the new latents are the model's own: fp32)
                (q_nope, q_pe, past, new, mask.int(), w),
                (torch.randn(1, 9, H, d), torch.randn(1, 9, H, r), past[:1], torch.randn(1, 9, c + r),
                 torch.ones(1, 9, T + 9, dtype=torch.bool), w)]:  # 9 query rows
        with pytest.raises(ValueError, match="mla_attention"):
            op(*bad, 0.1)


@needs_operators
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, S, H", [(1, 1, 4), (8, 1, 4), (2, 2, 16), (3, 4, 2), (1, 1, 20), (2, 1, 3), (1, 3, 3)])
@pytest.mark.parametrize("T", [0, 5, 37, 300])
@pytest.mark.parametrize("c, r", [(64, 16), (44, 6), (512, 64)])
@pytest.mark.parametrize("latents", ["fp32", "fp16", "bf16"])
def test_the_latent_attention_kernel_equals_torch_s_products_and_softmax(isa, B, S, H, T, c, r, latents):
    """nanoseek::mla_latent_attention (scores, mask, softmax and weighted latents in one pass, 16 latents at a time,
    8 with AVX2) gives MLA's attention between its two products as torch computes it, on each instruction set: any
    number of cached latents (none, part of a block, many blocks), rows of queries past one group of 8 (H = 20), groups
    of rows not a multiple of 4 (3 and 9 rows),
    widths not a multiple of 16 (or 8), the past's rows spaced apart as in the cache, positions masked out (the
    running maximum restarting); the cached latents fp32, or fp16 or bf16 with the mask in bytes (KVCache's, a
    half-precision cache: torch's reference widens them), the new ones fp32."""
    from nanoseek.model.attention import MLA

    config = get_preset("tiny", hidden_size=128, num_attention_heads=H, qk_nope_head_dim=16, v_head_dim=16,
                        qk_rope_head_dim=r, kv_lora_rank=c)
    mla = MLA(config, 0)
    torch.manual_seed(T + c)
    q_nope, q_pe = torch.randn(B, S, H, 16), torch.randn(B, S, H, r)
    past = torch.randn(B + 1, 2, T + 5, c + r)[1:, 0, :T] * 3
    new = torch.randn(B, S + 1, c + r)[:, 1:]
    mask = torch.rand(B, S, T + S) > 0.5
    mask[..., T:] = torch.ones(S, S, dtype=torch.bool).tril()  # (every query sees itself)
    if latents != "fp32":
        past, mask = past.to({"fp16": torch.float16, "bf16": torch.bfloat16}[latents]), mask.to(torch.uint8)
    calls, got = absorbed_on(isa, mla, (q_nope, q_pe, past, new, mask))
    assert calls.get("nanoseek::mla_latent_attention") == 1
    with pytest.MonkeyPatch.context() as m:
        m.setattr("nanoseek.model.attention.mla_latent_available", lambda: False)
        want = mla.absorbed_attention(q_nope, q_pe, past, new, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    op = torch.ops.nanoseek.mla_latent_attention
    q = torch.randn(B, S * H, c + r)
    for bad in [(q.double(), past, new, mask, c), (q, past, new, mask[..., 1:], c), (q, past[..., 1:], new, mask, c),
                (q, past, new, mask.int(), c), (q, past, new, mask, c + r + 1), (q[..., 1:], past, new, mask, c),
                (q, past, new.half(), mask, c),  # (the new latents are the model's own: fp32)
                (torch.randn(B, S * H + 1, c + r), past, new, mask, c) if S > 1 else (q, past, new, mask, 0)]:
        with pytest.raises(ValueError, match="mla_latent_attention"):
            op(*bad, 0.1)


@needs_operators
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, S, H, Hkv, d", [(1, 1, 12, 2, 128), (8, 1, 4, 4, 64), (2, 3, 6, 2, 24), (3, 1, 20, 2, 40),
                                             (2, 2, 10, 1, 48), (1, 1, 3, 3, 16)])
@pytest.mark.parametrize("T", [0, 5, 300])
@pytest.mark.parametrize("cache", ["fp32", "fp16", "bf16"])
def test_the_gqa_attention_kernel_equals_torch_s(isa, B, S, H, Hkv, d, T, cache):
    """nanoseek::gqa_attention (GQA.cached_attention while decoding on a CPU: one pass of the latent-attention kernel
    over each kv head's cached keys and values, its query heads the rows) gives what torch's products and softmax give,
    on each instruction set: query heads per kv head past one group of 8 (20 over 2), none shared (4 over 4), one kv
    head, several new tokens (a causal block among them), widths not a multiple of 16, the past read in place from a
    cache of fp32, fp16 or bf16 rows (torch's reference widens them), positions masked out."""
    from nanoseek.model.attention import GQA

    config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=H * d, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=H, num_key_value_heads=Hkv, head_dim=d)
    attention = GQA(config, 0)
    torch.manual_seed(T + d)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cache]
    kv = (torch.randn(B + 1, 2 * Hkv, T + 7, d) * 2).to(dtype)  # a cache: more rows and positions than attended
    past = kv[1:, :, :T]
    q, new = torch.randn(B, S, H, d), torch.randn(B, S, 2 * Hkv, d)
    mask = (torch.rand(B, S, T + S) > 0.4).to(torch.uint8)
    mask[..., T:] = torch.ones(S, S, dtype=torch.uint8).tril()  # (every query sees itself)
    lib = kernels._library()
    lib.nanoseek_set_isa(isa)
    try:
        calls = operator_calls(lambda: attention.cached_attention(q, past, new, mask))
        got = attention.cached_attention(q, past, new, mask)
    finally:
        lib.nanoseek_set_isa(HERE)
    assert calls.get("nanoseek::gqa_attention") == 1
    with pytest.MonkeyPatch.context() as m:
        m.setattr("nanoseek.model.attention.gqa_attention_available", lambda: False)
        want = attention.cached_attention(q, past.float(), new, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    op = torch.ops.nanoseek.gqa_attention
    for bad in [(q, past, new, mask[..., 1:]), (q, past[..., 1:], new, mask), (q[..., 1:], past, new, mask),
                (q, past, new[:, :, 1:], mask), (q, past, new, mask.int()), (q, past.double(), new, mask),
                (q, past[:, :1], new, mask)]:
        with pytest.raises(ValueError, match="gqa_attention"):
            op(*bad, 0.1)


def absorbed_attention_int4_reference(mla, q_nope, q_pe, past, new, mask) -> torch.Tensor:
    """MLA's absorbed attention with kv_b_proj in int4, as mla_attention_int4 says it computes it: the queries into the
    latent space through the dequantized key rows (in float64), and each head's latent outputs back through
    its value rows by the int4 kernel (int4_products: its activations quantized to int8, as llama.cpp's are)."""
    kv_b, H, d, dv, c = mla.kv_b_proj, mla.n_heads, mla.nope_dim, mla.v_dim, mla.kv_rank
    B, S = q_nope.shape[:2]
    w = kv_b.dequantize().double().view(H, d + dv, c)
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope.double(), w[:, :d]).float()
    q = torch.cat([q_latent, q_pe], dim=-1).reshape(B, S * H, -1)
    scores = torch.cat([q @ past.transpose(1, 2), q @ new.transpose(1, 2)], dim=-1).view(B, S, H, -1) * mla.softmax_scale
    probs = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1).view(B, S * H, -1)
    out_latent = (probs[..., :past.shape[1]] @ past[..., :c] + probs[..., past.shape[1]:] @ new[..., :c]).view(B * S, H, c)
    out = torch.empty(B * S, H, dv)
    for h in range(H):
        rows = slice(h * (d + dv) + d, (h + 1) * (d + dv))
        out[:, h] = kernels.int4_products(out_latent[:, h], *(t[rows] for t in (kv_b.qweight, kv_b.scales, kv_b.zeros, kv_b.units)))
    return out.view(B, S, H, dv)


@needs_operators
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B, S", [(1, 1), (3, 1), (2, 4), (1, 8)])
@pytest.mark.parametrize("c", [64, 192, 512])
@pytest.mark.parametrize("queries", ["slice", "gapped"])
def test_mla_attention_over_int4_kv_b_computes_what_it_says(isa, B, S, c, queries):
    """nanoseek::mla_attention_int4 (MLA's absorbed attention in C++ reading kv_b_proj's int4 codes) gives what its
    arithmetic written plainly gives, on each instruction set, at latent widths whose groups AVX-512 takes 8, 4, 2
    or 1 at a time (512), or only one at a time (192), the queries read where they lie or copied; and stays within
    int8 activations' rounding of the attention with the weight dequantized to fp32."""
    mla, inputs = mla_and_inputs(c, queries, B, S)
    q_nope, q_pe, past, new, mask = inputs
    H, d, r, T = 3, 48, 16, 21
    float_kv_b = mla.kv_b_proj
    mla.kv_b_proj = QuantLinear(c, 3 * (48 + 40), 4, dtype=torch.float32)
    mla.kv_b_proj.quantize_(torch.randn(3 * (48 + 40), c) * 0.1)
    calls, got = absorbed_on(isa, mla, inputs)
    assert calls.get("nanoseek::mla_attention_int4") == 1
    assert got.is_contiguous() and got.shape == (B, S, H, 40)
    # (a latent output a rounding away from the reference's may meet the int8 rounding boundary and differ by an
    # int8 step in a few of a head's outputs: nearly every output equal, none off by more than such steps)
    ref = absorbed_attention_int4_reference(mla, q_nope, q_pe, past, new, mask)
    close = (got - ref).abs() <= 1e-4 + 1e-4 * ref.abs()
    assert close.float().mean() > 0.9 and (got - ref).abs().max() < 0.005 * ref.abs().max()
    float_kv_b.weight.data = mla.kv_b_proj.dequantize()
    int4_kv_b, mla.kv_b_proj = mla.kv_b_proj, float_kv_b
    want = mla.absorbed_attention(q_nope, q_pe, past, new, mask)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    op = torch.ops.nanoseek.mla_attention_int4
    operands = (int4_kv_b.qweight, int4_kv_b.scales, int4_kv_b.zeros, int4_kv_b.units)
    for bad in [(q_nope, q_pe, past, new, mask, int4_kv_b.qweight.view(torch.int8), *operands[1:]),
                (q_nope, q_pe, past, new, mask, *operands[:3], operands[3].double()),
                (q_nope, q_pe, past, new, mask, operands[0][:-1], *operands[1:]),  # rows not a multiple of the heads
                (q_nope.double(), q_pe, past, new, mask, *operands),
                (q_nope, q_pe, past[..., 1:], new, mask, *operands),
                (torch.randn(1, 9, H, d), torch.randn(1, 9, H, r), past[:1], torch.randn(1, 9, c + r),
                 torch.ones(1, 9, T + 9, dtype=torch.bool), *operands)]:  # 9 query rows
        with pytest.raises(ValueError, match="mla_attention_int4"):
            op(*bad, 0.1)


@needs_operators
@pytest.mark.parametrize("compile", [False, True])
def test_int4_mla_models_quantize_kv_b_and_decode_through_its_operator(tmp_path, compile):
    """An int4 MLA model whose latent width the operator takes (a multiple of 64) holds kv_b_proj in int4 too, in
    memory and in the folder it saves; decoding (eagerly and from a compiled graph) reads it through
    nanoseek::mla_attention_int4: every token it picks greedily is the best (to within the int8 rounding of the
    kernels' activations) for the same weights with kv_b_proj dequantized into a float layer, scored as a whole
    sequence, with about the log-probability that model gives it."""
    import nanoseek
    from nanoseek.inference import Engine, SamplingParams
    from nanoseek.model import build_model

    # (dense layers, MTP's included: a random router's near-ties turn the kernels' rounding into other experts)
    model = build_model(get_preset("tiny", hidden_size=128, kv_lora_rank=64, first_k_dense_replace=3)).eval()
    randomize_(model, std=0.15)
    nanoseek.save_model(model, tmp_path / "float")
    int4 = nanoseek.load_model(tmp_path / "float", quantize="int4", dtype=torch.float32)
    layers = [m.self_attn.kv_b_proj for m in int4.model.layers]
    assert all(isinstance(m, QuantLinear) and m.bits == 4 for m in layers)
    nanoseek.save_model(int4, tmp_path / "int4")
    loaded = nanoseek.load_model(tmp_path / "int4")
    assert all(torch.equal(a.self_attn.kv_b_proj.qweight, b.qweight) for a, b in zip(loaded.model.layers, layers))
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (9, 5)]
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True)
    # (the cache in fp32 as the float forward computes: an fp16 one's rounding is tested on its own, test_engine.py)
    engine = Engine(int4, max_batch=2, eos_token_id=-1, compile=compile, kv_cache_dtype="fp32")
    got = engine.generate(prompts, params)
    calls = operator_calls(lambda: engine.generate(prompts, params))
    assert calls.get("nanoseek::mla_attention_int4") and not calls.get("nanoseek::mla_attention")
    for m in int4.model.layers:  # the same weights, kv_b_proj dequantized into a float layer
        kv_b = m.self_attn.kv_b_proj
        m.self_attn.kv_b_proj = torch.nn.Linear(kv_b.in_features, kv_b.out_features, bias=False)
        m.self_attn.kv_b_proj.weight.data = kv_b.dequantize()
    for prompt, r in zip(prompts, got):
        with torch.no_grad():
            logp = int4(torch.tensor([prompt + r.tokens])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        chosen = logp.gather(1, torch.tensor(r.tokens)[:, None])[:, 0]  # (new tokens,)
        # (decoding multiplies every int4 layer with int8 activations, the sequence's forward with converted weights)
        assert (chosen >= logp.amax(-1) - 0.1).all(), (chosen, logp.amax(-1))
        torch.testing.assert_close(torch.tensor([x["logprob"] for x in r.logprobs]), chosen, atol=0.1, rtol=0)


@needs_kernel
@pytest.mark.parametrize("compile", [False, True])
def test_int4_mla_models_keep_kv_b_in_bf16_and_decode_through_the_kernel(tmp_path, compile):
    """An int4 MLA model loaded to compute in fp32 with bf16 prompts (as on CPUs that multiply bf16 fast) keeps
    kv_b_proj in bf16; decoding reads it through the MLA kernel (eagerly and from a compiled graph), its MoE
    layers through nanoseek::int4_experts, with the tokens and log-probabilities of the same weights widened to fp32."""
    import nanoseek
    from nanoseek.inference import Engine, SamplingParams
    from nanoseek.model import build_model
    from nanoseek.quant import NarrowLinear

    model = build_model(get_preset("tiny", hidden_size=128, moe_intermediate_size=64)).eval()
    randomize_(model, std=0.15)
    nanoseek.save_model(model, tmp_path)
    narrow = nanoseek.load_model(tmp_path, quantize="int4", dtype=torch.float32, weight_dtype=torch.bfloat16)
    layers = [m.self_attn.kv_b_proj for m in narrow.model.layers]
    assert all(isinstance(m, NarrowLinear) and m.weight.dtype == torch.bfloat16 for m in layers)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (9, 5)]
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True)
    engine = Engine(narrow, max_batch=2, eos_token_id=-1, compile=compile)
    got = engine.generate(prompts, params)
    if kernels.int4_experts_available():  # attention and MoE layers: one operator call each
        calls = operator_calls(lambda: engine.generate(prompts, params))
        assert calls.get("nanoseek::mla_attention") and calls.get("nanoseek::int4_experts")
    wide = nanoseek.load_model(tmp_path, quantize="int4", dtype=torch.float32, weight_dtype=torch.bfloat16)
    for m in wide.model.layers:
        m.self_attn.kv_b_proj.weight.data = m.self_attn.kv_b_proj.weight.data.float()
    want = Engine(wide, max_batch=2, eos_token_id=-1).generate(prompts, params)
    for a, b in zip(got, want):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor([x["logprob"] for x in a.logprobs]),
                                   torch.tensor([x["logprob"] for x in b.logprobs]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("load", [dict(quantize="int4", dtype=torch.float32, weight_dtype=torch.float16),
                                  dict(dtype=torch.float32, weight_dtype=torch.float16),
                                  dict(quantize="int4", dtype=torch.bfloat16, weight_dtype=torch.float32)])
def test_mla_models_whose_kv_b_the_kernel_does_not_take_still_decode(tmp_path, load):
    """Only bf16 kv_b_proj under fp32 activations is narrowed and read by the MLA kernel; other dtype pairs keep
    kv_b_proj in the model's dtype and decode as before (fp16 weights under fp32, fp32 prompts under bf16)."""
    import nanoseek
    from nanoseek.inference import Engine, SamplingParams
    from nanoseek.model import build_model

    model = build_model(get_preset("tiny", hidden_size=128, moe_intermediate_size=64)).eval()
    randomize_(model, std=0.15)
    nanoseek.save_model(model, tmp_path)
    loaded = nanoseek.load_model(tmp_path, **load)
    assert all(m.self_attn.kv_b_proj.weight.dtype == load["dtype"] for m in loaded.model.layers)
    out = Engine(loaded, max_batch=2, eos_token_id=-1).generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=3, temperature=0))
    assert [len(r.tokens) for r in out] == [3, 3]


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_read():
    layer = int4_layer(256, 64)
    x = torch.randn(3, 256)
    # any float activations: converted to fp32 on the way in, fp32 out
    torch.testing.assert_close(kernels.int4_products(x.bfloat16(), layer.qweight, layer.scales, layer.zeros, layer.units),
                               kernels.int4_products(x.bfloat16().float(), layer.qweight, layer.scales, layer.zeros, layer.units))
    bad = [(torch.randn(3, 128), layer.qweight, layer.scales, layer.zeros, layer.units),  # K of another layer
           (x, layer.qweight, layer.scales.float(), layer.zeros, layer.units),
           (x, layer.qweight, layer.scales, layer.zeros.t().contiguous().t(), layer.units),
           (x, layer.qweight.to(torch.int8), layer.scales, layer.zeros, layer.units),
           (x, layer.qweight, layer.scales, layer.zeros, layer.units[:, :1]),
           (x, layer.qweight, layer.scales, layer.zeros, layer.units.bfloat16()),
           (x.to(torch.int32), layer.qweight, layer.scales, layer.zeros, layer.units)]
    for args in bad:
        with pytest.raises(ValueError, match="int4 kernel"):
            kernels.int4_products(*args)
    if HERE == kernels.ISA_AVX2:
        with pytest.raises(RuntimeError, match="not available"):
            kernels.int4_products(x, layer.qweight, layer.scales, layer.zeros, layer.units, isa=kernels.ISA_AVX512)


@needs_kernel
def test_the_kernel_is_as_close_to_the_float_product_as_bf16_activations():
    """Quantizing the activations to int8 per block of 32 costs about what bf16 activations do (torch's kernel):
    the centred codes keep the rounding errors from adding up (uncentred: about twice the error)."""
    layer = int4_layer(1024, 512)
    x = torch.randn(8, 1024)
    exact = x.double() @ layer.dequantize().double().t()
    ours = kernels.int4_products(x, layer.qweight, layer.scales, layer.zeros, layer.units).double()
    bf16 = (x.bfloat16().double() @ layer.dequantize(torch.bfloat16).double().t())
    err, bf16_err = ((ours - exact).norm() / exact.norm()).item(), ((bf16 - exact).norm() / exact.norm()).item()
    assert err < 2 * bf16_err and err < 0.01, (err, bf16_err)


@needs_kernel
def test_quantized_layers_decode_through_the_kernel_and_never_take_torch_s_layout():
    layer = int4_layer(256, 96)
    reference = layer.dequantize()
    # past FAST_INT4_ROWS, a prompt: in fp32 through the kernel too (faster than fp32 products of the converted weight;
    # where prompts multiply in bf16, converted: test_checkpoint's test_the_compute_dtype_follows_the_machine)
    for rows in (1, 8, FAST_INT4_ROWS, FAST_INT4_ROWS + 1, 200):
        x = torch.randn(1, rows, 256)
        out = layer(x)
        assert layer._fast and not layer._kernel_layout
        torch.testing.assert_close(out, x @ reference.t(), atol=0.02, rtol=0.02)
        torch.testing.assert_close(out[0], kernels.int4_products(x[0], layer.qweight, layer.scales, layer.zeros, layer.units),
                                   rtol=0, atol=0)  # exactly the kernel's products
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
    layer, twin = int4_layer(256, 128), int4_layer(256, 128)
    x = torch.randn(3, 256)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: the operator, no graph break around it
    out = compiled(x)  # traced before any eager call: the layer decides inside the trace
    assert layer._fast
    torch.testing.assert_close(out, twin(x), rtol=0, atol=0)


@needs_kernel
def test_gradients_reach_the_activations_and_casts_keep_the_scales():
    """(Training refuses quantized models, but a gradient asked for is not dropped.) The same products come
    out with autograd recording them; the gradient goes through the dequantized weight."""
    layer = int4_layer(256, 64)
    x = torch.randn(2, 256, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, -1))
    with torch.no_grad():
        assert torch.equal(layer(x), out.detach())
    buffers = [t.clone() for t in (layer.scales, layer.zeros, layer.units)]
    layer.half()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip((layer.scales, layer.zeros, layer.units), buffers))  # not rounded through fp16


def test_without_a_compiler_int4_keeps_torch_s_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        for cxx, says in (("/nonexistent/c++", "is not a command"), ("false", "could not be built")):
            monkeypatch.setenv("CXX", cxx)  # missing; present but failing
            kernels._library.cache_clear()
            if HERE:
                with pytest.warns(UserWarning, match=says):
                    assert kernels.library() is None
            assert kernels.library() is None and not kernels.int4_available(256, 32)
            layer = int4_layer(256, 64)
            x = torch.randn(2, 256)
            torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), atol=0.02, rtol=0.02)
            assert layer._fast is False
    finally:
        kernels._library.cache_clear()
    assert quant.int4_available is kernels.int4_available


@needs_kernel
def test_a_damaged_cached_build_is_built_again(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    check = [sys.executable, "-c", "from nanoseek import kernels; assert kernels.library() is not None"]
    subprocess.run(check, env=env, check=True)
    (built,) = (tmp_path / "nanoseek" / "kernels").glob("kernels-*.so")
    built.write_bytes(b"not a shared library")  # (in another process: dlopen reuses a path it has loaded)
    subprocess.run(check, env=env, check=True)
    assert built.stat().st_size > 1000
