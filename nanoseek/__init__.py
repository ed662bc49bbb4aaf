"""nanoseek: DeepSeek's whole system (V3 model, pretraining, SFT, GRPO, distillation, inference, API) in one small package.

The public names load on first use, so `python -m nanoseek --help` does not import torch."""

from importlib import import_module

__version__ = "0.1.0"
_LAZY = {"CheckpointError": ".checkpoint", "load_model": ".checkpoint", "save_model": ".checkpoint",
         "ConfigError": ".model", "DeepseekForCausalLM": ".model", "ModelConfig": ".model", "build_model": ".model",
         "get_preset": ".model", "DeepSeekTokenizer": ".tokenizer"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_LAZY[name], __name__), name)
