"""metrics.jsonl (one JSON object per logged step) and the PNG of its curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..files import atomic_write

# panels of curves.png: title -> which metric names it draws (those present in the log)
PANELS = {
    "loss": lambda k: k == "loss" or (k.startswith("eval_") and k.endswith("_loss") and "mtp" not in k
                                      and "aux" not in k),
    "MTP loss": lambda k: k.endswith("mtp_loss"),
    "reward": lambda k: k in ("reward", "accuracy", "format_rate"),
    "response length": lambda k: k == "response_length",
    "KL to reference": lambda k: k == "kl",
    "learning rate": lambda k: k == "lr",
    "gradient norm": lambda k: k == "grad_norm",
    "tokens/s": lambda k: k == "tokens_per_s",
    "expert load max/mean": lambda k: k == "expert_imbalance",
}


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, step: int, elapsed: float, tokens: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(elapsed, 3), "tokens": tokens}
        record.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Drop records after `step` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in read_metrics(self.path) if line["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is ignored, and so is a line that is not
    a logged step's (no integer "step": written there by something else)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
    return out


def plot_metrics(run_dir: str | os.PathLike, out_name: str = "curves.png") -> Path | None:
    """Draw every panel that has data into run_dir/curves.png; returns the path (None if no data)."""
    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    if not log.exists():
        return None
    records = read_metrics(log)
    # (a metric at 0 throughout is drawn: an RL run whose reward never left 0 had no reward panel at all)
    present = sorted({k for r in records for k, v in r.items()
                      if v is not None and k not in ("step", "time", "tokens")})
    panels = {title: [k for k in present if wanted(k)] for title, wanted in PANELS.items()}
    panels = {t: k for t, k in panels.items() if k}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels.items()):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            ax.plot(*zip(*pts), label=k, marker="o" if k.startswith("eval_") else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title in ("loss", "MTP loss") and all(v > 0 for k in keys for r in records if (v := r.get(k)) is not None):
            ax.set_yscale("log")  # (not where a loss reached 0: no log scale for it)
        if len(keys) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / out_name
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return out
