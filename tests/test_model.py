"""The model's fast paths against their naive references, MTP, balancing, routing and presets."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import operator_calls, randomize_
from nanoseek.inference import KVCache
from nanoseek.model import ConfigError, build_model, get_preset, update_router_bias
from nanoseek.model.config import ModelConfig
from nanoseek.model import moe as moe_module
from nanoseek.model.moe import Gate, MoE, pads_expert_rows, row_bucket, sequence_balance_loss


@pytest.mark.parametrize("q_lora_rank,dtype", [(32, torch.float32), (None, torch.float32), (None, torch.bfloat16)])
@pytest.mark.parametrize("rope_interleave", [True, False])
def test_absorbed_decode_equals_full_forward(q_lora_rank, dtype, rope_interleave):
    """(bf16 reads kv_b_proj whole where fp32 reads its halves: see MLA.absorbed_attention)"""
    cfg = get_preset("tiny", q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
                     rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                   "mscale": 1.0, "mscale_all_dim": 1.0})
    model = build_model(cfg).eval()
    randomize_(model)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    model.to(dtype)
    atol = 1e-4 if dtype == torch.float32 else 0.1
    with torch.no_grad():
        full = model(x).logits.float()
        cache = KVCache(cfg, rows=3, max_len=32, dtype=dtype)
        prefill = 7  # a prompt through the absorbed path, then one token at a time
        out = model(x[:, :prefill], position_ids=cache.positions(prefill), cache=cache).logits
        cache.advance()
        torch.testing.assert_close(out.float(), full[:, :prefill], atol=atol, rtol=0)
        for t in range(prefill, 20):
            step = model(x[:, t:t + 1], position_ids=cache.positions(1), cache=cache).logits
            cache.advance()
            torch.testing.assert_close(step[:, 0].float(), full[:, t], atol=atol, rtol=0)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize * (cfg.num_hidden_layers + 1)
    assert cache.bytes_per_token == per_token


@pytest.mark.parametrize("heads, dtype", [(1, torch.float32), (3, torch.float32), (2, torch.bfloat16)])
def test_cache_store_writes_each_row_at_its_positions(heads, dtype, monkeypatch):
    """KVCache.store through nanoseek::cache_write equals torch's index_put_ (its fallback), rows at different lengths,
    a row range that does not start at 0, MTP's group after the main layers; nothing else is touched."""
    from nanoseek import kernels
    from nanoseek.inference import cache as cache_module
    if not kernels.cache_write_available():
        pytest.skip("no C++ operators here")
    cfg = dataclasses.replace(get_preset("tiny"), num_hidden_layers=3, num_nextn_predict_layers=1)
    monkeypatch.setattr(type(cfg), "kv_cache_shape", property(lambda self: (heads, 12)))
    results = []
    for native in (True, False):
        monkeypatch.setattr(cache_module, "cache_write_available", lambda: native)
        g = torch.Generator().manual_seed(heads)
        cache = KVCache(cfg, rows=5, max_len=16, dtype=dtype)
        cache.lengths[:, 1:4] = torch.tensor([[3, 7, 0], [2, 6, 0]])
        for step in range(2):
            cache.select(1, 4)
            for group, layers in ((0, range(3)), (1, [3])):
                cache.positions(2, group)
                for layer in layers:
                    cache.attend(layer, torch.randn(3, 2, heads, 12, generator=g).to(dtype))
                cache.advance(group)
        results.append(cache.kv.clone())
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
    assert results[0][:, [0, 4]].abs().sum() == 0 and results[0][:, 1:4].abs().sum() > 0
    with pytest.raises(ValueError, match="position"):
        torch.ops.nanoseek.cache_write(cache.kv, [torch.zeros(1, 1, heads, 12, dtype=dtype)], torch.tensor([[16]]), 0, 0)
    with pytest.raises(ValueError, match="wants"):
        torch.ops.nanoseek.cache_write(cache.kv, [torch.zeros(1, 1, heads, 11, dtype=dtype)], torch.tensor([[0]]), 0, 0)
    with pytest.raises(ValueError, match="rows"):
        torch.ops.nanoseek.cache_write(cache.kv, [torch.zeros(2, 1, heads, 12, dtype=dtype)], torch.tensor([[0], [0]]), 0, 4)


def test_cache_holds_only_the_latent():
    cfg = get_preset("deepseek-v3")
    cache = KVCache(dataclasses.replace(cfg, num_hidden_layers=1, num_nextn_predict_layers=0), rows=1, max_len=4)
    assert cache.kv.shape[-1] == 576  # kv_lora_rank 512 + rope 64, not 128 heads x (192 + 128)


@pytest.mark.parametrize("preset_kw", [
    dict(),  # V3 sigmoid, groups
    dict(n_group=1, topk_group=1, norm_topk_prob=False),
    dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", norm_topk_prob=False),
    dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy", n_group=4,
         topk_group=2, n_shared_experts=0),
])
@pytest.mark.parametrize("shape, training", [((2, 9), True), ((2, 9), False), ((1, 1), False)])
def test_moe_dispatch_equals_per_token_loop(preset_kw, shape, training, monkeypatch):
    """Grouped by expert (many tokens) or one token's experts in turn (decoding one sequence), the
    routed experts give what a loop over tokens gives."""
    cfg = get_preset("tiny", **preset_kw)
    moe = MoE(cfg).train(training)
    randomize_(moe, std=0.3)
    calls = []
    monkeypatch.setattr(moe, "one_token", lambda *a, f=moe.one_token: calls.append(1) or f(*a))
    x = torch.randn(*shape, cfg.hidden_size)
    with torch.no_grad():
        got = moe(x)
        weights, idx, _ = moe.gate(x.view(-1, cfg.hidden_size))
        ref = []
        for n, token in enumerate(x.view(-1, cfg.hidden_size)):
            y = sum(weights[n, j] * moe.experts[int(idx[n, j])](token) for j in range(cfg.num_experts_per_tok))
            if moe.shared_experts is not None:
                y = y + moe.shared_experts(token)
            ref.append(y)
    torch.testing.assert_close(got.view(-1, cfg.hidden_size), torch.stack(ref), atol=1e-4, rtol=1e-5)
    assert len(calls) == (shape == (1, 1))


def test_bucketed_expert_slices_change_nothing(monkeypatch):
    """Padding each expert's slice to a bucketed row count (done for bf16 on a CPU) gives the
    unpadded outputs and gradients exactly: padding rows have gate weight 0, so they add exact zeros."""
    assert [row_bucket(n) for n in (0, 1, 32, 33, 36, 37, 500, 512, 513, 4097)] == [0, 1, 32, 36, 36, 40, 512, 512, 576, 4608]
    assert all(n <= row_bucket(n) <= n * 9 / 8 for n in range(20000))
    assert len({row_bucket(n) for n in range(4096)}) < 100
    cfg = get_preset("tiny", n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    randomize_(moe, std=0.3)
    x = torch.randn(3, 70, cfg.hidden_size)
    runs = []
    for pad in (False, True):
        monkeypatch.setattr(moe_module, "pads_expert_rows", lambda x, pad=pad: pad)
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        y = moe(xg)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs.append([y, xg.grad] + [p.grad for p in moe.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert pads_expert_rows(x.bfloat16()) and not pads_expert_rows(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pads_expert_rows(x)
    counts = torch.bincount(moe.gate(x.view(-1, cfg.hidden_size))[1].flatten(), minlength=8).tolist()
    assert sum(map(row_bucket, counts)) > sum(counts)  # padding rows were there


def test_stacked_experts_are_constants_in_a_compiled_step():
    """The stacked experts' shapes are fixed in a compiled decode step, not sizes that every call passes in
    (inductor's C++ wrapper makes each a tensor and reads it back: 16 of them cost ~10% of the shipped model's
    batch-1 step), also when prepare_compiled_decode stacks them again in another dtype."""
    cfg = get_preset("tiny", n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = MoE(cfg).eval()
    inputs = []

    def backend(gm, example_inputs):
        inputs.append(example_inputs)
        return gm

    for dtype in (torch.float32, torch.float64):
        moe.to(dtype).prepare_compiled_decode()
        assert moe.stacked is not None and moe.stacked[0].dtype == dtype
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(moe, backend=backend, dynamic=True, fullgraph=True)(torch.randn(1, 3, cfg.hidden_size, dtype=dtype))
        sizes = [x for x in inputs[-1] if isinstance(x, torch.SymInt)]
        assert len(sizes) <= 1, sizes  # the tokens' count alone is a size


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_compiled_moe_reads_the_chosen_or_all_experts_and_matches_the_routed_path(monkeypatch, tokens, kernel):
    """Compiled for inference the MoE has no data-dependent shapes: in fp32 where nanoseek's kernels build, one
    operator reads the chosen experts' rows (`float_experts`); otherwise a few tokens read their chosen experts'
    weights by index (`selected_experts`), many run every expert masked (`all_experts`); each gives what the
    routed experts give eagerly."""
    cfg = get_preset("tiny", n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    randomize_(moe, std=0.3)
    moe.prepare_compiled_decode()
    if kernel and not moe.float_kernel:
        pytest.skip("nanoseek's expert kernel does not run here")
    moe.float_kernel = kernel
    calls = []
    for name in ("selected_experts", "all_experts"):
        run = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, run=run, name=name: calls.append(name) or run(*a))
    x = torch.randn(1, tokens, cfg.hidden_size)
    with torch.no_grad():
        torch._dynamo.reset()  # (each case's module is new to dynamo: a graph each, over the recompile limit)
        compiled = torch.compile(moe, fullgraph=True, dynamic=False)
        compiled(x)
        ops = operator_calls(lambda: compiled(x))
        torch.testing.assert_close(compiled(x), moe(x), atol=3e-5, rtol=1e-5)  # (sums in another order)
    if kernel:
        assert calls == [] and ops.get("nanoseek::float_experts") == 1
    else:
        assert set(calls) == {"selected_experts" if tokens * 3 <= 4 * 9 else "all_experts"}
        assert "nanoseek::float_experts" not in ops


def test_experts_without_tokens_do_no_work(monkeypatch):
    cfg = get_preset("tiny")
    moe = MoE(cfg)
    randomize_(moe)
    calls = []
    for e, expert in enumerate(moe.experts):
        monkeypatch.setattr(expert, "forward", lambda t, s=None, e=e, f=expert.forward: calls.append(e) or f(t, s))
    x = torch.randn(1, 1, cfg.hidden_size)  # one token -> exactly top-k experts run
    moe.eval()(x)
    assert len(calls) == cfg.num_experts_per_tok


def test_in_training_every_expert_gets_a_gradient():
    """Data-parallel reduction needs the same set of gradients on every process."""
    cfg = get_preset("tiny")
    moe = MoE(cfg).train()
    randomize_(moe)
    moe(torch.randn(1, 1, cfg.hidden_size)).sum().backward()
    grads = [e.gate_proj.weight.grad for e in moe.experts]
    assert all(g is not None for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) == cfg.num_experts_per_tok


def test_v3_routing_by_hand():
    """4 experts in 2 groups, keep 1 group, top-2. Expert 0 alone scores highest, but group 1's top-2
    sum wins, so the token goes to experts 2 and 3 with unbiased, renormalised, scaled weights."""
    cfg = get_preset("tiny", n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
                     routed_scaling_factor=2.0)
    gate = Gate(cfg)
    target = torch.tensor([0.9, 0.1, 0.6, 0.7])  # sigmoid scores we want
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.logit(target)
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    w, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [2, 3]
    order = idx[0].argsort()
    torch.testing.assert_close(w[0][order], torch.tensor([0.6, 0.7]) / 1.3 * 2.0)
    with torch.no_grad():  # a bias steers selection only: the weights stay the unbiased scores
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    w, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(w[0][idx[0].argsort()], torch.tensor([0.9, 0.1]) / 1.0 * 2.0)


def test_sequence_balance_loss_by_hand():
    # 2 experts, top-1, 2 tokens: perfectly balanced -> f = [1, 1], P = [.5, .5] -> 1.0
    scores = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    assert sequence_balance_loss(scores, torch.tensor([[[0], [1]]]), 2).item() == pytest.approx(1.0)
    # both tokens to expert 0, which also has most of the affinity: f = [2, 0], P = [.75, .25] -> 1.5
    scores = torch.tensor([[[3.0, 1.0], [3.0, 1.0]]])
    assert sequence_balance_loss(scores, torch.tensor([[[0], [0]]]), 2).item() == pytest.approx(1.5)


def test_mtp_loss_is_finite_has_gradients_and_is_aligned():
    cfg = get_preset("tiny")
    model = build_model(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    inp, tgt = x[:, :-1], x[:, 1:]
    out = model(inp, labels=tgt)
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss) and torch.isfinite(out.aux_loss)
    (out.loss + 0.3 * out.mtp_loss + out.aux_loss).backward()
    mtp = model.mtp_layers[0]
    for name, p in mtp.named_parameters():
        if "experts." in name:  # an expert may receive no token in this tiny batch
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # depth 1 at position t reads token inp[t+1] and predicts tgt[t+1], computed by hand
    model.eval()
    with torch.no_grad():
        out = model(inp, labels=tgt)
        cos, sin = model.model.rotary_emb(torch.arange(14).expand(2, 14))
        h = mtp.predict(out.hidden[:, :14], inp[:, 1:], cos, sin)
        logits = mtp.shared_head(h)
        ref = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())
    torch.testing.assert_close(out.mtp_loss, ref)


def test_mtp_layers_sit_after_the_main_layers_and_share_embedding_and_head():
    cfg = get_preset("tiny", num_nextn_predict_layers=2)
    model = build_model(cfg)
    sd = model.state_dict()
    L = cfg.num_hidden_layers
    for k in range(2):
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight"):
            assert f"model.layers.{L + k}.{suffix}" in sd
    assert sd[f"model.layers.{L}.embed_tokens.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    assert sd[f"model.layers.{L}.shared_head.head.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    assert model.mtp_layers[0].is_moe  # MTP layers are full MoE layers, like V3's layer 61


def test_bias_update_moves_loads_toward_balance():
    cfg = get_preset("tiny", n_group=1, topk_group=1, num_experts_per_tok=2)
    moe = MoE(cfg).train()
    randomize_(moe)
    with torch.no_grad():
        moe.gate.weight[:2] += 0.5  # experts 0 and 1 take almost every token
    x = torch.randn(4, 64, cfg.hidden_size) + 0.2  # a shared direction the skewed rows respond to

    def imbalance_after(steps: int, gamma: float) -> float:
        with torch.no_grad():
            moe.gate.e_score_correction_bias.zero_()
            moe.gate.expert_load.zero_()
            for _ in range(steps):
                moe(x)
                stats = update_router_bias(moe, gamma)
            moe(x)
            return update_router_bias(moe, 0.0)["expert_imbalance"], stats

    skewed, _ = imbalance_after(1, 0.0)
    balanced, _ = imbalance_after(60, 0.02)
    assert skewed > 2.5  # max/mean load with the skew
    assert balanced < 1.5 and balanced < skewed / 2
    # and the routing weights are untouched by the bias: gradients never reach it
    assert not moe.gate.e_score_correction_bias.requires_grad


def test_bf16_keeps_router_bias_fp32():
    model = build_model(get_preset("tiny"), dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32
    out = model(torch.randint(0, 512, (1, 5)))
    assert out.logits.dtype == torch.bfloat16


@pytest.mark.parametrize("name,params,active,embedding_counted", [
    ("deepseek-v3", 671e9, 37e9, True),  # V3 paper: 671B total / 37B activated (README_WEIGHTS: incl. embedding)
    ("deepseek-v2-lite", 15.7e9, 2.4e9, False),  # V2 paper: 15.7B / 2.4B activated (without the input embedding)
])
def test_real_presets_have_the_published_sizes(name, params, active, embedding_counted):
    from nanoseek.model import DeepseekForCausalLM
    cfg = get_preset(name)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    assert model.num_params() == pytest.approx(params, rel=0.01)
    embedding = 0 if embedding_counted else cfg.vocab_size * cfg.hidden_size
    assert model.num_params(active=True) - embedding == pytest.approx(active, rel=0.03)


@pytest.mark.parametrize("field,value", [
    ("n_group", 3), ("topk_group", 5), ("num_experts_per_tok", 99), ("hidden_size", 0), ("qk_rope_head_dim", 7),
    ("mlp_bias", True), ("scoring_func", "relu"), ("topk_method", "greedy"), ("hidden_act", "gelu"),
    ("rope_scaling", {"type": "longrope", "factor": 2.0}), ("vocab_size", -5),
])
def test_config_out_of_range_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        get_preset("tiny", **{field: value})


@pytest.mark.parametrize("field,value,kind", [
    ("routed_scaling_factor", None, "a number"), ("routed_scaling_factor", "2.5", "a number"),
    ("norm_topk_prob", "false", "true or false"), ("rms_norm_eps", None, "a number"), ("rope_theta", "10000", "a number"),
    ("hidden_size", 64.5, "an integer"), ("eos_token_id", [1, "2"], "an integer or a list of integers or null"),
    ("rope_scaling", "yarn", "an object or null"), ("rope_parameters", "yarn", "an object"),
    ("rope_scaling.beta_fast", "32", "a number"), ("rope_scaling.factor", True, "a number"),
])
def test_config_field_of_the_wrong_kind_is_refused_by_name(field, value, kind):
    """A JSON value of the wrong kind (a string number, a null, the string "false", which is truthy) is refused naming
    the field, as transformers refuses it, not read as something else or left to fail in the forward."""
    d = {"model_type": "deepseek_v3", "max_position_embeddings": 8192,
         "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}}
    if field.startswith("rope_scaling."):
        d["rope_scaling"][field.split(".")[1]] = value
    else:
        d[field] = value
    with pytest.raises(ConfigError, match=f"'{field}' = {re.escape(repr(value))}: must be {kind}$"):
        ModelConfig.from_dict(d)


def test_a_v2_config_without_a_field_reads_transformers_v2_default():
    """DeepseekV2Config's defaults, not V3's: two shared experts, a 2,048 context (which yarn's original length
    falls back to), 64 experts; a missing n_group is none (one group for greedy routing), whatever topk_group says."""
    import transformers

    d = {"model_type": "deepseek_v2", "num_experts_per_tok": 6, "topk_group": 3,
         "rope_scaling": {"type": "yarn", "factor": 4.0}}
    ours, hf = ModelConfig.from_dict(d), transformers.DeepseekV2Config(**d)
    for name in ("n_shared_experts", "max_position_embeddings", "n_routed_experts", "moe_intermediate_size",
                 "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "bos_token_id", "eos_token_id", "routed_scaling_factor", "first_k_dense_replace"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.rope_scaling["original_max_position_embeddings"] == 2048 and (ours.n_group, ours.topk_group) == (1, 1)


def test_config_reads_fields_as_transformers_does():
    """Fields transformers ignores or fills in, read the same way (each was a refusal or a silent difference)."""
    v3 = ModelConfig.from_dict({"model_type": "deepseek_v3"})  # no num_key_value_heads: DeepseekV3Config's 128
    assert v3.num_key_value_heads == v3.num_attention_heads  # unused by MLA, not a refusal
    v2 = ModelConfig.from_dict({"model_type": "deepseek_v2", "norm_topk_prob": True, "rope_interleave": False})
    assert (v2.norm_topk_prob, v2.rope_interleave) == (False, True)  # HF's V2 never renormalises, always interleaves
    qwen = {"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 96, "vocab_size": 300}
    full = ModelConfig.from_dict({**qwen, "use_sliding_window": True, "max_window_layers": 4, "mlp_bias": True})
    assert full.sliding_layers == [] and not full.mlp_bias  # every layer full; Qwen2 has no MLP biases
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_dict({**qwen, "use_sliding_window": True, "max_window_layers": 2})
    yarn = ModelConfig.from_dict({**qwen, "max_position_embeddings": 4096,
                                  "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert yarn.rope_scaling["original_max_position_embeddings"] == 4096


def test_config_from_hf_v5_and_legacy_spellings():
    legacy = ModelConfig.from_dict({"model_type": "deepseek_v3", "rope_theta": 5e4,
                                    "rope_scaling": {"type": "yarn", "factor": 40,
                                                     "original_max_position_embeddings": 4096}})
    v5 = ModelConfig.from_dict({"model_type": "deepseek_v3", "num_mtp_layers": 0,
                                "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, "factor": 40.0,
                                                    "original_max_position_embeddings": 4096}})
    assert legacy.rope_theta == v5.rope_theta == 5e4
    assert legacy.rope_scaling["factor"] == v5.rope_scaling["factor"] == 40
    assert v5.num_nextn_predict_layers == 0
    derived = ModelConfig.from_dict({"model_type": "deepseek_v3", "max_position_embeddings": 16384,
                                     "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}})
    assert derived.rope_scaling["factor"] == 4.0  # missing factor: max / original context, as transformers does
    with pytest.raises(ConfigError, match="unknown architecture"):
        ModelConfig.from_dict({"model_type": "mistral"})


def test_input_validation():
    model = build_model(get_preset("tiny"))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.randn(1, 4))


@pytest.mark.parametrize("dtype, group_bytes", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.bfloat16, 128 * 97 * 2)])  # groups of 2 chunks, the last partial
def test_linear_cross_entropy_equals_the_plain_loss_and_gradients(dtype, group_bytes, monkeypatch):
    from nanoseek.model import loss
    from nanoseek.model.loss import linear_cross_entropy

    if group_bytes:
        monkeypatch.setattr(loss, "GROUP_BYTES", group_bytes)

    N, D, V = 300, 32, 97
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100)
        got = linear_cross_entropy(h, w, y, chunk=64)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    gh_ref, gw_ref = torch.autograd.grad(ref * 3, (h, w))
    gh, gw = torch.autograd.grad(got * 3, (h, w))
    torch.testing.assert_close(gh, gh_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)
    with torch.no_grad():  # forward only, and no targets at all
        assert linear_cross_entropy(h, w, torch.full((N,), -100)).item() == 0.0


@pytest.mark.parametrize("heads, kv_heads, dv, S", [(4, 4, 32, 24), (4, 2, 48, 24), (2, 2, 32, 200), (2, 1, 32, 300)])
def test_compiled_bf16_attention_on_a_cpu_equals_the_fused_kernel(heads, kv_heads, dv, S):
    """Compiled, in bf16 on a CPU, small attention runs as products and a softmax (faster there than the
    fused kernel), a block of queries at a time (S = 200: three blocks of 64 and one of 8; 300: two of 128
    and one of 44): its output and gradients match SDPA's in fp32, with a v narrower than q/k and with GQA."""
    from nanoseek.model.attention import causal_attention

    torch.manual_seed(0)
    B, d = 2, 48
    q, k, v = (torch.randn(B, h, S, w, requires_grad=True) for h, w in ((heads, d), (kv_heads, d), (kv_heads, dv)))
    gqa = heads != kv_heads

    def run(fn):
        for t in (q, k, v):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.2, gqa)
        out.float().square().sum().backward()
        return out.float(), [t.grad.clone() for t in (q, k, v)]

    graphs = []
    run(torch.compile(causal_attention, fullgraph=True, backend=lambda gm, _: graphs.append(gm.code) or gm.forward))
    assert "scaled_dot_product" not in graphs[0]  # the products, not the fused kernel
    assert graphs[0].count(".softmax(") == -(-S // (64 if S <= 256 else 128))  # one a block of queries
    out, grads = run(torch.compile(causal_attention, fullgraph=True))
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True, scale=0.2, enable_gqa=gqa)
    assert out.shape == (B, heads, S, dv) and torch.allclose(out, ref, atol=0.03), (out - ref).abs().max()
    _, ref_grads = run(lambda *a: torch.compiler.disable(causal_attention)(*a))  # eager: the fused kernel in fp32
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=0.05 * r.abs().max()), (g - r).abs().max()
