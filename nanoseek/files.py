"""Files that survive a crash: a reader finds the old version or the new one, never a mix.

- `atomic_write(target, content)`: a file, written beside its target, flushed to disk (fsync),
  renamed over the target, and the rename itself flushed (fsync of the folder);
- `staged_dir(final)`: a folder, written under `final.tmp` and moved into place whole (every file
  and both folders fsynced) when the block ends without error;
- `move_in(staged, out, last)`: files written apart moved into a folder that keeps its other files, the file that
  marks it whole (`last`) removed first and moved in last;
- `drop_torn_tail(path)`: an append-only log (jsonl) whose last write a crash cut short loses
  that partial line, and only it; `read_jsonl(path)` reads such a log back.

A process killed at any point leaves at most a stale `*.tmp` that the next write of the same
target clears. Every durable write in nanoseek goes through here (checkpoints, manifests, run
folders, token shards, the exported model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


UMASK = os.umask(0o022)  # read once, at import (os.umask only reads it by setting it)
os.umask(UMASK)


def atomic_write(target: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> None:
    """Write target whole or not at all: content is text, bytes, or a function that writes the
    file at the (temporary) path it is given."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    if callable(content):
        content(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # as a plain open() would make it (safetensors writes 0600 files)
    elif isinstance(content, str):
        tmp.write_text(content)
    else:
        tmp.write_bytes(content)
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)


@contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """`with staged_dir(out) as tmp:` write the folder's files into tmp; at the end of the block
    tmp replaces out (the old out is removed first: a crash between the two leaves no out and a
    complete tmp). An exception removes tmp and leaves out as it was."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in sorted(tmp.rglob("*")):
        fsync_path(f)
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)


def move_in(staged: str | os.PathLike, out: str | os.PathLike, last: str, stale: Iterable[Path] = ()) -> None:
    """Move the files written into `staged` into the folder `out` (made if missing) by renaming, so that no reader takes
    `out` for whole while it is a mix: its `last` file (what marks it whole: a model's config.json) goes first, then the
    `stale` files, then the new ones, `last` at the end. `staged` lies beside `out` (renames stay on one filesystem) and
    is removed. Unlike staged_dir, the other files `out` holds stay."""
    staged, out = Path(staged), Path(out)
    files = sorted(staged.iterdir(), key=lambda f: f.name == last)
    for f in files:
        fsync_path(f)
    out.mkdir(parents=True, exist_ok=True)
    for f in (out / last, *stale):
        f.unlink(missing_ok=True)
    for f in files:
        os.replace(f, out / f.name)
    fsync_path(out)
    staged.rmdir()


def drop_torn_tail(path: str | os.PathLike) -> bytes:
    """Cut an append-only text log after its last newline: a crash mid-append leaves a last line
    without one, which is dropped. Returns the bytes dropped (b"" when the log was whole)."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
            os.fsync(f.fileno())
    return data[end:]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_object(path: str | os.PathLike) -> dict:
    """A file's JSON object, or {} when the file is missing, unreadable or holds something else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a jsonl file (blank lines skipped); a ValueError names the first line
    that is not a JSON object."""
    return [record for _, record in numbered_jsonl(path)]


def numbered_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """`read_jsonl` with each object's line number (from 1), for errors that point into the file."""
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if n == 1 else "")  # (a BOM, as Windows editors save)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8, or fix that line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: not a JSON object; fix or delete that line")
            records.append((n, record))
    return records
