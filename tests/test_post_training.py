"""SFT masks and runs, GRPO runs, trace collection (resumable, verified, remote), on tiny models."""

import json

import pytest
import torch

from conftest import randomize_
from nanoseek.checkpoint import load_model, save_model
from nanoseek.data.builtin import builtin_conversations, task_texts
from nanoseek.data.shards import IGNORE
from nanoseek.data.tasks import get_task
from nanoseek.model import build_model, get_preset
from nanoseek.remote import RemoteError, remote_chat
from nanoseek.tokenizer import DeepSeekTokenizer
from nanoseek.train import TrainConfig
from nanoseek.train.distill import collect_traces, verified_conversations
from nanoseek.train.grpo import GRPOConfig, rl
from nanoseek.train.metrics import read_metrics
from nanoseek.train.sft import SFTConfig, SFTRows, sft, sft_example


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = DeepSeekTokenizer.train(task_texts(300), vocab_size=360)
    torch.manual_seed(0)
    m = build_model(get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                               max_position_embeddings=1024))
    randomize_(m, std=0.05)
    save_model(m, d)
    tok.save(d)
    return d


def test_sft_targets_are_exactly_the_assistant_tokens(model_dir):
    tok = DeepSeekTokenizer.load(model_dir)
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "reasoning_content": "2+2+0=4", "content": "4"},
            {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    ex = sft_example(tok, conv)
    ids, mask = tok.render_conversation(conv)
    targets = ex[1]
    expect = [ids[i + 1] if mask[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    assert targets.tolist() == expect
    learned = tok.decode([t for t in targets if t != IGNORE])
    assert learned == "4<｜end▁of▁sentence｜>6<｜end▁of▁sentence｜>"  # history reasoning is stripped, no prompts


def test_sft_rows_resume(model_dir):
    tok = DeepSeekTokenizer.load(model_dir)
    ex = [sft_example(tok, c) for c in builtin_conversations(200, seed=1)]
    a = SFTRows(ex, 64, 3, tok.pad_id, seed=2)
    for _ in range(30):
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(40)]
    b = SFTRows(ex, 64, 3, tok.pad_id, seed=2)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, [next(b) for _ in range(40)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    from nanoseek.data.small_talk import INTENTS

    replies = {c[-1]["content"] for c in builtin_conversations(400, seed=3)}
    assert {i.reply for i in INTENTS} & replies  # small talk is mixed in


def test_sft_and_grpo_runs(model_dir, tmp_path):
    sft(model_dir, tmp_path / "sft", SFTConfig(builtin_conversations=300, seq_len=96, batch_size=4),
        TrainConfig(max_steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3, compile=False))
    assert (tmp_path / "sft" / "model" / "tokenizer.json").is_file()
    load_model(tmp_path / "sft" / "model")
    rl(tmp_path / "sft" / "model", tmp_path / "rl",
       GRPOConfig(tasks=["add"], prompts_per_step=2, group_size=4, max_new_tokens=24, temperature=1.0),
       TrainConfig(max_steps=2, warmup_steps=1, schedule="constant", bias_gamma=0.0, eval_every=0, checkpoint_every=2,
                   lr=1e-4, compile=False))
    rec = [r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "reward" in r]
    assert len(rec) == 2
    for key in ("reward", "accuracy", "format_rate", "response_length", "rollout_s", "lr"):
        assert key in rec[-1], key
    # positions the updates processed (the report's tokens/s), none when every group scored alike; such a step
    # has no gradient norm or speed (they were plotted as 0)
    assert all((r["tokens"] > 0) == (r["groups_kept"] > 0) == ("grad_norm" in r) == ("tokens_per_s" in r)
               for r in rec) and rec[-1]["tokens"] > 0
    assert (tmp_path / "rl" / "curves.png").is_file() and (tmp_path / "rl" / "model" / "config.json").is_file()
    # resumed for a third step: GRPO never trains the MTP layer, whose missing optimizer state once failed it
    rl(tmp_path / "sft" / "model", tmp_path / "rl",
       GRPOConfig(tasks=["add"], prompts_per_step=2, group_size=4, max_new_tokens=24, temperature=1.0),
       TrainConfig(max_steps=3, warmup_steps=1, schedule="constant", bias_gamma=0.0, eval_every=0, checkpoint_every=2,
                   lr=1e-4, compile=False))
    assert [r["step"] for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "reward" in r] == [1, 2, 3]


def test_grpo_reuses_each_batch_of_rollouts_for_mu_updates(model_dir, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=300)
    rl(model_dir, tmp_path / "rl", GRPOConfig(tasks=["add"], prompts_per_step=2, group_size=4, max_new_tokens=16,
                                               temperature=1.0, updates_per_rollout=2),
       TrainConfig(max_steps=4, warmup_steps=1, schedule="constant", bias_gamma=0.0, eval_every=0, checkpoint_every=4,
                   lr=1e-3, compile=False), console=console)
    rec = [r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    assert ["reward" in r for r in rec] == [True, False, True, False]  # rollouts at steps 1 and 3, logged once
    # a model that never wrote the format (this one is random, as a base model is to the chat format): a hint, once
    said = console.export_text()
    assert rec[0]["format_rate"] == 0 and said.count("--mode r1-zero") == 1
    # the policy's updates stay eager whatever --compile says (it is the rollouts'): said so, not "as set"
    assert "compile: off (the policy's updates; --compile is the rollouts')" in said


@pytest.mark.slow
@pytest.mark.filterwarnings("error:torch.compile failed")  # no silent fallback to eager decoding
def test_grpo_compiles_its_rollouts_and_they_follow_the_updated_weights(model_dir, tmp_path):
    """Compiled rollouts (--compile; the default on CUDA): the rollouts after an update come from the
    updated policy (the engine rebuilds its stacked expert weights), as in an eager run."""
    def run(name, compile):
        rl(model_dir, tmp_path / name, GRPOConfig(tasks=["add"], prompts_per_step=2, group_size=4, max_new_tokens=16,
                                                   temperature=1.0),
           TrainConfig(max_steps=3, warmup_steps=1, schedule="constant", bias_gamma=0.0, eval_every=0,
                       checkpoint_every=3, lr=1e-2, compile=compile))
        return [(r["reward"], r["response_length"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")
                if "reward" in r]

    compiled = run("compiled", True)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["rollouts_compiled"] is True
    assert compiled == run("eager", False)


def test_traces_are_verified_appended_and_resumed(tmp_path):
    import random

    rng, task, answers = random.Random(0), get_task("add"), {}
    for _ in range(200):  # the problems collect_traces draws, in its order (seed 0)
        rng.choice(["add"])
        p = task.sample(rng, "train")
        answers[p.question] = p.answer
    calls = {"n": 0}

    def ask(questions, max_tokens, seed):  # right on every other problem; fails once midway
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("teacher went away")
        return [f"thinking about {q}\n</think>\n\n{answers[q] if i % 2 == 0 else 'no idea'}"
                for i, q in enumerate(questions)]

    out = tmp_path / "traces.jsonl"
    with pytest.raises(ConnectionError):
        collect_traces(ask, ["add"], n=12, out=out, batch=4)
    assert len(out.read_text().splitlines()) == 4  # the first batch was on disk before the failure
    stats = collect_traces(ask, ["add"], n=12, out=out, batch=4)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["verified"] == 12 and stats["rejected"] == 11  # the 12th came third in its batch: the rest unrecorded
    assert len({r["question"] for r in lines}) == len(lines)  # the rerun continued, nothing asked twice
    assert all(r["verified"] == ("messages" in r) for r in lines)
    assert len(verified_conversations(out)) == 12
    exact = collect_traces(lambda qs, m, s: [f"t\n</think>\n\n{answers[q]}" for q in qs], ["add"], n=6,
                           out=tmp_path / "exact.jsonl", batch=4)
    assert exact["verified"] == 6 == len(verified_conversations(tmp_path / "exact.jsonl"))  # not 8: no overshoot


def test_trace_collection_stops_at_its_time_limit(tmp_path):
    """A teacher that verifies nothing (an untrained model in a short speedrun) once asked 20 x n
    problems before giving up, minutes past the run's budget; a time limit ends it."""
    import time

    def ask(questions, max_tokens, seed):
        time.sleep(0.05)
        return ["thinking\n</think>\n\nno idea"] * len(questions)

    start = time.perf_counter()
    stats = collect_traces(ask, ["add"], n=12, out=tmp_path / "t.jsonl", batch=4, time_limit=0.3)
    assert time.perf_counter() - start < 2 and stats["verified"] == 0 and 0 < stats["rejected"] < 240


def test_remote_chat_retries_then_reports(tmp_path):
    logs = []
    ask = remote_chat("http://127.0.0.1:9", "m", retries=2, timeout=1, log=logs.append)
    with pytest.raises(RemoteError, match="after 2 attempts"):
        ask(["1+1?"], 5, 0)
    assert len(logs) == 2 and "retry" in logs[0]


def test_a_refusal_from_the_endpoint_says_what_it_said(tmp_path):
    """The server's error message, not a Python bytes literal (b'{"error":{"message":"the model \\'x\\'...')."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.dumps({"error": {"message": "the model 'nosuch' does not exist", "type": "invalid_request_error"}})
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ask = remote_chat(f"http://127.0.0.1:{server.server_port}/v1", "nosuch", retries=1, timeout=5)
        with pytest.raises(RemoteError) as e:
            ask(["1+1?"], 5, 0)
        assert str(e.value).endswith("HTTP 404: the model 'nosuch' does not exist"), e.value
    finally:
        server.shutdown()


def test_a_distill_rerun_with_other_settings_is_refused_before_any_work(tmp_path):
    """Its traces and student belong to the settings the folder was started with (a rerun with another
    --student kept training the first one; other --tasks collected nothing)."""
    from nanoseek.model.config import ConfigError
    from nanoseek.train.distill import distill

    first = {"teacher": "t", "student": "tiny", "tasks": ["add"], "traces": 10, "tokenizer": None, "kl_alpha": 0.0,
             "kl_temperature": 2.0, "teacher_model": "deepseek-reasoner"}
    (tmp_path / "distill.json").write_text(json.dumps({"distill": first}))
    for change in ({"student": "cpu-dense-small"}, {"tasks": ["add", "sub"]}):
        with pytest.raises(ConfigError, match="different settings") as e:
            distill(**{"teacher": "t", "student": "tiny", "tasks": ["add"], "n_traces": 10, "out": tmp_path, **change})
        assert next(iter(change)) in str(e.value)


def test_logit_distillation_into_a_student_with_another_vocabulary_is_refused_at_once(model_dir, tmp_path):
    """It failed on a size mismatch after every trace had been collected."""
    from nanoseek.train.distill import distill

    tok = DeepSeekTokenizer.train(task_texts(200), vocab_size=320)
    save_model(build_model(get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)), tmp_path / "s")
    tok.save(tmp_path / "s")
    with pytest.raises(ValueError, match=r"--kl-alpha: .*teacher's tokenizer.* in 3\d\d logits against the teacher's"):
        distill(str(model_dir), str(tmp_path / "s"), tmp_path / "out", ["add"], n_traces=2, kl_alpha=0.5)
    assert not (tmp_path / "out").exists()
    # a student preset given another tokenizer (it failed with a traceback after the traces were collected)
    with pytest.raises(ValueError, match=r"--kl-alpha: .*--tokenizer .* is another"):
        distill(str(model_dir), "tiny", tmp_path / "out", ["add"], n_traces=2, kl_alpha=0.5, tokenizer=str(tmp_path / "s"))
    assert not (tmp_path / "out").exists()
