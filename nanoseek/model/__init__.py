"""The DeepSeek-V2/V3 model. Imports nothing from the rest of nanoseek.

`config` (shapes and presets, no torch) loads at once; the torch modules load on first use of
their names, so reading a preset (e.g. for `nanoseek --help`) does not import torch."""

from importlib import import_module

from .config import PRESETS, ConfigError, ModelConfig, get_preset, padded_vocab

_LAZY = {"update_router_bias": ".moe", "DeepseekForCausalLM": ".transformer", "ModelOutput": ".transformer",
         "build_model": ".transformer"}

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "get_preset", "padded_vocab", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_LAZY[name], __name__), name)
