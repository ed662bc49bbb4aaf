"""The one training loop: pretraining, SFT, GRPO and distillation all run through `Trainer`.

What a stage supplies:
- `data`: an endless iterator of micro-batches with `state_dict()` / `load_state_dict()`
  (e.g. `PackedRows`), so a resumed run continues at the same batch;
- `objective`: `weight(batch)` says how many units (tokens, sequences) the batch's loss is
  summed over, and `objective(model, batch) -> (loss_sum, {metric: sum})`. The loop divides by
  the step's total weight over all micro-batches and processes, so a step's gradient is the
  same mean whatever the accumulation or the number of processes.

What the loop does each step: forward/backward per micro-batch (in fp32 or under bf16 autocast),
gradient clipping, the learning-rate schedule (warmup-stable-decay or cosine, driven by the
step count or by the training time budget, whichever ends first), AdamW, then the
aux-loss-free router-bias update. It logs to `metrics.jsonl`, draws `curves.png`, evaluates
every `eval_every` steps, and writes checkpoints whole or not at all (files.staged_dir). A run
folder (runs.py) is resumed by constructing a Trainer on it again with the same settings: the
newest checkpoint that verifies is loaded (a corrupt one is reported and skipped; one whose
trainer.pt is more than tensors and plain values is refused), and the run continues bit-for-bit
as if never stopped.

How fast it computes is decided at startup, per machine (machine.py), and printed: the precision
(`precision="auto"`: bf16 autocast where it measured faster than fp32, cached per machine) and
compiling (`compile=None`: on for CUDA with triton, off on a CPU, where it measured no faster;
if compiling fails the run warns once and goes on eagerly). A resumed "auto" run decides again
on the machine it resumes on (weights and optimizer are fp32 either way, so switching only
changes speed and rounding noise);
config.json's "machine" section holds the latest start's choice, its reason and measured rates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from ..checkpoint import CheckpointError, load_model, save_model
from ..files import atomic_write, staged_dir
from ..model.config import ConfigError
from ..model.moe import MoE, update_router_bias
from . import distributed as D
from ..machine import COMPILE_ERRORS, choose_precision, cpu_info, decide_compile, use_disk_cache
from .metrics import MetricsLog, plot_metrics
from .runs import (UnsafeCheckpointError, check_same_run, checkpoints, load_trainer_state, recorded_run, rng_state,
                   save_trainer_state, set_rng_state, verify_manifest, write_manifest)
from .settings import TrainConfig

# seconds between the step lines a run writes where its output is not a terminal (a log file, a pipe: no bar there)
LOG_EVERY_S = 30


class Diverged(ValueError):
    """The loss or gradient stopped being a finite number."""


def lr_multiplier(step: int, progress: float, cfg: TrainConfig) -> float:
    """The schedule: linear warmup over warmup_steps, then by progress in [0, 1] (the larger of
    the step and time fractions): wsd holds 1 and decays linearly to min_lr_ratio over the last
    decay_fraction; cosine follows a half cosine down to min_lr_ratio."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p, floor = min(max(progress, 0.0), 1.0), cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
    if cfg.schedule == "wsd" and p > 1 - cfg.decay_fraction:
        return warm * (1 - (1 - floor) * (p - (1 - cfg.decay_fraction)) / cfg.decay_fraction)
    return warm


class Objective(Protocol):
    def weight(self, batch: Any) -> int: ...

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class Trainer:
    """Owns the run folder `run_dir` (runs.py): config.json, metrics.jsonl, curves.png, checkpoints/step_N/.
    A folder started with other settings is refused (ConfigError) before anything is written."""

    def __init__(self, run_dir: str | os.PathLike, model: nn.Module, data, objective: Objective,
                 cfg: TrainConfig, eval_sets: dict[str, Callable[[], Iterable[Any]]] | None = None,
                 run_config: dict | None = None, save_extra: Callable[[Path], None] | None = None,
                 on_eval: Callable[[nn.Module], dict[str, float]] | None = None,
                 console: Console | None = None, dist: D.DistInfo | None = None, compile_why: str | None = None):
        self.run_dir, self.cfg = Path(run_dir), cfg
        config = json.loads(json.dumps({"train": asdict(cfg), **(run_config or {})}, default=str))
        self.restarted = (old := recorded_run(self.run_dir, config.get("command"))) is not None
        if self.restarted and checkpoints(self.run_dir):
            check_same_run(old, config)  # (a run that never saved a checkpoint has nothing to resume: it starts again)
        self.data, self.objective, self.eval_sets = data, objective, eval_sets or {}
        self.save_extra, self.on_eval = save_extra, on_eval
        self.dist = dist or D.DistInfo()
        self.console = console or Console()
        self.model = model
        self.precision = choose_precision(cfg.precision, self.dist.device)
        fp32_ranks = D.all_reduce_sum([self.precision.name == "fp32"], self.dist).item()  # every rank takes part
        if self.precision.name == "bf16" and fp32_ranks:  # all processes train in the same precision
            self.precision = replace(self.precision, name="fp32", reason="another process picked fp32")
        self.compiled, compile_reason = decide_compile(cfg.compile, self.dist.device, self.precision.name)
        compile_reason = compile_why or compile_reason  # (a stage that sets cfg.compile itself says why: not "as set")
        config["machine"] = self._machine(compile_reason)
        if self.dist.main:
            self.console.print(f"precision: {self.precision.name} ({self.precision.reason})")
            self.console.print(f"compile: {'on' if self.compiled else 'off'} ({compile_reason})")
            if cfg.max_steps and cfg.warmup_steps > cfg.max_steps:
                self.console.print(f"[yellow]warmup ({cfg.warmup_steps} steps) is longer than the run "
                                   f"({cfg.max_steps}): the learning rate never reaches its peak[/]")
        if cfg.aux_alpha is not None:
            for m in model.modules():
                if isinstance(m, MoE):
                    m.aux_alpha = cfg.aux_alpha
        if self.dist.active:
            D.shard(model)
        if self.compiled:
            use_disk_cache()
            compile_regions(model)
        self.opt = make_optimizer(model, cfg, fused=not self.dist.active)
        self.step, self.elapsed, self.tokens = 0, 0.0, 0
        self.bad_steps = 0  # updates skipped in a row for a non-finite gradient
        self.saving = False  # a checkpoint is being written
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.json", json.dumps(config, indent=2))
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.dist.main)
        self.resumed_from = self._resume()
        self.latest_checkpoint = self.resumed_from  # the checkpoint holding the trainer's state (save() moves it)

    # ---- the loop ----
    def fit(self) -> dict[str, float]:
        """Train until max_steps or the time budget; returns the last step's metrics. The first
        Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and raises
        KeyboardInterrupt; a second one stops at once."""
        cfg, model = self.cfg, self.model
        last: dict[str, float] = {}
        stop = _StopFlag(self._unsaved)
        logged = -math.inf  # when a step's line was last written to a log (see LOG_EVERY_S)
        with stop, self._progress_bar() as progress:
            bar = progress.add_task("training", total=1000)
            while not self.finished:
                model.train()
                t0 = time.perf_counter()
                batches = [next(self.data) for _ in range(cfg.grad_accum)]
                weights = [self.objective.weight(b) for b in batches]
                total = D.all_reduce_sum([sum(weights)], self.dist).item()
                per_rank = max(total, 1.0) / self.dist.world  # FSDP averages gradients over ranks
                sums = self._eager_if_compiling_fails(self._forward_backward, batches, total, per_rank)
                lr = cfg.lr * lr_multiplier(self.step, self.progress, cfg)
                grad_norm = 0.0
                if total > 0:  # a step without targets (e.g. RL rollouts that all scored alike) updates nothing
                    grad_norm = clip_grad_norm(model, cfg.grad_clip)
                    for group in self.opt.param_groups:
                        group["lr"] = lr
                    if self._finite(grad_norm):  # (a non-finite one is skipped: it would poison every weight)
                        self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                balance = update_router_bias(model, cfg.bias_gamma)
                names = sorted(sums)
                reduced = D.all_reduce_sum([sums[k] for k in names] + [float(stop.requested)], self.dist).tolist()
                dt = time.perf_counter() - t0
                tokens = sum(batch_tokens(b) for b in batches) * self.dist.world
                self.step, self.elapsed, self.tokens = self.step + 1, self.elapsed + dt, self.tokens + tokens
                last = {k: v / max(total, 1.0) for k, v in zip(names, reduced)}
                last.update(lr=lr, **balance)  # a step that updated nothing has no gradient norm or speed to plot
                if total > 0:
                    last["grad_norm"] = grad_norm
                if tokens:
                    last["tokens_per_s"] = tokens / dt
                self.log.write(self.step, self.elapsed, self.tokens, last)
                if reduced[-1] > 0:  # some process was asked to stop
                    progress.update(bar, description=self._describe(last))  # the step saved, not the one before
                    if self.dist.main:
                        self.console.print(f"[yellow]stopping[/]: saving step {self.step}; rerun the same command "
                                           "to resume")
                    self.save()
                    raise KeyboardInterrupt
                if self.finished or (cfg.eval_every and self.step % cfg.eval_every == 0):
                    last.update(self.evaluate())
                if self.finished or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save()
                progress.update(bar, completed=round(1000 * min(self.progress, 1.0)), description=self._describe(last))
                if not self.console.is_terminal and self.dist.main and not self.finished and \
                        time.monotonic() - logged >= LOG_EVERY_S:  # a log has no bar to watch: a line now and then
                    self.console.print(f"{self._describe(last)}  {100 * min(self.progress, 1.0):.0f}%")
                    logged = time.monotonic()
        return last

    def _unsaved(self) -> str:
        """What stopping at once would lose: the steps since the last checkpoint, the one under way included."""
        saved = int(self.latest_checkpoint.name.removeprefix("step_")) if self.latest_checkpoint else 0
        if self.saving:  # (the steps since it are none: said as "losing 21 steps, no checkpoint saved yet")
            return f"step {self.step}'s checkpoint is being written: kept if it is done first"
        lost = self.step + 1 - saved
        return f"losing {lost} step{'s' * (lost > 1)}: " + (f"the last checkpoint is step {saved}" if saved else
                                                             "no checkpoint is saved yet")

    def _finite(self, grad_norm: float, patience: int = 3) -> bool:
        """Whether the gradient is finite, counting non-finite ones in a row; at `patience` the run has
        diverged: it stops with the last checkpoint kept (a NaN model was saved as a finished run)."""
        self.bad_steps = 0 if math.isfinite(grad_norm) else self.bad_steps + 1
        if self.bad_steps == 1 and self.dist.main:
            self.console.print(f"[yellow]step {self.step + 1}: the gradient is not finite ({grad_norm}); "
                               "its update is skipped[/]")
        if self.bad_steps >= patience:
            kept = f"the last checkpoint ({self.latest_checkpoint.name}) is kept" if self.latest_checkpoint else \
                "no checkpoint was written"
            raise Diverged(f"training diverged: the gradient was not finite for {patience} steps in a row "
                           f"(step {self.step + 1}); {kept}. Lower --lr (it is {self.cfg.lr:g}) and start a new run")
        return self.bad_steps == 0

    def _forward_backward(self, batches: list, total: float, per_rank: float) -> dict[str, float]:
        """Gradients of a step's micro-batches (accumulated); returns the objective's metric sums."""
        sums: dict[str, float] = {}
        for batch in batches:
            with self.precision.autocast(self.dist.device):
                loss, metrics = self.objective(self.model, batch)
            if total > 0:
                (loss / per_rank).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return sums

    def _machine(self, compile_reason: str) -> dict:
        """What this start of the run computes on and with, for config.json (reports show it)."""
        device = self.dist.device
        cpu = cpu_info()
        return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu.model,
                "cpu": cpu.model, "cpu_flags": cpu.flags, "threads": torch.get_num_threads(),
                "precision": self.precision.name, "precision_reason": self.precision.reason,
                "gflops": self.precision.rates, "compile": self.compiled, "compile_reason": compile_reason}

    def _eager_if_compiling_fails(self, fn: Callable[..., Any], *args) -> Any:
        """fn(*args); if compiling fails in it, a warning, the compiled regions go back to eager, and fn
        runs again from zeroed gradients (a step's micro-batches are already drawn: the step is the same)."""
        try:
            return fn(*args)
        except COMPILE_ERRORS as e:
            if not self.compiled:
                raise
            if self.dist.main:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.console.print(f"[yellow]torch.compile failed, training without it[/]: {type(e).__name__}: {first}")
            uncompile_regions(self.model)
            self.compiled = False
            self.opt.zero_grad(set_to_none=True)
            return fn(*args)

    @property
    def progress(self) -> float:
        by_steps = self.step / self.cfg.max_steps if self.cfg.max_steps else 0.0
        by_time = self.elapsed / self.cfg.time_budget if self.cfg.time_budget > 0 else 0.0
        return max(by_steps, by_time)

    @property
    def finished(self) -> bool:
        return self.progress >= 1.0

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics per eval set (eval_<set>_<metric>) and over all sets (eval_<metric>)."""
        return self._eager_if_compiling_fails(self._evaluate)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        self.model.eval()
        overall: dict[str, float] = {}
        for set_name, batches in self.eval_sets.items():
            sums, total = {}, 0.0
            for batch in batches():
                with self.precision.autocast(self.dist.device):
                    _, metrics = self.objective(self.model, batch)
                total += self.objective.weight(batch)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            names = sorted(sums)
            reduced = D.all_reduce_sum([total] + [sums[k] for k in names], self.dist).tolist()
            if reduced[0] > 0:
                out.update({f"eval_{set_name}_{k}": v / reduced[0] for k, v in zip(names, reduced[1:])})
                for k, v in zip(["_weight"] + names, reduced):
                    overall[k] = overall.get(k, 0.0) + v
        if len(self.eval_sets) > 1 and overall.get("_weight"):
            out.update({f"eval_{k}": v / overall["_weight"] for k, v in overall.items() if k != "_weight"})
        elif len(self.eval_sets) == 1:  # the one set's metrics are the overall ones (its name may hold "_")
            prefix = f"eval_{next(iter(self.eval_sets))}_"
            out.update({"eval_" + k.removeprefix(prefix): v for k, v in list(out.items())})
        if self.on_eval is not None:
            out.update(self.on_eval(self.model))
        self.model.train()
        if out:
            self.log.write(self.step, self.elapsed, self.tokens, out)
            if self.dist.main:
                shown = "  ".join(f"{k} {v:.4g}" for k, v in out.items())
                self.console.print(f"step {self.step}: {shown}")
        return out

    # ---- checkpoints ----
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        """checkpoints/step_N/: the model (HF format), trainer.pt (optimizer, data cursor, RNG,
        counters) and manifest.json (sizes and sha256 of every file), written in step_N.tmp and
        moved into place whole (files.staged_dir); older checkpoints beyond keep_checkpoints are removed."""
        self.saving = True  # (what stopping at once would lose: see _unsaved)
        state = D.full_model_state(self.model, self.dist)
        optim = D.full_optimizer_state(self.model, self.opt, self.dist)
        final = self.checkpoint_dir / f"step_{self.step:07d}"
        if self.dist.main:
            with staged_dir(final) as tmp:
                save_model(self.model, tmp, state_dict=state)
                save_trainer_state(tmp / "trainer.pt", {
                    "step": self.step, "elapsed": self.elapsed, "tokens": self.tokens, "optimizer": optim,
                    "data": self.data.state_dict(), "rng": rng_state(), "train_config": asdict(self.cfg)})
                if self.save_extra is not None:
                    self.save_extra(tmp)
                write_manifest(tmp)
            for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            plot_metrics(self.run_dir)
        if self.dist.active:
            torch.distributed.barrier()
        self.latest_checkpoint, self.saving = final, False
        return final

    def checkpoints(self) -> list[Path]:
        return checkpoints(self.run_dir)

    def _resume(self) -> Path | None:
        for ckpt in reversed(self.checkpoints()):
            try:
                verify_manifest(ckpt)
                loaded = load_model(ckpt, dtype=torch.float32)
                trainer = load_trainer_state(ckpt / "trainer.pt")
            except UnsafeCheckpointError:
                raise  # not a damaged checkpoint to skip: a foreign one, and the user must decide
            except (CheckpointError, ConfigError, OSError, RuntimeError, KeyError) as e:
                if self.dist.main:
                    self.console.print(f"[yellow]skipping checkpoint {ckpt.name}[/]: {e}")
                continue
            D.load_full_model_state(self.model, loaded.state_dict(), self.dist)
            D.load_full_optimizer_state(self.model, self.opt, trainer["optimizer"], self.dist)
            self.data.load_state_dict(trainer["data"])
            set_rng_state(trainer["rng"])
            self.step, self.elapsed, self.tokens = trainer["step"], trainer["elapsed"], trainer["tokens"]
            self.log.truncate(self.step)
            if self.dist.main:
                self.console.print(f"resuming from {ckpt} (step {self.step}, {self.elapsed:.0f}s trained)")
            return ckpt
        if self.restarted and self.dist.main:  # (its config.json was there: an earlier attempt stopped before saving)
            self.console.print("[yellow]this run folder holds no checkpoint to resume from: training starts again "
                               "from step 0[/] (--checkpoint-every sets how often one is written)")
        self.log.truncate(0)
        return None

    # ---- display ----
    def _progress_bar(self) -> Progress:
        # (written to a log, no bar: in its 80 columns the bar squeezed the times to `0:00:…`)
        bar = [BarColumn()] if self.console.is_terminal else []
        return Progress(TextColumn("[bold]{task.description}"), *bar, TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                        disable=not self.dist.main)

    def _describe(self, m: dict[str, float]) -> str:
        budget = f"/{self.cfg.max_steps}" if self.cfg.max_steps and not self.cfg.time_budget else ""
        parts = [f"step {self.step}{budget}"]
        parts.append(f"loss {m['loss']:.3f}" if "loss" in m else f"reward {m['reward']:.3f}" if "reward" in m else
                     "another update on the last rollouts")  # (GRPO's --updates: no new rewards, was "reward nan")
        if "mtp_loss" in m:
            parts.append(f"mtp {m['mtp_loss']:.3f}")
        if m.get("tokens_per_s"):
            parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        return "  ".join(parts)


class _StopFlag:
    """SIGINT/SIGTERM set `requested` (the loop stops cleanly after the step); a second signal ends the
    process at once: the first puts back the system's default action, which needs no Python (a Python handler
    runs only between operations, and one long native operation, a step at a huge --seq-len, outlasted a
    second and a third signal). Handlers are restored on exit; inert outside the main thread."""

    def __init__(self, unsaved: Callable[[], str]):
        self.requested, self._old, self.unsaved = False, {}, unsaved

    def _handle(self, signum, frame):
        for sig in self._old:  # the next signal stops now (every file is written crash-safe: nothing is torn)
            signal.signal(sig, signal.SIG_DFL)
        self.requested = True
        # said at once: a step (a GRPO step's rollouts) can take a minute, and silence invites a second Ctrl-C
        print(f"\nstopping after this step, with a checkpoint (Ctrl-C again: stop now, {self.unsaved()})",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


def compiled_regions(model: nn.Module) -> list[nn.Module]:
    """The fixed-shape parts of every layer (attention, norms, dense MLP, router); the routed
    experts, whose batch changes every step, stay eager."""
    parts = []
    for layer in model.model.layers:
        parts += [layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm]
        parts.append(layer.mlp.gate if layer.is_moe else layer.mlp)
    return parts


def compile_regions(model: nn.Module) -> None:
    """torch.compile each region's forward (compiled at its first call: seconds per layer, less
    when inductor's disk cache has the graphs)."""
    for part in compiled_regions(model):
        part.forward = torch.compile(part.forward)


def uncompile_regions(model: nn.Module) -> None:
    for part in compiled_regions(model):
        part.__dict__.pop("forward", None)  # the class's forward again


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases); fused where supported."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def batch_tokens(batch: Any) -> int:
    """Positions processed in a batch (the first tensor's elements; a GRPO batch's rows, padding included)."""
    if isinstance(batch, dict):
        batch = batch.get("ids")
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.numel()) if isinstance(first, torch.Tensor) else 0
