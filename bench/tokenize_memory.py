"""Peak memory of tokenizing a corpus into shards: it streams, so the peak does not grow with the corpus.

Writes synthetic .jsonl corpora of increasing size, tokenizes each in a fresh process with
`nanoseek.data.shards.write_shards` (the path `nanoseek pretrain` uses), and prints the corpus
size, the child's peak resident memory and the throughput.

    python bench/tokenize_memory.py --sizes-mb 50 200 800
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, time
from nanoseek.data import iter_documents
from nanoseek.data.shards import write_shards
from nanoseek.tokenizer import DeepSeekTokenizer
tok = DeepSeekTokenizer.load(sys.argv[1])
t = time.perf_counter()
stats = write_shards(iter_documents([sys.argv[2]]), tok, sys.argv[3], fim_rate=0.1)
dt = time.perf_counter() - t
print(stats.documents, stats.tokens, dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

WORDS = ("the of and to in is was for on that with by as at from his her it an are were which be this "
         "model token layer expert attention cache latent routing balance loss gradient step").split()


def write_corpus(path: Path, mb: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    target, size = mb * 1_000_000, 0
    with open(path, "w") as f:
        while size < target:
            n = rng.randint(50, 800)
            text = " ".join(rng.choice(WORDS) for _ in range(n)) + f" {rng.randint(0, 10**6)}."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size += len(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 200, 800])
    args = ap.parse_args()
    from nanoseek.tokenizer import DeepSeekTokenizer

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_corpus(d / "sample.jsonl", 2)
        from nanoseek.data import iter_documents
        DeepSeekTokenizer.train(iter_documents([d / "sample.jsonl"]), vocab_size=2048).save(d / "tok")
        print(f"{'corpus MB':>10s}{'documents':>12s}{'tokens':>14s}{'seconds':>9s}{'MB/s':>7s}{'peak RSS MB':>13s}")
        for mb in args.sizes_mb:
            corpus = d / f"corpus_{mb}.jsonl"
            write_corpus(corpus, mb, seed=mb)
            out = subprocess.run([sys.executable, "-c", CHILD, str(d / "tok"), str(corpus), str(d / f"shards_{mb}")],
                                 capture_output=True, text=True, check=True).stdout.split()
            docs, tokens, secs, rss_kb = int(out[0]), int(out[1]), float(out[2]), int(out[3])
            print(f"{mb:10d}{docs:12,d}{tokens:14,d}{secs:9.1f}{mb / secs:7.1f}{rss_kb / 1024:13.0f}")
            corpus.unlink()


if __name__ == "__main__":
    main()
