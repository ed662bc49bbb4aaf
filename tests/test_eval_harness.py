"""/v1/completions as evaluation harnesses use it: prompt logprobs computed by the engine (echo, with
max_tokens 0 or 1), several prompts per request, logprobs streamed with their text; then
lm-evaluation-harness (`local-completions`, `local-chat-completions`) against a `nanoseek serve`
subprocess, scoring what the model itself scores."""

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import randomize_
from nanoseek import load_model
from nanoseek.checkpoint import inference_dtypes
from nanoseek.inference import Engine, SamplingParams
from nanoseek.model import build_model, get_preset
from nanoseek.serve import create_app
from nanoseek.tokenizer import DeepSeekTokenizer
from test_server import LiveServer, free_port

SHIPPED = Path(__file__).parents[1] / "nanoseek" / "assets" / "model"
# local-completions as the README runs it: the model's own tokenizer, with the BOS in front as in training
HARNESS_TOKENIZER = f",tokenizer_backend=huggingface,tokenizer={SHIPPED},add_bos_token=True"
TEXT = "\n645 - 49 = ?\n645-49: 3 digits vs 2"


def direct_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward pass without a cache."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()


@pytest.fixture(scope="module")
def tok():
    return DeepSeekTokenizer.load(SHIPPED)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model(get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                               max_position_embeddings=256)).eval()
    randomize_(m, std=0.08)
    return m


@pytest.fixture(scope="module")
def client(model, tok):
    """A live server whose engine prefills 4 tokens at a time, so prompt logprobs cross chunks (its cache in fp32: a
    later chunk reads the earlier ones' latents as the direct forward computed them)."""
    engine = Engine(model, decode=tok.decode, max_batch=8, max_len=256, eos_token_id=tok.eos_id, prefill_chunk=4,
                    kv_cache_dtype="fp32")
    with LiveServer(create_app(engine, tok, name="tiny")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("kv, chunk, within", [("fp32", 5, 1e-4), ("auto", 5, 2e-3), ("auto", 512, 1e-4)])
def test_engine_prompt_logprobs_equal_a_direct_forward_and_skip_the_prefix_cache(model, speculative, kv, chunk, within):
    """Prompt logprobs as a direct forward gives them: exactly from one chunk, or across chunks over a cache in the
    model's precision; across chunks over the default half-precision cache (MLA on a CPU) within its rounding."""
    ids = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = Engine(model, max_batch=2, prefill_chunk=chunk, speculative=speculative, kv_cache_dtype=kv)
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=True, top_logprobs=3)
    first, again = engine.generate([ids, ids], [params, replace(params, max_new_tokens=3, temperature=0)])
    assert first.tokens == [] and first.finish_reason == "length" and len(again.tokens) == 3
    assert again.cached_tokens == 0
    assert [e["token"] for e in first.prompt_logprobs] == ids[1:]
    assert [e["logprob"] for e in first.prompt_logprobs] == pytest.approx(direct_logprobs(model, ids), abs=within)
    assert [e["logprob"] for e in again.prompt_logprobs] == [e["logprob"] for e in first.prompt_logprobs]
    assert all(len(e["top"]) == 3 and e["top"][0][1] >= e["logprob"] for e in first.prompt_logprobs)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_equal_a_direct_forward(client, model, tok, max_tokens):
    ids = [tok.bos_id] + tok.encode(TEXT)
    r = client.completions.create(model="tiny", prompt=TEXT, echo=True, logprobs=2, max_tokens=max_tokens,
                                  temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(TEXT) and r.usage.completion_tokens == max_tokens and r.usage.prompt_tokens == len(ids)
    assert len(lp.tokens) == len(ids) + max_tokens and lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(direct_logprobs(model, ids), abs=1e-4)
    for token, top, v in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:]):  # the 2 likeliest and the token
        assert len(top) in (2, 3) and top[token] == v and max(top.values()) >= v
    assert lp.text_offset[:2] == [0, 0] and lp.text_offset[len(ids) - 1] == len(TEXT) - len(lp.tokens[len(ids) - 1])
    if max_tokens:  # greedy: the generated token is the most likely one
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values()) and lp.text_offset[-1] == len(TEXT)
    else:
        plain = client.completions.create(model="tiny", prompt=TEXT, echo=True, max_tokens=0).choices[0]
        assert plain.text == TEXT and plain.logprobs is None


def test_list_prompts_get_their_choices_in_order(client, tok):
    texts = ["\n12 + 7 = ?\n", "\nWork out 55*50.\n"]
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    alone = [client.completions.create(prompt=t, **kw).choices[0].text for t in texts]
    r = client.completions.create(prompt=texts, n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and [c.text for c in r.choices] == [a for a in alone for _ in range(2)]
    ids = [[tok.bos_id] + tok.encode(t) for t in texts]
    by_ids = client.completions.create(prompt=ids, echo=True, **kw)
    assert [c.text for c in by_ids.choices] == [tok.decode(i) + a for i, a in zip(ids, alone)]
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    assert client.completions.create(prompt=ids[1], **kw).choices[0].text == alone[1]


def test_streamed_logprobs_arrive_with_their_text(client, tok):
    kw = dict(model="tiny", prompt=TEXT, echo=True, logprobs=1, max_tokens=12, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    bos = tok.decode([tok.bos_id])  # added by the server, not part of the text
    text, tokens, values = "", [], []
    for chunk in client.completions.create(**kw, stream=True):
        c = chunk.choices[0]
        if c.logprobs is not None:
            assert c.logprobs.text_offset[-1] >= len(text)  # offsets count in the whole text
            shown = "".join(t for t in c.logprobs.tokens if t != bos)
            assert shown == c.text or c.finish_reason or "\ufffd" in shown  # (text held back: a partial character)
            tokens += c.logprobs.tokens
            values += c.logprobs.token_logprobs
        text += c.text
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)


@pytest.mark.parametrize("body, param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": "1 +", "max_tokens": 0}, "max_tokens"),
])
def test_bad_prompts_are_refused(client, body, param):
    r = httpx.post(f"{client.base_url}completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---- lm-evaluation-harness against `nanoseek serve` ----
MC_DOCS = [{"question": "\n12 + 7 = ?\n12+7: 2+7+0=9 c0 | 1+0+0=1 c0 ->", "choices": ["19", "18", "21"], "answer": 0},
           {"question": "\nWork out 6*7.\n6*7:", "choices": ["42", "36"], "answer": 0},
           {"question": "\n645 - 49 = ?\n645-49: 3 digits vs 2 so", "choices": ["645>49", "49>645"], "answer": 0}]
GEN_DOCS = [{"question": "12 + 7 = ?", "answer": "19"}, {"question": "8 - 3 = ?", "answer": "5"},
            {"question": "What is 31 + 25?", "answer": "56"}]
GEN_TOKENS = 80  # enough for the shipped model's reasoning on these sums


def write_task(folder: Path, name: str, docs: list[dict], config: str) -> None:
    """A task over local data: a jsonl file read by the datasets `json` builder (no hub)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"doc_to_text: '{{{{question}}}}'\n{config}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`nanoseek serve` on the shipped model, in a subprocess."""
    port, db = free_port(), tmp_path_factory.mktemp("serve") / "chats.db"
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(SHIPPED), "--port", str(port),
                             "--db", str(db)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def lm_eval_run(served, tmp_path_factory):
    """lm-evaluation-harness, offline, on local tasks: -> evaluate(model type, endpoint, tasks, **options)."""
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "nano_mc", MC_DOCS, "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
               "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    write_task(folder, "nano_gen", GEN_DOCS, "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
               f"generation_kwargs:\n  max_gen_toks: {GEN_TOKENS}\nmetric_list:\n  - metric: exact_match\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        import lm_eval
        from lm_eval.tasks import TaskManager

        def evaluate(model: str, endpoint: str, tasks: list[str], args: str = "", **options) -> dict:
            return lm_eval.simple_evaluate(model=model, model_args=f"base_url={served}/v1/{endpoint},model=nanoseek,"
                                           f"max_retries=1{args}", tasks=tasks, log_samples=True,
                                           task_manager=TaskManager(include_path=str(folder)), **options)

        yield evaluate


def test_lm_eval_loglikelihoods_are_the_engines(lm_eval_run):
    """multiple_choice through local-completions (token ids, echo, logprobs, two prompts per request):
    each choice's loglikelihood is the sum of the continuation's logprobs in a direct forward of the BOS and the
    text, as the API scores the text sent as a string."""
    out = lm_eval_run("local-completions", "completions", ["nano_mc"], HARNESS_TOKENIZER + ",batch_size=2")
    model, tok = load_model(SHIPPED, dtype=inference_dtypes(SHIPPED)[0]), DeepSeekTokenizer.load(SHIPPED)
    scored = 0
    for sample in out["samples"]["nano_mc"]:
        for (context, continuation), (resp,) in zip(sample["arguments"], sample["resps"]):
            ctx = [tok.bos_id] + tok.encode(context)
            ids = ctx + tok.encode(context + continuation)[len(ctx) - 1:]
            assert resp[0] == pytest.approx(sum(direct_logprobs(model, ids)[len(ctx) - 1:]), abs=1e-3)
            scored += 1
    assert scored == sum(len(d["choices"]) for d in MC_DOCS)


@pytest.mark.parametrize("model, endpoint, args, chat", [
    ("local-completions", "completions", HARNESS_TOKENIZER + ",batch_size=2", False),
    ("local-chat-completions", "chat/completions", "", True),
])
def test_lm_eval_generations_score_what_the_api_scores(lm_eval_run, served, model, endpoint, args, chat):
    """generate_until with lm-eval's default until (a blank line): its generations and exact-match score are
    the plain API's for the same prompts (completions: the prompt's text; chat: the messages)."""
    out = lm_eval_run(model, endpoint, ["nano_gen"], args, apply_chat_template=chat)
    client = openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0)
    kw = dict(model="nanoseek", max_tokens=GEN_TOKENS, temperature=0, stop=["\n\n"])
    samples, texts = out["samples"]["nano_gen"], []
    for sample in samples:
        prompt, gen = sample["arguments"][0]
        assert gen["until"] == ["\n\n"]
        if chat:
            messages = json.loads(prompt[0])  # lm-eval's JsonChatStr: the messages as JSON
            texts.append(client.chat.completions.create(messages=messages, **kw).choices[0].message.content)
        else:
            texts.append(client.completions.create(prompt=prompt, **kw).choices[0].text)
    assert [s["resps"][0][0] for s in samples] == texts
    right = sum(t == s["doc"]["answer"] for t, s in zip(texts, samples))
    assert out["results"]["nano_gen"]["exact_match,none"] == pytest.approx(right / len(samples))
