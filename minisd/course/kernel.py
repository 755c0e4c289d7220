"""Run code in a fresh Jupyter kernel, one cell at a time, surviving errors, timeouts and kernel
deaths.

Used by the grader (student notebooks, then the checks) and by `execute` / tests/test_notebooks.py
(whole notebooks
saved with their outputs). A kernel starts with:
  - cwd: the notebook's folder (what Jupyter would use when the student opens the notebook);
  - PYTHONPATH: the checkout holding this minisd package first, so `import minisd` finds the code
  being graded
    (not for `execute` and tests/test_notebooks.py: those run notebooks as a student's Jupyter
    would);
  - MINISD_FAST=1 when asked (the notebooks' fast mode: small sizes, few steps).
"""

from __future__ import annotations

import contextlib
import re
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TIMEOUT_ENAME = "CellTimeout"


class KernelStartError(Exception):
    pass


@dataclass
class CellResult:
    outputs: list = field(default_factory=list)
    error: Optional[dict] = None  # {"ename", "evalue", "traceback"} when the cell raised
    timed_out: bool = False
    died: bool = False  # the kernel died while running the cell
    seconds: float = 0.0

    @property
    def error_text(self) -> str:
        if self.died:
            return "the kernel died (out of memory? a crash in native code?)"
        if self.timed_out:
            return "timed out"
        if self.error:
            value = " ".join(str(self.error.get("evalue", "")).split())
            value = re.sub(r"\((?:\d+\.py|<[^>]*>), line (\d+)\)", r"(line \1 of the cell)", value)
            return (
                f"{self.error.get('ename')}: {value[:300]}"
                if value
                else str(self.error.get("ename"))
            )
        return ""


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


def _client_class():
    """nbclient's NotebookClient, noting when a cell hit its time limit (nbclient then interrupts
    the kernel)."""
    from nbclient import NotebookClient

    class Client(NotebookClient):
        timed_out = False

        async def _async_handle_timeout(self, timeout, cell=None):
            self.timed_out = True
            return await super()._async_handle_timeout(timeout, cell)

    return Client


class Kernel:
    """A live kernel: `run(source, timeout)` executes one cell and reports what happened;
    `restart()` starts over."""

    def __init__(
        self, cwd: Path, fast: bool, kernel_name: str = "python3", startup_timeout: int = 60
    ):
        self.cwd, self.fast, self.kernel_name, self.startup_timeout = (
            Path(cwd),
            fast,
            kernel_name,
            startup_timeout,
        )
        self._stack: Optional[contextlib.ExitStack] = None
        self.client = None

    def start(self) -> None:
        import nbformat

        self._client_options = dict(
            nb=nbformat.v4.new_notebook(),
            kernel_name=self.kernel_name,
            allow_errors=True,
            interrupt_on_timeout=True,
            error_on_timeout={"ename": TIMEOUT_ENAME, "evalue": "cell timed out", "traceback": []},
            record_timing=False,
            startup_timeout=self.startup_timeout,
            iopub_timeout=4,
            # not its "running over TCP" notice on every start
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
            resources={"metadata": {"path": str(self.cwd)}},
        )
        self.client = _client_class()(**self._client_options)
        # a second try: two kernels starting at once can race for the same free port
        for attempt in range(2):
            self._stack = contextlib.ExitStack()
            try:
                self._stack.enter_context(self.client.setup_kernel(env=kernel_env(self.fast)))
                return
            # noqa: BLE001 - no kernelspec, ipykernel missing, port trouble, ...
            except Exception as error:
                self.stop()
                failure = f"{type(error).__name__}: {error}"
                self.client = _client_class()(**self._client_options)
        self.client = None
        raise KernelStartError(f"could not start a '{self.kernel_name}' Jupyter kernel: {failure}")

    def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            with contextlib.suppress(Exception):
                stack.close()
        self.client = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def run(self, source: str, timeout: Optional[float]) -> CellResult:
        import nbformat
        from nbclient.exceptions import DeadKernelError

        cell = nbformat.v4.new_code_cell(source)
        self.client.nb.cells = [cell]
        self.client.timeout = int(max(1, round(timeout))) if timeout else None
        self.client.timed_out = False
        start = time.perf_counter()
        result = CellResult()
        try:
            self.client.execute_cell(cell, 0)
        except DeadKernelError:
            result.died = True
        # noqa: BLE001 - nbclient internals (lost channels, ...): treat as a dead kernel
        except Exception as error:
            result.died = True
            result.error = {"ename": type(error).__name__, "evalue": str(error), "traceback": []}
        result.seconds = time.perf_counter() - start
        result.outputs = list(cell.get("outputs", []))
        errors = [o for o in result.outputs if o.get("output_type") == "error"]
        if errors and not result.died:
            result.error = {k: errors[-1].get(k) for k in ("ename", "evalue", "traceback")}
        result.timed_out = bool(self.client.timed_out)
        if result.timed_out and not result.error:
            result.error = {
                "ename": TIMEOUT_ENAME,
                "evalue": f"no reply within {timeout:g} s",
                "traceback": [],
            }
        return result

    def responsive(self, timeout: float = 5) -> bool:
        """True if the kernel answers a trivial cell (used after a timeout: did the interrupt
        work?)."""
        probe = self.run("1", timeout)
        return not (probe.died or probe.timed_out)
