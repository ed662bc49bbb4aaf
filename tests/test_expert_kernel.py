"""nanoseek::float_experts (kernels/experts.cpp): a small float mixture-of-experts layer for a few tokens over its
stacked experts, against the torch arithmetic it stands for (MoE.selected_experts) on each instruction set this CPU
has; compiled decoding through it; what it refuses."""

import dataclasses

import pytest
import torch

from conftest import operator_calls, randomize_
from nanoseek import kernels
from nanoseek.inference import Engine, SamplingParams
from nanoseek.model import build_model, get_preset
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


def run_on(isa: int, *args) -> torch.Tensor:
    lib = kernels._library()
    lib.nanoseek_set_isa(isa)
    try:
        return torch.ops.nanoseek.float_experts(*args)
    finally:
        lib.nanoseek_set_isa(HERE)


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
    eager = [r.tokens for r in Engine(model, max_batch=3).generate(prompts, params)]
    engine = Engine(model, max_batch=3, compile=True)
    engine.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0))  # (compiled here)
    calls = operator_calls(lambda: engine.generate(prompts, params))
    assert engine.compiled
    moe_layers = sum(isinstance(layer.mlp, MoE) for layer in model.model.layers[:model.config.num_hidden_layers])
    assert calls.get("nanoseek::float_experts", 0) == 7 * moe_layers  # each decode step (prompts go through `routed`)
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
