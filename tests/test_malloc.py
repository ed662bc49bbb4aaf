"""glibc's malloc keeps the memory a step frees (nanoseek/malloc.py): measured in fresh processes."""

import os
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
from nanoseek.malloc import keep_freed_memory
from nanoseek.model import get_preset
from nanoseek.model.transformer import build_model
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
model = build_model(get_preset("cpu-tiny")).train()
x = torch.randint(0, model.config.vocab_size, (8, 129))
def step():
    model(x[:, :-1], labels=x[:, 1:], logits=False).loss.backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def _faults_per_step(mode: str, env: dict | None = None) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_training_steps_reuse_freed_memory(monkeypatch):
    """cpu-tiny training steps (8x128, fp32): with glibc's defaults each step maps and faults in
    its freed activations again (2,100-6,100 page faults a step here); kept, 220-510."""
    applied, kept = _faults_per_step("keep")
    _, default = _faults_per_step("default")
    assert applied
    assert kept * 3 < default, (kept, default)
    monkeypatch.setenv("NANOSEEK_MALLOC", "default")
    assert _faults_per_step("keep", dict(os.environ))[0] is False  # the opt-out
