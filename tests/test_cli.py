"""The command line, run in-process through typer's runner (and in a fresh interpreter where what
it imports matters)."""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import nanoseek
from nanoseek import cli
from nanoseek.cli import app
from nanoseek.model import PRESETS
from nanoseek.tokenizer import DeepSeekTokenizer

runner = CliRunner()


def test_demo_round_trips_and_generates(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "logits identical" in result.output
    assert (tmp_path / "demo" / "config.json").is_file() and (tmp_path / "demo" / "model.safetensors").is_file()
    again = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--tokens", "5"])  # an earlier demo: replaced
    assert again.exit_code == 0, again.output
    users = tmp_path / "users"  # a model saved by transformers (no tokenizer): not a demo's, not replaced
    users.mkdir()
    (users / "config.json").write_text('{"model_type": "qwen2"}')
    refused = runner.invoke(app, ["demo", "--out", str(users)])
    assert refused.exit_code == 2 and "already holds a model" in refused.output
    assert (users / "config.json").read_text() == '{"model_type": "qwen2"}'
    info = runner.invoke(app, ["info", str(tmp_path / "demo")])
    assert info.exit_code == 0 and "deepseek_v3" in info.output
    assert "on this CPU" in info.output and "computes in float32" in info.output  # a small model: fp32
    shipped = runner.invoke(app, ["info"])  # no folder: the shipped chat model, as chat and serve default to
    assert shipped.exit_code == 0 and "assets" in shipped.output and "MLA" in shipped.output, shipped.output


def test_tokenizer_train(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} of text, number {i * 7}"}) + "\n" for i in range(200))
                    + "{not json}\n")
    out = tmp_path / "tok"
    bad = runner.invoke(app, ["tokenizer", "train", "--data", str(data), "--out", str(out), "--vocab-size", "300"])
    assert bad.exit_code == 2 and "c.jsonl:201" in bad.output.replace("\n", "")
    ok = runner.invoke(app, ["tokenizer", "train", "--data", str(data), "--out", str(out), "--vocab-size", "300",
                             "--skip-bad-records"])
    assert ok.exit_code == 0, ok.output
    assert "1 malformed record skipped" in ok.output
    # fewer tokens than asked (too little text): said
    assert "300 tokens were asked for" in " ".join(ok.output.split()), ok.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = runner.invoke(app, ["tokenizer", "train", "--data", str(empty), "--out", str(tmp_path / "t2")])
    assert r.exit_code == 2 and "no documents" in r.output and not (tmp_path / "t2" / "tokenizer.json").exists(), r.output
    tok = DeepSeekTokenizer.load(out)
    assert tok.decode(tok.encode("sample 3 of text")) == "sample 3 of text"
    # a second training into the same folder would change the ids a model trained with the first reads
    before = (out / "tokenizer.json").read_text()
    again = runner.invoke(app, ["tokenizer", "train", "--data", str(data), "--out", str(out), "--vocab-size", "400",
                                "--skip-bad-records"])
    assert again.exit_code != 0 and "already holds a tokenizer" in again.output and "--force" in again.output
    assert (out / "tokenizer.json").read_text() == before
    other = tmp_path / "other.txt"
    other.write_text("quokkas and wombats " * 50)
    forced = runner.invoke(app, ["tokenizer", "train", "--data", str(other), "--out", str(out), "--vocab-size", "400",
                                 "--force"])
    assert forced.exit_code == 0 and (out / "tokenizer.json").read_text() != before, forced.output


def test_pretrain_on_small_corpora_and_a_rerun_after_a_failure(tmp_path):
    """A corpus too small to hold any document out trains with a note and no held-out loss for it (it was
    a traceback); a single source whose name holds "_" still reports the overall eval_loss; data left by
    an attempt that failed before training is prepared anew from the rerun's settings (it was reused,
    tokenizer and all), while a run that trained refuses other data before writing anything."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "one.txt").write_text("a single text file is one document. " * 200)
    (d / "my_notes.jsonl").write_text("".join(json.dumps({"text": f"note {i}: {'x y z ' * (i % 7 + 3)}"}) + "\n"
                                              for i in range(120)))
    o = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--vocab-size", "300", "--max-steps", "2",
         "--eval-every", "0"]
    run = tmp_path / "run"
    r = runner.invoke(app, ["pretrain", *o, "--data", str(d / "one.txt"), "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert "too few documents to hold any out" in " ".join(r.output.split())
    assert "warmup (50 steps) is longer than the run (2)" in " ".join(r.output.split())
    assert not (run / "data" / "eval" / "one").exists()
    bad = d / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    failed = tmp_path / "failed"
    r = runner.invoke(app, ["pretrain", *o, "--data", str(bad), "--out", str(failed)])
    assert r.exit_code != 0 and not (failed / "config.json").exists()
    r = runner.invoke(app, ["pretrain", *o, "--data", str(d / "my_notes.jsonl"), "--out", str(failed)])
    assert r.exit_code == 0, r.output
    prepared = json.loads((failed / "data" / "prepared.json").read_text())
    assert prepared["settings"]["sources"] == [str(d / "my_notes.jsonl")]
    assert json.loads((failed / "data" / "train" / "meta.json").read_text())["documents"] > 100  # my_notes', not bad's
    last = [json.loads(line) for line in (failed / "metrics.jsonl").read_text().splitlines()][-1]
    assert "eval_loss" in last and "eval_my_notes_loss" in last, last
    r = runner.invoke(app, ["pretrain", *o[:-4], "--max-steps", "3", "--data", str(d / "one.txt"), "--out", str(failed)])
    assert r.exit_code == 2 and "data.sources" in r.output, r.output
    assert not (failed / "data" / "eval" / "one").exists()  # refused before writing anything
    # the same file spelled another way resumes on the data as prepared (it was tokenized again, the tokenizer too);
    # the file rewritten since is refused (it resumed silently on the old shards)
    tokenizer = (failed / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    spelled = str(d / ".." / "d" / "my_notes.jsonl")
    r = runner.invoke(app, ["pretrain", *o[:-4], "--max-steps", "3", "--data", spelled, "--out", str(failed)])
    assert r.exit_code == 0 and (failed / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tokenizer, r.output
    with open(d / "my_notes.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more note"}) + "\n")
    r = runner.invoke(app, ["pretrain", *o[:-4], "--max-steps", "4", "--data", str(d / "my_notes.jsonl"), "--out",
                            str(failed)])
    assert r.exit_code == 2 and "my_notes.jsonl changed since this run prepared its data" in " ".join(r.output.split())
    # a line in metrics.jsonl that is not a logged step's (written there by something else) is passed over on resume
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"mine": 1}\n')
    r = runner.invoke(app, ["pretrain", *o[:-4], "--max-steps", "3", "--data", str(d / "one.txt"), "--out", str(run)])
    assert r.exit_code == 0 and "step 3/3" in r.output, r.output  # (a KeyError traceback)
    # a row longer than all the data is refused (at --seq-len 100000 a first step ran 13 minutes in 9 GB)
    r = runner.invoke(app, ["pretrain", *o, "--seq-len", "100000", "--data", str(d / "one.txt"), "--out",
                            str(tmp_path / "long")])
    assert r.exit_code == 2 and "--seq-len 100000: the training data holds" in " ".join(r.output.split()), r.output


def test_training_written_to_a_log_says_its_steps_in_whole_lines(tmp_path, monkeypatch):
    """Output that is not a terminal (a log file, a pipe) gets a step line now and then (it had none until the last
    step), whole lines (they broke at 80 columns mid-sentence) and no spinner frames."""
    from nanoseek.train import loop

    monkeypatch.setattr(loop, "LOG_EVERY_S", 0)
    monkeypatch.delenv("COLUMNS", raising=False)  # (a width asked for is kept: pytest-xdist's workers ask for 80)
    (tmp_path / "one.txt").write_text("a single text file is one document. " * 200)
    r = runner.invoke(app, ["pretrain", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--vocab-size", "5000",
                            "--max-steps", "3", "--eval-every", "0", "--data", str(tmp_path / "one.txt"),
                            "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "5,000 tokens were asked for; the corpus holds too little text" in r.output  # (pretrain said nothing)
    lines = r.output.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("step ")] == [["step", "1/3"], ["step", "2/3"],
                                                                                  ["step", "3/3"]], r.output
    assert any("too few documents to hold any out" in line and "no held-out loss for it" in line for line in lines)
    assert not any(c in r.output for c in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"), r.output


def test_sft_leaves_out_the_pieces_of_a_long_conversation_that_hold_no_reply(tmp_path):
    """A conversation longer than --seq-len trains in pieces; those holding only the user's text teach nothing and are
    left out (every step of a run on such data logged a loss of 0, and its curve could not be drawn)."""
    model = _chat_model(tmp_path)
    long = [{"messages": [{"role": "user", "content": "please read this. " * 60 + f"What is {i} + 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(4)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in long))
    r = runner.invoke(app, ["sft", "--model", str(model), "--data", str(data), "--seq-len", "64", "--batch-size", "2",
                            "--max-steps", "4", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0 and "log-scaled" not in r.output, r.output
    losses = [json.loads(line).get("loss") for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in losses if x is not None]) == 4 and all(x is None or x > 0 for x in losses), losses


def test_post_training_checkpoints_as_often_as_asked_and_says_when_a_rerun_starts_over(tmp_path):
    """sft, rl and distill take --checkpoint-every (only pretrain did: a killed SFT run lost its 199 steps); a rerun of a
    folder whose earlier attempt saved no checkpoint says it starts from step 0 (it did so silently)."""
    import shutil

    for command in ("sft", "rl", "distill"):
        assert "--checkpoint-every" in runner.invoke(app, [command, "--help"]).output, command
    model = _chat_model(tmp_path)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(20)))
    args = ["sft", "--model", str(model), "--data", str(data), "--seq-len", "64", "--batch-size", "2", "--max-steps", "3",
            "--checkpoint-every", "1", "--out", str(tmp_path / "r")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["checkpoint_every"] == 1
    shutil.rmtree(tmp_path / "r" / "checkpoints")  # as if killed before its first checkpoint
    shutil.rmtree(tmp_path / "r" / "model")
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "no checkpoint to resume from" in again.output, again.output


def test_sft_on_own_conversations_names_the_bad_one_and_resumes_only_on_its_data(tmp_path):
    """A conversation that does not render names its file and line (the error named neither); rerunning a
    run folder on other data is refused with the difference, as pretraining's is (it resumed and rewrote
    the recorded data)."""
    model = _chat_model(tmp_path)
    good = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(60)]
    data, other = tmp_path / "chats.jsonl", tmp_path / "other.jsonl"
    lines = [json.dumps(g) for g in good]
    lines[40] = json.dumps({"messages": [{"role": "wizard", "content": "hi"}]})
    lines.insert(10, "")  # a blank line: skipped, and counted in the line the error names
    data.write_text("\n".join(lines) + "\n")
    o = ["--model", str(model), "--seq-len", "64", "--batch-size", "2", "--max-steps", "1", "--out", str(tmp_path / "r")]
    r = runner.invoke(app, ["sft", *o, "--data", str(data)])
    assert r.exit_code == 2 and "chats.jsonl:42: message 0: unknown role" in " ".join(r.output.split()) and "wizard" in r.output, r.output
    text = tmp_path / "notes.txt"
    text.write_text("some prose, not conversations\n")
    r = runner.invoke(app, ["sft", *o, "--data", str(text)])
    assert r.exit_code == 2 and ".jsonl file of" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["sft", *o, "--data", str(data), "--conversations", "50"])  # (passed over, silently)
    assert r.exit_code == 2 and "--conversations: it shapes the built-in mixture" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["sft", *o, "--data", str(data), "--seq-len", "100000"])  # (it packed for minutes)
    assert r.exit_code == 2 and "longer than the model's context" in " ".join(r.output.split()), r.output
    # a conversation without an assistant turn teaches nothing (it was an IndexError once training began)
    asks = tmp_path / "asks.jsonl"
    asks.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    r = runner.invoke(app, ["sft", *o, "--data", str(asks)])
    assert r.exit_code == 2 and "no assistant message" in " ".join(r.output.split()), r.output
    # one conversation is enough to train on (nothing to hold out: it was all held out, and nothing trained)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(good[0]) + "\n")
    r = runner.invoke(app, ["sft", *o[:-1], str(tmp_path / "r1"), "--data", str(one)])
    assert r.exit_code == 0, r.output
    data.write_text("\n".join(json.dumps(g) for g in good) + "\n")
    other.write_text("\n".join(json.dumps(g) for g in good[:30]) + "\n")
    assert runner.invoke(app, ["sft", *o, "--data", str(data)]).exit_code == 0
    r = runner.invoke(app, ["sft", *o[:-4], "--max-steps", "2", *o[-2:], "--data", str(other)])
    assert r.exit_code == 2 and "sft.data" in r.output, r.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["sft"]["data"] == str(data)
    # the same file with other conversations in it: refused too (it resumed at the old cursor on the new rows)
    data.write_text("\n".join(json.dumps(g) for g in good[::-1]) + "\n")
    r = runner.invoke(app, ["sft", *o[:-4], "--max-steps", "2", *o[-2:], "--data", str(data)])
    assert r.exit_code == 2 and "sft.data_sha256" in r.output, r.output
    # tool calls as datasets write them: arguments as an object are JSON (they were a Python repr); a call
    # without its function, or calls that are not a list, name their line (tracebacks before)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    tools = [{"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "",
                                                                      "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                           {"role": "assistant", "content": "Sunny."}]}] * 3
    for broken, says in (({"id": "c1", "type": "function", "name": "get_weather"}, "tool_calls[0] has no 'function'"),
                         ("not a list", "tool_calls must be a list")):
        bad = json.loads(json.dumps(tools[0]))
        bad["messages"][1]["tool_calls"] = [broken] if isinstance(broken, dict) else broken
        data.write_text("\n".join(json.dumps(c) for c in [*tools, bad]) + "\n")
        r = runner.invoke(app, ["sft", *o[:-1], str(tmp_path / "r2"), "--data", str(data)])
        assert r.exit_code == 2 and f"chats.jsonl:4: message 1 (assistant): {says}" in " ".join(r.output.split()), r.output
    data.write_bytes(b"\n".join(json.dumps(c).encode() for c in tools) + b'\n{"messages": "caf\xe9"}\n')
    r = runner.invoke(app, ["sft", *o[:-1], str(tmp_path / "r2"), "--data", str(data)])
    assert r.exit_code == 2 and "chats.jsonl:4: not UTF-8 text" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "r2").exists()
    data.write_text("\n".join(json.dumps(c) for c in tools) + "\n")
    assert runner.invoke(app, ["sft", *o[:-1], str(tmp_path / "r2"), "--data", str(data)]).exit_code == 0
    learned = DeepSeekTokenizer.load(model).render_conversation(tools[0]["messages"])[0]
    assert '{"city": "Paris"}' in DeepSeekTokenizer.load(model).decode(learned)


def _chat_model(tmp_path, **config):
    """A tiny random model with a tokenizer, as `nanoseek pretrain` leaves in runs/<name>/model."""
    import torch

    from nanoseek import save_model
    from nanoseek.data.builtin import task_texts
    from nanoseek.model import build_model, get_preset

    tok = DeepSeekTokenizer.train(task_texts(200), vocab_size=320)
    torch.manual_seed(1)  # a random model whose greedy replies do not end at their first token
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, **config))
    save_model(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    return tmp_path / "m"


def test_generate_offers_the_calculator_as_chat_does():
    """The shipped model asked a product past what it computes in its head: with the calculator (offered by default,
    as in chat) it calls it and answers the product; the message given as an argument, as people type it."""
    r = runner.invoke(app, ["generate", "What is 4821 * 37?", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert "calculator" in r.output and "4821 * 37" in r.output and "178377" in r.output.split("Answer:")[-1], r.output
    assert re.search(r"^\d+ tokens in .* tok/s\); finish: stop$", r.output.strip().splitlines()[-1]), r.output
    plain = runner.invoke(app, ["generate", "--prompt", "What is 4821 * 37?", "--temperature", "0", "--no-tools",
                                "--max-tokens", "40"])
    assert plain.exit_code == 0 and "calculator" not in plain.output, plain.output


def test_generate_prints_reasoning_apart_and_speed(tmp_path):
    model = _chat_model(tmp_path)
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-tokens", "12",
                            "--speculative"])
    assert r.exit_code == 0, r.output
    assert "Thinking" in r.output and "tok/s" in r.output and "MTP drafts accepted" in r.output
    raw = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "12 + 30 =", "--raw", "--max-tokens", "6"])
    assert raw.exit_code == 0 and "Answer:" not in raw.output and "tok/s" in raw.output, raw.output  # a continuation
    # of the text after the BOS, as the API's completions continue it (it had been read without the BOS)
    from nanoseek.inference import Engine, SamplingParams

    tok = DeepSeekTokenizer.load(model)
    engine = Engine(nanoseek.load_model(model), decode=tok.decode, max_batch=1, max_len=64)
    [req] = engine.generate([[tok.bos_id] + tok.encode("12 + 30 =")], SamplingParams(max_new_tokens=6, temperature=0))
    assert tok.decode(req.tokens, skip_special_tokens=True).strip() in raw.output, (tok.decode(req.tokens), raw.output)
    bad = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "100000"])
    assert bad.exit_code == 2 and "--max-tokens" in bad.output and "or less" in bad.output, bad.output
    for bits in ("int8", "int4"):
        q = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-tokens", "6",
                                "--quantize", bits])
        assert q.exit_code == 0 and "tok/s" in q.output, q.output
    on_cpu = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "4", "--device", "cpu"])
    assert on_cpu.exit_code == 0 and "tok/s" in on_cpu.output, on_cpu.output
    import torch

    if not torch.cuda.is_available():  # asked for a GPU torch does not see: one line, no traceback
        gpu = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--device", "cuda"])
        assert gpu.exit_code == 2 and "torch sees no CUDA GPU" in gpu.output, gpu.output
    bad_bits = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--quantize", "int5"])
    assert bad_bits.exit_code == 2 and "'--quantize'" in bad_bits.output and "'int8', 'int4'" in bad_bits.output
    for kv in ("fp32", "bf16"):  # (fp16 is the default here)
        cached = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "4",
                                     "--kv-cache", kv])
        assert cached.exit_code == 0 and "tok/s" in cached.output, cached.output
    bad_kv = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--kv-cache", "fp8"])
    assert bad_kv.exit_code == 2 and "'--kv-cache'" in bad_kv.output and "'fp16'" in bad_kv.output, bad_kv.output


def test_without_max_tokens_a_reply_takes_what_a_small_context_leaves(tmp_path, monkeypatch):
    """A model whose context is shorter than the default reply (512 tokens for generate, 1024 for chat): the
    reply gets what the context leaves; a conversation that fills it says so in the command's terms."""
    from nanoseek.inference import Engine

    model, asked = _chat_model(tmp_path, max_position_embeddings=64), []
    submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, ids, params, **kw: asked.append((len(ids), params.max_new_tokens))
                        or submit(self, ids, params, **kw))
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--temperature", "0"])
    assert r.exit_code == 0 and "tok/s" in r.output, r.output
    assert sum(asked[-1]) == 64  # the prompt and the longest reply the context holds
    asked.clear()
    r = runner.invoke(app, ["chat", "--model", str(model), "--temperature", "0", "--no-tools"],
                      input="What is 2 + 3?\nAnd 4 + 5?\n/exit\n")
    assert r.exit_code == 0 and "Traceback" not in r.output and "max_new_tokens" not in r.output, r.output
    assert asked and all(n + new == 64 for n, new in asked if n < 64), asked  # (a full context: refused, said)
    assert "the model's context is full" in r.output or "/reset starts anew" in r.output, r.output
    r = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "56", "--no-tools"], input="What is 2 + 3?\n")
    assert "fewer than --max-tokens 56" in r.output and "a smaller --max-tokens" in " ".join(r.output.split()), r.output
    # a prompt over the context blames the prompt (it blamed a --max-tokens never given, "plus 1"); a --max-tokens
    # over what the prompt leaves names the most that fits
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "12 + 7 " * 40])
    assert r.exit_code == 2 and r.output.startswith("error: --prompt: the prompt (") and "shorten it" in r.output, r.output
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-tokens", "60"])
    assert r.exit_code == 2 and r.output.startswith("error: --max-tokens:") and "or less" in r.output, r.output


def test_a_model_without_a_chat_template_is_refused_in_one_line(tmp_path):
    """A base model (no chat template): generate and chat say so and what works instead; --raw works."""
    model = _chat_model(tmp_path)
    (model / "tokenizer_config.json").unlink()
    for cmd in (["generate", "--prompt", "hi"], ["chat"]):
        r = runner.invoke(app, [*cmd, "--model", str(model)], input="hi\n")
        assert r.exit_code == 2 and "has no chat template" in r.output and "--raw" in r.output, r.output
        assert "Traceback" not in r.output
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "12 + 30 =", "--raw", "--max-tokens", "4"])
    assert r.exit_code == 0 and "tok/s" in r.output, r.output
    r = runner.invoke(app, ["eval", "--model", str(model), "--tasks", "add", "--n", "2"])
    assert r.exit_code == 2 and f"{model}: the model folder has no chat template" in r.output, r.output
    r = runner.invoke(app, ["info", str(model / "config.json")])  # the file, not its folder
    assert r.exit_code == 2 and "is a file" in r.output and f"'{model}'" in r.output, r.output


def test_eval_defaults_to_the_shipped_model_as_the_other_commands_do(tmp_path):
    """Found by a user: the README's `nanoseek eval --tasks calculator` failed with "Missing option '--model'"."""
    out = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", "--tasks", "add", "--n", "2", "--out", str(out)])
    assert r.exit_code == 0 and "| add | 2 |" in r.output, r.output
    assert json.loads(out.read_text())


def test_generate_stopped_with_ctrl_c_exits_130_and_text_that_is_not_utf8_is_refused(tmp_path, monkeypatch):
    """Ctrl-C cuts the reply short (what came is shown) and the exit status says so, as for training; a prompt
    holding bytes that are not UTF-8 (lone surrogates, as Python reads them) is one line, not a traceback."""
    from nanoseek import chat

    model = _chat_model(tmp_path)
    stream = chat.stream_reply

    def interrupted(engine, req, *args, **kwargs):
        step = engine.step

        def ctrl_c():  # the next step is where Ctrl-C lands
            engine.step = step
            raise KeyboardInterrupt

        step()
        engine.step = ctrl_c
        return stream(engine, req, *args, **kwargs)

    monkeypatch.setattr(chat, "stream_reply", interrupted)
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-tokens", "12"])
    assert r.exit_code == 130 and "(stopped)" in r.output and "finish: cancelled" in r.output, r.output
    bad = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "caf\udce9"])
    assert bad.exit_code == 2 and "not UTF-8 text" in bad.output and "Traceback" not in bad.output, bad.output


def test_a_reply_the_engine_fails_is_said_with_its_reason(tmp_path, monkeypatch):
    """A step that raises (a model that fails in its forward) ends the request with an error: generate prints the
    reason and exits 1 (it printed "finish: error" and exited 0); chat says it and takes the next message."""
    from nanoseek.model.transformer import DeepseekForCausalLM

    def broken(self, *args, **kwargs):
        raise RuntimeError("the forward broke")

    model = _chat_model(tmp_path)
    monkeypatch.setattr(DeepseekForCausalLM, "forward", broken)
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-tokens", "4"])
    assert r.exit_code == 1 and "RuntimeError: the forward broke" in r.output and "Traceback" not in r.output, r.output
    c = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "2", "--no-tools"], input="hi\nagain\n/exit\n")
    assert c.exit_code == 0 and c.output.count("the forward broke") == 2, c.output


def test_generate_and_chat_sample_as_the_models_generation_config_says(tmp_path, monkeypatch):
    from nanoseek.inference import Engine

    model, asked = _chat_model(tmp_path), []
    submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, ids, params, **kw: asked.append(params) or submit(self, ids, params, **kw))
    runs = [["generate", "--prompt", "hi", "--max-tokens", "2"], ["chat", "--max-tokens", "2", "--no-tools"],
            ["generate", "--prompt", "hi", "--max-tokens", "2", "--temperature", "0.3"]]
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))  # R1-Distill's way
    for args in runs:
        r = runner.invoke(app, [*args, "--model", str(model)], input="hi\n/exit\n")
        assert r.exit_code == 0, r.output
    assert [(p.temperature, p.top_p) for p in asked] == [(0.6, 0.9), (0.6, 0.9), (0.3, 0.9)]
    (model / "generation_config.json").unlink()  # none: generate is greedy, chat samples at 0.6 / 0.95
    asked.clear()
    for args in runs[:2]:
        assert runner.invoke(app, [*args, "--model", str(model)], input="hi\n/exit\n").exit_code == 0
    assert [(p.temperature, p.top_p) for p in asked] == [(0.0, 1.0), (0.6, 0.95)]


def test_chat_commands_and_multiline_input(tmp_path):
    """Greedy from the start: whether a random model reasons first must not depend on a draw."""
    model = _chat_model(tmp_path)
    script = ("hello \\\nthere\n/temp -1\n/temp nan\n/temp 0\n/system Be brief.\nWhat is 2+2?\n/bogus\n/exit now\n"
              "//2 + 3\n/reset\n/temp\n/help\n/exit\n")
    r = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "8", "--temperature", "0"], input=script)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "(temperature 0.0)" in out and "(system prompt set)" in out and "unknown command /bogus" in out
    assert "(new conversation)" in out and out.count("Thinking") == 3  # "//2 + 3" was sent as "/2 + 3"
    assert "/exit takes nothing after it" in out
    assert out.count("usage: /temp T") == 2 and "temperature -1" not in out and "temperature nan" not in out
    assert "(temperature 0.0; /temp T sets it)" in out and "/system TEXT system prompt" in out  # /temp alone, /help
    assert "cut off at 8 tokens" in out  # a reply that ran out of --max-tokens says so
    r = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "4", "--temperature", "0"], input="hi \\")
    assert r.exit_code == 0 and "Thinking" in r.output, r.output  # input ending inside a continued line: sent


def test_chat_refuses_at_once_a_system_prompt_or_max_tokens_that_leave_no_room(tmp_path):
    """Both were accepted, and then every message was refused."""
    model = _chat_model(tmp_path, max_position_embeddings=64)
    r = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "500", "--temperature", "0"], input="hi\n")
    room = re.search(r"leaving (\d+): give --max-tokens \1 at most", " ".join(r.output.split()))
    assert r.exit_code == 2 and room, r.output
    fits = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", room.group(1), "--temperature", "0"],
                         input="?\n")
    assert fits.exit_code == 0 and "Thinking" in fits.output and "no room" not in fits.output, fits.output
    r = runner.invoke(app, ["chat", "--model", str(model), "--system", "many words " * 40], input="hi\n")
    assert r.exit_code == 2 and "shorten --system" in " ".join(r.output.split()), r.output
    # /system likewise, in the chat (it was set, every later message refused, and /reset kept it)
    r = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "4", "--temperature", "0"],
                      input="/system " + "many words " * 40 + "\n?\n")
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "leaving no room for a message: not set" in out and "no room in the" not in out, out


def test_ctrl_c_at_the_chat_prompt_drops_the_line_and_ctrl_d_leaves(tmp_path, monkeypatch):
    """A second Ctrl-C pressed to stop a reply landed on the prompt and ended the chat, its conversation lost."""
    from nanoseek import chat as chat_module

    typed = iter([KeyboardInterrupt, "?", EOFError])

    def read_message(prompt="> "):
        line = next(typed)
        if isinstance(line, type):
            raise line()
        return line

    monkeypatch.setattr(chat_module, "read_message", read_message)
    model = _chat_model(tmp_path, max_position_embeddings=64)
    r = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "4", "--temperature", "0"])
    assert r.exit_code == 0 and "Ctrl-D or /exit leaves" in r.output and r.output.count("Thinking") == 1, r.output


def test_miniature_speedrun_end_to_end_and_resume(tmp_path):
    """Every stage for a few seconds on the tiny preset; a rerun skips what is done."""
    from nanoseek.speedrun import SpeedrunConfig, ship, speedrun

    cfg = SpeedrunConfig(budget=40, preset="tiny", student="tiny", eval_n=3, traces=4, task_documents=1500,
                         code_chars=50_000, sft_conversations=600, seq_len=128, max_new_tokens=24, compile=False)
    report = speedrun(tmp_path / "run", cfg)
    text = report.read_text()
    for part in ("pretrain", "sft", "rl", "distill", "GRPO trained on:", "Held-out accuracy", "tokens/s",
                 "bytes per token", "| add/thinking off |", "| calculator/offered |", "called", "Machine: ",
                 "AVX2 ", "| precision | compile |"):
        assert part in text, (part, text)
    assert re.search(r"\| pretrain \| [^\n]* \| [\d,]+ \| (fp32|bf16) \| off \|\n", text), text  # tokens/s, settings
    assert (tmp_path / "run" / "rl" / "model" / "config.json").is_file()
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    from nanoseek.speedrun import expected_durations
    assert list(timings) == list(expected_durations(cfg))  # every stage ran, in the order the ETA assumes
    assert "host CPU" not in text  # trained on the CPU: the CPU is the machine
    config_file = tmp_path / "run" / "pretrain" / "config.json"
    config = json.loads(config_file.read_text())
    config["machine"]["device"] = "NVIDIA H200"  # as a run trained on a GPU records it
    config_file.write_text(json.dumps(config))
    from nanoseek.speedrun import write_report
    assert "Machine: NVIDIA H200, host CPU " in write_report(tmp_path / "run", cfg, timings).read_text()
    again = runner.invoke(app, ["speedrun", "--out", str(tmp_path / "run"), "--budget", "40s", "--preset", "tiny"])
    assert again.exit_code == 0 and " ".join(again.output.split()).count("done earlier") == len(timings)
    ship(tmp_path / "run", tmp_path / "shipped")
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "shipped"), "--prompt", "1+1", "--max-tokens", "5"])
    assert r.exit_code == 0, r.output


def test_speedrun_refuses_an_unknown_rl_family_before_any_stage(tmp_path):
    r = runner.invoke(app, ["speedrun", "--out", str(tmp_path / "run"), "--rl-tasks", "add,algebra"])
    assert r.exit_code != 0 and "unknown task family 'algebra'" in " ".join(r.output.split())
    assert not (tmp_path / "run").exists()


COMMANDS = [["demo"], ["info"], ["tokenizer"], ["tokenizer", "train"], ["pretrain"], ["generate"], ["chat"], ["sft"],
            ["rl"], ["distill"], ["eval"], ["speedrun"], ["serve"], ["quantize"]]
HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "openai", "numpy", "pyarrow", "matplotlib")
IN_A_FRESH_PROCESS = """
import json, sys
from typer.testing import CliRunner
from nanoseek.cli import app
results = [CliRunner().invoke(app, args) for args in json.loads(sys.argv[1])]
print(json.dumps({"results": [[r.exit_code, r.output] for r in results],
                  "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def _in_a_fresh_process(cases: list[list[str]]) -> tuple[list[tuple[int, str]], list[str]]:
    """Each command line's (exit code, output), run in a new interpreter, and which of HEAVY it loaded."""
    done = subprocess.run([sys.executable, "-c", IN_A_FRESH_PROCESS, json.dumps(cases), json.dumps(HEAVY)],
                          capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout)
    return answer["results"], answer["loaded"]


def test_help_of_every_command_loads_no_torch():
    """`nanoseek ... --help` imports neither torch nor the server's or the SDK's libraries (the
    seconds of startup the issue measured); bench/cli_startup.py times it."""
    results, loaded = _in_a_fresh_process([[*c, "--help"] for c in [[]] + COMMANDS] + [["--version"]])
    assert all(code == 0 and "Usage:" in out for code, out in results[:-1]), results
    assert results[-1] == [0, f"nanoseek {nanoseek.__version__}\n"], results[-1]
    assert loaded == [], f"--help imported {loaded}"
    package = subprocess.run([sys.executable, "-c", "import sys, nanoseek; print('torch' in sys.modules)"],
                             capture_output=True, text=True, check=True)
    assert package.stdout.strip() == "False"  # python -m nanoseek imports the package first


def test_help_is_tidy():
    """Flags read as flags (no `<bool>` value), MODEL/OUT in the usage line, and every preset of
    the one preset table offered wherever a preset is chosen."""
    for command in [[]] + COMMANDS:
        out = runner.invoke(app, [*command, "--help"]).output
        assert "<bool>" not in out and "{" not in out.splitlines()[0], (command, out)
    assert "--compile / --no-compile" in runner.invoke(app, ["serve", "--help"]).output
    assert "info [OPTIONS] [MODEL]\n" in runner.invoke(app, ["info", "--help"]).output
    assert "quantize [OPTIONS] MODEL OUT\n" in runner.invoke(app, ["quantize", "--help"]).output
    for command in ("demo", "pretrain", "speedrun", "distill"):
        out = " ".join(runner.invoke(app, [command, "--help"]).output.split())
        assert all(name in out for name in PRESETS), (command, out)


def test_every_bad_argument_is_one_line_naming_it_before_any_work(tmp_path):
    model = tmp_path / "model"  # passes the folder check; nothing ever loads it
    model.mkdir()
    (model / "config.json").write_text("{}")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "config.json").write_text("{}")  # with its tokenizer: a model, not an earlier demo's output
    out, missing, url, m = tmp_path / "out", tmp_path / "missing", "http://127.0.0.1:9/v1", str(model)
    run = tmp_path / "run"  # a run folder, given where its model/ was meant
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    o = ["--out", str(out)]
    cases = [  # (command line, what the one line must name, text it must hold)
        (["generate", "--model", str(run), "--prompt", "hi"], "--model", "is a run folder"),
        (["info", str(run)], "MODEL", "is a run folder"),
        (["pretrain", *o, "--preset", "nosuch", "--max-steps", "1"], "--preset", "'nosuch'"),
        (["pretrain", *o], "--max-steps", "--time-budget"),
        (["pretrain", *o, "--max-steps", "-1"], "--max-steps", ""),
        (["pretrain", *o, "--time-budget", "5x"], "--time-budget", "duration"),
        (["pretrain", *o, "--time-budget", "-5m"], "--time-budget", "negative"),
        (["pretrain", *o, "--data", str(missing / "c.jsonl"), "--max-steps", "1"], "--data", "no such file"),
        (["pretrain", *o, "--data", str(model / "config.json"), "--max-steps", "1"], "--data", "unsupported format"),
        (["pretrain", *o, "--tokenizer", str(missing), "--max-steps", "1"], "--tokenizer", "does not exist"),
        (["pretrain", *o, "--tokenizer", str(model), "--max-steps", "1"], "--tokenizer", "no tokenizer.json"),
        (["pretrain", *o, "--schedule", "linear", "--max-steps", "1"], "--schedule", "'linear'"),
        (["pretrain", *o, "--fim-rate", "2", "--max-steps", "1"], "--fim-rate", ""),
        (["pretrain", *o, "--lr", "0", "--max-steps", "1"], "--lr", "> 0"),
        (["pretrain", *o, "--seq-len", "4", "--max-steps", "1"], "--seq-len", ""),
        (["pretrain", *o, "--device", "gpu", "--max-steps", "1"], "--device", "cuda"),
        (["pretrain", *o, "--aux-alpha", "-1", "--max-steps", "1"], "--aux-alpha", ""),
        (["pretrain", *o, "--bias-gamma", "inf", "--max-steps", "1"], "--bias-gamma", "finite number >= 0"),
        (["pretrain", *o, "--tokenizer", str(tok), "--vocab-size", "4096", "--max-steps", "1"], "--vocab-size",
         "its own vocabulary"),
        (["pretrain", *o, "--mtp-lambda", "nan", "--max-steps", "1"], "--mtp-lambda", "finite number >= 0, got nan"),
        (["generate", "--temperature", "nan", "--prompt", "hi"], "--temperature", "finite number >= 0 and <= 100"),
        (["rl", "--model", m, *o, "--temperature", "0", "--max-steps", "1"], "--temperature", "> 0"),
        (["pretrain", *o, "--precision", "nosuch", "--max-steps", "1"], "--precision", "'nosuch'"),
        (["sft", "--model", m, *o, "--precision", "fp16", "--max-steps", "1"], "--precision", "'fp16'"),
        (["pretrain", *o, "--nosuch"], "--nosuch", "No such option"),
        (["pretrain", "--out", str(model / "config.json"), "--max-steps", "1"], "--out", "is a file"),
        (["demo", *o, "--preset", "huge"], "--preset", "'huge'"),
        (["demo", *o, "--tokens", "0"], "--tokens", ""),
        (["info", str(missing)], "MODEL", "does not exist"),
        (["info", str(tmp_path)], "MODEL", "no config.json"),
        (["tokenizer", "train", "--data", str(missing), *o], "--data", "no such file"),
        (["tokenizer", "train", "--data", "stdlib", *o, "--vocab-size", "10"], "--vocab-size", ""),
        (["generate", "--model", str(missing), "--prompt", "hi"], "--model", "does not exist"),
        (["generate", "--prompt", "hi", "--quantize", "int5"], "--quantize", "'int5'"),
        (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p", ""),
        (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens", ""),
        (["generate"], "--prompt", "give the message once"),
        (["generate", "hi", "--prompt", "hi"], "given twice", "--prompt"),
        (["chat", "--model", str(missing)], "--model", "does not exist"),
        (["chat", "--temperature", "-1"], "--temperature", ""),
        (["sft", "--model", str(missing), *o, "--max-steps", "1"], "--model", "does not exist"),
        (["sft", "--model", m, *o, "--data", str(missing / "c.jsonl"), "--max-steps", "1"], "--data", "does not exist"),
        (["sft", "--model", m, *o], "--max-steps", "--time-budget"),
        (["sft", "--model", m, *o, "--tool-share", "2", "--max-steps", "1"], "--tool-share", ""),
        (["rl", "--model", str(missing), *o, "--max-steps", "1"], "--model", "does not exist"),
        (["rl", "--model", m, *o, "--tasks", "add,algebra", "--max-steps", "1"], "--tasks", "'algebra'"),
        (["rl", "--model", m, *o, "--group", "1", "--max-steps", "1"], "--group", ""),
        (["rl", "--model", m, *o, "--tasks", ",", "--max-steps", "1"], "--tasks", "at least one"),
        (["rl", "--model", m, *o, "--mode", "r2", "--max-steps", "1"], "--mode", "'r2'"),
        (["rl", "--model", m, *o, "--tasks", "calculator", "--mode", "r1-zero", "--max-steps", "1"], "--mode", "no tools"),
        (["rl", "--model", m, *o, "--loss-norm", "mean", "--max-steps", "1"], "--loss-norm", "'mean'"),
        (["rl", "--model", m, *o], "--max-steps", "--time-budget"),
        (["distill", "--teacher", str(missing), *o], "--teacher", "does not exist"),
        (["distill", "--teacher", url, *o], "--tokenizer", "remote teacher"),
        (["distill", "--teacher", url, *o, "--tokenizer", str(tok), "--kl-alpha", "1"], "--kl-alpha", "local"),
        (["distill", "--teacher", url, *o, "--kl-alpha", "2"], "--kl-alpha", "<= 1"),
        (["distill", "--teacher", m, *o, "--student", "nosuch"], "--student", "'nosuch'"),
        (["distill", "--teacher", m, *o, "--tasks", "algebra"], "--tasks", "'algebra'"),
        (["eval", "--model", str(missing)], "--model", "does not exist"),
        (["eval", "--model", url, "--tasks", "calculator"], "--tasks", "model folder"),
        (["eval", "--model", m, "--tasks", "add,algebra"], "--tasks", "'algebra'"),
        (["eval", "--model", m, "--n", "0"], "--n", ""),
        (["eval", "--model", url, "--quantize", "int8"], "--quantize", "URL"),
        (["eval", "--model", m, "--out", str(tmp_path)], "--out", "folder"),
        (["eval", "--model", m, "--out", str(tmp_path / "r.md")], "--out", ".json file name"),
        (["eval", "--model", m, "--out", str(tmp_path / "notes.txt")], "--out", ".json file name"),  # not overwritten
        (["eval", "--model", m, "--out", str(model / "config.json" / "r.json")], "--out", "cannot write"),
        (["eval", "--model", m, "--out", str(model / "config.json")], "--out", "another file"),  # (a run's, a model's)
        (["rl", "--model", m, *o, "--beta", "inf", "--max-steps", "1"], "--beta", "finite"),
        (["rl", "--model", m, *o, "--lr", "inf", "--max-steps", "1"], "--lr", "finite"),
        (["rl", "--model", m, *o, "--lr", "nan", "--max-steps", "1"], "--lr", "finite"),
        (["generate", "--prompt", "hi", "--device", "tpu"], "--device", "'tpu'"),
        (["speedrun", *o, "--rl-tasks", "add,algebra"], "--rl-tasks", "'algebra'"),
        (["speedrun", *o, "--budget", "0"], "--budget", ""),
        (["speedrun", *o, "--preset", "huge"], "--preset", "'huge'"),
        (["serve", "--model", str(missing)], "--model", "does not exist"),
        (["serve", "--port", "70000"], "--port", ""),
        (["serve", "--host", "0.0.0.0"], "--host", "--allow-open"),
        (["serve", "--quantize", "int3"], "--quantize", "'int3'"),
        (["serve", "--host", "no-such-host.invalid", "--api-key", "k"], "--host", "cannot resolve"),
        (["serve", "--model", m, "--model", m], "--name", "distinct names"),
        (["serve", "--max-queue", "0"], "--max-queue", ""),
        (["serve", "--port", "8779", "--db", str(model / "config.json" / "c.db")], "--db", "cannot open"),
        (["pretrain", *o, "--time-budget", "nan"], "--time-budget", "'nan'"),
        (["speedrun", *o, "--budget", "inf"], "--budget", "'inf'"),
        (["generate", "--prompt", "hi", "--top-p", "-0.1"], "--top-p", ""),
        (["generate", "--prompt", "hi", "--temperature", "150"], "--temperature", ""),
        (["serve", "--name", "a", "--name", "b"], "--name", "2 names for 1 model"),
        (["serve", "--name", "deepseek-chat"], "--name", "distinct names"),
        (["serve", "--name", " "], "--name", "a name clients can use"),
        (["quantize", str(missing), str(out)], "MODEL", "does not exist"),
        (["quantize", m, str(out), "--bits", "3"], "--bits", "'3'"),
        (["quantize", m, m], "OUT", "MODEL"),
        (["speedrun", *o, "--budget", "1s"], "--budget", "at least 30s"),
        (["speedrun", *o, "--seed", "-1"], "--seed", ""),
        (["eval", "--model", m, "--n", "100000000"], "--n", ""),
        (["eval", "--model", m, "--tasks", "add,mul", "--n", "300", "--out", str(tmp_path / "pool" / "r.json")], "--n 300",
         "mul: only 211 distinct held-out problems"),  # (it had loaded the model and made --out's folder first)
        (["demo", "--out", str(tok)], "--out", "already holds a model"),
        (["eval", "--model", "ftp://host/v1"], "--model", "http(s)://"),
        (["eval", "--model", m, "--out", str(model / "config.json" / "r.json")], "--out", "config.json' is a file"),
        (["info", str(missing)], "MODEL", "does not exist"),
        (["pretrain", "--out", str(model / "config.json" / "run"), "--max-steps", "1"], "--out", "cannot write"),
        (["speedrun", "--out", "/proc/nanoseek-run"], "--out", "cannot write to '/proc' (it takes no new files)"),  # (failed after minutes)
    ]
    results, loaded = _in_a_fresh_process([args for args, _, _ in cases])
    for (args, flag, text), (code, output) in zip(cases, results):
        assert code == 2 and output.startswith("error:") and output.count("\n") == 1, (args, output)
        assert flag in output and text in output, (args, flag, text, output)
    assert not out.exists() and not (tmp_path / "pool").exists()  # no run folder was started, no --out folder made
    assert loaded == [], f"the refusals imported {loaded}: work had started"
    # an evaluation that never ends (here: nothing answers at the URL) leaves no empty results file behind
    r = runner.invoke(app, ["eval", "--model", url, "--tasks", "add", "--n", "1", "--out", str(tmp_path / "ev" / "r.json")])
    assert r.exit_code == 2 and not (tmp_path / "ev" / "r.json").exists(), r.output


def test_a_preset_larger_than_the_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    """Found by a user: pretrain --preset deepseek-v3 tokenized its corpus for a minute, then the kernel's OOM killer
    ended it (exit 137, nothing said, the machine's other processes at risk); demo alone checked the size."""
    monkeypatch.setattr(cli, "_memory_bytes", lambda: 24 * 2**30)  # (the laptop the project is made for)
    out = tmp_path / "run"
    for args in (["pretrain", "--preset", "deepseek-v3", "--max-steps", "1"], ["speedrun", "--preset", "deepseek-v2-lite"],
                 ["distill", "--teacher", str(tmp_path), "--student", "deepseek-v3", "--traces", "1"],
                 ["demo", "--preset", "deepseek-v3"]):
        if args[0] == "distill":
            (tmp_path / "config.json").write_text("{}")  # (a teacher folder: the student is refused first)
        r = runner.invoke(app, [*args, "--out", str(out)])
        flag = "--student" if args[0] == "distill" else "--preset"
        assert r.exit_code == 2 and r.output.startswith(f"error: {flag}: 'deepseek-v") and r.output.count("\n") == 1
        assert "more than this machine's memory" in r.output and not out.exists(), (args, r.output)


def test_a_folder_of_another_kind_is_refused_by_distill_and_speedrun_too(tmp_path):
    """Found by a user: distill and speedrun wrote their traces, student and stage folders into a pretraining run's
    folder (pretrain, sft and rl refused one another's); and a speedrun's folder was taken by pretrain."""
    from nanoseek.cli import SHIPPED

    run, pipeline = tmp_path / "pt", tmp_path / "sp"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "pretrain", "train": {}}))
    pipeline.mkdir()
    (pipeline / "speedrun.json").write_text(json.dumps({"seed": 0, "preset": "cpu-tiny"}))
    distill = ["distill", "--teacher", str(SHIPPED), "--traces", "1", "--max-steps", "1"]
    for args, said in (([*distill, "--out", str(run)], "is a run started by `nanoseek pretrain`, not a `nanoseek distill`"),
                       (["speedrun", "--out", str(run)], "not a `nanoseek speedrun` folder"),
                       ([*distill, "--out", str(pipeline)], "is a `nanoseek speedrun` folder, not `nanoseek distill`'s"),
                       (["pretrain", "--max-steps", "1", "--out", str(pipeline)], "not `nanoseek pretrain`'s")):
        def files():  # (but the lock a command holds on its --out)
            return sorted(str(p) for p in tmp_path.rglob("*") if p.name != ".lock")
        before = files()
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and r.output.startswith("error: ") and said in r.output, (args, r.output)
        assert files() == before, args  # nothing written


def test_serve_on_a_busy_port_says_so_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(app, ["serve", "--port", str(port)])
    assert r.exit_code == 2 and "serving" not in r.output, r.output
    assert r.output.startswith("error: --port:") and f":{port}" in r.output and r.output.count("\n") == 1, r.output


def test_served_models_are_named_by_their_folder_or_their_run():
    """Several models: each by its folder's name, a run's model/ folder by its run's (it was 'model')."""
    from nanoseek.cli import SHIPPED, _served_names

    assert _served_names([Path("q8"), Path("runs/sft/model"), SHIPPED], []) == ["q8", "sft", "nanoseek"]
    assert _served_names([Path("q8"), SHIPPED], ["mine"]) == ["mine", "nanoseek"]


def test_folders_that_cannot_work_are_refused_in_one_line_before_the_work(tmp_path):
    """Training a quantized folder (it crashed mid-run, or after minutes of rollouts), a tokenizer larger than the
    model (every reply failed, the server answered 500s), a run folder another command holds (both wrote into
    it), an empty corpus and an eval asking more problems than exist (a minute of silence, or a hang)."""
    from nanoseek.train.runs import exclusive

    model = _chat_model(tmp_path)
    assert runner.invoke(app, ["quantize", str(model), str(tmp_path / "q8")]).exit_code == 0
    out = ["--out", str(tmp_path / "run"), "--max-steps", "1"]
    for args in (["sft", "--model", str(tmp_path / "q8")], ["rl", "--model", str(tmp_path / "q8")],
                 ["distill", "--teacher", str(model), "--student", str(tmp_path / "q8"), "--traces", "2"]):
        r = runner.invoke(app, [*args, *out])
        assert r.exit_code == 2 and "int8 weights" in r.output and r.output.count("\n") <= 2, (args, r.output)
    small = tmp_path / "small"
    assert runner.invoke(app, ["demo", "--out", str(small)]).exit_code == 0
    from nanoseek.cli import SHIPPED

    DeepSeekTokenizer.load(SHIPPED).save(small)  # 2K tokens beside the demo model's 512 rows
    r = runner.invoke(app, ["generate", "--model", str(small), "--prompt", "hi"])
    assert r.exit_code == 2 and "do not belong together" in r.output, r.output
    with exclusive(tmp_path / "held"):
        r = runner.invoke(app, ["pretrain", "--preset", "tiny", "--max-steps", "1", "--out", str(tmp_path / "held")])
        assert r.exit_code == 2 and "in use by another nanoseek command (process" in r.output, r.output
    (tmp_path / "empty.txt").write_text("")
    r = runner.invoke(app, ["pretrain", "--preset", "tiny", "--max-steps", "1", "--data", str(tmp_path / "empty.txt"),
                            "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "error: " in r.output and "empty.txt: no documents" in r.output, r.output
    r = runner.invoke(app, ["eval", "--model", str(model), "--tasks", "linear", "--n", "5000"])
    assert r.exit_code == 2 and "distinct held-out problems exist (asked for 5000)" in r.output, r.output
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((model / "config.json").read_text())
    r = runner.invoke(app, ["info", str(tmp_path / "bare")])  # a config without weights (info said nothing)
    assert r.exit_code == 2 and "no model.safetensors" in r.output, r.output


def test_terminal_replies_without_tools_write_no_raw_calls():
    """Asked a big product with no tools offered, the shipped model (taught to call its calculator) wrote the
    call's control tokens into generate's and chat --no-tools' answers; they are banned, as the server bans them."""
    r = runner.invoke(app, ["generate", "--prompt", "what is 4821 times 37?", "--temperature", "0"])
    assert r.exit_code == 0 and "Answer:" in r.output and "tool▁" not in r.output, r.output
    r = runner.invoke(app, ["chat", "--no-tools", "--temperature", "0"], input="what is 4821 times 37?\n")
    assert r.exit_code == 0 and "tool▁" not in r.output, r.output


def test_training_refuses_a_folder_of_someone_elses_files(tmp_path):
    """--out naming a folder that holds files but no run (a corpus folder, a user's own model and plots) is refused
    before anything is written (a run wrote its folders among them and replaced the user's curves.png)."""
    from nanoseek.cli import SHIPPED

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "curves.png").write_bytes(b"my plot")
    (mine / "notes.txt").write_text("a single text file is one document. " * 200)
    for args in (["pretrain", "--preset", "tiny", "--data", str(mine / "notes.txt"), "--max-steps", "1"],
                 ["distill", "--teacher", str(SHIPPED), "--max-steps", "1"]):
        r = runner.invoke(app, [*args, "--out", str(mine)])
        assert r.exit_code == 2 and "already holds files that are not a nanoseek run's" in " ".join(r.output.split()), r.output
    assert sorted(p.name for p in mine.iterdir()) == ["curves.png", "notes.txt"]
    assert (mine / "curves.png").read_bytes() == b"my plot"
    model = tmp_path / "model"  # a model folder as --out: refused, and no .lock left beside its files (one was)
    shutil.copytree(SHIPPED, model)
    r = runner.invoke(app, ["rl", "--model", str(SHIPPED), "--max-steps", "1", "--out", str(model)])
    assert r.exit_code == 2 and "not a nanoseek run" in " ".join(r.output.split()), r.output
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in SHIPPED.iterdir())


def test_eval_says_when_several_greedy_samples_are_drawn_at_a_temperature(tmp_path):
    r = runner.invoke(app, ["eval", "--tasks", "add", "--n", "1", "--samples", "2", "--max-tokens", "8"])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "2 greedy samples of a problem would be one reply 2 times" in out, r.output


def test_rl_ends_with_the_last_rollouts_figures(tmp_path):
    """A last step that updated again on earlier rollouts logs no reward: the final line had said 'reward 0.000,
    accuracy 0.0%', which reads as a collapsed policy."""
    from nanoseek.cli import SHIPPED
    from nanoseek.train.metrics import read_metrics

    r = runner.invoke(app, ["rl", "--model", str(SHIPPED), "--tasks", "add", "--prompts", "2", "--group", "2",
                            "--updates", "2", "--max-steps", "2", "--no-compile", "--out", str(tmp_path / "rl")])
    assert r.exit_code == 0, r.output
    rows = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert "reward" in rows[0] and "reward" not in rows[-1]
    assert f"done: reward {rows[0]['reward']:.3f}, accuracy {rows[0]['accuracy']:.1%}" in " ".join(r.output.split())
