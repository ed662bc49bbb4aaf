"""What cpu-tiny pretraining learns in a fixed time, with the router-bias update on and off.

Runs `nanoseek pretrain` twice on the embedded default data (task problems + standard-library
code with FIM, MTP on), identical except for the aux-loss-free bias update speed gamma, then
prints held-out loss, MTP loss and expert-load imbalance (max/mean tokens per expert, worst
layer) for both and draws bias_on_vs_off.png.

    python bench/pretrain_learning.py --minutes 10 --out runs/learning
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from nanoseek.train import DataConfig, TrainConfig, pretrain
from nanoseek.train.metrics import read_metrics


def summary(run: Path) -> dict:
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    tail = train[-max(1, len(train) // 10):]  # the last 10% of steps
    head = train[: max(1, len(train) // 10)]
    return {
        "steps": train[-1]["step"], "tokens": train[-1]["tokens"], "minutes": train[-1]["time"] / 60,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "first_eval_loss": evals[0]["eval_loss"], "eval_loss": evals[-1]["eval_loss"],
        "first_eval_mtp_loss": evals[0]["eval_mtp_loss"], "eval_mtp_loss": evals[-1]["eval_mtp_loss"],
        "imbalance_first10%": statistics.mean(r["expert_imbalance"] for r in head),
        "imbalance_last10%": statistics.mean(r["expert_imbalance"] for r in tail),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training time per run")
    ap.add_argument("--out", type=Path, default=Path("runs/learning"))
    ap.add_argument("--gamma", type=float, default=0.001, help="bias update speed of the 'on' run")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    data = DataConfig()
    runs = {"bias_on": args.gamma, "bias_off": 0.0}
    for name, gamma in runs.items():
        train = TrainConfig(max_steps=0, time_budget=args.minutes * 60, bias_gamma=gamma, eval_every=100,
                            checkpoint_every=500, compile=args.compile)
        if name == "bias_off" and (args.out / "bias_on" / "tokenizer").exists():
            data = DataConfig(tokenizer=str(args.out / "bias_on" / "tokenizer"))
        pretrain(args.out / name, data=data, train=train)

    results = {name: summary(args.out / name) for name in runs}
    keys = list(next(iter(results.values())))
    print(f"{'':24s}" + "".join(f"{n:>14s}" for n in results))
    for k in keys:
        print(f"{k:24s}" + "".join(f"{results[n][k]:14.4g}" for n in results))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for name in runs:
        records = read_metrics(args.out / name / "metrics.jsonl")
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        axes[0].plot([r["step"] for r in train], [r["expert_imbalance"] for r in train], label=name, alpha=0.8)
        axes[1].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label=name)
        axes[2].plot([r["step"] for r in evals], [r["eval_mtp_loss"] for r in evals], marker="o", label=name)
    for ax, title in zip(axes, ["expert load max/mean (worst layer)", "held-out loss", "held-out MTP loss"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "bias_on_vs_off.png", dpi=90)
    print(f"plot: {args.out / 'bias_on_vs_off.png'}")


if __name__ == "__main__":
    main()
