"""The nanoseek command line: `nanoseek <command> --help` explains each command.

Each command turns its options into a call of a function of the package. Every option is checked
while the command line is parsed (types, ranges, choices, paths) or first thing in the command
(options that need each other), and a bad one is answered with one line naming it (`error: ...`,
exit 2) before any work. torch, the engine and the server load inside the commands that use
them, so `--help` and those errors come at once. Ctrl-C during work exits 130.
"""

from __future__ import annotations

import errno
import math
import os
import re
import socket
import sqlite3
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Literal, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from .data.corpus import corpus_files
from .data.tasks import TASKS
from .model.config import PRESETS
from .remote import RemoteError
from .train.settings import (DISTILL_TRAIN, PRECISIONS, PRETRAIN_TRAIN, RL_TRAIN, SFT_TRAIN, DataConfig, GRPOConfig,
                             SFTConfig, SpeedrunConfig, TrainConfig)

console = Console()
errors = Console(stderr=True)
SHIPPED = Path(__file__).parent / "assets" / "model"  # the speedrun's chat model, shipped in the package
Preset = Literal[tuple(PRESETS)]  # the choices --preset lists in --help: the one preset table
Quantize = Literal["int8", "int4"]
Precision = Literal[PRECISIONS]
Wording = Literal["canonical", "varied", "held-out"]  # data.tasks.WORDINGS
MIN_SPEEDRUN_BUDGET = 30  # seconds
GENERATE_TOKENS = 512  # generate's --max-tokens when not given (or what the context leaves); chat's: chat.REPLY_TOKENS
UsageError = typer.BadParameter.__base__  # click's UsageError (typer may vendor its own click)


def _fail(msg: str) -> NoReturn:
    errors.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """A usage error (bad value, unknown option, missing option) as one `error: ...` line, not
    click's usage block."""
    try:
        yield
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `nanoseek` alone: the help, as asked
            raise
        _fail(e.format_message().replace("Value error, ", ""))  # typer's coercion prefixes choice errors with it


class Commands(TyperGroup):
    """nanoseek's command group: parsing and running a command under `_one_line_errors`."""

    def make_context(self, *args, **kwargs):
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_errors():
            return super().invoke(ctx)


class WithArguments(TyperCommand):
    """A command with positional arguments, shown in its usage line as `MODEL OUT` (typer writes
    required ones as `{MODEL}`, which reads like a set of choices)."""

    def collect_usage_pieces(self, ctx):
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]


app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="nanoseek: DeepSeek-V3's model, training and serving in one small package.")


def _fit_to_output(c: Console) -> None:
    """Written to a file or a pipe (a log), lines are not wrapped at 80 columns and rules are wide enough for their
    titles (a log's lines broke mid-sentence and the speedrun's stage headers were cut to `0.… ─`); at a terminal, its
    width. Decided when a command starts, for where its output goes then."""
    log = not c.is_terminal and "COLUMNS" not in os.environ
    c.soft_wrap, c.width = log, 160 if log else None


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"nanoseek {__version__}")
        raise typer.Exit()


@app.callback()
def _options(ctx: typer.Context, _version: bool = typer.Option(False, "--version", is_eager=True,
                                                               callback=_print_version,
                                                               help="Print nanoseek's version and exit.")) -> None:
    for c in (console, errors):
        _fit_to_output(c)
    shown = warnings.showwarning
    warnings.showwarning = _note  # warnings to a person at a terminal: one line each, no source line
    ctx.call_on_close(lambda: setattr(warnings, "showwarning", shown))


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr (a library's own, from outside nanoseek, keeps its name)."""
    origin = "" if "nanoseek" in Path(filename).parts else f" ({category.__name__})"
    errors.print(Text.assemble(("note: ", "yellow"), str(message) + origin))


def _user_error(e: Exception) -> bool:
    """A bad option, file, data or endpoint, or a folder that cannot be written (read-only, a full disk):
    not a bug. Errors of modules that import torch are looked up where they are loaded, not imported up front."""
    loaded = [getattr(sys.modules.get(module), name, None) for module, name in (
        ("nanoseek.checkpoint", "CheckpointError"), ("nanoseek.data.shards", "ShardError"),
        ("safetensors", "SafetensorError"))]  # (safetensors' errors on write: a read-only or full disk)
    return isinstance(e, (ValueError, OSError, RemoteError, *(t for t in loaded if t is not None)))


@contextmanager
def _reported(interrupted: str = "") -> Iterator[None]:
    """A user error found during work -> `error: ...` and exit 2; Ctrl-C -> exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        if interrupted:
            console.print(interrupted)
        raise typer.Exit(130) from None
    except Exception as e:
        if isinstance(e, RuntimeError) and (asked := re.search(r"allocate (\d+) bytes", str(e))):  # torch's allocator
            _fail(f"out of memory: {int(asked.group(1)) / 2**30:,.0f} GiB asked for at once, on a machine of "
                  f"{_memory_bytes() / 2**30:.0f} GiB (check the model's sizes in config.json, or the batch)")
        if not _user_error(e):
            raise
        _fail(str(e))


# ---- option values: each is checked while parsing, and a bad one names its option ----
def _names(text: str) -> list[str]:
    """A comma-separated list, each name once: 'add, sub,add' -> ['add', 'sub']."""
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


def _known(names: list[str], known: list[str]) -> list[str]:
    if not names:
        raise typer.BadParameter(f"give at least one task family ({', '.join(known)})")
    for name in names:
        if name not in known:
            raise typer.BadParameter(f"unknown task family {name!r} (choose from: {', '.join(known)})")
    return names


def _families(text: str) -> list[str]:
    return _known(_names(text), list(TASKS))


def _families_or_auto(text: str) -> list[str]:
    """--rl-tasks: families (the calculator too), or none to let the speedrun pick."""
    return _families_and_calculator(text) if text.strip() else []


def _families_and_calculator(text: str) -> list[str]:
    return _known(_names(text), [*TASKS, "calculator"])


def parse_duration(text: str) -> float:
    """'90' or '90s' -> 90.0, '10m' -> 600.0, '1.5h' -> 5400.0; '' -> 0 (none)."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t or 0)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration (examples: 90s, 10m, 1.5h)") from None
    if seconds < 0:
        raise typer.BadParameter(f"{text!r} is negative")
    if not seconds < float("inf"):  # inf, nan
        raise typer.BadParameter(f"{text!r} is not a finite duration")
    return seconds


def _positive(x: float) -> float:
    if not x > 0 or x == float("inf"):  # nan compares false; inf trains the model into NaN
        raise typer.BadParameter(f"must be a finite number > 0, got {x}")
    return x


def _origins(values: list[str]) -> list[str]:
    """serve --allowed-origin: each a web origin as browsers send it (scheme://host[:port], no path), or *."""
    for origin in values:
        if origin != "*" and not re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^\s/:?#\[\]@]+)(:\d{1,5})?", origin):
            raise typer.BadParameter(f"{origin!r} is not an origin: give scheme://host[:port] as the browser's address "
                                     "bar shows it, without a path (http://localhost:3000), or * for any")
    return [o.lower() if o != "*" else o for o in values]


def _within(low: float, high: float | None = None, above: bool = False) -> Callable[[float | None], float | None]:
    """A float option's check: a finite number from `low` (or above it) up to `high` (None: not given)."""
    def check(x: float | None) -> float | None:
        if x is None:
            return x
        top = "" if high is None else f" and <= {high:g}"
        if not math.isfinite(x) or (x <= low if above else x < low) or (high is not None and x > high):
            raise typer.BadParameter(f"must be a finite number {'>' if above else '>='} {low:g}{top}, got {x}")
        return x
    return check


def _eval_results(path: Path) -> bool:
    """Does `path` hold what `eval --out` writes (a list of rows, each a task family's), which a rerun may replace?"""
    import json

    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and "family" in r for r in rows)


def _model_folder(path: Path | None) -> Path | None:
    """A model folder: it exists and holds config.json (None: the command's default model)."""
    if path is not None:
        if not path.exists():
            raise typer.BadParameter(f"'{path}' does not exist")
        if (path / "model" / "config.json").is_file() and (path / "metrics.jsonl").exists():
            raise typer.BadParameter(f"'{path}' is a run folder; its model is '{path / 'model'}'")
        if path.is_file():
            raise typer.BadParameter(f"'{path}' is a file; give the model folder that holds config.json"
                                     + (f" ('{path.parent}')" if path.name == "config.json" else ""))
        if not (path / "config.json").is_file():
            raise typer.BadParameter(f"'{path}' is not a model folder (no config.json in it)")
    return path


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _model_or_url(text: str) -> str:
    if "://" in text and not _is_url(text):  # (a path would have read ftp://x as ftp:/x)
        raise typer.BadParameter(f"{text!r}: a model folder, or an http(s):// address of an OpenAI-compatible server")
    return text if _is_url(text) else str(_model_folder(Path(text)))


def _preset_or_model(text: str) -> str:
    if text in PRESETS or (Path(text) / "config.json").is_file():
        return text
    raise typer.BadParameter(f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")


TRAINING_BYTES = 16  # a parameter's bytes in training: fp32 weight, gradient and AdamW's two moments


def _check_fits(preset: str, bytes_per_param: int, option: str = "--preset") -> None:
    """Refuse a preset whose model takes more than this machine's memory at bytes_per_param, before any work
    (pretrain --preset deepseek-v3 tokenized its data for a minute, then the kernel's OOM killer ended it, with
    nothing said); anything else (a model folder) passes. Called in a command's body: it imports torch, which a
    refusal by an option's callback must not."""
    if preset not in PRESETS:
        return
    import torch

    from .model import DeepseekForCausalLM, get_preset

    with torch.device("meta"):  # the size, without allocating it (the class alone: build_model initialises weights)
        params = DeepseekForCausalLM(get_preset(preset)).num_params()
    if params * bytes_per_param > 0.8 * _memory_bytes():
        _fail(f"{option}: '{preset}' has {_count(params)} parameters ({params * bytes_per_param / 2**30:,.0f} GiB "
              f"{'in fp32' if bytes_per_param == 4 else 'to train in fp32 with AdamW'}), more than this machine's "
              f"memory ({_memory_bytes() / 2**30:.0f} GiB); pick a smaller one")


def _tokenizer_folder(path: Path | None) -> Path | None:
    if path is not None and not (path / "tokenizer.json").is_file():
        raise typer.BadParameter(f"'{path}' " + ("has no tokenizer.json" if path.exists() else "does not exist"))
    return path


def _corpus(sources: list[str], builtin: tuple[str, ...]) -> list[str]:
    """Data sources: built-in names, or files and folders that exist in a readable format."""
    files = [s for s in sources if s not in builtin]
    try:
        if files:
            corpus_files(files)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return sources


def _pretrain_data(sources: list[str]) -> list[str]:
    return _corpus(sources, builtin=("tasks", "stdlib"))


def _tokenizer_data(sources: list[str]) -> list[str]:
    return _corpus(sources, builtin=("stdlib",))


def _sft_data(text: str) -> str:
    if text != "builtin" and not Path(text).is_file():
        raise typer.BadParameter(f"'{text}' " + ("is not a file" if Path(text).exists() else "does not exist")
                                 + " (give a .jsonl of conversations or 'builtin')")
    return text


def _device(text: str | None) -> str | None:
    if text is not None and text != "cpu" and not (text == "cuda" or text.startswith("cuda:")
                                                   and text[5:].isdigit()):
        raise typer.BadParameter(f"{text!r}: give cpu, cuda or cuda:N")
    return text


def _text(value: str | None) -> str | None:
    """A text option (--prompt, --system): UTF-8 text, checked before any work."""
    from .tokenizer import is_text

    if value is not None and not is_text(value):
        raise typer.BadParameter("is not UTF-8 text (it holds a byte that is not a character)")
    return value


def _out_folder(path: Path) -> Path:
    """An output folder: not a file, and writable (or, not there yet, creatable): checked before any work."""
    if path.is_file():
        raise typer.BadParameter(f"'{path}' is a file; give a folder")
    there = next(p for p in (path, *path.absolute().parents) if p.exists())
    if there.is_file():
        raise typer.BadParameter(f"cannot write to '{there}' (a file)")
    try:  # tried, not judged from permissions: root may write anywhere the mounts allow, and /proc allows nothing
        os.rmdir(tempfile.mkdtemp(prefix=".nanoseek-", dir=there))
    except OSError as e:  # (a folder that exists but "has no such file" for a new one: /proc, say)
        why = "it takes no new files" if e.errno == errno.ENOENT else e.strerror or e
        raise typer.BadParameter(f"cannot write to '{there}' ({why})") from None
    return path


def _db_file(path: Path | None) -> Path | None:
    """--db: a file that can be made (not a folder, not under a file); checked before anything loads."""
    if path is None:
        return None
    if path.is_dir():
        raise typer.BadParameter(f"'{path}' is a folder; give a file name (e.g. {path / 'chats.db'})")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise typer.BadParameter(f"cannot open '{path}': '{parent}' is a file")
    return path


def _train(default: TrainConfig, max_steps: int, time_budget: float, **overrides) -> TrainConfig:
    """A stage's default training settings with the command's length and options."""
    if max_steps == 0 and time_budget == 0:
        _fail("give --max-steps N or --time-budget DURATION (e.g. 10m): either one ends the run")
    return replace(default, max_steps=max_steps, time_budget=time_budget, **overrides)


def _many(n: int, noun: str) -> str:
    """'1 document', '2,000 documents'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# ---- the options several commands share ----
def _model_option(help: str = "Model folder (HF format with tokenizer.json); default: the chat model shipped "
                              "with nanoseek.", default=None):
    return typer.Option(default, help=help, callback=_model_folder)


def _max_steps_option(help: str = "Optimizer steps (0 = until --time-budget; one of the two is needed)."):
    return typer.Option(0, min=0, help=help)


def _checkpoint_every_option(default: int):
    return typer.Option(default, min=0, metavar="N", help="Write a checkpoint every N steps (and always at the end): what a run "
                        "stopped or killed resumes from (0 = only at the end).")


def _time_budget_option(help: str = "Training time, e.g. 10m or 1.5h (the schedule decays to fit it).",
                        default: str = ""):
    return typer.Option(default, help=help, callback=parse_duration)


def _seed_option(help: str = "Random seed."):
    return typer.Option(0, min=0, help=help)


def _quantize_option():
    return typer.Option(None, help="Quantize the weights while loading: int8 (per channel) or int4 (groups of 32); "
                                   "about 2x / 3.5x less memory than bf16 and faster decoding on CPU. A folder "
                                   "written by `nanoseek quantize` loads quantized without it.")


Device = Literal["auto", "cpu", "cuda"]
KvCache = Literal["auto", "fp32", "fp16", "bf16"]


def _device_option():
    return typer.Option("auto", help="Where the model runs: auto (a CUDA GPU where torch sees one, else the CPU), "
                                     "cpu or cuda.")


def _kv_cache_option():
    return typer.Option("auto", "--kv-cache", help="The KV cache's precision: auto (fp16 for a model computing in "
                                                   "fp32 on a CPU, whose kernels read it as fast: half "
                                                   "the memory per token and faster long contexts, as llama.cpp's "
                                                   "f16 cache; else the model's own), fp32, fp16 or bf16 (a "
                                                   "precision the model's attention does not read is converted at "
                                                   "every step: slower).")


def _precision_option():
    return typer.Option("auto", help="Training precision: fp32, bf16 (autocast; weights and optimizer stay fp32) or "
                                     "auto: bf16 on CUDA, and on a CPU whichever measured faster here (bf16 is ~3x "
                                     "faster with AMX, 20-100x slower with AVX2 only; measured once per machine, "
                                     "cached in ~/.cache/nanoseek/machine.json).")


def _train_compile_option():
    return typer.Option(None, "--compile/--no-compile", help="torch.compile attention, norms and dense MLPs (GRPO: "
                                                             "the rollouts' decoding). Default: on for CUDA with "
                                                             "triton, for training in bf16 on a CPU and for GRPO's "
                                                             "rollouts; off for training in fp32 on a CPU, where it "
                                                             "measured no faster. "
                                                             "Eager if compiling fails; graphs are cached in "
                                                             "~/.cache/nanoseek/inductor, so later runs start faster.")


def _compile_option(off_because: str | None = None):
    """--compile/--no-compile for decoding: decided by the model's size (`decide_decode_compile`), or
    off by default where compiling at startup does not pay (`off_because`)."""
    when = (f"Default: off ({off_because})." if off_because else
            "Default: on for models of up to 256 MiB of weights, for dense models on a CPU and for int4 MoE "
            "models on a CPU (each MoE layer one operator), off for other larger MoE models and on GPUs.")
    return typer.Option(False if off_because else None, "--compile/--no-compile", help="Decode through torch.compile: "
                        "about 4x faster than eager for small models on a CPU, after compiling at startup (a 1.5B: "
                        "minutes the first time, seconds once cached on disk; needs a C++ compiler, decodes eagerly "
                        "without one). A small DeepSeek (MLA) model with float weights, the shipped one included, "
                        f"decodes through nanoseek's C++ step either way; this then covers MTP's speculative steps. {when}")


def _speculative_option():
    return typer.Option(False, help="MTP speculative decoding when the model has an MTP layer (the same greedy output, "
                                    "but for int8 weights, whose products round a little differently at two rows than "
                                    "at one; sampled output from the same distribution; with --compile about 1.4x "
                                    "faster).")


def _memory_bytes() -> float:
    """This machine's physical memory (unknown: unlimited)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _shipped_model() -> Path:
    if not (SHIPPED / "config.json").is_file():
        _fail("no chat model is shipped in this installation; pass a model folder or run `nanoseek speedrun --ship`")
    return SHIPPED


def _sampling(tok, temperature: float | None, top_p: float | None, temperature_else: float,
              top_p_else: float) -> tuple[float, float]:
    """The temperature and top_p given, else the model's generation_config.json defaults, else these."""
    defaults = tok.sampling_defaults
    return (temperature if temperature is not None else defaults.get("temperature", temperature_else),
            top_p if top_p is not None else defaults.get("top_p", top_p_else))


def _no_template(model: Path | None) -> str:
    return (f"{model}: the model folder has no chat template (tokenizer_config.json's chat_template, or "
            "chat_template.jinja): it is a base model, or its tokenizer files are missing")


def _chat_engine(model: Path | None, **options):
    """load_chat_engine on --model, or on the chat model shipped in the package when none is given."""
    if model is None:
        model = _shipped_model()
    from .loading import load_chat_engine

    with _reported():
        return load_chat_engine(model, console=console, **options)


# ---- the commands ----
DEMO_MARK = "DEMO"  # the file that tells a demo's folder from a model of the user's


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder to save the demo model into (HF format).",
                             callback=_out_folder),
    preset: Preset = typer.Option("tiny", help="Model preset to build."),
    tokens: int = typer.Option(16, min=1, help="How many tokens to generate."),
    seed: int = _seed_option("Random seed for the weights and the prompt."),
    force: bool = typer.Option(False, "--force", help="Replace a model --out already holds; an earlier demo's is "
                               "replaced anyway."),
):
    """Build a randomly initialised preset, save it, load it back, check the logits survived the
    round trip, and generate a few tokens through the latent KV cache."""
    # an earlier demo's folder carries DEMO_MARK (rerunning replaces it); any other model is the user's
    if not force and (out / "config.json").is_file() and not (out / DEMO_MARK).is_file():
        _fail(f"--out: '{out}' already holds a model: choose another folder, or --force to replace it")
    import torch
    from rich.table import Table

    from .checkpoint import load_model, save_model
    from .inference.cache import KVCache, cache_dtype
    from .inference import generate as generate_ids
    from .model import build_model, get_preset

    _check_fits(preset, 4)
    torch.manual_seed(seed)
    config = get_preset(preset)
    t0 = time.perf_counter()
    model = build_model(config).eval()
    with _reported():
        save_model(model, out)
        (out / DEMO_MARK).write_text("written by `nanoseek demo`: a random model, which the next demo replaces\n")
    loaded = load_model(out)
    prompt = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        same = torch.equal(model(prompt).logits, loaded(prompt).logits)
    t1 = time.perf_counter()
    ids = generate_ids(loaded, prompt, max_new_tokens=tokens)
    t2 = time.perf_counter()
    cache = KVCache(config, rows=1, max_len=1, dtype=cache_dtype(config, torch.float32, "cpu"))  # as generate_ids keeps it

    table = Table(title=f"nanoseek demo: preset '{preset}'", show_header=False)
    table.add_row("parameters", f"{_count(loaded.num_params())} total, {_count(loaded.num_params(active=True))} "
                                f"active per token (+{len(loaded.mtp_layers)} MTP layer)")
    table.add_row("saved to", f"{out}/ (config.json + model.safetensors, loadable by transformers)")
    table.add_row("reload", "logits identical" if same else "[red]logits differ[/]")
    table.add_row("KV cache", f"{cache.bytes_per_token} bytes/token (the latent only, in {str(cache.kv.dtype)[6:]})")
    table.add_row("prompt ids", str(prompt[0].tolist()))
    table.add_row("generated ids", str(ids[0]))
    table.add_row("time", f"build+save+load {t1 - t0:.2f}s, generate {tokens} tokens {t2 - t1:.2f}s")
    console.print(table)
    if not same:
        raise typer.Exit(1)


@app.command(cls=WithArguments)
def info(model: Path = typer.Argument(None, metavar="MODEL", callback=_model_folder, show_default=False,
                                      help="A Hugging Face-format model folder (default: the chat model shipped "
                                           "with nanoseek).")):
    """Print a checkpoint's architecture, sizes and KV-cache cost without loading its weights."""
    if model is None:
        model = _shipped_model()
    import torch
    from rich.table import Table

    from .checkpoint import has_mtp_weights, inference_dtypes, load_config, shard_map
    from .inference import KVCache
    from .model import DeepseekForCausalLM

    with _reported():
        config, raw = load_config(model)
        weight_map = shard_map(model)  # the weights are there and their headers read (a folder without them said nothing)
    if not has_mtp_weights(config, weight_map):
        config = replace(config, num_nextn_predict_layers=0)  # as loading does: no MTP weights, no MTP layer
    with torch.device("meta"):
        m = DeepseekForCausalLM(config)
    table = Table(title=str(model), show_header=False)
    quant = raw.get("quantization_config") or {}
    stored = raw.get("torch_dtype") or raw.get("dtype")  # transformers 5 writes "dtype"
    weights = {"fp8": "FP8", "nanoseek": f"int{quant.get('bits')}"}.get(quant.get("quant_method"), stored or "?")
    table.add_row("architecture", f"{config.model_type} ({weights} weights)")
    table.add_row("attention", f"GQA, {config.num_attention_heads} heads over {config.num_key_value_heads} key-value heads"
                  if config.is_gqa else f"MLA, {config.num_attention_heads} heads, latent {config.kv_lora_rank}")
    table.add_row("layers", f"{config.num_hidden_layers} ({min(config.first_k_dense_replace, config.num_hidden_layers)} "
                            f"dense) + {config.num_nextn_predict_layers} MTP")
    if config.n_routed_experts:
        table.add_row("experts", f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}, "
                                 f"{config.scoring_func}/{config.topk_method}) + {config.n_shared_experts} shared")
    table.add_row("parameters", f"{_count(m.num_params())} total, {_count(m.num_params(active=True))} active per token")
    fp32 = KVCache(config, 1, 1, device='meta').bytes_per_token
    table.add_row("KV cache", f"{fp32} bytes/token in fp32, {fp32 // 2} in fp16 (--kv-cache)")
    dtype, weight_dtype = inference_dtypes(model)  # what serve/chat/generate load it as on this machine
    compute = str(dtype).removeprefix("torch.") if dtype else stored or "bfloat16"
    kept, quantized = str(weight_dtype).removeprefix("torch."), quant.get("quant_method") == "nanoseek"
    table.add_row("on this CPU", f"computes in {compute}" + ("" if not weight_dtype else f", prompts multiplied in {kept}"
                                                            if quantized else f", linear weights kept in {kept}"))
    console.print(table)


tokenizer_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                            help="Train byte-level BPE tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    data: list[str] = typer.Option(..., "--data", callback=_tokenizer_data, metavar="SOURCE", help="Corpus: "
                                   ".txt/.jsonl/.parquet/.py files (.jsonl and .parquet: their 'text' field), folders "
                                   "of them (other files in them are passed over), or 'stdlib' for the Python "
                                   "standard library's source. Repeatable."),
    out: Path = typer.Option(..., "--out", callback=_out_folder, help="Folder to write tokenizer.json + "
                             "tokenizer_config.json into."),
    vocab_size: int = typer.Option(4096, "--vocab-size", min=300, help="Vocabulary size, special tokens included."),
    skip_bad_records: bool = typer.Option(False, help="Skip and count malformed records instead of stopping."),
    max_documents: int = typer.Option(0, min=0, help="Stop after this many documents (0 = the whole corpus)."),
    force: bool = typer.Option(False, "--force", help="Replace a tokenizer OUT already holds."),
):
    """Train a byte-level BPE tokenizer with DeepSeek's special tokens (streams the corpus)."""
    import itertools

    if not force and (out / "tokenizer.json").is_file():
        _fail(f"--out: '{out}' already holds a tokenizer (a model trained with it would no longer read its ids): "
              "choose another folder, or --force to replace it")

    from .data.corpus import CorpusStats, corpus_progress, iter_documents
    from .tokenizer import DeepSeekTokenizer

    stats = CorpusStats()
    docs = iter_documents(data, on_error="skip" if skip_bad_records else "stop", stats=stats)
    if max_documents > 0:
        docs = itertools.islice(docs, max_documents)
    with corpus_progress(console) as bar:
        task = bar.add_task("reading", total=None)

        def counted():
            for i, doc in enumerate(docs, start=1):
                if i % 1000 == 0:
                    bar.update(task, description=f"training BPE on {i:,} documents")
                yield doc

        with _reported():
            tok = DeepSeekTokenizer.train(counted(), vocab_size=vocab_size)
    if not stats.documents:
        _fail(f"--data: no documents in {', '.join(data)}" + (f" ({stats.skipped:,} malformed records skipped)"
                                                               if stats.skipped else ""))
    with _reported():
        tok.save(out)
    console.print(f"[green]saved[/] {out}/tokenizer.json: {tok.vocab_size:,} tokens from {_many(stats.documents, 'document')}"
                  + (f", {_many(stats.skipped, 'malformed record')} skipped" if stats.skipped else ""))
    if note := tok.shortfall(vocab_size):
        console.print(f"[yellow]note[/]: {note}")
    for problem in stats.problems[:5]:
        console.print(f"  [yellow]skipped[/] {problem}")


@app.command()
def pretrain(
    out: Path = typer.Option(Path("runs/pretrain"), callback=_out_folder, help="Run folder. Rerunning on an existing "
                             "folder resumes it."),
    preset: Preset = typer.Option("cpu-tiny", help="Model preset."),
    data: list[str] = typer.Option(DataConfig().sources, "--data", callback=_pretrain_data, metavar="SOURCE",
                                   help="Data sources, repeatable: 'tasks' (built-in reasoning problems), 'stdlib' "
                                   "(Python's own source, with FIM), or .txt/.jsonl/.parquet/.py files (.jsonl and "
                                   ".parquet: their 'text' field) or folders of them (other files in them are passed "
                                   "over)."),
    max_steps: int = _max_steps_option(),
    time_budget: str = _time_budget_option(),
    seq_len: int = typer.Option(DataConfig.seq_len, min=8, help="Tokens per row."),
    batch_size: int = typer.Option(DataConfig.batch_size, min=1, help="Rows per micro-batch per process."),
    grad_accum: int = typer.Option(PRETRAIN_TRAIN.grad_accum, min=1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(PRETRAIN_TRAIN.lr, callback=_positive, help="Peak learning rate."),
    schedule: Literal["wsd", "cosine", "constant"] = typer.Option(PRETRAIN_TRAIN.schedule, help="wsd (warmup-stable-"
                                                                  "decay), cosine or constant."),
    warmup_steps: int = typer.Option(PRETRAIN_TRAIN.warmup_steps, min=0, help="Linear warmup steps."),
    precision: Precision = _precision_option(),
    compile: bool = _train_compile_option(),
    mtp_lambda: float = typer.Option(0.3, callback=_within(0), help="Weight of the multi-token-prediction loss."),
    bias_gamma: float = typer.Option(PRETRAIN_TRAIN.bias_gamma, callback=_within(0), help="Router-bias update speed (aux-loss-free "
                                     "balancing; 0 = off)."),
    aux_alpha: float = typer.Option(None, callback=_within(0), help="Sequence-wise balance loss weight. Default: the preset's."),
    vocab_size: int = typer.Option(None, min=300, help="Vocabulary of the tokenizer trained for the run "
                                   f"(default {DataConfig.vocab_size}; not with --tokenizer, which has its own)."),
    tokenizer: Path = typer.Option(None, callback=_tokenizer_folder, help="Use this tokenizer folder instead of "
                                   "training one."),
    task_documents: int = typer.Option(DataConfig.task_documents, min=1, help="Problems generated for the 'tasks' "
                                       "source."),
    no_thinking_share: float = typer.Option(DataConfig.no_thinking_share, callback=_within(0, 1), help="The share of "
                                            "the 'tasks' source's problems answered with thinking off (the working "
                                            "shown in the reply)."),
    fim_rate: float = typer.Option(DataConfig.fim_rate, callback=_within(0, 1), help="FIM rate for corpus documents (code from "
                                   "'stdlib' uses 0.5)."),
    eval_every: int = typer.Option(PRETRAIN_TRAIN.eval_every, min=0, help="Evaluate held-out loss every N steps "
                                   "(0 = at the end only)."),
    checkpoint_every: int = _checkpoint_every_option(PRETRAIN_TRAIN.checkpoint_every),
    skip_bad_records: bool = typer.Option(False, help="Skip and count malformed corpus records instead of stopping."),
    seed: int = _seed_option("Seed for weights, data order and FIM."),
    device: str = typer.Option(None, callback=_device, help="cpu, cuda or cuda:N (default: cuda when available)."),
):
    """Pretrain a DeepSeek-V3-style model (MLA, MoE, MTP) from scratch: trains a tokenizer, tokenizes
    the data into shards, and runs the training loop with checkpoints, metrics.jsonl and curves.png.

    Also runs under torchrun: torchrun --nproc-per-node 2 -m nanoseek pretrain ..."""
    train = _train(PRETRAIN_TRAIN, max_steps, time_budget, grad_accum=grad_accum, lr=lr, schedule=schedule,
                   warmup_steps=warmup_steps, precision=precision, compile=compile, bias_gamma=bias_gamma,
                   aux_alpha=aux_alpha, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
    if tokenizer and vocab_size is not None:
        _fail("--vocab-size: the tokenizer given by --tokenizer has its own vocabulary (--vocab-size sizes one "
              "trained for the run)")
    cfg = DataConfig(sources=data, seq_len=seq_len, batch_size=batch_size,
                     vocab_size=None if tokenizer else vocab_size or DataConfig.vocab_size,
                     tokenizer=str(tokenizer) if tokenizer else None, task_documents=task_documents,
                     no_thinking_share=no_thinking_share, fim_rate=fim_rate, skip_bad_records=skip_bad_records, seed=seed)
    import torch

    from .train.pretrain import pretrain as run_pretrain
    from .train.runs import exclusive

    if (device or "").startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device: {device} asked for, but torch sees no CUDA device here")
    _check_fits(preset, TRAINING_BYTES)
    with _reported(), exclusive(out):
        result = run_pretrain(out, preset=preset, data=cfg, train=train, mtp_lambda=mtp_lambda, device=device,
                              console=console)
    if result:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k in ("loss", "mtp_loss", "eval_loss"))
        console.print(f"[green]done[/]: {shown}. Model: {out}/model  Curves: {out}/curves.png")


@app.command()
def generate(
    message: str = typer.Argument(None, show_default=False, callback=_text,
                                  help="The user message, as `nanoseek generate \"What is 7 * 8?\"` (or give --prompt)."),
    model: Path = _model_option(),
    prompt: str = typer.Option(None, help="The user message (or, with --raw, the text to continue).", callback=_text),
    raw: bool = typer.Option(False, help="Continue the text as is, without the chat template (after the BOS where the "
                             "tokenizer puts one before a text, as transformers and the API read it)."),
    think: bool = typer.Option(True, help="Open the reply with <think> (R1 style)."),
    tools: bool = typer.Option(True, help="Offer the model a calculator when its chat template can write tool calls, "
                               "as chat does (calls and results are shown dimmed; not with --raw)."),
    max_tokens: int = typer.Option(None, min=1, help="Most tokens to generate. Default: 512, or what the model's context "
                                   "leaves after the prompt."),
    temperature: float = typer.Option(None, callback=_within(0, 100), help="0 = greedy. Default: the model's "
                                      "generation_config.json (R1-Distill: 0.6), else 0."),
    top_p: float = typer.Option(None, callback=_within(0, 1), help="Nucleus sampling: the smallest set of tokens with this "
                                "much probability. Default: the model's generation_config.json, else 1."),
    seed: int = typer.Option(None, min=0, help="Seed for reproducible sampling."),
    speculative: bool = _speculative_option(),
    compile: bool = _compile_option("one reply does not pay for compiling"),
    quantize: Quantize = _quantize_option(),
    device: Device = _device_option(),
    kv_cache: KvCache = _kv_cache_option(),
):
    """Generate one reply and print it, with the reasoning apart from the answer and speed figures."""
    if (message is None) == (prompt is None):
        _fail("give the message once: `nanoseek generate \"What is 7 * 8?\"` or --prompt \"...\"" if message is None
              else "the message was given twice (as an argument and as --prompt); give it once")
    prompt = prompt if message is None else message
    from .chat import Tools, no_calls, reply, stream_reply
    from .inference import ContextOverflow, SamplingParams
    from .tools import CallFormat, hidden_in_chat

    engine, tok = _chat_engine(model, max_batch=1, speculative=speculative, compile=compile, quantize=quantize,
                               device=device, kv_cache_dtype=kv_cache)
    if not raw and not tok.chat_template:
        _fail(f"{_no_template(model)}; --raw continues the prompt as plain text")
    t0 = time.perf_counter()
    temperature, top_p = _sampling(tok, temperature, top_p, 0.0, 1.0)
    offered = Tools.offer(engine, tok) if tools and not raw else None
    with _reported():
        try:
            # no tools offered: no raw calls (unless speculating: drafts are verified without a token ban)
            fmt = CallFormat.probe(tok)
            grammar = None if raw or offered is not None or engine.speculative else no_calls(tok, fmt, think)
            hidden = tok.special_ids if raw else hidden_in_chat(tok, fmt)  # as /v1/completions and a chat reply
            params = SamplingParams(max_new_tokens=max_tokens or GENERATE_TOKENS, temperature=temperature, top_p=top_p,
                                    seed=seed, grammar=grammar, skip_token_ids=hidden)
            if raw:
                ids = tok.encode_prompt(prompt, control=True)[0]
                new = max_tokens or engine.fitting(len(ids), GENERATE_TOKENS)
                reqs = [engine.submit(ids, replace(params, max_new_tokens=new))]
                stream_reply(engine, reqs[0], False, console, answer_label=None)
            else:  # (with the calculator: a round per reply that calls it, as in chat)
                reqs = reply(engine, tok, console, [{"role": "user", "content": prompt}], params, think=think,
                             tools=offered, fit=max_tokens is None)
        except ContextOverflow as e:  # said in the command's terms (the engine's are max_new_tokens)
            room = e.context - e.prompt_tokens
            if room <= 0 or max_tokens is None:  # the prompt itself is too long (a default --max-tokens was never asked)
                _fail(f"--prompt: the prompt ({e.prompt_tokens} tokens) leaves no room for a reply in the model's "
                      f"context of {e.context} tokens: shorten it")
            _fail(f"--max-tokens: the prompt ({e.prompt_tokens} tokens) plus {e.max_new_tokens} exceeds the model's "
                  f"context of {e.context} tokens: use --max-tokens {room} or less")
    req = reqs[-1]
    dt = time.perf_counter() - t0
    tokens, drafted, accepted = (sum(n) for n in zip(*((len(r.tokens), r.drafted, r.accepted) for r in reqs)))
    spec = f", MTP drafts accepted {accepted}/{drafted}" if drafted else ""
    console.print(f"[dim]{tokens} tokens in {dt:.2f}s ({tokens / dt:.1f} tok/s){spec}; finish: {req.finish_reason}[/]")
    if req.finish_reason == "cancelled":  # stopped with Ctrl-C: a script sees the reply cut short
        raise typer.Exit(130)
    if req.finish_reason == "error":  # (the reason printed with the reply)
        raise typer.Exit(1)


@app.command()
def chat(
    model: Path = _model_option(),
    system: str = typer.Option("", help="System prompt.", callback=_text),
    temperature: float = typer.Option(None, callback=_within(0, 100), help="Sampling temperature (0 = greedy); /temp changes "
                                      "it. Default: the model's generation_config.json, else 0.6."),
    top_p: float = typer.Option(None, callback=_within(0, 1), help="Nucleus sampling: the smallest set of tokens with this "
                                "much probability. Default: the model's generation_config.json, else 0.95."),
    max_tokens: int = typer.Option(None, min=1, help="Most tokens per reply. Default: 1024, or what the model's context "
                                   "leaves after the conversation so far."),
    think: bool = typer.Option(True, help="Let the model reason first (shown dimmed)."),
    tools: bool = typer.Option(True, help="Offer the model a calculator when its chat template can write tool "
                               "calls (calls and results are shown dimmed)."),
    speculative: bool = _speculative_option(),
    compile: bool = _compile_option("chat starts at once; eager decoding outruns reading"),
    quantize: Quantize = _quantize_option(),
    device: Device = _device_option(),
    kv_cache: KvCache = _kv_cache_option(),
):
    """Chat in the terminal. Replies stream; the reasoning is shown dimmed above the answer, and
    calculator calls (models whose template writes tool calls) with their results below it.

    End a line with \\ to continue typing on the next line. Commands: /help, /reset (new conversation),
    /system TEXT (set the system prompt), /temp T (set the temperature), /exit; a message that starts
    with / is typed with two (//...). Ctrl-C stops the current reply; Ctrl-D or /exit leaves."""
    from .chat import chat as run_chat
    from .inference import ContextOverflow

    engine, tok = _chat_engine(model, speculative=speculative, compile=compile, quantize=quantize, device=device,
                               kv_cache_dtype=kv_cache)
    if not tok.chat_template:
        _fail(f"{_no_template(model)}; chatting needs one (`nanoseek generate --raw` continues plain text)")
    console.print(f"[bold]nanoseek chat[/] with {model or 'the shipped chat model'}  (/help /reset /system /temp /exit; "
                  "Ctrl-C stops a reply)")
    temperature, top_p = _sampling(tok, temperature, top_p, 0.6, 0.95)
    try:
        run_chat(engine, tok, console, system=system, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                 think=think, tools=tools)
    except ContextOverflow as e:  # (raised before the first message: none could be answered)
        room = e.context - e.prompt_tokens
        advice = f", leaving {room}: give --max-tokens {room} at most" if max_tokens and room > 0 else \
            ": shorten --system" if system else ""
        _fail(f"a one-word message{' with this --system' if system else ''} takes {e.prompt_tokens} of the model's "
              f"{e.context} tokens of context" + advice)


@app.command()
def sft(
    model: Path = _model_option("The model folder to fine-tune (e.g. runs/pretrain/model).", default=...),
    data: str = typer.Option(SFTConfig.data, callback=_sft_data, help="A .jsonl of {\"messages\": [...]} "
                             "conversations (assistant turns may carry reasoning_content), or 'builtin' (task "
                             "problems phrased many ways + chat)."),
    out: Path = typer.Option(Path("runs/sft"), callback=_out_folder, help="Run folder (rerun to resume)."),
    max_steps: int = _max_steps_option(),
    time_budget: str = _time_budget_option("Training time, e.g. 3m."),
    lr: float = typer.Option(SFT_TRAIN.lr, callback=_positive, help="Peak learning rate."),
    batch_size: int = typer.Option(SFTConfig.batch_size, min=1, help="Rows per micro-batch."),
    seq_len: int = typer.Option(SFTConfig.seq_len, min=8, help="Tokens per row."),
    conversations: int = typer.Option(None, min=1, help="Size of the built-in mixture. Default: "
                                      f"{SFTConfig.builtin_conversations:,}."),
    tool_share: float = typer.Option(None, callback=_within(0, 1), help="Built-in mixture: calculator "
                                     "conversations added, as a share of --conversations (0 = none). An older "
                                     "nanoseek tokenizer gains DeepSeek-V3's tool tokens, and the model the rows "
                                     f"for them. Default: {SFTConfig.tool_share:g}."),
    no_thinking_share: float = typer.Option(None, callback=_within(0, 1), help="Built-in mixture: the share answered "
                                            f"with thinking off. Default: {SFTConfig.no_thinking_share:g}."),
    checkpoint_every: int = _checkpoint_every_option(SFT_TRAIN.checkpoint_every),
    precision: Precision = _precision_option(),
    compile: bool = _train_compile_option(),
    seed: int = _seed_option("Seed for the data order and the built-in mixture."),
):
    """Chat SFT: loss only on the assistant's tokens (reasoning and answer); MTP keeps training."""
    train = _train(SFT_TRAIN, max_steps, time_budget, lr=lr, precision=precision, compile=compile, seed=seed,
                   checkpoint_every=checkpoint_every)
    mixture = {field: (option, value) for field, option, value in (  # the built-in mixture's options that were given
        ("builtin_conversations", "--conversations", conversations), ("tool_share", "--tool-share", tool_share),
        ("no_thinking_share", "--no-thinking-share", no_thinking_share)) if value is not None}
    if data != "builtin" and mixture:
        _fail(f"{next(iter(mixture.values()))[0]}: it shapes the built-in mixture; --data {data} trains on that file's "
              "conversations")
    cfg = SFTConfig(data=data, seq_len=seq_len, batch_size=batch_size, seed=seed,
                    **{field: value for field, (_, value) in mixture.items()})
    from .train.sft import sft as run_sft
    from .train.runs import exclusive

    with _reported(), exclusive(out):
        result = run_sft(model, out, cfg, train, console=console)
    if result:
        console.print(f"[green]done[/]: loss {result.get('loss', float('nan')):.4g}. Model: {out}/model")


@app.command()
def rl(
    model: Path = _model_option("The model folder to train (after SFT for R1 mode, a base for R1-Zero).",
                                default=...),
    tasks: str = typer.Option("mul", callback=_families_and_calculator, help=f"Comma-separated task families: "
                              f"{', '.join(TASKS)}, or calculator (hard arithmetic with the calculator offered: its "
                              "calls run, and the model answers from the result)."),
    out: Path = typer.Option(Path("runs/rl"), callback=_out_folder, help="Run folder (rerun to resume)."),
    max_steps: int = _max_steps_option("GRPO steps (0 = until --time-budget; one of the two is needed)."),
    time_budget: str = _time_budget_option("Training time, e.g. 10m."),
    lr: float = typer.Option(RL_TRAIN.lr, callback=_positive, help="Learning rate (RL wants it small)."),
    prompts: int = typer.Option(GRPOConfig.prompts_per_step, min=1, help="Problems per step."),
    group: int = typer.Option(GRPOConfig.group_size, min=2, help="Samples per problem (G)."),
    updates: int = typer.Option(GRPOConfig.updates_per_rollout, min=1, help="Optimizer steps per batch of rollouts "
                                "(GRPO's mu)."),
    temperature: float = typer.Option(GRPOConfig.temperature, callback=_within(0, 100, above=True),
                                     help="Rollout temperature (> 0: GRPO learns from how a prompt's samples differ)."),
    beta: float = typer.Option(GRPOConfig.beta, callback=_within(0), help="KL (k3) to the starting model; 0 = no "
                               "reference model."),
    loss_norm: Literal["sequence", "token", "dr_grpo"] = typer.Option(
        GRPOConfig.loss_norm, help="sequence (each completion weighs the same), token (DAPO) or dr_grpo (sum over "
                                   "tokens / (completions x max length))."),
    dr_grpo: bool = typer.Option(False, help="Dr. GRPO advantages (no std division)."),
    mode: Literal["r1", "r1-zero"] = typer.Option(GRPOConfig.mode, help="r1 (chat template) or r1-zero (R1-Zero "
                                                  "prompt on a base model)."),
    no_thinking_share: float = typer.Option(GRPOConfig.no_thinking_share, callback=_within(0, 1), help="r1 mode: the "
                                            "share of problems asked with thinking off, the reply's last line "
                                            "scored (keeps the thinking-off replies SFT taught from wearing down; "
                                            "not for the calculator family)."),
    checkpoint_every: int = _checkpoint_every_option(RL_TRAIN.checkpoint_every),
    precision: Precision = _precision_option(),
    compile: bool = _train_compile_option(),
    seed: int = _seed_option("Seed for problems and sampling."),
):
    """R1-style GRPO with rule-based rewards (accuracy after </think> + format), rollouts through the engine."""
    train = _train(RL_TRAIN, max_steps, time_budget, lr=lr, precision=precision, compile=compile, seed=seed,
                   checkpoint_every=checkpoint_every)
    if mode == "r1-zero" and "calculator" in tasks:
        _fail("--mode: r1-zero asks with R1-Zero's prompt, which offers no tools; the calculator family needs r1")
    cfg = GRPOConfig(tasks=tasks, prompts_per_step=prompts, group_size=group, updates_per_rollout=updates,
                     temperature=temperature, beta=beta, loss_norm=loss_norm, dr_grpo=dr_grpo, mode=mode,
                     no_thinking_share=no_thinking_share, seed=seed)
    from .train.grpo import rl as run_rl
    from .train.runs import exclusive

    with _reported(), exclusive(out):
        result = run_rl(model, out, cfg, train, console=console)
    if result:
        from .train.metrics import read_metrics

        # the last rollouts' figures (a last step that updated again on earlier rollouts logged none: it said 0.000)
        rolled = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m] or [result]
        console.print(f"[green]done[/]: reward {rolled[-1].get('reward', 0):.3f}, accuracy "
                      f"{rolled[-1].get('accuracy', 0):.1%}. Model: {out}/model  Curves: {out}/curves.png")
        if not any(m.get("groups_kept") for m in rolled):
            console.print("[yellow]note[/]: every group's samples scored alike at every step, so there was nothing to "
                          "learn and the model is unchanged: a harder --tasks family, or a larger --group")


@app.command()
def distill(
    teacher: str = typer.Option(..., callback=_model_or_url, help="A model folder, or an OpenAI-compatible URL "
                                "(DeepSeek's API, a nanoseek server) whose reasoning_content is the trace."),
    student: str = typer.Option("cpu-dense-small", callback=_preset_or_model, help="A preset (a fresh smaller "
                                f"model: {', '.join(PRESETS)}) or a model folder."),
    out: Path = typer.Option(Path("runs/distill"), callback=_out_folder, help="Run folder (rerun to continue)."),
    tasks: str = typer.Option("add,sub,mul", callback=_families, help="Comma-separated task families to distill."),
    traces: int = typer.Option(2000, min=1, help="Verified traces to collect (a rerun with the same options continues "
                               "collecting, until the student starts training)."),
    tokenizer: Path = typer.Option(None, callback=_tokenizer_folder, help="Tokenizer for a preset student with a "
                                   "remote teacher."),
    teacher_model: str = typer.Option("deepseek-reasoner", help="Model name at a remote teacher."),
    api_key: str = typer.Option(None, envvar="NANOSEEK_TEACHER_API_KEY", help="Key for a remote teacher."),
    kl_alpha: float = typer.Option(0.0, callback=_within(0, 1), help="Weight of logit-level KL to a local teacher, "
                                   "0-1: the loss is (1 - a) * cross-entropy + a * KL (0 = traces only)."),
    max_steps: int = _max_steps_option("Student SFT steps (0 = until --time-budget; one of the two is needed)."),
    time_budget: str = _time_budget_option("Student SFT time, e.g. 3m.", default="3m"),
    checkpoint_every: int = _checkpoint_every_option(DISTILL_TRAIN.checkpoint_every),
    precision: Precision = _precision_option(),
    compile: bool = _train_compile_option(),
):
    """Distill a teacher's verified reasoning traces into a smaller student (rejection sampling + SFT)."""
    remote = _is_url(teacher)
    if remote and kl_alpha > 0:
        _fail("--kl-alpha needs a local teacher (a model folder): a URL gives no logits")
    if remote and student in PRESETS and tokenizer is None:
        _fail("--tokenizer: a preset student with a remote teacher needs a tokenizer folder")
    train = _train(DISTILL_TRAIN, max_steps, time_budget, precision=precision, compile=compile,
                   checkpoint_every=checkpoint_every)
    _check_fits(student, TRAINING_BYTES, "--student")
    from .train.distill import distill as run_distill
    from .train.runs import exclusive

    with _reported(), exclusive(out):
        result = run_distill(teacher, student, out, tasks, traces, tokenizer=str(tokenizer) if tokenizer else None,
                             kl_alpha=kl_alpha, teacher_model=teacher_model, api_key=api_key, train=train,
                             console=console)
    console.print(f"[green]done[/]: {result.get('verified', 0)} verified traces "
                  f"({result.get('acceptance', 0):.0%} accepted). Student: {out}/student/model")


@app.command("eval")
def eval_(
    model: str = typer.Option(None, callback=lambda v: v if v is None else _model_or_url(v),
                              help="A model folder, or an OpenAI-compatible URL (e.g. a nanoseek server's "
                              "http://127.0.0.1:8000/v1, or DeepSeek's API with --remote-model deepseek-reasoner); "
                              "default: the chat model shipped in the package."),
    remote_model: str = typer.Option("nanoseek", help="Model name at a URL."),
    api_key: str = typer.Option(None, envvar="NANOSEEK_EVAL_API_KEY", help="Key for a URL."),
    tasks: str = typer.Option("add,sub,mul,countdown,linear", callback=_families_and_calculator, help="Comma-separated task "
                              "families; 'calculator' scores hard arithmetic with the calculator tool offered and "
                              "not offered (a model folder only)."),
    n: int = typer.Option(100, min=1, max=10_000, help="Held-out problems per family."),
    samples: int = typer.Option(1, min=1, help="Samples per problem (k for pass@k and majority vote)."),
    temperature: float = typer.Option(0.0, callback=_within(0, 100), help="0 = greedy (with samples > 1, 0.7 is used)."),
    wording: Wording = typer.Option("canonical",
                                help="How each question is asked: the family's canonical wording, a random wording "
                                "from the templates training draws from, or from the held-out templates training "
                                "never sees."),
    varied: bool = typer.Option(False, hidden=True, help="Same as --wording varied."),
    max_tokens: int = typer.Option(0, min=0, help="Generation cap (0 = 1.5x the longest worked solution; 512 for a "
                                   "URL)."),
    out: Path = typer.Option(None, help="Write results JSON here, a .md table next to it, and every problem's "
                             "question, answer, completions and verdicts as .samples.jsonl (what the model got wrong)."),
    quantize: Quantize = _quantize_option(),
    thinking: bool = typer.Option(True, help="Ask with thinking on (the reply reasons first) or off (it answers "
                                  "at once)."),
    device: Device = _device_option(),
    kv_cache: KvCache = _kv_cache_option(),
):
    """Held-out accuracy per task family: pass@1, pass@k, majority vote, format rate, response length."""
    model = model if model is not None else str(_shipped_model())
    remote = _is_url(model)
    wording = "varied" if varied else wording
    if remote and "calculator" in tasks:
        _fail("--tasks: the 'calculator' family runs the model's calls locally: give a model folder, not a URL")
    if remote and quantize:
        _fail("--quantize: applies to a model folder, not to a URL")
    from .data.tasks import problems_for

    for family in tasks:  # drawn before the model loads or --out is made: a family's pool may be smaller than --n
        try:
            if family != "calculator":
                problems_for(family, n, wording)
        except ValueError as e:
            _fail(f"--n {n}: {e}")
    if out is not None and out.is_dir():
        _fail(f"--out: '{out}' is a folder; give a file name (e.g. {out}/eval.json)")
    if out is not None and out.suffix != ".json":  # (a .txt of the user's would be overwritten with JSON)
        _fail(f"--out: give the results' .json file name ('{out.with_suffix('.json')}'): the table goes beside it as "
              ".md, every problem as .samples.jsonl")
    if out is not None and out.is_file() and not _eval_results(out):  # (a run's config.json, a model's tokenizer.json)
        _fail(f"--out: '{out}' holds another file than an evaluation's results: choose another name")
    if out is not None:  # before the evaluation, not after it; nothing is left there if it never ends
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out.parent).close()
            if out.exists() and not os.access(out, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as e:
            under = next((p for p in out.parents if p.is_file()), None)  # (mkdir says "File exists" under a file)
            _fail(f"--out: cannot write '{out}': " + (f"'{under}' is a file" if under else e.strerror or str(e)))
    import json

    from .eval.tasks import evaluate_family, evaluate_remote, markdown_table, sampling_temperature
    from dataclasses import asdict

    from .eval.tool_use import evaluate_tool_use, tool_table
    from .remote import remote_chat

    if samples > 1 and temperature == 0:
        console.print(f"[yellow]note[/]: {samples} greedy samples of a problem would be one reply {samples} times: they "
                      f"are drawn at temperature {sampling_temperature(temperature, samples)}")
    if remote:
        ask = remote_chat(model, remote_model, api_key, temperature=sampling_temperature(temperature, samples),
                          thinking=None if thinking else False, log=console.print)
    else:
        engine, tok = _chat_engine(Path(model), max_batch=64, quantize=quantize, device=device, kv_cache_dtype=kv_cache)
        if not tok.chat_template:
            _fail(f"{_no_template(model)}; eval asks its questions through the chat template")
    results, tool_rows, samples_log = [], [], []
    for family in tasks:
        if family == "calculator":
            with _reported():
                tool_rows = [evaluate_tool_use(engine, tok, n=n, offered=o, thinking=thinking) for o in (True, False)]
            console.print(tool_table(tool_rows))
            continue
        with _reported():
            if remote:
                r, records = evaluate_remote(ask, [(family, wording)], n=n, samples=samples,
                                             max_new_tokens=max_tokens or 512, thinking=thinking)[0]
            else:
                r, records = evaluate_family(engine, tok, family, n=n, samples=samples, temperature=temperature,
                                       wording=wording, max_new_tokens=max_tokens or None, thinking=thinking)
        results.append(r)
        samples_log += [{"family": family, "wording": wording, **record} for record in records]
        at_k = f", pass@{samples} {r.pass_at_k:.1%}" if samples > 1 else ""
        console.print(f"{family}: pass@1 {r.accuracy:.1%}{at_k}, format {r.format_rate:.0%}")
    table = markdown_table(results) if results else ""
    if results:
        console.print(table)
    if out:  # the families' rows, then the calculator's (family "calculator")
        try:
            out.write_text(json.dumps([r.row() for r in results] + [{"family": "calculator", **asdict(r)}
                                                                    for r in tool_rows], indent=2))
            how = (f"`{model}`{f' ({remote_model})' if remote else ''}, {wording} wording, thinking "
                   f"{'on' if thinking else 'off'}, {samples} sample(s) per problem at temperature "
                   f"{sampling_temperature(temperature, samples)}{f', {quantize}' if quantize else ''}")
            out.with_suffix(".md").write_text("\n\n".join(t for t in (how, table, tool_rows and tool_table(tool_rows))
                                                            if t) + "\n")
            if samples_log:
                out.with_suffix(".samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples_log))
        except OSError as e:  # the disk filled, or the folder went away, during the evaluation
            _fail(f"--out: cannot write '{out}': {e.strerror or e}")


@app.command()
def speedrun(
    out: Path = typer.Option(Path("runs/speedrun"), callback=_out_folder, help="Pipeline folder (rerun to resume "
                             "after a crash)."),
    budget: str = typer.Option("30m", callback=parse_duration, help="Time for the whole pipeline; stages get fixed "
                               "shares of it."),
    preset: Preset = typer.Option(SpeedrunConfig.preset, help="The chat model's preset."),
    rl_tasks: str = typer.Option("", callback=_families_or_auto, help=f"Families for the GRPO stage, comma-separated: "
                                 f"{', '.join(TASKS)}, calculator (default: the weakest family the SFT model solves "
                                 "10-90% of the time)."),
    ship: bool = typer.Option(False, help="Copy the resulting chat model and report into the package "
                              "(nanoseek/assets/model), where serve and chat find it by default."),
    precision: Precision = _precision_option(),
    compile: bool = _train_compile_option(),
    seed: int = typer.Option(SpeedrunConfig.seed, min=0, help="Seeds every stage's data and initialisation; the "
                             "report card states it. A folder resumes only with the seed and preset it was started with."),
):
    """Tokenizer -> pretraining -> SFT -> GRPO -> distillation -> evaluation -> report card, on this machine.

    Every stage is a run folder under OUT; the same stages are the commands pretrain, sft, rl,
    distill and eval, which run at any scale on your own data."""
    if budget < MIN_SPEEDRUN_BUDGET:  # (a budget of 1s was taken, and run past for minutes)
        _fail(f"--budget: give the pipeline at least {MIN_SPEEDRUN_BUDGET:.0f}s, e.g. 30m (what it was made for)")
    if budget < 10 * 60:
        console.print("[yellow]note[/]: under 10 minutes the stages' fixed work (tokenizing, evaluating, the report) "
                      "takes longer than their shares: the run will overrun --budget")
    _check_fits(preset, TRAINING_BYTES)
    from .speedrun import ship as ship_model
    from .speedrun import speedrun as run_speedrun
    from .train.runs import exclusive

    with _reported(interrupted="[yellow]interrupted[/]: rerun the same command to continue"), exclusive(out):
        run_speedrun(out, SpeedrunConfig(budget=budget, preset=preset, rl_tasks=rl_tasks or None, precision=precision,
                                         compile=compile, seed=seed), console=console)
    if ship:
        ship_model(out, SHIPPED)
        console.print(f"[green]shipped[/] {SHIPPED}")


def _check_port(host: str, port: int) -> None:
    """Fail with one line now, before the model loads, when the server could not bind host:port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:  # the family uvicorn binds
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except socket.gaierror:
            _fail(f"--host: cannot resolve {host!r}")
        except OSError as e:
            _fail(f"--port: cannot listen on {host}:{port} ({e.strerror}); "
                  + ("another program is using it: pick another port with --port" if e.errno == errno.EADDRINUSE else
                     "pick another port with --port or another interface with --host"))


@app.command()
def serve(
    model: list[Path] = typer.Option([], metavar="DIR", callback=lambda paths: [_model_folder(p) for p in paths],
                                     help="Model folder (HF format with tokenizer.json); repeat to serve several, "
                                     "which the web app offers in a picker; default: the chat model shipped with "
                                     "nanoseek."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind. Without an API key only loopback is allowed "
                             "unless --allow-open is given."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    api_key: str = typer.Option(None, envvar="NANOSEEK_API_KEY", help="Require 'Authorization: Bearer KEY' "
                                "or 'x-api-key: KEY' (also read from NANOSEEK_API_KEY)."),
    allow_open: bool = typer.Option(False, help="Serve without an API key on a non-loopback interface."),
    name: list[str] = typer.Option([], metavar="NAME", help="The model name clients use (repeat, in --model's order, for "
                                   "several; default: 'nanoseek' for one model, each folder's name for several)."),
    max_batch: int = typer.Option(16, min=1, help="Requests decoded together."),
    max_queue: int = typer.Option(64, min=1, help="Waiting requests before the server answers 503."),
    db: Path = typer.Option(None, callback=_db_file, help="SQLite file for the web app's conversations (default: per user, "
                            "$XDG_DATA_HOME/nanoseek/chats.db or ~/.local/share/nanoseek/chats.db; never in the model)."),
    allowed_host: list[str] = typer.Option([], metavar="NAME", help="Without an API key, also answer requests "
                                           "for this Host name (repeatable; loopback names and --host always are)."),
    allowed_origin: list[str] = typer.Option([], metavar="ORIGIN", callback=_origins, help="Let web pages from this "
                                             "origin (e.g. http://localhost:3000; repeatable; * for any) call the API "
                                             "from a browser (CORS). None by default. With * and no API key, any page "
                                             "you open can use the server."),
    speculative: bool = _speculative_option(),
    compile: bool | None = _compile_option(),
    quantize: Quantize = _quantize_option(),
    device: Device = _device_option(),
    kv_cache: KvCache = _kv_cache_option(),
):
    """Serve the OpenAI/DeepSeek-compatible API (/v1/chat/completions, /v1/completions, /v1/responses),
    Anthropic's Messages API as DeepSeek serves it (/anthropic/v1/messages) and the chat web app (/) on one port."""
    names = _served_names(model, name)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1") and not allow_open:
        _fail(f"--host: refusing to serve without an API key on {host}: set --api-key / NANOSEEK_API_KEY, or pass "
              "--allow-open")
    _check_port(host, port)
    from .serve import Service, create_app  # the server's dependencies, only for this command
    from .serve.chats import read_examples
    from .serve.guard import allowed_hosts, run
    from .serve.store import ChatStore, default_path

    try:  # before any model loads: a --db that cannot be opened is a usage error
        store = ChatStore(db or default_path())
    except (OSError, sqlite3.Error) as e:
        _fail(f"--db: cannot open '{db or default_path()}': {getattr(e, 'strerror', None) or e}")
    served = []
    for folder, served_name in zip(model or [None], names):
        engine, tok = _chat_engine(folder, max_batch=max_batch, speculative=speculative, compile=compile,
                                   quantize=quantize, device=device, kv_cache_dtype=kv_cache)
        engine.max_queue = max_queue
        with _reported():
            served.append(Service(engine, tok, served_name, read_examples(folder or SHIPPED)))  # + the welcome screen
        if not tok.chat_template:
            console.print(f"[yellow]note[/] {_no_template(folder)}: '{served_name}' answers /v1/completions only "
                          "(chat requests get a 400 saying so)")
        if db is None and folder is not None and (folder / "chats.db").is_file():
            console.print(f"[yellow]note[/] chats are no longer kept in the model folder: pass --db "
                          f"{folder / 'chats.db'} to keep using that file, or move it to {default_path()}")
    first = served[0]
    application = create_app(first.engine, first.tok, name=first.name, api_key=api_key, store=store,
                             examples=first.examples, allowed_hosts=allowed_hosts(host, allowed_host), also=served[1:],
                             allowed_origins=allowed_origin)
    address = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    what = ", ".join(f"{f or 'the shipped chat model'} as '{n}'" for f, n in zip(model or [None], names))
    console.print(f"[bold]nanoseek[/] serving {what} on http://{address}:{port}  "
                  f"(web app at /, API at /v1{', key required' if api_key else ''}; conversations kept in {store.path})")
    if "*" in allowed_origin and not api_key:
        console.print("[yellow]note[/] --allowed-origin '*' without an API key: any web page opened in a browser on "
                      "this machine can use the server (set --api-key to require a key)")
    run(application, host, port)


def _served_names(folders: list[Path], names: list[str]) -> list[str]:
    """serve's model names, one per --model (the shipped model when none): those given with --name
    in order, then each folder's name (for one model: 'nanoseek'; a run's model/ folder, the shipped one
    included, by its run's name)."""
    count = max(len(folders), 1)
    names = list(names)
    if len(names) > count:
        _fail(f"--name: {len(names)} names for {count} model{'s' * (count > 1)}; give at most one --name per --model")
    if any(not n.strip() for n in names):
        _fail("--name: give each model a name clients can use")
    defaults = ["nanoseek"] if count == 1 else [_model_name(f) for f in folders]
    names += defaults[len(names):]
    if len(set(names)) < len(names) or {"deepseek-reasoner", "deepseek-chat"} & set(names):
        _fail(f"--name: the served models need distinct names other than deepseek-reasoner and deepseek-chat "
              f"(got {', '.join(names)}); name them with --name")
    return names


def _model_name(folder: Path) -> str:
    """A model folder's name; for a run's `model/` (runs/NAME/model, and the shipped assets/model) the run's."""
    folder = folder.resolve()
    if folder.name != "model":
        return folder.name
    return "nanoseek" if folder == SHIPPED.resolve() else folder.parent.name


@app.command(cls=WithArguments)
def quantize(
    model: Path = typer.Argument(..., metavar="MODEL", callback=_model_folder, help="A model folder (HF format: "
                                 "DeepSeek V2/V3 incl. FP8, R1-Distill Qwen2/Qwen3/Llama)."),
    out: Path = typer.Argument(..., metavar="OUT", callback=_out_folder, help="Folder to write the quantized model "
                               "(and the tokenizer files) into."),
    bits: Literal[8, 4] = typer.Option(8, help="8: int8 per output channel; 4: int4 in groups of 32 inputs."),
    force: bool = typer.Option(False, "--force", help="Replace a model OUT already holds."),
):
    """Quantize every linear layer (attention, MLPs, each expert, the output head) and write a folder that
    loads quantized without re-quantizing. Tensors are converted one at a time while the shards stream
    by, so memory holds the quantized model plus one tensor."""
    if out.resolve() == model.resolve():
        _fail("OUT must be another folder than MODEL")
    if not force and ((out / "config.json").is_file() or any(out.glob("*.safetensors"))):
        _fail(f"OUT: '{out}' already holds a model: choose another folder, or --force to replace it")
    import shutil

    from safetensors import SafetensorError

    from .checkpoint import INDEX, load_model, save_model
    from .files import move_in
    from .serve.chats import EXAMPLES_FILE

    t0 = time.perf_counter()
    # the files go with the model (the web app's examples too: the same model answers them); written apart, then moved
    # into OUT with config.json last: a failure midway (a full disk, Ctrl-C) had left a folder that loaded as a model
    # without its tokenizer files, or, with --force, with the replaced model's chat template and end-of-sequence ids
    companions = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja", EXAMPLES_FILE)
    staged = out.absolute().with_name(f".{out.name}.quantizing")
    with console.status(f"quantizing {model} to int{bits}"):
        with _reported():
            m = load_model(model, quantize=bits)
        try:
            shutil.rmtree(staged, ignore_errors=True)
            save_model(m, staged)
            for name in companions:
                if (model / name).is_file():
                    shutil.copy(model / name, staged / name)
            old = [*out.glob("model*.safetensors"), out / INDEX, *(out / name for name in companions)]
            move_in(staged, out, "config.json", old)  # (--force over another model's folder: none of its files stay)
        except (OSError, SafetensorError) as e:  # a folder that cannot be made or written (under a file, read-only, a full disk)
            _fail(f"OUT: cannot write '{out}': {getattr(e, 'strerror', None) or e} (nothing was written)")
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    weights = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"  # (a small model said 0.00 GB)
    console.print(f"[green]wrote[/] {out} (int{bits}, {weights} of weights) in {time.perf_counter() - t0:.0f} s; "
                  "nanoseek's format: transformers, vLLM and llama.cpp read the float folder, not this one")
    if not (model / "tokenizer.json").is_file():
        console.print(f"[yellow]note[/] {model} has no tokenizer.json, so neither has {out}: chat, generate and serve "
                      "need one (copy the tokenizer files of the model's release into it)")


def main():
    app()
