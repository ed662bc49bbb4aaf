"""Corpus readers: formats, folders, the stdlib corpus, and malformed records named by file and line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.data import CorpusError, CorpusStats, corpus_files, iter_documents, stdlib_sources


def test_formats_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nsecond line\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "sub" / "c.parquet", row_group_size=2)
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    assert list(iter_documents([tmp_path])) == ["plain text\nsecond line\n", "one", "two", "p1", "p2", "p3"]


def test_stdlib_corpus():
    files = stdlib_sources()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    first = next(iter_documents(["stdlib"]))
    assert isinstance(first, str) and first


@pytest.mark.parametrize("content,why", [
    (b'{"text": "ok"}\n{"text": broken}\n', "invalid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', "no string field 'text'"),
    (b'{"text": "ok"}\n{"text": 5}\n', "no string field 'text'"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "not UTF-8"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, why):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    with pytest.raises(CorpusError, match=rf"data\.jsonl:2: .*{why}"):
        list(iter_documents([f]))
    stats = CorpusStats()
    assert list(iter_documents([f], on_error="skip", stats=stats)) == ["ok"]
    assert stats.skipped == 1 and stats.documents == 1 and "data.jsonl:2" in stats.problems[0]


def test_undecodable_text_and_missing_parquet_column(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"t\.txt:2: .*not UTF-8"):
        list(iter_documents([tmp_path / "t.txt"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(iter_documents([tmp_path / "p.parquet"]))


def test_large_text_file_is_streamed_in_pieces(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text(("y" * 999 + "\n") * 3000)  # 3M characters -> three 1M pieces
    docs = list(iter_documents([f]))
    assert len(docs) == 3 and "".join(docs) == f.read_text()


def test_a_line_longer_than_a_document_is_cut_into_pieces_too(tmp_path):
    """A file of one 28 MB line was one document (5.4 GB to tokenize); the cut falls between characters even
    where a piece's bytes end inside one, and bytes that are not UTF-8 name their line."""
    from nanoseek.data.corpus import _text_file

    f = tmp_path / "one_line.txt"
    text = "ab€" * 700_000 + "\nlast"  # 2.1M characters, 3.5 MB: a 1 MB piece ends inside a 3-byte '€' somewhere
    f.write_text(text)
    docs = list(iter_documents([f]))
    assert len(docs) >= 2 and max(map(len, docs)) < 2 << 20 and "".join(docs) == text
    problems = []
    (tmp_path / "bad.txt").write_bytes(b"ok\n" + b"x" * 100 + b"\xff" + b"y" * 10 + b"\nfine")
    assert "".join(_text_file(tmp_path / "bad.txt", lambda where, why: problems.append((where, why)), 64)) == \
        "ok\n" + "x" * 64 + "fine"  # (the line's pieces before the bad byte are kept)
    assert problems == [(f"{tmp_path / 'bad.txt'}:2", "bytes that are not UTF-8 at column 101")]


def test_bad_sources(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        corpus_files([tmp_path / "nope.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="unsupported format"):
        corpus_files([tmp_path / "x.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no corpus files"):
        corpus_files([tmp_path / "empty"])
