"""glibc's malloc told to keep the memory a training step frees, for the next step to reuse.

PyTorch's CPU tensors come straight from malloc. With glibc's defaults, a block over the mmap
threshold (128 KiB at first, raised adaptively up to 32 MiB) is a fresh mapping that the kernel
fills page by page on first touch, and freed memory at the top of the heap goes back to the
system once it passes the trim threshold; so every step of a training run, every rollout and
every prefill maps, faults in and returns the same few hundred MiB again. Measured on a 2-core
Xeon (V3-tiny, 8x256, bf16 autocast, eager): 23,000 page faults and 50-80 ms of kernel time a
step with the defaults, 600-1,500 and 5-9 ms with the settings below; the compiled step went
from 513 to 367 ms (transformers' step in the same process from 834 to 549 ms). tcmalloc and
jemalloc (what Intel's launcher preloads) behave like this out of the box; `mallopt` gets it
without preloading a library. The cost: up to `TRIM_BYTES` of freed memory stays with the process.

`keep_freed_memory()` is called by the command line for every command (library users call it
themselves); NANOSEEK_MALLOC=default leaves malloc as it is. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers (malloc.h)
MMAP_BYTES = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed threshold)
TRIM_BYTES = 1 << 30  # free memory kept at the top of the heap before any is returned
PAD_BYTES = 64 << 20  # extra room taken each time the heap grows


def keep_freed_memory() -> bool:
    """Apply the settings above to glibc's malloc; False where there is no glibc or it refused,
    or NANOSEEK_MALLOC=default."""
    if os.environ.get("NANOSEEK_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting it also stops glibc from adapting it (and the trim threshold)
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, MMAP_BYTES), (M_TRIM_THRESHOLD, TRIM_BYTES), (M_TOP_PAD, PAD_BYTES)))


def add_option(parser) -> None:
    """The benchmarks' --malloc option (an argparse parser)."""
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: glibc's malloc keeps freed memory, as every nanoseek command sets it "
                        "(nanoseek/malloc.py); nanoseek and the reference share this process, so both get it. "
                        "default: glibc's own settings")


def apply_option(choice: str) -> str:
    """Apply --malloc's choice; the line a benchmark prints about it."""
    kept = choice == "keep" and keep_freed_memory()
    return f"malloc: {'glibc keeping freed memory (nanoseek and the reference alike)' if kept else 'default settings'}"
