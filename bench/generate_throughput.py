"""Generation speed: nanoseek's engine vs transformers' `generate` on the same checkpoint.

Greedy decoding with end-of-sequence disabled (every request makes exactly N tokens), the
contenders interleaved in one process (A, B, C, A, B, C, ...) because this machine's speed
drifts: transformers, nanoseek's engine as is, and the engine with `compile=True` (decode steps
through torch.compile; compiling happens in the warm-up). Reports decode tokens/s at batch 1 and
8 with a short prompt and at batch 8 after 2,000 tokens of context (nanoseek's decode steps timed
directly; transformers' as generate(N) minus generate(1), the only handle its one call gives),
prefill tokens/s for a 1,024-token prompt, and KV-cache bytes per token. With a trained model
(`--model`), also MTP speculative decoding at batch 1 on held-out task questions answered to the
end: acceptance rate and decode speed-up over plain decoding (greedy output is identical).

    python bench/generate_throughput.py                        # a random cpu-tiny model
    python bench/generate_throughput.py --model nanoseek/assets/model
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


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
        model = nanoseek.load_model(path, dtype=torch.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    V, N = cfg.vocab_size, args.new
    g = torch.Generator().manual_seed(1)
    print(f"model: {model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M active), "
          f"{torch.get_num_threads()} threads, {N} new tokens per request, greedy")

    engines = {}

    def engine(compile, B, max_len, speculative=False, eos=-1):
        """One engine per setting, kept (compiled graphs are reused); no prefix store, so every call prefills."""
        key = (compile, B, max_len, speculative, eos)
        if key not in engines:
            engines[key] = Engine(model, max_batch=B, max_len=max_len, eos_token_id=eos, speculative=speculative,
                                  prefix_cache_tokens=0, compile=compile)
        return engines[key]

    def nanoseek_run(compile):
        def run(prompts, n):
            e = engine(compile, len(prompts), prompts.shape[1] + N + 8)
            return e.generate(prompts.tolist(), SamplingParams(max_new_tokens=n, temperature=0))
        return run

    def nanoseek_decode(compile):
        """Decode seconds for N - 1 tokens per row, timed directly: the steps after the one that
        prefilled every row (and decoded their second token), per token of the N - 2 left."""
        def decode(prompts):
            e = engine(compile, len(prompts), prompts.shape[1] + N + 8)
            for p in prompts.tolist():
                e.submit(p, SamplingParams(max_new_tokens=N, temperature=0))
            e.step()
            t = time.perf_counter()
            while e.has_work:
                e.step()
            return (time.perf_counter() - t) * (N - 1) / (N - 2)
        return decode

    def run_hf(prompts, n):
        with torch.no_grad():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)

    def hf_decode(prompts):
        """transformers' generate is one call: decode seconds = generate(N) - generate(1)."""
        return seconds(lambda: run_hf(prompts, N)) - seconds(lambda: run_hf(prompts, 1))

    contenders = {"transformers": run_hf, "nanoseek": nanoseek_run(False), "compiled": nanoseek_run(True)}
    decoders = {"transformers": hf_decode, "nanoseek": nanoseek_decode(False), "compiled": nanoseek_decode(True)}
    rows = []
    for label, B, T in (("decode, batch 1, 16-token prompt", 1, 16), ("decode, batch 8, 16-token prompt", 8, 16),
                        ("decode, batch 8, 2,000-token context", 8, 2000 - N)):
        prompts = torch.randint(0, V, (B, T), generator=g)
        for fn in contenders.values():
            fn(prompts, 2)  # warm up (and compile)
        secs = {name: [] for name in decoders}
        for _ in range(args.rounds):
            for name, fn in decoders.items():
                secs[name].append(fn(prompts))
        rows.append((label, {name: B * (N - 1) / statistics.median(s) for name, s in secs.items()}))

    prompts = torch.randint(0, V, (1, 1024), generator=g)
    for fn in contenders.values():
        fn(prompts, 1)
    pre = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            pre[name].append(seconds(lambda: fn(prompts, 1)))
    rows.append(("prefill, 1,024-token prompt", {name: 1024 / min(t) for name, t in pre.items()}))

    print(f"\n{'':40s}{'transformers':>14s}{'nanoseek':>12s}{'ratio':>8s}{'compiled':>12s}{'ratio':>8s}")
    for label, r in rows:
        a = r["transformers"]
        print(f"{label + ' (tok/s)':40s}{a:14.0f}{r['nanoseek']:12.0f}{r['nanoseek'] / a:7.2f}x"
              f"{r['compiled']:12.0f}{r['compiled'] / a:7.2f}x")

    with torch.no_grad():
        out = hf(torch.randint(0, V, (1, 10), generator=g), use_cache=True)
    cache = out.past_key_values
    hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) / 10
    e = Engine(model, max_batch=1, max_len=16)
    main_bytes = e.cache.bytes_per_token * cfg.num_hidden_layers // (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    print(f"{'KV cache bytes per token (main layers)':40s}{hf_bytes:14.0f}{main_bytes:12d}{hf_bytes / main_bytes:7.1f}x "
          f"smaller")

    if model.mtp_layers and args.model is not None:
        mtp_speedup(args.model, engine, args.rounds)


def mtp_speedup(model: Path, engine, rounds: int) -> None:
    """MTP speculation at batch 1 on a trained model: held-out questions of each task family
    answered to the end of sequence, plain vs speculative, decode time only (prefill subtracted)."""
    from nanoseek.data.tasks import TASKS, get_task
    from nanoseek.tokenizer import DeepSeekTokenizer

    tok = DeepSeekTokenizer.load(model)
    prompts = [tok.render_prompt([{"role": "user", "content": p.question}]) for f in TASKS for p in get_task(f).heldout(2)]
    params = SamplingParams(max_new_tokens=400, temperature=0)
    for compile in (False, True):
        times = {spec: {"full": [], "prefill": []} for spec in (False, True)}
        outs = {}
        for spec in (False, True):
            engine(compile, 1, 512, spec, tok.eos_id).generate(prompts[:2], params)  # warm up (and compile)
        for _ in range(rounds):
            for spec in (False, True):
                e = engine(compile, 1, 512, spec, tok.eos_id)
                t = time.perf_counter()
                outs[spec] = [e.generate([p], params)[0] for p in prompts]
                times[spec]["full"].append(time.perf_counter() - t)
                prefill_only = SamplingParams(max_new_tokens=1, temperature=0)
                times[spec]["prefill"].append(seconds(lambda: [e.generate([p], prefill_only) for p in prompts]))
        decode = {spec: statistics.median(t["full"]) - statistics.median(t["prefill"]) for spec, t in times.items()}
        spec = outs[True]
        n = sum(len(r.tokens) - 1 for r in spec)
        same = [r.tokens for r in outs[False]] == [r.tokens for r in spec]
        print(f"\nMTP speculative decoding{' (compiled)' if compile else ''}, batch 1, {len(prompts)} held-out task "
              f"questions answered to the end ({n} decoded tokens): acceptance "
              f"{sum(r.accepted for r in spec)}/{sum(r.drafted for r in spec)} "
              f"({sum(r.accepted for r in spec) / max(1, sum(r.drafted for r in spec)):.0%}), "
              f"{n / sum(r.steps for r in spec):.2f} tokens per decode step, plain {n / decode[False]:.0f} tok/s, "
              f"speculative {n / decode[True]:.0f} tok/s, speed-up {decode[False] / decode[True]:.2f}x, "
              f"output identical to plain greedy: {same}")


if __name__ == "__main__":
    main()
