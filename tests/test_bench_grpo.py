"""bench/grpo_throughput.py: TRL trains on the problems nanoseek's Rollouts draws, and the bench runs end to end."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.train.grpo import Rollouts, prompt_ids
from nanoseek.train.settings import GRPOConfig

BENCH = Path(__file__).parent.parent / "bench" / "grpo_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("grpo_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Drawn(Exception):
    pass


def test_rollout_problems_are_the_ones_rollouts_draws():
    bench = load_bench()
    tok = bench.DeepSeekTokenizer.load(bench.MODEL)
    model = bench.nanoseek.load_model(bench.MODEL, dtype=torch.float32)
    for tasks in (["countdown"], ["add", "mul"]):
        cfg = GRPOConfig(tasks=tasks, prompts_per_step=5, group_size=2, seed=3, no_thinking_share=0.0)  # as the bench
        rollouts = Rollouts(model, tok, cfg)
        seen = []

        def capture(prompts, params, seen=seen, group=cfg.group_size):
            seen.extend(prompts[::group])  # one per problem
            raise Drawn

        rollouts.engine.generate = capture
        for _ in range(2):  # two steps' draws
            with pytest.raises(Drawn):
                next(rollouts)
        assert seen == [prompt_ids(tok, p.question, cfg.mode) for p in bench.rollout_problems(cfg, 10)]


@pytest.mark.slow
def test_bench_runs_end_to_end():
    out = subprocess.run([sys.executable, str(BENCH), "--task", "add", "--prompts", "1", "--group", "2",
                          "--rounds", "1", "--warmup", "0", "--eager"], check=False, capture_output=True, text=True,
                         timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.strip().startswith("TRL: step") for line in lines), out.stdout
    assert any(line.strip().startswith("nanoseek: step") for line in lines), out.stdout
    assert "ratio nanoseek / TRL samples/s" in out.stdout


def test_bad_flags_exit_2():
    out = subprocess.run([sys.executable, str(BENCH), "--prompts", "0"], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "error: --prompts must be >= 1" in out.stderr
