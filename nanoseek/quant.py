"""Weight-only quantization for CPU inference: int8 per output channel, int4 in groups.

Every linear layer (attention, dense MLPs, each routed and shared expert, the output head) can
hold its weight W [N out, K in] as integers plus scales:

- int8: W ~ q * scale[n], q in [-127, 127], one scale per output channel;
- int4: W ~ zero[n, k // g] + q * scale[n, k // g], q in [0, 15], one scale and one zero (the
  value of code 0) per group of g consecutive inputs (asymmetric min/max, g = 32 by default,
  the block of llama.cpp's q4_0). The scales and zeros are themselves held as 8-bit codes times a
  unit per output channel: scale = units[n, 0] * scale code (uint8, 0..255), zero = units[n, 1] *
  zero code (int8, -127..127), so a weight takes 4.5 bits (and 64 / K more for the units), as many
  as q4_0's, where bf16 scales and zeros took 5. Measured on the shipped model (held-out task
  conversations, logits against fp32): KL 0.0026 and greedy agreement 95.7%, against 0.0035 / 95.6% with
  the bf16 scales and zeros this replaced (the codes now fit the scales and zeros as rounded), 0.0065 /
  95.6% for q4_0's symmetric format (one scale, no zero) and 0.0079 / 93.0% for bf16 scales and zeros
  per group of 64 (the two other ways to 4.5 bits).

`QuantLinear.forward` multiplies with torch's CPU kernels that read the integers directly: a decode
step reads 1 or 0.5 bytes per weight instead of 2 or 4.
- int8 on x86 CPUs with VNNI (see fbgemm_int8): fbgemm's int8 x int8 products (`quantized::linear_dynamic`
  and `linear_with_input_q_dq_qweight_dq_output_fp32`), the activations quantized
  on the fly with one symmetric scale per row (a row with outliers, such as a first token's massive
  activations, does not coarsen the others). The weight is held once, in fbgemm's packed layout.
  Measured on a 2-core Xeon (AMX) for an [8960, 1536] weight: 0.46-0.54 ms at one row (25-30 GB/s,
  the memory's speed) against 0.78-1.15 ms for torch's weight-only int8 kernel, 0.63-0.76 ms against
  2.7-3.2 ms at 8 rows, and as fast as the converted bf16 product at 512 rows, so every row count
  takes it; so do routed experts (DeepSeek-V2-Lite's [1408, 2048] at one row, 400 of them in random
  order: 144-154 us, 19-20 GB/s, against 236-240 us, 12 GB/s, for the weight-only kernel), though packing
  them lengthens start-up (fbgemm packs ~160 M weights a second per core). Where fbgemm's are not exact (no VNNI),
  int8 takes nanoseek's own AVX2 kernel (`kernels.int8_avx2_linear`: the codes times the activations quantized
  to int8 per block of 32; on an AVX2 Zen3 2x torch's at one row) up to `FAST_INT8_ROWS` rows, and where that
  cannot be built, `_weight_int8pack_mm` (bf16 activations) up to `KERNEL_ROWS[8]` rows.
- int4: nanoseek's own kernel (`kernels.int4_products`: the codes times the activations quantized to int8
  per block of 32, with AVX-512 VNNI or AVX2; 2.3-2.8x torch's kernel at one row on a Zen4) up to
  `FAST_INT4_ROWS` rows, reading the documented layout; where it cannot be built (no compiler, no AVX2)
  or for other group sizes, `_weight_int4pack_mm_for_cpu` (bf16 activations) up to `KERNEL_ROWS[4]` rows.
Above those rows, where prompts multiply in bf16, the kernels are slower than converting the weight and
multiplying, so that is what happens (where prompts multiply in fp32, nanoseek's two kernels take every row:
`QuantLinear._prompts_narrow`), and on other devices (CUDA) always, one block of output channels at a time
(`converted_matmul`). `dequantize()` is the plain reference path.

`NarrowLinear` is the float counterpart for CPUs without fast bf16 matmuls: linear weights kept in
bf16 under fp32 activations (see checkpoint.inference_dtypes).
(torchao's CPU weight-only configs call the same two aten kernels; its wheel carries no other CPU
kernels, so nanoseek calls them directly. fbgemm's int8 products come with torch itself, through its
`quantized` operators, which torch has deprecated without a replacement yet: where they are missing the
weight-only kernel takes over.)

A compiled decode step (`Engine(compile=True)`, the default for dense models on a CPU) calls
the same kernels from its graph: torch's weight-only ones directly, nanoseek's int4 kernel through the
`nanoseek::int4_linear` operator, fbgemm's through `nanoseek::int8_linear` (its packed weight is a
TorchScript object, which a graph cannot take as an input).

On disk (`save_model` of a quantized model; `quantization_config.quant_method = "nanoseek"` in
config.json) a quantized weight `X.weight` is stored as `X.qweight` (int8 [N, K], or uint8
[N, K / 2] with two int4 codes per byte, the even input in the low nibble) and `X.scales` (int8: one per
output channel; int4: uint8 codes [N, K / g]), for int4 also `X.zeros` (int8 codes [N, K / g]) and
`X.units` (fp32 [N, 2]); loading copies them without re-quantizing. In memory, an int4
layer on CPU that takes torch's kernel rewrites its codes in place in that kernel's tiled layout at its first call
(so they are held once) and reads them back through that layout's inverse when it needs them in
order (prefill, checkpoints). An int8 layer on x86 likewise moves its codes into fbgemm's packed
weight (qweight becomes empty) and unpacks them when they are needed in order.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (
    cpu_operator,
    float_linear_available,
    int4_available,
    int8_available,
    int4_products,
)

BITS = (8, 4)
GROUP = 32
# how int4 checkpoints hold their scales and zeros (config.json's quantization_config.int4_format): 2, as
# 8-bit codes times units per output channel; 1 (before 2026-12-05, no such key), bf16 per group
INT4_FORMAT = 2
# at most this many rows multiply through the integer kernels; measured on a 2-core Xeon (AMX) for an
# [8960, 1536] weight: int8 kernel 3.3 ms at 8 rows vs 3.8 ms converted, int4 kernel 13.6 ms at 64 rows vs 13.4
KERNEL_ROWS = {8: 8, 4: 48}
# nanoseek's own int4 kernel (kernels.int4_linear, where it builds) takes up to this many rows, 8 at a time: on a
# 2-vCPU Zen4 ahead of torch's int4 kernel and of converting the weight at every row count to 64 ([8960, 1536]:
# 8.3 against 11.0 and 14.8 ms at 64 rows, 1.0 against 1.4 and 10.0 at 8)
FAST_INT4_ROWS = 64
# nanoseek's int8 kernel (kernels.int8_avx2_linear, where fbgemm's are not exact) likewise: on a 2-vCPU Zen3 ahead of
# torch's int8 kernel and of converting the weight at every row count to 64 ([8960, 1536]: 10.6 against 13.2 ms at 64
# rows, 1.35 against 2.68 at 8)
FAST_INT8_ROWS = 64
# int4 kv_b_proj: MLA's operator takes a latent width (its input) in multiples of this (the int4 kernel's 64 inputs)
LATENT_MULTIPLE = 64
KERNEL_BLOCK = 64  # the int4 CPU kernel's layout tiles rows in independent blocks of 64 (checked in the tests)
# NarrowLinear: up to this many rows through nanoseek's kernel (fp32 activations times the bf16 weight widened as it is
# read; a 2-vCPU AMD EPYC Zen3, R1-Distill-1.5B's [8960, 1536]: 0.69 ms at one row, 1.9 at 8 and 3.5 at 16 against
# torch's bf16 product's 1.4, 10.5 and 21 and converting the weight's 3.0, 5.5 and 5.4); where the kernel does not
# run, torch's bf16 product up to NARROW_ROWS (the same CPU: 4 rows 15 ms vs 20 converted, 8 rows 40 vs 31)
NARROW_KERNEL_ROWS, NARROW_ROWS = 16, 4
PACK_TRIM_BYTES = 256 * 2**20  # prepare_kernels hands freed memory back after packing this many bytes of codes
CONVERT_WEIGHTS = 2**20  # many rows: the weight is converted in blocks of about this many weights (4 MB in fp32)


# quantized tensors are deprecated (torch 2.13), but fbgemm's packing still takes one; said once per process
# otherwise, from inside packing threads (where warnings.catch_warnings is not safe), hence a filter
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning)


# (asked while tracing a layer first called in a graph: dynamo keeps the answer, it cannot trace the probe)
@torch._dynamo.assume_constant_result
def fbgemm_int8() -> bool:
    """Whether int8 layers multiply through fbgemm's int8 x int8 kernels on this CPU: where torch has fbgemm
    (x86) and its products of full-range 8-bit activations come out exact. With VNNI the u8 x s8 products
    accumulate in int32; with AVX2 (or AVX-512 without VNNI) alone fbgemm sums pairs of them in int16,
    which saturates unless activations keep to 7 bits, and 7-bit activations cost too much (forced to its
    AVX2 path on the Xeon: a random model's greedy agreement 0.87, the shipped model's KL 2.0e-3 against
    4.7e-4), so such CPUs take nanoseek's int8 kernel (or torch's weight-only one). Found by trying (once a
    process): codes whose pairwise products overflow int16."""
    return _fbgemm_exact()


@cache
def _fbgemm_exact() -> bool:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    K = 64
    packed = fbgemm_pack(torch.full((8, K), 127, dtype=torch.int8), torch.ones(8))
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.full((2, K), 127.0), 1.0, 128, packed)
    return bool((y == 127 * 127 * K).all())


def fbgemm_pack(codes: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed weight for int8 codes [N, K] with one scale per output channel."""
    zero_points = torch.zeros(codes.shape[0], dtype=torch.long)
    weight = torch._make_per_channel_quantized_tensor(codes, scales.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(weight, None)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False, group_size: int = GROUP,
                 dtype: torch.dtype = torch.bfloat16, convert_dtype: torch.dtype | None = None):
        """convert_dtype: what prompts (more rows than the integer kernels take) multiply in, the weight
        converted to it a block at a time (default: the activations' dtype; bf16 where a CPU multiplies bf16
        fast while decoding computes in fp32)."""
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if bits == 4 and in_features % group_size:
            raise ValueError(f"int4 needs in_features ({in_features}) divisible by the group size {group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(N, dtype=dtype))
        else:
            # (units in fp32 whatever the model's dtype: what the kernel reads and checkpoints hold)
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(N, K // group_size, dtype=torch.uint8))
            self.register_buffer("zeros", torch.empty(N, K // group_size, dtype=torch.int8))
            self.register_buffer("units", torch.empty(N, 2, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype)) if bias else None
        self.kernel_rows = KERNEL_ROWS[bits]
        self.convert_dtype = convert_dtype
        # int4 on CPU: qweight is rewritten in place in the kernel's own (tiled) layout at the first kernel
        # call, so the codes are held once; everything else reads them back through `standard_qweight`
        self._kernel_layout = False
        # torch's kernels' scales: int8 (no fbgemm) the bf16 scales, int4 the [K/g, N, 2] scales and offsets
        self._kernel_scales: torch.Tensor | None = None
        self._packed = None  # int8 on x86: fbgemm's packed weight (qweight is then empty)
        self._fast: bool | None = None  # whether nanoseek's own kernel takes this layer (see _fast_int4, _fast_int8)
        self._operands: tuple[torch.Tensor, ...] | None = None  # likewise: see int4_operands
        self._handle = next(_HANDLES)  # how a compiled graph names this layer to `int8_linear` (see there)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Set the integers and scales from a float weight [N, K] (any float dtype; computed in fp32)."""
        w = weight.float()
        if self.bits == 8:
            self._drop_packed()
            # (N,), as stored (a bf16 model's scales are bf16): the codes fit it (fitted to the fp32 scale, a folder
            # written by `nanoseek quantize` from a bf16 release was up to 0.2% off per row)
            scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(self.scales.dtype).float()
            self.qweight.copy_((w / scale[:, None]).round_().clamp_(-127, 127))
            self.scales.copy_(scale)
        else:
            g = w.view(self.out_features, -1, self.group_size)  # (N, K/g, g)
            lo, hi = g.amin(dim=-1), g.amax(dim=-1)
            scale = (hi - lo) / 15
            # each row's units: its largest scale is code 255, its zero farthest from 0 code +-127
            units = torch.stack([scale.amax(dim=1) / 255, lo.abs().amax(dim=1) / 127], dim=1).clamp_(min=1e-30)  # (N, 2)
            scale_codes = (scale / units[:, :1]).round_().clamp_(0, 255)
            zero_codes = (lo / units[:, 1:]).round_().clamp_(-127, 127)
            # the codes of the weights against the scales and zeros as rounded
            scale, zero = scale_codes * units[:, :1], zero_codes * units[:, 1:]
            q = ((g - zero[..., None]) / scale.clamp(min=1e-30)[..., None]).round_().clamp_(0, 15).to(torch.uint8).flatten(1)
            self.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
            self.scales.copy_(scale_codes)
            self.zeros.copy_(zero_codes)
            self.units.copy_(units)
        self._kernel_layout, self._kernel_scales = False, None

    def codes(self) -> torch.Tensor:
        """The integer codes [N, K] (int8: signed; int4: 0..15)."""
        if self.bits == 8:
            if self._packed is not None:
                return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()
            return self.qweight
        if self._kernel_layout:
            return kernel_layout_codes(self.qweight, self.in_features)
        return torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1).flatten(1)

    def standard_qweight(self) -> torch.Tensor:
        """qweight in the documented layout (read out of the kernel's layout, when it has been packed)."""
        if self.bits == 8:
            return self.codes()
        if not self._kernel_layout:
            return self.qweight
        codes = self.codes()
        return codes[:, 0::2] | (codes[:, 1::2] << 4)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the integers stand for, [N, K]: the reference every fast path is tested against."""
        return self._dequantize_rows(0, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.numel() == self.in_features and x.dim() > 1 and x.dtype == torch.float32 \
                and self.bias is None and not torch.compiler.is_compiling():
            # one row (decoding one sequence) straight to fbgemm: DeepSeek-V2-Lite calls this 630 times a token
            return torch.ops.quantized.linear_dynamic(x, self._packed, False)
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        fast = self._fast_int4() if self.bits == 4 else \
            x.device.type == "cpu" and self._kernel_ready() and self._fast_int8()
        if fast and (rows <= (FAST_INT4_ROWS if self.bits == 4 else FAST_INT8_ROWS) or not self._prompts_narrow(x)):
            if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                y = KernelProduct.apply(x2, self)
            elif self.bits == 4:  # the operators: C++ from end to end where the library carries them (see kernels/ops.cpp)
                y = torch.ops.nanoseek.int4_linear(x2, self.qweight, self.scales, self.zeros, self.units)
            else:
                y = torch.ops.nanoseek.int8_avx2_linear(x2, self.qweight, self._int8_scales())
            y = y.to(x.dtype)
        elif fast:
            y = self._converted(x2)
        elif x.device.type == "cpu" and self._kernel_ready() and (rows <= self.kernel_rows or self._packed is not None):
            y = self._kernel(x2).to(x.dtype)
        else:
            y = self._converted(x2)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _prompts_narrow(self, x: torch.Tensor) -> bool:
        """Whether a prompt's rows (x's) would multiply in a narrow dtype (bf16, fast on this CPU) through the converted
        weight. Where they would multiply in fp32, nanoseek's kernels take every row: on a 2-vCPU AMD EPYC Zen3 (AVX2)
        an [8960, 1536] weight at 512 rows took 84 ms int4 and 85 int8 through them against 103 and 131 converted,
        and R1-Distill-1.5B prefilled 512 tokens at 46 tok/s int4 (38 with 64 rows a kernel call and the rest converted)
        and 51 int8 (48)."""
        return x.dtype != torch.float32 or self.convert_dtype not in (None, torch.float32)

    def _converted(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, K] @ W.T through the weight converted a block at a time, in convert_dtype for a prompt (more
        rows than the integer kernels take), else in x's dtype (a few rows of a layer no kernel takes: decoding
        in bf16 would round its outputs, and a compiled graph, which keeps them in fp32, would part from eager)."""
        few = FAST_INT4_ROWS if self.bits == 4 else FAST_INT8_ROWS
        dtype = self.convert_dtype if self.convert_dtype is not None and x.shape[0] > few else x.dtype
        return converted_matmul(x.to(dtype), self._dequantize_rows, self.out_features).to(x.dtype)

    def _dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Output channels start..end of the weight, [end - start, K] in dtype (start a multiple of 64)."""
        if self.bits == 8:
            return self.codes()[start:end].to(dtype).mul_(self.scales[start:end].to(dtype)[:, None])
        scales, zeros = self.group_scales_zeros(start, end)
        if self._kernel_layout:
            codes = kernel_layout_codes(self.qweight[start:end], self.in_features).to(dtype)
            return int4_affine(codes, scales, zeros, self.group_size)
        return int4_weight(self.qweight[start:end], scales, zeros, self.group_size, dtype)

    def group_scales_zeros(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """int4: the scales and zeros of output channels start..end, fp32 [end - start, K/g] each (codes times units)."""
        units = self.units[start:end]
        return self.scales[start:end] * units[:, :1], self.zeros[start:end] * units[:, 1:]

    def _fast_int4(self) -> bool:
        """Whether this int4 layer multiplies through nanoseek's own kernel (on a CPU with AVX2 or AVX-512 VNNI
        where the kernel builds, for groups of 32), reading the codes in the documented layout: then it never
        takes torch's layout."""
        if self._fast is None:
            buffers = (self.qweight, self.scales, self.zeros, self.units)
            self._fast = (self.qweight.device.type == "cpu" and not self._kernel_layout
                          and self.units.dtype == torch.float32 and all(t.is_contiguous() for t in buffers)
                          and int4_available(self.in_features, self.group_size))
            self._operands = buffers if self._fast and self.bias is None else None
        return self._fast

    def _fast_int8(self) -> bool:
        """Whether this int8 layer multiplies through nanoseek's own kernel: on a CPU with AVX2 where fbgemm's int8
        products are not exact (no VNNI), the kernel built, the inputs a multiple of 32."""
        if self._fast is None:
            self._fast = (self.qweight.device.type == "cpu" and self._packed is None and self.qweight.is_contiguous()
                          and not fbgemm_int8() and int8_available(self.in_features))
        return self._fast

    def _int8_scales(self) -> torch.Tensor:
        """The fp32 scales nanoseek's int8 kernel reads: kept from `_kernel_ready`, or (a graph traced before any eager
        call) converted in the graph."""
        return self._kernel_scales if self._kernel_scales is not None else self.scales.float().contiguous()

    def int4_operands(self) -> tuple[torch.Tensor, ...] | None:
        """(qweight, scales, zeros, units) where this layer multiplies through nanoseek's int4 kernel (for callers that
        group several layers' products into one kernel call: kernels.int4_grouped), else None."""
        if self.bits == 4 and self._fast is None:
            self._fast_int4()
        return self._operands

    def _kernel_ready(self) -> bool:
        if self.bits == 4 and self._fast_int4():
            return True
        if self.bits == 8:
            # (a compiled graph never packs: an engine that compiles prepares the kernels before tracing)
            if self._packed is None and not torch.compiler.is_compiling():
                if fbgemm_int8():
                    self._pack_int8()
                elif self._kernel_scales is None:  # (computed in a compiled graph, inductor's lowering fails)
                    self._kernel_scales = self.scales.float().contiguous() if self._fast_int8() else \
                        self.scales.to(torch.bfloat16)
            return True
        if not self._kernel_layout:
            if self.out_features % KERNEL_BLOCK:
                return False
            self._to_kernel_layout()
        return True

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, K] (any float dtype) -> [rows, N] through the CPU kernel."""
        if self._packed is not None:
            if torch.compiler.is_compiling():
                return torch.ops.nanoseek.int8_linear(x.float(), self._handle)
            return int8_products(x.float(), self._packed)
        if self.bits == 8:
            # (bf16 activations: on an AVX2 Zen3 8-15x faster than fp32's at 1-8 rows of an [8960, 1536] weight)
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self._kernel_scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.qweight, self.group_size,
                                                          self._kernel_scales)

    @torch.no_grad()
    def _pack_int8(self) -> None:
        """Move the int8 codes into fbgemm's packed weight (one scale per output channel), freeing qweight."""
        self._packed = fbgemm_pack(self.qweight, self.scales)
        self.qweight = self.qweight.new_empty(0)
        _PACKED_LAYERS[self._handle] = self

    def _drop_packed(self) -> None:
        """Forget fbgemm's packed weight, making room for new codes in qweight (about to be overwritten)."""
        if self._packed is not None:
            self._packed, self.qweight = None, torch.empty(self.out_features, self.in_features, dtype=torch.int8)

    @torch.no_grad()
    def _unpack_int8(self) -> None:
        """Back from fbgemm's packed weight to the documented qweight [N, K] (no-op where not packed)."""
        if self._packed is not None:
            self.qweight = self.codes()  # int_repr of a fresh unpacked tensor: already a copy
            self._packed = None

    @torch.no_grad()
    def _to_kernel_layout(self, chunk: int = 16 * KERNEL_BLOCK) -> None:
        """Rewrite qweight in place in the CPU kernel's layout, a chunk of rows at a time (the int32 codes
        the conversion takes never exist for the whole matrix; 1024 rows took 23% less time than 4096 for
        DeepSeek-V2-Lite's expert shapes on a Zen3: ~22 ms per expert, ~37 s for its 1664 at start-up),
        and build the kernel's [K/g, N, 2] scales and offsets: it computes (q - 8) * scale + offset, so
        offset = zero + 8 * scale."""
        for s in range(0, self.out_features, chunk):
            rows = self.qweight[s:s + chunk]
            codes = torch.stack([rows & 15, rows >> 4], dim=-1).flatten(1).to(torch.int32)
            rows.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scale, zero = self.group_scales_zeros()
        self._kernel_scales = torch.stack([scale, zero + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self._kernel_layout = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel_layout or self._packed is not None:  # checkpoints hold the documented layout
            destination[prefix + "qweight"] = self.standard_qweight()

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_layout, self._kernel_scales, self._fast, self._operands = False, None, None, None
        self._drop_packed()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._unpack_int8()
        if self._kernel_layout:  # moved or cast: back to the documented layout, repacked at the next kernel call
            with torch.no_grad():
                self.qweight.copy_(self.standard_qweight())
            self._kernel_layout = False
        self._kernel_scales, self._fast, self._operands = None, None, None
        if self.bits == 8:
            return super()._apply(fn, recurse)
        units = self.units
        super()._apply(fn, recurse)
        if self.units.dtype != units.dtype:  # cast with the model: int4's units stay fp32
            self.units = units.to(self.units.device)
        return self


class KernelProduct(torch.autograd.Function):
    """nanoseek's int4 or int8 kernel with a backward to the activations (through the dequantized weight), so the
    same products come out whether or not autograd records them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        if layer.bits == 8:
            return torch.ops.nanoseek.int8_avx2_linear(x, layer.qweight, layer._int8_scales())
        return int4_products(x, layer.qweight, layer.scales, layer.zeros, layer.units)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


# fbgemm's packed weight is a TorchScript object, which a compiled graph cannot take as an input; the graph
# calls the product through this operator instead, naming the layer by a number fixed into the graph
_HANDLES = itertools.count()
_PACKED_LAYERS: weakref.WeakValueDictionary[int, QuantLinear] = weakref.WeakValueDictionary()


# `int8_products` of x [rows, K] (fp32) with the packed weight of the layer whose handle is `layer`
int8_linear = cpu_operator(
    "int8_linear(Tensor x, int layer) -> Tensor", lambda x, layer: int8_products(x, _PACKED_LAYERS[layer]._packed),
    lambda x, layer: x.new_empty(x.shape[0], _PACKED_LAYERS[layer].out_features))


def int8_products(x: torch.Tensor, packed) -> torch.Tensor:
    """x [rows, K] fp32 @ W.T through fbgemm's int8 x int8 kernel, the activations quantized to
    [-127, 127] with one scale per row: x ~ s_row * q_row, so the products are s_row * (q_row @ W.T).
    One row quantizes itself (asymmetric over its min..max, one fbgemm call)."""
    if x.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, False)
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127)  # (rows, 1)
    # the codes q go to fbgemm as the u8 q + 128
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x / scale, 1.0, 128, packed)
    return y.mul_(scale)


def converted_matmul(x: torch.Tensor, weight_rows, out_features: int) -> torch.Tensor:
    """x [rows, K] @ W.T for many rows, W given by `weight_rows(start, end, dtype)` (its output channels
    start..end in x's dtype) and converted one block of about CONVERT_WEIGHTS weights at a time, each
    block multiplied while it is in cache. No float copy of the whole weight is made (an R1-Distill
    head would be 0.9 GB in fp32 per prompt chunk), and on a CPU this is 1.1-4x faster than converting
    it whole (fresh memory for the copy faults in page by page; measured for [8960, 1536] and [1536, 8960]
    int8/int4 weights and 16-512 rows on an AMD EPYC Zen3)."""
    K = x.shape[1]
    block = max(KERNEL_BLOCK, CONVERT_WEIGHTS // K // KERNEL_BLOCK * KERNEL_BLOCK)
    if torch.is_grad_enabled() and x.requires_grad:  # a product autograd records (written out= it could not)
        return torch.cat([x @ weight_rows(s, s + block, x.dtype).t() for s in range(0, out_features, block)], dim=1)
    out = x.new_empty(out_features, x.shape[0])  # [N, rows]: each block of channels fills contiguous rows
    for start in range(0, out_features, block):
        torch.mm(weight_rows(start, start + block, x.dtype), x.t(), out=out[start:start + block])
    return out.t().contiguous()


class NarrowLinear(nn.Linear):
    """A linear layer whose weight (and bias) stay in bf16 while the activations are fp32: a bf16
    checkpoint computed in fp32 at bf16's memory, for CPUs that multiply bf16 slowly (AVX2 only). A few
    rows (decoding) go through nanoseek's kernel (`nanoseek::float_linear`: fp32 products, the weight widened
    as it is read, so a step reads 2 bytes per weight; where it does not run, torch's bf16 product, the
    activations rounded to bf16); more rows (prompts) convert the weight to fp32 a block at a time. The
    state dict is nn.Linear's, so checkpoints load and save unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):  # a gradient wanted: autograd's
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        # (the kernel reads contiguous weights of rows a multiple of 16 wide; otherwise torch's fp32 product would take
        # the operator's rows and widen the whole weight)
        if rows <= NARROW_KERNEL_ROWS and self.weight.dtype == torch.bfloat16 and self.in_features % 16 == 0 \
                and self.weight.is_contiguous() and float_linear_available():
            y = torch.ops.nanoseek.float_linear(x2, self.weight)
        elif rows <= NARROW_ROWS:
            y = F.linear(x2.to(self.weight.dtype), self.weight).to(x.dtype)
        else:
            y = converted_matmul(x2, lambda start, end, dtype: self.weight[start:end].to(dtype), self.out_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def narrow_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Make every quantizable Linear a NarrowLinear with its weight in `dtype`, in place (meant for a
    model built on the meta device, before its weights are loaded). A head tied to the embedding stays
    as it is (one tensor, in the model's dtype)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    replace_linears(model, lambda name, old: None if id(old.weight) in embeddings else narrow(old, dtype))
    if dtype == torch.bfloat16 and fp32:  # (kv_b_proj too, read by the MLA kernel)
        narrow_latent_projections(model)


def narrow(old: nn.Linear, dtype: torch.dtype) -> NarrowLinear:
    """An (empty) NarrowLinear of old's shape with its weight in dtype."""
    return NarrowLinear(old.in_features, old.out_features, old.bias is not None, device=old.weight.device, dtype=dtype)


def narrow_latent_projections(model: nn.Module) -> None:
    """Make MLA's float kv_b_proj layers (not quantized: see `quantizable`) NarrowLinear with bf16 weights, in place,
    for fp32 models that hold their other weights narrower: decoding reads them through nanoseek's kernel for
    fp32 activations against bf16 weights (the operator nanoseek::mla_attention; DeepSeek-V2-Lite reads 113 MB of them a token in
    bf16 against 226 in fp32)."""
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child == "kv_b_proj" and isinstance(module, nn.Linear) and not isinstance(module, NarrowLinear):
            setattr(model.get_submodule(parent) if parent else model, child, narrow(module, torch.bfloat16))


@cache
def _kernel_layout_index(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each code of a block of 64 rows x K inputs lies in the int4 CPU kernel's layout: the byte
    (within the block's 64 * K / 2) and the shift of its nibble (0 or 4). Found by converting the
    codes' own flat indices n * K + k, four bits at a time."""
    n = KERNEL_BLOCK * K
    flat = torch.arange(n, dtype=torch.int64).view(KERNEL_BLOCK, K)
    lo, hi = torch.zeros(n // 2, dtype=torch.int64), torch.zeros(n // 2, dtype=torch.int64)
    for shift in range(0, n.bit_length() + 3, 4):
        digits = ((flat >> shift) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 1).flatten().to(torch.int64)
        lo |= (packed & 15) << shift
        hi |= (packed >> 4) << shift
    byte, nibble_shift = torch.empty(n, dtype=torch.int64), torch.zeros(n, dtype=torch.uint8)
    byte[lo], byte[hi] = torch.arange(n // 2), torch.arange(n // 2)
    nibble_shift[hi] = 4
    return byte, nibble_shift


def kernel_layout_codes(packed: torch.Tensor, K: int) -> torch.Tensor:
    """int4 codes [N, K] (0..15) read out of the CPU kernel's layout [N, K / 2]."""
    byte, shift = _kernel_layout_index(K)
    blocks = packed.view(-1, KERNEL_BLOCK * K // 2)  # (N / 64, 64 * K / 2)
    return ((blocks[:, byte] >> shift) & 15).view(packed.shape[0], K)


def int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Unpack int4 codes [N, K / 2] (two per byte, even input low) to zero + q * scale, [N, K] in dtype.
    (Each nibble converted on its own: 2.7x faster on CPU than converting the interleaved codes, and as
    fast as a compiled version, measured.)"""
    return int4_affine(torch.stack([(qweight & 15).to(dtype), (qweight >> 4).to(dtype)], dim=-1), scales, zeros,
                       group_size)


def int4_affine(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes already in a float dtype, N rows of K in order -> zero + q * scale per group, [N, K]."""
    q = q.reshape(q.shape[0], -1, group_size)  # (N, K/g, g)
    return (q * scales.to(q.dtype)[..., None]).add_(zeros.to(q.dtype)[..., None]).flatten(1)


def prepare_kernels(model: nn.Module) -> None:
    """Put every quantized layer of a CPU model in its kernel's layout now (a serving process does this at
    startup, so its first request does not pay for it), several layers at once (torch's packing runs
    outside the GIL, mostly on one core). Packing frees each layer's codes as it goes; the freed memory is
    handed back to the system every PACK_TRIM_BYTES of codes (glibc keeps it otherwise: a DeepSeek-V2-Lite
    int8 model peaked at 23.2 GB with one hand-back at the end, against 15 GB of codes)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.qweight.device.type == "cpu"]
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        batch, size = [], 0
        for i, layer in enumerate(layers):
            batch.append(layer)
            size += layer.in_features * layer.out_features * layer.bits // 8
            if size >= PACK_TRIM_BYTES or i == len(layers) - 1:
                list(pool.map(QuantLinear._kernel_ready, batch))
                give_back_freed_memory()
                batch, size = [], 0


def weight_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers (a quantized layer's codes and scales are buffers)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim; nothing elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def quantizable(model: nn.Module, latent: bool = False) -> list[str]:
    """Names of the Linear layers to quantize: every nn.Linear of the model (attention, MLPs, experts,
    lm_head) but MLA's kv_b_proj unless `latent`: the absorbed attention reads its weight as a matrix, in
    int4 through its own operator (nanoseek::mla_attention_int4), at other widths as a float weight (it
    is small: kv_lora_rank x heads x (nope + v)). Router gates and norms are not Linear and stay float."""
    return [name for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, nn.Linear) and (latent or not name.endswith("kv_b_proj"))]


def swap_linears(model: nn.Module, bits: int, group_size: int = GROUP, dtype: torch.dtype = torch.bfloat16,
                 convert_dtype: torch.dtype | None = None) -> None:
    """Replace every quantizable Linear by an (empty) QuantLinear, in place; meant for a model built on
    the meta device, before its weights are loaded. An int4 layer whose input width is not a multiple
    of the group size is made int8. Tied weights (lm_head tied to the embedding, MTP's shared head)
    are untied: the embedding stays float, the head is quantized. MLA's kv_b_proj is quantized at int4 where
    its input width (kv_lora_rank) is a multiple of LATENT_MULTIPLE, what its operator's products take
    (DeepSeek-V2-Lite reads 32 MB of it a token against 113 in bf16), else kept float; float, with a
    convert_dtype narrower than dtype (bf16 prompts under fp32 decoding), it is kept in that dtype
    (narrow_latent_projections)."""
    def make(name: str, old: nn.Linear) -> QuantLinear | None:
        if name.endswith("kv_b_proj") and old.in_features % LATENT_MULTIPLE:
            return None
        b = bits if bits == 8 or old.in_features % group_size == 0 else 8
        with torch.device(old.weight.device):
            return QuantLinear(old.in_features, old.out_features, b, old.bias is not None, group_size, dtype, convert_dtype)

    replace_linears(model, make, latent=bits == 4 and group_size == GROUP)
    if convert_dtype == torch.bfloat16 and dtype == torch.float32:
        narrow_latent_projections(model)


def replace_linears(model: nn.Module, make, latent: bool = False) -> None:
    """Put `make(name, old)` in place of every quantizable Linear (`quantizable(model, latent)`; where it returns
    a module, not None), in place; a module shared under two names (MTP's head is lm_head) is replaced once, by
    one module."""
    new: dict[int, nn.Module | None] = {}
    for name in quantizable(model, latent):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, child)
        if id(old) not in new:
            new[id(old)] = make(name, old)
        if new[id(old)] is not None:
            setattr(owner, child, new[id(old)])
