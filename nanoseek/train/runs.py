"""A run folder and its lifecycle, the same for every training command.

    config.json          the run's settings (the Trainer writes it; rerunning on the folder resumes
                         the run, and only RESUMABLE_CHANGES may differ: `check_same_run`)
    metrics.jsonl, curves.png
    checkpoints/step_N/  the model (HF format), trainer.pt (optimizer, data cursor, `rng_state`,
                         counters) and manifest.json (size and sha256 of every file:
                         `write_manifest`, `verify_manifest`)
    model/               the final model, exported from the last checkpoint (`export`)

The lifecycle: a stage builds its model, data and objective and constructs a `Trainer` on the
folder (which compares config.json and resumes from the newest checkpoint that verifies), then
`run_stage` fits it to the end and exports model/.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..model.config import ConfigError

if TYPE_CHECKING:
    from .loop import Trainer

RESUMABLE_CHANGES = {"max_steps", "time_budget", "eval_every", "checkpoint_every", "keep_checkpoints"}


def check_same_run(old: dict, new: dict) -> None:
    """Rerunning a command on an existing run resumes it; only its length and bookkeeping may change."""
    diffs = []
    for section in ("model", "data", "train", "mtp_lambda"):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k) and not (section == "train" and k in RESUMABLE_CHANGES)]
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    if diffs:
        raise ConfigError("this run folder was started with different settings; use a new --out or the same "
                          "options. Differences: " + "; ".join(diffs))


def run_stage(trainer: Trainer) -> dict[str, float]:
    """Fit a run folder's Trainer to its end and export model/; returns the last step's metrics,
    or {} when the run had already reached its end."""
    if trainer.finished:
        if trainer.dist.main:
            trainer.console.print(f"{trainer.run_dir} is already trained to step {trainer.step}; raise --max-steps "
                                  "or --time-budget to continue")
        return {}
    result = trainer.fit()
    if trainer.dist.main:
        export(trainer.checkpoints()[-1], trainer.run_dir / "model")
    return result


def export(checkpoint: Path, out: Path) -> None:
    """Copy a checkpoint's model and tokenizer (not the optimizer) to a clean model folder."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.name not in ("trainer.pt", "manifest.json"):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---- RNG state: a resumed run draws the same random numbers as one never stopped ----
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- manifests: a checkpoint is whole only if every file matches ----
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(files, indent=2))
    os.replace(tmp, folder / "manifest.json")


def verify_manifest(folder: Path) -> None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no manifest.json (an interrupted write?)")
    for name, meta in json.loads(manifest.read_text()).items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {meta['bytes']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: contents do not match the manifest (corrupt)")
