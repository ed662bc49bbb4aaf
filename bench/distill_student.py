"""Distillation, measured: a smaller dense student trained on the chat model's verified traces,
next to the teacher and next to the same student trained without them.

One student is pretrained on the speedrun's own token shards (the same data the teacher saw),
then fine-tuned two ways for the same time: on the teacher's verified reasoning traces
(`nanoseek distill`: rejection-sampled, SFT), and on the same number of the generator's own
worked solutions (no teacher). All four models are evaluated greedily on the same held-out
problems (never trained on in any wording), canonical and random wordings.

    python bench/distill_student.py --speedrun runs/speedrun --pretrain 6m --finetune 3m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from nanoseek.cli import parse_duration
from nanoseek.data.builtin import task_conversations
from nanoseek.speedrun import SpeedrunConfig, evaluate, share_data
from nanoseek.train.distill import distill
from nanoseek.train.loop import TrainConfig
from nanoseek.train.pretrain import DataConfig, pretrain
from nanoseek.train.sft import SFTConfig, sft


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speedrun", type=Path, default=Path("runs/speedrun"), help="a finished speedrun folder")
    ap.add_argument("--out", type=Path, default=Path("runs/distill_bench"))
    ap.add_argument("--student", default="cpu-dense-small")
    ap.add_argument("--pretrain", default="6m", help="the student's pretraining time")
    ap.add_argument("--finetune", default="3m", help="time of each fine-tuning arm")
    ap.add_argument("--traces", type=int, default=3000, help="verified teacher traces to collect")
    ap.add_argument("--tasks", default="add,sub,mul")
    ap.add_argument("--n", type=int, default=100, help="held-out problems per family")
    args = ap.parse_args()

    console, out, run = Console(), args.out, args.speedrun
    families = args.tasks.split(",")
    teacher = run / "rl" / "model"
    base = SpeedrunConfig()
    share_data(run / "pretrain", out / "base")
    pretrain(out / "base", preset=args.student,
             data=DataConfig(task_documents=base.task_documents, code_chars=base.code_chars, seq_len=base.seq_len),
             train=TrainConfig(max_steps=0, time_budget=parse_duration(args.pretrain), lr=3e-3, warmup_steps=30,
                               schedule="wsd", decay_fraction=0.3, eval_every=200, checkpoint_every=200),
             console=console)

    def finetune() -> TrainConfig:
        return TrainConfig(max_steps=0, time_budget=parse_duration(args.finetune), lr=2e-3, warmup_steps=20,
                           schedule="cosine", eval_every=100, checkpoint_every=100)

    stats = distill(str(teacher), str(out / "base" / "model"), out / "distilled", families, args.traces,
                    sft_config=SFTConfig(seq_len=base.seq_len), train=finetune(), console=console)
    verified = stats.get("verified") or sum(1 for _ in open(out / "distilled" / "sft.jsonl"))
    gold = out / "gold.jsonl"  # the generator's worked solutions: as many, of the same families, as the traces
    if not gold.exists():
        with open(gold, "w") as f:
            for messages in task_conversations(verified, seed=7, mix={f: 1.0 for f in families}):
                f.write(json.dumps({"messages": messages}) + "\n")
    sft(out / "base" / "model", out / "no_teacher", SFTConfig(data=str(gold), seq_len=base.seq_len), finetune(),
        console=console)

    cfg = SpeedrunConfig(eval_n=args.n)
    rows = {}
    for name, model in (("teacher (chat model)", teacher), ("student, pretrained only", out / "base" / "model"),
                        ("student + teacher traces", out / "distilled" / "student" / "model"),
                        ("student + worked solutions, no teacher", out / "no_teacher" / "model")):
        f = out / f"eval_{model.parent.name}.json"
        if not f.exists():
            evaluate(model, f, cfg, console, families)
        rows[name] = json.loads(f.read_text())
    lines = ["| model | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for name, r in rows.items():
        cells = [f"{r[f'{fam}/canonical']['accuracy']:.0%} / {r[f'{fam}/varied']['accuracy']:.0%}" for fam in families]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    console.print(f"\n{verified} verified traces; held-out accuracy, greedy, canonical / random wordings:\n{table}")


if __name__ == "__main__":
    main()
