"""nanoseek's C++ decode step (kernels/step.cpp through inference/native.py) against the model's own forward pass."""

import copy

import pytest
import torch

from conftest import operator_calls, randomize_, tiny_gqa_config
from nanoseek import kernels, quant
from nanoseek.inference.cache import KVCache
from nanoseek.inference.engine import Engine
from nanoseek.inference.native import NativeStep
from nanoseek.inference.sampling import SamplingParams
from nanoseek.model import build_model, get_preset
from nanoseek.quant import QuantLinear, narrow_linears, replace_linears

pytestmark = pytest.mark.skipif(not kernels.runs_here("mla_step"), reason="nanoseek's kernels do not build here")

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17], [18, 19, 20, 21]]

# the routing and attention variants DeepSeek's configurations use
CONFIGS = {
    "v3": {},  # sigmoid scores, noaux_tc with its bias, groups, q_lora
    "no-q-lora": {"q_lora_rank": None},
    "v2-softmax-greedy": {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                          "norm_topk_prob": False},
    "v2-group-limited": {"scoring_func": "softmax", "topk_method": "group_limited_greedy", "n_group": 4,
                         "topk_group": 2},
    "halves-rope-yarn-bias": {"rope_interleave": False, "attention_bias": True, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}},
    "dense": {"first_k_dense_replace": 2, "n_shared_experts": 2},
    # values narrower than keys' nope part, an odd rope width, no shared experts, the head tied to the embedding
    "shapes-tied": {"v_head_dim": 24, "qk_rope_head_dim": 12, "n_shared_experts": 0, "first_k_dense_replace": 0,
                    "tie_word_embeddings": True, "routed_scaling_factor": 1.0},
}


def tiny(name: str = "v3", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny", eos_token_id=-1, **{**CONFIGS[name], **overrides})).eval()
    randomize_(model, std=0.15)  # (norms, biases and the routing bias all matter)
    return model


def prepared(model):
    for m in model.modules():
        if hasattr(m, "prepare_compiled_decode"):
            m.prepare_compiled_decode()
    return model


def prefilled(model, cache):
    with torch.no_grad():
        for row, p in enumerate(PROMPTS):
            cache.select(row, row + 1)
            model(torch.tensor([p]), position_ids=cache.positions(len(p)), cache=cache, logits=False)
            cache.advance()


def step_and_reference(model, dtype=torch.float32):
    """The step over one cache and a second cache for the model's own forward, both holding PROMPTS."""
    ref, mine = (KVCache(model.config, rows=len(PROMPTS), max_len=40, dtype=dtype) for _ in range(2))
    step = NativeStep.build(model, mine)
    assert step is not None
    for cache in (ref, mine):
        prefilled(model, cache)
    return step, ref, mine


def forward_logits(model, cache, ids, first_row=0):
    """The model's own next logits [B, V] (fp32) after ids [B] at cache rows first_row.. (its latents left staged)."""
    cache.select(first_row, first_row + len(ids))
    with torch.no_grad():
        return model(ids[:, None], position_ids=cache.positions(1), cache=cache).logits[:, -1].float()


LAST = torch.tensor([p[-1] for p in PROMPTS])


def follows_forward(model, step, ref, mine, steps, atol, rtol, kv_atol, kv_rtol, flips=0):
    """`steps` greedy steps of the step beside the model's forward over its reference cache: the same logits (its greedy
    choice their argmax), lengths and cached latents (to the tolerances given). `flips`: how many rows may part from the
    forward's, each left out from then on (a quantized model: an activation whose int8 code the two round apart, its
    fp32 value an ulp from a rounding boundary, moves what follows by ~1e-2 of the logits' scale)."""
    last, L = LAST, model.config.num_hidden_layers
    gone = torch.zeros(len(LAST), dtype=torch.bool)  # rows that parted
    for _ in range(steps):
        want = forward_logits(model, ref, last)
        ref.advance()
        got, best = step(last.tolist())
        assert torch.equal(best, got.argmax(-1))
        assert torch.equal(mine.lengths[0], ref.lengths[0])
        kv, kv_ref = mine.kv[:L, : len(LAST)].float(), ref.kv[:L, : len(LAST)].float()  # (L, B, 1, T, w)
        apart = ~torch.isclose(got, want, atol=atol, rtol=rtol).all(dim=1)
        apart |= ~torch.isclose(kv, kv_ref, atol=kv_atol, rtol=kv_rtol).transpose(0, 1).flatten(1).all(dim=1)
        new = apart & ~gone
        flips -= int(new.sum())
        assert flips >= 0 and ((got - want)[new].abs() < 0.25).all(), ((got - want).abs().amax(dim=1), gone)
        gone |= new
        torch.testing.assert_close(got[~gone], want[~gone], atol=atol, rtol=rtol)
        torch.testing.assert_close(kv[:, ~gone], kv_ref[:, ~gone], atol=kv_atol, rtol=kv_rtol)
        last = want.argmax(-1)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_step_gives_the_forward_passes_logits_and_cache(name, dtype):
    """Rows of different lengths, several steps: the logits of the model's forward over the cache, its latents written
    where the forward's `advance` writes them, and each row's length advanced by one."""
    model = prepared(tiny(name))
    kv, ulp = {"fp32": (torch.float32, 1e-5), "fp16": (torch.float16, 1e-3), "bf16": (torch.bfloat16, 8e-3)}[dtype]
    step, ref, mine = step_and_reference(model, kv)
    # (a half-precision cache: a latent one rounding step apart moves the logits after it a little; a latent rounded to
    # the cache's dtype may land one step apart)
    follows_forward(model, step, ref, mine, 6, atol=2e-5 if dtype == "fp32" else 2e-4, rtol=1e-4, kv_atol=1e-5,
                    kv_rtol=ulp)


@pytest.mark.parametrize("threads, lengths", [(2, [300]), (6, [300, 40])])
def test_a_long_context_shared_out_between_threads(threads, lengths):
    """Fewer rows' heads than threads and a long context: each row's cached latents are shared out in parts between the
    threads and the parts merged (with 6 threads and 2 rows, three parts, the short row's middle one attending nothing):
    the forward's logits and latents all the same."""
    model = prepared(tiny())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, mine = (KVCache(model.config, rows=len(lengths), max_len=320, dtype=torch.float32) for _ in range(2))
        step = NativeStep.build(model, mine)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
        with torch.no_grad():
            for cache in (ref, mine):
                for row, p in enumerate(prompts):
                    cache.select(row, row + 1)
                    model(torch.tensor([p]), position_ids=cache.positions(len(p)), cache=cache, logits=False)
                    cache.advance()
        last = torch.tensor([p[-1] for p in prompts])
        for _ in range(3):
            want = forward_logits(model, ref, last)
            ref.advance()
            got, _ = step(last.tolist())
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(mine.kv, ref.kv, atol=1e-5, rtol=1e-5)
            last = want.argmax(-1)
    finally:
        torch.set_num_threads(before)


def test_a_later_row_range_and_rows_left_alone():
    """first_row selects rows first_row..; the rows before and after are neither read nor written."""
    model = prepared(tiny())
    cache = KVCache(model.config, rows=len(PROMPTS), max_len=40)
    prefilled(model, cache)
    other = copy.deepcopy(cache.kv)
    lengths = cache.lengths.clone()
    full = NativeStep.build(model, cache)
    ids = torch.tensor([9, 10])
    got, _ = full(ids.tolist(), first_row=2)
    assert cache.lengths[0].tolist() == [lengths[0, 0], lengths[0, 1], lengths[0, 2] + 1, lengths[0, 3] + 1, lengths[0, 4]]
    for row in (0, 1, 4):
        assert torch.equal(cache.kv[:, row], other[:, row])
    ref = KVCache(model.config, rows=len(PROMPTS), max_len=40)
    prefilled(model, ref)
    torch.testing.assert_close(got, forward_logits(model, ref, ids, first_row=2), atol=2e-5, rtol=1e-4)


def test_bf16_weights_computed_in_fp32():
    """A bf16 checkpoint on a CPU without fast bf16 keeps its linear layers in bf16 (quant.NarrowLinear): the step reads
    them as they are and computes what the forward computes (a dense model: the experts' kernel reads fp32 only)."""
    model = tiny("dense")
    narrow = build_model(model.config, init=False, edit=narrow_linears)
    narrow.load_state_dict(model.state_dict())
    narrow = prepared(narrow.eval())
    assert narrow.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    step, ref, _ = step_and_reference(narrow)
    torch.testing.assert_close(step(LAST.tolist())[0], forward_logits(narrow, ref, LAST), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["v3", "dense"])
def test_fp32_weights_that_bf16_holds_are_read_as_bf16(name):
    """A bf16 checkpoint loaded in fp32 (the shipped model): the step reads bf16 copies of its weights, experts
    included, and computes what the forward computes from the fp32 ones (the same numbers)."""
    model = tiny(name)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    step, ref, _ = step_and_reference(prepared(model))
    # every product's weight (kv_b_proj's transposed key half and the stacked experts too) is read as bf16: the 2-D fp32
    # tensors left are the embedding, the rotary tables and the routers
    wide = [t for t in step._keep if t.dtype == torch.float32 and t.dim() == 2]
    moe_layers = sum(layer.is_moe for layer in model.model.layers[:model.config.num_hidden_layers])
    assert len(wide) == 3 + moe_layers and any(t.dtype == torch.bfloat16 for t in step._keep)
    torch.testing.assert_close(step(LAST.tolist())[0], forward_logits(model, ref, LAST), atol=2e-5, rtol=1e-4)


def test_the_engine_decodes_through_it_with_the_eager_tokens_and_logprobs():
    """Rows joining and leaving a batch of 3, sampling with seeds and greedy, logprobs: the tokens and logprobs of the
    eager engine, every decode step one call of the operator."""
    model = tiny()
    params = [SamplingParams(max_new_tokens=n, temperature=t, seed=3, logprobs=True, top_logprobs=2)
              for n, t in ((9, 0), (4, 0.8), (14, 0), (1, 0), (6, 1.0))]
    eager = Engine(model, max_batch=3).generate(PROMPTS, params)
    engine = Engine(model, max_batch=3, native=True)
    calls = operator_calls(lambda: engine.generate(PROMPTS, params))
    assert engine.native is not None
    assert calls.get("nanoseek::mla_step", 0) > 0 and "nanoseek::float_experts" not in calls
    mine = engine.generate(PROMPTS, params)
    assert [r.tokens for r in mine] == [r.tokens for r in eager]
    for a, b in zip(mine, eager):
        for x, y in zip(a.logprobs, b.logprobs):
            assert x["token"] == y["token"] and abs(x["logprob"] - y["logprob"]) < 1e-3  # (fp16 cache)


def test_it_follows_weight_updates_and_skips_what_it_cannot_read():
    """After an in-place update (GRPO between rollouts) the engine decodes with the new weights; an int4 layer in groups
    the kernels do not take, a grouped-query model and native=False decode without it."""
    model = tiny()
    engine = Engine(model, max_batch=2, native=True)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    before = [r.tokens for r in engine.generate(PROMPTS[:2], params)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kv_b_proj" in name or ".experts." in name:
                p.add_(torch.randn_like(p) * 0.2)
    after = [r.tokens for r in engine.generate(PROMPTS[:2], params)]
    assert after == [r.tokens for r in Engine(model, max_batch=2).generate(PROMPTS[:2], params)]
    assert after != before
    quantized = copy.deepcopy(model)
    old = quantized.model.layers[1].self_attn.o_proj
    int4 = QuantLinear(old.in_features, old.out_features, 4, group_size=64, dtype=torch.float32)  # (groups of 32 only)
    int4.quantize_(old.weight)
    quantized.model.layers[1].self_attn.o_proj = int4
    gqa = build_model(tiny_gqa_config(eos_token_id=-1))
    for m, native in ((quantized, True), (gqa, True), (model, False)):
        e = Engine(m, max_batch=2, native=native)
        e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, temperature=0))
        assert e.native is None
    # a forward hook (on any module) is run: the model decodes through its forward
    e = Engine(model, max_batch=2, native=True)
    seen = []
    hook = model.model.layers[1].mlp.register_forward_hook(lambda *_: seen.append(1))
    try:
        e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4, temperature=0))
    finally:
        hook.remove()
    assert e.native is None and len(seen) == 4  # the prompt and three decode steps


def test_bad_ids_a_full_cache_and_a_wrong_table_are_errors():
    model = prepared(tiny())
    cache = KVCache(model.config, rows=2, max_len=8)
    step = NativeStep.build(model, cache)
    with pytest.raises(ValueError, match="token ids"):
        step([model.config.vocab_size])
    with pytest.raises(ValueError, match="token ids"):
        step([-1])
    cache.lengths[0, 0] = cache.max_len
    with pytest.raises(ValueError, match="full"):
        step([3])
    cache.lengths[0, 0] = 0
    with pytest.raises(ValueError, match="rows"):
        step([3, 4, 5])  # three rows of two
    with pytest.raises(ValueError, match="table"):
        torch.ops.nanoseek.mla_step([3], cache.kv, step.lengths, 0, step.table[:-1], step.numbers,
                                    model.config.vocab_size)
    assert cache.lengths[0].tolist() == [0, 0]  # nothing advanced by a refused step


def int8(model, bits=8):
    """The model with every linear layer in int8 but kv_b_proj, in place (as `nanoseek quantize --bits 8` leaves it); with
    bits=4 in int4, kv_b_proj too (as `--bits 4` leaves a model whose kv_lora_rank is a multiple of 64)."""
    def make(name, old):
        layer = QuantLinear(old.in_features, old.out_features, bits, old.bias is not None, dtype=torch.float32)
        layer.quantize_(old.weight)
        if old.bias is not None:
            layer.bias.data.copy_(old.bias)
        return layer

    replace_linears(model, make, latent=bits == 4)
    return model


def int4(name="v3", **overrides):
    """A tiny model of CONFIGS[name] in int4, its widths multiples of 64 (what the int4 kernel's products take)."""
    widths = {"kv_lora_rank": 64, "moe_intermediate_size": 64, **({"q_lora_rank": 64} if name != "no-q-lora" else {}),
              **({"num_attention_heads": 8} if name == "shapes-tied" else {})}  # (values 8 x 24 wide)
    return int8(tiny(name, **{**widths, **overrides}), bits=4)


@pytest.fixture
def avx2_int8(monkeypatch):
    """int8 layers multiplied by nanoseek's AVX2 kernel (as on a CPU without VNNI, where fbgemm's are not exact)."""
    if not kernels.int8_available(32):
        pytest.skip("nanoseek's int8 kernel does not run here")
    monkeypatch.setattr(quant, "fbgemm_int8", lambda: False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_layers_and_experts(avx2_int8, name):
    """A model quantized to int8 (DeepSeek-V2-Lite as `nanoseek quantize --bits 8` writes it): its products and experts
    through int8.cpp's kernel inside the step, the logits and latents of its forward (which multiplies each layer through
    the same kernel, the activations quantized alike). The caches are fp32: the two compute each latent to within an
    ulp, which an fp16 cache may round a step apart, and an activation's int8 code moved by that changes what follows by
    ~1e-2 (seen: one row's logits 0.11 apart two steps later)."""
    model = prepared(int8(tiny(name)))
    step, ref, mine = step_and_reference(model)
    assert 2 in step.table.tolist()  # (int8 products in the table)
    follows_forward(model, step, ref, mine, 5, atol=3e-3, rtol=1e-3, kv_atol=2e-3, kv_rtol=1e-3)


def test_int8_engine_with_more_rows_than_a_pass_takes(avx2_int8):
    """Twelve rows (the shared experts met by all of them: two passes of 8 over each weight row) and wider experts: the
    engine's tokens and logprobs are the eager engine's (fp32 caches, see above), every decode step one call of the
    operator."""
    torch.manual_seed(1)
    model = build_model(get_preset("tiny", eos_token_id=-1, moe_intermediate_size=64, n_shared_experts=2)).eval()
    randomize_(model, std=0.15)
    model = int8(model)
    prompts = [[3 + i, 40 + 2 * i, 7] for i in range(12)]
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True)
    eager = Engine(model, max_batch=12, kv_cache_dtype=torch.float32).generate(prompts, params)
    engine = Engine(model, max_batch=12, native=True, kv_cache_dtype=torch.float32, prefix_cache_tokens=0)
    short = SamplingParams(max_new_tokens=2, temperature=0)
    few, many = (operator_calls(lambda: engine.generate(prompts, p)) for p in (short, params))
    assert engine.native is not None and many["nanoseek::mla_step"] == few["nanoseek::mla_step"] + 4
    assert many["nanoseek::int8_avx2_linear"] == few["nanoseek::int8_avx2_linear"]  # (the prompts' alone)
    mine = engine.generate(prompts, params)
    assert [r.tokens for r in mine] == [r.tokens for r in eager]
    for a, b in zip(mine, eager):
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x["logprob"] - y["logprob"]) < 1e-3


def test_int8_layers_it_does_not_take(avx2_int8, monkeypatch):
    """int8 experts of a width the kernel does not take (not a multiple of 32), or int8 layers another kernel multiplies
    (fbgemm's, with VNNI): the model decodes through its forward."""
    odd = int8(build_model(get_preset("tiny", eos_token_id=-1, moe_intermediate_size=40)).eval())
    e = Engine(odd, max_batch=2, native=True)
    e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, temperature=0))
    assert e.native is None
    monkeypatch.setattr(quant, "int8_available", lambda *args: False)
    e = Engine(int8(tiny()), max_batch=2, native=True)
    e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, temperature=0))
    assert e.native is None


@pytest.fixture
def int4_kernel():
    if not kernels.int4_available(64, 32):
        pytest.skip("nanoseek's int4 kernel does not run here")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int4_layers_experts_and_latent_projection(int4_kernel, name):
    """A model quantized to int4 (DeepSeek-V2-Lite as `nanoseek quantize --bits 4` writes it, kv_b_proj in int4 too): its
    products, experts and MLA's products over kv_b_proj's codes through int4.cpp's and mla.cpp's kernels inside the step,
    the logits and latents of its forward (the same kernels, the activations quantized alike; fp32 caches, as above)."""
    model = prepared(int4(name))
    assert all(isinstance(layer.self_attn.kv_b_proj, QuantLinear) for layer in model.model.layers)
    step, ref, mine = step_and_reference(model)
    assert 3 in step.table.tolist()  # (int4 products in the table)
    follows_forward(model, step, ref, mine, 5, atol=3e-3, rtol=1e-3, kv_atol=2e-3, kv_rtol=1e-3, flips=2)


def test_int4_engine_with_more_rows_than_a_pass_takes(int4_kernel):
    """Twelve rows (more than the 8 a kernel pass and the key product take at a time; the shared experts met by all of
    them) and wider experts. A row's numbers do not depend on the rows beside it (each product sums a row's terms in one
    order, a token's experts in the experts' order), so 12 rows in one step give the logits of steps of 8 and 4, which
    the test above holds to the forward's; the engine decodes every step through it (no int4 call beyond the prompts')
    with the tokens and logprobs of one that decodes 4 rows at a time. (The forward itself, past 8 rows, runs MLA over
    kv_b_proj's weight dequantized, so its numbers are not the kernels'.)"""
    model = prepared(int4(seed=1, moe_intermediate_size=128, n_shared_experts=2))
    prompts = [[3 + i, 40 + 2 * i, 7] for i in range(12)]
    caches = [KVCache(model.config, rows=12, max_len=40, dtype=torch.float32) for _ in range(2)]
    steps = [NativeStep.build(model, cache) for cache in caches]
    with torch.no_grad():
        for cache in caches:
            for row, p in enumerate(prompts):
                cache.select(row, row + 1)
                model(torch.tensor([p]), position_ids=cache.positions(len(p)), cache=cache, logits=False)
                cache.advance()
    last = [p[-1] for p in prompts]
    for _ in range(3):
        together, _ = steps[0](last)
        apart = torch.cat([steps[1](last[:8])[0], steps[1](last[8:], first_row=8)[0]])
        assert torch.equal(together, apart) and torch.equal(caches[0].kv, caches[1].kv)
        last = together.argmax(-1).tolist()

    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True)
    engines = [Engine(model, max_batch=b, native=True, kv_cache_dtype=torch.float32, prefix_cache_tokens=0) for b in (12, 4)]
    short = SamplingParams(max_new_tokens=2, temperature=0)
    few, many = (operator_calls(lambda: engines[0].generate(prompts, p)) for p in (short, params))
    assert engines[0].native is not None and many["nanoseek::mla_step"] == few["nanoseek::mla_step"] + 4
    for op in ("nanoseek::int4_linear", "nanoseek::int4_experts", "nanoseek::mla_attention_int4"):
        assert many.get(op, 0) == few.get(op, 0)  # (the prompts' alone)
    mine, fours = (e.generate(prompts, params) for e in engines)
    assert [r.tokens for r in mine] == [r.tokens for r in fours]
    for a, b in zip(mine, fours):
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x["logprob"] - y["logprob"]) < 1e-5


def test_int4_layers_it_does_not_take(int4_kernel):
    """int4 experts whose width is not a multiple of 64 (the products' inputs), an int4 layer in torch's kernel layout:
    the model decodes through its forward."""
    for model in (int8(tiny(kv_lora_rank=64, q_lora_rank=64), bits=4), int4()):
        if model.model.layers[1].mlp.experts[0].down_proj.in_features % 64 == 0:  # (the second: one layer torch's)
            model.model.layers[0].self_attn.o_proj._to_kernel_layout()
        e = Engine(model, max_batch=2, native=True)
        e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, temperature=0))
        assert e.native is None
