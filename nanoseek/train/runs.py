"""A run folder and its lifecycle, the same for every training command.

    config.json          the run's settings (the Trainer writes it; rerunning on the folder resumes
                         the run, and only RESUMABLE_CHANGES may differ: `check_same_run`)
    metrics.jsonl, curves.png
    checkpoints/step_N/  the model (HF format), trainer.pt (optimizer, data cursor, `rng_state`,
                         counters: tensors and plain values only, loaded with weights_only,
                         `load_trainer_state`) and manifest.json (size and sha256 of every
                         file: `write_manifest`, `verify_manifest`)
    model/               the final model, exported from the last checkpoint (`export`)

The lifecycle: a stage builds its model, data and objective and constructs a `Trainer` on the
folder (which compares config.json and resumes from the newest checkpoint that verifies), then
`run_stage` fits it to the end and exports model/.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # (Windows: no advisory locks; runs are not guarded there)
    fcntl = None

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..files import atomic_write, read_json_object, sha256_file, staged_dir
from ..model.config import ConfigError

if TYPE_CHECKING:
    from .loop import Trainer

# a run's length and bookkeeping, and how fast it computes (weights and optimizer are fp32 in either precision)
RESUMABLE_CHANGES = {"max_steps", "time_budget", "eval_every", "checkpoint_every", "keep_checkpoints", "precision",
                     "compile"}


# commands whose folder holds other runs (its stages, a student), and the file that marks it as theirs
PIPELINES = {"distill": "distill.json", "speedrun": "speedrun.json"}


def claim_pipeline(folder: Path, command: str) -> None:
    """Refuse, before anything is written into it, a folder that is not `command`'s pipeline folder: a run (a
    training command's config.json), a model's folder, or another pipeline's (distill and speedrun wrote theirs
    beside a pretraining run's files)."""
    folder = Path(folder)
    _refuse_foreign(folder)
    if (folder / "config.json").exists():
        old = read_json_object(folder / "config.json")
        what = f"a run started by `nanoseek {old.get('command')}`" if "train" in old else "a model folder"
        raise ConfigError(f"'{folder}' is {what}, not a `nanoseek {command}` folder; use a new --out")
    _refuse_pipelines(folder, command)


def _holds_run(folder: Path) -> bool:
    """Whether a folder holds what a nanoseek command writes first: a run's config.json, the data a pretraining attempt
    prepared, a pipeline's settings."""
    return any((folder / marker).exists() for marker in ("config.json", "data/prepared.json", *PIPELINES.values()))


def _refuse_foreign(folder: Path) -> None:
    """Refuse a folder that holds files but nothing a nanoseek command writes first (a run's config.json, the data a
    pretraining attempt prepared, a pipeline's settings): someone's own files, which a run would write among and over
    (a corpus folder given as --out got a run's folders, and a user's curves.png was replaced)."""
    entries = sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.is_dir() else []
    if entries and not _holds_run(folder):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(f"'{folder}' already holds files that are not a nanoseek run's ({shown}): train into a new "
                          "or empty --out")


def _refuse_pipelines(folder: Path, command: str) -> None:
    for other, marker in PIPELINES.items():
        if other != command and (Path(folder) / marker).exists():
            raise ConfigError(f"'{folder}' is a `nanoseek {other}` folder, not `nanoseek {command}`'s; use a new --out")


def recorded_run(run_dir: Path, command: str) -> dict | None:
    """The settings a run folder was started with (config.json), or None for a new run; a folder that is
    not a run, or that another command started (a pipeline's included), is refused before anything is written
    into it."""
    _refuse_pipelines(run_dir, command)
    _refuse_foreign(Path(run_dir))
    if not (Path(run_dir) / "config.json").exists():
        return None
    old = read_json_object(Path(run_dir) / "config.json")
    if "train" not in old:
        raise ConfigError(f"'{run_dir}' holds a config.json that is not a nanoseek run's (a model folder?); "
                          "train into a new --out")
    if old.get("command") != command:
        raise ConfigError(f"'{run_dir}' is a run started by `nanoseek {old.get('command')}`, not "
                          f"`nanoseek {command}`; use a new --out")
    return old


def checkpoints(run_dir: Path) -> list[Path]:
    """A run folder's complete checkpoints (checkpoints/step_N), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def check_same_run(old: dict, new: dict) -> None:
    """Rerunning a command on an existing run resumes it; only its length, bookkeeping, precision and
    compiling may change."""
    diffs = []
    if resolved_paths(old.get("base_model")) != resolved_paths(new.get("base_model")):
        diffs.append(f"base_model (the model it trains): {old.get('base_model')!r} -> {new.get('base_model')!r}")
    for section in ("model", "data", "sft", "grpo", "distill", "train", "mtp_lambda"):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if resolved_paths(a.get(k)) != resolved_paths(b.get(k)) and not (section == "train" and k in RESUMABLE_CHANGES)]
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    if diffs:
        raise ConfigError("this run folder was started with different settings; use a new --out or the same "
                          "options. Differences: " + "; ".join(diffs))


def resolved_paths(value):
    """A recorded setting with the files and folders in it named by their absolute paths: `data/c.jsonl` and
    `/home/me/data/c.jsonl` are the same file, `d/corpus/` and `d/corpus` one folder (a resume from another
    spelling was refused)."""
    if isinstance(value, dict):
        return {k: resolved_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved_paths(v) for v in value]
    return str(Path(value).resolve()) if isinstance(value, str) and value and Path(value).exists() else value


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the run folder for this command: a second command on it is refused (two runs on one folder
    wrote each other's steps, shards and checkpoints). An advisory lock on folder/.lock, released when the
    process ends however it ends; taken by the first process of a distributed run only."""
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    made, lock_made, failed = not folder.exists(), not (folder / ".lock").exists(), False
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(folder):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        # refused before any work: no folder left, nor a lock file among someone's own files (a model folder's too: its
        # config.json is no run's, and the refusal had left a .lock beside it)
        if made and folder.is_dir() and [p.name for p in folder.iterdir()] == [".lock"]:
            shutil.rmtree(folder, ignore_errors=True)
        elif lock_made and folder.is_dir() and (failed or not _holds_run(folder)):
            (folder / ".lock").unlink(missing_ok=True)


@contextmanager
def _locked(folder: Path):
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ValueError(f"'{folder}' is in use by another nanoseek command ({holder}): wait for it to end, or "
                             "use another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        yield


def run_stage(trainer: Trainer) -> dict[str, float]:
    """Fit a run folder's Trainer to its end and export model/; returns the last step's metrics,
    or {} when the run had already reached its end (model/ is exported again: the run that
    reached the end may have been stopped while exporting it)."""
    result = {}
    if trainer.finished:
        if trainer.dist.main:
            trainer.console.print(f"{trainer.run_dir} is already trained to step {trainer.step}; raise --max-steps "
                                  "or --time-budget to continue")
    else:
        result = trainer.fit()
    if trainer.dist.main:
        export(trainer.latest_checkpoint, trainer.run_dir / "model")
    return result


def export(checkpoint: Path, out: Path) -> None:
    """Copy a checkpoint's model and tokenizer (not the optimizer) to a clean model folder."""
    with staged_dir(out) as tmp:
        for f in checkpoint.iterdir():
            if f.name not in ("trainer.pt", "manifest.json"):
                shutil.copy2(f, tmp / f.name)


# ---- trainer.pt: the optimizer, data cursor, RNG and counters, as tensors and plain values only ----
class UnsafeCheckpointError(CheckpointError):
    """A trainer.pt that does not load as tensors and plain values: unpickling it could run code."""


def save_trainer_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_trainer_state(path: Path) -> dict:
    """torch.load with weights_only: a file someone else wrote into the run folder cannot run code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(f"{path} holds more than tensors and plain values, and unpickling it could run "
                                    "code, so it is not loaded (someone else, or a nanoseek older than this one, "
                                    "wrote it); train into a new --out, or delete that checkpoint") from None


# ---- RNG state: a resumed run draws the same random numbers as one never stopped ----
def rng_state() -> dict:
    numpy = np.random.get_state(legacy=False)  # {"state": {"key": uint32 array, "pos"}, "has_gauss", "gauss", ...}
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))  # a tensor: weights_only loads it
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = {**state["numpy"], "state": {**state["numpy"]["state"]}}
    numpy["state"]["key"] = numpy["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- manifests: a checkpoint is whole only if every file matches ----
def write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    atomic_write(folder / "manifest.json", json.dumps(files, indent=2))


def read_manifest(folder: Path) -> dict[str, dict]:
    """manifest.json: file name -> {"bytes", "sha256"}; CheckpointError if missing or not such a mapping."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no manifest.json (an interrupted write?)")
    try:
        files = json.loads(manifest.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({e})") from None
    if not isinstance(files, dict) or not all(
            Path(name).name == name and isinstance(meta, dict) and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str) for name, meta in files.items()):
        raise CheckpointError(f"{manifest}: not a list of this folder's files with their sizes and sha256")
    return files


def verify_manifest(folder: Path) -> None:
    for name, meta in read_manifest(folder).items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {meta['bytes']} (truncated?)")
        if sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: contents do not match the manifest (corrupt)")
