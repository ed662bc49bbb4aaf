"""How long the `nanoseek` command takes to start: every command's `--help`, and `serve` until
the web app answers.

Each `nanoseek <command> --help` runs as a fresh subprocess (`python -m nanoseek`, as the
installed `nanoseek` script does), --repeats times, interleaved with a bare `python -c pass`
(the interpreter's own start, the floor); prints the median seconds per command. With --serve it
also starts `nanoseek serve` on a free port and times launch -> first `GET /` answered 200, the
wait after `make serve`'s install.

    python bench/cli_startup.py                    # --help of every command, 5 runs each
    python bench/cli_startup.py --serve            # and the shipped model's server start, 3 runs
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

COMMANDS = [[], ["demo"], ["info"], ["tokenizer"], ["tokenizer", "train"], ["pretrain"], ["generate"], ["chat"],
            ["sft"], ["rl"], ["distill"], ["eval"], ["speedrun"], ["serve"], ["quantize"]]


def run_seconds(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_seconds(timeout: float = 600.0) -> float:
    """`nanoseek serve` launched -> its web app answers; the server is stopped afterwards."""
    port = free_port()
    t = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"nanoseek serve exited with {server.returncode}") from None
                time.sleep(0.05)
        raise TimeoutError("nanoseek serve did not answer")
    finally:
        server.terminate()
        server.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--serve", action="store_true", help="also time `nanoseek serve` until the web app answers")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    floor: list[float] = []
    times: dict[str, list[float]] = {" ".join(c): [] for c in COMMANDS}
    for _ in range(args.repeats):  # interleaved: a busy moment of the machine hits every command alike
        floor.append(run_seconds([sys.executable, "-c", "pass"]))
        for c in COMMANDS:
            times[" ".join(c)].append(run_seconds([sys.executable, "-m", "nanoseek", *c, "--help"]))
    print(f"median of {args.repeats} runs, seconds; python -c pass: {statistics.median(floor):.3f}")
    print("| command | --help |\n|---|---|")
    for name, ts in times.items():
        print(f"| nanoseek {name} | {statistics.median(ts):.3f} |")
    slowest = max(times, key=lambda k: statistics.median(times[k]))
    print(f"slowest: nanoseek {slowest} --help, {statistics.median(times[slowest]):.3f} s")
    if args.serve:
        runs = [serve_seconds() for _ in range(3)]
        print(f"nanoseek serve (shipped model) until GET / answers: median {statistics.median(runs):.2f} s "
              f"({', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
