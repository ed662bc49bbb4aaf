"""What this machine trains fastest with: the precision (fp32 or bf16 autocast) and whether to compile.

No fixed choice is right everywhere. bf16 autocast is ~3.4x faster than fp32 for a CPU matmul
with AMX (recent Intel), ~2x with AVX-512 bf16 (AMD Zen4), and 20-100x *slower* on a CPU with
AVX2 only, where bf16 matmuls have no fast kernel (an AMD EPYC Zen3: 1.5 against 34 GFLOP/s on one
thread, measured here). So
`choose_precision` times a training-like forward+backward (a small MLP, casts included) in both
precisions, well under a second, and picks bf16 only when it wins by BF16_MARGIN. On CUDA, bf16
is taken wherever the device supports it. The result is cached per machine in
$XDG_CACHE_HOME/nanoseek/machine.json, keyed by the CPU model, its bf16-relevant flags, torch's
version and the thread count (`machine_key`), with the measured rates, so later runs pay nothing
(deleting the file measures again).

Compiling is on by default where it pays: on CUDA (with triton), and for training in bf16 on a CPU,
where the compiled layers fuse autocast's casts with the elementwise work around them: 1.06-1.17x a
step on a 2-core Xeon with AMX (V3-tiny and cpu-tiny shapes, interleaved with the eager step), after a
first step of 30 s (5 s once the disk cache holds the graphs). Training in fp32 on a CPU it stays off
unless asked for (`--compile`): measured on a 2-core AMD EPYC (Zen3), a compiled fp32 step was
0.9-1.1x the eager one. GRPO's rollouts decode through compiled steps wherever a compiler is, unless
the run's time budget is under 15 minutes (`decide_rollout_compile`; a cold compile took 227 s): at 64 rows a compiled decode step of the shipped model took 8 ms against
13 ms eager, and a GRPO step of 64 countdown samples took 9.2 s, 3.5x TRL's (2-core Xeon with AMX).
Chat and serve decode through compiled steps by default for small models, dense ones on a CPU and int4 MoE ones on a
CPU (`decide_decode_compile`).
`compile_problem` says why compiling cannot work (no C++ compiler, no triton). `use_disk_cache` points inductor's caches (FX graphs,
AOTAutograd) at $XDG_CACHE_HOME/nanoseek/inductor, so a second run reuses the first's graphs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch._dynamo.exc
import torch._functorch.config
import torch._inductor.config
import torch._inductor.exc
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from .files import atomic_write, read_json_object
from .kernels import cache_home, cpu_model_and_flags
from .quant import weight_bytes

BF16_MARGIN = 1.15  # bf16 must be this much faster than fp32 to be picked
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # what decides a CPU's bf16 speed
DECODE_COMPILE_MAX_BYTES = 256 * 2**20  # compiled decoding by default up to this much weight (decide_decode_compile)
# compiled rollouts by default only for GRPO runs without a time budget or with at least this much: a cold
# compile of the rollout graphs took 227 s of a 256 s speedrun stage on the AMX Xeon (5 updates)
ROLLOUT_COMPILE_MIN_BUDGET = 15 * 60
PROBE_ROWS, PROBE_HIDDEN, PROBE_INNER = 512, 256, 768  # x [512, 256] @ [256, 768] @ [768, 256]


@dataclass
class CPU:
    model: str
    flags: list[str]  # those of CPU_FLAGS it has

    def describe(self) -> str:
        names = {"amx_bf16": "AMX", "avx512_bf16": "AVX-512 bf16", "avx512f": "AVX-512", "avx2": "AVX2"}
        return f"{self.model} ({', '.join(names[f] for f in self.flags) or 'no AVX2'})"


def cpu_info() -> CPU:
    """The CPU's model name and bf16-relevant flags."""
    model, flags = cpu_model_and_flags()
    return CPU(model, [f for f in CPU_FLAGS if f in flags])


def machine_key() -> str:
    """What a precision measurement holds for: the CPU, its flags, torch's version, the threads."""
    cpu = cpu_info()
    return f"{cpu.model} | {' '.join(cpu.flags)} | torch {torch.__version__} | {torch.get_num_threads()} threads"


# ---- precision ----
@dataclass
class Precision:
    name: str  # "fp32" | "bf16"
    reason: str  # why, for the one line the trainer prints
    rates: dict[str, float] = field(default_factory=dict)  # measured GFLOP/s: {"fp32": ..., "bf16": ...}

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.name == "bf16")


def _probe_step(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bf16: bool) -> None:
    """A training step of a small MLP on the CPU: forward (under autocast, so its casts count), loss, backward."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = F.silu(x @ w1) @ w2  # [rows, hidden]
    y.float().square().mean().backward()


def measure_rates(budget: float = 0.15) -> dict[str, float]:
    """GFLOP/s of the probe step on the CPU in fp32 and under bf16 autocast: each is run once to warm
    up, then repeated for about `budget` seconds (a warm-up that alone took longer is the
    measurement, so a slow precision costs one step)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, PROBE_HIDDEN, generator=gen)
    w1 = (torch.randn(PROBE_HIDDEN, PROBE_INNER, generator=gen) / 16).requires_grad_()
    w2 = (torch.randn(PROBE_INNER, PROBE_HIDDEN, generator=gen) / 28).requires_grad_()
    flops = 6 * PROBE_ROWS * PROBE_HIDDEN * PROBE_INNER  # two matmuls, forward (2 per MAC) and backward (twice that)
    rates = {}
    for name in ("fp32", "bf16"):
        times = []
        while not times or (sum(times) < budget and len(times) < 20):
            t = time.perf_counter()
            _probe_step(x, w1, w2, bf16=name == "bf16")
            times.append(time.perf_counter() - t)
        per_step = min(times[1:]) if len(times) > 1 else times[0]
        rates[name] = flops / per_step / 1e9
    return rates


def choose_precision(setting: str, device: torch.device,
                     measure: Callable[[], dict[str, float]] | None = None,
                     cache_file: Path | None = None) -> Precision:
    """The precision to train in: `setting` itself unless it is "auto"; on CUDA bf16 where supported;
    on CPU the faster of the two by `measure` (measure_rates; cached per `machine_key` in
    cache_file, by default $XDG_CACHE_HOME/nanoseek/machine.json; an unreadable cache is measured
    anew and rewritten)."""
    if setting in ("fp32", "bf16"):
        return Precision(setting, "as set")
    if setting != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {setting!r}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp32", f"{torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return Precision("fp32", f"no bf16 measurement for {device.type}")
    cache_file = cache_file or cache_home() / "machine.json"
    key = machine_key()
    cache = read_json_object(cache_file)
    rates = _cached_rates(cache.get(key))
    if rates is None:
        rates = (measure or measure_rates)()
        cache[key] = {"rates": rates, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, json.dumps(cache, indent=2))
        except OSError:  # a read-only home, or another process writing it now: measured again next time
            pass
    speedup = rates["bf16"] / rates["fp32"]
    name = "bf16" if speedup >= BF16_MARGIN else "fp32"
    reason = (f"bf16 autocast measured {speedup:.2f}x fp32 ({rates['bf16']:.1f} vs {rates['fp32']:.1f} GFLOP/s) "
              f"on {cpu_info().describe()}, {torch.get_num_threads()} threads; cached in {cache_file}")
    return Precision(name, reason, rates)


def _cached_rates(entry) -> dict[str, float] | None:
    """An entry's {"fp32", "bf16"} GFLOP/s, or None if it is missing or not such a pair."""
    rates = entry.get("rates") if isinstance(entry, dict) else None
    if isinstance(rates, dict) and all(isinstance(rates.get(p), (int, float)) and rates[p] > 0 for p in ("fp32", "bf16")):
        return rates
    return None


# ---- compile ----
def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot work here (no C++ compiler for inductor on CPU, no triton on CUDA),
    or None when the toolchain is present."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (RuntimeError, OSError, ImportError) as e:  # InvalidCxxCompiler is a RuntimeError
        return f"no C++ compiler for inductor ({type(e).__name__})"
    return None


def decide_compile(setting: bool | None, device: torch.device, precision: str = "fp32") -> tuple[bool, str]:
    """Whether to compile, and why: `setting` when given, else on CUDA where triton is present and on a
    CPU training in bf16 where a C++ compiler is (`precision`: what the trainer picked; see the module
    docstring for the measurements)."""
    if setting is not None:
        return setting, "as set"
    if device.type == "cuda":
        return _where_compilable(device, "triton is present")
    if device.type == "cpu" and precision == "bf16":
        return _where_compilable(device, "bf16 on a CPU: compiled layers fuse autocast's casts")
    return False, "in fp32 on a CPU compiling measured no faster (--compile to try it)"


def decide_rollout_compile(setting: bool | None, device: torch.device, time_budget: float = 0.0) -> tuple[bool, str]:
    """Whether GRPO's rollout engine decodes through compiled steps, and why: `setting` when given,
    else wherever the compiler is (see the module docstring), unless the run's time budget is too short
    to pay for compiling (ROLLOUT_COMPILE_MIN_BUDGET)."""
    if setting is not None:
        return setting, "as set"
    if 0 < time_budget < ROLLOUT_COMPILE_MIN_BUDGET:
        return False, (f"a {time_budget / 60:.1f}-minute budget: compiling the decode graphs can take most of it "
                       "(--compile to compile anyway)")
    return _where_compilable(device, "compiled decode steps measured faster")


def decide_decode_compile(setting: bool | None, model: torch.nn.Module) -> tuple[bool, str]:
    """Whether chat and serve decode through compiled steps, and why: `setting` when given, else wherever
    the compiler is for
    - models of up to DECODE_COMPILE_MAX_BYTES of weights: a small model's eager decode step is hundreds
      of operations dispatched from Python around little arithmetic; compiled it is one graph (the
      shipped model at batch 1: 4-5x the eager tokens per second, see the README);
    - dense models on a CPU: their products are called from one graph (fbgemm's and torch.mv through
      custom operators, see quant.int8_linear and layers.opaque_mv) and what lies between them (norms,
      RoPE, attention, conversions) is fused. R1-Distill-1.5B on a 2-core Xeon with AMX: int8 84 -> 73 ms
      a token, int4 84 -> 67-76, bf16 146 -> 126;
    - MoE models on a CPU whose every MoE layer is one operator (int4 experts: MoE.one_operator): the graph
      holds a few operators and fused kernels a layer (DeepSeek-V2-Lite int4 on a 2-vCPU Zen4: 12.1-14.0
      against 10.5-11.8 tok/s at batch 1, 18.0-18.6 against 16.0-16.6 at batch 8, for ~45 and ~60 s of
      compiling the first time, ~13 s a graph from the disk cache after).
    Not for other large MoE models: their routed experts run through Python by handle either way (see
    MoE.prepare_compiled_decode), and compiling what lies around them measured 2% faster for
    DeepSeek-V2-Lite int8 (batch 1 on the same Xeon, interleaved: 176 ms a token compiled, 180 eager), not
    worth minutes of compiling at start-up; nor elsewhere (not measured)."""
    if setting is not None:
        return setting, "as set"
    params = list(model.parameters())
    size = weight_bytes(model)
    if size <= DECODE_COMPILE_MAX_BYTES:
        return _where_compilable(params[0].device, "a small model's step is one compiled graph instead of hundreds of operations")
    from .model.moe import MoE

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if moes and params[0].device.type == "cpu" and all(m.one_operator() for m in moes):
        return _where_compilable(params[0].device, "each MoE layer one operator, what lies between them fused")
    if moes:
        return False, (f"{size / 2**20:,.0f} MiB of weights in experts, called through Python from a compiled step "
                       "too: 2% faster, not worth compiling")
    if params[0].device.type == "cpu":
        return _where_compilable(params[0].device, "the products called from one graph, what lies between them fused")
    return False, f"{size / 2**20:,.0f} MiB of weights on {params[0].device.type}: not measured to pay (--compile to try it)"


def _where_compilable(device: torch.device, why: str) -> tuple[bool, str]:
    """(True, why) if the compiler toolchain is here, else (False, what is missing)."""
    problem = compile_problem(device)
    return problem is None, problem or why


def use_disk_cache() -> Path:
    """Keep inductor's compiled graphs (FX graph cache, AOTAutograd cache) under
    $XDG_CACHE_HOME/nanoseek/inductor, unless the user's TORCHINDUCTOR_CACHE_DIR says where; returns
    the folder. (Importing inductor sets that variable to its default, a folder in /tmp that a
    reboot may clear, so the default counts as unset.)"""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_home() / "inductor")
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError)
