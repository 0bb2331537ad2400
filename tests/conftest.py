"""Test-process settings that must be in place before torch is imported.

The subprocesses the tests start run with one OpenMP/MKL thread from process start
(`fault_helpers.ONE_THREAD_ENV`), and artifacts built in this process are compared with theirs
byte for byte. `torch.set_num_threads(1)` after start is not the same thing: on an AVX2 EPYC, MKL
in a process that started with two threads takes other GEMM code paths and rounds differently
(measured: every report table differed). So this process starts with one thread as well.
"""

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# The encoder's pinned thread count (core/env.py, default 2) at one as well: `make test` runs one
# worker per core, and two threads per worker would spin-wait for each other's cores.
os.environ.setdefault("LLM2LOSS_CPU_THREADS", "1")
# What `import llm2loss_pipeline` sets (see there), also for a test that imports torch first.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def pytest_collection_modifyitems(config, items) -> None:
    """The files with end-to-end tests (`slow`, minutes each) first, the rest in their order.

    `make test` hands whole files to one worker per core (pytest-xdist, `--dist loadfile
    --no-loadscope-reorder`) in this order. Started last, a file of several minutes would keep one
    worker busy while the other has nothing left to do."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within files kept
