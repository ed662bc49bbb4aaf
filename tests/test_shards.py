"""Token shards, FIM, packing and the resumable data cursor."""

import random

import numpy as np
import pytest

from nanoseek.data.builtin import builtin_conversations, task_conversations, task_documents, task_texts
from nanoseek.data.shards import (IGNORE, PackedRows, ShardError, ShardSet, fim_restore, pack_documents,
                                  rows_to_batch, write_shards)
from nanoseek.tokenizer import DeepSeekTokenizer

DOCS = [f"def f{i}(x):\n    return x * {i} + {'y' * (i % 7)}  # {'ünïcödé ' * (i % 3)}\n" * (1 + i % 9)
        for i in range(300)]


@pytest.fixture(scope="module")
def tok():
    return DeepSeekTokenizer.train(list(task_texts(500)) + DOCS, vocab_size=400)


def test_fim_documents_decode_back_to_the_original(tok, tmp_path):
    write_shards(DOCS, tok, tmp_path / "s", fim_rate=1.0, spm_rate=0.5, seed=3)
    shards = ShardSet(tmp_path / "s")
    assert shards.meta["fim_documents"] == len(DOCS)
    modes = set()
    for d, doc in enumerate(DOCS):
        ids = shards.document(d).tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        body = ids[1:-1]
        assert body[0] == tok.fim_begin_id and body.count(tok.fim_hole_id) == 1 and body.count(tok.fim_end_id) == 1
        modes.add("spm" if body[1] == tok.fim_hole_id else "psm")
        assert tok.decode(fim_restore(body, tok)) == doc
    assert modes == {"psm", "spm"}


def test_fim_rate_zero_keeps_documents_and_rate_is_respected(tok, tmp_path):
    write_shards(DOCS, tok, tmp_path / "plain")
    plain = ShardSet(tmp_path / "plain")
    assert [tok.decode(plain.document(d).tolist()[1:-1]) for d in range(len(DOCS))] == DOCS
    stats = write_shards(DOCS * 4, tok, tmp_path / "some", fim_rate=0.25, seed=1)
    assert 0.15 < stats.fim_documents / (4 * len(DOCS)) < 0.35
    # a per-document rate overrides the default
    stats = write_shards([(d, 1.0) for d in DOCS[:10]] + DOCS[10:20], tok, tmp_path / "mixed", fim_rate=0.0)
    assert stats.fim_documents == 10


def test_small_shards_and_truncation_detected(tok, tmp_path):
    stats = write_shards(DOCS, tok, tmp_path / "s", shard_tokens=2000, batch_docs=7)
    assert len(stats.shards) > 3
    shards = ShardSet(tmp_path / "s")
    assert len(shards) == len(DOCS)
    assert tok.decode(shards.document(len(DOCS) - 1).tolist()[1:-1]) == DOCS[-1]
    f = tmp_path / "s" / "shard_00001.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ShardError, match="shard_00001"):
        ShardSet(tmp_path / "s")
    with pytest.raises(ShardError, match="no documents"):
        write_shards([], tok, tmp_path / "empty")
    assert not (tmp_path / "empty.tmp").exists() and not (tmp_path / "empty").exists()


def test_packing_respects_rows_and_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=rng.integers(2, 90)) for _ in range(400)]
    row_len = 64
    rows = pack_documents(docs, row_len, pad=2)
    assert all(len(r) == row_len for r in rows)
    # every token of every document appears exactly once; only padding is added
    packed = np.concatenate(rows)
    assert (packed != 2).sum() == sum(len(d) for d in docs)
    assert np.array_equal(np.sort(packed[packed != 2]), np.sort(np.concatenate(docs)))
    # documents no longer than a row are never split: each appears contiguously inside one row
    text_rows = [",".join(map(str, r.tolist())) for r in rows]
    for d in docs[:50]:
        if len(d) <= row_len:
            assert any(",".join(map(str, d.tolist())) in t for t in text_rows)
    fill = (packed != 2).mean()
    assert fill > 0.9, fill


def test_labels_ignore_padding_and_document_boundaries():
    eos, pad = 1, 2
    rows = np.array([[0, 5, 6, 1, 0, 7, 1, 2, 2]])
    x, y = rows_to_batch(rows, pad, eos)
    assert x.tolist() == [[0, 5, 6, 1, 0, 7, 1, 2]]
    assert y.tolist() == [[5, 6, 1, IGNORE, 7, 1, IGNORE, IGNORE]]


def test_cursor_resumes_exactly_across_windows_and_epochs(tok, tmp_path):
    write_shards(DOCS, tok, tmp_path / "s")
    a = PackedRows(tmp_path / "s", seq_len=32, batch_size=3, seed=5, window_docs=40)
    for _ in range(37):  # crosses several windows
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(400)]  # crosses an epoch boundary
    b = PackedRows(tmp_path / "s", seq_len=32, batch_size=3, seed=5, window_docs=40)
    b.load_state_dict(state)
    got = [next(b) for _ in range(400)]
    assert a.epoch >= 1
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert x1.equal(x2) and y1.equal(y2)


def test_a_long_documents_pieces_are_spread_over_batches(tok, tmp_path):
    """A document many rows long is cut into consecutive rows; shuffled rows keep it from making up
    whole batches (one source file per batch measured as a loss spike with 3-6x the gradient)."""
    long_doc = "".join(f"def g{i}(a, b):\n    return a * {i} - b\n" for i in range(150))
    docs = DOCS[:60] + [long_doc] + DOCS[60:]
    write_shards(docs, tok, tmp_path / "s")
    pieces = -(-len(ShardSet(tmp_path / "s").document(60)) // 33)
    rows = PackedRows(tmp_path / "s", seq_len=32, batch_size=4, seed=3, window_docs=len(docs))
    batches = [next(rows)[0] for _ in range(len(rows._pack_window()) // 4)]
    per_batch = [sum("def g" in tok.decode(row) for row in x.tolist()) for x in batches]
    assert pieces >= 20 and sum(per_batch) >= pieces - 2
    assert sum(n == 4 for n in per_batch) <= 2, per_batch  # packed in order, pieces // 4 batches would be all of it
    assert sum(n > 0 for n in per_batch) > pieces // 3  # its pieces land in many batches


def test_two_ranks_split_the_rows_of_one_process(tok, tmp_path):
    write_shards(DOCS, tok, tmp_path / "s")
    one = PackedRows(tmp_path / "s", seq_len=32, batch_size=4, seed=1)
    ranks = [PackedRows(tmp_path / "s", seq_len=32, batch_size=2, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(10):
        x, _ = next(one)
        x0, _ = next(ranks[0])
        x1, _ = next(ranks[1])
        assert x[0::2].equal(x0) and x[1::2].equal(x1)


def test_task_documents_render_like_the_chat_template(tok):
    conv = builtin_conversations(1, seed=7)[0]
    doc = next(task_documents(tok, 1, seed=7))
    ids, _ = tok.render_conversation(conv)
    assert [tok.bos_id] + tok.encode(doc) + [tok.eos_id] == ids
    assert "<think>" in doc and "</think>" in doc


def test_pretraining_answers_a_share_of_the_problems_with_thinking_off(tok, tmp_path):
    """The 'tasks' source writes DataConfig.no_thinking_share of its problems in the thinking-off form chat SFT and
    serving use (the reasoning block closed empty, the working in the reply); the problems are the same either way."""
    from nanoseek.train.pretrain import _documents
    from nanoseek.train.settings import DataConfig

    def docs(share):
        return list(_documents("tasks", tok, DataConfig(task_documents=600, no_thinking_share=share), "train", None))

    off = "<think>\n\n</think>\n\n"
    assert DataConfig().no_thinking_share == 0.15
    default, none, every = docs(DataConfig().no_thinking_share), docs(0.0), docs(1.0)
    share = sum(off in d for d in default) / len(default)
    assert 0.08 < share < 0.22 and not any(off in d for d in none)
    assert [d.split("<｜Assistant｜>")[0] for d in default] == [d.split("<｜Assistant｜>")[0] for d in none]
    turns = [d for d in every if d.count("<｜User｜>") == 1 and "<think>\n" in d]
    assert turns and all(off in d for d in turns)  # (small talk with thinking off is its reply alone)


def test_task_documents_use_only_the_train_split(tok):
    from nanoseek.data.tasks import get_task

    for messages in task_conversations(300, seed=2):
        q = messages[0]["content"]
        assert q  # every document carries a question
    test_keys = {(p.family, get_task(p.family).key(p.data)) for name in ("add", "mul")
                 for p in get_task(name).heldout(50)}
    rng = random.Random(0)
    for _ in range(2000):
        for name in ("add", "mul"):
            t = get_task(name)
            p = t.sample(rng, "train")
            assert (name, t.key(p.data)) not in test_keys


def test_packing_keeps_channels_together():
    docs = [np.stack([np.arange(n), np.arange(n) * 10]) for n in (5, 3, 7, 2)]
    rows = pack_documents(docs, 8, pad=(0, IGNORE))
    for r in rows:
        real = r[0] != 0
        assert np.array_equal(r[1][real], r[0][real] * 10) or (r[0][0] == 0 and r[1][0] == 0)
        assert (r[1][r[1] == IGNORE].size + real.sum()) <= 8
