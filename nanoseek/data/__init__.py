"""Data: corpus readers, task families, token shards and packing."""

from .corpus import CorpusError, CorpusStats, corpus_files, iter_documents, stdlib_sources

__all__ = ["CorpusError", "CorpusStats", "corpus_files", "iter_documents", "stdlib_sources"]
