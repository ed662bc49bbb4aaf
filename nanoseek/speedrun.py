"""The speedrun: tokenizer -> pretraining -> SFT -> GRPO -> distillation -> evaluation -> report card.

Each stage is a plain command's run folder under the speedrun folder, and a stage whose
`model/` exists is skipped, so rerunning `nanoseek speedrun` after a crash continues at the
stage (and, inside it, the checkpoint) where it stopped. Stage budgets are fractions of the
total; the report card (report.md + plots) says what each stage cost and what it bought.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.rule import Rule

from .checkpoint import load_model, save_model
from .data.tasks import WORDINGS
from .eval.small_talk import evaluate_small_talk
from .eval.tasks import evaluate_many, wilson
from .eval.tool_use import evaluate_tool_use
from .files import atomic_write, staged_dir
from .inference import SamplingParams
from .loading import load_chat_engine
from .tokenizer import DeepSeekTokenizer
from .tools import CallFormat
from .train.distill import distill
from .train.grpo import rl
from .machine import cpu_info
from .model.config import ConfigError
from .train.metrics import read_metrics
from .train.pretrain import pretrain
from .train.runs import claim_pipeline
from .train.settings import (DISTILL_TRAIN, PRETRAIN_TRAIN, RL_TRAIN, SFT_TRAIN, DataConfig, GRPOConfig, SFTConfig,
                             SpeedrunConfig, TrainConfig)
from .train.sft import sft

FAMILIES = ["add", "sub", "mul", "countdown", "linear"]
NO_THINKING_FAMILIES = ["add", "sub", "mul"]  # also asked with thinking off
SMALL_TALK_ROWS = {"trained phrasings": {"templates": "train"},
                   "trained, after a task": {"templates": "train", "after_task": True},
                   "trained, sampled at 0.6": {"templates": "train", "temperature": 0.6, "samples": 3},
                   "held-out phrasings": {}, "held-out, after a task": {"after_task": True}}
EXTRA_ROWS = ("thinking off", "offered", "not offered", *SMALL_TALK_ROWS)  # evaluations besides the wordings
TARGETS = {"add": 0.98, "sub": 0.98, "mul": 0.95, "countdown": 0.5}  # on trained and on held-out templates
TEMPLATE_GAP = 0.05  # held-out templates within this of trained ones
TRACE_SHARE = 0.05  # of the budget: the most collecting the student's traces may take (a full run took 0.023)


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def speedrun(out: str | Path = "runs/speedrun", cfg: SpeedrunConfig | None = None,
             console: Console | None = None) -> Path:
    cfg, console = cfg or SpeedrunConfig(), console or Console()
    out = Path(out)
    claim_pipeline(out, "speedrun")
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "speedrun.json"  # the seed and preset the folder's stages were started with
    settings = {"seed": cfg.seed, "preset": cfg.preset}
    started = json.loads(settings_file.read_text()) if settings_file.exists() else settings
    for key, value in settings.items():  # (a folder from before presets were recorded has no preset: any resumes)
        if started.get(key, value) != value:
            raise ConfigError(f"{out} was started with {key} {started[key]}: resume it with that {key}, or use a new "
                              f"folder for {key} {value}")
    atomic_write(settings_file, json.dumps(settings))
    timing_file = out / "timings.json"
    timings = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    t_start = time.perf_counter() - sum(timings.values())
    B = cfg.budget
    expected = expected_durations(cfg)

    def stage(name: str, title: str, fn):
        if name in timings:
            console.print(f"[dim]{title}: done earlier ({_minutes(timings[name])})[/]")
            return
        spent = time.perf_counter() - t_start
        left = sum(v for k, v in expected.items() if k not in timings)
        console.print(Rule(f"{title}  ·  {_minutes(spent)} spent, about {_minutes(left)} left"))
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
        atomic_write(timing_file, json.dumps(timings, indent=2))

    def budgeted(default: TrainConfig, share: float, **overrides) -> TrainConfig:
        """A stage's default training settings, run for its share of the budget."""
        return replace(default, max_steps=0, time_budget=share * B, seed=cfg.seed, precision=cfg.precision,
                       compile=cfg.compile, **overrides)

    def data() -> DataConfig:
        return DataConfig(task_documents=cfg.task_documents, code_chars=cfg.code_chars, seq_len=cfg.seq_len,
                          seed=cfg.seed)

    stage("pretrain", "1/7 tokenizer + pretraining (tasks + Python stdlib with FIM, MTP on)", lambda: pretrain(
        out / "pretrain", preset=cfg.preset, data=data(),
        train=budgeted(PRETRAIN_TRAIN, cfg.pretrain_share, eval_every=200), console=console))
    stage("sft", "2/7 chat SFT (task problems in many phrasings + small talk)", lambda: sft(
        out / "pretrain" / "model", out / "sft",
        SFTConfig(builtin_conversations=cfg.sft_conversations, seq_len=cfg.seq_len, seed=cfg.seed),
        budgeted(SFT_TRAIN, cfg.sft_share, lr=1e-3, min_lr_ratio=0.05, eval_every=200), console=console))
    stage("eval_sft", "3/7 evaluation before RL", lambda: evaluate(out / "sft" / "model", out / "eval_sft.json", cfg,
                                                                    console))
    stage("rl", "4/7 GRPO (R1 mode, rule-based rewards)", lambda: rl(
        out / "sft" / "model", out / "rl",
        GRPOConfig(tasks=cfg.rl_tasks or rl_families(out / "eval_sft.json"), beta=0.02, updates_per_rollout=2,
                   max_new_tokens=cfg.max_new_tokens or 0, seed=cfg.seed),
        budgeted(RL_TRAIN, cfg.rl_share, lr=3e-5, warmup_steps=3, checkpoint_every=10), console=console))
    stage("eval_rl", "5/7 evaluation after RL", lambda: evaluate(out / "rl" / "model", out / "eval_rl.json", cfg,
                                                                  console))

    def student_base():
        share_data(out / "pretrain", out / "student_base")
        pretrain(out / "student_base", preset=cfg.student, data=data(),
                 train=budgeted(PRETRAIN_TRAIN, cfg.student_pretrain_share, lr=3e-3, warmup_steps=30, eval_every=200),
                 console=console)

    stage("student_base", "6/7 the student's pretraining (a smaller dense model, same data)", student_base)
    stage("eval_student_base", "evaluation of the student before distillation", lambda: evaluate(
        out / "student_base" / "model", out / "eval_student_base.json", cfg, console, ["add", "sub", "mul"]))

    def student():
        try:
            distill(str(out / "rl" / "model"), str(out / "student_base" / "model"), out / "distill",
                    ["add", "sub", "mul"], cfg.traces, max_tokens=cfg.max_new_tokens,
                    sft_config=SFTConfig(seq_len=cfg.seq_len, seed=cfg.seed),
                    train=budgeted(DISTILL_TRAIN, cfg.distill_share, checkpoint_every=100), console=console,
                    trace_seconds=TRACE_SHARE * B)  # a teacher that verifies little must not hold the run
        except ValueError as e:  # a teacher too weak to give verified traces: say so in the report
            console.print(f"[yellow]no student: {e}[/]")
            (out / "distill").mkdir(exist_ok=True)
            (out / "distill" / "skipped.txt").write_text(str(e))

    stage("distill", "7/7 distillation of the chat model's verified traces into the student", student)
    stage("eval_student", "evaluation of the student", lambda: (out / "distill" / "student" / "model").exists() and
          evaluate(out / "distill" / "student" / "model", out / "eval_student.json", cfg, console,
                   ["add", "sub", "mul"]))
    stage("speed", "decode speed and MTP acceptance", lambda: measure_speed(out / "rl" / "model", out / "speed.json"))
    report = write_report(out, cfg, timings)
    console.print(Rule("done"))
    console.print(f"Report card: {report}\nChat with the result:  nanoseek chat --model {out / 'rl' / 'model'}\n"
                  f"Serve it (web app + API):  nanoseek serve --model {out / 'rl' / 'model'}")
    return report


def expected_durations(cfg: SpeedrunConfig) -> dict[str, float]:
    """Seconds each stage should take, in pipeline order (training stages run to their share of
    the budget; data preparation, traces and evaluations get the small allowances measured on
    the 2-core machine): the ETA shown at each stage."""
    B = cfg.budget
    return {"pretrain": (cfg.pretrain_share + 0.04) * B, "sft": cfg.sft_share * B, "eval_sft": 0.01 * B,
            "rl": cfg.rl_share * B, "eval_rl": 0.01 * B, "student_base": cfg.student_pretrain_share * B,
            "eval_student_base": 0.005 * B, "distill": (cfg.distill_share + 0.02) * B, "eval_student": 0.005 * B,
            "speed": 0.002 * B}


def share_data(src: Path, dst: Path) -> None:
    """Point a second pretraining run at an existing run's tokenizer and token shards (symlinks)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "data"):
        link = dst / name
        if not link.exists():
            link.symlink_to(os.path.relpath(src / name, dst), target_is_directory=True)


def rl_families(eval_file: Path, low: float = 0.1, high: float = 0.9) -> list[str]:
    """The family RL can move most: the weakest one the SFT model solves sometimes but not always
    (so groups of samples differ in reward); RL on several at once was measured to trade one
    family's gain for another's loss at this size. Falls back to the weakest family solved at all."""
    scores = {f: json.loads(eval_file.read_text())[f"{f}/varied"]["accuracy"] for f in FAMILIES}
    picked = [f for f, a in scores.items() if low <= a <= high] or [f for f, a in scores.items() if 0 < a < 1]
    return [min(picked, key=scores.get)] if picked else ["mul"]


def evaluate(model_dir: Path, out_file: Path, cfg: SpeedrunConfig, console: Console,
             families: list[str] | None = None) -> None:
    engine, tok = load_chat_engine(model_dir, max_batch=64, dtype=torch.float32)
    specs = [(f, wording) for f in families or FAMILIES for wording in WORDINGS]
    rows = {}
    for (family, wording), (r, _) in zip(specs, evaluate_many(engine, tok, specs, n=cfg.eval_n,
                                                               max_new_tokens=cfg.max_new_tokens)):
        rows[f"{family}/{wording}"] = r.row()
        console.print(f"  {family:10s} {wording:9s} accuracy {r.accuracy:6.1%}  format {r.format_rate:5.0%}  "
                      f"length {r.mean_length:5.0f}")
    plain = [(f, "varied") for f in families or FAMILIES if f in NO_THINKING_FAMILIES]
    for (family, _), (r, _) in zip(plain, evaluate_many(engine, tok, plain, n=cfg.eval_n, thinking=False,
                                                         max_new_tokens=cfg.max_new_tokens)):
        rows[f"{family}/thinking off"] = r.row()
    if CallFormat.probe(tok) is not None:  # (a small context caps the replies: evaluate_tool_use)
        for offered in (True, False):
            r = evaluate_tool_use(engine, tok, n=cfg.eval_n, offered=offered,
                                  max_new_tokens=cfg.max_new_tokens or 384)
            rows[f"calculator/{'offered' if offered else 'not offered'}"] = {"accuracy": r.accuracy, "called": r.called}
    if families is None:  # the chat model: small talk too
        for name, how in SMALL_TALK_ROWS.items():
            rows[f"small talk/{name}"] = evaluate_small_talk(engine, tok, **how).row()
    for key in rows:
        if key.split("/")[1] in EXTRA_ROWS:
            console.print(f"  {key:28s} accuracy {rows[key]['accuracy']:6.1%}")
    atomic_write(out_file, json.dumps(rows, indent=2))


def measure_speed(model_dir: Path, out_file: Path) -> None:
    """Greedy decode tokens/s at batch 1, plain and with MTP speculation, on a task prompt."""
    result = {}
    for name, spec in (("plain", False), ("speculative", True)):
        engine, tok = load_chat_engine(model_dir, max_batch=1, speculative=spec, dtype=torch.float32, max_len=512)
        prompt = tok.render_prompt([{"role": "user", "content": "What is 47 * 86?"}])
        engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))  # warm up
        t = time.perf_counter()
        req = engine.generate([prompt], SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))[0]
        dt = time.perf_counter() - t
        result[name] = {"tokens_per_s": len(req.tokens) / dt, "accepted": req.accepted, "drafted": req.drafted}
        result["cache_bytes_per_token"] = engine.cache.bytes_per_token
    result["speedup"] = result["speculative"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    result["acceptance"] = result["speculative"]["accepted"] / max(1, result["speculative"]["drafted"])
    atomic_write(out_file, json.dumps(result, indent=2))


def write_report(out: Path, cfg: SpeedrunConfig, timings: dict) -> Path:
    """report.md with the stage table, accuracy before/after RL, the student, speed; plus plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def load(name):
        f = out / name
        return json.loads(f.read_text()) if f.exists() else {}

    sft_eval, rl_eval, student = load("eval_sft.json"), load("eval_rl.json"), load("eval_student.json")
    student_base = load("eval_student_base.json")
    speed = load("speed.json")
    teacher = load_model(out / "rl" / "model") if (out / "rl" / "model").exists() else None
    lines = ["# nanoseek speedrun report card", ""]
    total = sum(timings.values())
    cpu = cpu_info()
    machine = load("pretrain/config.json").get("machine") or {"cpu": cpu.model, "cpu_flags": cpu.flags,
                                                              "threads": torch.get_num_threads()}
    flags = ", ".join(f"{name} {'yes' if flag in machine['cpu_flags'] else 'no'}" for flag, name in
                      (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 bf16"), ("avx2", "AVX2")))
    gpu = machine.get("device", machine["cpu"])  # training's device, where it was not the CPU
    on = f"{gpu}, host CPU " if gpu != machine["cpu"] else ""
    lines += [f"Machine: {on}{machine['cpu']} ({flags}), {machine['threads']} CPU threads.", "",
              f"Whole pipeline: **{_minutes(total)}** (budget {_minutes(cfg.budget)}).", "",
              "| stage | wall time | steps | tokens | tokens/s | precision | compile |",
              "|---|---|---|---|---|---|---|"]
    for name, run in (("pretrain", "pretrain"), ("sft", "sft"), ("eval_sft", None), ("rl", "rl"),
                      ("eval_rl", None), ("student_base", "student_base"), ("eval_student_base", None),
                      ("distill", "distill/student"), ("eval_student", None), ("speed", None)):
        if name not in timings:
            continue
        steps = tokens = rate = precision = compiled = ""
        if run and (out / run / "metrics.jsonl").exists():
            rec = [r for r in read_metrics(out / run / "metrics.jsonl") if "lr" in r]
            if rec:
                steps, tokens = str(rec[-1]["step"]), f"{rec[-1]['tokens']:,}"
                rate = f"{rec[-1]['tokens'] / max(rec[-1]['time'], 1e-9):,.0f}"  # over training time alone
        if run and (out / run / "config.json").exists():
            config = load(f"{run}/config.json")
            used = config.get("machine", {})  # what the stage's latest start trained with (loop.Trainer)
            precision = used.get("precision", "")
            compiled = "rollouts" if config.get("rollouts_compiled") else "on" if used.get("compile") else "off"
        lines.append(f"| {name} | {_minutes(timings[name])} | {steps} | {tokens} | {rate} | {precision} "
                     f"| {compiled} |")
    if teacher is not None:
        lines += ["", f"Chat model: {teacher.num_params() / 1e6:.2f}M parameters ({teacher.num_params(active=True) / 1e6:.2f}M "
                      f"active per token) + {len(teacher.mtp_layers)} MTP layer."]
    if (out / "student_base" / "model").exists():
        small = load_model(out / "student_base" / "model")
        lines += [f"Student ({cfg.student}, dense): {small.num_params() / 1e6:.2f}M parameters, pretrained on the "
                  "same data, then fine-tuned on the chat model's verified reasoning traces."]
    rl_config = out / "rl" / "config.json"
    if rl_config.exists():
        lines += [f"GRPO trained on: {', '.join(json.loads(rl_config.read_text())['grpo']['tasks'])}."]
    lines += ["", f"Seed: {cfg.seed}.", "",
              f"## Held-out accuracy (greedy, {cfg.eval_n} held-out problems per family; canonical wording / "
              "trained templates / held-out templates)", "",
              "| family | after SFT | after RL | student, pretrained only | student, distilled "
              "| mean response length after RL |", "|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        def cell(d, fam=fam):
            got = [d.get(f"{fam}/{w}") for w in WORDINGS]
            return " / ".join(f"{g['accuracy']:.0%}" for g in got) if all(got) else "-"
        length = rl_eval.get(f"{fam}/canonical", {}).get("mean_length")
        lines.append(f"| {fam} | {cell(sft_eval)} | {cell(rl_eval)} | {cell(student_base)} | {cell(student)} | "
                     f"{'' if length is None else f'{length:.0f}'} |")
    if rl_eval:
        lines += ["", "## Targets (after RL; 95% Wilson intervals)", "",
                  "| family | trained templates | held-out templates | target | gap <= 5 points | met |",
                  "|---|---|---|---|---|---|"]
        for fam, target in TARGETS.items():
            trained, held = rl_eval.get(f"{fam}/varied"), rl_eval.get(f"{fam}/held-out")
            if not (trained and held):
                continue
            a, b = trained["accuracy"], held["accuracy"]
            ok_gap = a - b <= TEMPLATE_GAP + 1e-9
            interval = lambda r: "{:.0%} [{:.0%}, {:.0%}]".format(r["accuracy"], *wilson(r["accuracy"], r["n"]))  # noqa: E731
            lines.append(f"| {fam} | {interval(trained)} | {interval(held)} | >= {target:.0%} | "
                         f"{'yes' if ok_gap else 'no'} ({(a - b) * 100:+.1f}) | "
                         f"{'yes' if min(a, b) >= target and ok_gap else 'no'} |")
    extra = [k for k in rl_eval if k.split("/")[1] in EXTRA_ROWS]
    if extra:
        lines += ["", "## Thinking off, the calculator tool, small talk (held-out, greedy unless said)", "",
                  "| problems | after SFT | after RL |", "|---|---|---|"]
        def extra_cell(d: dict, key: str) -> str:
            if key not in d:
                return "-"
            called = f" ({d[key]['called']:.0%} called)" if "called" in d[key] else ""
            return f"{d[key]['accuracy']:.0%}{called}"

        lines += [f"| {k} | {extra_cell(sft_eval, k)} | {extra_cell(rl_eval, k)} |" for k in extra]
    skipped = out / "distill" / "skipped.txt"
    if skipped.exists():
        lines += ["", f"No distilled student: {skipped.read_text()}"]
    if speed:
        lines += ["", "## Inference", "",
                  f"- decode at batch 1: {speed['plain']['tokens_per_s']:.0f} tokens/s plain, "
                  f"{speed['speculative']['tokens_per_s']:.0f} tokens/s with MTP speculation "
                  f"({speed['speedup']:.2f}x; drafts accepted {speed['acceptance']:.0%})",
                  f"- KV cache: {speed['cache_bytes_per_token']} bytes per token (latent only, all layers)"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, (run, key, title) in zip(axes, [("pretrain", "loss", "pretraining loss"), ("sft", "loss", "SFT loss"),
                                            ("rl", "reward", "GRPO reward")]):
        f = out / run / "metrics.jsonl"
        if f.exists():
            rec = [r for r in read_metrics(f) if key in r]
            ax.plot([r["step"] for r in rec], [r[key] for r in rec])
            if key == "reward":
                ax.plot([r["step"] for r in rec], [r["accuracy"] for r in rec], label="accuracy")
                ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
    lines += ["", "![curves](curves.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def ship(out: Path, dest: Path) -> None:
    """Copy the chat model (bf16 weights, tokenizer) and the report card into the package."""
    model = load_model(out / "rl" / "model", dtype=torch.bfloat16)
    with staged_dir(dest) as tmp:
        save_model(model, tmp)
        DeepSeekTokenizer.load(out / "rl" / "model").save(tmp)
        for f in ("report.md", "curves.png"):
            if (out / f).exists():
                shutil.copy2(out / f, tmp / f)
        if (dest / "examples.json").exists():  # the web app's examples: the same tasks, so they still fit
            shutil.copy2(dest / "examples.json", tmp / "examples.json")
