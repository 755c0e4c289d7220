"""The autograder's checks: one module per chapter (chNN_name.py), and the toolkit they use.

A chapter module defines `TITLE`, `GOALS` (learning goals, for the chapter README) and `TASKS`, a
list of `Task`s. A task's `check(ctx)` calls the student's function through `ctx.call(...)` on
random inputs drawn from `ctx` (fresh every run, reproducible with the grader's --seed) and compares
the result with minisd's own implementation computed at grading time, through
`ctx.expect_close(...)`. Nothing here stores an expected value.

Checks run in the grader's own process, never where the student's code runs: `ctx.call` sends the
inputs to the sandbox that ran the notebook and gets back plain values (remote.py, wire.py).
`evaluate` turns every outcome into a result dict:

    passed | failed | not attempted | error | missing | wrong signature | timed out | crashed
    | grader error

Instructors' hidden checks (`grade --extra-checks DIR`) use the same toolkit; see `extra_check` and
EXTRA_CHECKS_HELP below. They are loaded in the grader too: their source and expected values
never reach a sandbox.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import math
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..outcomes import (  # noqa: F401 (re-exported: checks raise them)
    CheckFailed,
    NotAttempted,
    SandboxLost,
    StudentError,
    TaskTimeout,
    _clean,
)
from ..wire import Unsupported


EXTRA_CHECKS_HELP = """\
## Hidden checks (instructors)

`grade --extra-checks DIR` also runs every `*.py` file in DIR (sorted by name), in the grader's own
process: never where the student's code runs, so a notebook cannot read, patch or skip them. A file
registers checks for graded tasks with a decorator; each check receives the same context as the
built-in ones:

    # hidden/ch01_more.py
    import torch
    from minisd.attention import attention_math
    from minisd.course.checks import extra_check

    @extra_check("scaled_dot_product_attention")
    def long_sequences(ctx):
        q, k, v = (ctx.randn(1, 2, 300, 8) for _ in range(3))
        got = ctx.call(q, k, v)                   # the student's function, run in the sandbox
        ctx.expect_close(got, attention_math(q, k, v)[0], what="output for 300 tokens")

Each hidden check is reported as its own line (`task [file.py::function]`) and counts towards the
score. One folder may hold checks for every chapter: only those for the graded notebook's tasks run.
A task name that no chapter has (a typo) makes the file fail to load, reported as a grader error.
`ctx` offers `randn(*shape)`, `rand`, `randint(low, high, shape)`, `integer(low, high)`,
`choice(options)`, `call(*args, **kwargs)`, `expect_close(got, expected, what=, atol=, rtol=,
mistakes={explanation: tensor})`, `fail(message)` and `case(label)` (a context manager that prefixes
failure messages). Compute expected values from minisd at grading time; never write them into the
file. Build modules you pass to `call` with `ctx.module(cls, *args)` (the sandbox rebuilds them from
the class, its arguments and the state_dict). Failure messages you write appear in the report."""


@dataclass
class Task:
    name: str
    # "(q, k, v, mask=None)": the contract with the notebook (build verifies it)
    signature: str
    summary: str  # what the function must compute (chapter README), without the answer
    check: Callable  # check(ctx) -> None; raises CheckFailed
    checked: str = ""  # what the grader tries (chapter README)
    # dotted paths the function may not call: minisd's own answer, torch's fused one
    forbidden: tuple = ()
    allowed: str = ""  # what the function may use (chapter README)
    # warm-up (one formula) | core (a module or algorithm) | stretch (gradient, training, measurement)
    level: str = "warm-up"
    minutes: int = 15  # expected time after reading the chapter (README, instructor's guide)

    def forbidden_calls(self) -> dict:
        return {
            path: "your function calls "
            f"{path.rsplit('.', 2)[-2] + '.' if path.count('.') > 1 else ''}"
            f"{path.rsplit('.', 1)[-1]} ({path}), which computes the answer for you: this task "
            "asks "
            f"you to write it yourself (the chapter README lists what you may use)"
            for path in self.forbidden
        }


# ------------------------------------------------------------------ numbers and messages


def _fmt(x: float) -> str:
    if x != x or x in (math.inf, -math.inf):
        return str(x)
    return f"{x:.3g}"


def _shape(x) -> tuple:
    return tuple(x.shape)


def nice_factor(c: float) -> Optional[str]:
    """'√8' if c ≈ √8, '1/4' if c ≈ 1/4, ... for factors a forgotten scale or square root produces;
    else None."""
    if not math.isfinite(c) or c == 0:
        return None
    sign = "-" if c < 0 else ""
    c = abs(c)
    for value, text in ((c, ""), (1 / c, "1/")):
        for k in range(2, 4097):
            if abs(value - k) <= 1e-3 * k:
                return f"{sign}{text}{k}"
            root = math.sqrt(k)
            if root != int(root) and abs(value - root) <= 1e-3 * root:
                return f"{sign}{text}√{k}"
    return None


def describe_difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    """'max abs error 0.42 at index (0, 3) (got 0.1, expected 0.52)' plus a constant-factor note
    when one fits."""
    a, b = got.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    diff = (a - b).abs()
    bad_nan = torch.isnan(a) & ~torch.isnan(b)
    if bad_nan.any():
        index = tuple(int(i) for i in bad_nan.nonzero()[0])
        return f"your result is NaN at index {index} (expected {_fmt(float(b[index]))})"
    bad_inf = torch.isinf(a) & ~torch.isinf(b)
    if bad_inf.any():
        index = tuple(int(i) for i in bad_inf.nonzero()[0])
        return (
            f"your result is {float(a[index])} at index {index} (expected {_fmt(float(b[index]))})"
        )
    diff = torch.nan_to_num(diff, nan=0.0, posinf=0.0)
    flat = int(diff.reshape(-1).argmax()) if diff.numel() else 0
    index = (
        tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        if diff.dim()
        else ()
    )
    where = f" at index {index}" if index else ""
    text = (
        f"max abs error {_fmt(float(diff.reshape(-1)[flat]))}{where} "
        f"(got {_fmt(float(a.reshape(-1)[flat]))}, expected {_fmt(float(b.reshape(-1)[flat]))})"
    )
    # Is the result a constant multiple of the reference? Least-squares factor, accepted only if it
    # fits closely.
    bb = float((b * b).sum())
    if bb > 0 and a.numel() > 1:
        c = float((a * b).sum()) / bb
        residual = float((a - c * b).norm()) / max(float(b.norm()), 1e-30)
        if residual < 1e-4 and abs(c - 1) > 1e-3:
            if abs(c) < 1e-12:
                text += "; your result is all zeros"
            else:
                nice = nice_factor(c)
                if nice and nice.lstrip("-").isdigit():
                    text += f"; your result is the expected one times {nice}"
                else:
                    text += f"; your result is the expected one times {c:.4g}" + (
                        f" (≈ {nice})" if nice else ""
                    )
    return text


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> bool:
    return _shape(got) == _shape(expected) and torch.allclose(
        got.detach().to(torch.float64).cpu(),
        expected.detach().to(torch.float64).cpu(),
        atol=atol,
        rtol=rtol,
        equal_nan=True,
    )


# ------------------------------------------------------------------ the check context


class Context:
    """What a check receives: random inputs (seeded), the student's function behind `call`, and
    comparisons.

    The check runs in the grader's process; `call` sends the inputs to the sandbox that ran the
    notebook (remote.py) and returns what the student's function returned, rebuilt as plain values
    and tensors.
    """

    def __init__(self, task_name: str, remote, seed: int):
        self.task_name, self.remote, self.seed = task_name, remote, seed
        self.random = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed % (2**63))
        # id(module) -> (module, class, args, kwargs): how the sandbox rebuilds it
        self.built: dict = {}
        self.forbidden: dict = {}  # id(module) -> message while inside forbid_call

    # random inputs -------------------------------------------------
    def integer(self, low: int, high: int) -> int:
        """A random int in [low, high] (both included)."""
        return self.random.randint(low, high)

    def choice(self, options):
        return self.random.choice(list(options))

    def uniform(self, low: float, high: float) -> float:
        return self.random.uniform(low, high)

    def randn(self, *shape, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=dtype) * scale

    def rand(
        self, *shape, low: float = 0.0, high: float = 1.0, dtype=torch.float32
    ) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self.generator, dtype=dtype)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        """Integers in [low, high) like torch.randint."""
        return torch.randint(low, high, tuple(shape), generator=self.generator)

    def module(self, cls, *args, **kwargs) -> torch.nn.Module:
        """cls(*args, **kwargs), remembered so that passing it to `call` rebuilds it in the sandbox
        (same class, same constructor arguments, then its state_dict). Build every module a check
        passes to `call` this way."""
        module = cls(*args, **kwargs)
        self.built[id(module)] = (module, cls, args, kwargs)
        return module

    def seed_module(self, module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
        """Fill every parameter with random values (norm weights around 1), so no parameter is
        trivially 0 or 1."""
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("weight") and p.dim() == 1:  # GroupNorm/LayerNorm scales
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=self.generator))
                else:
                    p.copy_(
                        scale
                        * torch.randn(p.shape, generator=self.generator)
                        / max(1.0, p[0].numel() ** 0.5)
                        if p.dim() > 1
                        else scale * torch.randn(p.shape, generator=self.generator)
                    )
        return module.eval()

    # labelling ----------------------------------------------------
    @contextlib.contextmanager
    def case(self, label: str):
        """Failures inside are reported as '<label>: <message>' (the innermost label only)."""
        try:
            yield
        except CheckFailed as failure:
            if getattr(failure, "labelled", False):
                raise
            new = CheckFailed(f"{label}: {failure}")
            new.labelled = True
            raise new from None

    def fail(self, message: str):
        raise CheckFailed(message)

    # calling the student's function ------------------------------
    def call(self, *args, **kwargs):
        """The student's fn(*args, **kwargs), run in the sandbox; fails if it changed a tensor or
        list argument in place, or called what the task forbids."""
        reply = self.remote.call(self, args, kwargs)
        return reply.value

    def call_with_grads(self, *args, **kwargs):
        """Like `call`, then backward() from the (scalar) result in the sandbox: -> (value, grads)
        where grads maps each module argument to {parameter name: gradient}, or is None when the
        result is not connected to any parameter (no requires_grad)."""
        reply = self.remote.call(self, args, kwargs, backward=True)
        if not reply.requires_grad:
            return reply.value, None
        modules = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.nn.Module)]
        return reply.value, {
            module: reply.grads.get(str(i), {}) for i, module in enumerate(modules)
        }

    def call_with_input_grads(self, *args, wrt: tuple = ()):
        """The student's fn(*args) run in the sandbox with the positional tensor arguments at
        positions `wrt` made leaves that require grad, then backward() from the (scalar) result:
        -> (value, grads) with grads {position: gradient or None}, or None when the result is not
        connected to any input (no requires_grad)."""
        reply = self.remote.call(self, args, {}, backward=True, grad_args=tuple(wrt))
        if not reply.requires_grad:
            return reply.value, None
        return reply.value, {i: reply.grads.get(f"arg{i}") for i in wrt}

    def construct(self, *args, **kwargs):
        """An instance of the student's class (the task's name), built in the sandbox: a handle to
        pass to `call` arguments, `load_state` and `call_method`. (For tasks where the student
        writes an nn.Module.)"""
        return self.remote.construct(self, args, kwargs)

    def load_state(self, handle, state: dict, strict: bool = True) -> tuple[list, list]:
        """load_state_dict(state) on the student's module in the sandbox: -> (missing keys,
        unexpected keys)."""
        return self.remote.load_state(self, handle, state, strict)

    def call_method(self, handle, method: str, *args, **kwargs):
        """handle.method(*args, **kwargs) in the sandbox, e.g. call_method(model, "forward", x)."""
        return self.remote.call(self, args, kwargs, handle=handle, method=method).value

    def call_module(self, init_kwargs: dict, state_dict: dict, *inputs):
        """For a task whose answer is an nn.Module class: build it in the sandbox with
        `init_kwargs`, load minisd's `state_dict` by name (names the student's module lacks or
        adds fail the task, named), and return forward(*inputs) as a plain tensor."""
        module = self.construct(**init_kwargs)
        not_filled, not_used = self.load_state(module, state_dict, strict=False)
        if not_used or not_filled:
            self.fail(
                "your module's parameter names differ from minisd's: "
                + (f"missing {sorted(not_used)}" if not_used else "")
                + ("; " if not_used and not_filled else "")
                + (f"unexpected {sorted(not_filled)}" if not_filled else "")
                + " (name the submodules as the task says: the grader loads weights by name)"
            )
        return self.call_method(module, "forward", *inputs)

    @contextlib.contextmanager
    def forbid_call(self, module: torch.nn.Module, message: str):
        """Inside the block, the student's function calling `module(...)` (or its forward) fails the
        task with `message`: the task is to compute what the module computes from its parts, not to
        call it.
        """
        self.forbidden[id(module)] = message
        try:
            yield
        finally:
            self.forbidden.pop(id(module), None)

    # comparisons ---------------------------------------------------
    def expect_tensor(self, got, what: str = "the result") -> torch.Tensor:
        if type(got) is torch.Tensor:
            return got
        if isinstance(got, tuple):
            self.fail(
                f"expected {what} to be a tensor, got a tuple of {len(got)} (return only the "
                "tensor)"
            )
        if got is None:
            self.fail(f"expected {what} to be a tensor, got None (did you forget `return`?)")
        name = got.type_name if isinstance(got, Unsupported) else type(got).__name__
        self.fail(f"expected {what} to be a torch.Tensor, got {name}")

    def expect_close(
        self,
        got,
        expected: torch.Tensor,
        what: str = "the result",
        atol: float = 1e-5,
        rtol: float = 1e-4,
        mistakes: Optional[dict] = None,
    ) -> None:
        """Fail unless `got` has the shape of `expected` and matches it elementwise within atol +
        rtol·|expected|.

        mistakes: {explanation: tensor or zero-argument function returning one}: common wrong
        answers; when `got` matches one, its explanation is added to the message (computed only on
        failure).
        """
        got = self.expect_tensor(got, what)
        if _shape(got) != _shape(expected):
            message = f"{what}: expected shape {_shape(expected)}, got {_shape(got)}"
            if sorted(_shape(got)) == sorted(_shape(expected)):
                message += (
                    " (the same sizes in another order: transposed, or a rearrange in the "
                    "wrong order?)"
                )
            elif got.numel() == expected.numel():
                message += " (the same number of elements: reshaped the wrong way?)"
            else:
                note = _mistake_note(got, mistakes, atol, rtol)
                message += f"; {note}" if note else ""
            self.fail(message)
        if expected.is_floating_point() and not got.is_floating_point():
            self.fail(f"{what}: expected a floating-point tensor, got dtype {got.dtype}")
        if _close(got, expected, atol, rtol):
            return
        message = f"{what}: {describe_difference(got, expected)}"
        note = _mistake_note(got, mistakes, atol, rtol)
        self.fail(message + (f". {note}" if note else ""))


def _mistake_note(got, mistakes, atol, rtol) -> Optional[str]:
    for explanation, candidate in (mistakes or {}).items():
        try:
            value = candidate() if callable(candidate) else candidate
        except Exception:  # a mistake that cannot even be computed for these inputs
            continue
        if isinstance(value, torch.Tensor) and _close(got, value, max(atol, 1e-5), max(rtol, 1e-4)):
            return explanation
    return None


# ------------------------------------------------------------------ signatures


class _Default:
    def __repr__(self):
        return "…"


def parse_signature(text: str) -> inspect.Signature:
    namespace: dict = {}
    # the contract's text, not student code
    exec(compile(f"def _f{text}: pass", "<signature>", "exec"), namespace)
    return inspect.signature(namespace["_f"])


def signature_from_reply(reply: dict) -> Optional[inspect.Signature]:
    """The student's signature rebuilt from the sandbox's description (names, kinds, has-default),
    or None."""
    try:
        return inspect.Signature(
            [
                inspect.Parameter(
                    name,
                    getattr(inspect.Parameter, kind),
                    default=_Default() if has_default else inspect.Parameter.empty,
                )
                for name, kind, has_default in reply["parameters"]
            ]
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def signature_problem(
    actual: Optional[inspect.Signature], name: str, expected_text: str
) -> Optional[str]:
    """None if a function with signature `actual` can be called the way the contract says, else a
    message comparing the two signatures. `actual` None: unknown (a builtin): let the call decide.
    """
    if actual is None:
        return None
    expected = parse_signature(expected_text)
    params = list(actual.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
    required_actual = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    required_expected = [p for p in expected.parameters.values() if p.default is p.empty]
    optional_expected = [p for p in expected.parameters.values() if p.default is not p.empty]
    ok = (len(required_actual) == len(required_expected) or var_positional) and (
        len(positional) >= len(required_expected) or var_positional
    )
    for p in optional_expected:
        if p.name not in actual.parameters and not var_keyword:
            ok = False
        elif p.name in actual.parameters and actual.parameters[p.name].default is p.empty:
            ok = False
    if ok:
        return None
    return f"expected {name}{expected_text}, yours is {name}{_clean(str(actual), 200)}"


# ------------------------------------------------------------------ hidden checks

_COLLECTING: contextvars.ContextVar = contextvars.ContextVar("minisd_extra_checks")


def extra_check(task_name: str, label: Optional[str] = None):
    """Decorator for instructors' hidden checks: `@extra_check("scaled_dot_product_attention") def
    big(ctx): ...`."""
    known = all_task_names()
    if task_name not in known:
        raise ValueError(
            f"@extra_check({task_name!r}): no chapter has a graded task of that name; the tasks "
            "are "
            f"{', '.join(sorted(known))}"
        )

    def register(fn):
        collected = _COLLECTING.get(None)
        if collected is not None:
            collected.append((task_name, label or fn.__name__, fn))
        return fn

    return register


def all_task_names() -> set:
    return {
        task.name
        for path in Path(__file__).parent.glob("ch[0-9][0-9]_*.py")
        for task in chapter_module(path.stem[2:4]).TASKS
    }


def load_extra_checks(path: str) -> list[tuple[str, str, Callable]]:
    """Run an instructor's file (in the grader's process, never in a sandbox) and return the checks
    it registered with @extra_check."""
    import runpy

    collected: list = []
    token = _COLLECTING.set(collected)
    try:
        runpy.run_path(path, run_name=f"minisd_extra_{Path(path).stem}")
    finally:
        _COLLECTING.reset(token)
    return collected


def chapter_module(number: str):
    folder = Path(__file__).parent
    matches = sorted(folder.glob(f"ch{number}_*.py"))
    if not matches:
        raise LookupError(f"no checks for chapter {number}")
    return importlib.import_module(f"{__name__}.{matches[0].stem}")


def task_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def forbidden_paths(tasks) -> dict:
    """{dotted path: message} for every call some task forbids (the sandbox wraps them before the
    notebook)."""
    return {path: message for task in tasks for path, message in task.forbidden_calls().items()}


# ------------------------------------------------------------------ running one check (in the
# grader)


@contextlib.contextmanager
def _standard_torch_state():
    """Checks build modules and tensors with torch's defaults."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch.set_default_dtype(dtype)


def evaluate(name: str, signature: str, check: Callable, remote, seed: int) -> dict:
    """Run one check against the student's function behind `remote` and describe the outcome. Never
    raises (except KeyboardInterrupt): whatever the sandbox does ends as one result."""

    result = {"task": name, "seed": seed}
    start = time.perf_counter()
    try:
        info = remote.describe()
        if info.get("status") == "missing":
            result.update(
                status="missing",
                message=f"`{name}` is not defined: write `def {name}{signature}:` in "
                f"its exercise cell and run that cell",
            )
            return result
        if not info.get("callable", True):
            result.update(
                status="wrong signature",
                message=f"`{name}` is a {_clean(info.get('type', '?'), 60)}, not a function",
            )
            return result
        problem = (
            signature_problem(signature_from_reply(info), name, signature)
            if "parameters" in info
            else None
        )
        if problem:
            result.update(status="wrong signature", message=problem)
            return result
        with _standard_torch_state():
            check(Context(name, remote, seed))
        result.update(status="passed", message="")
    except NotAttempted as error:
        result.update(
            status="not attempted", message=_clean(error) or "still raises NotImplementedError"
        )
    except StudentError as error:
        result.update(status="error", message=_clean(str(error)))
    except CheckFailed as failure:
        result.update(status="failed", message=_clean(str(failure), 800))
    except TaskTimeout as error:
        result.update(
            status="timed out",
            message=f"did not finish within {error.seconds:g} s (an endless loop?)",
        )
    except SandboxLost as error:
        result.update(status="crashed", message=str(error))
    except Exception as error:  # noqa: BLE001 - a bug in a check must not stop the grader
        result.update(
            status="grader error",
            message=f"the check itself failed: {type(error).__name__} (please report this)",
        )
    finally:
        result["seconds"] = round(time.perf_counter() - start, 3)
    return result
