"""Training precision and compiling per machine (machine.py, the Trainer's use of them)."""

import json
import shutil

import pytest
import torch

from nanoseek.model import build_model, get_preset
from nanoseek.model.config import ConfigError
from nanoseek import machine
from nanoseek.train import LMObjective, TrainConfig, Trainer, loop
from nanoseek.machine import BF16_MARGIN, choose_precision, measure_rates
from nanoseek.train.metrics import read_metrics

CPU = torch.device("cpu")


def rates(fp32, bf16):
    return lambda: {"fp32": fp32, "bf16": bf16}


def never():
    raise AssertionError("measured, but should not have")


@pytest.mark.parametrize("bf16, picked", [(30.0, "bf16"), (10.0 * BF16_MARGIN + 0.01, "bf16"),
                                          (10.0 * BF16_MARGIN - 0.01, "fp32"), (0.4, "fp32")])
def test_auto_picks_bf16_only_when_it_measured_faster_by_the_margin(tmp_path, bf16, picked):
    p = choose_precision("auto", CPU, measure=rates(10.0, bf16), cache_file=tmp_path / "machine.json")
    assert p.name == picked and p.rates == {"fp32": 10.0, "bf16": bf16}
    assert f"{bf16 / 10:.2f}x fp32" in p.reason and str(tmp_path / "machine.json") in p.reason


def test_a_set_precision_and_cuda_need_no_measurement(tmp_path, monkeypatch):
    for name in ("fp32", "bf16"):
        assert choose_precision(name, CPU, measure=never, cache_file=tmp_path / "m.json").name == name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H200")
    for supported, picked in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        p = choose_precision("auto", torch.device("cuda"), measure=never, cache_file=tmp_path / "m.json")
        assert p.name == picked and "H200" in p.reason
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        choose_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16")


def test_the_measurement_is_cached_per_machine(tmp_path, monkeypatch):
    cache = tmp_path / "nanoseek" / "machine.json"
    first = choose_precision("auto", CPU, measure=rates(10.0, 30.0), cache_file=cache)
    stored = json.loads(cache.read_text())
    assert list(stored) == [machine.machine_key()] and stored[machine.machine_key()]["rates"] == first.rates
    assert choose_precision("auto", CPU, measure=never, cache_file=cache) == first  # reused, not measured
    monkeypatch.setattr(machine, "machine_key", lambda: "another CPU | avx2 | torch x | 1 threads")
    assert choose_precision("auto", CPU, measure=rates(10.0, 0.2), cache_file=cache).name == "fp32"
    assert len(json.loads(cache.read_text())) == 2  # both machines' results kept (a shared home folder)
    for corrupt in ("{not json", "[1, 2]", '{"another CPU | avx2 | torch x | 1 threads": {"rates": {"fp32": "x"}}}'):
        cache.write_text(corrupt)
        assert choose_precision("auto", CPU, measure=rates(10.0, 30.0), cache_file=cache).name == "bf16"
        assert json.loads(cache.read_text())["another CPU | avx2 | torch x | 1 threads"]["rates"]["bf16"] == 30.0


def test_the_real_measurement_is_quick_and_names_the_machine():
    import time

    t = time.perf_counter()
    measured = measure_rates()
    assert time.perf_counter() - t < 3 and set(measured) == {"fp32", "bf16"} and min(measured.values()) > 0
    key = machine.machine_key()
    assert machine.cpu_info().model in key and f"torch {torch.__version__}" in key
    assert f"{torch.get_num_threads()} threads" in key


class FixedBatches:
    """A data source for the Trainer: the same stream of token batches for every run (a repeating
    pattern plus noise, so the loss can go down), with a resumable cursor."""

    def __init__(self, vocab: int, batch: int = 4, seq: int = 32):
        self.vocab, self.batch, self.seq, self.i = vocab, batch, seq, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        start = torch.randint(0, 16, (self.batch, 1), generator=g)
        ids = (start + torch.arange(self.seq + 1)) % 16 * 7 % self.vocab  # [batch, seq + 1], predictable
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def train_tiny(run, steps, **settings):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    cfg = TrainConfig(max_steps=steps, warmup_steps=2, eval_every=0, checkpoint_every=steps,
                      **{"lr": 3e-3, "compile": False, **settings})
    trainer = Trainer(run, model, FixedBatches(model.config.vocab_size), LMObjective(0.3), cfg)
    trainer.fit()
    return trainer, [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_bf16_losses_track_fp32(tmp_path):
    """Same seed, same batches: bf16 autocast's loss curve stays near fp32's, and both go down."""
    _, fp32 = train_tiny(tmp_path / "fp32", 30, precision="fp32")
    _, bf16 = train_tiny(tmp_path / "bf16", 30, precision="bf16")
    assert fp32 != bf16  # the autocast did something
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.05 * a, (fp32, bf16)
    for losses in (fp32, bf16):
        assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_the_trainer_says_what_it_picked_records_it_and_resumes_under_another_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "measure_rates", never)  # the choice comes from the cache written here
    cache = machine.cache_home() / "machine.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({machine.machine_key(): {"rates": {"fp32": 40.0, "bf16": 1.0}}}))
    from rich.console import Console

    console = Console(record=True, width=300)
    monkeypatch.setattr(loop, "Console", lambda: console)
    trainer, _ = train_tiny(tmp_path / "run", 2)
    out = console.export_text()
    assert "precision: fp32 (bf16 autocast measured 0.03x fp32 (1.0 vs 40.0 GFLOP/s)" in out
    assert "compile: off (as set)" in out
    used = json.loads((tmp_path / "run" / "config.json").read_text())["machine"]
    assert used["precision"] == "fp32" and used["gflops"] == {"fp32": 40.0, "bf16": 1.0} and used["compile"] is False
    # resumed with another precision (it changes speed, not the fp32 weights and optimizer): not a new run
    trainer, _ = train_tiny(tmp_path / "run", 3, precision="bf16")
    assert trainer.resumed_from is not None and trainer.step == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["machine"]["precision"] == "bf16"
    with pytest.raises(ConfigError, match="train.lr"):
        train_tiny(tmp_path / "run", 4, lr=1e-3)


def test_a_failing_compile_falls_back_to_eager_with_the_same_step(tmp_path, monkeypatch):
    """Compiling that fails at the first step (no working compiler, say): one warning, the step is
    redone eagerly from zeroed gradients, and the run matches an eager one."""
    def broken_compile(fn):
        def call(*args, **kwargs):
            raise torch._inductor.exc.CppCompileError(["c++", "graph.cpp"], "c++: fatal error")
        return call

    _, eager = train_tiny(tmp_path / "eager", 3)
    monkeypatch.setattr(loop.torch, "compile", broken_compile)
    trainer, fallen_back = train_tiny(tmp_path / "broken", 3, compile=True)
    assert not trainer.compiled and fallen_back == pytest.approx(eager, rel=1e-6)
    assert all("forward" not in part.__dict__ for part in loop.compiled_regions(trainer.model))


def test_compile_by_default_on_cuda_and_for_bf16_on_a_cpu(monkeypatch):
    assert machine.decide_compile(False, CPU) == (False, "as set")
    assert machine.decide_compile(True, CPU) == (True, "as set")
    assert machine.decide_compile(False, CPU, "bf16") == (False, "as set")
    on, why = machine.decide_compile(None, CPU)
    assert not on and "fp32 on a CPU" in why
    on, why = machine.decide_compile(None, CPU, "bf16")
    assert on == (machine.compile_problem(CPU) is None) and ("bf16" in why or "compiler" in why)
    cuda = torch.device("cuda")
    monkeypatch.setattr(machine.importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert machine.decide_compile(None, cuda) == (True, "triton is present")
    monkeypatch.setattr(machine.importlib.util, "find_spec", lambda name: None)
    assert machine.decide_compile(None, cuda) == (False, "triton is not installed")
    monkeypatch.setattr(machine, "compile_problem", lambda device: "no C++ compiler for inductor (RuntimeError)")
    assert machine.decide_compile(None, CPU, "bf16") == (False, "no C++ compiler for inductor (RuntimeError)")


def test_serve_compiles_decoding_for_small_models_and_dense_ones_on_a_cpu(monkeypatch, tmp_path):
    import nanoseek
    from conftest import tiny_gqa_config
    from nanoseek import kernels
    from nanoseek.model import build_model, get_preset

    moe, dense = build_model(get_preset("tiny")), build_model(tiny_gqa_config())
    nanoseek.save_model(build_model(get_preset("tiny", hidden_size=128, moe_intermediate_size=64)), tmp_path)
    int4_moe = nanoseek.load_model(tmp_path, quantize="int4", dtype=torch.float32)
    assert machine.decide_decode_compile(False, moe) == (False, "as set")
    assert machine.decide_decode_compile(True, dense) == (True, "as set")
    on, why = machine.decide_decode_compile(None, moe)
    assert on == (machine.compile_problem(CPU) is None) and ("small model" in why or "compiler" in why)
    monkeypatch.setattr(machine, "DECODE_COMPILE_MAX_BYTES", 1000)  # both are large now
    on, why = machine.decide_decode_compile(None, moe)  # a large MoE's experts run eagerly either way
    assert not on and "experts" in why
    monkeypatch.setattr(machine, "compile_problem", lambda device: None)
    assert machine.decide_decode_compile(None, dense)[0]  # products called from one graph, the rest fused
    on, why = machine.decide_decode_compile(None, int4_moe)  # every MoE layer one operator (int4 experts)
    assert (on, "one operator" in why) == ((True, True) if kernels.int4_experts_available() else (False, False))
    monkeypatch.setattr(machine, "compile_problem", lambda device: "no C++ compiler for inductor (RuntimeError)")
    assert machine.decide_decode_compile(None, dense) == (False, "no C++ compiler for inductor (RuntimeError)")


def test_rollouts_compile_wherever_a_compiler_is_unless_the_budget_is_short(monkeypatch):
    assert machine.decide_rollout_compile(False, CPU) == (False, "as set")
    assert machine.decide_rollout_compile(True, CPU) == (True, "as set")
    assert machine.decide_rollout_compile(True, CPU, time_budget=60) == (True, "as set")
    monkeypatch.setattr(machine, "compile_problem", lambda device: None)
    assert machine.decide_rollout_compile(None, CPU)[0]
    assert machine.decide_rollout_compile(None, CPU, time_budget=machine.ROLLOUT_COMPILE_MIN_BUDGET)[0]
    on, why = machine.decide_rollout_compile(None, CPU, time_budget=256)
    assert not on and "4.3-minute budget" in why
    monkeypatch.setattr(machine, "compile_problem", lambda device: "triton is not installed")
    assert machine.decide_rollout_compile(None, torch.device("cuda")) == (False, "triton is not installed")


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler here")
def test_compile_problem_names_a_missing_compiler(monkeypatch):
    assert machine.compile_problem(CPU) is None

    def no_compiler():
        raise RuntimeError("no working C++ compiler found")

    import torch._inductor.cpp_builder

    monkeypatch.setattr(torch._inductor.cpp_builder, "get_cpp_compiler", no_compiler)
    assert "no C++ compiler" in machine.compile_problem(CPU)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    _, eager = train_tiny(tmp_path / "eager", 3)
    trainer, compiled = train_tiny(tmp_path / "compiled", 3, compile=True)
    assert trainer.compiled and compiled == pytest.approx(eager, rel=1e-3)
