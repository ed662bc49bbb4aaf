"""The decode step of an MLA model in one call of nanoseek's C++ (`nanoseek::mla_step`, kernels/step.cpp).

A small model's token is mostly overhead around its arithmetic: the shipped model's compiled step (an inductor graph
called through dynamo) took ~0.9 ms on a 2-vCPU Zen3 where its weights' reads and products take ~0.2, and llama.cpp's
whole token 0.35. Here the step is the kernels the compiled graph calls (float products, MLA's attention over the
latents, the experts), run one after the other from C++ with the element-wise work between them written out, and the
engine's bookkeeping around it is one call: the new latents are written into the cache and each row's length advanced
inside it. A large model quantized to int8 on a CPU where nanoseek's AVX2 int8 kernel multiplies it (no VNNI: see
quant.fbgemm_int8), or to int4 (nanoseek's int4 kernel, AVX2 or AVX-512 VNNI), decodes through it too: DeepSeek-V2-Lite's
eager step made ~630 kernel calls a token, each its own parallel region, with ~25 ms of small operations between them;
here its products and experts are int8.cpp's or int4.cpp's, and an int4 kv_b_proj's key product mla.cpp's.

`NativeStep.build(model, cache)` describes the model to the kernel as a table of sizes and weight addresses (the
layout step.cpp documents), or returns None where the kernel does not take it: a GQA model, int8 layers another kernel
multiplies (fbgemm's, with VNNI), int4 layers nanoseek's kernel does not take (groups other than 32, torch's layout,
inputs not a multiple of 64), float weights other than fp32 or bf16 or over FLOAT_MAX_BYTES of them,
activations other than fp32, widths the products do not take, float experts not stacked (MoE.prepare_compiled_decode),
forward hooks on any module (which the step would skip), or a library built without it. It reads the model's weights
where they lie, but for a float kv_b_proj's key half, which it keeps transposed (fp32) per head: `refresh()` (the
engine calls it when the weights changed, with the stacked experts) copies it again. Weights that bf16 holds exactly (a bf16 checkpoint loaded in fp32,
as the shipped model is) are read from bf16 copies (`exact_bf16`): the same numbers at half the bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ISA_AVX512, int4_isa, runs_here
from ..model import DeepseekForCausalLM
from ..model.attention import MLA
from ..model.moe import MoE
from ..quant import QuantLinear, weight_bytes
from .cache import KVCache

_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}
_LATENT_WIDTH = 1024 + 128  # c + r at most (mla.cpp)
# float models up to this much weight (the shipped model's size class: overhead-bound steps; a larger float model's
# step is its weights' reads, which the C++ step was not measured to speed up); int8 ones at any size
FLOAT_MAX_BYTES = 256 * 2**20


class NativeStep:
    def __init__(self, model: DeepseekForCausalLM, cache: KVCache):
        self.model, self.cache = model, cache
        self.lengths = cache.lengths[0]  # the main layers' lengths [rows] (a view the step advances)
        self.vocab = model.config.vocab_size
        self._keep: list[torch.Tensor] = []  # what the table points to
        self.table = self.numbers = None

    @classmethod
    def build(cls, model: DeepseekForCausalLM, cache: KVCache) -> "NativeStep | None":
        """The step for this model and cache, or None where nanoseek's kernel does not take them (see the module)."""
        if not _takes(model, cache):
            return None
        step = cls(model, cache)
        step.refresh()
        return step

    def refresh(self) -> None:
        """Describe the model as it is now (after its weights changed: kv_b_proj's transposed key half copied again,
        the experts' stacks as MoE.prepare_compiled_decode left them)."""
        m, cfg = self.model, self.model.config
        keep: list[torch.Tensor] = []
        ints: list[int] = []
        nums: list[float] = []

        def ptr(t: torch.Tensor | None) -> int:
            if t is None:
                return 0
            keep.append(t)
            return t.data_ptr()

        def weight(w: torch.Tensor) -> list[int]:
            w = exact_bf16(w.detach())
            return [ptr(w), int(w.dtype == torch.bfloat16)]

        def mat(layer: nn.Module) -> list[int]:
            if isinstance(layer, QuantLinear):
                if layer.bits == 4:  # codes, scale codes, zero codes, units (int4.cpp)
                    return [ptr(layer.qweight), ptr(layer.bias), layer.out_features, layer.in_features, 3,
                            ptr(layer.scales), ptr(layer.zeros), ptr(layer.units)]
                # int8 codes [N, K] and fp32 scales [N] (int8.cpp)
                return [ptr(layer.qweight), ptr(layer.bias), layer.out_features, layer.in_features, 2,
                        ptr(layer._int8_scales()), 0, 0]
            w, bf16 = weight(layer.weight)
            return [w, ptr(layer.bias), *layer.weight.shape, bf16, 0, 0, 0]

        attn0: MLA = m.model.layers[0].self_attn
        H, dn, dr, dv, c = attn0.n_heads, attn0.nope_dim, attn0.rope_dim, attn0.v_dim, attn0.kv_rank
        positions = self.cache.max_len
        cos, sin = m.model.rotary_emb(torch.arange(positions, device=self.cache.kv.device)[None])  # (1, P, dr/2)
        embed = m.model.embed_tokens.weight
        ints += [cfg.hidden_size, cfg.vocab_size, m.model.n_main, H, dn, dr, dv, c, int(attn0.interleaved),
                 ptr(embed), int(embed.dtype == torch.bfloat16), ptr(m.model.norm.weight), *mat(m.lm_head),
                 ptr(cos[0].contiguous()), ptr(sin[0].contiguous()), positions]
        nums += [m.model.norm.eps, attn0.softmax_scale]
        for layer in m.model.layers[: m.model.n_main]:
            a: MLA = layer.self_attn
            ints += [ptr(layer.input_layernorm.weight), int(a.q_lora)]
            if a.q_lora:
                ints += [*mat(a.q_a_proj), ptr(a.q_a_layernorm.weight), *mat(a.q_b_proj)]
            else:
                ints += mat(a.q_proj)
            if isinstance(a.kv_b_proj, QuantLinear):  # int4: the key product reads its codes (mla.cpp)
                w_ukT = [0, 0]
            else:
                kv_b = a.kv_b_proj.weight.detach()
                w_ukT = weight(kv_b.view(H, dn + dv, c)[:, :dn].transpose(1, 2).contiguous())  # (H, c, dn)
            ints += [*mat(a.kv_a_proj_with_mqa), ptr(a.kv_a_layernorm.weight), *w_ukT, *mat(a.kv_b_proj),
                     *mat(a.o_proj), ptr(layer.post_attention_layernorm.weight), int(layer.is_moe)]
            if layer.is_moe:
                moe: MoE = layer.mlp
                g = moe.gate
                ints += [ptr(g.weight), ptr(g.e_score_correction_bias if g.has_bias else None), g.n_experts, g.top_k,
                         g.n_group, g.topk_group, int(g.scoring_func == "sigmoid"), _METHODS[g.topk_method],
                         int(g.norm_topk_prob)]
                if moe.one_operator():  # int4 experts: the layer's own table of them (MoE._refresh_int4; int4.cpp reads it)
                    ints += [3, ptr(moe._int4), len(moe._int4)]
                elif moe.stacked is None:  # int8 experts: a row each (the shared ones one row), their layers' addresses
                    experts = [*moe.experts, *([moe.shared_experts] if moe.shared_experts is not None else [])]
                    table = torch.tensor([[x for proj in (e.gate_proj, e.up_proj, e.down_proj)
                                           for x in (ptr(proj.qweight), ptr(proj._int8_scales()))] + [e.gate_proj.out_features]
                                          for e in experts], dtype=torch.int64)  # (experts, 7)
                    ints += [2, ptr(table), len(experts)]
                else:
                    gate_up, down = (exact_bf16(t) for t in moe.stacked)
                    if gate_up.dtype != down.dtype:
                        gate_up, down = moe.stacked
                    chunks = len(moe.experts) + moe.n_shared
                    ints += [int(down.dtype == torch.bfloat16), ptr(gate_up), ptr(down), chunks, down.shape[1] // chunks]
            else:
                ints += [*mat(layer.mlp.gate_proj), *mat(layer.mlp.up_proj), *mat(layer.mlp.down_proj)]
            nums.append(layer.input_layernorm.eps)
            if a.q_lora:
                nums.append(a.q_a_layernorm.eps)
            nums += [a.kv_a_layernorm.eps, layer.post_attention_layernorm.eps]
            if layer.is_moe:
                nums.append(layer.mlp.gate.scale)
        self.table = torch.tensor(ints, dtype=torch.int64)
        self.numbers = torch.tensor(nums, dtype=torch.float64)
        self._keep = keep

    def __call__(self, ids: list[int], first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, the last token of cache rows first_row.. -> their next logits [B, V] (fp32) and greedy choices [B] (int64,
        argmax's); their new latents are written into the cache and their lengths advanced."""
        return torch.ops.nanoseek.mla_step(ids, self.cache.kv, self.lengths, first_row, self.table, self.numbers,
                                           self.vocab)


def exact_bf16(w: torch.Tensor) -> torch.Tensor:
    """An fp32 weight as bf16 where bf16 holds every value exactly (a bf16 checkpoint, such as the shipped model, loaded
    in fp32), else the weight itself: the step computes the same numbers reading half the bytes (a small model's batch-1
    step is its weights' reads)."""
    if w.dtype == torch.float32:
        narrow = w.to(torch.bfloat16)
        if torch.equal(narrow.float(), w):
            return narrow
    return w


def hooked(module: nn.Module) -> bool:
    """Whether forward hooks are set on the module (the step never runs the modules' forward, so a model someone
    watches or changes through hooks decodes through its forward)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _takes(model: DeepseekForCausalLM, cache: KVCache) -> bool:
    cfg = model.config
    kv = cache.kv
    if any(hooked(m) for m in model.modules()):
        return False
    if cfg.is_gqa or kv.device.type != "cpu" or kv.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or not kv.is_contiguous() or kv.shape[2] != 1 or not runs_here("mla_step"):
        return False
    width = 16 if int4_isa() == ISA_AVX512 else 8  # what the products take: inputs a multiple of the vector width
    c, dn = cfg.kv_lora_rank, cfg.qk_nope_head_dim
    if c + cfg.qk_rope_head_dim > _LATENT_WIDTH or c % width or dn % width or cfg.qk_rope_head_dim % 2:
        return False
    m = model.model
    small = weight_bytes(model) < FLOAT_MAX_BYTES
    if m.embed_tokens.weight.dtype not in (torch.float32, torch.bfloat16) or \
            any(p.dtype != torch.float32 for name, p in m.named_parameters() if name.endswith("norm.weight")):
        return False
    for layer in m.layers[: m.n_main]:
        a = layer.self_attn
        if not (_float(a.kv_b_proj, width) or _int4(a.kv_b_proj)):  # (float whatever the model's size)
            return False
        linears = [a.kv_a_proj_with_mqa, a.o_proj]
        linears += [a.q_a_proj, a.q_b_proj] if a.q_lora else [a.q_proj]
        if isinstance(layer.mlp, MoE):
            moe, g = layer.mlp, layer.mlp.gate
            if g.weight.dtype != torch.float32 or g.topk_method not in _METHODS or \
                    (g.n_group > 1 and g.n_experts % g.n_group):
                return False
            if not _experts(moe):
                return False
        else:
            linears += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if not all(_int8(lin) or _int4(lin) or (small and _float(lin, width)) for lin in linears):
            return False
    return _int8(model.lm_head) or _int4(model.lm_head) or (small and _float(model.lm_head, width))


def _experts(moe: MoE) -> bool:
    """Whether the kernel takes the layer's experts: int4 ones in the layer's own table of them (MoE.one_operator), int8
    ones each multiplied by int8.cpp's kernel, or float ones stacked for float.cpp's (MoE.prepare_compiled_decode)."""
    if moe.one_operator():
        return True
    if moe.stacked is not None:
        return moe.float_kernel
    experts = [*moe.experts, *([moe.shared_experts] if moe.shared_experts is not None else [])]
    return all(_int8(proj) and proj.bias is None for e in experts for proj in (e.gate_proj, e.up_proj, e.down_proj))


def _float(layer: nn.Module, width: int) -> bool:
    """Whether the kernel's float product takes this layer: a plain linear layer, its weight fp32 or bf16 (contiguous,
    inputs a multiple of the vector width), its bias none or fp32."""
    return isinstance(layer, nn.Linear) and layer.weight.dtype in (torch.float32, torch.bfloat16) and \
        layer.weight.is_contiguous() and layer.in_features % width == 0 and _bias_ok(layer)


def _int8(layer: nn.Module) -> bool:
    """Whether the kernel's int8 product takes this layer: an int8 layer that nanoseek's own AVX2 kernel multiplies
    (QuantLinear._fast_int8: no VNNI here, inputs a multiple of 32), its bias none or fp32."""
    if not isinstance(layer, QuantLinear) or layer.bits != 8 or layer.qweight.device.type != "cpu":
        return False
    layer._kernel_ready()  # (its fp32 scales, as its first product would make them)
    return layer._fast_int8() and _bias_ok(layer)


def _int4(layer: nn.Module) -> bool:
    """Whether the kernel's int4 product takes this layer: an int4 layer that nanoseek's own kernel multiplies in its
    documented layout (QuantLinear._fast_int4: groups of 32), inputs a multiple of 64, its bias none or fp32."""
    return isinstance(layer, QuantLinear) and layer.bits == 4 and layer._fast_int4() and layer.in_features % 64 == 0 \
        and _bias_ok(layer)


def _bias_ok(layer: nn.Module) -> bool:
    return layer.bias is None or (layer.bias.dtype == torch.float32 and layer.bias.is_contiguous())
