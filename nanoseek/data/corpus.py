"""Reading user corpora as a stream of documents (strings), with bounded memory.

Formats: `.txt` (one file = one document, cut at line boundaries past 1M characters),
`.jsonl` (one JSON object per line with a `text` field), `.parquet` (a `text` column, read one
row group at a time), and folders of them (recursively, in sorted order). `stdlib` (or `stdlib:`) names the Python standard library's
own `.py` sources, a code corpus present on every machine that has Python.

A malformed record (a bad JSON line, a missing or non-string `text`, bytes that are not
UTF-8) stops the read with an error naming the file and line, or, with `on_error="skip"`,
is skipped and counted in `CorpusStats`.
"""

from __future__ import annotations

import codecs
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

FORMATS = (".txt", ".jsonl", ".parquet", ".py")
STDLIB = "stdlib"


class CorpusError(ValueError):
    """A corpus file or record that cannot be read; the message names the file and line."""


@dataclass
class CorpusStats:
    documents: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few skipped records, for the report

    def skip(self, where: str) -> None:
        self.skipped += 1
        if len(self.problems) < 20:
            self.problems.append(where)


def stdlib_sources() -> list[Path]:
    """The standard library's .py files (tests and site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def corpus_files(sources: list[str | Path]) -> list[Path]:
    """Expand files, folders and `stdlib` into a sorted list of readable files."""
    files: list[Path] = []
    for src in sources:
        if str(src).rstrip(":") == STDLIB:
            files += stdlib_sources()
            continue
        p = Path(src)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FORMATS)
        elif p.is_file():
            if p.suffix not in FORMATS:
                raise CorpusError(f"{p}: unsupported format {p.suffix!r} (use {', '.join(FORMATS)})")
            files.append(p)
        else:
            raise CorpusError(f"{p}: no such file or folder")
    if not files:
        raise CorpusError(f"no corpus files found in {[str(s) for s in sources]}")
    return files


def iter_documents(sources: list[str | Path], on_error: str = "stop",
                   stats: CorpusStats | None = None, text_field: str = "text") -> Iterator[str]:
    """Yield documents from every source in order. on_error: "stop" (raise CorpusError) or "skip"."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else CorpusStats()

    def bad(where: str, why: str) -> None:
        if on_error == "stop":
            raise CorpusError(f"{where}: {why} (--skip-bad-records skips and counts such records)")
        stats.skip(f"{where}: {why}")

    for f in corpus_files(sources):
        if f.suffix == ".jsonl":
            docs = _jsonl(f, text_field, bad)
        elif f.suffix == ".parquet":
            docs = _parquet(f, text_field, bad)
        else:
            docs = _text_file(f, bad)
        for doc in docs:
            stats.documents += 1
            yield doc


def _text_file(f: Path, bad, max_chars: int = 1 << 20) -> Iterator[str]:
    """A text file is one document; one larger than max_chars is cut at line boundaries, and a line longer than
    that into pieces of it (a file of one 28 MB line was one document, and took 5.4 GB to tokenize). A line with
    bytes that are not UTF-8 is skipped from there on."""
    parts, size, n, column = [], 0, 1, 0
    decoder = codecs.getincrementaldecoder("utf-8")()  # (a piece may end inside a character: the decoder keeps it)
    broken = False
    with open(f, "rb") as fh:
        while raw := fh.readline(max_chars):
            end = raw.endswith(b"\n")
            if not broken:
                try:
                    piece = decoder.decode(raw, final=end)
                except UnicodeDecodeError as e:
                    bad(f"{f}:{n}", f"bytes that are not UTF-8 at column {column + e.start + 1}")
                    broken = True
                else:
                    parts.append(piece)
                    size += len(piece)
            column += len(raw)
            if end:
                n, column, broken = n + 1, 0, False
                decoder.reset()
            if size >= max_chars:
                yield "".join(parts)
                parts, size = [], 0
    try:
        parts.append(decoder.decode(b"", final=True))  # a last line without its newline, ended mid-character
    except UnicodeDecodeError:
        if not broken:
            bad(f"{f}:{n}", "bytes that are not UTF-8 at its end")
    if "".join(parts):
        yield "".join(parts)


def _jsonl(f: Path, text_field: str, bad) -> Iterator[str]:
    with open(f, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            where = f"{f}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(where, f"bytes that are not UTF-8 at column {e.start + 1}")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(where, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")  # some messages end in "at"
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                bad(where, f"no string field {text_field!r}")
                continue
            yield record[text_field]


def _parquet(f: Path, text_field: str, bad) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises several types for unreadable files
        bad(str(f), f"unreadable parquet file ({e})")
        return
    if text_field not in pf.schema_arrow.names:
        bad(str(f), f"no column {text_field!r} (columns: {pf.schema_arrow.names})")
        return
    row = 0
    for g in range(pf.num_row_groups):
        for value in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                bad(f"{f}:row {row}", f"{text_field!r} is {type(value).__name__}, not a string")
                continue
            yield value


def corpus_progress(console: Console) -> Progress:
    """A line that says how far reading a corpus has got: a spinner, what it did, the time (no spinner in a log, which
    kept its last frame)."""
    spin = [SpinnerColumn()] if console.is_terminal else []
    return Progress(*spin, TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
