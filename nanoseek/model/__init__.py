"""The DeepSeek-V2/V3 model. Imports nothing from the rest of nanoseek."""

from .config import ConfigError, ModelConfig, PRESETS, get_preset, padded_vocab
from .moe import update_router_bias
from .transformer import DeepseekForCausalLM, ModelOutput, build_model

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "get_preset", "padded_vocab", "update_router_bias",
           "DeepseekForCausalLM", "ModelOutput", "build_model"]
