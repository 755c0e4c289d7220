"""The grader <-> sandbox wire format: JSON for structure, safetensors bytes for tensors, no pickle.

One message is

    b"MSD1" | JSON length (4 bytes, big-endian) | blob length (8 bytes) | JSON (ASCII) | blob

where the blob is safetensors bytes. Values travel as a small tagged JSON tree: None, bools, ints,
strings and lists as themselves; floats as themselves or {"$float": "nan" | "inf" | "-inf"};
tuples as {"$tuple": [...]}; dicts as {"$dict": [[k, v], ...]} (so keys may be tuples, as in a BPE
rank table); tensors as {"$tensor": "t3"}, a name in the blob. Either side may add tags of its own
through hooks (the grader sends modules and dataclasses to build; the sandbox answers objects it
cannot send as {"$unsupported": "type name"}).

Why this shape: whatever the sandbox sends is decoded here into fresh plain Python values and plain
`torch.Tensor`s built from raw bytes by safetensors' parser (written for untrusted files), so no
object with behaviour (a Tensor subclass with __torch_function__, a lazy object, a pickle) crosses
into the grader. Every length, depth and count is bounded before anything is allocated, and any
violation is one `WireError`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MAGIC = b"MSD1"
PREFIX = struct.Struct(">4sIQ")


class WireError(Exception):
    """A malformed, oversized or unexpected message."""


@dataclass(frozen=True)
class WireLimits:
    """Bounds on one message read from the other side (what a hostile sandbox could send)."""

    header_bytes: int = 64 << 20  # the JSON part: CLIP's 49k-entry rank table is ~2 MB
    blob_bytes: int = 512 << 20  # tensors; a fast-mode chapter sends a few MB
    depth: int = 32  # nesting of lists/tuples/dicts
    nodes: int = 2_000_000  # values in one message


@dataclass(frozen=True)
class Unsupported:
    """Stands in, on the grader's side, for a returned object the sandbox could not send (a module,
    a generator, ...): checks report its type name, never the object."""

    type_name: str


# ------------------------------------------------------------------ framing


def write_message(stream, header: dict, tensors: Optional[dict] = None) -> None:
    from safetensors.torch import save

    blob = save(tensors) if tensors else b""
    head = json.dumps(header, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode(
        "ascii"
    )
    stream.write(PREFIX.pack(MAGIC, len(head), len(blob)) + head + blob)
    stream.flush()


def _read_exact(stream, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(stream, limits: WireLimits = WireLimits()) -> tuple[dict, dict]:
    """-> (header, {name: plain tensor}). Raises EOFError at a clean end, WireError for anything
    malformed."""
    prefix = stream.read(PREFIX.size)
    if not prefix:
        raise EOFError("the other side closed the channel")
    if len(prefix) < PREFIX.size:
        prefix += _read_exact(stream, PREFIX.size - len(prefix))
    magic, head_size, blob_size = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise WireError("a message without the protocol's marker")
    if head_size > limits.header_bytes or blob_size > limits.blob_bytes:
        raise WireError(f"a message of {head_size + blob_size} bytes, over the limit")
    head, blob = _read_exact(stream, head_size), _read_exact(stream, blob_size)
    try:
        header = json.loads(head.decode("ascii"))
    except (ValueError, RecursionError) as error:
        raise WireError(f"unreadable message header ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("a message header that is not an object")
    return header, _load_tensors(blob)


def _load_tensors(blob: bytes) -> dict:
    if not blob:
        return {}
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except Exception as error:  # noqa: BLE001 - any parser complaint means a malformed message
        raise WireError(f"unreadable tensor data ({type(error).__name__})") from None
    # safetensors builds plain tensors; say so explicitly, since this is the property the grader
    # relies on
    return {
        name: torch.Tensor._make_subclass(torch.Tensor, t) if type(t) is not torch.Tensor else t
        for name, t in tensors.items()
    }


# ------------------------------------------------------------------ values


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with no autograd history and no subclass, ready for safetensors."""
    with torch._C.DisableTorchFunctionSubclass():
        copy = t.detach().to("cpu").contiguous().clone()
    return (
        torch.Tensor._make_subclass(torch.Tensor, copy) if type(copy) is not torch.Tensor else copy
    )


class Encoder:
    """Turns a value into the JSON tree, collecting its tensors. `hook(value, encoder)` may return a
    tagged dict for types the plain encoding does not know, or None; with no answer such a value is
    a TypeError."""

    def __init__(self, hook: Optional[Callable] = None):
        self.tensors: dict = {}
        self.hook = hook

    def tensor(self, t: torch.Tensor) -> dict:
        name = f"t{len(self.tensors)}"
        self.tensors[name] = plain_tensor(t)
        return {"$tensor": name}

    def encode(self, value, depth: int = 0):
        if depth > 32:
            raise TypeError("nested too deeply")
        if value is None or type(value) in (bool, int, str):
            return value
        if type(value) is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if type(value) is list:
            return [self.encode(v, depth + 1) for v in value]
        if type(value) is tuple:
            return {"$tuple": [self.encode(v, depth + 1) for v in value]}
        if type(value) is dict:
            return {
                "$dict": [
                    [self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in value.items()
                ]
            }
        tagged = self.hook(value, self) if self.hook else None
        if tagged is None:
            raise TypeError(f"cannot send a {type(value).__name__}")
        return tagged


class Decoder:
    """Rebuilds plain values from the JSON tree and the message's tensors, within `limits`.
    `hook(tag, body)` may build values for extra tags; an unknown tag is a WireError."""

    def __init__(
        self, tensors: dict, limits: WireLimits = WireLimits(), hook: Optional[Callable] = None
    ):
        self.tensors, self.limits, self.hook, self.nodes = tensors, limits, hook, 0

    def decode(self, node, depth: int = 0):
        self.nodes += 1
        if self.nodes > self.limits.nodes or depth > self.limits.depth:
            raise WireError("a value too large or nested too deeply")
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return [self.decode(v, depth + 1) for v in node]
        if type(node) is not dict or len(node) != 1:
            raise WireError("a malformed value")
        ((tag, body),) = node.items()
        if tag == "$float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "$tensor" and isinstance(body, str) and body in self.tensors:
            return self.tensors[body]
        if tag == "$tuple" and type(body) is list:
            return tuple(self.decode(v, depth + 1) for v in body)
        if tag == "$dict" and type(body) is list:
            result = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("a malformed dict")
                key = self.decode(pair[0], depth + 1)
                try:
                    result[key] = self.decode(pair[1], depth + 1)
                except TypeError:
                    raise WireError("a dict key that cannot be a key") from None
            return result
        if tag == "$unsupported" and isinstance(body, str):
            return Unsupported(body[:100])
        if self.hook is not None:
            return self.hook(tag, body, depth)
        raise WireError(f"an unexpected value tag {tag[:40]!r}")
