"""The inference engine: cached decoding, continuous batching, prefix sharing, sampling, stops,
cancellation, speculative decoding."""

import copy
import gc

import numpy as np
import pytest
import torch

from conftest import randomize_, tiny_gqa_config
from nanoseek.inference import Engine, EngineBusy, InvalidRequest, SamplingParams
from nanoseek.inference.sampling import RowState, draw, filter_logits
from nanoseek.loading import warm_up
from nanoseek.model import build_model, get_preset

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module", params=["mla", "gqa", "qwen3"])
def model(request):
    """The tiny DeepSeek-V3 (MLA, MoE, MTP; latent cache), a tiny Qwen2 (GQA; key-value cache) and a tiny Qwen3
    (GQA with each head's queries and keys normalised, heads wider than hidden / heads)."""
    torch.manual_seed(0)
    config = {"mla": lambda: get_preset("tiny", eos_token_id=-1), "gqa": lambda: tiny_gqa_config(eos_token_id=-1),
              "qwen3": lambda: tiny_gqa_config(model_type="qwen3", head_dim=24, eos_token_id=-1)}[request.param]()
    m = build_model(config).eval()
    randomize_(m, std=0.15)
    return m


@pytest.fixture
def mtp_model(model):
    if not model.mtp_layers:
        pytest.skip("speculative decoding needs MTP layers (DeepSeek only)")
    return model


def prompts(n, seed=0, lo=3, hi=20, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def reference_greedy(model, prompt, n):
    """Greedy decoding by full forward passes (no cache), and the logits at each step."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids])).logits[0, -1]
            logits.append(out)
            ids.append(int(out.argmax()))
    return ids[len(prompt):], logits


def test_cached_decoding_equals_full_forward_at_every_step(model):
    prompt = prompts(1, seed=1)[0]
    engine = Engine(model, max_batch=1, kv_cache_dtype="fp32")  # the cache in the model's precision: the same numbers
    req = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, logprobs=True))[0]
    ref_tokens, ref_logits = reference_greedy(model, prompt, 10)
    assert req.tokens == ref_tokens
    for lp, logits in zip(req.logprobs, ref_logits):
        assert lp["logprob"] == pytest.approx(float(logits.log_softmax(-1)[lp["token"]]), abs=1e-4)


def test_the_cache_precision_auto_picks_fp16_only_where_a_kernel_reads_it():
    from nanoseek.inference.cache import cache_dtype
    from nanoseek.kernels import gqa_attention_available, mla_latent_available

    mla, gqa = get_preset("tiny"), tiny_gqa_config()
    assert cache_dtype(mla, torch.float32, "cpu") == (torch.float16 if mla_latent_available() else torch.float32)
    assert cache_dtype(mla, torch.bfloat16, "cpu") == torch.bfloat16  # (the kernels read fp32 activations only)
    assert cache_dtype(mla, torch.float32, "cuda") == torch.float32
    # (GQA's kernel reads fp16 keys and values; torch's products would widen them every step)
    assert cache_dtype(gqa, torch.float32, "cpu") == (torch.float16 if gqa_attention_available() else torch.float32)
    assert cache_dtype(gqa, torch.bfloat16, "cpu") == torch.bfloat16
    assert cache_dtype(gqa, torch.float32, "cuda") == torch.float32
    assert cache_dtype(gqa, torch.float32, "cpu", "fp32") == torch.float32
    assert cache_dtype(gqa, torch.float32, "cpu", "fp16") == torch.float16
    assert cache_dtype(mla, torch.float32, "cpu", "fp32") == torch.float32
    with pytest.raises(ValueError, match="fp8.*auto, fp32, fp16, bf16"):
        cache_dtype(mla, torch.float32, "cpu", "fp8")


@pytest.mark.parametrize("kv", ["fp16", "bf16"])
def test_a_cache_in_half_precision_decodes_as_the_full_forward_within_its_rounding(model, kv):
    """A cache kept in fp16 (the default for MLA on a CPU, read by nanoseek's kernels) or bf16 (widened by torch):
    every step's distribution within the cache's rounding of the full forward's over the same tokens, and each greedy
    token the full forward's choice wherever its lead is wider than that rounding."""
    prompt = prompts(1, seed=1)[0]
    engine = Engine(model, max_batch=2, kv_cache_dtype=kv)
    assert engine.cache.kv.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[kv]
    req = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, logprobs=True))[0]
    with torch.no_grad():  # teacher-forced over the tokens the engine chose
        ref = model(torch.tensor([prompt + req.tokens])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    tol = {"fp16": 5e-3, "bf16": 5e-2}[kv]
    for lp, row in zip(req.logprobs, ref):
        assert lp["logprob"] == pytest.approx(float(row[lp["token"]]), abs=tol)
        top2 = row.topk(2).values
        if top2[0] - top2[1] > 2 * tol:
            assert lp["token"] == int(row.argmax())
    fp32 = Engine(model, max_batch=1, kv_cache_dtype="fp32").generate([prompt], GREEDY)[0].tokens
    agree = sum(a == b for a, b in zip(fp32, engine.generate([prompt], GREEDY)[0].tokens))
    assert agree >= (12 if kv == "fp16" else 6)  # a random tiny model: greedy ties are rare, not impossible


def test_a_one_token_prompt_decodes_as_the_full_forward_in_a_row_a_longer_one_left(model):
    """After a 1-token prompt a step attends 2 positions, the second masked out (a size of 1 made compiled steps
    compile anew while serving): a row that held a longer sequence before, its entries still there, decodes the 1-token
    prompt as the full forward does."""
    engine = Engine(model, max_batch=1, kv_cache_dtype="fp32")
    engine.generate(prompts(1, seed=4, lo=15, hi=16), GREEDY)  # (the row's positions 1.. hold this one's entries)
    engine.cache.select(0, 1)
    engine.cache.lengths[:, 0] = 1
    engine.cache.positions(1)
    assert engine.cache.mask(0).shape[-1] == 3  # (2 attended + the new one)
    engine.cache.lengths[:, 0] = 0
    req = engine.generate([[7]], SamplingParams(max_new_tokens=6, temperature=0))[0]
    assert req.tokens == reference_greedy(model, [7], 6)[0]


def test_mixed_lengths_joining_and_leaving_give_the_tokens_of_each_alone(model):
    ps = prompts(7, seed=2)
    lengths = [3, 12, 5, 9, 1, 7, 4]
    alone = [Engine(model, max_batch=1).generate([p], SamplingParams(max_new_tokens=n, temperature=0))[0].tokens
             for p, n in zip(ps, lengths)]
    engine = Engine(model, max_batch=3)  # fewer rows than requests: they join as others leave
    reqs = engine.generate(ps, [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths])
    assert [r.tokens for r in reqs] == alone
    assert all(len(r.tokens) == n and r.finish_reason == "length" for r, n in zip(reqs, lengths))
    assert not engine.active and int(engine.cache.lengths.sum()) == 0


def test_prefix_sharing_prefills_once_and_changes_nothing(model):
    base = prompts(1, seed=3, lo=30, hi=31)[0]
    group = [base] * 4 + [base + [7, 8, 9]]
    plain = [Engine(model, max_batch=1, prefix_cache_tokens=0).generate([p], GREEDY)[0].tokens for p in group]
    engine = Engine(model, max_batch=8)
    reqs = engine.generate(group, GREEDY)
    assert [r.tokens for r in reqs] == plain
    assert reqs[0].cached_tokens == 0
    # admitted together with the same prompt: its cache entries and its next-token logits serve whole
    assert all(r.cached_tokens == len(base) for r in reqs[1:4])
    assert reqs[4].cached_tokens == len(base)
    # a follow-up turn hits the finished conversation in the prefix store
    follow = base + reqs[0].tokens + [5, 6]
    again = engine.generate([follow], GREEDY)[0]
    assert again.cached_tokens >= len(base) + len(reqs[0].tokens) - 1
    assert again.tokens == Engine(model, max_batch=1).generate([follow], GREEDY)[0].tokens


def test_seeds_reproduce_whatever_else_is_in_the_batch(model):
    p = prompts(1, seed=4)[0]
    sp = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=42)
    alone = Engine(model, max_batch=1).generate([p], sp)[0].tokens
    crowd = Engine(model, max_batch=4).generate(prompts(3, seed=5) + [p],
                                                [SamplingParams(max_new_tokens=9, temperature=1.0)] * 3 + [sp])
    assert crowd[-1].tokens == alone
    other = Engine(model, max_batch=1).generate([p], SamplingParams(max_new_tokens=15, temperature=1.0, seed=43))
    assert other[0].tokens != alone


def test_stop_strings_never_leak_even_across_tokens(model):
    p = prompts(1, seed=6)[0]
    vocab = "abcdefghijklmnopqrstuvwxyz"

    def decode(ids):
        return "".join(vocab[t % 26] for t in ids)

    free = Engine(model, decode=decode, max_batch=1).generate([p], SamplingParams(max_new_tokens=20, temperature=0))[0]
    text = free.text
    stop = text[7:10]  # three characters spanning three tokens
    engine = Engine(model, decode=decode, max_batch=1)
    req = engine.submit(p, SamplingParams(max_new_tokens=20, temperature=0, stop=(stop,)))
    while engine.has_work:
        engine.step()
    events = []
    while not req.events.empty():
        events.append(req.events.get())
    streamed = "".join(ev.text for ev in events)
    assert req.finish_reason == "stop" and events[-1].finish_reason == "stop"
    assert req.text == text[: text.find(stop)] == streamed
    assert stop not in streamed


def test_a_reply_ending_inside_a_utf8_character_streams_all_of_its_text(model):
    """Text held back while a character may still complete is sent when the request ends."""
    def decode(ids):  # every token is a lone UTF-8 lead byte: the text never becomes valid
        return bytes([0xE2] * len(ids)).decode("utf-8", errors="replace")

    engine = Engine(model, decode=decode, max_batch=2, eos_token_id=-1)
    req = engine.generate([prompts(1)[0]], SamplingParams(max_new_tokens=6, temperature=0))[0]
    events = []
    while not req.events.empty():
        events.append(req.events.get())
    assert req.text == "\ufffd" * 6 and "".join(e.text for e in events) == req.text


def test_cancel_frees_the_row_at_once(model):
    engine = Engine(model, max_batch=2)
    a = engine.submit(prompts(1, seed=7)[0], SamplingParams(max_new_tokens=50, temperature=0))
    b = engine.submit(prompts(1, seed=8)[0], SamplingParams(max_new_tokens=5, temperature=0))
    engine.step()
    engine.step()
    engine.cancel(a)
    engine.step()
    assert a.finish_reason == "cancelled" and len(engine.active) == 1 and engine.active[0] is b
    assert int(engine.cache.lengths[0, 1]) == 0  # the freed row holds nothing
    while engine.has_work:
        engine.step()
    assert b.tokens == Engine(model, max_batch=1).generate([b.prompt], SamplingParams(max_new_tokens=5,
                                                                                      temperature=0))[0].tokens


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 99999]), "token ids"),
    (dict(max_new_tokens=10_000), "exceeds the context of 256 tokens by"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_logprobs=50), "top_logprobs"),
    (dict(stop_token_ids=(5000,)), "stop token"),
    (dict(stop=("x",)), "decode function"),
])
def test_invalid_requests_are_refused_up_front(model, bad, match):
    engine = Engine(model, max_batch=2, max_len=256)
    good = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0))
    bad = dict(bad)  # shared by the model's parameters
    prompt = bad.pop("prompt", [1, 2, 3])
    with pytest.raises(InvalidRequest, match=match):
        engine.submit(prompt, SamplingParams(**{"max_new_tokens": 4, **bad}))
    while engine.has_work:
        engine.step()
    assert len(good.tokens) == 4 and len(engine.waiting) == 0


def test_full_queue_says_busy(model):
    engine = Engine(model, max_batch=1, max_queue=2)
    engine.submit([1], GREEDY)
    engine.submit([2], GREEDY)
    with pytest.raises(EngineBusy):
        engine.submit([3], GREEDY)


def test_filters_keep_what_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    f = lambda k=0, p=1.0, m=0.0: torch.isfinite(filter_logits(logits, torch.tensor([k]), torch.tensor([p]),
                                                                torch.tensor([m])))[0].tolist()
    assert f(k=2) == [True, True, False, False]
    assert f(p=0.7) == [True, True, False, False]  # 0.5 + 0.25 reaches 0.7
    assert f(p=0.75) == [True, True, False, False]
    assert f(p=0.76) == [True, True, True, False]
    assert f(m=0.4) == [True, True, False, False]  # below 0.4 * 0.5 = 0.2 is dropped
    assert f(p=0.01) == [True, False, False, False]


def test_draws_follow_the_distribution_and_never_take_an_excluded_token():
    """Sampled rows draw from softmax(logits), both across rows (20,000 rows of the same logits,
    each its own stream) and along one row's stream (20,000 steps of one seeded row); a token at
    -inf (filtered out) is never drawn; a greedy row takes the argmax; a seeded row draws the same
    tokens whatever else is in the batch."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 20_000
    logits = torch.log(probs).expand(n + 1, -1).clone()
    rows = [RowState(SamplingParams(temperature=1.0)) for _ in range(n)] + [RowState(SamplingParams(temperature=0))]
    logits[-1] = torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0])
    tokens = draw(logits, rows)
    assert tokens[-1] == 2
    one = RowState(SamplingParams(temperature=1.0, seed=3))
    along = torch.cat([draw(logits[:1], [one]) for _ in range(n)])
    for sample in (tokens[:-1], along):
        freq = torch.bincount(sample, minlength=5).double() / n
        assert freq[1] == 0
        assert (freq - probs.double()).abs().max() < 0.015, freq  # 4 standard errors at p = 0.5
    alone = RowState(SamplingParams(temperature=1.0, seed=7))
    first = [int(draw(logits[:1], [alone])) for _ in range(30)]
    batched, others = RowState(SamplingParams(temperature=1.0, seed=7)), [RowState(SamplingParams()) for _ in range(3)]
    assert first == [int(draw(logits[:4], [others[0], batched, *others[1:]])[1]) for _ in range(30)]


def test_the_noise_is_finite_for_every_draw_so_masked_tokens_stay_out():
    """The highest of the 2^24 noise values was +inf (fp32 rounded U to 1): once in 16M entries a token
    won whatever its logit, even one a grammar had masked to -inf (a JSON answer broke off mid-number)."""
    from nanoseek.inference.sampling import gumbel_of_bits

    extremes = gumbel_of_bits(torch.tensor([0, 1, 0xFFFFFE, 0xFFFFFF]))
    assert torch.isfinite(extremes).all() and (extremes.diff() > 0).all(), extremes
    # 16M entries, one allowed token per row: it is always the one drawn
    V = 1 << 22
    logits = torch.full((4, V), float("-inf"))
    logits[torch.arange(4), torch.tensor([5, 77, V - 1, 0])] = 0.0
    rows = [RowState(SamplingParams(temperature=1.0, seed=s)) for s in range(4)]
    assert draw(logits, rows).tolist() == [5, 77, V - 1, 0]


def test_penalties_discourage_repeats(model):
    p = prompts(1, seed=9)[0]
    plain = Engine(model, max_batch=1).generate([p], SamplingParams(max_new_tokens=30, temperature=0))[0].tokens
    pen = Engine(model, max_batch=1).generate([p], SamplingParams(max_new_tokens=30, temperature=0,
                                                                   frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert len(set(pen.tokens)) >= len(set(plain))
    assert max(pen.tokens.count(t) for t in pen.tokens) <= max(plain.count(t) for t in plain)


def test_speculative_greedy_equals_plain_greedy(mtp_model):
    model = mtp_model
    ps = prompts(5, seed=10)
    lengths = [20, 7, 15, 3, 11]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths]
    plain = Engine(model, max_batch=3).generate(ps, params)
    spec = Engine(model, max_batch=3, speculative=True).generate(ps, params)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert sum(r.drafted for r in spec) > 0


def test_speculative_sampling_keeps_the_distribution(mtp_model):
    """The token decided by verifying an MTP draft follows the model's distribution: compare the
    empirical joint distribution of the first two sampled tokens with and without speculation."""
    model = mtp_model
    p = prompts(1, seed=11)[0]
    n = 600
    sp = [SamplingParams(max_new_tokens=2, temperature=1.0, top_k=3, seed=s) for s in range(n)]
    plain = Engine(model, max_batch=32).generate([p] * n, sp)
    spec = Engine(model, max_batch=32, speculative=True).generate([p] * n, sp)
    assert sum(r.drafted for r in spec) > 0

    def joint(reqs):
        counts = {}
        for r in reqs:
            counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1 / n
        return counts

    a, b = joint(plain), joint(spec)
    tv = sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b)) / 2
    assert tv < 0.1, tv  # at most 9 outcomes: sampling noise is about 0.04 at n = 600


def test_after_the_warm_up_no_number_of_rows_compiles_again(model):
    """Found by a user: `serve` compiled a new decode graph in the middle of serving when 9-12 requests ran together
    (its warm-up had covered 1, 2 and 13 rows); with the warm-up's row counts compiled, none up to max_batch is new."""
    torch._dynamo.reset()
    engine = Engine(copy.deepcopy(model), max_batch=12, compile=True, native=False)
    gc.unfreeze()
    warm_up(engine, 12)
    assert gc.get_freeze_count() > 0  # what compiling left, out of the collector's full passes
    gc.unfreeze()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in range(1, 13):
            engine.generate(prompts(rows, seed=rows), SamplingParams(max_new_tokens=3, temperature=0))
            assert engine.compiled, f"{rows} rows compiled a graph of their own"


def test_compiled_decoding_gives_the_eager_tokens_and_follows_weight_updates(model):
    """compile=True (each decode step one compiled graph, the tiny MoE's experts read stacked) and the C++ step
    (inference/native.py, MLA models) decode exactly what the eager engine does, plain and speculative, with rows
    joining and leaving; and engines kept across an in-place weight change (GRPO trains the model between rollouts)
    decode with the new weights, cached prefixes included."""
    m = copy.deepcopy(model)
    ps = prompts(5, seed=20)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (9, 4, 14, 1, 6)]
    kinds = ((False, False, False), (True, False, False), (False, False, True)) + \
        (((True, True, False),) if m.mtp_layers else ())
    kept = {kind: Engine(m, max_batch=3, speculative=kind[1], compile=kind[0], native=kind[2]) for kind in kinds}

    def check():
        fresh = [r.tokens for r in Engine(m, max_batch=3, native=False).generate(ps, params)]
        for (compile, spec, native), engine in kept.items():
            got = [r.tokens for r in engine.generate(ps, params)]
            assert got == fresh, f"compile={compile} speculative={spec} native={native}"
            assert engine.compiled == compile  # no silent fallback to eager decoding
            assert (engine.native is not None) == (native and not m.config.is_gqa)
        return fresh

    before = check()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".experts." in name or "q_b_proj" in name or "q_proj" in name:
                p.add_(torch.randn_like(p) * 0.1)
    assert check() != before


def test_a_decode_step_leaves_the_cache_write_to_advance(model):
    """The (compiled) step function only stages the new latents; `cache.advance` writes them, in eager
    code: written inside the graph, inductor rewrote the whole allocated cache at every step, which
    made compiled decoding 10x slower than eager at 64 rows of a 256-row engine."""
    engine = Engine(model, max_batch=2, max_len=64)
    engine.generate([[3, 4, 5, 6]], SamplingParams(max_new_tokens=2, temperature=0))
    cache = engine.cache
    cache.lengths[:, 0] = 4
    cache.select(0, 1)
    pos = cache.positions(1)
    before = cache.kv.clone()
    engine._logits(torch.tensor([[7]]), pos)
    assert torch.equal(cache.kv, before) and cache._staged
    cache.advance()
    assert not torch.equal(cache.kv, before) and not cache._staged


def test_compiled_graphs_are_not_shared_between_models(mtp_model):
    """Compiled graphs are cached per process; a second model with another routing (V2's softmax
    top-k) must compile its own rather than run the first model's routing."""
    model = mtp_model
    torch.manual_seed(1)
    other = build_model(get_preset("tiny", eos_token_id=-1, scoring_func="softmax", topk_method="greedy",
                                   n_group=1, topk_group=1, norm_topk_prob=False)).eval()
    other.load_state_dict(model.state_dict(), strict=False)  # same weights (V2 has no routing bias)
    ps, params = prompts(3, seed=21), SamplingParams(max_new_tokens=8, temperature=0)
    for m in (model, other):
        engine = Engine(m, max_batch=3, compile=True, native=False)
        eager = Engine(m, max_batch=3, native=False)
        assert [r.tokens for r in engine.generate(ps, params)] == [r.tokens for r in eager.generate(ps, params)]
        assert engine.compiled


def test_prefill_in_chunks_changes_nothing(model):
    """Long prompts are prefilled a chunk at a time: chunks of 5 tokens give the tokens and logprobs of
    one whole-prompt forward (and, with MTP, the same drafts). (The cache in fp32: in fp16 a later chunk reads the
    earlier ones' latents rounded, where one forward attends them as computed.)"""
    ps = prompts(4, seed=30, lo=12, hi=40)
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True)
    for spec in (False, True) if model.mtp_layers else (False,):
        whole, chunked = (Engine(model, max_batch=2, speculative=spec, prefill_chunk=c, kv_cache_dtype="fp32")
                          .generate(ps, params) for c in (512, 5))
        assert [r.tokens for r in chunked] == [r.tokens for r in whole]
        for a, b in zip(chunked, whole):
            assert [lp["logprob"] for lp in a.logprobs] == pytest.approx([lp["logprob"] for lp in b.logprobs], abs=1e-4)
        assert [r.accepted for r in chunked] == [r.accepted for r in whole]


def test_streamed_text_is_the_whole_decode_for_any_decoder(model):
    """The engine decodes only the tokens since the last settled character; the text and what streams
    equal decoding the whole reply: byte-level pieces of a character (held until it completes) and a
    SentencePiece-style decoder that drops a sequence's leading space (Llama 2, Mistral)."""
    from tokenizers import Tokenizer, decoders, models

    from nanoseek.tokenizer import DeepSeekTokenizer
    from test_server import scripted

    byte_level = DeepSeekTokenizer.train(["a b c", "hello world"] * 20, vocab_size=300)
    words = Tokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "!": 2, "▁again": 3, "<unk>": 4}, unk_token="<unk>"))
    words.decoder = decoders.Metaspace()
    cases = [(byte_level.decode, byte_level.encode("hi 🦜 ok é 😀😀 end")), (words.decode, [0, 1, 2, 3, 2, 0])]
    for decode, tokens in cases:
        assert max(tokens) < model.config.vocab_size
        engine = Engine(model, decode=decode, max_batch=1, max_len=64)
        scripted(engine, tokens)
        streamed = []
        req = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=len(tokens)), on_event=lambda ev: streamed.append(ev.text))
        while engine.has_work:
            engine.step()
        assert req.tokens == tokens and req.text == decode(tokens) and "".join(streamed) == req.text, (req.text, streamed)


def test_prompts_and_parameters_in_the_shapes_people_pass_them():
    """A stop given as one string is that string (it had stopped at each of its characters); OpenAI's logit_bias dict
    is taken; a prompt as a tensor or an array is its ids (it was refused as 'not integers'), text is refused saying
    to encode it; True is no seed or count."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", eos_token_id=-1)).eval()
    randomize_(model, std=0.15)
    text = {i: chr(97 + i % 26) for i in range(model.config.vocab_size)}
    engine = Engine(model, decode=lambda ids: "".join(text[i] for i in ids), max_batch=2)
    p = prompts(1)[0]
    free = engine.generate([p], SamplingParams(max_new_tokens=30, temperature=0))[0].text
    stop = free[5:7]
    r = engine.generate([p], SamplingParams(max_new_tokens=30, temperature=0, stop=stop))[0]
    assert r.text == free[:free.index(stop)] and r.stop_string == stop
    first = engine.generate([p], SamplingParams(max_new_tokens=1, temperature=0))[0].tokens[0]
    biased = engine.generate([p], SamplingParams(max_new_tokens=1, temperature=0, logit_bias={(first + 1) % 512: 100}))
    assert biased[0].tokens == [(first + 1) % 512]
    for given in (torch.tensor(p), np.array(p)):
        assert engine.generate([given], SamplingParams(max_new_tokens=3, temperature=0))[0].text == free[:3]
    for bad, message in (("hello", "encode it"), (torch.tensor([p]), "one sequence")):
        with pytest.raises(InvalidRequest, match=message):
            engine.submit(bad)
    for params in (SamplingParams(seed=True), SamplingParams(max_new_tokens=True), SamplingParams(logit_bias=((5,),))):
        with pytest.raises(InvalidRequest):
            engine.submit(p, params)


def test_a_listener_that_raises_fails_its_request_with_the_error():
    """The request had ended 'cancelled' with no error and nothing said why."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", eos_token_id=-1)).eval()
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        def listener(ev):
            raise ValueError("boom")

        r = engine.submit(prompts(1)[0], SamplingParams(max_new_tokens=20), on_event=listener).result(60)
        assert r.finish_reason == "error" and isinstance(r.error, ValueError)
        ok = engine.submit(prompts(1)[0], SamplingParams(max_new_tokens=3)).result(60)
        assert ok.finish_reason == "length"  # the engine goes on
    finally:
        engine.shutdown()
