"""Training throughput: nanoseek vs transformers' DeepseekV3 on the same config, weights and batch.

Runs both in one process, interleaved (A, B, A, B, ...), because this machine's speed drifts by
up to 20% between minutes; prints min/median seconds per step, tokens/s, the ratio, and the
fraction of the machine's measured matmul peak (6 * active params * tokens + attention FLOPs).

Each side trains in its best precision on this machine by default: nanoseek in the one its trainer
picks (`--precision auto`: bf16 autocast where a short measurement finds it faster, else fp32),
transformers in whichever of fp32 and bf16 autocast is faster for its own step here (timed first).

    python bench/train_throughput.py --step          # V3-tiny 8x256, forward + backward + AdamW
    python bench/train_throughput.py --config cpu-tiny --seq 512 --step   # the pretraining shape
    python bench/train_throughput.py --precision fp32 --hf-precision fp32  # force both
    python bench/train_throughput.py --compile       # also nanoseek with regional torch.compile
"""

from __future__ import annotations

import os

# oneDNN keeps 1024 generated matmul kernels by default; transformers' MoE runs each expert at a new row
# count every step (about 1 ms to generate one in bf16 on an AMX Xeon), and in one process its new
# shapes evicted nanoseek's. A larger cache makes both sides faster; set before torch loads oneDNN.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import argparse  # noqa: E402
import statistics
import tempfile
import time

import torch

import nanoseek
from nanoseek.model import ModelConfig, get_preset
from nanoseek.train.loop import compile_regions
from nanoseek.machine import choose_precision, cpu_info

# "V3-tiny": the 10M-parameter DeepSeek-V3 shape (4 layers, 16 routed experts) of the README's throughput table
V3_TINY = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
               qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
               num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_flops(cfg: ModelConfig, active_params: int, B: int, T: int) -> float:
    """6 * (active matmul params) * tokens + causal attention (QK^T and PV, forward x3 for backward).
    The input embedding is a lookup, not a matmul, so it is left out (the output head is counted)."""
    H = cfg.num_attention_heads
    attn_fwd = 2 * B * H * (T * T / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    matmul_params = active_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return 6 * matmul_params * B * T + 3 * attn_fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=12, help="timed steps per implementation")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="nanoseek's precision (auto: the one its trainer picks on this machine)")
    ap.add_argument("--hf-precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="transformers' precision (auto: the faster of the two for its step, timed here first)")
    ap.add_argument("--step", action="store_true", help="also time a fused AdamW step")
    ap.add_argument("--config", choices=["v3-tiny", "cpu-tiny"], default="v3-tiny",
                    help="v3-tiny: a small DeepSeek-V3 (MLA, 16 routed experts, vocab 8K); cpu-tiny: nanoseek's pretraining preset (vocab 2048)")
    ap.add_argument("--compile", action="store_true", help="also time nanoseek with regional torch.compile (as "
                    "--compile in nanoseek pretrain), interleaved with the other two")
    args = ap.parse_args()

    import transformers

    torch.manual_seed(0)
    shape = V3_TINY if args.config == "v3-tiny" else {
        k: v for k, v in get_preset("cpu-tiny", vocab_size=2048).to_dict().items() if k in V3_TINY}
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**shape, num_nextn_predict_layers=0))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = nanoseek.load_model(d)
        compiled = nanoseek.load_model(d) if args.compile else None
    hf.train(), ours.train()
    if compiled is not None:
        compiled.train()
        compile_regions(compiled)
    cfg = ours.config
    B, T = args.batch, args.seq
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    inp, tgt = x[:, :-1], x[:, 1:]

    def hf_step():
        return hf(input_ids=inp, labels=x[:, :-1]).loss  # HF shifts labels internally

    def our_step(model=ours):
        return model(inp, labels=tgt, logits=False).loss

    runs = {"transformers": (hf, hf_step), "nanoseek": (ours, our_step)}
    if compiled is not None:
        runs["compiled"] = (compiled, lambda: our_step(compiled))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, (m, _) in runs.items()}

    def train_step(name: str, bf16: bool) -> float:
        model, step = runs[name]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step()
        loss.backward()
        if args.step:
            opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    ours_prec = choose_precision(args.precision, torch.device("cpu"))
    print(f"nanoseek precision: {ours_prec.name} ({ours_prec.reason})")
    hf_bf16 = args.hf_precision == "bf16"
    if args.hf_precision == "auto":  # the best of 3 steps each, after a warm-up step in bf16
        fp32_t = min(train_step("transformers", False) for _ in range(3))
        train_step("transformers", True)
        bf16_t = min(train_step("transformers", True) for _ in range(3))
        hf_bf16 = bf16_t < fp32_t
        print(f"transformers precision: {'bf16' if hf_bf16 else 'fp32'} (step {fp32_t * 1e3:.0f} ms fp32, "
              f"{bf16_t * 1e3:.0f} ms bf16 autocast)")
    bf16 = {"transformers": hf_bf16, "nanoseek": ours_prec.name == "bf16", "compiled": ours_prec.name == "bf16"}
    times = {k: [] for k in runs}
    if compiled is not None:
        t = time.perf_counter()
        train_step("compiled", bf16["compiled"])
        print(f"compiling nanoseek's regions and its first step: {time.perf_counter() - t:.1f} s")
    for i in range(args.rounds + 2):  # 2 warm-up rounds
        for name in runs:
            t = train_step(name, bf16[name])
            if i >= 2:
                times[name].append(t)

    peaks = {b: matmul_peak(torch.bfloat16 if b else torch.float32) for b in set(bf16.values())}
    flops = train_flops(cfg, ours.num_params(active=True), B, T)
    print(f"config {args.config}: {ours.num_params() / 1e6:.1f}M params, {ours.num_params(active=True) / 1e6:.1f}M active; "
          f"batch {B}x{T}, {'fwd+bwd+AdamW' if args.step else 'fwd+bwd'}, {torch.get_num_threads()} threads, "
          f"{cpu_info().describe()}")
    print("measured matmul peak: " + ", ".join(f"{'bf16' if b else 'fp32'} {p / 1e9:.0f} GFLOP/s" for b, p in peaks.items()))
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"{name:>13}: min {min(ts) * 1e3:7.1f} ms  median {med[name] * 1e3:7.1f} ms  "
              f"{B * T / med[name]:8.0f} tok/s  {flops / med[name] / peaks[bf16[name]]:5.1%} of the "
              f"{'bf16' if bf16[name] else 'fp32'} peak")
    for name in [n for n in runs if n != "transformers"]:
        print(f"ratio {name} / transformers (median): {med['transformers'] / med[name]:.2f}x  "
              f"(min: {min(times['transformers']) / min(times[name]):.2f}x)")


if __name__ == "__main__":
    main()
