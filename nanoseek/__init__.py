"""nanoseek: DeepSeek's whole system (V3 model, pretraining, SFT, GRPO, distillation, inference, API) in one small package."""

from .checkpoint import CheckpointError, load_model, save_model
from .model import ConfigError, DeepseekForCausalLM, ModelConfig, build_model, get_preset

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DeepseekForCausalLM", "ModelConfig", "build_model",
           "get_preset", "load_model", "save_model"]
