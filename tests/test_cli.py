"""The command line, run in-process through typer's runner."""

import json

from typer.testing import CliRunner

from nanoseek.cli import app
from nanoseek.tokenizer import DeepSeekTokenizer

runner = CliRunner()


def test_demo_round_trips_and_generates(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "logits identical" in result.output
    assert (tmp_path / "demo" / "config.json").is_file() and (tmp_path / "demo" / "model.safetensors").is_file()
    info = runner.invoke(app, ["info", str(tmp_path / "demo")])
    assert info.exit_code == 0 and "deepseek_v3" in info.output


def test_demo_unknown_preset_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--preset", "huge"])
    assert result.exit_code == 2 and "unknown preset" in result.output


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
    assert "1 malformed records skipped" in ok.output
    tok = DeepSeekTokenizer.load(out)
    assert tok.decode(tok.encode("sample 3 of text")) == "sample 3 of text"


def _chat_model(tmp_path):
    """A tiny random model with a tokenizer, as `nanoseek pretrain` leaves in runs/<name>/model."""
    import torch

    from nanoseek import save_model
    from nanoseek.data.builtin import task_texts
    from nanoseek.model import build_model, get_preset

    tok = DeepSeekTokenizer.train(task_texts(200), vocab_size=320)
    torch.manual_seed(1)  # a random model whose greedy replies do not end at their first token
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    save_model(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    return tmp_path / "m"


def test_generate_prints_reasoning_apart_and_speed(tmp_path):
    model = _chat_model(tmp_path)
    r = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-tokens", "12",
                            "--speculative"])
    assert r.exit_code == 0, r.output
    assert "Thinking" in r.output and "tok/s" in r.output and "MTP drafts accepted" in r.output
    bad = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "100000"])
    assert bad.exit_code == 2 and "exceeds the context" in bad.output
    missing = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert missing.exit_code == 2 and "no such folder" in missing.output.replace("\n", " ").replace("  ", " ")
    for bits in ("int8", "int4"):
        q = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-tokens", "6",
                                "--quantize", bits])
        assert q.exit_code == 0 and "tok/s" in q.output, q.output
    bad_bits = runner.invoke(app, ["generate", "--model", str(model), "--prompt", "hi", "--quantize", "int5"])
    assert bad_bits.exit_code == 2 and "int8 or int4" in bad_bits.output


def test_chat_commands_and_multiline_input(tmp_path):
    model = _chat_model(tmp_path)
    script = "hello \\\nthere\n/temp 0\n/system Be brief.\nWhat is 2+2?\n/bogus\n/reset\n/exit\n"
    r = runner.invoke(app, ["chat", "--model", str(model), "--max-tokens", "8"], input=script)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "(temperature 0.0)" in out and "(system prompt set)" in out and "unknown command /bogus" in out
    assert "(new conversation)" in out and out.count("Thinking") == 2


def test_miniature_speedrun_end_to_end_and_resume(tmp_path):
    """Every stage for a few seconds on the tiny preset; a rerun skips what is done."""
    from nanoseek.speedrun import SpeedrunConfig, ship, speedrun

    cfg = SpeedrunConfig(budget=40, preset="tiny", student="tiny", eval_n=3, traces=4, task_documents=1500,
                         code_chars=50_000, sft_conversations=600, seq_len=128, max_new_tokens=24)
    report = speedrun(tmp_path / "run", cfg)
    text = report.read_text()
    for part in ("pretrain", "sft", "rl", "distill", "GRPO trained on:", "Held-out accuracy", "tokens/s",
                 "bytes per token", "| add/thinking off |", "| calculator/offered |", "called"):
        assert part in text, (part, text)
    assert (tmp_path / "run" / "rl" / "model" / "config.json").is_file()
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    from nanoseek.speedrun import expected_durations
    assert list(timings) == list(expected_durations(cfg))  # every stage ran, in the order the ETA assumes
    again = runner.invoke(app, ["speedrun", "--out", str(tmp_path / "run"), "--budget", "40s", "--preset", "tiny"])
    assert again.exit_code == 0 and " ".join(again.output.split()).count("done earlier") == len(timings)
    ship(tmp_path / "run", tmp_path / "shipped")
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "shipped"), "--prompt", "1+1", "--max-tokens", "5"])
    assert r.exit_code == 0, r.output


def test_speedrun_refuses_an_unknown_rl_family_before_any_stage(tmp_path):
    r = runner.invoke(app, ["speedrun", "--out", str(tmp_path / "run"), "--rl-tasks", "add,algebra"])
    assert r.exit_code != 0 and "unknown task family 'algebra'" in " ".join(r.output.split())
    assert not (tmp_path / "run").exists()
