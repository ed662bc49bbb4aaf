"""Run folders survive crashes and strangers: a run SIGKILLed at ten points of its writes (tokenizer,
checkpoint files, manifest, renames, metrics, settings, export) resumes bit for bit; every file and
rename of a checkpoint is fsynced; a trainer.pt that would run code is refused; a corrupt
manifest falls back to the previous checkpoint; a torn last line of the traces file is dropped."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import REPO, _nanoseek, data, losses, make_trainer  # noqa: F401 (data: the fixture)

from nanoseek.checkpoint import CheckpointError
from nanoseek.train.distill import collect_traces
from nanoseek.train.runs import write_manifest


class Planted:
    """Unpickling this creates a file: what a stranger's trainer.pt could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_trainer_pt_that_would_run_code_is_refused(data, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    make_trainer(run, data).fit()
    older, newest = sorted((run / "checkpoints").iterdir())
    torch.save({"step": 8, "extra": Planted(marker)}, newest / "trainer.pt")
    write_manifest(newest)  # whoever writes the folder writes the manifest too
    with pytest.raises(CheckpointError, match="more than tensors and plain values.*could run code"):
        make_trainer(run, data, steps=12)
    assert not marker.exists()
    torch.load(older / "trainer.pt", weights_only=True)  # what nanoseek writes loads as plain data


def test_every_file_and_rename_of_a_checkpoint_is_fsynced(data, tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("reads which file a descriptor is from /proc")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    make_trainer(run, data, steps=4).fit()
    ckpts = run / "checkpoints"
    tmp, final = ckpts / "step_0000004.tmp", ckpts / "step_0000004"
    moved = events.index(("replace", str(final)))
    synced_before = {p for kind, p in events[:moved] if kind == "fsync"}
    for name in ("model.safetensors", "config.json", "trainer.pt", "tokenizer.json", "manifest.json"):
        assert {str(tmp / name), str(tmp / f"{name}.tmp")} & synced_before, name  # before or after its own rename
    assert str(tmp) in synced_before  # the folder's entries
    assert ("fsync", str(ckpts)) in events[moved:]  # the rename into checkpoints/
    assert ("fsync", str(run)) in events  # the run's config.json renamed into the run folder
    assert ("fsync", str(run / "config.json.tmp")) in events


def test_a_corrupt_manifest_falls_back_to_the_previous_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "run"
    make_trainer(run, data).fit()
    ckpts = sorted((run / "checkpoints").iterdir())
    (ckpts[-1] / "manifest.json").write_text('{"model.safetensors": {"bytes": 12')  # torn
    t = make_trainer(run, data)
    assert t.step == 4 and t.resumed_from == ckpts[0]
    out = capsys.readouterr().out
    assert "skipping checkpoint step_0000008" in out and "manifest.json: unreadable" in out
    (ckpts[0] / "manifest.json").write_text('{"trainer.pt": 1234}')  # JSON, but not a manifest
    t = make_trainer(run, data)
    assert t.step == 0 and t.resumed_from is None
    assert "skipping checkpoint step_0000004" in capsys.readouterr().out


def test_a_torn_last_line_of_the_traces_is_dropped(tmp_path):
    def ask(questions, max_tokens, seed):  # a teacher that is always wrong: every trace is rejected
        return ["no idea"] * len(questions)

    out = tmp_path / "traces.jsonl"
    collect_traces(ask, ["add"], n=1, out=out, batch=4, max_asked=4)
    whole = out.read_text()
    out.write_text(whole + whole.splitlines()[0][:30])  # a crash in the middle of the next record
    stats = collect_traces(ask, ["add"], n=1, out=out, batch=4, max_asked=8)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["rejected"] == 8 and len(records) == 8 and out.read_text().startswith(whole)
    assert len({r["question"] for r in records}) == 8  # the torn problem was asked again, nothing twice
    out.write_text(whole + "{oops\n" + whole)  # a bad line in the middle is not a crash's: it is reported
    with pytest.raises(ValueError, match=":5: invalid JSON"):
        collect_traces(ask, ["add"], n=1, out=out, batch=4, max_asked=8)


# The crash campaign: one run killed at each point of a write in turn, each kill resumed by the next run.
CAMPAIGN = [  # (point, where: see crash_points.py, the step this run resumes from: None if killed before)
    ("before-replace", "killed/tokenizer", None),  # the run's tokenizer, trained and written, not yet renamed
    ("before-replace", "step_0000002.tmp/model.safetensors", 0),  # the weights, not yet renamed
    ("torn-replace", "step_0000004.tmp/trainer.pt", 0),  # trainer.pt cut short
    ("torn-replace", "step_0000006.tmp/manifest.json", 2),  # the manifest cut short
    ("before-replace", "checkpoints/step_0000008", 4),  # the whole checkpoint, before its rename
    ("after-replace", "checkpoints/step_0000010", 6),  # renamed; older ones not yet removed
    ("torn-metrics", "11", 10),  # a metrics record cut short
    ("mid-rmtree", "checkpoints/step_0000006", 10),  # an old checkpoint half removed
    ("torn-replace", "killed/config.json", None),  # the run's settings, rewritten as it starts
    ("before-replace", "killed/model", 12),  # the export of model/ at the end
]


@pytest.mark.slow
def test_sigkill_at_each_point_of_a_checkpoint_write_resumes_bit_exact(tmp_path):
    def args(out: str) -> list[str]:  # a tiny pretraining run, checkpointed every 2 steps
        return _nanoseek("--out", str(tmp_path / out), "--max-steps", "14", "--checkpoint-every", "2",
                         "--batch-size", "4")[3:]

    plan = [{"args": args("whole")}] + [{"args": args("killed"), "point": point, "where": where}
                                        for point, where, _ in CAMPAIGN] + [{"args": args("killed")}]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "crash_points.py"), str(tmp_path / "plan.json")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    whole, *killed, last = json.loads(r.stdout.splitlines()[-1])

    def resumed_step(output: str) -> int:
        found = re.search(r"resuming from \S+ \(step (\d+),", output)
        return int(found.group(1)) if found else 0

    assert whole["exit"] == 0, whole["output"][-3000:]
    for (point, where, resumes_from), run in zip(CAMPAIGN, killed):
        assert run["exit"] == -signal.SIGKILL, f"{point} {where} was never reached: {run['output'][-3000:]}"
        assert resumes_from is None or resumed_step(run["output"]) == resumes_from, (point, where, run["output"])
    assert last["exit"] == 0 and resumed_step(last["output"]) == 14, last["output"][-3000:]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert losses(killed) == losses(whole) and len(losses(whole)) == 14
    assert (killed / "model" / "model.safetensors").read_bytes() == (whole / "model" / "model.safetensors").read_bytes()
    assert sorted(os.listdir(killed / "checkpoints")) == sorted(os.listdir(whole / "checkpoints"))
