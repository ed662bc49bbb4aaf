"""Distillation into smaller "derivative" models, DeepSeek-R1 style.

1. Traces: a teacher answers train-split problems: a local nanoseek model folder (through the
   engine), or any OpenAI-compatible endpoint (DeepSeek's API, a nanoseek server; remote.py),
   whose `reasoning_content` is the trace. Only traces whose answers verify are kept (rejection
   sampling). Each is appended to traces.jsonl as it arrives, so a crash or a failing endpoint
   loses nothing: rerunning continues where it stopped (a last line a crash cut short is dropped
   and asked again). Network errors are retried with backoff, reported, and never silently dropped.
2. Student: SFT on the verified traces (the same SFT as `nanoseek sft`). With a local teacher
   that shares the tokenizer, the loss can also match the teacher's token distributions (KL at
   temperature T, mixed with cross-entropy: `DistillObjective`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from ..checkpoint import load_config, load_model, refuse_quantized, save_model
from ..data.tasks import get_task, token_budget
from ..data.tasks.rewards import accuracy_reward, split_completion
from ..files import atomic_write, drop_torn_tail, read_jsonl, staged_dir
from ..inference import SamplingParams
from ..loading import load_chat_engine
from ..model import build_model
from ..remote import remote_chat
from ..tokenizer import DeepSeekTokenizer
from .losses import distill_kl
from .pretrain import model_config_for
from .runs import check_same_run, claim_pipeline
from .settings import DISTILL_TRAIN, SFTConfig
from .sft import sft


def local_teacher(model_dir: str | Path, temperature: float = 0.6, max_batch: int = 32):
    """A function questions -> completions (reasoning + answer text) from a local model folder."""
    engine, tok = load_chat_engine(model_dir, max_batch=max_batch, dtype=torch.float32)

    def ask(questions: list[str], max_tokens: int, seed: int) -> list[str]:
        prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in questions]
        reqs = engine.generate(prompts, [SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                                        seed=seed + i) for i in range(len(prompts))])
        return [r.text for r in reqs]

    return ask


def collect_traces(ask, tasks: list[str], n: int, out: Path, max_tokens: int = 512, batch: int = 32,
                   seed: int = 0, console: Console | None = None, max_asked: int | None = None,
                   time_limit: float | None = None) -> dict:
    """Append verified teacher traces to out (jsonl) until n are there, until max_asked problems
    (default 20 n) were asked, or once time_limit seconds have passed; resumes from what the file holds."""
    console = console or Console()
    kept = rejected = 0
    if out.exists():
        torn = drop_torn_tail(out)
        if torn:
            console.print(f"[yellow]{out}[/]: dropped a half-written last line ({len(torn)} bytes) left by a crash")
        lines = read_jsonl(out)
        kept = sum(1 for r in lines if r.get("verified"))
        rejected = sum(1 for r in lines if not r.get("verified"))
    rng = random.Random(seed)
    for _ in range(kept + rejected):  # skip the problems already asked, so a rerun continues
        name = rng.choice(tasks)
        get_task(name).sample(rng, "train")
    families = {t: get_task(t) for t in tasks}
    max_asked = max_asked or 20 * n
    start = time.perf_counter()
    with open(out, "a") as f:
        while kept < n and kept + rejected < max_asked and (time_limit is None or time.perf_counter() - start < time_limit):
            picked = [(name, families[name].sample(rng, "train")) for name in (rng.choice(tasks) for _ in range(batch))]
            completions = ask([p.question for _, p in picked], max_tokens, seed + kept + rejected)
            for (name, p), text in zip(picked, completions):
                ok = accuracy_reward(families[name], p, text) == 1.0
                parts = split_completion(text)
                record = {"family": name, "question": p.question, "gold": p.answer, "verified": ok}
                if ok:
                    record["messages"] = [{"role": "user", "content": p.question},
                                          {"role": "assistant", "reasoning_content": parts[0], "content": parts[1]}]
                    kept += 1
                else:
                    rejected += 1
                f.write(json.dumps(record) + "\n")
                if kept == n:  # the rest of the batch goes unrecorded (a rerun asks those problems again)
                    break
            f.flush()
            console.print(f"traces: {kept}/{n} verified, {rejected} rejected")
    if kept < n:
        console.print(f"[yellow]stopped after {kept + rejected} problems with only {kept} verified traces[/]")
    return {"verified": kept, "rejected": rejected, "acceptance": kept / max(1, kept + rejected)}


def verified_conversations(path: Path) -> list[list[dict]]:
    return [r["messages"] for r in read_jsonl(path) if r.get("verified")]


class DistillObjective:
    """(1 - alpha) * cross-entropy + alpha * KL(teacher || student) at temperature T, on the
    assistant tokens, + mtp_lambda * MTP loss; the teacher is a local model with the same tokenizer."""

    def __init__(self, teacher, alpha: float = 0.5, temperature: float = 2.0, mtp_lambda: float = 0.3, device="cpu"):
        self.teacher, self.alpha, self.t, self.device = teacher.eval(), alpha, temperature, torch.device(device)
        self.mtp_lambda = mtp_lambda

    def weight(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def __call__(self, model, batch):
        x, y = (t.to(self.device) for t in batch)
        mask = y != -100
        n = self.weight(batch)
        out = model(x, labels=y)
        with torch.no_grad():
            t_logits = self.teacher(x).logits
        kl_sum, _ = distill_kl(out.logits, t_logits, mask, self.t)
        ce_sum = out.loss * n
        loss = (1 - self.alpha) * ce_sum + self.alpha * kl_sum
        if out.mtp_loss is not None:
            loss = loss + self.mtp_lambda * out.mtp_loss * n
        return loss, {"loss": ce_sum.detach(), "kl": kl_sum.detach()}


def _refuse_other_vocabulary(teacher: str, student: str) -> None:
    """Logit distillation compares the two models' distributions token by token: the student must read and write
    the teacher's tokens, in as many logits (it failed after the traces were collected, on a size mismatch)."""
    (t_tokens, t_rows), (s_tokens, s_rows) = (
        (DeepSeekTokenizer.load(folder).tok.get_vocab(), load_config(folder)[0].vocab_size) for folder in (teacher, student))
    if t_tokens != s_tokens or t_rows != s_rows:
        theirs = (f"{len(s_tokens):,} tokens in {s_rows:,} logits against the teacher's {len(t_tokens):,} in {t_rows:,}"
                  if (len(s_tokens), s_rows) != (len(t_tokens), t_rows) else "other tokens than the teacher's")
        raise ValueError(f"--kl-alpha: logit distillation needs a student with the teacher's tokenizer and vocabulary; "
                         f"{student} has {theirs}: give a student preset (it takes the teacher's tokenizer), or "
                         "--kl-alpha 0 (distillation from the traces alone)")


def distill(teacher: str, student: str, out: str | Path, tasks: list[str], n_traces: int = 2000,
            tokenizer: str | None = None, kl_alpha: float = 0.0, kl_temperature: float = 2.0,
            teacher_model: str = "deepseek-reasoner", api_key: str | None = None, max_tokens: int | None = None,
            sft_config: SFTConfig | None = None, train=None, console: Console | None = None,
            trace_seconds: float | None = None) -> dict:
    """Traces from the teacher (folder or URL) -> verified -> SFT of the student (preset or folder).
    Writes out/traces.jsonl, out/student_init/ (a preset student), out/student/ (the SFT run).
    trace_seconds bounds the time spent collecting traces (the speedrun's share for them)."""
    console = console or Console()
    out = Path(out)
    claim_pipeline(out, "distill")
    if kl_alpha > 0 and (Path(teacher) / "config.json").is_file():  # (a quantized teacher may write the traces)
        refuse_quantized(teacher, "logit distillation (--kl-alpha)")
    if (Path(student) / "config.json").is_file():
        refuse_quantized(student, "the student")
    remote = teacher.startswith(("http://", "https://"))
    if kl_alpha > 0 and remote:
        raise ValueError("logit-level distillation needs a local teacher (a model folder), not an endpoint")
    if kl_alpha > 0 and (Path(student) / "config.json").is_file():
        _refuse_other_vocabulary(teacher, student)
    elif kl_alpha > 0 and tokenizer is not None and \
            DeepSeekTokenizer.load(tokenizer).tok.get_vocab() != DeepSeekTokenizer.load(teacher).tok.get_vocab():
        raise ValueError(f"--kl-alpha: logit distillation needs a student with the teacher's tokenizer; --tokenizer "
                         f"{tokenizer} is another: leave it out (a student preset takes the teacher's), or --kl-alpha 0 "
                         "(distillation from the traces alone)")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"distill": {"teacher": teacher, "student": student, "tasks": sorted(tasks), "traces": n_traces,
                            "tokenizer": tokenizer, "kl_alpha": kl_alpha, "kl_temperature": kl_temperature,
                            "teacher_model": teacher_model}}
    if (out / "distill.json").is_file():  # a rerun resumes: its traces and student are for these settings only
        check_same_run(json.loads((out / "distill.json").read_text()), settings)
    atomic_write(out / "distill.json", json.dumps(settings, indent=2))
    ask = remote_chat(teacher, teacher_model, api_key, log=console.print) if remote else local_teacher(teacher)
    if max_tokens is None:  # room for the longest worked solution (the teacher's tokenizer) or 512 for an endpoint
        max_tokens = 512 if remote else max(token_budget(DeepSeekTokenizer.load(teacher), t) for t in tasks)
    # once the student has started training, its traces are its data: a rerun collects no more (they would change
    # the conversations under a resumed run, which sft refuses)
    started = (out / "student" / "config.json").is_file()
    stats = collect_traces(ask, tasks, n_traces, out / "traces.jsonl", max_tokens=max_tokens, console=console,
                           time_limit=0 if started else trace_seconds)
    if stats["verified"] == 0:
        raise ValueError(f"the teacher produced no verified traces in {stats['rejected']} tries; nothing to distill")
    with open(out / "sft.jsonl", "w") as f:
        for messages in verified_conversations(out / "traces.jsonl"):
            f.write(json.dumps({"messages": messages}) + "\n")
    student_dir = Path(student)
    if not (student_dir / "config.json").is_file():  # a preset: a fresh model with the teacher's tokenizer
        tok_dir = tokenizer or (None if remote else teacher)
        if tok_dir is None:
            raise ValueError("a preset student with a remote teacher needs --tokenizer")
        tok = DeepSeekTokenizer.load(tok_dir)
        student_dir = out / "student_init"
        if not (student_dir / "config.json").is_file():
            with staged_dir(student_dir) as tmp:
                save_model(build_model(model_config_for(student, tok)), tmp)
                tok.save(tmp)
    cfg = replace(sft_config or SFTConfig(), data=str(out / "sft.jsonl"))
    objective = None
    if kl_alpha > 0:
        objective = DistillObjective(load_model(teacher, dtype=torch.float32), kl_alpha, kl_temperature,
                                     cfg.mtp_lambda)
    result = sft(student_dir, out / "student", cfg, train or DISTILL_TRAIN, console=console, objective=objective)
    return {**stats, **result}
