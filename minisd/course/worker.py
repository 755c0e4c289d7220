"""The sandbox side of grading: run a student's notebook cells, then call its functions on request.

sandbox.py starts this file as `python -I worker.py ROOT CONFIG` inside the sandbox, with fd 0
carrying the grader's requests, fd 1 the replies and fd 2 a pipe for everything the notebook
prints. Before any student code runs, the worker applies the resource limits, gives up root (when
started as root), moves the channel off fds 0/1 (so `print` and writes to fd 1 go to the output
pipe, never into a reply) and wraps the functions a task may not call. From the first student cell
on, nothing in this process is trusted: the student can patch this module, find the channel's fds
and write to them. That is fine by design: the grader reads every reply as data (wire.py), checks
its shape and compares the values itself, so the most a student can do is send values of their
choosing, i.e. compute an answer.

Requests (JSON headers, see wire.py), one reply each, carrying the request's id:
    setup      {forbid, notebook}                 wrap forbidden calls; write the notebook's copy
    run        {source, timeout, stash: [names]}  run one cell; remember the named functions
    signature  {target}                           the parameters of the remembered function
    call       {target, args, kwargs, timeout, forbid, grad_enabled, backward}
    construct  {target, args, kwargs}             instantiate the student's class -> a handle
    load_state {handle, state, strict}            load_state_dict on a handle
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback


class TaskTimeout(BaseException):
    """Raised by the alarm when a cell or call runs past its time (a BaseException: `except
    Exception` in student code does not swallow it; `except BaseException` does, and then the
    grader's own deadline kills us)."""


class ForbiddenCall(Exception):
    """A task's function called what the task asks the student to write (or a fused equivalent)."""


def _apply_limits(limits: dict) -> None:
    try:
        import resource
    except ImportError:  # Windows: no rlimits; the grader's deadlines still apply
        return
    table = {
        "memory_bytes": "RLIMIT_AS",
        "processes": "RLIMIT_NPROC",
        "cpu_seconds": "RLIMIT_CPU",
        "file_bytes": "RLIMIT_FSIZE",
        "open_files": "RLIMIT_NOFILE",
        "core_bytes": "RLIMIT_CORE",
    }
    for key, name in table.items():
        value = limits.get(key)
        if value is None or not hasattr(resource, name):
            continue
        try:
            resource.setrlimit(getattr(resource, name), (int(value), int(value)))
        # e.g. macOS refuses some RLIMIT_AS values: keep going, weaker
        except (ValueError, OSError):
            pass


def _drop_root(uid) -> None:
    """Inside bubblewrap started by root, become an unprivileged uid (bwrap let us keep CAP_SETUID
    for this)."""
    if uid is None or not hasattr(os, "getuid") or os.getuid() != 0:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SystemExit("could not give up root")


class Worker:
    def __init__(self, config: dict, channel_in, channel_out):
        import torch
        from minisd.course import wire

        self.torch, self.wire = torch, wire
        self.config = config
        self.channel_in, self.channel_out = channel_in, channel_out
        self.stash: dict = {}
        self.handles: dict = {}
        self.active_forbids: set = set()
        self.forbidden_seen: list = []
        self._restore: list = []
        self._tensors: dict = {}
        self.namespace, self.run_source = _make_shell()
        self.set_up = False

    # -- forbidden calls ---------------------------------------------------------------------------
    def _guard(self, path: str, message: str) -> None:
        """Replace the object at dotted `path` by a wrapper that refuses to run while `path` is
        active (during a call of a task that forbids it) and otherwise calls through. Installed
        before the notebook runs, so `from torch.nn.functional import scaled_dot_product_attention`
        in a cell binds the wrapper.
        """
        import importlib

        parts = path.split(".")
        owner = None
        for cut in range(len(parts) - 1, 0, -1):
            try:
                owner = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attribute in parts[cut:-1]:
                owner = getattr(owner, attribute, None)
            break
        if owner is None or not hasattr(owner, parts[-1]):
            return
        original = getattr(owner, parts[-1])
        worker = self

        def guard(*args, **kwargs):
            if path in worker.active_forbids:
                worker.forbidden_seen.append(message)
                raise ForbiddenCall(message)
            return original(*args, **kwargs)

        guard.__name__ = getattr(original, "__name__", parts[-1])
        guard.__doc__ = getattr(original, "__doc__", None)
        setattr(owner, parts[-1], guard)

    # -- values ------------------------------------------------------------------------------------
    def _decode(self, node, tensors):
        return self.wire.Decoder(tensors, hook=self._decode_tag).decode(node)

    def _decode_tag(self, tag, body, depth):
        import dataclasses
        import importlib

        if tag == "$handle":
            return self.handles[body]
        if tag in ("$module", "$dataclass"):
            module_name, _, name = body["class"].rpartition(".")
            if not module_name.startswith(("minisd.", "torch.")):
                raise self.wire.WireError("only minisd's and torch's classes are built here")
            cls = getattr(importlib.import_module(module_name), name)
            if tag == "$dataclass":
                fields = self._decode(body["fields"], self._tensors)
                return cls(**fields) if dataclasses.is_dataclass(cls) else None
            args = self._decode(body["args"], self._tensors)
            kwargs = self._decode(body["kwargs"], self._tensors)
            module = cls(*args, **kwargs)
            module.load_state_dict(self._decode(body["state"], self._tensors), strict=True)
            module.train(bool(body.get("training", False)))
            if body.get("forbid"):
                self._forbid_instance(module, body["forbid"])
            return module
        raise self.wire.WireError(f"unknown tag {tag!r}")

    def _forbid_instance(self, module, message: str) -> None:
        """Calling this module (module(x), module.forward(x), Class.forward(module, x)) raises
        ForbiddenCall."""
        cls = type(module)
        original = cls.forward
        worker = self

        def forward(self_, *args, **kwargs):
            if self_ is module:
                worker.forbidden_seen.append(message)
                raise ForbiddenCall(message)
            return original(self_, *args, **kwargs)

        cls.forward = forward
        self._restore.append(lambda: setattr(cls, "forward", original))

    def _encode_reply_value(self, value):
        encoder = self.wire.Encoder(hook=self._encode_other)
        return encoder.encode(value), encoder.tensors

    def _encode_other(self, value, encoder):
        """Numpy arrays and scalars become tensors and numbers; any other object only its type's
        name."""
        if type(value).__module__ == "numpy":
            import numpy as np

            if isinstance(value, np.ndarray) and value.dtype != object:
                return encoder.tensor(self.torch.from_numpy(np.ascontiguousarray(value)))
            if isinstance(value, np.generic):
                return encoder.encode(value.item())
        return {"$unsupported": type(value).__name__}

    # -- requests ----------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                header, tensors = self.wire.read_message(self.channel_in)
            except EOFError:
                return
            op = header.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                self._reply({"status": "bad request", "id": header.get("id")})
                continue
            self._tensors = tensors
            reply, reply_tensors = handler(header, tensors)
            # which request this answers (the grader drops anything else)
            reply["id"] = header.get("id")
            self._reply(reply, reply_tensors)
            if op == "bye":
                return

    def _reply(self, header: dict, tensors=None) -> None:
        try:
            self.wire.write_message(self.channel_out, header, tensors)
        except (TypeError, ValueError, MemoryError) as error:
            self.wire.write_message(
                self.channel_out,
                {"status": "unreturnable", "message": _short(error), "id": header.get("id")},
            )

    def op_setup(self, header, tensors):
        """Wrap the calls the chapter's tasks forbid; once, before the first cell (later:
        refused)."""
        if self.set_up:
            return {"status": "refused"}, None
        self.set_up = True
        name = os.path.basename(str(header.get("notebook", "")))
        # the working folder: just the notebook
        if name and "notebook" in tensors and not os.path.exists(name):
            with open(name, "wb") as file:
                file.write(tensors["notebook"].numpy().tobytes())
        for path, message in header.get("forbid", {}).items():
            try:
                self._guard(path, message)
            # noqa: BLE001 - a module that does not import here has nothing to forbid
            except Exception:
                pass
        return {"status": "ok"}, None

    def op_bye(self, header, tensors):
        return {"status": "ok"}, None

    def op_run(self, header, tensors):
        start = time.perf_counter()
        with _alarm(header.get("timeout")):
            try:
                error = self.run_source(header["source"])
            except TaskTimeout as timeout:
                error = timeout
        for name in header.get("stash", []):
            if name in self.namespace:
                self.stash[name] = self.namespace[name]
        reply = {"status": "ok", "seconds": round(time.perf_counter() - start, 3)}
        if isinstance(error, TaskTimeout):
            reply["status"] = "timed out"
        elif error is not None:
            reply.update(status="error", ename=type(error).__name__, evalue=_short(error, 600))
        return reply, None

    def _target(self, header):
        target = header.get("target", {})
        if "handle" in target:
            obj = self.handles.get(target["handle"])
            return getattr(obj, target.get("method", "forward"), None), True
        name = target.get("task")
        if name in self.stash:
            return self.stash[name], True
        if name in self.namespace:
            return self.namespace[name], True
        return None, False

    def op_signature(self, header, tensors):
        import inspect

        fn, found = self._target(header)
        if not found:
            return {"status": "missing"}, None
        reply = {"status": "ok", "callable": callable(fn), "type": type(fn).__name__[:80]}
        try:
            with _alarm(5):
                signature = inspect.signature(fn)
        # noqa: BLE001 - a builtin, or an object whose signature misbehaves
        except (Exception, TaskTimeout):
            return reply, None
        reply["parameters"] = [
            [p.name, p.kind.name, p.default is not p.empty] for p in signature.parameters.values()
        ]
        return reply, None

    def op_construct(self, header, tensors):
        return self._invoke(header, tensors, construct=True)

    def op_call(self, header, tensors):
        return self._invoke(header, tensors, construct=False)

    def op_load_state(self, header, tensors):
        obj = self.handles.get(header.get("handle"))
        try:
            state = self._decode(header["state"], tensors)
            result = obj.load_state_dict(state, strict=bool(header.get("strict", True)))
            return {
                "status": "returned",
                "missing": list(result.missing_keys),
                "unexpected": list(result.unexpected_keys),
            }, None
        except Exception as error:  # noqa: BLE001 - a student's module may refuse its weights
            return {
                "status": "raised",
                "ename": type(error).__name__,
                "evalue": _short(error),
                "where": _student_frame(error),
            }, None

    def _invoke(self, header, tensors, construct: bool):
        torch = self.torch
        fn, found = self._target(header)
        if not found or fn is None:
            return {"status": "missing"}, None
        self._restore, self.forbidden_seen = [], []
        try:
            args = self._decode(header.get("args", []), tensors)
            kwargs = self._decode(header.get("kwargs", {"$dict": []}), tensors)
        # noqa: BLE001 - the grader sent something this sandbox cannot build
        except Exception as error:
            self._undo()
            return {"status": "bad request", "message": _short(error)}, None
        # Inputs the check differentiates with respect to (ctx.call_with_input_grads): leaves
        # here, so backward() below fills their .grad; the grader sends their positions.
        grad_leaves = {
            i: args[i]
            for i in header.get("grad_args", [])
            if isinstance(i, int)
            and 0 <= i < len(args)
            and isinstance(args[i], torch.Tensor)
            and args[i].is_floating_point()
        }
        for tensor in grad_leaves.values():
            tensor.requires_grad_(True)
        before = [_snapshot(a, torch) for a in args] + [
            _snapshot(v, torch) for v in kwargs.values()
        ]
        reply = {}
        self.active_forbids = set(header.get("forbid", []))
        try:
            with (
                _alarm(header.get("timeout")),
                torch.set_grad_enabled(bool(header.get("grad_enabled", True))),
            ):
                value = fn(*args, **kwargs)
            reply["status"] = "returned"
        except NotImplementedError as error:
            reply.update(status="not attempted", message=_short(error))
        except ForbiddenCall as error:
            reply.update(status="forbidden", message=str(error))
        except TaskTimeout:
            reply["status"] = "timed out"
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the student's code raised
            reply.update(
                status="raised",
                ename=type(error).__name__,
                evalue=_short(error),
                where=_student_frame(error),
            )
        finally:
            self.active_forbids = set()
            self._undo()
        if self.forbidden_seen and reply["status"] != "timed out":
            reply = {"status": "forbidden", "message": self.forbidden_seen[0]}
        if reply["status"] != "returned":
            return reply, None
        after = [_snapshot(a, torch) for a in args] + [_snapshot(v, torch) for v in kwargs.values()]
        reply["mutated"] = [
            i for i, (b, a) in enumerate(zip(before, after)) if not _same(b, a, torch)
        ]
        if construct:
            handle = len(self.handles) + 1
            self.handles[handle] = value
            reply["handle"] = handle
            return reply, None
        if header.get("backward"):
            return self._backward(reply, value, list(args) + list(kwargs.values()), grad_leaves)
        try:
            reply["value"], out = self._encode_reply_value(value)
        except Exception as error:  # noqa: BLE001 - a returned object that cannot even be read
            return {"status": "unreturnable", "message": _short(error)}, None
        return reply, out

    def _backward(self, reply, value, args, input_leaves=None):
        torch = self.torch
        reply["requires_grad"] = isinstance(value, torch.Tensor) and bool(value.requires_grad)
        grads = {}
        if reply["requires_grad"]:
            modules = [a for a in args if isinstance(a, torch.nn.Module)]
            for module in modules:
                module.zero_grad(set_to_none=True)
            try:
                with _alarm(30):
                    value.reshape(()).backward() if value.numel() == 1 else value.sum().backward()
            except (Exception, TaskTimeout) as error:  # noqa: BLE001
                return {
                    "status": "raised",
                    "ename": type(error).__name__,
                    "evalue": _short(error),
                    "where": _student_frame(error),
                }, None
            for index, module in enumerate(modules):
                grads[str(index)] = {
                    name: p.grad for name, p in module.named_parameters() if p.grad is not None
                }
            for position, tensor in (input_leaves or {}).items():
                if tensor.grad is not None:
                    grads[f"arg{position}"] = tensor.grad
        try:
            reply["value"], out = self._encode_reply_value(value)
            encoder = self.wire.Encoder()
            encoder.tensors = out
            reply["grads"] = encoder.encode(grads)
            return reply, encoder.tensors
        except Exception as error:  # noqa: BLE001
            return {"status": "unreturnable", "message": _short(error)}, None

    def _undo(self):
        for restore in reversed(getattr(self, "_restore", [])):
            restore()
        self._restore = []


def _snapshot(value, torch):
    if isinstance(value, torch.Tensor):
        try:
            return ("tensor", value.detach().clone())
        except Exception:  # noqa: BLE001
            return ("other", None)
    if isinstance(value, list):
        return ("list", list(value))
    return ("other", None)


def _same(before, after, torch) -> bool:
    kind, old = before
    if kind == "tensor":
        new = after[1]
        return (
            old.shape == new.shape
            and old.dtype == new.dtype
            and bool(torch.equal(torch.nan_to_num(old), torch.nan_to_num(new)))
        )
    if kind == "list":
        return old == after[1]
    return True


class _alarm:
    """SIGALRM -> TaskTimeout after `seconds` (main thread, POSIX); the grader's deadline backs it
    up."""

    def __init__(self, seconds):
        self.seconds = seconds if seconds and hasattr(signal, "setitimer") else None

    def __enter__(self):
        if self.seconds:

            def on_alarm(signum, frame):
                raise TaskTimeout()

            self.previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, float(self.seconds))

    def __exit__(self, *exc):
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def _short(error, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " …"


def _student_frame(error: BaseException) -> str:
    """'line 7 of your cell, in f(): `scores = q @ k`': the innermost traceback frame in notebook
    code."""
    frames = traceback.extract_tb(error.__traceback__)
    student = [f for f in frames if f.filename.startswith(("<ipython-input", "<cell"))]
    if not student:
        return ""
    frame = student[-1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f"line {frame.lineno} of your cell, in {frame.name}(){code}"


def _make_shell():
    """(namespace, run(source) -> exception or None): IPython's shell when installed (magics,
    display), else plain exec."""
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        InteractiveShell = None
    if InteractiveShell is not None:
        shell = InteractiveShell.instance(colors="NoColor", history_length=0)
        shell.history_manager.enabled = False

        def run(source):
            result = shell.run_cell(source, store_history=True)
            return result.error_before_exec or result.error_in_exec

        return shell.user_ns, run
    namespace = {"__name__": "__main__"}
    counter = [0]

    def run(source):
        counter[0] += 1
        try:
            exec(compile(source, f"<cell {counter[0]}>", "exec"), namespace)
        except BaseException as error:  # noqa: BLE001 - reported, as Jupyter would show it
            if isinstance(error, TaskTimeout):
                raise
            traceback.print_exc()
            return error
        return None

    return namespace, run


def main() -> None:
    root, config = sys.argv[1], json.loads(sys.argv[2])
    _apply_limits(config.get("limits", {}))
    _drop_root(config.get("uid"))
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # fd 1 (print, os.write(1, ...)) now goes to the output pipe, like fd 2
    os.close(null)
    sys.path.insert(0, root)
    if config.get("cwd_on_path", True):
        sys.path.append(os.getcwd())
    import torch  # noqa: F401 - paid once here, before the grader's first request

    worker = Worker(config, channel_in, channel_out)
    worker._reply(
        {
            "status": "ready",
            "pid": os.getpid(),
            "uid": os.getuid() if hasattr(os, "getuid") else None,
        }
    )
    worker.serve()
    sys.stdout.flush()
    os._exit(0)  # no atexit handlers or threads the notebook left behind get to run after grading


if __name__ == "__main__":
    main()
