"""A model folder ready to chat with: weights, tokenizer and the engine that decodes them, loaded one
way for the CLI (generate, chat, serve, eval), the speedrun's evaluations and distillation's teacher."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from rich.console import Console

from .checkpoint import CheckpointError, inference_dtypes, load_config, load_model
from .machine import decide_decode_compile, use_disk_cache
from .model.moe import MoE
from .inference import Engine, SamplingParams
from .kernels import MLA_MAX_ROWS
from .quant import prepare_kernels
from .tokenizer import DeepSeekTokenizer


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' (or None): the GPU where torch sees one, else the CPU; 'cuda' without one is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver)")
    return device


def load_chat_engine(model_dir: str | Path, max_batch: int = 4, speculative: bool = False, compile: bool | None = False,
                     quantize: str | None = None, dtype: torch.dtype | None = None, max_len: int | None = None,
                     console: Console | None = None, device: str | torch.device | None = None,
                     kv_cache_dtype: str = "auto") -> tuple[Engine, DeepSeekTokenizer]:
    """(engine, tokenizer) for a folder holding config.json, safetensors and tokenizer.json, on `device`
    (`pick_device`: a GPU where there is one), in `dtype` or else, on a CPU, the ones `inference_dtypes` picks
    for it (fp32 for small models; for large ones the checkpoint's bf16 where the CPU multiplies bf16 fast,
    else fp32 activations over bf16 or integer weights), on a GPU fp32 for small models and the checkpoint's
    own (bf16) for the rest.
    The KV cache is kept in `kv_cache_dtype` (Engine's: "auto" is fp16 for MLA on a CPU in fp32).
    Speculative decoding is turned off, with a note, for a model without an MTP layer. `compile` None
    decides by the model (`decide_decode_compile`); a compiled decode step is compiled here
    rather than at the first reply."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise FileNotFoundError(f"{model_dir}: no such folder")
    console = console or Console()
    device = pick_device(device)
    tok = DeepSeekTokenizer.load(model_dir)
    rows = load_config(model_dir)[0].vocab_size
    if tok.vocab_size > rows:  # every reply would fail (token ids past the embedding), or the server answer 500s
        raise CheckpointError(f"{model_dir}: its tokenizer has {tok.vocab_size} tokens, more than the model's "
                              f"{rows}: they do not belong together")
    chosen, weight_dtype = (dtype, None) if dtype else inference_dtypes(model_dir, quantize, device=device)
    model = load_model(model_dir, dtype=chosen, quantize=quantize, weight_dtype=weight_dtype, device=device)
    prepare_kernels(model)
    if speculative and not model.mtp_layers:
        console.print("[yellow]this model has no MTP layer: decoding without speculation[/]")
        speculative = False
    compile, why = decide_decode_compile(compile, model)
    engine = Engine(model, decode=tok.decode, max_batch=max_batch, max_len=max_len, speculative=speculative,
                    eos_token_id=sorted(tok.eos_ids), compile=compile, kv_cache_dtype=kv_cache_dtype, native=True)
    if engine.native is not None and not speculative:
        if why != "as set":
            console.print("[dim]decoding through nanoseek's C++ decode step: nothing to compile[/]")
        return engine, tok
    if why != "as set":
        console.print(f"[dim]compiled decoding: {'on' if compile else 'off'} ({why})[/]")
    if compile:  # the shapes the first replies will have
        use_disk_cache()
        what = "compiling the decode step (a minute or two the first time on 2 cores; cached on disk for later runs)"
        if not console.is_terminal:  # (a status line shows only on a terminal: a log would say nothing for minutes)
            console.print(what + "...")
        t = time.perf_counter()
        with console.status(what):
            warm_up(engine, max_batch)
        console.print(f"[dim]decode step compiled in {time.perf_counter() - t:.0f} s (--no-compile skips this)[/]")
    return engine, tok


def warm_up(engine: Engine, max_batch: int) -> None:
    """Decode a few tokens at each number of rows from which a compiled decode step takes another path (a graph of
    its own), so that none compiles while serving: one row, several, more than MLA's attention operator takes, and (a
    small MoE model whose experts are stacked but not run by nanoseek's operator) as many as run them as one wide
    product. Then the objects compiling left (millions: graphs, guards, code) are moved out of the garbage collector's
    reach (`gc.freeze`): its full passes over them, which the first steps' allocations set off, made the first ~60
    multi-row steps of the shipped model 3.5x slower (1,500 against 5,300 tok/s at 8 rows; 2-vCPU Zen4)."""
    warm = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    edges = {1, 2, MLA_MAX_ROWS + 1} | {m.many_tokens() for m in engine.model.modules()
                                         if isinstance(m, MoE) and m.stacked is not None and not m.float_kernel}
    for rows in sorted(r for r in edges if r <= max_batch):
        engine.generate([[0] * 4] + [[0] * 3] * (rows - 1), warm)
    gc.collect()
    gc.freeze()
