"""Pretraining: data preparation (tokenizer, shards), then the language-model objective on the one loop.

A pretraining run folder holds, besides what every run has (see runs.py):
    tokenizer/          the tokenizer (trained on a sample of the data unless one is given)
    data/train          token shards of every source
    data/eval/<source>  held-out shards per source (task problems never trained on, held-out documents)
    data/prepared.json  the settings the data was prepared from, and the sources too small to hold any out
    model/              the final model (HF format + tokenizer), what `nanoseek sft --model` takes
Data sources: "tasks" (task-family conversations with worked reasoning, train split), "stdlib"
(the Python standard library's source, with FIM), or corpus files/folders (.txt/.jsonl/.parquet).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console

from ..data.builtin import code_documents, task_documents, task_texts
from ..data.corpus import CorpusStats, corpus_files, corpus_progress, iter_documents
from ..data.shards import PackedRows, ShardError, ShardSet, write_shards
from ..files import atomic_write, read_json_object, staged_dir
from ..model import ConfigError, ModelConfig, build_model, get_preset, padded_vocab
from ..tokenizer import DeepSeekTokenizer
from . import distributed as D
from .loop import Trainer
from .losses import LMObjective
from .runs import check_same_run, checkpoints, recorded_run, resolved_paths, run_stage
from .settings import PRETRAIN_TRAIN, DataConfig, TrainConfig

BUILTIN = ("tasks", "stdlib")


# ---- data preparation ----
def _documents(source: str, tok: DeepSeekTokenizer, cfg: DataConfig, split: str,
               stats: CorpusStats) -> Iterator[str | tuple[str, float]]:
    if source == "tasks":
        n = cfg.task_documents if split == "train" else cfg.eval_documents
        yield from task_documents(tok, n, seed=cfg.seed + (split == "test"), split=split,
                                  no_thinking=cfg.no_thinking_share)
    elif source == "stdlib":
        chars = cfg.code_chars if split == "train" else max(cfg.code_chars // 20, 1)
        docs = code_documents(chars, split=split)
        if split == "test":
            docs = itertools.islice(docs, cfg.eval_documents)
        for doc in docs:
            yield doc, cfg.code_fim_rate
    else:  # a user corpus: every 50th document is held out
        docs = iter_documents([source], on_error="skip" if cfg.skip_bad_records else "stop", stats=stats)
        held = (doc for i, doc in enumerate(docs) if (i % 50 == 49) == (split == "test"))
        yield from (itertools.islice(held, cfg.eval_documents) if split == "test" else held)


PREPARED = "prepared.json"  # in run_dir/data: the settings the data was prepared from, and its held-out sets


def prepare_data(run_dir: Path, cfg: DataConfig, console: Console) -> DeepSeekTokenizer:
    """Tokenizer and shards in run_dir (reused when already there and prepared from the same settings).
    Data left by an attempt that never started training, from other settings, is discarded; a run that
    trained on other data is refused before anything is written."""
    settings, files = _data_settings(cfg), data_files(cfg.sources)
    stamp_file = run_dir / "data" / PREPARED
    stamp = read_json_object(stamp_file) or None
    if stamp is not None and (resolved_paths(stamp.get("settings")) != resolved_paths(settings)
                              or stamp.get("files", files) != files):
        if checkpoints(run_dir):  # it trained on that data: refused as a resume with other settings or changed files
            check_same_run({"data": stamp.get("settings")}, {"data": settings})
            old_files = stamp.get("files", files)
            changed = sorted(f for f in {*files, *old_files} if files.get(f) != old_files.get(f))
            raise ConfigError(f"--data: {', '.join(changed)} changed since this run prepared its data (files added, "
                              "removed, resized or rewritten): it resumes only on the data it trained on; use a new "
                              "--out to train on these")
        for stale in (run_dir / "data", run_dir / "tokenizer"):  # a failed attempt's: never trained on
            shutil.rmtree(stale, ignore_errors=True)
        stamp = None
    if stamp is None and not (run_dir / "tokenizer").exists():  # a new run: record what it is prepared from
        stamp = {"settings": settings, "files": files}
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(stamp_file, json.dumps(stamp, indent=2))
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = DeepSeekTokenizer.load(tok_dir)
    else:
        if cfg.tokenizer:
            tok = DeepSeekTokenizer.load(cfg.tokenizer)
        else:
            with console.status(f"training a {cfg.vocab_size}-token BPE tokenizer on a sample of {cfg.sources}"):
                sample = itertools.chain.from_iterable(
                    itertools.islice(_sample_texts(s, cfg), 20_000) for s in cfg.sources)
                tok = DeepSeekTokenizer.train(sample, vocab_size=cfg.vocab_size)
            if note := tok.shortfall(cfg.vocab_size):
                console.print(f"[yellow]note[/]: {note}")
        with staged_dir(tok_dir) as tmp:  # a crash never leaves a tokenizer folder that looks whole
            tok.save(tmp)
    jobs = [("train", run_dir / "data" / "train", cfg.sources)]
    jobs += [("test", run_dir / "data" / "eval" / name, [s]) for name, s in eval_names(cfg.sources).items()]
    for split, out, sources in jobs:
        if split == "test" and stamp is not None and out.name in stamp.get("too_few", []):
            continue
        if not (out / "meta.json").is_file():
            try:
                _tokenize(split, out, sources, tok, cfg, console)
            except ShardError:
                if split == "train":
                    raise ShardError(f"{', '.join(map(str, sources))}: no documents to train on") from None
                console.print(f"[yellow]{sources[0]}: too few documents to hold any out[/] (every 50th is held "
                              "out): no held-out loss for it")
                if stamp is not None:
                    stamp["too_few"] = [*stamp.get("too_few", []), out.name]
                    atomic_write(stamp_file, json.dumps(stamp, indent=2))
    return tok


def held_out_sets(run_dir: Path, cfg: DataConfig) -> list[str]:
    """The names of the run's held-out sets that have data (a source too small to hold any out has none)."""
    stamp = read_json_object(run_dir / "data" / PREPARED)
    return [name for name in eval_names(cfg.sources) if name not in stamp.get("too_few", [])]


def _tokenize(split: str, out: Path, sources: list[str], tok: DeepSeekTokenizer, cfg: DataConfig,
              console: Console) -> None:
    stats = CorpusStats()
    label = "train" if split == "train" else f"held-out {out.name}"
    try:
        with corpus_progress(console) as bar:
            task = bar.add_task(f"tokenizing {label} data")

            def show(docs, tokens):
                bar.update(task, description=f"tokenizing {label} data: {docs:,} documents, {tokens:,} tokens")

            docs = itertools.chain.from_iterable(_documents(s, tok, cfg, split, stats) for s in sources)
            write_shards(docs, tok, out, fim_rate=cfg.fim_rate, seed=cfg.seed, progress=show)
    finally:  # (also when every record was skipped: it says why there is nothing to train on)
        if stats.skipped and split == "train":  # (the held-out pass reads the same records again)
            console.print(f"[yellow]{stats.skipped:,} malformed records skipped[/], e.g.:\n  "
                          + "\n  ".join(stats.problems[:3]))


def data_files(sources: list[str]) -> dict[str, list[int]]:
    """Each file the sources name (read from folders too; not the built-in ones) by its absolute path: [size,
    modification time in ns], to tell a resumed run's data from the same paths rewritten."""
    named = [s for s in sources if s not in BUILTIN]
    return {str(p.resolve()): [(st := p.stat()).st_size, st.st_mtime_ns] for p in (corpus_files(named) if named else [])}


def _data_settings(cfg: DataConfig) -> dict:
    """The settings that decide the tokenizer and the shards (not the batch shape)."""
    settings = asdict(cfg)
    for k in ("seq_len", "batch_size"):
        del settings[k]
    return settings


def eval_names(sources: list[str]) -> dict[str, str]:
    """A short unique name per source for its held-out set ('tasks', 'stdlib', a file's stem)."""
    names: dict[str, str] = {}
    for s in sources:
        base = s if s in BUILTIN else "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(s).stem) or "data"
        name, i = base, 2
        while name in names:
            name, i = f"{base}{i}", i + 1
        names[name] = s
    return names


def _sample_texts(source: str, cfg: DataConfig) -> Iterator[str]:
    if source == "tasks":
        yield from task_texts(20_000, cfg.seed)
    elif source == "stdlib":
        yield from code_documents(cfg.code_chars)
    else:
        yield from iter_documents([source], on_error="skip")


# ---- the run ----


def model_config_for(preset: str, tok: DeepSeekTokenizer, overrides: dict | None = None) -> ModelConfig:
    """A preset for a tokenizer: its special tokens and its vocabulary (padded_vocab)."""
    cfg = get_preset(preset, vocab_size=padded_vocab(tok.vocab_size), bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id, **(overrides or {}))
    cfg.validate()
    return cfg


def pretrain(out: str | Path, preset: str = "cpu-tiny", data: DataConfig | None = None,
             train: TrainConfig | None = None, mtp_lambda: float = 0.3, model_overrides: dict | None = None,
             device: str | None = None, console: Console | None = None) -> dict[str, float]:
    """Prepare (or reuse) the data, build (or resume) the model, train; writes out/model at the end."""
    console = console or Console()
    data, train = data or DataConfig(), train or PRETRAIN_TRAIN
    run_dir = Path(out)
    recorded_run(run_dir, "pretrain")  # another command's run folder, or a model's, is refused before data is written
    with D.process_group(device) as info:
        if info.main:
            prepare_data(run_dir, data, console)
        if info.active:
            torch.distributed.barrier()
        tok = DeepSeekTokenizer.load(run_dir / "tokenizer")
        config = model_config_for(preset, tok, model_overrides)
        tokens = ShardSet(run_dir / "data" / "train").meta["tokens"]
        if data.seq_len + 1 > tokens:  # (a row of 100,000 over 42,000 tokens ran a step for 13 minutes in 9 GB)
            raise ConfigError(f"--seq-len {data.seq_len}: the training data holds {tokens:,} tokens, not one row's "
                              "worth; give a shorter --seq-len")
        if data.seq_len > config.max_position_embeddings:  # the model's context covers what it trains on
            if info.main:
                console.print(f"[yellow]--seq-len {data.seq_len} is longer than the {preset} preset's context "
                              f"({config.max_position_embeddings}): the model is built with a context of "
                              f"{data.seq_len}[/] (attention's time and memory grow with its square)")
            config = replace(config, max_position_embeddings=data.seq_len)
        data_record = {**asdict(data), "global_batch": data.batch_size * info.world}
        del data_record["batch_size"]  # per process; a run may resume on another number of processes
        torch.manual_seed(train.seed)
        model = build_model(config, device=info.device)
        rows = PackedRows(run_dir / "data" / "train", data.seq_len, data.batch_size, seed=data.seed,
                          rank=info.rank, world=info.world)
        eval_sets = {name: _eval_batches(ShardSet(run_dir / "data" / "eval" / name), data, info)
                     for name in held_out_sets(run_dir, data)}
        run_config = {"command": "pretrain", "preset": preset, "model": config.to_dict(), "data": data_record,
                      "mtp_lambda": mtp_lambda}
        return run_stage(Trainer(run_dir, model, rows, LMObjective(mtp_lambda, info.device), train,
                                 eval_sets=eval_sets, run_config=run_config, save_extra=tok.save, console=console,
                                 dist=info))


def _eval_batches(shards: ShardSet, data: DataConfig, info: D.DistInfo):
    """The same held-out batches at every evaluation: up to 8 per process, within one epoch."""
    rows = shards.meta["tokens"] // (data.seq_len + 1)
    n = max(1, min(8, rows // (data.batch_size * info.world)))

    def batches():
        loader = PackedRows(shards, data.seq_len, data.batch_size, seed=1234, rank=info.rank, world=info.world)
        return itertools.islice(loader, n)
    return batches


__all__ = ["PRETRAIN_TRAIN", "DataConfig", "model_config_for", "prepare_data", "pretrain"]
