"""Generation speed: nanoseek's engine vs transformers' `generate` on the same checkpoint.

Both run greedy decoding with end-of-sequence disabled (every request makes exactly N tokens),
interleaved in one process (A, B, A, B, ...) because this machine's speed drifts. Reports
decode tokens/s at batch 1 and 8 with a short prompt and at batch 8 after 2,000 tokens of
context, prefill tokens/s for a 1,024-token prompt, and KV-cache bytes per token. With a model
whose MTP layer was trained (`--model runs/.../model`), also MTP speculative decoding at batch 1:
acceptance rate and speed-up over plain decoding (greedy output is identical).

    python bench/generate_throughput.py                        # a random cpu-tiny model
    python bench/generate_throughput.py --model runs/learning/bias_on/model
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import nanoseek
from nanoseek.inference import Engine, SamplingParams
from nanoseek.model import build_model, get_preset


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a model folder (default: a random cpu-tiny model)")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        path = args.model
        if path is None:
            path = Path(d)
            nanoseek.save_model(build_model(get_preset("cpu-tiny", vocab_size=2048)), path)
        ours = nanoseek.load_model(path, dtype=torch.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = ours.config
    V, N = cfg.vocab_size, args.new
    g = torch.Generator().manual_seed(1)
    print(f"model: {ours.num_params() / 1e6:.2f}M params ({ours.num_params(active=True) / 1e6:.2f}M active), "
          f"{torch.get_num_threads()} threads, {N} new tokens per request, greedy")

    def run_ours(prompts, n, speculative=False):
        engine = Engine(ours, max_batch=len(prompts), max_len=prompts.shape[1] + n + 8, eos_token_id=-1,
                        speculative=speculative)
        return engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=n, temperature=0))

    def run_hf(prompts, n):
        with torch.no_grad():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)

    rows = []
    for label, B, T in (("decode, batch 1, 16-token prompt", 1, 16), ("decode, batch 8, 16-token prompt", 8, 16),
                        ("decode, batch 8, 2,000-token context", 8, 2000 - N)):
        prompts = torch.randint(0, V, (B, T), generator=g)
        res = {}
        for name, fn in (("transformers", run_hf), ("nanoseek", run_ours)):
            fn(prompts, 2)  # warm up
        t_full = {"transformers": [], "nanoseek": []}
        t_pre = {"transformers": [], "nanoseek": []}
        for _ in range(args.rounds):
            for name, fn in (("transformers", run_hf), ("nanoseek", run_ours)):
                t_pre[name] += timed(lambda: fn(prompts, 1), 1)
                t_full[name] += timed(lambda: fn(prompts, N), 1)
        for name in t_full:
            decode_s = statistics.median(t_full[name]) - statistics.median(t_pre[name])
            res[name] = B * (N - 1) / decode_s
        rows.append((label, res["transformers"], res["nanoseek"]))

    prompts = torch.randint(0, V, (1, 1024), generator=g)
    pre = {"transformers": [], "nanoseek": []}
    for _ in range(args.rounds):
        pre["transformers"] += timed(lambda: run_hf(prompts, 1), 1)
        pre["nanoseek"] += timed(lambda: run_ours(prompts, 1), 1)
    rows.append(("prefill, 1,024-token prompt", 1024 / min(pre["transformers"]), 1024 / min(pre["nanoseek"])))

    print(f"\n{'':40s}{'transformers':>14s}{'nanoseek':>12s}{'ratio':>8s}")
    for label, a, b in rows:
        print(f"{label + ' (tok/s)':40s}{a:14.0f}{b:12.0f}{b / a:7.2f}x")

    with torch.no_grad():
        out = hf(torch.randint(0, V, (1, 10), generator=g), use_cache=True)
    cache = out.past_key_values
    hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / 10
    engine = Engine(ours, max_batch=1, max_len=16)
    main_bytes = engine.cache.bytes_per_token * cfg.num_hidden_layers // (cfg.num_hidden_layers
                                                                         + cfg.num_nextn_predict_layers)
    print(f"{'KV cache bytes per token (main layers)':40s}{hf_bytes:14.0f}{main_bytes:12d}{hf_bytes / main_bytes:7.1f}x "
          f"smaller")

    if ours.mtp_layers:
        prompts = torch.randint(0, V, (1, 16), generator=g)
        if args.model is not None:  # a trained model: prompt with real text the MTP layer has seen
            from nanoseek.tokenizer import DeepSeekTokenizer
            tok = DeepSeekTokenizer.load(args.model)
            text = [{"role": "user", "content": "What is 387 + 45?"}]
            prompts = torch.tensor([tok.render_prompt(text)])
        n = 4 * N
        plain, spec = [], []
        for _ in range(args.rounds):
            plain += timed(lambda: run_ours(prompts, n), 1)
            spec += timed(lambda: run_ours(prompts, n, speculative=True), 1)
        a, b = run_ours(prompts, n)[0], run_ours(prompts, n, speculative=True)[0]
        same = a.tokens == b.tokens
        print(f"\nMTP speculative decoding, batch 1, {n} tokens: acceptance {b.accepted}/{b.drafted} "
              f"({b.accepted / max(1, b.drafted):.0%}), {(len(b.tokens) - 1) / b.steps:.2f} tokens per decode step, "
              f"speed-up {statistics.median(plain) / statistics.median(spec):.2f}x, "
              f"output identical to plain greedy: {same}")


if __name__ == "__main__":
    main()
