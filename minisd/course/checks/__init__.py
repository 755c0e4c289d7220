"""The autograder's checks: one module per chapter (chNN_name.py), and the toolkit they are written with.

A chapter module defines `TITLE`, `GOALS` (learning goals, for the chapter README) and `TASKS`, a list of `Task`s.
A task's `check(ctx)` calls the student's function through `ctx.call(...)` on random inputs drawn from `ctx` (fresh
every run, reproducible with the grader's --seed) and compares the result with minisd's own implementation computed
at grading time, through `ctx.expect_close(...)`. Nothing here stores an expected value.

Checks run inside the kernel that ran the student's notebook (the grader sends `run_task(...)` as a cell), so they
see the student's functions as the notebook defined them. `run_task` turns every outcome into a result dict:

    passed | failed | not attempted | error | missing | wrong signature | timed out | grader error

Instructors' hidden checks (`grade --extra-checks DIR`) use the same toolkit; see `extra_check` and EXTRA_CHECKS_HELP
in grade.py.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import random
import signal
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

RESULT_MIME = "application/vnd.minisd.grade+json"


@dataclass
class Task:
    name: str
    signature: str          # "(q, k, v, mask=None)": the contract with the notebook (build verifies it)
    summary: str            # what the function must compute (chapter README), without the answer
    check: Callable         # check(ctx) -> None; raises CheckFailed
    checked: str = ""       # what the grader tries (chapter README)
    # warm-up (one formula) | core (a module or algorithm) | stretch (gradient, training, measurement)
    level: str = "warm-up"
    minutes: int = 15       # expected time after reading the chapter (README, instructor's guide)
    allowed: str = ""       # what the task may call (README); "" = torch and Python only


class CheckFailed(Exception):
    """The student's function returned a wrong result; the message says how."""


class NotAttempted(Exception):
    """The student's function still raises NotImplementedError."""


class StudentError(Exception):
    """The student's function raised; `.error` is the exception, `.where` the line of the student's code."""

    def __init__(self, error: BaseException, where: str):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.where = error, where


class ForbiddenCall(Exception):
    """Raised when the student's function calls something the task asks them to write (e.g. `block(x)` itself)."""


class TaskTimeout(BaseException):
    """Raised by the alarm when a check runs past its time limit (a BaseException: `except Exception` in student
    code does not swallow it)."""


# ------------------------------------------------------------------ numbers and messages

def _fmt(x: float) -> str:
    if x != x or x in (math.inf, -math.inf):
        return str(x)
    return f"{x:.3g}"


def _shape(x) -> tuple:
    return tuple(x.shape)


def nice_factor(c: float) -> Optional[str]:
    """'√8' if c ≈ √8, '1/4' if c ≈ 1/4, ... for factors a forgotten scale or square root produces; else None."""
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
    """'max abs error 0.42 at index (0, 3) (got 0.1, expected 0.52)' plus a constant-factor note when one fits."""
    a, b = got.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    diff = (a - b).abs()
    bad_nan = torch.isnan(a) & ~torch.isnan(b)
    if bad_nan.any():
        index = tuple(int(i) for i in bad_nan.nonzero()[0])
        return f"your result is NaN at index {index} (expected {_fmt(float(b[index]))})"
    bad_inf = torch.isinf(a) & ~torch.isinf(b)
    if bad_inf.any():
        index = tuple(int(i) for i in bad_inf.nonzero()[0])
        return f"your result is {float(a[index])} at index {index} (expected {_fmt(float(b[index]))})"
    diff = torch.nan_to_num(diff, nan=0.0, posinf=0.0)
    flat = int(diff.reshape(-1).argmax()) if diff.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    where = f" at index {index}" if index else ""
    text = (f"max abs error {_fmt(float(diff.reshape(-1)[flat]))}{where} "
            f"(got {_fmt(float(a.reshape(-1)[flat]))}, expected {_fmt(float(b.reshape(-1)[flat]))})")
    # Is the result a constant multiple of the reference? Least-squares factor, accepted only if it fits closely.
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
                    text += f"; your result is the expected one times {c:.4g}" + (f" (≈ {nice})" if nice else "")
    return text


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> bool:
    return _shape(got) == _shape(expected) and torch.allclose(
        got.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu(), atol=atol, rtol=rtol,
        equal_nan=True)


# ------------------------------------------------------------------ the check context

class Context:
    """What a check receives: random inputs (seeded), the student's function behind `call`, and comparisons."""

    def __init__(self, task_name: str, fn: Callable, seed: int):
        self.task_name, self.fn, self.seed = task_name, fn, seed
        self.random = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed % (2**63))

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

    def rand(self, *shape, low: float = 0.0, high: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self.generator, dtype=dtype)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        """Integers in [low, high) like torch.randint."""
        return torch.randint(low, high, tuple(shape), generator=self.generator)

    def seed_module(self, module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
        """Fill every parameter with random values (norm weights around 1), so no parameter is trivially 0 or 1."""
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("weight") and p.dim() == 1:  # GroupNorm/LayerNorm scales
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=self.generator))
                else:
                    p.copy_(scale * torch.randn(p.shape, generator=self.generator) / max(1.0, p[0].numel() ** 0.5)
                            if p.dim() > 1 else scale * torch.randn(p.shape, generator=self.generator))
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
        """fn(*args, **kwargs) on copies of the tensor arguments; fails if the function changed an argument in place."""
        copies_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        copies_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        try:
            result = self.fn(*copies_args, **copies_kwargs)
        except NotImplementedError as error:
            raise NotAttempted(str(error)) from None
        except ForbiddenCall as error:
            raise CheckFailed(str(error)) from None
        except Exception as error:  # noqa: BLE001 - any failure of student code is reported, not raised
            raise StudentError(error, _student_frame(error)) from None
        names = _parameter_names(self.fn)
        for i, (original, passed) in enumerate(zip(args, copies_args)):
            if isinstance(original, torch.Tensor) and not _same(original, passed):
                name = names[i] if i < len(names) else f"argument {i + 1}"
                self.fail(f"your function changed its argument `{name}` in place; compute new tensors instead "
                          f"(avoid `{name} += …`, `{name}.mul_(…)`, `{name}[…] = …`)")
        for key, original in kwargs.items():
            if isinstance(original, torch.Tensor) and not _same(original, copies_kwargs[key]):
                self.fail(f"your function changed its argument `{key}` in place; compute new tensors instead")
        return result

    def call_module(self, init_kwargs: dict, state_dict: dict, *inputs, grads_of=None,
                    upstream=None):
        """For a task whose answer is an nn.Module class (`self.fn`): build it with `init_kwargs`,
        load `state_dict` by name (strict: missing or unexpected names fail, named), run forward on
        copies of `inputs`. Returns the output; with `grads_of` (names of parameters, or 'input0',
        'input1', ...) returns (output, {name: gradient of (output · upstream).sum()}), `upstream`
        defaulting to ones. Plain tensors only: the sandboxed grader can port it as one message."""
        try:
            module = self.fn(**init_kwargs)
        except NotImplementedError as error:
            raise NotAttempted(str(error)) from None
        except Exception as error:  # noqa: BLE001
            raise StudentError(error, _student_frame(error)) from None
        if not isinstance(module, torch.nn.Module):
            self.fail(f"{self.task_name}(...) should build a torch.nn.Module, "
                      f"got {type(module).__name__}")
        names = set(module.state_dict())
        missing, unexpected = sorted(set(state_dict) - names), sorted(names - set(state_dict))
        if missing or unexpected:
            self.fail("your module's parameter names differ from minisd's: "
                      + (f"missing {missing}" if missing else "")
                      + ("; " if missing and unexpected else "")
                      + (f"unexpected {unexpected}" if unexpected else "")
                      + " (name the submodules as the task says: the grader loads weights by name)")
        own = module.state_dict()
        for name, tensor in state_dict.items():
            if tuple(own[name].shape) != tuple(tensor.shape):
                self.fail(f"your parameter `{name}` has shape {tuple(own[name].shape)}, minisd's "
                          f"{tuple(tensor.shape)}")
        module.load_state_dict(state_dict, strict=True)
        module.eval()
        copies = [x.clone().requires_grad_(x.is_floating_point() and grads_of is not None)
                  if isinstance(x, torch.Tensor) else x for x in inputs]
        try:
            output = module(*copies)
        except NotImplementedError as error:
            raise NotAttempted(str(error)) from None
        except Exception as error:  # noqa: BLE001
            raise StudentError(error, _student_frame(error)) from None
        if grads_of is None:
            return output.detach() if isinstance(output, torch.Tensor) else output
        output = self.expect_tensor(output, "the module's output")
        weight = torch.ones_like(output) if upstream is None else upstream
        params = dict(module.named_parameters())
        wanted = [copies[int(n[5:])] if n.startswith("input") else params[n] for n in grads_of]
        grads = torch.autograd.grad((output * weight).sum(), wanted, allow_unused=True)
        return output.detach(), {n: (g if g is not None else torch.zeros_like(w)).detach()
                                 for n, g, w in zip(grads_of, grads, wanted)}

    @contextlib.contextmanager
    def forbid_call(self, module: torch.nn.Module, message: str):
        """Inside the block, calling `module(...)` raises ForbiddenCall(message): the task is to compute what the
        module computes from its parts, not to call it."""
        def forbidden(*args, **kwargs):
            raise ForbiddenCall(message)
        module.forward = forbidden  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            del module.forward

    # comparisons ---------------------------------------------------
    def expect_tensor(self, got, what: str = "the result") -> torch.Tensor:
        if isinstance(got, torch.Tensor):
            return got
        if isinstance(got, tuple):
            self.fail(f"expected {what} to be a tensor, got a tuple of {len(got)} (return only the tensor)")
        if got is None:
            self.fail(f"expected {what} to be a tensor, got None (did you forget `return`?)")
        self.fail(f"expected {what} to be a torch.Tensor, got {type(got).__name__}")

    def expect_close(self, got, expected: torch.Tensor, what: str = "the result", atol: float = 1e-5,
                     rtol: float = 1e-4, mistakes: Optional[dict] = None) -> None:
        """Fail unless `got` has the shape of `expected` and matches it elementwise within atol + rtol·|expected|.

        mistakes: {explanation: tensor or zero-argument function returning one}: common wrong answers; when `got`
        matches one, its explanation is added to the message (computed only on failure).
        """
        got = self.expect_tensor(got, what)
        if _shape(got) != _shape(expected):
            message = f"{what}: expected shape {_shape(expected)}, got {_shape(got)}"
            if sorted(_shape(got)) == sorted(_shape(expected)):
                message += " (the same sizes in another order: transposed, or a rearrange in the wrong order?)"
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


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or
                                                              (torch.isnan(a) == torch.isnan(b)).all()
                                                              and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))


def _parameter_names(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _student_frame(error: BaseException) -> str:
    """'line 7 of your cell: `scores = q @ k`': the innermost traceback frame in notebook code."""
    frames = traceback.extract_tb(error.__traceback__)
    here = Path(__file__).resolve().parent.parent
    student = [f for f in frames if not Path(f.filename).resolve().is_relative_to(here)
               and ("ipykernel" in f.filename or f.filename.startswith("<"))]
    if student:
        frame = student[-1]
        code = f": `{frame.line.strip()}`" if frame.line else ""
        return f"line {frame.lineno} of your cell, in {frame.name}(){code}"
    return ""


# ------------------------------------------------------------------ signatures

def parse_signature(text: str) -> inspect.Signature:
    namespace: dict = {}
    exec(compile(f"def _f{text}: pass", "<signature>", "exec"), namespace)  # the contract's text, not student code
    return inspect.signature(namespace["_f"])


def signature_problem(fn, name: str, expected_text: str) -> Optional[str]:
    """None if `fn` can be called the way the contract says, else a message comparing the two signatures."""
    if not callable(fn):
        return f"`{name}` is a {type(fn).__name__}, not a function"
    try:
        actual = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin or C function: let the call decide
    expected = parse_signature(expected_text)
    params = list(actual.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
    required_actual = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required_expected = [p for p in expected.parameters.values() if p.default is p.empty]
    optional_expected = [p for p in expected.parameters.values() if p.default is not p.empty]
    ok = (len(required_actual) == len(required_expected) or var_positional) and \
        (len(positional) >= len(required_expected) or var_positional)
    for p in optional_expected:
        if p.name not in actual.parameters and not var_keyword:
            ok = False
        elif p.name in actual.parameters and actual.parameters[p.name].default is p.empty:
            ok = False
    if ok:
        return None
    return f"expected {name}{expected_text}, yours is {name}{actual}"


# ------------------------------------------------------------------ running tasks (inside the kernel)

STASH: dict[str, Callable] = {}
_EXTRA: list[tuple[str, str, Callable]] = []   # (task name, label, check) registered by extra_check


def stash(namespace: dict, names) -> None:
    """Remember the student's functions right after the cell that defines them runs, so a later cell that rebinds
    the name (e.g. `from minisd.resnet import timestep_embedding`) does not replace the student's work."""
    for name in names:
        if name in namespace:
            STASH[name] = namespace[name]


def extra_check(task_name: str, label: Optional[str] = None):
    """Decorator for instructors' hidden checks: `@extra_check("scaled_dot_product_attention") def big(ctx): ...`."""
    known = all_task_names()
    if task_name not in known:
        raise ValueError(f"@extra_check({task_name!r}): no chapter has a graded task of that name; the tasks are "
                         f"{', '.join(sorted(known))}")

    def register(fn):
        _EXTRA.append((task_name, label or fn.__name__, fn))
        return fn
    return register


def all_task_names() -> set:
    return {task.name for path in Path(__file__).parent.glob("ch[0-9][0-9]_*.py")
            for task in chapter_module(path.stem[2:4]).TASKS}


def load_extra_checks(path: str) -> list[tuple[str, str, Callable]]:
    """Run an instructor's file and return the checks it registered with @extra_check."""
    import runpy
    before = len(_EXTRA)
    runpy.run_path(path, run_name=f"minisd_extra_{Path(path).stem}")
    return _EXTRA[before:]


def chapter_module(number: str):
    folder = Path(__file__).parent
    matches = sorted(folder.glob(f"ch{number}_*.py"))
    if not matches:
        raise LookupError(f"no checks for chapter {number}")
    return importlib.import_module(f"{__name__}.{matches[0].stem}")


def task_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


@contextlib.contextmanager
def _time_limit(seconds: Optional[float]):
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TaskTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _standard_torch_state():
    """Checks build modules and tensors with torch's defaults, whatever the notebook changed (default dtype,
    torch.set_grad_enabled(False), ...)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch.set_default_dtype(dtype)


def evaluate(name: str, signature: str, check: Callable, fn, seed: int, timeout: Optional[float]) -> dict:
    """Run one check on `fn` and describe the outcome (never raises, except KeyboardInterrupt)."""
    result = {"task": name, "seed": seed}
    start = time.perf_counter()
    try:
        if fn is None:
            result.update(status="missing", message=f"`{name}` is not defined: write `def {name}{signature}:` in "
                                                     f"its exercise cell and run that cell")
            return result
        problem = signature_problem(fn, name, signature)
        if problem:
            result.update(status="wrong signature", message=problem)
            return result
        with _time_limit(timeout), _standard_torch_state():
            check(Context(name, fn, seed))
        result.update(status="passed", message="")
    except NotAttempted as error:
        result.update(status="not attempted", message=str(error) or "still raises NotImplementedError")
    except StudentError as error:
        where = f" ({error.where})" if error.where else ""
        result.update(status="error", message=f"{type(error.error).__name__}: {_short(str(error.error))}{where}")
    except CheckFailed as failure:
        result.update(status="failed", message=str(failure))
    except TaskTimeout:
        result.update(status="timed out", message=f"did not finish within {timeout:g} s (an endless loop?)")
    except Exception as error:  # noqa: BLE001 - a bug in a check must not stop the grader
        result.update(status="grader error", message=f"the check itself failed: {type(error).__name__}: "
                                                     f"{_short(str(error))} (please report this)")
    finally:
        result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " …"


def run_task(chapter: str, name: str, namespace: dict, seed: int, timeout: Optional[float] = None,
             extra_files: tuple = (), publish: bool = True) -> list[dict]:
    """Grade task `name` of `chapter` (plus any extra checks for it) and publish each result as display data."""
    module = chapter_module(chapter)
    task = next(t for t in module.TASKS if t.name == name)
    fn = STASH.get(name, namespace.get(name))
    results = [dict(evaluate(name, task.signature, task.check, fn, task_seed(seed, name), timeout), check="")]
    for path in extra_files:
        try:
            checks = [c for c in load_extra_checks(path) if c[0] == name]
        except Exception as error:  # noqa: BLE001
            message = f"cannot load extra checks {path}: {type(error).__name__}: {_short(str(error))}"
            results.append({"task": name, "check": Path(path).name, "status": "grader error", "seconds": 0.0,
                            "message": message})
            continue
        for _, label, check in checks:
            outcome = evaluate(name, task.signature, check, fn, task_seed(seed, f"{name}/{label}"), timeout)
            results.append(dict(outcome, check=f"{Path(path).name}::{label}"))
    if publish:
        _publish(results)
    return results


def _publish(results: list[dict]) -> None:
    try:
        from IPython.display import display
        display({RESULT_MIME: results, "text/plain": repr([(r["task"], r["status"]) for r in results])}, raw=True)
    except ImportError:  # not in a kernel
        print(results, file=sys.stdout)
