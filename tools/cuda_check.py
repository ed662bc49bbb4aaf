"""CUDA against CPU, for a machine with a GPU (CI has none): the chat model's logits and greedy replies,
the engine eager, compiled and speculative at batch 1 and 8, int8/int4 weights, and a bf16 training
step of each preset's model with its tokens/s and peak memory.

    python tools/cuda_check.py [--model DIR] [--presets tiny,cpu-tiny,gpu-1b] [--device cuda]

(`--device cpu` runs the same checks against the CPU itself: a way to try the script without a GPU.)

Prints each check's figures and exits 1 if any check fails or a greedy reply on CUDA differs from the
CPU's (fp32 on both; a reply may still differ where two logits are within rounding of each other, so a
difference is shown in full to be judged)."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.inference import Engine, SamplingParams
from nanoseek.model import build_model, get_preset
from nanoseek.tokenizer import DeepSeekTokenizer

SHIPPED = Path(__file__).parents[1] / "nanoseek" / "assets" / "model"
QUESTIONS = ["What is 37 + 48?", "hello, who are you?", "Using 3, 7 and 12 make 33.", "What is 23 * 41?",
             "what's 7 plus 8?", "Solve 3x + 5 = 20", "Tell me a joke", "What is 9 - 14?"]


def replies(model, tok, prompts, compile=False, speculative=False) -> tuple[list[str], float]:
    """Greedy replies (after one untimed pass) and the tokens/s of the timed pass."""
    engine = Engine(model, decode=tok.decode, max_batch=len(prompts), eos_token_id=sorted(tok.eos_ids),
                    compile=compile, speculative=speculative)
    params = SamplingParams(max_new_tokens=200, temperature=0)
    engine.generate(prompts, params)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    return [tok.decode(r.tokens) for r in out], sum(len(r.tokens) for r in out) / (time.perf_counter() - start)


def same(name: str, cpu: list[str], other: list[str]) -> bool:
    equal = sum(a == b for a, b in zip(cpu, other))
    print(f"  {name}: {equal}/{len(cpu)} replies equal to the CPU's")
    for a, b in zip(cpu, other):
        if a != b:
            print(f"    cpu  : {a!r}\n    other: {b!r}")
    return equal == len(cpu)


def check_inference(model_dir: Path, device: str) -> bool:
    tok = DeepSeekTokenizer.load(model_dir)
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    cpu = load_model(model_dir, dtype=torch.float32)
    on_device = load_model(model_dir, dtype=torch.float32, device=device)
    ids = torch.tensor([prompts[0]])
    a, b = cpu(ids).logits, on_device(ids.to(device)).logits.cpu()
    print(f"  logits: max |cpu - {device}| {(a - b).abs().max().item():.2e}, argmax agreement "
          f"{(a.argmax(-1) == b.argmax(-1)).float().mean().item():.3f}")
    ok = True
    reference, rate = replies(cpu, tok, prompts)
    print(f"  cpu eager b8: {rate:.0f} tok/s")
    for compile in (False, True):
        got, rate = replies(on_device, tok, prompts, compile=compile)
        print(f"  {device} {'compiled' if compile else 'eager'} b8: {rate:.0f} tok/s")
        ok &= same(f"{device} {'compiled' if compile else 'eager'} b8", reference, got)
        got, rate = replies(on_device, tok, prompts[:1], compile=compile)
        print(f"  {device} {'compiled' if compile else 'eager'} b1: {rate:.0f} tok/s")
        ok &= same(f"{device} {'compiled' if compile else 'eager'} b1", reference[:1], got)
    if on_device.mtp_layers:
        ok &= same(f"{device} speculative b1", reference[:1], replies(on_device, tok, prompts[:1], speculative=True)[0])
    for bits in ("int8", "int4"):
        on_cpu = replies(load_model(model_dir, dtype=torch.float32, quantize=bits), tok, prompts)[0]
        got, rate = replies(load_model(model_dir, dtype=torch.float32, device=device, quantize=bits), tok, prompts)
        print(f"  {device} {bits} b8: {rate:.0f} tok/s")
        ok &= same(f"{device} {bits} against cpu {bits}", on_cpu, got)
    return ok


def check_training(presets: list[str], device: str) -> bool:
    for name in presets:
        cfg = get_preset(name)
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        B, T = (8, 1024) if name == "gpu-1b" else (8, 256)
        x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
        gpu = device != "cpu"
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        for i in range(6):
            if i == 2:
                if gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = model(x[:, :-1], labels=x[:, 1:], logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        step = (time.perf_counter() - start) / 4
        print(f"  {name}: {model.num_params() / 1e6:.1f}M params, bf16 eager step {step * 1e3:.1f} ms, "
              f"{B * T / step:,.0f} tok/s, loss {loss.item():.3f}"
              + (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else ""))
        del model, opt
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED, help="chat model folder (default: the shipped one)")
    parser.add_argument("--presets", default="tiny,cpu-tiny,gpu-1b", help="presets whose training step is timed")
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU (default: cuda)")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("no CUDA device here")
    print(f"{torch.cuda.get_device_name(args.device) if args.device != 'cpu' else 'CPU'}, torch {torch.__version__}")
    ok = True
    for title, check in (("inference", lambda: check_inference(args.model, args.device)),
                         ("training", lambda: check_training(args.presets.split(","), args.device))):
        print(title)
        try:
            ok &= check()
        except Exception:
            traceback.print_exc()
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
