import os

import pytest
import torch

from nanoseek import kernels
from nanoseek.model import ModelConfig, get_preset


def tiny_gqa_config(**overrides) -> ModelConfig:
    """A tiny R1-Distill-style Qwen2 model: grouped-query attention (4 heads over 2 kv heads), q/k/v biases."""
    return ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "max_position_embeddings": 512, "rope_theta": 10000.0, **overrides})


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`) the CPU's cores are shared out between the workers."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True, scope="session")
def _own_cache_folder(tmp_path_factory):
    """The precision measurement's cache and inductor's graphs, the tests' own and their subprocesses',
    in a folder of the test session's: pytest keeps the last three sessions' folders, so nothing piles up
    run after run (inductor's default folder in /tmp is never cleaned)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "nanoseek" / "inductor"))
        # nanoseek's kernels are built here, once, before any test: else the first model to run a product in a
        # session builds them (seconds), inside whichever test that is (a server's request timed out on it)
        kernels.library()
        yield


@pytest.fixture(autouse=True)
def _train_eagerly_unless_asked(monkeypatch):
    """Training in bf16, GRPO's rollouts, chat and serve compile by default (half a minute of compiling
    per run); tests that do not ask for it run eagerly, in whichever precision this machine picks."""
    from nanoseek import loading
    from nanoseek.train import grpo, loop

    decide = loop.decide_compile
    monkeypatch.setattr(loop, "decide_compile", lambda setting, device, precision="fp32": decide(setting, device))
    eager = lambda setting, *_, **__: (bool(setting), "as set" if setting is not None else "tests run eagerly")  # noqa: E731
    monkeypatch.setattr(grpo, "decide_rollout_compile", eager)
    monkeypatch.setattr(loading, "decide_decode_compile", eager)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return get_preset("tiny")


def operator_calls(run) -> dict[str, int]:
    """How many times run() called each of nanoseek's operators (eagerly or from a compiled graph)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("nanoseek::")}


def randomize_(model: torch.nn.Module, std: float = 0.1) -> None:
    """Fill every parameter and float buffer with noise, so norms, biases and routing all matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + std * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
