"""The crash campaign's runner (tests/test_crash_safety.py): `python tests/crash_points.py PLAN.json`
runs a list of `nanoseek` commands in turn, each in its own child process, and SIGKILLs a child at
a named point of a write. It prints one JSON list: {"exit": the child's exit code (-9 when
killed), "output": its stdout and stderr, "seconds"} per command.

PLAN.json: a list of {"args": [nanoseek arguments], "point": POINT or null, "where": WHERE}.
Each child is forked from this process, which imported nanoseek once, so a command costs no
start-up; its kill point is installed in the child only, by wrapping os.replace, shutil.rmtree or
MetricsLog.write: the package itself carries no test hooks.

POINT            WHERE               the child is killed
before-replace   a path suffix       just before os.replace(src, dst) with dst ending in WHERE (the
                                     temporary file or folder is complete and fsynced)
torn-replace     a path suffix       the same, with the temporary file first cut to half its size
after-replace    a path suffix       just after that rename, before the folder is fsynced and
                                     anything that follows
mid-rmtree       a path suffix       in shutil.rmtree of a folder ending in WHERE, one file removed
torn-metrics     a step number       after half of that step's metrics.jsonl record is written
"""

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import matplotlib.pyplot  # noqa: F401 (imported once here rather than in every child)

from nanoseek.cli import main
from nanoseek.train.metrics import MetricsLog


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, where: str) -> None:
    real_replace, real_rmtree, real_write = os.replace, shutil.rmtree, MetricsLog.write

    def replace(src, dst, *args, **kwargs):
        hit = str(dst).endswith(where)
        if hit and point == "torn-replace":
            os.truncate(src, os.path.getsize(src) // 2)
        if hit and point in ("before-replace", "torn-replace"):
            kill()
        real_replace(src, dst, *args, **kwargs)
        if hit and point == "after-replace":
            kill()

    def rmtree(path, *args, **kwargs):
        if str(path).endswith(where) and Path(path).is_dir():
            next(f for f in sorted(Path(path).iterdir()) if f.is_file()).unlink()
            kill()
        real_rmtree(path, *args, **kwargs)

    def write(self, step, elapsed, tokens, metrics):
        real_write(self, step, elapsed, tokens, metrics)
        if step == int(where) and "loss" in metrics:
            last = self.path.read_bytes().splitlines(keepends=True)[-1]
            os.truncate(self.path, self.path.stat().st_size - len(last) // 2)
            kill()

    owner, name, wrapper = {"before-replace": (os, "replace", replace), "torn-replace": (os, "replace", replace),
                            "after-replace": (os, "replace", replace), "mid-rmtree": (shutil, "rmtree", rmtree),
                            "torn-metrics": (MetricsLog, "write", write)}[point]
    setattr(owner, name, wrapper)


def run(args: list[str], point: str | None, where: str | None, log: Path) -> int:
    """`nanoseek args` in a forked child (output to log), killed at point; -> its exit code."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if point:
                install(point, where)
            sys.argv = ["nanoseek", *args]
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())
    results = []
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "output.txt"
        for cmd in plan:
            t = time.perf_counter()
            code = run(cmd["args"], cmd.get("point"), cmd.get("where"), log)
            results.append({"exit": code, "output": log.read_text(), "seconds": round(time.perf_counter() - t, 2)})
    print(json.dumps(results))
