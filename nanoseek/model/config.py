"""ModelConfig: the DeepSeek-V2/V3 configuration and its derivatives', with Hugging Face's field names.

Field names and defaults follow transformers' DeepseekV3Config (the defaults are the
DeepSeek-V3 shapes), so a checkpoint's config.json loads with `ModelConfig.from_dict`.
V2-only knobs (`topk_method`, `scoring_func`) are real fields here: the router reads them
instead of hard-coding one family. Named presets live in `PRESETS` at the bottom.

The R1-Distill derivatives are Qwen2 and Llama models, and DeepSeek-R1-0528-Qwen3-8B a Qwen3 one: the
same skeleton (embedding, pre-norm decoder layers, final norm, head) with grouped-query attention
(`num_key_value_heads`, `head_dim`) over the whole head instead of MLA (Qwen3 normalises each head's
queries and keys first), and a dense SwiGLU MLP in every layer. `from_dict` reads their config.json with
the defaults of transformers' Qwen2Config / Qwen3Config / LlamaConfig; for them the MLA, MoE and MTP
fields are unused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ROUTING = {  # scoring_func -> topk_methods it supports
    "sigmoid": ("noaux_tc",),
    "softmax": ("greedy", "group_limited_greedy"),
}
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
GQA_FAMILIES = ("qwen2", "qwen3", "llama")  # grouped-query attention, dense MLPs
QWEN = ("qwen2", "qwen3")  # MLPs without biases (no mlp_bias field), optional sliding-window layers
ROPE_TYPES = ("yarn", "llama3", "linear")
# the fields a Qwen2/Qwen3/Llama config.json holds (MLA, MoE and MTP fields are DeepSeek's only)
GQA_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
              "rope_scaling", "hidden_act", "rms_norm_eps", "initializer_range", "attention_bias", "mlp_bias",
              "attention_dropout", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


# transformers' DeepseekV2Config defaults where they differ from DeepseekV3Config's (the dataclass's): a V2 config.json
# without the field means these (n_group: none, which V2's greedy routing never reads)
V2_DEFAULTS = {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
               "num_hidden_layers": 32, "num_attention_heads": 32, "n_routed_experts": 64, "n_shared_experts": 2,
               "n_group": None, "topk_group": None, "topk_method": "greedy", "scoring_func": "softmax",
               "norm_topk_prob": False, "routed_scaling_factor": 1.0, "first_k_dense_replace": 0,
               "num_nextn_predict_layers": 0, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}
# rope_scaling's numbers (transformers' yarn, llama3 and linear keys)
ROPE_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor", "low_freq_factor", "high_freq_factor")
# what each annotation of a field admits, in words
KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "dict": "an object",
         "list[int]": "a list of integers", "None": "null"}


def _is(value, kind: str) -> bool:
    """Whether a JSON value is of the kind a field's annotation names ('int', 'float', 'bool', ...)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"int": number and isinstance(value, int), "float": number and math.isfinite(value),
            "bool": isinstance(value, bool), "str": isinstance(value, str), "dict": isinstance(value, dict),
            "list[int]": isinstance(value, list) and all(_is(v, "int") for v in value), "None": value is None}[kind]


class ConfigError(ValueError):
    """A config.json field is missing, has the wrong type or is out of range."""


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense-layer SwiGLU width
    moe_intermediate_size: int = 2048  # per-expert SwiGLU width
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA: always equal to num_attention_heads; GQA: fewer
    head_dim: int | None = None  # GQA only: per-head width (default hidden_size / num_attention_heads)
    # MLA
    q_lora_rank: int | None = 1536  # None: plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3  # layers below this index use a dense MLP
    moe_layer_freq: int = 1
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"  # noaux_tc (V3) | greedy | group_limited_greedy (V2)
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (training only)
    seq_aux: bool = True
    # MTP
    num_nextn_predict_layers: int = 1
    # positions
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # rope channels stored as consecutive pairs (DeepSeek's weights)
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False  # Qwen2: biases on q/k/v; Llama, Qwen3: on q/k/v/o; DeepSeek: q_a/kv_a/o
    mlp_bias: bool = False  # Llama only
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # fields we carry but do not use

    def __post_init__(self):
        if self.model_type == "deepseek_v2":  # V2's greedy routing reads no groups: none means one, all kept
            if self.n_group is None:
                self.n_group, self.topk_group = 1, 1
            elif self.topk_group is None:
                self.topk_group = self.n_group
        self.check_types()
        if self.num_key_value_heads is None or not self.is_gqa:  # MLA has no key-value heads (transformers'
            self.num_key_value_heads = self.num_attention_heads  # DeepseekV3Config defaults the unused field to 128)
        if self.model_type in QWEN:
            self.mlp_bias = False  # no such field: transformers' Qwen2 and Qwen3 MLPs never have biases
        if self.model_type == "deepseek_v2":  # transformers' DeepseekV2 rotates interleaved pairs and never
            self.rope_interleave, self.norm_topk_prob = True, False  # renormalises (false in every V2 release)
        if self.is_gqa:
            if self.head_dim is None and self.num_attention_heads:
                self.head_dim = self.hidden_size // self.num_attention_heads
            # no MLA, no MoE, no MTP: every layer is attention + a dense MLP
            self.n_routed_experts = self.n_shared_experts = self.num_nextn_predict_layers = 0
            self.first_k_dense_replace = self.num_hidden_layers
            self.q_lora_rank, self.rope_interleave = None, False
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            elif kind in ("yarn", "llama3"):
                # as transformers reads it: a top-level original_max_position_embeddings wins over the scaling's
                # own (Phi3 saved it there), which falls back to the context length
                top = self.extra.get("original_max_position_embeddings")
                if top or not self.rope_scaling.get("original_max_position_embeddings"):
                    self.rope_scaling["original_max_position_embeddings"] = top or self.max_position_embeddings
            rs = self.rope_scaling
            if rs is not None and not rs.get("factor") and rs.get("original_max_position_embeddings"):
                # transformers derives a missing factor from the context lengths
                rs["factor"] = self.max_position_embeddings / rs["original_max_position_embeddings"]
        self.validate()

    # ---- derived sizes ----
    @property
    def is_gqa(self) -> bool:
        """Grouped-query attention over whole heads (Qwen2, Qwen3, Llama) rather than MLA."""
        return self.model_type in GQA_FAMILIES

    @property
    def qk_norm(self) -> bool:
        """Each head's queries and keys RMS-normalised before RoPE (Qwen3)."""
        return self.model_type == "qwen3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rotary_dim(self) -> int:
        """Channels RoPE rotates: the decoupled rope part (MLA) or the whole head (GQA)."""
        return self.head_dim if self.is_gqa else self.qk_rope_head_dim

    @property
    def kv_cache_shape(self) -> tuple[int, int]:
        """What one token leaves in the KV cache per layer: (heads, width). MLA caches one latent
        [c_kv ; k_pe] shared by every head; GQA caches k and v of each key-value head as two "heads"
        (k of kv head h at 2h, its v at 2h + 1)."""
        if self.is_gqa:
            return 2 * self.num_key_value_heads, self.head_dim
        return 1, self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def sliding_layers(self) -> list[int]:
        """The layers a Qwen2/Qwen3 config gives sliding-window attention, as transformers reads it: with
        use_sliding_window, those its layer_types name, else those from max_window_layers on."""
        e = self.extra
        if self.model_type not in QWEN or not e.get("use_sliding_window") or e.get("sliding_window", 4096) is None:
            return []
        kinds = e.get("layer_types") or ["sliding_attention" if i >= e.get("max_window_layers", 28) else "full"
                                         for i in range(self.num_hidden_layers)]
        return [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ---- validation ----
    def check_types(self) -> None:
        """Every field of the kind its annotation names, and rope_scaling's numbers numbers: config.json is JSON, and a
        string "2.5", a null or a "false" where a number or a boolean belongs is refused, naming the field, rather
        than read as something else (the string "false" is truthy) or failing later in the forward."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), f.type.split(" | ")
            if f.name != "extra" and not any(_is(value, kind) for kind in kinds):
                raise ConfigError(f"config field '{f.name}' = {value!r}: must be {' or '.join(KINDS[k] for k in kinds)}")
        for key, value in (self.rope_scaling or {}).items():
            if key in ROPE_NUMBERS and not (value is None or _is(value, "float")):
                raise ConfigError(f"config field 'rope_scaling.{key}' = {value!r}: must be a number")

    def validate(self) -> None:
        def need(cond: bool, name: str, why: str):
            if not cond:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture model_type={self.model_type!r}; nanoseek loads {sorted(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        if self.is_gqa:
            need(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim",
                 "must be a positive even integer (rotation pairs)")
            need(isinstance(self.num_key_value_heads, int) and self.num_key_value_heads > 0
                 and self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"must divide num_attention_heads={self.num_attention_heads}")
            need(self.intermediate_size > 0, "intermediate_size", "must be > 0")
            if self.sliding_layers:
                raise ConfigError("config field 'use_sliding_window' = true: sliding-window attention is not "
                                  "supported (the R1-Distill models do not use it)")
        else:
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                     "must be a positive integer")
            need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
                 "q_lora_rank", "must be null or a positive integer")
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rotation pairs)")
            need(not self.mlp_bias, "mlp_bias", "DeepSeek's MLPs and experts have no biases here")
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                     "num_nextn_predict_layers"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(self.hidden_act in ("silu", "swish"), "hidden_act", "only 'silu' (also called 'swish') is supported")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.first_k_dense_replace == 0 or self.intermediate_size > 0, "intermediate_size",
             "must be > 0 when there are dense layers")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
            need(self.scoring_func in ROUTING, "scoring_func", f"must be one of {sorted(ROUTING)}")
            need(self.topk_method in ROUTING[self.scoring_func], "topk_method",
                 f"with scoring_func={self.scoring_func!r} must be one of {ROUTING[self.scoring_func]}")
            need(isinstance(self.n_group, int) and self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 "n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            need(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(isinstance(self.num_experts_per_tok, int)
                 and 1 <= self.num_experts_per_tok <= self.topk_group * per_group,
                 "num_experts_per_tok", f"must be in [1, topk_group * experts per group = {self.topk_group * per_group}]")
            if self.topk_method == "noaux_tc":
                need(per_group >= 2, "n_group", "noaux_tc scores groups by their top-2 experts: "
                     "each group needs at least 2 experts")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ROPE_TYPES:
                raise ConfigError(f"config field 'rope_scaling' type {kind!r} is not supported (one of {ROPE_TYPES})")
            if not (rs.get("factor") or 0) > 0:
                raise ConfigError("config field 'rope_scaling.factor' must be > 0")
            if kind != "linear" and not (rs.get("original_max_position_embeddings") or 0) > 0:
                raise ConfigError("config field 'rope_scaling.original_max_position_embeddings' must be > 0")
            if kind == "llama3" and not 0 < rs.get("low_freq_factor", 0) < rs.get("high_freq_factor", 0):
                raise ConfigError("config field 'rope_scaling': llama3 needs 0 < low_freq_factor < high_freq_factor")

    # ---- (de)serialisation in Hugging Face's config.json format ----
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        rp = d.pop("rope_parameters", None)  # transformers v5 spelling
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"config field 'rope_parameters' = {rp!r}: must be an object")
        if rp:  # its own rope_theta wins over a top-level one, as transformers reads it
            if "rope_theta" in rp:
                d["rope_theta"] = rp["rope_theta"]
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if d.get("model_type") in GQA_FAMILIES:  # transformers' Qwen2Config / Qwen3Config / LlamaConfig defaults
            qwen = d["model_type"] in QWEN
            d.setdefault("max_position_embeddings", 32768 if qwen else 2048)
            d.setdefault("bos_token_id", None if qwen else 1)
            d.setdefault("eos_token_id", None if qwen else 2)
            if d["model_type"] == "qwen2":
                d["attention_bias"] = True  # Qwen2 always has q/k/v biases (no config field)
            if d["model_type"] == "qwen3":
                d.setdefault("head_dim", 128)  # Qwen3's own default, not hidden_size / heads
        if d.get("model_type") == "deepseek_v2":  # transformers' DeepseekV2Config defaults, where they differ from V3's
            for k, v in V2_DEFAULTS.items():
                d.setdefault(k, v)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        for k, v in known.items():
            want = cls.__dataclass_fields__[k].type
            if "int" in want and "float" not in want and isinstance(v, float) and v.is_integer():
                known[k] = int(v)
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise ConfigError(f"bad config: {e}") from None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.is_gqa:
            d = {k: d[k] for k in GQA_FIELDS if not (k == "mlp_bias" and self.model_type in QWEN)}
        else:  # DeepSeek's config.json has no head_dim (transformers derives its own) and no mlp_bias
            del d["head_dim"], d["mlp_bias"]
        keep = {k: v for k, v in self.extra.items() if k not in ("quantization_config", "torch_dtype", "dtype",
                                                                   "architectures", "auto_map", "transformers_version")}
        d.update(keep)
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        if self.model_type == "deepseek_v3":
            d["num_mtp_layers"] = self.num_nextn_predict_layers  # transformers' alias
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Rows of the embedding for a tokenizer of n ids: rounded up for the matmuls (the extra rows
    are never targets)."""
    return -(-n // multiple) * multiple


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not stretching)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---- named presets ----
def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS = {
    # the shared test model: every code path (q_lora, MoE with groups, dense layer, MTP) at toy size
    "tiny": lambda: _preset(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        num_nextn_predict_layers=1, max_position_embeddings=512, initializer_range=0.02,
    ),
    # minutes on a laptop CPU: ~4M total / ~2M active parameters (the calibration shape)
    "cpu-tiny": lambda: _preset(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
        num_nextn_predict_layers=1, max_position_embeddings=2048, initializer_range=0.02,
    ),
    # a smaller dense derivative (every layer a plain SwiGLU MLP) for distillation
    "cpu-dense-small": lambda: _preset(
        vocab_size=4096, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=48,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=3, n_group=1, topk_group=1,
        num_nextn_predict_layers=1, max_position_embeddings=2048, initializer_range=0.02,
    ),
    # one GPU, a real text corpus: ~0.96B total / ~0.2B active parameters (bf16 autocast, seq 4096)
    "gpu-1b": lambda: _preset(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=12, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=48,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2,
        num_nextn_predict_layers=1, max_position_embeddings=4096, initializer_range=0.006,
    ),
    # the real shapes, for configs and loading released checkpoints
    "deepseek-v3": lambda: _preset(
        max_position_embeddings=163840, aux_loss_alpha=0.0001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    "deepseek-v2-lite": lambda: _preset(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=1.0, aux_loss_alpha=0.001, num_nextn_predict_layers=0,
        max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with any field overridden: get_preset('tiny', vocab_size=1000)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
