"""The KV cache's precision on a CPU: MLA's latents kept in fp32 or in fp16 (the default for an MLA model computing in
fp32 on a CPU, as llama.cpp keeps an f16 cache), side by side, interleaved (this machine's speed drifts).

1. nanoseek's kernel over the cached latents (`nanoseek::mla_latent_attention`) alone, at the shipped model's shape (4
   heads, latent 64 + rope 16) and at DeepSeek-V2-Lite's (16 heads, 512 + 64), one cache per layer as a decode step
   reads them: milliseconds a layer, the latents' bytes over that time, and what a step's layers take.
2. The shipped model's decode step (compiled, as `nanoseek serve` runs it) at batch 8 after N tokens of context, two
   engines in one process with the two caches, alternating: median step times.

    python bench/kv_cache_precision.py
    python bench/kv_cache_precision.py --contexts 256 1950 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nanoseek
from nanoseek.checkpoint import inference_dtypes
from nanoseek.inference import Engine, SamplingParams
from nanoseek.kernels import cpu_model_and_flags, mla_latent_available
from nanoseek.loading import warm_up
from nanoseek.machine import decide_decode_compile
from nanoseek.quant import prepare_kernels

SHIPPED = "nanoseek/assets/model"
SHAPES = {"shipped": dict(heads=4, c=64, r=16, layers=4), "v2-lite": dict(heads=16, c=512, r=64, layers=27)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def kernel_ms(shape: dict, batch: int, context: int, dtype: torch.dtype, reps: int = 5) -> float:
    """Median milliseconds of the latent kernel for one layer, over a step's worth of layers' caches."""
    H, c, r, layers = shape["heads"], shape["c"], shape["r"], shape["layers"]
    q, fresh = torch.randn(batch, H, c + r), torch.randn(batch, 1, c + r)
    pasts = [torch.randn(batch, context, c + r).to(dtype) for _ in range(layers)]
    mask = torch.ones(batch, 1, context + 1, dtype=torch.uint8)
    times = []
    for _ in range(reps + 1):  # (the first pass warms up)
        t = time.perf_counter()
        for past in pasts:
            torch.ops.nanoseek.mla_latent_attention(q, past, fresh, mask, c, 0.1)
        times.append((time.perf_counter() - t) / layers * 1e3)
    return statistics.median(times[1:])


def kernels(batch: int, contexts: list[int], rounds: int) -> None:
    print(f"\nthe kernel alone, batch {batch} (median ms a layer; GB/s of the latents read)")
    print("| shape | context | fp32 ms | fp16 ms | fp32 GB/s | fp32 / fp16 | a step's layers, fp32 / fp16 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        for context in contexts:
            got = {d: [] for d in DTYPES}
            for _ in range(rounds):
                for d, dtype in DTYPES.items():
                    got[d].append(kernel_ms(shape, batch, context, dtype))
            a, b = statistics.median(got["fp32"]), statistics.median(got["fp16"])
            gbs = batch * context * (shape["c"] + shape["r"]) * 4 / (a * 1e-3) / 1e9
            print(f"| {name} | {context} | {a:.3f} | {b:.3f} | {gbs:.1f} | {a / b:.2f}x | "
                  f"{a * shape['layers']:.1f} / {b * shape['layers']:.1f} |")


def shipped_steps(batch: int, contexts: list[int], rounds: int, new: int = 64) -> None:
    dtype, weight_dtype = inference_dtypes(SHIPPED)
    model = nanoseek.load_model(SHIPPED, dtype=dtype, weight_dtype=weight_dtype)
    prepare_kernels(model)
    compile, _ = decide_decode_compile(None, model)
    engines = {d: Engine(model, max_batch=batch, max_len=max(contexts) + new + 8, eos_token_id=-1,
                         prefix_cache_tokens=0, compile=compile, kv_cache_dtype=d) for d in DTYPES}
    for engine in engines.values():
        warm_up(engine, batch)
    g = torch.Generator().manual_seed(0)

    def median_step(engine: Engine, context: int) -> float:
        for _ in range(batch):
            engine.submit(torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist(),
                          SamplingParams(max_new_tokens=new, temperature=0))
        engine.step()  # the prefill and the first token
        times = []
        while engine.has_work:
            t = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    print(f"\nthe shipped model's decode step, batch {batch}, compiled={compile} (median ms over {rounds} rounds)")
    print("| context | fp32 cache | fp16 cache | fp32 / fp16 |")
    print("|---|---|---|---|")
    for context in contexts:
        got = {d: [] for d in DTYPES}
        for _ in range(rounds):
            for d, engine in engines.items():
                got[d].append(median_step(engine, context))
        a, b = statistics.median(got["fp32"]), statistics.median(got["fp16"])
        print(f"| {context} | {a:.3f} ({min(got['fp32']):.2f}-{max(got['fp32']):.2f}) | {b:.3f} "
              f"({min(got['fp16']):.2f}-{max(got['fp16']):.2f}) | {a / b:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", type=int, nargs="+", default=[16, 1000, 1950])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    if not mla_latent_available():
        raise SystemExit("nanoseek's latent kernel is not available here (no C++ compiler, or no AVX2)")
    torch.set_num_threads(args.threads)
    model_name, flags = cpu_model_and_flags()
    print(f"CPU: {model_name} ({', '.join(f for f in ('amx_bf16', 'avx512_bf16', 'avx512f', 'avx2') if f in flags)}), "
          f"{args.threads} threads")
    kernels(args.batch, [c for c in args.contexts if c > 0], args.rounds)
    shipped_steps(args.batch, args.contexts, args.rounds)


if __name__ == "__main__":
    main()
