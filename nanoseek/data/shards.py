"""Token shards on disk, the FIM transform, and packed fixed-length training rows.

On disk a shard set is a folder:
    meta.json            dtype, vocabulary, special ids, per-shard token and document counts
    shard_00000.bin      the token ids of whole documents back to back (uint16 or uint32)
    shard_00000.idx      int64 offsets: document d spans tokens [idx[d], idx[d + 1])
Every document is stored as BOS + tokens + EOS. Writing streams the corpus in small batches
(memory stays bounded whatever the corpus size) into `<folder>.tmp`, moved into place when
complete (files.staged_dir), so a crash never leaves a shard set that reads as whole.

FIM (fill-in-the-middle) is applied per document while writing, at a configurable rate: the
text is cut at two random character positions into prefix / middle / suffix, each piece is
tokenized on its own (as a FIM request will be at inference), and arranged as
    PSM: <fim_begin> prefix <fim_hole> suffix <fim_end> middle
    SPM: <fim_begin> <fim_hole> suffix <fim_end> prefix middle
(DeepSeek-Coder used rate 0.5 on code, DeepSeek-V3 0.1, PSM).

`PackedRows` reads documents in a seeded random order per epoch and best-fit packs whole
documents into rows of seq_len + 1 tokens (a document longer than a row is cut into row-sized
pieces; no document is split across rows otherwise), then shuffles the rows of each window. The remainder of a row is padding with no
loss, and the position after each document's EOS is never a target, so nothing is learned
across a document boundary. Its state (epoch, window, row) makes the stream resumable exactly.
"""

from __future__ import annotations

import json
import os
import random
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import staged_dir
from ..tokenizer import DeepSeekTokenizer

IGNORE = -100


class ShardError(RuntimeError):
    """A shard folder that is missing, incomplete or inconsistent."""


# ---- FIM ----
def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Two uniform cut points in the text -> (prefix, middle, suffix)."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:]


def fim_arrange(prefix: list[int], middle: list[int], suffix: list[int], tok: DeepSeekTokenizer,
                spm: bool = False) -> list[int]:
    """A FIM document's ids in PSM or SPM order; a FIM request is PSM with no middle (the model writes it)."""
    if spm:
        return [tok.fim_begin_id, tok.fim_hole_id] + suffix + [tok.fim_end_id] + prefix + middle
    return [tok.fim_begin_id] + prefix + [tok.fim_hole_id] + suffix + [tok.fim_end_id] + middle


def fim_restore(ids: list[int], tok: DeepSeekTokenizer) -> list[int]:
    """Inverse of fim_arrange: the document's ids in reading order (prefix + middle + suffix)."""
    if not ids or ids[0] != tok.fim_begin_id:
        return ids
    hole, end = ids.index(tok.fim_hole_id), ids.index(tok.fim_end_id)
    if hole == 1:  # SPM; the prefix/middle boundary is not recorded, so they come back joined
        return ids[end + 1:] + ids[2:end]
    return ids[1:hole] + ids[end + 1:] + ids[hole + 1:end]


# ---- writing ----
@dataclass
class ShardStats:
    documents: int = 0
    tokens: int = 0
    fim_documents: int = 0
    shards: list[dict] = field(default_factory=list)


def write_shards(documents: Iterable[str | tuple[str, float]], tok: DeepSeekTokenizer, out: str | os.PathLike,
                 fim_rate: float = 0.0, spm_rate: float = 0.5, seed: int = 0,
                 shard_tokens: int = 1 << 26, batch_docs: int = 512, progress=None) -> ShardStats:
    """Tokenize a stream of documents into a shard folder (see module doc). Returns counts.

    A document given as (text, rate) uses its own FIM rate (e.g. code at 0.5 among prose at 0.1).
    progress(documents, tokens), if given, is called after each batch. Memory holds one batch
    of documents and their ids, never the corpus.
    """
    if not 0 <= fim_rate <= 1 or not 0 <= spm_rate <= 1:
        raise ValueError(f"fim_rate and spm_rate must be in [0, 1], got {fim_rate}, {spm_rate}")
    out = Path(out)
    with staged_dir(out) as tmp:
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        rng, stats = random.Random(seed), ShardStats()
        writer = _ShardWriter(tmp, dtype, shard_tokens, stats)

        def flush(batch: list[str]) -> None:
            pieces, plan = [], []  # plan: (n pieces, spm or None)
            for doc in batch:
                text, rate = doc if isinstance(doc, tuple) else (doc, fim_rate)
                if rate and rng.random() < rate:
                    pieces.extend(fim_split(text, rng))
                    plan.append((3, rng.random() < spm_rate))
                    stats.fim_documents += 1
                else:
                    pieces.append(text)
                    plan.append((1, None))
            encoded = [e.ids for e in tok.tok.encode_batch(pieces, add_special_tokens=False)]
            i = 0
            for n, spm in plan:
                ids = encoded[i] if n == 1 else fim_arrange(*encoded[i:i + 3], tok=tok, spm=spm)
                i += n
                writer.add([tok.bos_id] + ids + [tok.eos_id])
            if progress is not None:
                progress(stats.documents, stats.tokens)

        batch: list = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        writer.close()
        if stats.documents == 0:
            raise ShardError("the corpus yielded no documents")
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                "eos_id": tok.eos_id, "pad_id": tok.pad_id, "documents": stats.documents, "tokens": stats.tokens,
                "fim_rate": fim_rate, "spm_rate": spm_rate, "fim_documents": stats.fim_documents, "seed": seed,
                "shards": stats.shards}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return stats


class _ShardWriter:
    def __init__(self, folder: Path, dtype, shard_tokens: int, stats: ShardStats):
        self.folder, self.dtype, self.limit, self.stats = folder, dtype, shard_tokens, stats
        self.fh, self.offsets = None, [0]

    def add(self, ids: list[int]) -> None:
        if self.fh is None:
            self.name = f"shard_{len(self.stats.shards):05d}"
            self.fh = open(self.folder / f"{self.name}.bin", "wb")
        np.asarray(ids, dtype=self.dtype).tofile(self.fh)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.stats.documents += 1
        self.stats.tokens += len(ids)
        if self.offsets[-1] >= self.limit:
            self.close()

    def close(self) -> None:
        if self.fh is None:
            return
        self.fh.close()
        np.asarray(self.offsets, dtype=np.int64).tofile(self.folder / f"{self.name}.idx")
        self.stats.shards.append({"name": self.name, "documents": len(self.offsets) - 1, "tokens": self.offsets[-1]})
        self.fh, self.offsets = None, [0]


# ---- reading ----
class ShardSet:
    """Random access to the documents of a shard folder (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            raise ShardError(f"{self.folder}: not a shard folder (no meta.json)")
        self.meta = json.loads(meta_file.read_text())
        self.tokens, self.offsets = [], []
        for s in self.meta["shards"]:
            bin_file, idx_file = self.folder / f"{s['name']}.bin", self.folder / f"{s['name']}.idx"
            if not bin_file.is_file() or not idx_file.is_file():
                raise ShardError(f"{self.folder}: shard {s['name']} is missing")
            offsets = np.fromfile(idx_file, dtype=np.int64)
            if len(offsets) != s["documents"] + 1 or bin_file.stat().st_size != s["tokens"] * np.dtype(
                    self.meta["dtype"]).itemsize:
                raise ShardError(f"{self.folder}: shard {s['name']} does not match meta.json (truncated?)")
            self.tokens.append(np.memmap(bin_file, dtype=self.meta["dtype"], mode="r"))
            self.offsets.append(offsets)
        self.first_doc = np.cumsum([0] + [s["documents"] for s in self.meta["shards"]])
        self.pad_id, self.eos_id = self.meta["pad_id"], self.meta["eos_id"]

    def __len__(self) -> int:
        return int(self.first_doc[-1])

    def document(self, d: int) -> np.ndarray:
        s = int(np.searchsorted(self.first_doc, d, side="right")) - 1
        off = self.offsets[s]
        local = d - self.first_doc[s]
        return self.tokens[s][off[local]:off[local + 1]]


class PackedRows:
    """An endless, resumable stream of packed rows -> micro-batches (input_ids, labels), each [B, seq_len].

    Rows are packed per window of `window_docs` documents of the epoch's permutation, so the
    state is (epoch, window, rows already taken from it); restoring it re-packs that window
    (deterministic) and continues at the same row. With world > 1, global row i goes to rank
    i % world, so W processes with batch B see exactly the rows one process with batch W*B sees.
    """

    def __init__(self, shards: ShardSet | str | os.PathLike, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, window_docs: int = 2048):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards)
        self.row_len, self.batch_size, self.seed = seq_len + 1, batch_size, seed
        self.rank, self.world, self.window_docs = rank, world, window_docs
        self.epoch, self.window, self.row = 0, 0, 0
        self._order: np.ndarray | None = None
        self._rows: list[np.ndarray] | None = None

    # state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "row": self.row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.window, self.row, self.seed = state["epoch"], state["window"], state["row"], state["seed"]
        self._order = self._rows = None

    # packing
    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return self._order

    def _pack_window(self) -> list[np.ndarray]:
        """The window's packed rows in a seeded random order: a long document's pieces fill consecutive
        rows when packed, and a batch made of one source file's pieces measured as a loss spike (to 5-7
        from 0.7) with a gradient 3-6x the usual norm; shuffled, every batch mixes the window's documents."""
        order = self._epoch_order()
        docs = order[self.window * self.window_docs:(self.window + 1) * self.window_docs]
        rows = pack_documents([self.shards.document(int(d)) for d in docs], self.row_len, self.shards.pad_id)
        shuffled = np.random.default_rng([self.seed, self.epoch, self.window]).permutation(len(rows))
        return [rows[i] for i in shuffled]

    def _next_row(self) -> np.ndarray:
        while True:
            if self._rows is None:
                self._rows = self._pack_window()
            if self.row < len(self._rows):
                self.row += 1
                return self._rows[self.row - 1]
            self.window, self.row, self._rows = self.window + 1, 0, None
            if self.window * self.window_docs >= len(self.shards):
                self.epoch, self.window, self._order = self.epoch + 1, 0, None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.batch_size * self.world)][self.rank::self.world]
        return rows_to_batch(np.stack(rows), self.shards.pad_id, self.shards.eos_id)


def pack_documents(docs: list[np.ndarray], row_len: int, pad) -> list[np.ndarray]:
    """Best-fit pack whole documents (cut into row_len pieces when longer) into rows of row_len.
    A document is an [L] array, or a [C, L] array whose C channels (e.g. inputs and labels) are
    packed together; pad is one value, or one per channel. Rows come out in the order they opened."""
    rows: list[list[np.ndarray]] = []
    space: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for doc in docs:
        for start in range(0, doc.shape[-1], row_len):
            piece = doc[..., start:start + row_len]
            n = piece.shape[-1]
            i = bisect_left(space, (n, -1))
            if i < len(space):
                free, r = space.pop(i)
            else:
                free, r = row_len, len(rows)
                rows.append([])
            rows[r].append(piece)
            if free - n > 0:
                insort(space, (free - n, r))
    out = []
    for pieces in rows:
        flat = np.concatenate(pieces, axis=-1)
        row = np.empty(flat.shape[:-1] + (row_len,), dtype=np.int64)
        row[...] = np.asarray(pad, dtype=np.int64).reshape(-1, 1) if flat.ndim == 2 else pad
        row[..., : flat.shape[-1]] = flat
        out.append(row)
    return out


def rows_to_batch(rows: np.ndarray, pad_id: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [B, T + 1] -> input_ids [B, T], labels [B, T] with no target for padding or after an EOS."""
    rows = torch.from_numpy(rows)
    inputs, labels = rows[:, :-1].clone(), rows[:, 1:].clone()
    labels[(labels == pad_id) | (inputs == eos_id)] = IGNORE
    return inputs, labels
