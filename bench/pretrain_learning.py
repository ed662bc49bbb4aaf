"""What cpu-tiny pretraining learns in a fixed time, with the router-bias update on and off.

Runs `nanoseek pretrain` twice on the embedded default data (task problems + standard-library
code with FIM, MTP on), identical except for the aux-loss-free bias update speed gamma (the
second run takes as many steps as the first took in its time budget), then
prints held-out loss, MTP loss and expert-load imbalance (max/mean tokens per expert, worst
layer) for both and draws bias_on_vs_off.png.

    python bench/pretrain_learning.py --minutes 10 --out runs/learning
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from nanoseek.train import DataConfig, TrainConfig
from nanoseek.train.pretrain import pretrain
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
        **{f"{k} (step {evals[0]['step']})": evals[0][k] for k in sorted(evals[0]) if k.startswith("eval_")},
        **{f"{k} (end)": evals[-1][k] for k in sorted(evals[-1]) if k.startswith("eval_")},
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

    runs = {"bias_on": args.gamma, "bias_off": 0.0}
    # the 'on' run trains for the time budget; the 'off' run for the same number of steps (same
    # tokens), so the comparison does not depend on the machine's speed during each run
    pretrain(args.out / "bias_on", data=DataConfig(),
             train=TrainConfig(max_steps=0, time_budget=args.minutes * 60, bias_gamma=args.gamma, eval_every=50,
                               checkpoint_every=500, compile=args.compile))
    steps = read_metrics(args.out / "bias_on" / "metrics.jsonl")[-1]["step"]
    pretrain(args.out / "bias_off", data=DataConfig(tokenizer=str(args.out / "bias_on" / "tokenizer")),
             train=TrainConfig(max_steps=steps, bias_gamma=0.0, eval_every=50, checkpoint_every=500,
                               compile=args.compile))

    results = {name: summary(args.out / name) for name in runs}
    keys = list(next(iter(results.values())))
    print(f"{'':36s}" + "".join(f"{n:>12s}" for n in results))
    for k in keys:
        print(f"{k:36s}" + "".join(f"{results[n].get(k, float('nan')):12.4g}" for n in results))

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
