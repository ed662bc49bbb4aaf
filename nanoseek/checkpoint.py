"""Hugging Face-format checkpoints: config.json + (sharded) safetensors, DeepSeek's FP8 included.

`load_model(path)` reads what DeepSeek publishes (V2/V2-Lite in bf16, V3/R1 in FP8 with
128x128 block scales, the R1-Distill Qwen2/Llama models and R1-0528-Qwen3-8B in bf16) and what transformers writes; `save_model(model, path)` writes a folder
that `transformers.AutoModelForCausalLM.from_pretrained` loads. Tensor names are the model's
own attribute names, so loading is a strict name-for-name copy, one shard at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_write
from .model import DeepseekForCausalLM, ModelConfig, build_model
from .model.config import ARCHITECTURES, ConfigError
from .quant import BITS, GROUP, INT4_FORMAT, QuantLinear, narrow_linears, swap_linears

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or does not fit the model it describes."""


SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")  # every config.json has them


def load_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """-> (ModelConfig, the raw config.json dict)."""
    f = Path(path) / "config.json"
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such folder")
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: a file; give the model's folder" + (
            f" ({Path(path).parent})" if Path(path).name == "config.json" else ""))
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: a JSON object of the model's settings expected, not a {type(raw).__name__}")
    if "model_type" not in raw:
        archs = raw.get("architectures") or []
        guess = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
        raw["model_type"] = next((guess[a] for a in archs if a in guess), None)
    if raw["model_type"] not in ARCHITECTURES:
        raise ConfigError(f"{f}: unknown architecture (model_type={raw.get('model_type')!r}, "
                          f"architectures={raw.get('architectures')}); nanoseek loads {', '.join(ARCHITECTURES)}")
    missing = [k for k in SHAPE_FIELDS if k not in raw]
    if missing:  # a default (DeepSeek-V3's 61 layers) would describe some other model
        raise ConfigError(f"{f}: {', '.join(missing)} missing: the model's shape cannot be known without it")
    return ModelConfig.from_dict(raw), raw


def has_mtp_weights(config: ModelConfig, weight_map: dict[str, str]) -> bool:
    """Whether the checkpoint holds the MTP layer its config declares (transformers writes none: such a model
    loads without MTP)."""
    return any(k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in weight_map)


def shard_map(path: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single file; every file's header read (a truncated
    or foreign file is a CheckpointError here, before anything is loaded)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        missing = sorted({s for s in weight_map.values() if not (path / s).is_file()})
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {INDEX} are missing: {', '.join(missing)}")
        for shard in sorted(set(weight_map.values())):
            with _open(path / shard):
                pass
        return weight_map
    if (path / SINGLE).is_file():
        with _open(path / SINGLE) as f:
            return {k: SINGLE for k in f.keys()}
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}" + (
        f"; its {pickled[0]} is a PyTorch pickle, which nanoseek does not read (loading one runs the code it holds): "
        "convert it to safetensors (transformers: from_pretrained, then save_pretrained)" if pickled else ""))


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of weights in a model folder (all its safetensors files)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def inference_dtypes(path: str | os.PathLike, quantize: str | int | None = None, fast_bf16: bool | None = None,
                     device: torch.device = torch.device("cpu")) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(dtype, weight_dtype) to load a folder's model in for `device` (see `load_model`; None: the checkpoint's own).
    On a GPU: fp32 for models under 1 GB of weights, else the checkpoint's own. On a CPU:

    - fp32 for models under 1 GB of weights (a small model's step is many small operations, which run
      faster in fp32: the shipped model decodes 2.3x faster than in bf16, measured);
    - the checkpoint's own (bf16) where this CPU multiplies in bf16 faster than in fp32 (AMX, AVX-512
      bf16: `fast_bf16`, by default measured once per machine and cached, see machine.py), but fp32
      activations for int8 weights that multiply through fbgemm (`quant.fbgemm_int8`): its kernels take
      and give fp32, so bf16 activations only add two conversions to every product, and attention's
      small products at one row run several times faster in fp32 (R1-Distill-1.5B int8 on a 2-core Xeon
      with AMX: 82 against 92 ms a token, eager; prompts as fast). Likewise fp32 for int4 where nanoseek's
      int4 kernel runs (it takes fp32), prompts multiplying in bf16 (`weight_dtype`): DeepSeek-V2-Lite int4,
      decoded eagerly on a 2-vCPU Zen4, 8.3-9.4 against 6.5-7.2 tok/s in bf16 (its MLA's small bf16
      products took 28 ms of a 125 ms token, conversions 13), prompts 0.75x; R1-Distill-1.5B int4, decoded
      compiled, level, prompts 0.92x (in fp32 they took twice as long). Elsewhere int4 keeps bf16;
    - fp32 activations otherwise, because a CPU with AVX2 only multiplies bf16 20-100x slower than fp32
      (a 512-token prompt to a 1.5B model would take minutes): quantized weights stay integers (nanoseek's int4
      and int8 kernels take fp32 activations, torch's weight-only kernels bf16), a bf16 or FP8 checkpoint keeps its linear layers' weights in
      bf16 (`weight_dtype`, NarrowLinear: decoding reads 2 bytes per weight), and only the rest
      (embeddings, norms) is widened.
    """
    size, bits = checkpoint_bytes(path), parse_bits(quantize)
    if size < 1e9 and not bits:
        return torch.float32, None
    if device.type != "cpu":
        return None, None
    if fast_bf16 is None:
        from .machine import choose_precision

        fast_bf16 = choose_precision("auto", torch.device("cpu")).name == "bf16"
    _, raw = load_config(path)
    quantized = raw.get("quantization_config") or {}
    bits = bits or (quantized.get("bits") if quantized.get("quant_method") == "nanoseek" else None)
    if fast_bf16:
        from .kernels import int4_isa, library
        from .quant import fbgemm_int8

        if bits == 8 and fbgemm_int8():
            return torch.float32, None
        if bits == 4 and int4_isa() and library() is not None:
            return torch.float32, torch.bfloat16
        return None, None
    stored = raw.get("torch_dtype") or raw.get("dtype")
    return torch.float32, None if bits or stored == "float32" else torch.bfloat16


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({e})") from None


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W[i, j] = float(W_fp8[i, j]) * scale_inv[i // bm, j // bn] (edge blocks are partial), in fp32."""
    out, inp = weight.shape
    bm, bn = block
    rows, cols = -(-out // bm), -(-inp // bn)
    if tuple(scale_inv.shape) != (rows, cols):
        raise CheckpointError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {(rows, cols)} "
                              f"for a {tuple(weight.shape)} weight in {bm}x{bn} blocks")
    scale = scale_inv.float().repeat_interleave(bm, 0)[:out].repeat_interleave(bn, 1)[:, :inp]
    return weight.float() * scale


def refuse_quantized(path: str | os.PathLike, what: str = "training") -> None:
    """A CheckpointError if the folder holds `nanoseek quantize` weights, which `what` cannot use."""
    quant = load_config(path)[1].get("quantization_config") or {}
    if quant.get("quant_method") == "nanoseek":
        raise CheckpointError(f"{path} holds int{quant.get('bits')} weights (nanoseek quantize): {what} needs the "
                              "float model it was quantized from")


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, quantize: str | int | None = None,
               weight_dtype: torch.dtype | None = None) -> DeepseekForCausalLM:
    """Load a model folder (HF format: DeepSeek-V2/V3, their Qwen2/Qwen3/Llama derivatives, or a folder that
    `nanoseek quantize` wrote). dtype defaults to the checkpoint's (FP8 weights are dequantized to bf16
    unless a dtype is given); device defaults to CPU.

    quantize = "int8" | "int4" (or 8 | 4) quantizes every linear layer while loading (see quant.py);
    the other tensors keep `dtype`. weight_dtype (bf16, with dtype fp32), when not quantizing, keeps the
    linear layers' weights in that dtype while computing in `dtype` (quant.NarrowLinear); for a quantized
    model it is what prompts multiply in (the weights converted to it a block at a time). Shards are read one at a time and each tensor is converted (FP8
    dequantized, then quantized) on its own, so memory holds the (quantized) model plus one tensor
    being converted, never two full copies: an FP8 checkpoint goes to int8 without a bf16 copy.
    """
    path = Path(path)
    config, raw = load_config(path)
    weight_map = shard_map(path)
    quant = raw.get("quantization_config") or {}
    stored = quant.get("bits") if quant.get("quant_method") == "nanoseek" else None
    bits = parse_bits(quantize)
    if stored and bits and bits != stored:
        raise CheckpointError(f"{path} holds int{stored} weights; load it as it is, or quantize the original to "
                              f"int{bits}")
    if stored == 4 and quant.get("int4_format", 1) != INT4_FORMAT:
        raise CheckpointError(f"{path} holds int4 weights in an earlier nanoseek format (bf16 scales and zeros per "
                              "group; int4_format 1, now 2: 8-bit codes of them); quantize the original model again "
                              "with `nanoseek quantize`")
    bits = bits or stored
    group = quant.get("group_size", GROUP) if stored else GROUP
    block = tuple(quant.get("weight_block_size") or (128, 128))
    if dtype is None:
        name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        dtype = getattr(torch, name, torch.float32) if isinstance(name, str) else torch.float32
        if dtype in FP8_DTYPES:
            dtype = torch.bfloat16
    mtp_at = sorted({int(k.split(".")[2]) for k in weight_map if k.startswith("model.layers.") and ".eh_proj." in k})
    if mtp_at and mtp_at[0] != config.num_hidden_layers:  # (else: a misleading "no MTP weights", then missing tensors)
        raise CheckpointError(f"{path}: config.json says num_hidden_layers {config.num_hidden_layers}, but the "
                              f"checkpoint's MTP layer, which follows the last main layer, is model.layers.{mtp_at[0]}")
    if config.num_nextn_predict_layers and not has_mtp_weights(config, weight_map):
        # transformers writes no MTP weights even when the config declares them: load the main model
        warnings.warn(f"{path}: config declares {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
                      "has no MTP weights; loading without MTP")
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    if config.tie_word_embeddings and not stored and untied_in_fact(path, weight_map):
        warnings.warn(f"{path}: config.json ties the output head to the embedding, but the checkpoint holds both and "
                      "they differ; loading them apart (as transformers does)")
        config = dataclasses.replace(config, tie_word_embeddings=False)
    edit = None  # what replaces the linear layers before the weights are read
    if bits:  # (weight_dtype: what prompts multiply in, the weights converted a block at a time)
        edit = partial(swap_linears, bits=bits, group_size=group, dtype=dtype, convert_dtype=weight_dtype)
    elif weight_dtype is not None and weight_dtype != dtype:
        edit = partial(narrow_linears, dtype=weight_dtype)
    model = build_model(config, device=device, dtype=dtype, init=False, edit=edit)
    state = model.state_dict(keep_vars=True)
    expected = set(state)
    unexpected, seen = [], set()
    files: dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        shard = weight_map[name]
        if shard not in files:
            files[shard] = _open(path / shard)
        try:
            return files[shard].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / shard}: cannot read tensor {name!r} ({e}); is the file truncated?") from None

    def float_weight(name: str) -> torch.Tensor:
        t = get(name)
        if t.dtype in FP8_DTYPES:
            scale_name = name + "_scale_inv"
            if scale_name not in weight_map:
                raise CheckpointError(f"{name} is FP8 but {scale_name} is missing")
            t = dequantize_fp8(t, get(scale_name), block)
        return t

    def quantize_into(module: QuantLinear, prefix: str, weight: torch.Tensor) -> None:
        want = (module.out_features, module.in_features)
        if tuple(weight.shape) != want:
            raise CheckpointError(f"tensor {prefix}.weight has shape {tuple(weight.shape)}, but the config implies {want}")
        module.quantize_(weight)
        seen.update(f"{prefix}.{b}" for b, _ in module.named_buffers())

    by_shard: dict[str, list[str]] = {}
    for name, shard in sorted(weight_map.items()):
        by_shard.setdefault(shard, []).append(name)
    try:
        for shard, names in sorted(by_shard.items()):
            for name in names:
                if name.endswith("weight_scale_inv"):
                    continue
                prefix = name.removesuffix(".weight")
                module = _module(model, prefix) if bits and name.endswith(".weight") else None
                if isinstance(module, QuantLinear):
                    quantize_into(module, prefix, float_weight(name))
                    continue
                if name not in expected:
                    if get(name).numel():  # (transformers saves zero-width shared experts when there are none)
                        unexpected.append(name)
                    continue
                t = float_weight(name)
                target = state[name]
                if tuple(t.shape) != tuple(target.shape):
                    raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)} in {shard}, but the config "
                                          f"implies {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(t)
                seen.add(name)
            files.pop(shard, None)  # drop the shard's handle before opening the next
    finally:
        files.clear()
    if bits and config.tie_word_embeddings and isinstance(model.lm_head, QuantLinear) \
            and not seen.intersection(n for n in state if n.startswith("lm_head.")):
        quantize_into(model.lm_head, "lm_head", model.model.embed_tokens.weight)  # a tied head, quantized apart
    # tied tensors (tie_word_embeddings, MTP's embedding/head copies) are satisfied by any one of their names
    aliases: dict[int, list[str]] = {}
    for name, t in state.items():
        aliases.setdefault(t.data_ptr(), []).append(name)
    missing = sorted(names[0] for names in aliases.values() if not seen.intersection(names))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}"
                              f"{layout_hint(config, missing + unexpected)}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} tensor(s) the config does not describe, e.g. {unexpected[:5]}"
                              f"{layout_hint(config, unexpected)}")
    model.eval()
    return model


def untied_in_fact(path: Path, weight_map: dict[str, str]) -> bool:
    """Whether the checkpoint holds an output head and an embedding that differ (a config that says they are tied,
    edited by hand or carried over, notwithstanding)."""
    names = ("lm_head.weight", "model.embed_tokens.weight")
    if not all(n in weight_map for n in names):
        return False
    head, embedding = (_open(path / weight_map[n]).get_tensor(n) for n in names)
    return head.shape != embedding.shape or not torch.equal(head, embedding)


def layout_hint(config: ModelConfig, names: list[str]) -> str:
    """Which config fields decide where the tensors `names` (missing or unexpected) would be, when they are the
    mixture-of-experts layers', the router's or a tied output head's: fields a hand-edited config.json gets wrong."""
    mlp = (".mlp.experts.", ".mlp.shared_experts.", ".mlp.gate.weight", ".mlp.gate_proj.", ".mlp.up_proj.",
           ".mlp.down_proj.")
    if config.n_routed_experts and any(part in n for n in names for part in mlp):
        return (f" (which layers are mixture-of-experts follows first_k_dense_replace = {config.first_k_dense_replace} "
                f"and moe_layer_freq = {config.moe_layer_freq}, as DeepSeek's own code reads them: layer i is one when "
                "i >= first_k_dense_replace and i % moe_layer_freq == 0; transformers ignores moe_layer_freq)")
    if names == ["lm_head.weight"] and not config.tie_word_embeddings:
        return (" (the output head shares the embedding's weight in a checkpoint saved with tie_word_embeddings = true; "
                "this config.json says false, or does not say, and false is the default)")
    if any(".e_score_correction_bias" in n for n in names):
        return (f" (a routing bias: the config's topk_method is {config.topk_method!r}; only 'noaux_tc' routing has "
                "one, with scoring_func 'sigmoid', as DeepSeek-V3 does)")
    return ""


def parse_bits(quantize: str | int | None) -> int | None:
    """'int8' | 'int4' | 8 | 4 | None | 'none' -> 8 | 4 | None."""
    if quantize in (None, "", "none", 0):
        return None
    bits = int(str(quantize).removeprefix("int")) if str(quantize).removeprefix("int").isdigit() else None
    if bits not in BITS:
        raise ValueError(f"quantize must be int8 or int4, got {quantize!r}")
    return bits


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def save_model(model: DeepseekForCausalLM, path: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes).
    Each file is written whole or not at all (files.atomic_write), so a crash never leaves a
    half-written checkpoint that loads. state_dict (default: the model's own) lets a
    distributed trainer pass the weights it gathered from the shards."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, seen_ptrs = 0, set()
    state_dict = model.state_dict() if state_dict is None else state_dict
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if t.data_ptr() in seen_ptrs:  # tied tensors (MTP's embedding/head copies) are written twice
            t = t.clone()
        seen_ptrs.add(t.data_ptr())
        nbytes = t.numel() * t.element_size()
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    stale = [p for p in path.glob("model*.safetensors") if p.name not in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        atomic_write(path / INDEX, json.dumps(index, indent=2))
    elif (path / INDEX).exists():
        (path / INDEX).unlink()
    for p in stale:
        p.unlink()
    cfg = model.config.to_dict()
    if not model.config.is_gqa and model.config.moe_layer_freq != 1 and model.config.n_routed_experts:
        warnings.warn(f"moe_layer_freq = {model.config.moe_layer_freq}: nanoseek reads this folder back as it is, "
                      "as DeepSeek's own code does, but transformers ignores moe_layer_freq and would load it with "
                      "mixture-of-experts layers where this model has dense ones (their weights random)", stacklevel=2)
    cfg["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if quantized:  # the widest bit width and its group; layers that could not take int4 are int8 (see swap_linears)
        bits = min(m.bits for m in quantized)
        cfg["quantization_config"] = {"quant_method": "nanoseek", "bits": bits, "group_size": quantized[0].group_size,
                                      **({"int4_format": INT4_FORMAT} if bits == 4 else {})}
    atomic_write(path / "config.json", json.dumps(cfg, indent=2))
