"""The training loop: schedule, exact resume in process (after SIGKILL: test_crash_safety.py), corrupt
checkpoints, accumulation, torchrun over gloo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import load_model
from nanoseek.data.builtin import task_documents, task_texts
from nanoseek.data.shards import PackedRows, write_shards
from nanoseek.model import build_model, get_preset
from nanoseek.tokenizer import DeepSeekTokenizer
from nanoseek.train import LMObjective, Trainer, TrainConfig, lr_multiplier
from nanoseek.train.loop import Diverged
from safetensors.torch import load_file
from nanoseek.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tok = DeepSeekTokenizer.train(task_texts(300), vocab_size=320)
    tok.save(d / "tokenizer")
    write_shards(task_documents(tok, 400), tok, d / "train")
    return tok, d


def make_trainer(run, data, steps=8, seed=0, batch=4, accum=1, rows_cls=PackedRows, compile=False, **kw):
    tok, d = data
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size))
    rows = rows_cls(d / "train", seq_len=48, batch_size=batch, seed=0)
    cfg = TrainConfig(**{"max_steps": steps, "warmup_steps": 2, "lr": 3e-3, "eval_every": 0, "checkpoint_every": 4,
                         "grad_accum": accum, "compile": compile, **kw})
    return Trainer(run, model, rows, LMObjective(0.3), cfg, save_extra=tok.save)


def losses(run):
    return [(r["step"], r["loss"], r["mtp_loss"], r["grad_norm"]) for r in read_metrics(Path(run) / "metrics.jsonl")
            if "loss" in r]


def test_schedules():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_multiplier(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 0.09, cfg) == 1.0 and lr_multiplier(50, 0.5, cfg) == 1.0
    assert lr_multiplier(90, 0.9, cfg) == pytest.approx(0.55) and lr_multiplier(100, 1.0, cfg) == pytest.approx(0.1)
    cos = TrainConfig(max_steps=100, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_multiplier(0, 0.0, cos) == 1.0 and lr_multiplier(50, 0.5, cos) == pytest.approx(0.5)
    assert lr_multiplier(100, 1.0, cos) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="max_steps or a time_budget"):
        TrainConfig(max_steps=0)


def test_resume_after_a_crash_is_bit_exact(data, tmp_path):
    make_trainer(tmp_path / "whole", data).fit()

    class Crash(Exception):
        pass

    class CrashingRows(PackedRows):
        calls = 0

        def __next__(self):
            CrashingRows.calls += 1
            if CrashingRows.calls == 6:  # during step 6, after the step-4 checkpoint
                raise Crash
            return super().__next__()

    with pytest.raises(Crash):
        make_trainer(tmp_path / "crashed", data, rows_cls=CrashingRows).fit()
    # a fresh process: different initial weights, then resumed from step 4
    resumed = make_trainer(tmp_path / "crashed", data, seed=123)
    assert resumed.step == 4 and resumed.resumed_from.name == "step_0000004"
    resumed.fit()
    assert losses(tmp_path / "crashed") == losses(tmp_path / "whole")
    a, b = load_model(tmp_path / "whole" / "checkpoints" / "step_0000008"), load_model(
        tmp_path / "crashed" / "checkpoints" / "step_0000008")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_corrupt_checkpoint_falls_back_to_the_previous_one(data, tmp_path, capsys):
    make_trainer(tmp_path / "run", data).fit()
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_0000004", "step_0000008"]
    f = ckpts[-1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    t = make_trainer(tmp_path / "run", data)
    assert t.step == 4
    out = capsys.readouterr().out
    assert "skipping checkpoint step_0000008" in out and "truncated" in out
    # a flipped byte (same size) is caught by the manifest's checksum
    g = ckpts[0] / "trainer.pt"
    raw = bytearray(g.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    g.write_bytes(bytes(raw))
    shutil.rmtree(ckpts[-1])
    t = make_trainer(tmp_path / "run", data)
    assert t.step == 0 and "do not match the manifest" in capsys.readouterr().out


def test_a_diverging_run_stops_keeping_its_last_good_checkpoint(data, tmp_path, capsys):
    """A learning rate that blows the weights up: the non-finite updates are skipped, and three in a row
    stop the run with an error instead of saving a NaN model as finished."""
    t = make_trainer(tmp_path / "run", data, steps=40, precision="fp32", lr=1e30, checkpoint_every=1)
    with pytest.raises(Diverged, match="not finite for 3 steps"):
        t.fit()
    assert "is skipped" in capsys.readouterr().out
    assert not (tmp_path / "run" / "model").exists()
    for ckpt in (tmp_path / "run" / "checkpoints").iterdir():
        weights = load_file(ckpt / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt.name


def test_gradient_accumulation_matches_a_larger_batch(data, tmp_path):
    # fp32: the claim is exact arithmetic; bf16 rounds two half-batches differently from one batch
    make_trainer(tmp_path / "big", data, steps=3, batch=4, precision="fp32").fit()
    make_trainer(tmp_path / "acc", data, steps=3, batch=2, accum=2, precision="fp32").fit()
    for (s1, l1, m1, g1), (s2, l2, m2, g2) in zip(losses(tmp_path / "big"), losses(tmp_path / "acc")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4) and g1 == pytest.approx(g2, rel=1e-3)


def test_run_folder_contents_and_bias_balancing(data, tmp_path):
    t = make_trainer(tmp_path / "run", data, steps=4, precision="bf16", bias_gamma=0.01)
    before = [g.e_score_correction_bias.clone() for g in t.model.modules() if hasattr(g, "e_score_correction_bias")]
    t.fit()
    after = [g.e_score_correction_bias for g in t.model.modules() if hasattr(g, "e_score_correction_bias")]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the bias moved
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["precision"] == "bf16" and config["machine"]["precision"] == "bf16"
    records = read_metrics(run / "metrics.jsonl")
    for key in ("loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "expert_imbalance"):
        assert all(key in r for r in records if "eval_loss" not in r), key
    assert (run / "curves.png").stat().st_size > 10_000
    ckpt = run / "checkpoints" / "step_0000004"
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "trainer.pt", "manifest.json",
                                                 "tokenizer.json"}
    load_model(ckpt)  # the checkpoint is a loadable HF model folder


def _nanoseek(*args):
    return [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--data", "tasks",
            "--task-documents", "300", "--vocab-size", "320", "--seq-len", "48", "--precision", "fp32", "--no-compile",
            "--eval-every", "0", *args]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """2 processes x batch 2 (FSDP2 over gloo) against 1 process x batch 4: same rows per step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--max-steps", "6", "--checkpoint-every", "6"]
    subprocess.run(_nanoseek("--out", str(tmp_path / "one"), "--batch-size", "4", *common), check=True, env=env,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]
    cmd = _nanoseek("--out", str(tmp_path / "two"), "--batch-size", "2", *common)
    r = subprocess.run(torchrun + ["-m"] + cmd[2:], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for (s1, l1, m1, g1), (s2, l2, m2, g2) in zip(one, two):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4) and m1 == pytest.approx(m2, rel=1e-4)
        assert g1 == pytest.approx(g2, rel=1e-3)
    # the distributed checkpoint loads in one process and equals the single-process model closely: its
    # outputs, and its weights up to Adam's amplification of summation-order noise (a rarely seen token's
    # embedding gradient is near 0, and Adam's update normalises its sign: a few rows differ by ~5e-4)
    a = load_model(tmp_path / "one" / "model")
    b = load_model(tmp_path / "two" / "model")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=2e-3), (k, (x - y).abs().max().item())
    ids = torch.randint(0, a.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=5e-3, rtol=1e-2)
    # and vice versa: a single-process run resumes in two processes, a distributed one in one process
    more = ["--max-steps", "8", "--checkpoint-every", "6"]
    cmd = _nanoseek("--out", str(tmp_path / "one"), "--batch-size", "2", *more)
    r = subprocess.run(torchrun + ["-m"] + cmd[2:], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(_nanoseek("--out", str(tmp_path / "two"), "--batch-size", "4", *more), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for run in ("one", "two"):
        assert [s for s, *_ in losses(tmp_path / run)] == list(range(1, 9))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    for (s1, l1, *_), (s2, l2, *_) in zip(one, two):
        assert l1 == pytest.approx(l2, rel=1e-4)
    # a different global batch is refused
    r = subprocess.run(_nanoseek("--out", str(tmp_path / "one"), "--batch-size", "2", *more), env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "global_batch" in r.stderr  # errors go to stderr


def test_the_first_ctrl_c_is_answered_at_once_and_the_second_stops_now(capsys):
    """A GRPO step can take a minute: the first Ctrl-C says at once that the run stops after the step,
    with a checkpoint (silence invited a second Ctrl-C, which loses the step)."""
    import os
    import signal

    from nanoseek.train.loop import _StopFlag

    before = signal.getsignal(signal.SIGINT)
    with _StopFlag(lambda: "losing 5 steps") as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and "stopping after this step" in capsys.readouterr().err
        # a second signal ends the process by the system's default action, in the middle of a native operation too
        # (a Python handler waited for the operation: a step at a huge --seq-len outlasted three signals)
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_stopped_run_shows_the_step_it_saved(data, tmp_path, capsys):
    """Ctrl-C during step 3: the progress line left on screen is step 3's, the one saved (it was step 2's)."""
    import os
    import signal

    t = make_trainer(tmp_path / "run", data, steps=6)
    step = t._forward_backward

    def interrupted(*args):
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args)

    t._forward_backward = interrupted
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    out, err = capsys.readouterr()
    assert "saving step 3" in out and "step 3/6" in out and "step 2/6" not in out, out
    # what a second Ctrl-C would lose, in steps (it said "this step", and lost every step since the last checkpoint)
    saved = [c for c in t.checkpoints() if int(c.name.removeprefix("step_")) < 3]
    assert (f"losing {3 - int(saved[-1].name[5:])} step" if saved else "losing 3 steps: no checkpoint is saved yet") in err, err


def test_a_data_file_named_another_way_is_the_same_run(tmp_path, monkeypatch):
    from nanoseek.model.config import ConfigError
    from nanoseek.train.runs import check_same_run

    (tmp_path / "c.jsonl").write_text("{}\n")
    (tmp_path / "d.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    old = {"data": {"sources": ["c.jsonl", "tasks"], "seq_len": 64}}
    check_same_run(old, {"data": {"sources": [str(tmp_path / "c.jsonl"), "tasks"], "seq_len": 64}})
    check_same_run(old, {"data": {"sources": ["./c.jsonl", "tasks"], "seq_len": 64}})
    with pytest.raises(ConfigError, match="sources"):
        check_same_run(old, {"data": {"sources": ["d.jsonl", "tasks"], "seq_len": 64}})


def test_a_run_that_never_saved_a_checkpoint_starts_again_with_other_settings(data, tmp_path):
    """rl failed before its first step (a prompt longer than the context) and its config.json then refused the
    corrected options, though nothing had been trained; once a checkpoint exists, other settings are refused."""
    from nanoseek.model.config import ConfigError

    make_trainer(tmp_path / "run", data, steps=8, lr=1e-3)  # recorded, never fitted
    t = make_trainer(tmp_path / "run", data, steps=8, lr=2e-3)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 2e-3
    t.save()
    with pytest.raises(ConfigError, match="train.lr: 0.002 -> 0.003"):
        make_trainer(tmp_path / "run", data, steps=8, lr=3e-3)


def test_a_data_folder_named_another_way_is_the_same_run(tmp_path, monkeypatch):
    from nanoseek.train.runs import check_same_run

    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path)
    old = {"data": {"sources": ["corpus"]}}
    for spelling in ("corpus/", "./corpus", str(tmp_path / "corpus")):
        check_same_run(old, {"data": {"sources": [spelling]}})


def test_a_resume_from_another_base_model_is_refused(tmp_path, monkeypatch):
    """sft/rl on an existing folder with a different --model trained the old weights and recorded the new
    path as if it were the model trained."""
    from nanoseek.model.config import ConfigError
    from nanoseek.train.runs import check_same_run

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    old = {"command": "sft", "base_model": "a", "sft": {"seq_len": 64}}
    check_same_run(old, {**old, "base_model": str(tmp_path / "a")})
    check_same_run(old, {**old, "base_model": "./a/"})
    with pytest.raises(ConfigError, match="base_model.*'a' -> 'b'"):
        check_same_run(old, {**old, "base_model": "b"})


def test_pretrain_into_another_commands_run_or_a_model_writes_nothing(tmp_path):
    """pretrain --out on an sft run (or on a model folder) trained a tokenizer and wrote data/ into it
    before the run's settings were compared."""
    from nanoseek.model.config import ConfigError
    from nanoseek.train.pretrain import pretrain

    for name, config in (("sft_run", {"command": "sft", "train": {}}), ("model", {"model_type": "deepseek_v3"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match="started by `nanoseek sft`" if name == "sft_run" else "not a nanoseek run"):
            pretrain(tmp_path / name, "tiny")
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json"]


def test_stopping_while_a_checkpoint_is_written_says_so(data, tmp_path, monkeypatch):
    """Ctrl-C while step N's checkpoint is being written says that (it said every step since the start would be
    lost, "no checkpoint is saved yet", and the checkpoint was then there)."""
    from nanoseek.train import loop

    t = make_trainer(tmp_path / "run", data, steps=2)
    said, save_model = [], loop.save_model
    monkeypatch.setattr(loop, "save_model", lambda *a, **kw: said.append(t._unsaved()) or save_model(*a, **kw))
    t.fit()
    assert said == ["step 2's checkpoint is being written: kept if it is done first"], said
    assert t._unsaved() == "losing 1 step: the last checkpoint is step 2"
