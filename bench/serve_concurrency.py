"""The server under load: 16 concurrent streaming clients against one client alone.

Starts `nanoseek serve`'s app in this process (uvicorn on a free port), then uses the official
`openai` client: first one streaming request alone, then N at once. Prints aggregate generated
tokens/s for both, the ratio, and p50/p95 time to first token under load.

    python bench/serve_concurrency.py                      # a random cpu-tiny model
    python bench/serve_concurrency.py --model runs/speedrun/chat/model --clients 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens per request")
    args = ap.parse_args()

    from test_server import LiveServer

    import nanoseek
    from nanoseek.data.builtin import task_texts
    from nanoseek.inference import Engine
    from nanoseek.model import build_model, get_preset
    from nanoseek.serve import create_app
    from nanoseek.tokenizer import DeepSeekTokenizer

    if args.model is None:
        tok = DeepSeekTokenizer.train(task_texts(2000), vocab_size=2048)
        torch.manual_seed(0)
        model = build_model(get_preset("cpu-tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)).eval()
    else:
        model, tok = nanoseek.load_model(args.model), DeepSeekTokenizer.load(args.model)
    engine = Engine(model, decode=tok.decode, max_batch=args.clients, max_len=1024, eos_token_id=tok.eos_id)
    app = create_app(engine, tok, store=None)
    with LiveServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def one(i: int, out: list):
            t0 = time.perf_counter()
            first, n = None, 0
            stream = client.chat.completions.create(
                model="nanoseek", messages=[{"role": "user", "content": f"What is {100 + i} + {7 * i}?"}],
                max_tokens=args.tokens, temperature=1.0, seed=i, stream=True,
                stream_options={"include_usage": True})
            for chunk in stream:
                if first is None and chunk.choices and (
                        chunk.choices[0].delta.content or (chunk.choices[0].delta.model_extra or {}).get(
                            "reasoning_content")):
                    first = time.perf_counter() - t0
                if chunk.usage:
                    n = chunk.usage.completion_tokens
            out.append((first, n, time.perf_counter() - t0))

        alone: list = []
        one(0, [])  # warm up
        t = time.perf_counter()
        one(0, alone)
        single = alone[0][1] / (time.perf_counter() - t)
        results: list = []
        threads = [threading.Thread(target=one, args=(i, results)) for i in range(args.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        total = sum(n for _, n, _ in results)
        ttft = sorted(f for f, _, _ in results if f is not None)
        print(f"model: {model.num_params() / 1e6:.2f}M params; {args.tokens} max tokens per request; "
              f"{torch.get_num_threads()} threads")
        print(f"1 client:   {alone[0][1]} tokens, {single:.0f} tokens/s, time to first token "
              f"{alone[0][0] * 1000:.0f} ms")
        print(f"{args.clients} clients: {total} tokens in {wall:.1f}s = {total / wall:.0f} tokens/s aggregate "
              f"({total / wall / single:.1f}x one client); time to first token p50 "
              f"{statistics.median(ttft) * 1000:.0f} ms, p95 {ttft[int(0.95 * (len(ttft) - 1))] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
