"""The server under sustained load: 64 streaming clients, some hanging up mid-reply, for minutes.

Starts `nanoseek serve` in a subprocess (the shipped model unless --model), then runs --clients
asyncio clients, each streaming chat completions back to back (random questions and lengths);
a fraction --hangup of the streams is dropped after a random number of chunks, and a fraction of
finished replies is saved to the chat store. Every few seconds it samples the server's resident
memory (/proc, so Linux) and its /health counters (running and waiting requests, cache rows in
use, the prefix cache's size: finished sequences kept for reuse, bounded, 100 MiB for the shipped
model, so resident memory rises while it fills; the rest is reported apart).

It reports: requests done / hung up / failed (a non-200, an error event, a stream that ended
without [DONE]), the memory curve (printed, and plotted to --plot), the growth after warm-up,
and whether the engine's requests and cache rows are all free once the clients stop.
Exit status 1 if anything failed or was left allocated.

    OMP_NUM_THREADS=1 python bench/serve_load.py --minutes 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_hardening import serve  # noqa: E402  (`nanoseek serve` in a subprocess, once it answers)

SHIPPED = Path(__file__).resolve().parents[1] / "nanoseek" / "assets" / "model"


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def client(http: httpx.AsyncClient, url: str, rng: random.Random, until: float, counts: dict,
                 hangup: float, filler: int) -> None:
    """Stream chat completions back to back until `until`."""
    while time.time() < until:
        a, b = rng.randrange(100, 1000), rng.randrange(10, 100)
        notes = " ".join(str(rng.randrange(1000, 10000)) for _ in range(filler))
        msgs = [{"role": "user", "content": (f"Notes: {notes}\n" if filler else "") + f"What is {a} + {b}?"}]
        body = {"messages": msgs, "max_tokens": rng.randrange(16, 256), "temperature": 1.0, "stream": True}
        cut = rng.randrange(1, 30) if rng.random() < hangup else None
        chunks, done, reply = 0, False, ""
        try:
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    counts["failed"] += 1
                    counts["why"].append(f"status {r.status_code}")
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        counts["why"].append(event["error"]["message"])
                        break
                    reply += "".join(c["delta"].get("content") or "" for c in event["choices"])
                    chunks += 1
                    if cut is not None and chunks >= cut:
                        break  # hang up: leaving the block closes the connection
        except httpx.HTTPError as e:
            counts["why"].append(repr(e))
        if cut is not None and chunks >= cut:
            counts["hung up"] += 1
        elif done:
            counts["done"] += 1
            if rng.random() < 0.2:
                await save(http, url, msgs + [{"role": "assistant", "content": reply}], counts)
        else:
            counts["failed"] += 1


async def save(http: httpx.AsyncClient, url: str, msgs: list[dict], counts: dict) -> None:
    cid = (await http.post(url + "/api/conversations", json={})).json()["id"]
    r = await http.put(f"{url}/api/conversations/{cid}/messages", json={"messages": msgs})
    counts["saved" if r.status_code == 200 else "failed"] += 1


async def sampler(http: httpx.AsyncClient, url: str, pid: int, t0: float, until: float, every: float,
                  samples: list) -> None:
    while time.time() < until:
        h = (await http.get(url + "/health")).json()
        samples.append((time.time() - t0, rss_mb(pid), h["running"], h["waiting"], h["prefix_cache_mib"]))
        await asyncio.sleep(every)


async def drained(http: httpx.AsyncClient, url: str, timeout: float = 60) -> dict:
    """/health once nothing runs, waits or holds a cache row (or at the timeout)."""
    deadline = time.time() + timeout
    while True:
        h = (await http.get(url + "/health")).json()
        if not (h["running"] or h["waiting"] or h["cache_rows_in_use"]) or time.time() > deadline:
            return h
        await asyncio.sleep(0.5)


async def run(url: str, pid: int, args) -> tuple[dict, list, dict]:
    counts = {"done": 0, "hung up": 0, "failed": 0, "saved": 0, "why": []}
    t0 = time.time()
    until = t0 + args.minutes * 60
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        samples: list = []
        watch = asyncio.create_task(sampler(http, url, pid, t0, until, args.every, samples))
        await asyncio.gather(*(client(http, url, random.Random(i), until, counts, args.hangup, args.filler)
                               for i in range(args.clients)))
        await watch
        end = await drained(http, url)
        samples.append((time.time() - t0, rss_mb(pid), end["running"], end["waiting"], end["prefix_cache_mib"]))
    return counts, samples, end


def growth(samples: list, warmup: float, apart: bool = False) -> tuple[float, float]:
    """(resident MiB at the end of warm-up, MiB gained from there to the end); apart: less the prefix cache."""
    after = [s for s in samples if s[0] >= warmup] or samples
    mib = (lambda s: s[1] - s[4]) if apart else (lambda s: s[1])
    return mib(after[0]), mib(samples[-1]) - mib(after[0])


def plot(samples: list, path: Path, title: str) -> None:
    """Resident memory over time: all of it, the prefix cache's part, the rest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, [s[1] for s in samples], label="resident memory")
    ax.plot(t, [s[1] - s[4] for s in samples], label="resident memory less the prefix cache")
    ax.plot(t, [s[4] for s in samples], label="the prefix cache (bounded)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--hangup", type=float, default=0.3, help="fraction of streams dropped mid-reply")
    ap.add_argument("--filler", type=int, default=0, help="random 4-digit numbers before each question (longer "
                    "prompts: the prefix cache reaches its bound sooner)")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds before memory growth is counted")
    ap.add_argument("--plot", type=Path, default=Path("docs/serve_load.png"))
    args = ap.parse_args()

    port = 8800 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as tmp:
        proc = serve(args.model, Path(tmp) / "chats.db", port)
        try:
            counts, samples, end = asyncio.run(run(f"http://127.0.0.1:{port}", proc.pid, args))
        finally:
            proc.terminate()
            proc.wait(30)
    start, gained = growth(samples, args.warmup)
    rest, rest_gained = growth(samples, args.warmup, apart=True)
    print(f"{args.clients} clients, {args.minutes:g} min, {args.hangup:.0%} hung up on purpose")
    print(f"requests: {counts['done']} done, {counts['hung up']} hung up, {counts['failed']} failed, "
          f"{counts['saved']} replies saved to the store")
    for why in sorted(set(counts["why"]))[:10]:
        print(f"  failure: {why}")
    print("time (s): resident MiB / of which the prefix cache: " + ", ".join(
        f"{t:.0f}: {m:.0f}/{p:.0f}" for t, m, _, _, p in samples))
    print(f"after {args.warmup:g} s of warm-up: {start:.0f} MiB; at the end {samples[-1][1]:.0f} MiB "
          f"({gained:+.0f} MiB, the prefix cache {samples[-1][4]:.0f} MiB of its bound); peak "
          f"{max(s[1] for s in samples):.0f} MiB; less the prefix cache: {rest:.0f} -> {rest + rest_gained:.0f} MiB "
          f"({rest_gained:+.0f} MiB)")
    print(f"at the end: {end['running']} running, {end['waiting']} waiting, {end['cache_rows_in_use']} cache rows in use")
    plot(samples, args.plot, f"nanoseek serve: {args.clients} streaming clients, {args.hangup:.0%} hang up")
    print(f"plot: {args.plot}")
    freed = not (end["running"] or end["waiting"] or end["cache_rows_in_use"])
    sys.exit(0 if counts["failed"] == 0 and freed else 1)


if __name__ == "__main__":
    main()
