"""nanoseek's float kernels (kernels/float.cpp) on each instruction set this CPU has: nanoseek::float_linear (a dense
product for a few rows, what layers.Linear runs where no gradient is wanted) against float64, and where Linear must
not use it; nanoseek::float_experts (a small float mixture-of-experts layer for a few tokens over its stacked experts)
against the torch arithmetic it stands for (MoE.selected_experts); compiled decoding through both; what they refuse."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import operator_calls, randomize_
from nanoseek import kernels
from nanoseek.inference import Engine, SamplingParams
from nanoseek.model import build_model, get_preset
from nanoseek.model.layers import Linear
from nanoseek.model.moe import MoE

HERE = kernels.int4_isa()
ISAS = [isa for isa in (kernels.ISA_AVX2, kernels.ISA_AVX512) if isa <= HERE]
pytestmark = pytest.mark.skipif(not kernels.float_experts_available(), reason="no AVX2 or no C++ compiler here")


def moe_layer(D: int, I: int, E: int, k: int, shared: int, seed: int = 0) -> MoE:
    config = dataclasses.replace(get_preset("tiny"), hidden_size=D, moe_intermediate_size=I, n_routed_experts=E,
                                 num_experts_per_tok=k, n_shared_experts=shared)
    torch.manual_seed(seed)
    moe = MoE(config).eval()
    randomize_(moe)
    moe.prepare_compiled_decode()
    return moe


def torch_experts(moe: MoE, x, weights, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """What a compiled decode step computes without the kernel: MoE.selected_experts (its gathers and reductions),
    and all_experts (every expert, weighted 0 where not chosen) in float64."""
    wide = moe.all_experts(x.double(), weights.double(), indices)
    return moe.selected_experts(x, weights, indices), wide.float()


def run_on(isa: int, *args, op=torch.ops.nanoseek.float_experts) -> torch.Tensor:
    lib = kernels._library()
    lib.nanoseek_set_isa(isa)
    try:
        return op(*args)
    finally:
        lib.nanoseek_set_isa(HERE)


# (rows N, inputs K): the shipped model's widest and narrowest, rows not a multiple of any block (83), inputs of one
# vector (16), inputs the AVX2 width takes and AVX-512's does not (24: torch's product then)
LINEAR_SHAPES = [(2048, 256), (80, 64), (83, 768), (7, 16), (40, 24)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 9, 16, 33])  # 33: past the kernel's rows, torch's product
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: widened as read, the activations in fp32
def test_float_linear_computes_the_product(isa, shape, rows, dtype):
    N, K = shape
    g = torch.Generator().manual_seed(rows * 100 + N)
    x, w = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g).to(dtype)
    got = run_on(isa, x, w, op=torch.ops.nanoseek.float_linear)
    assert got.shape == (rows, N) and got.dtype == torch.float32
    # (past the kernel's rows, torch's product of the weight widened to fp32: exact too)
    torch.testing.assert_close(got.double(), x.double() @ w.double().t(), atol=1e-4 * K ** 0.5, rtol=1e-5)


def test_float_linear_reads_strided_rows_and_keeps_their_dtype():
    w = torch.randn(50, 64)
    x = torch.randn(5, 2, 64)[:, 0]  # (rows apart)
    torch.testing.assert_close(torch.ops.nanoseek.float_linear(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)
    half = torch.ops.nanoseek.float_linear(x.bfloat16(), w)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), x.bfloat16().float() @ w.t(), atol=0.1, rtol=0.02)
    wide = torch.ops.nanoseek.float_linear(x, w.double())  # not an fp32 weight: torch's product
    torch.testing.assert_close(wide, x @ w.t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="wants"):
        torch.ops.nanoseek.float_linear(x, torch.randn(50, 60))


def test_linear_uses_the_kernel_only_where_no_gradient_is_wanted():
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=True)
    x = torch.randn(2, 3, 64)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        calls = operator_calls(lambda: torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5))
    assert calls == {"nanoseek::float_linear": 1}
    assert operator_calls(lambda: layer(x).sum().backward()) == {}  # training: autograd's product
    assert layer.weight.grad is not None
    frozen = Linear(64, 48).requires_grad_(False)
    assert operator_calls(lambda: frozen(x.requires_grad_())) == {}  # a gradient for the input is still wanted
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert operator_calls(lambda: layer(x)) == {}  # autocast casts inside F.linear
    with torch.no_grad():
        assert operator_calls(lambda: layer.bfloat16()(x.detach().bfloat16())) == {}  # not an fp32 weight


# (D, I, routed experts, chosen per token, shared experts): the shipped model's shape, the tiny preset's, more
# experts than tokens, none shared
SHAPES = [(256, 128, 8, 2, 1), (64, 32, 8, 2, 1), (128, 16, 16, 4, 2), (48, 48, 6, 3, 0)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 13, 40])  # 13, 40: more than 8 tokens read some chunk
def test_the_operator_computes_the_selected_experts(isa, shape, tokens):
    D, I, E, k, shared = shape
    if D % (16 if isa == kernels.ISA_AVX512 else 8):
        pytest.skip("not a width this instruction set takes")
    moe = moe_layer(*shape, seed=tokens)
    x = torch.randn(tokens, D)
    weights, indices, _ = moe.gate(x)
    got = run_on(isa, x, weights, indices, *moe.stacked, E, E + shared)
    selected, wide = torch_experts(moe, x, weights, indices)
    torch.testing.assert_close(got, selected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, wide, atol=2e-5, rtol=2e-5)
    assert moe.float_kernel == (D % 16 == 0 or HERE == kernels.ISA_AVX2)  # what compiled decoding will take


def test_the_operator_reads_strided_tokens_and_keeps_their_dtype():
    moe = moe_layer(64, 32, 8, 2, 1)
    x = torch.randn(5, 2, 64)[:, 0]  # (rows apart)
    weights, indices, _ = moe.gate(x)
    got = torch.ops.nanoseek.float_experts(x, weights, indices, *moe.stacked, 8, 9)
    torch.testing.assert_close(got, torch_experts(moe, x, weights, indices)[1], atol=2e-5, rtol=2e-5)
    half = torch.ops.nanoseek.float_experts(x.bfloat16(), weights, indices, *moe.stacked, 8, 9)
    assert half.dtype == torch.bfloat16


def test_compiled_decoding_calls_the_operator_and_gives_the_eager_tokens():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", eos_token_id=-1)).eval()
    randomize_(model, std=0.15)
    prompts = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0)
    eager = [r.tokens for r in Engine(model, max_batch=3, native=False).generate(prompts, params)]
    engine = Engine(model, max_batch=3, compile=True, native=False)  # (the compiled graph, not the C++ step)
    engine.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0))  # (compiled here)
    calls = operator_calls(lambda: engine.generate(prompts, params))
    assert engine.compiled
    moe_layers = sum(isinstance(layer.mlp, MoE) for layer in model.model.layers[:model.config.num_hidden_layers])
    assert calls.get("nanoseek::float_experts", 0) == 7 * moe_layers  # each decode step (prompts go through `routed`)
    assert calls.get("nanoseek::float_linear", 0) >= 7 * model.config.num_hidden_layers * 3  # q, kv_a, o: at least
    assert [r.tokens for r in engine.generate(prompts, params)] == eager


def test_the_operator_refuses_what_it_cannot_read():
    moe = moe_layer(64, 32, 8, 2, 1)
    x = torch.randn(2, 64)
    weights, indices, _ = moe.gate(x)
    gate_up, down = moe.stacked
    op = torch.ops.nanoseek.float_experts
    with pytest.raises(ValueError, match="out of range"):
        op(x, weights, torch.full_like(indices, 8), gate_up, down, 8, 9)  # an index past the routed experts
    with pytest.raises(ValueError, match="wants"):
        op(x, weights, indices, gate_up[:-1], down, 8, 9)  # gate_up a row short
    with pytest.raises(ValueError, match="wants"):
        op(x, weights, indices, gate_up.double(), down, 8, 9)
    with pytest.raises(ValueError, match="wants"):
        op(torch.randn(2, 60), weights, indices, gate_up, down, 8, 9)  # not the experts' width
    with pytest.raises(ValueError, match="wants"):
        op(x, weights, indices, gate_up, down, 10, 9)  # more routed experts than chunks
