"""CPU kernels nanoseek compiles itself, where neither torch nor a published package has one.

`int4_linear`: int4 weights (nanoseek's layout, groups of 32) times int8-quantized activations for a
few rows (decoding), with AVX-512 VNNI or AVX2 (see int4.cpp). torch's int4 kernel for CPUs
(`_weight_int4pack_mm_for_cpu`) dequantizes to bf16 and multiplies in floating point, compute-bound on
2 cores at about half the memory's speed; torchao's int8 x int4 CPU kernel is not in its published
wheels. Measured on a 2-vCPU AMD EPYC Zen4, one row: 33 against 82 us for an [1408, 2048] expert of
DeepSeek-V2-Lite, 143 against 384 us for R1-Distill-Qwen-1.5B's [8960, 1536] (8 rows: 698 against 1,336).
`int4_grouped`: several such products in one call (a mixture-of-experts layer's chosen experts). The
operator `nanoseek::int4_linear` (how quantized layers call the kernel, eagerly and from compiled graphs)
has its CPU implementation in C++ (ops.cpp), so a call never passes through Python; so has
`nanoseek::int4_experts`, a whole int4 mixture-of-experts layer for a few tokens (routing done: the chosen
experts' and the shared ones' products in two grouped calls, their activation and weighted sum between).

`int8_avx2_linear` (the operator; its C++ in ops.cpp, the kernel in int8.cpp): int8 weights (one scale per output
channel) times int8-quantized activations for a few rows, with AVX2, for CPUs where fbgemm's int8 products are not exact
(no VNNI: see quant.fbgemm_int8), where torch's weight-only int8 kernel converts the codes to bf16 and multiplies in
floating point. On a 2-vCPU AMD EPYC Zen3, R1-Distill-Qwen-1.5B's [8960, 1536]: 0.31 against 0.61 ms at one row,
1.35 against 2.68 at eight.

`mla_attention` / `mla_attention_int4`: MLA's absorbed attention for a few rows of fp32 activations with kv_b_proj's
weight in bf16 or in int4 (ops.cpp; the products in mla.cpp and, for int4's value half, int4.cpp), which torch has
no CPU product for. `mla_latent_attention`: the attention between those products (scores, mask, softmax, weighted
latents) in one pass over the cached latents, fp32, fp16 or bf16 (mla.cpp), which both call and MLA in Python calls with a
float kv_b_proj. `gqa_attention`: the same pass over a grouped-query cache's keys and values (fp32, fp16 or bf16), for
the Qwen2/Qwen3/Llama derivatives' decoding.

`float_linear`: an fp32 product for a few rows (float.cpp), what `layers.Linear` runs on a CPU wherever no gradient is
wanted (decoding, eager or compiled, prompts through torch's product past 16 rows): torch's own products for a few rows
(MKL's, and inductor's matrix-vector loop) read small weights well below the cache's speed; on a 2-vCPU Zen4 the shipped
model's head took 31 against 53 us for one row, 106 against 150 for eight.
`float_experts`: a small float mixture-of-experts layer for a few tokens over its stacked experts (float.cpp), what a
compiled decode step of such a model (the shipped one) runs in place of inductor's gathering reduction: each chosen
expert row read once for every token that chose it.
`cache_write` (ops.cpp): a forward's staged cache entries written in place, one call where torch takes a stack and an
index_put_ (KVCache.store).

The sources are compiled at first use with the system's C++ compiler (`CXX`, else c++, g++ or clang++: the
one torch.compile needs) into one library in $XDG_CACHE_HOME/nanoseek/kernels, named by a hash of the sources, compiler
and flags, and loaded with ctypes; ops.cpp, the one source that includes torch's headers, makes the build take
~7 s on 2 cores (without it, where torch's headers do not compile here, a second or two, and the operator gets
a Python implementation: ~10 us more a call than ~2). Where there is no
compiler, no AVX2, or the build fails, `int4_available()` and `mla_available()` are False: quantized layers
keep torch's kernel, MLA converts its bf16 weight.

Also here, as the package's lowest layer: what this CPU is (`cpu_model_and_flags`) and where per-machine
caches live (`cache_home`), and `cpu_operator`, how compiled graphs call nanoseek's CPU kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("int4.cpp", "int8.cpp", "mla.cpp", "float.cpp", "step.cpp")]  # built into one library
HEADER = Path(__file__).with_name("kernels.h")  # what the sources share (part of the build's key)
OPERATOR_SOURCE = Path(__file__).with_name("ops.cpp")  # and, against torch's headers, the int4_linear operator's C++
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-w"]
GROUP = 32  # the group size the kernel reads
MAX_ROWS = 8  # rows per call; more go through in chunks
ISA_AVX512, ISA_AVX2 = 2, 1
ISA_K_MULTIPLE = {ISA_AVX512: 128, ISA_AVX2: 64}  # each loop step reads this many inputs of a row


def cache_home() -> Path:
    """Where nanoseek keeps what it builds or measures once per machine ($XDG_CACHE_HOME/nanoseek)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanoseek"


@lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and every flag it reports (from /proc/cpuinfo on Linux; no flags elsewhere)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def int4_isa() -> int:
    """The instruction set the kernel runs on here: ISA_AVX512 (AVX-512 with VNNI), ISA_AVX2, or 0 (none)."""
    _, flags = cpu_model_and_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return ISA_AVX512
    return ISA_AVX2 if {"avx2", "fma", "f16c"} <= flags else 0


def compiler() -> list[str] | None:
    """The C++ compiler command to build with: $CXX if set (it may carry flags), else the first of c++, g++,
    clang++ on the PATH."""
    if os.environ.get("CXX"):
        command = shlex.split(os.environ["CXX"])
        found = shutil.which(command[0]) if command else None
        if found is None:
            warnings.warn(f"CXX={os.environ['CXX']!r} is not a command here; int4 layers use torch's kernel", stacklevel=3)
        return [found, *command[1:]] if found else None
    found = next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    return [found] if found else None


_BUILD = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled kernel library (built once per machine and source), or None where it cannot be."""
    with _BUILD:  # prepare_kernels asks from several threads at once
        return _library()


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib, native = _build()
    if lib is not None:
        P, I = ctypes.c_void_p, ctypes.c_int64
        lib.nanoseek_int4_linear_many.argtypes = [P, I, ctypes.c_int]
        lib.nanoseek_int4_linear_many.restype = ctypes.c_int
        lib.nanoseek_int4_linear.argtypes = [P, I, I, P, P, P, P, I, P, ctypes.c_int]
        lib.nanoseek_int4_linear.restype = ctypes.c_int
    if native:  # loading it registered the operator's C++ implementation
        lib.nanoseek_set_isa(int4_isa())
    elif not torch._C._dispatch_has_kernel_for_dispatch_key("nanoseek::int4_linear", "CPU"):  # (once a process)
        _OPERATORS.impl("int4_linear", int4_products, "CPU")
    return lib


def _build() -> tuple[ctypes.CDLL | None, bool]:
    """The library and whether it carries the int4_linear operator's C++ implementation: built with it where
    torch's headers compile here (a few seconds, once), else from the kernels alone (a second or two)."""
    if int4_isa() == 0 or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return None, False
    cxx = compiler()
    if cxx is None:
        return None, False
    root = Path(torch.__file__).parent
    with_torch = ["-std=c++17", f"-I{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                  f"-L{root / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
    failure = None
    for sources, flags in (([*SOURCES, OPERATOR_SOURCE], [*FLAGS, *with_torch]), (SOURCES, FLAGS)):
        source = b"".join(path.read_bytes() for path in [*sources, HEADER])
        key = hashlib.sha256(source + " ".join([*cxx, *flags]).encode()).hexdigest()[:16]
        target = cache_home() / "kernels" / f"kernels-{key}.so"
        try:
            try:
                lib = ctypes.CDLL(str(target)) if target.exists() else None
            except OSError:  # a damaged copy (a full disk, say): built again
                target.unlink()
                lib = None
            if lib is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    built = Path(tmp) / target.name
                    subprocess.run([*cxx, *map(str, sources), *flags, "-o", str(built)], check=True, capture_output=True,
                                   text=True)
                    os.replace(built, target)  # atomic: a process building at the same time writes its own copy
                lib = ctypes.CDLL(str(target))
            return lib, OPERATOR_SOURCE in sources
        except (OSError, subprocess.CalledProcessError) as e:
            failure = getattr(e, "stderr", None) or str(e)
    warnings.warn(f"nanoseek's int4 CPU kernel could not be built ({failure.strip()[:300]}); "
                  "int4 layers use torch's kernel", stacklevel=4)
    return None, False


# dynamo calls it while tracing and keeps the answer as a constant of the graph (it cannot trace the build)
@torch._dynamo.assume_constant_result
def int4_available(in_features: int, group_size: int) -> bool:
    """Whether `int4_linear` takes a layer of this shape on this machine (building the kernel if needed)."""
    return group_size == GROUP and int4_isa() > 0 and in_features % ISA_K_MULTIPLE[ISA_AVX2] == 0 \
        and library() is not None


def int4_products(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  units: torch.Tensor, isa: int | None = None) -> torch.Tensor:
    """x [rows, K] (any float dtype, CPU) @ W.T -> [rows, N] fp32, W held as qweight uint8 [N, K/2] (input 2j in
    the low nibble of byte j, 2j+1 in the high one), scale codes uint8 and zero codes int8 [N, K/32], units fp32
    [N, 2]: W = units[:, 1] * zero code + code * units[:, 0] * scale code (see quant.py).
    The activations are quantized to int8 per block of 32 inputs on the way in (see int4.cpp).
    isa: the instruction set to run (default: this CPU's best; AVX2 where K is not a multiple of 128).
    The operator nanoseek::int4_linear is this, in C++ where the library carries it (ops.cpp)."""
    lib, here = library(), int4_isa()
    isa = isa or here
    if lib is None or not 0 < isa <= here:
        raise RuntimeError(f"nanoseek's int4 kernel is not available here (instruction set {isa}, this CPU's {here})")
    _, K = x.shape
    N = qweight.shape[0]
    wants = [(qweight, torch.uint8, (N, K // 2)), (scales, torch.uint8, (N, K // GROUP)),
             (zeros, torch.int8, (N, K // GROUP)), (units, torch.float32, (N, 2))]
    if x.device.type != "cpu" or not x.is_floating_point() or K % ISA_K_MULTIPLE[ISA_AVX2] \
            or any(t.dtype != dtype or t.shape != shape or not t.is_contiguous() or t.device.type != "cpu"
                   for t, dtype, shape in wants):
        raise ValueError(f"int4 kernel: x {x.dtype} {tuple(x.shape)} on {x.device}, qweight {qweight.dtype} "
                         f"{tuple(qweight.shape)}, scales {scales.dtype} {tuple(scales.shape)}, zeros {zeros.dtype} "
                         f"{tuple(zeros.shape)}, units {units.dtype} {tuple(units.shape)}: wants x float [rows, K] on "
                         f"the CPU, K a multiple of 64, uint8 [N, K/2] codes, uint8 scale codes and int8 zero codes "
                         f"[N, K/32], fp32 units [N, 2], all contiguous")
    x = x.to(torch.float32).contiguous()
    M, K = x.shape
    y = x.new_empty(M, N)
    code = _library().nanoseek_int4_linear(x.data_ptr(), M, K, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                                           units.data_ptr(), N, y.data_ptr(), isa)
    if code:
        raise RuntimeError(f"int4 kernel failed (code {code}) on a product [M, K, N] {[M, K, N]}")
    return y


def int4_grouped(products: Sequence[tuple], isa: int | None = None) -> None:
    """For each (x, x_row, qweight, scales, zeros, units, y, y_row, rows) of `products`: rows y_row.. of y = rows
    x_row.. of x @ W.T, all in one call of the kernel (their rows split between the threads together, so a
    thread runs on from one weight into the next, and products reading the same rows of x quantize them
    once): a mixture-of-experts layer's chosen experts in one call rather than a call per weight. x fp32
    [*, K] and y fp32 [*, N] contiguous on the CPU, rows any number; the weights as `int4_products` takes
    them. Unchecked: for callers that checked each weight once (`int4_products` checks)."""
    table = []  # one row per product of up to MAX_ROWS rows: the kernel's Int4Product (x, M, K, w, s, z, u, N, y)
    for x, x_row, qweight, scales, zeros, units, y, y_row, rows in products:
        K, N = x.shape[1], qweight.shape[0]
        w, s, z, u = (t.data_ptr() for t in (qweight, scales, zeros, units))
        xp, yp = x.data_ptr(), y.data_ptr()
        for start in range(0, rows, MAX_ROWS):
            table.append((xp + 4 * K * (x_row + start), min(MAX_ROWS, rows - start), K, w, s, z, u, N,
                          yp + 4 * N * (y_row + start)))
    fields = torch.tensor(table, dtype=torch.int64)  # (products, 9): the structs' memory, field by field
    code = _library().nanoseek_int4_linear_many(fields.data_ptr(), len(table), isa or int4_isa())  # (built: the caller's check asked)
    if code:
        raise RuntimeError(f"int4 kernel failed (code {code}) on products [M, K, N] {[[r[1], r[2], r[7]] for r in table]}")


# what mla.cpp takes. Rows: past 8, MLA widens the bf16 weight to fp32 for torch's product instead (DeepSeek-V2-Lite's
# shape on a 2-vCPU Zen4, both products a layer, 27 layers streamed: 1 row 251-272 us against 329-413 widening, 4 rows
# 332 against 419-428, 8 rows 570 against 525 alone, yet decoding 8 sequences of the whole model was 7% slower widening)
MLA_MAX_ROWS, MLA_MAX_LATENT = 8, 1024


def runs_here(operator: str) -> bool:
    """Whether nanoseek's C++ operator nanoseek::<operator> runs here: AVX2 or AVX-512, the library built with ops.cpp
    (loading it registers the operators)."""
    return int4_isa() > 0 and library() is not None and \
        torch._C._dispatch_has_kernel_for_dispatch_key(f"nanoseek::{operator}", "CPU")


@torch._dynamo.assume_constant_result
def mla_available() -> bool:
    """Whether the operator nanoseek::mla_attention runs here (AVX2 or AVX-512, the library built with ops.cpp)."""
    return runs_here("mla_attention")


_OPERATORS = torch.library.Library("nanoseek", "FRAGMENT")


def cpu_operator(schema: str, impl, fake):
    """Define the operator nanoseek::<schema> with a CPU implementation and a fake (shapes only, for
    tracing), for a compiled graph to call a kernel it cannot trace. Registered plainly: a call from a
    graph costs about 2 us more than calling `impl`, against 10 through torch.library.custom_op's wrapper
    (measured on a 2-vCPU Zen4; a 1.5B model's decode step makes ~200 such calls)."""
    name = schema.split("(")[0]
    _OPERATORS.define(schema)
    _OPERATORS.impl(name, impl, "CPU")
    torch.library.register_fake(f"nanoseek::{name}", fake, lib=_OPERATORS)
    return getattr(torch.ops.nanoseek, name)


# int4_products as an operator: its CPU implementation is registered with the library (`_library`: ops.cpp's
# C++ where it builds against torch's headers, else int4_products itself)
_OPERATORS.define("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor units) -> Tensor")
torch.library.register_fake("nanoseek::int4_linear", lambda x, qweight, scales, zeros, units: x.new_empty(
    x.shape[0], qweight.shape[0], dtype=torch.float32), lib=_OPERATORS)

# an int8 product through nanoseek's AVX2 kernel (int8.cpp): QuantLinear where fbgemm's int8 products are not exact here
_OPERATORS.define("int8_avx2_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor")
torch.library.register_fake("nanoseek::int8_avx2_linear", lambda x, qweight, scales: x.new_empty(
    x.shape[0], qweight.shape[0], dtype=torch.float32), lib=_OPERATORS)


@torch._dynamo.assume_constant_result
def int8_available(in_features: int) -> bool:
    """Whether nanoseek::int8_avx2_linear takes a layer of this many inputs here (AVX2, the library built with ops.cpp)."""
    return in_features % 32 == 0 and runs_here("int8_avx2_linear")


# an int4 mixture-of-experts layer for a few tokens in one call (MoE.int4_table describes the table); C++ only
# (ops.cpp): where the library does not carry it, `int4_experts_available` is False and MoE groups in Python
_OPERATORS.define("int4_experts(Tensor x, Tensor weights, Tensor indices, Tensor table, int routed) -> Tensor")
torch.library.register_fake("nanoseek::int4_experts", lambda x, weights, indices, table, routed: x.new_empty(x.shape),
                            lib=_OPERATORS)


@torch._dynamo.assume_constant_result
def int4_experts_available() -> bool:
    """Whether the operator nanoseek::int4_experts runs here (the library built with ops.cpp)."""
    return runs_here("int4_experts")


# a small float mixture-of-experts layer for a few tokens over its stacked experts (MoE.prepare_compiled_decode); C++
# only (ops.cpp, float.cpp): where the library does not carry it, MoE.selected_experts computes the same in torch
_OPERATORS.define("float_experts(Tensor x, Tensor weights, Tensor indices, Tensor gate_up, Tensor down, int routed, "
                  "int chunks) -> Tensor")
torch.library.register_fake("nanoseek::float_experts", lambda x, weights, indices, gate_up, down, routed, chunks:
                            x.new_empty(x.shape), lib=_OPERATORS)


# a float product for a few rows (layers.Linear while decoding); C++ only (ops.cpp, float.cpp)
_OPERATORS.define("float_linear(Tensor x, Tensor weight) -> Tensor")
torch.library.register_fake("nanoseek::float_linear", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]),
                            lib=_OPERATORS)


@torch._dynamo.assume_constant_result
def float_linear_available() -> bool:
    """Whether the operator nanoseek::float_linear runs here (AVX2 or AVX-512, the library built with ops.cpp)."""
    return _float_linear_here()


@lru_cache(maxsize=1)  # (asked at every product of layers.Linear)
def _float_linear_here() -> bool:
    return runs_here("float_linear")


@torch._dynamo.assume_constant_result
def float_experts_available() -> bool:
    """Whether the operator nanoseek::float_experts runs here (AVX2 or AVX-512, the library built with ops.cpp)."""
    return runs_here("float_experts")


def float_experts_take(hidden: int, intermediate: int) -> bool:
    """Whether nanoseek::float_experts takes experts of this shape here (both widths multiples of the vector width)."""
    width = {ISA_AVX512: 16, ISA_AVX2: 8}.get(int4_isa())
    return float_experts_available() and width is not None and hidden % width == 0 and intermediate % width == 0


# a forward's staged cache entries written in place (KVCache.store); C++ only (ops.cpp): where the library does not
# carry it, the cache writes them with torch's index_put_
_OPERATORS.define("cache_write(Tensor(a!) kv, Tensor[] staged, Tensor pos, int first_layer, int first_row) -> ()")


@lru_cache(maxsize=1)
def cache_write_available() -> bool:
    """Whether the operator nanoseek::cache_write runs here (the library built with ops.cpp)."""
    return library() is not None and torch._C._dispatch_has_kernel_for_dispatch_key("nanoseek::cache_write", "CPU")


# MLA's attention over its latents while decoding, with kv_b_proj's weight in bf16 (MLA.absorbed_attention); C++ only
_OPERATORS.define("mla_attention(Tensor q_nope, Tensor q_pe, Tensor past, Tensor fresh, Tensor mask, Tensor w, "
                  "float scale) -> Tensor")
torch.library.register_fake("nanoseek::mla_attention", lambda q_nope, q_pe, past, fresh, mask, w, scale: q_nope.new_empty(
    *q_nope.shape[:3], w.shape[1] - q_nope.shape[3]), lib=_OPERATORS)
# the attention over the latents between MLA's two products (MLA.absorbed_attention with a float kv_b_proj); C++ only
_OPERATORS.define("mla_latent_attention(Tensor q, Tensor past, Tensor fresh, Tensor mask, int c, float scale) -> Tensor")
torch.library.register_fake("nanoseek::mla_latent_attention", lambda q, past, fresh, mask, c, scale: q.new_empty(
    q.shape[0], q.shape[1], c), lib=_OPERATORS)


@torch._dynamo.assume_constant_result
def mla_latent_available() -> bool:
    """Whether the operator nanoseek::mla_latent_attention runs here (AVX2 or AVX-512, the library built with ops.cpp)."""
    return runs_here("mla_latent_attention")


# grouped-query attention over the cache while decoding (GQA.cached_attention); C++ only (ops.cpp, mla.cpp's kernel)
_OPERATORS.define("gqa_attention(Tensor q, Tensor past, Tensor fresh, Tensor mask, float scale) -> Tensor")
torch.library.register_fake("nanoseek::gqa_attention", lambda q, past, fresh, mask, scale: q.new_empty(q.shape),
                            lib=_OPERATORS)


@torch._dynamo.assume_constant_result
def gqa_attention_available() -> bool:
    """Whether the operator nanoseek::gqa_attention runs here (AVX2 or AVX-512, the library built with ops.cpp)."""
    return runs_here("gqa_attention")


# the same with kv_b_proj in int4 (QuantLinear's qweight, scales, zeros and units: [H * (d + dv), *])
_OPERATORS.define("mla_attention_int4(Tensor q_nope, Tensor q_pe, Tensor past, Tensor fresh, Tensor mask, Tensor qweight, "
                  "Tensor scales, Tensor zeros, Tensor units, float scale) -> Tensor")
torch.library.register_fake(
    "nanoseek::mla_attention_int4", lambda q_nope, q_pe, past, fresh, mask, qweight, scales, zeros, units, scale:
    q_nope.new_empty(*q_nope.shape[:3], qweight.shape[0] // q_nope.shape[2] - q_nope.shape[3]), lib=_OPERATORS)


# a whole decode step of a small MLA model with float weights (inference/native.py); C++ only (ops.cpp, step.cpp)
_OPERATORS.define("mla_step(int[] ids, Tensor(a!) kv, Tensor(b!) lengths, int first_row, Tensor table, "
                  "Tensor numbers, int vocab) -> (Tensor, Tensor)")
