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
