"""The student's function as a check sees it: `ctx.call(...)` becomes one request to the sandbox.

A `RemoteTask` stands for one graded task during one check. It encodes the inputs the check drew
(tensors as safetensors bytes; modules as "this minisd class, these constructor arguments, this
state_dict"; dataclasses by their fields), sends them, waits within the check's time budget, and
turns the reply into either plain values (decoded by wire.py: no object from the sandbox survives)
or one of the exceptions `evaluate` reports. Nothing the sandbox says is believed beyond "these are
the outputs": a reply that does not fit the request (unknown status, malformed values, a
forbidden-call message the grader did not write) is a failure, never a pass.

The same requests can build an instance of a student's class, load a state_dict into it and call its
methods (`construct`, `load_state`, `call` with a handle), and run backward() and return gradients:
what tasks that grade a student's nn.Module or backward pass need.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import wire
from .outcomes import (  # noqa: F401 (re-exported)
    CheckFailed,
    NotAttempted,
    SandboxLost,
    StudentError,
    TaskTimeout,
    _clean,
)
from .sandbox import SandboxDied, SandboxError, SandboxTimeout

# after the worker's own alarm: time for it to unwind and send "timed out" on a busy machine
GRACE_SECONDS = 3.0
DESCRIBE_SECONDS = 15.0


@dataclass
class RemoteObject:
    """A student's object living in the sandbox (e.g. an instance of their nn.Module)."""

    handle: int


@dataclass
class CallReply:
    value: object = None
    requires_grad: bool = False
    grads: dict = field(default_factory=dict)


class RemoteTask:
    def __init__(self, sandbox, name: str, forbidden: tuple, timeout: float, forbid_messages: dict):
        self.sandbox, self.name, self.forbidden, self.timeout = (
            sandbox,
            name,
            tuple(forbidden),
            timeout,
        )
        self.known_messages = set(forbid_messages.values())
        self.deadline = time.monotonic() + timeout
        self.parameters: list = []

    # -- requests ----------------------------------------------------------------------------------
    def _request(self, header: dict, tensors: Optional[dict], seconds: float):
        try:
            return self.sandbox.request(header, tensors, timeout=seconds)
        except SandboxTimeout:
            raise TaskTimeout(self.timeout) from None
        except SandboxDied:
            raise SandboxLost(
                "the sandbox died while checking this task (out of memory? a crash in native "
                "code? the process exited?)"
            ) from None
        except SandboxError as error:
            raise SandboxLost(f"the sandbox stopped working: {error}") from None

    def describe(self) -> dict:
        reply, _ = self._request(
            {"op": "signature", "target": {"task": self.name}}, None, DESCRIBE_SECONDS
        )
        self.parameters = [p[0] for p in reply.get("parameters", []) if isinstance(p, list) and p]
        return reply

    def _budget(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TaskTimeout(self.timeout)
        return left

    def call(
        self,
        ctx,
        args,
        kwargs,
        backward: bool = False,
        handle: Optional[RemoteObject] = None,
        method: Optional[str] = None,
        grad_args: tuple = (),
    ) -> CallReply:
        encoder = wire.Encoder(hook=lambda value, enc: _encode_for_sandbox(ctx, value, enc))
        header = {
            "op": "call",
            "args": encoder.encode(list(args)),
            "kwargs": encoder.encode(dict(kwargs)),
            "forbid": list(self.forbidden),
            "grad_enabled": torch.is_grad_enabled(),
            "backward": backward,
            "grad_args": [int(i) for i in grad_args],
        }
        header["target"] = (
            {"handle": handle.handle, "method": method} if handle else {"task": self.name}
        )
        budget = self._budget()
        header["timeout"] = budget
        reply, tensors = self._request(header, encoder.tensors, budget + GRACE_SECONDS)
        self._raise_for(reply, ctx, args, kwargs)
        try:
            decoder = wire.Decoder(tensors)
            result = CallReply(decoder.decode(reply.get("value")))
            if backward:
                result.requires_grad = reply.get("requires_grad") is True
                result.grads = _checked_grads(decoder.decode(reply.get("grads", {"$dict": []})))
        except wire.WireError as error:
            raise CheckFailed(f"your function's result could not be read ({error})") from None
        return result

    def construct(self, ctx, args, kwargs) -> RemoteObject:
        encoder = wire.Encoder(hook=lambda value, enc: _encode_for_sandbox(ctx, value, enc))
        budget = self._budget()
        header = {
            "op": "construct",
            "target": {"task": self.name},
            "args": encoder.encode(list(args)),
            "kwargs": encoder.encode(dict(kwargs)),
            "timeout": budget,
            "forbid": list(self.forbidden),
        }
        reply, _ = self._request(header, encoder.tensors, budget + GRACE_SECONDS)
        self._raise_for(reply, ctx, args, kwargs)
        if type(reply.get("handle")) is not int:
            raise SandboxLost("the sandbox sent an unexpected reply")
        return RemoteObject(reply["handle"])

    def load_state(self, ctx, handle: RemoteObject, state: dict, strict: bool) -> tuple[list, list]:
        encoder = wire.Encoder()
        header = {
            "op": "load_state",
            "handle": handle.handle,
            "strict": strict,
            "state": encoder.encode({k: v for k, v in state.items()}),
        }
        reply, _ = self._request(header, encoder.tensors, self._budget() + GRACE_SECONDS)
        self._raise_for(reply, ctx, (), {})
        missing, unexpected = reply.get("missing", []), reply.get("unexpected", [])
        return [_clean(k, 200) for k in missing][:50], [_clean(k, 200) for k in unexpected][:50]

    # -- replies -----------------------------------------------------------------------------------
    def _raise_for(self, reply: dict, ctx, args, kwargs) -> None:
        status = reply.get("status")
        if status == "returned":
            self._check_mutation(reply.get("mutated", []), args, kwargs)
            return
        if status == "not attempted":
            raise NotAttempted(
                _clean(reply.get("message", "")) or "still raises NotImplementedError"
            )
        if status == "raised":
            raise StudentError(
                str(reply.get("ename", "Exception")),
                str(reply.get("evalue", "")),
                str(reply.get("where", "")),
            )
        if status == "forbidden":
            message = reply.get("message")
            allowed = self.known_messages | set(ctx.forbidden.values())
            raise CheckFailed(
                message
                if message in allowed
                else "your function calls something this task asks you to write yourself"
            )
        if status == "timed out":
            raise TaskTimeout(self.timeout)
        if status == "missing":
            raise CheckFailed(f"`{self.name}` is not defined any more when the grader calls it")
        if status == "unreturnable":
            raise CheckFailed(
                "your function returned a value the grader cannot read (return tensors, numbers, "
                "strings, or lists/tuples/dicts of them)"
            )
        if status == "bad request":
            raise RuntimeError(
                f"the sandbox could not build the inputs: {_clean(reply.get('message', ''))}"
            )
        raise SandboxLost("the sandbox sent an unexpected reply")

    def _check_mutation(self, mutated, args, kwargs) -> None:
        values = list(args) + list(kwargs.values())
        names = [
            self.parameters[i] if i < len(self.parameters) else f"argument {i + 1}"
            for i in range(len(args))
        ] + list(kwargs)
        for index in mutated if isinstance(mutated, list) else []:
            if type(index) is not int or not 0 <= index < len(values):
                continue
            name = names[index]
            if isinstance(values[index], list):
                raise CheckFailed(
                    f"your function changed the list `{name}` it was given; build a new list"
                )
            raise CheckFailed(
                f"your function changed its argument `{name}` in place; compute new tensors "
                f"instead (avoid `{name} += …`, `{name}.mul_(…)`, `{name}[…] = …`)"
            )


def _checked_grads(grads) -> dict:
    """{module position: {parameter name: tensor}} and {"arg<position>": tensor} for inputs the
    check asked gradients of; anything else dropped (then reported as a missing grad)."""
    if not isinstance(grads, dict):
        return {}
    checked = {
        str(k): {str(n): g for n, g in v.items() if type(g) is torch.Tensor}
        for k, v in grads.items()
        if isinstance(v, dict)
    }
    checked.update(
        {
            k: g
            for k, g in grads.items()
            if isinstance(k, str) and k.startswith("arg") and type(g) is torch.Tensor
        }
    )
    return checked


def _encode_for_sandbox(ctx, value, encoder):
    """Grader-side extra types: modules built with ctx.module, minisd dataclasses, handles."""
    if isinstance(value, torch.nn.Module):
        entry = ctx.built.get(id(value))
        if entry is None or entry[0] is not value:
            raise TypeError(
                f"a check passed a {type(value).__name__} not built with ctx.module(...)"
            )
        _, cls, args, kwargs = entry
        return {
            "$module": {
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "args": encoder.encode(list(args)),
                "kwargs": encoder.encode(dict(kwargs)),
                "state": encoder.encode(dict(value.state_dict())),
                "training": value.training,
                "forbid": ctx.forbidden.get(id(value)),
            }
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {
            "$dataclass": {
                "class": f"{type(value).__module__}.{type(value).__qualname__}",
                "fields": encoder.encode(fields),
            }
        }
    if isinstance(value, RemoteObject):
        return {"$handle": value.handle}
    return None
