"""The environment of a fresh Jupyter kernel, for `execute` and tests/test_notebooks.py.

A kernel started with it gets:
  - PYTHONPATH: the checkout holding this minisd package first, so `import minisd` finds this code
    (not for `execute` and tests/test_notebooks.py: they run notebooks as a student's Jupyter does);
  - MINISD_FAST=1 when asked (the notebooks' fast mode: small sizes, few steps).
The grader does not use a kernel: it runs notebooks in a sandbox (sandbox.py, worker.py).
"""
from __future__ import annotations

import os
from pathlib import Path


def kernel_env(fast: bool, add_checkout_to_path: bool = True) -> dict:
    """The environment of a new kernel. add_checkout_to_path=False leaves PYTHONPATH as it is, as
    when a student opens the notebook in Jupyter (the notebooks find the checkout themselves)."""
    env = dict(os.environ)
    if add_checkout_to_path:
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
    if fast:
        env["MINISD_FAST"] = "1"
        # Fast mode runs tiny models whose ops are too small to split across threads: with two
        # threads on a busy 2-core machine each op waits for the other thread (measured 10-30x
        # slower), so CI's kernels use one.
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("MINISD_FAST", None)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the notebooks need no network; never wait on one
    # silences a debugger warning on kernel start
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env
