"""Start a disposable sandbox for one submission and talk to the worker inside it (worker.py).

Isolation levels, best first (`Isolation.detect` picks; the grading report prints which one ran):

  bubblewrap  Linux with `bwrap` (Debian: apt-get install bubblewrap). New PID, network, IPC and
              UTS namespaces and a new mount namespace whose root holds only read-only views of
              the system folders, the Python installation and minisd (+ tests/ for the notebooks'
              fixtures); the working folder and /tmp are small in-memory tmpfs. No network at all.
              Started by root, the worker gives up root for its own uid (60000 + 2·job slot, +1
              for the spare; no capabilities); started by a user, it runs in a user namespace.
              Killing the sandbox's first process ends the PID namespace, so every process the
              notebook started dies with it, setsid/double-forked ones included.
  process     Anywhere else (macOS, Windows, Linux without bwrap): a separate Python process in a
              fresh temporary folder holding a copy of the notebook, with rlimits where the OS has
              them, killed (with its process group) at the end. Verdicts are still computed in the
              grader, so monkeypatching, fake results and fd tricks do not work; but the notebook
              runs as the grader's user with its files and network, and a daemon that leaves the
              process group can outlive grading. Use it for one's own work, not for a class: grade
              a class on Linux or in the container (minisd/course/container/).

The worker's replies come back on its stdout pipe, its prints on stderr (drained, kept up to a
bound); requests go in on stdin. `Sandbox.request` waits for a reply with a deadline and reports a
dead, silent or garbled worker as an exception the grader turns into 'crashed' or 'timed out'.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from . import wire

WORKDIR = "/submission"  # the working folder inside a bubblewrap sandbox (an in-memory tmpfs)
# root-started sandboxes run as FIRST_UID + 2·slot (+1): each its own process count
FIRST_UID = 60000


class SandboxError(Exception):
    """The sandbox cannot start, died, broke the protocol or missed a deadline."""


class SandboxDied(SandboxError):
    pass


class SandboxTimeout(SandboxError):
    pass


@dataclass(frozen=True)
class Limits:
    """Per-sandbox bounds. The defaults fit every chapter in fast mode with a wide margin (a chapter
    peaks below 1.5 GB of address space, torch alone reserves ~0.6 GB) while keeping 4 parallel jobs
    inside 16 GB."""

    memory_mb: int = 4096
    processes: int = 64  # threads count too; torch runs with one intra-op thread here
    # per process; wall-clock deadlines (per cell, task, notebook) come first
    cpu_seconds: int = 1800
    file_mb: int = 256  # the largest file, and each tmpfs (working folder, /tmp)
    # the notebook's printed output kept by the grader (the rest is counted, dropped)
    output_kb: int = 256

    def for_worker(self, isolation: str) -> dict:
        limits = {
            "memory_bytes": self.memory_mb << 20,
            "cpu_seconds": self.cpu_seconds,
            "file_bytes": self.file_mb << 20,
            "open_files": 512,
            "core_bytes": 0,
        }
        # counted per sandbox (own uid or own user namespace); elsewhere it would
        if isolation == "bubblewrap":
            limits["processes"] = self.processes  # count all the teacher's processes
        return limits


@dataclass
class Isolation:
    level: str  # "bubblewrap" or "process"
    why: str = ""  # why not a stronger level
    as_root: bool = False

    @property
    def description(self) -> str:
        if self.level == "bubblewrap":
            who = "an unprivileged uid" if self.as_root else "a user namespace"
            return (f"bubblewrap sandbox (PID/network/mount namespaces, read-only system, no "
                    f"network, {who}, every process killed at the end)")
        who = "as root, like the grader" if self.as_root else "as the grader's user"
        return (f"separate process only (weaker: no namespaces; the notebook runs {who}, can reach "
                f"the network and the teacher's files; {self.why})")

    @staticmethod
    def detect(preference: str = "auto") -> "Isolation":
        """'auto' -> the best that works here; 'bubblewrap' -> that or a SandboxError; 'process' ->
        the fallback."""
        as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        if preference == "process":
            return Isolation("process", "asked for with --isolation process", as_root)
        bwrap = shutil.which("bwrap") if sys.platform.startswith("linux") else None
        if bwrap is None:
            why = (
                "bubblewrap is not installed"
                if sys.platform.startswith("linux")
                else f"{sys.platform} has no bubblewrap"
            )
        else:
            probe = subprocess.run(
                [bwrap, *_namespace_flags(as_root), "--ro-bind", "/", "/", "--", "true"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if probe.returncode == 0:
                return Isolation("bubblewrap", "", as_root)
            why = (
                "bubblewrap cannot create namespaces here: " + " ".join(probe.stderr.split())[:200]
            )
        if preference == "bubblewrap":
            raise SandboxError(f"--isolation bubblewrap: {why}")
        return Isolation("process", why, as_root)


def _namespace_flags(as_root: bool) -> list[str]:
    flags = [
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
    ]
    # no user namespace: the worker switches to its own uid, for which it keeps CAP_SETUID/SETGID
    if as_root:
        flags += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        flags += ["--unshare-user"]
    return flags


def package_root() -> Path:
    """The folder holding the minisd package (the checkout's root, or site-packages)."""
    return Path(__file__).resolve().parents[2]


def _visible_paths() -> list[Path]:
    """What a bubblewrap sandbox sees, read-only: the Python installation, its import path, minisd,
    tests/."""
    paths = {
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.exec_prefix),
        Path(sys.executable).resolve().parent,
    }
    paths |= {Path(p) for p in sys.path if p and Path(p).exists()}
    root = package_root()
    paths |= {root / "minisd", root / "tests"}
    paths = {p.resolve() for p in paths if p.exists()}
    system = [Path(p) for p in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64")]
    kept = sorted(
        p
        for p in paths
        if not any(p == s or s in p.parents for s in system) and p != root and str(p) != "/"
    )
    # drop paths inside another kept path
    return [p for p in kept if not any(q in p.parents for q in kept)]


def bwrap_command(
    isolation: Isolation, config: dict, hide: list[Path], limits: Limits
) -> list[str]:
    command = ["bwrap", *_namespace_flags(isolation.as_root), "--clearenv"]
    for name in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        path = Path(name)
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            command += ["--ro-bind", name, name]
    size = str(limits.file_mb << 20)
    # the tmpfs first: a checkout or a virtual environment under /tmp is then bound on top of it
    command += ["--proc", "/proc", "--dev", "/dev"]
    command += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
    visible = _visible_paths()
    made: set = {"/tmp"}
    for path in visible:
        # parents bwrap would create as root-only (0700): make them traversable by the sandbox's uid
        for parent in reversed(path.parents[:-1]):
            if str(parent) not in made and not Path("/", *parent.parts[1:2]).is_symlink():
                made.add(str(parent))
                command += ["--perms", "0755", "--dir", str(parent)]
        command += ["--ro-bind", str(path), str(path)]
    for path in hide:  # the graded folder, the hidden checks: never readable from inside
        path = path.resolve()
        inside = any(v == path or v in path.parents for v in visible)
        if inside and not any(path in v.parents for v in visible):
            if path.is_dir():
                command += ["--tmpfs", str(path)]
            else:
                command += ["--ro-bind", "/dev/null", str(path)]
    command += ["--perms", "1777", "--size", size, "--tmpfs", WORKDIR, "--chdir", WORKDIR]
    for key, value in _environment(config["fast"], home="/tmp").items():
        command += ["--setenv", key, value]
    return command


def _environment(fast: bool, home: str) -> dict:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": "/tmp" if home == "/tmp" else home,
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": home,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        # one thread: tiny fast-mode ops gain nothing from more, and parallel jobs share the cores
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if fast:
        env["MINISD_FAST"] = "1"
    return env


@dataclass
class Sandbox:
    """One worker in one sandbox. start() -> request()... -> close(). Not reusable across
    submissions."""

    isolation: Isolation
    limits: Limits = field(default_factory=Limits)
    fast: bool = True
    slot: int = 0
    # dotted path -> message, for the worker's call guards
    forbid: dict = field(default_factory=dict)
    hide: list = field(default_factory=list)  # host paths the sandbox must not read
    # 0 or 1: a grader's current sandbox and its spare differ
    uid_offset: int = 0

    def __post_init__(self):
        self.process: Optional[subprocess.Popen] = None
        self.replies: "queue.Queue" = queue.Queue()
        self.output = bytearray()
        self.output_bytes = 0
        self.tempdir: Optional[str] = None
        self.broken: Optional[str] = None
        self.requests = 0

    # -- life cycle --------------------------------------------------------------------------------
    def start(
        self,
        notebook_name: str = "notebook.ipynb",
        notebook_bytes: bytes = b"",
        timeout: float = 120.0,
    ) -> None:
        """Start the worker; returns once it has imported torch and minisd and said it is ready."""
        self.launch(notebook_name, notebook_bytes)
        self.wait_ready(timeout)

    def launch(self, notebook_name: str = "notebook.ipynb", notebook_bytes: bytes = b"") -> None:
        """Start the worker's process without waiting for it. Call from a thread that outlives the
        sandbox:
        --die-with-parent (PR_SET_PDEATHSIG) fires when the launching *thread* ends."""
        root = package_root()
        worker = str(root / "minisd" / "course" / "worker.py")
        config = {
            "fast": self.fast,
            "forbid": self.forbid,
            "limits": self.limits.for_worker(self.isolation.level),
        }
        # only inside bubblewrap: there the Python installation is bound where that uid can read it
        if self.isolation.as_root and self.isolation.level == "bubblewrap":
            config["uid"] = FIRST_UID + 2 * self.slot + self.uid_offset
        python = [sys.executable, "-I", worker, str(root), json.dumps(config)]
        kwargs = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if self.isolation.level == "bubblewrap":
            command = (
                bwrap_command(self.isolation, config, self.hide, self.limits) + ["--"] + python
            )
            env = None
        else:
            self.tempdir = tempfile.mkdtemp(prefix="minisd-grade-")
            (Path(self.tempdir) / notebook_name).write_bytes(notebook_bytes)
            command, env = (
                python,
                dict(
                    _environment(self.fast, home=self.tempdir),
                    SYSTEMROOT=os.environ.get("SYSTEMROOT", ""),
                ),
            )
            kwargs["cwd"] = self.tempdir
            if os.name == "posix":
                kwargs["start_new_session"] = True
            else:
                kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        try:
            self.process = subprocess.Popen(command, env=env, **kwargs)
        except OSError as error:
            raise SandboxError(f"could not start the sandbox: {error}") from None
        threading.Thread(target=self._read_replies, daemon=True).start()
        threading.Thread(target=self._drain_output, daemon=True).start()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the worker's "ready". On failure the error quotes the end of its output: no
        notebook code has run yet, so that is Python's own complaint (a missing module, ...)."""
        try:
            reply, _ = self._wait(timeout, "start")
        except SandboxError as error:
            raise SandboxError(f"{error}: {self._output_tail()}") from None
        if reply.get("status") != "ready":
            self.close()
            raise SandboxError(f"the sandbox did not start properly: {self._output_tail()}")

    def _output_tail(self) -> str:
        time.sleep(0.2)  # let the drain thread catch the last lines
        lines = bytes(self.output).decode("utf-8", "replace").strip().splitlines()
        return " / ".join(line.strip() for line in lines[-3:])[-300:] or "no output"

    def close(self) -> None:
        """Kill the worker and everything it started (the whole PID namespace under bubblewrap)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                if self.isolation.level == "process" and os.name == "posix":
                    os.killpg(process.pid, signal.SIGKILL)
                process.kill()
            except (ProcessLookupError, PermissionError, OSError):
                pass
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (process.stdin, process.stdout, process.stderr):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
        if self.tempdir:
            shutil.rmtree(self.tempdir, ignore_errors=True)
            self.tempdir = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.broken is None

    # -- the channel -------------------------------------------------------------------------------
    def _read_replies(self) -> None:
        process = self.process
        while True:
            try:
                self.replies.put(wire.read_message(process.stdout))
            except EOFError:
                self.replies.put(None)
                return
            except (wire.WireError, OSError, ValueError) as error:
                self.replies.put(error)
                return

    def _drain_output(self) -> None:
        process, keep = self.process, self.limits.output_kb << 10
        while True:
            try:
                chunk = process.stderr.read1(65536)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            self.output_bytes += len(chunk)
            self.output += chunk
            if len(self.output) > keep:
                del self.output[: len(self.output) - keep]

    def _wait(self, timeout: float, what: str):
        try:
            reply = self.replies.get(timeout=max(0.1, timeout))
        except queue.Empty:
            self.broken = f"no reply within {timeout:g} s"
            self.close()
            raise SandboxTimeout(f"no reply to '{what}' within {timeout:g} s") from None
        if reply is None:
            self.broken = "the sandbox's process ended"
            self.close()
            raise SandboxDied(f"the sandbox's process ended during '{what}'")
        if isinstance(reply, Exception):
            self.broken = f"the sandbox sent a malformed reply ({reply})"
            self.close()
            raise SandboxDied(self.broken)
        return reply

    def request(self, header: dict, tensors: Optional[dict] = None, timeout: float = 60.0):
        """Send one request and wait up to `timeout` s for its reply: -> (header, tensors)."""
        if not self.alive:
            raise SandboxDied("the sandbox is not running")
        self.requests += 1
        header = dict(header, id=self.requests)
        try:
            wire.write_message(self.process.stdin, header, tensors)
        except (BrokenPipeError, OSError, ValueError):
            self.broken = "the sandbox's process ended"
            self.close()
            raise SandboxDied("request") from None
        reply = self._wait(timeout, header.get("op", "request"))
        # an extra or forged frame: the channel is out of step
        if reply[0].get("id") != self.requests:
            self.broken = "the sandbox's replies are out of step with the requests"
            self.close()
            raise SandboxDied(self.broken)
        return reply

    def bye(self) -> None:
        if self.alive:
            try:
                self.request({"op": "bye"}, timeout=5)
            except SandboxError:
                pass
        self.close()


def describe(limits: Limits) -> dict:
    return asdict(limits)
