"""The grader <-> sandbox protocol: the wire format's bounds, and the remote calls checks are
written with.

The wire tests need no process. The remote-call test starts one sandbox and drives it the way a
check for a student's nn.Module will (issue #15): build the student's class in the sandbox, load
minisd-style weights into it by name, call forward, and run backward through a module the grader
built.
"""

from __future__ import annotations

import io
import math
import struct

import pytest
import torch

from minisd.course import wire
from minisd.course.checks import Context
from minisd.course.remote import RemoteTask
from minisd.course.sandbox import Isolation, Sandbox


def round_trip(value, limits=wire.WireLimits()):
    encoder = wire.Encoder()
    stream = io.BytesIO()
    wire.write_message(stream, {"value": encoder.encode(value)}, encoder.tensors)
    stream.seek(0)
    header, tensors = wire.read_message(stream, limits)
    return wire.Decoder(tensors, limits).decode(header["value"])


def test_values_come_back_as_plain_python_and_plain_tensors():
    class Sneaky(torch.Tensor):
        pass

    value = {
        ("a", "b"): 3,
        "x": [1.5, math.inf, None, True, "s"],
        "t": (
            torch.arange(6).reshape(2, 3),
            torch.ones(2, dtype=torch.bool),
            torch.randn(3).as_subclass(Sneaky),
            torch.zeros(2, dtype=torch.bfloat16),
        ),
    }
    back = round_trip(value)
    assert (
        back[("a", "b")] == 3
        and back["x"][:2] == [1.5, math.inf]
        and back["x"][2:] == [None, True, "s"]
    )
    assert all(type(t) is torch.Tensor for t in back["t"])
    assert (
        torch.equal(back["t"][0], torch.arange(6).reshape(2, 3))
        and back["t"][3].dtype == torch.bfloat16
    )
    assert math.isnan(round_trip(float("nan")))


def test_oversized_deep_or_malformed_messages_are_refused_before_use():
    limits = wire.WireLimits(header_bytes=1000, blob_bytes=1000, depth=5, nodes=50)
    with pytest.raises(wire.WireError):
        round_trip([[[[[[[1]]]]]]], limits)  # too deep
    with pytest.raises(wire.WireError):
        round_trip(list(range(100)), limits)  # too many values
    with pytest.raises(wire.WireError):
        round_trip(torch.zeros(1000), limits)  # blob over the limit
    huge = wire.PREFIX.pack(wire.MAGIC, 10, 1 << 40)  # claims a terabyte: refused unread
    for frame in (
        huge,
        b"XXXX" + bytes(12),
        wire.PREFIX.pack(wire.MAGIC, 2, 0) + b"[]",
        wire.PREFIX.pack(wire.MAGIC, 2, 5) + b"{}" + b"abcde",
    ):
        with pytest.raises(wire.WireError):
            wire.read_message(io.BytesIO(frame))
    with pytest.raises(EOFError):
        wire.read_message(io.BytesIO(wire.PREFIX.pack(wire.MAGIC, 10, 0) + b"{"))  # cut short
    for node in ({"$pickle": "x"}, {"$tensor": "t9"}, {"$dict": [[[1], 2]]}, {"a": 1, "b": 2}):
        with pytest.raises(wire.WireError):
            wire.Decoder({}).decode(node)
    assert isinstance(wire.Decoder({}).decode({"$unsupported": "generator"}), wire.Unsupported)
    assert struct.calcsize(">4sIQ") == wire.PREFIX.size


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(Isolation.detect(), fast=True)
    box.start()
    box.request({"op": "setup", "forbid": {}})
    yield box
    box.close()


STUDENT = """
import torch
from torch import nn

class TinyBlock(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.proj_in = nn.Linear(channels, hidden)
        self.proj_out = nn.Linear(hidden, channels)

    def forward(self, x):
        return x + self.proj_out(torch.relu(self.proj_in(x)))

def squared_error(module, x):
    return (module(x) ** 2).mean()
"""


def test_a_students_module_is_built_loaded_and_called_in_the_sandbox(sandbox):
    reply, _ = sandbox.request(
        {"op": "run", "source": STUDENT, "timeout": 60, "stash": ["TinyBlock"]}, timeout=90
    )
    assert reply["status"] == "ok", reply
    ctx = Context("TinyBlock", RemoteTask(sandbox, "TinyBlock", (), 60, {}), seed=1)
    reference = torch.nn.Sequential()
    reference.proj_in, reference.proj_out = torch.nn.Linear(4, 6), torch.nn.Linear(6, 4)
    student = ctx.construct(4, 6)
    assert ctx.load_state(student, reference.state_dict()) == ([], [])
    x = ctx.randn(2, 4)
    got = ctx.call_method(student, "forward", x)
    expected = x + reference.proj_out(torch.relu(reference.proj_in(x)))
    ctx.expect_close(got, expected.detach())
    missing, unexpected = ctx.load_state(
        student, {"proj_in.weight": torch.zeros(6, 4)}, strict=False
    )
    assert "proj_out.bias" in missing and unexpected == []


def test_backward_through_a_module_the_grader_built(sandbox):
    ctx = Context("squared_error", RemoteTask(sandbox, "squared_error", (), 60, {}), seed=2)
    linear = ctx.seed_module(ctx.module(torch.nn.Linear, 3, 2))
    x = ctx.randn(5, 3)
    value, grads = ctx.call_with_grads(linear, x)
    expected = (linear(x) ** 2).mean()
    expected.backward()
    ctx.expect_close(value, expected.detach())
    ctx.expect_close(grads[linear]["weight"], linear.weight.grad)
    ctx.expect_close(grads[linear]["bias"], linear.bias.grad)


def test_the_process_fallback_grades_and_says_it_is_weaker(tmp_path):
    """What a teacher's Mac or Windows machine gets: a plain separate process (named in the
    report)."""
    import shutil

    from minisd.course.grade import Grader
    from minisd.course.helpers import repo_root

    path = tmp_path / "09_guidance.ipynb"
    shutil.copy(repo_root() / "notebooks" / "09_guidance_and_pipeline.ipynb", path)
    with Grader(isolation="process") as grader:
        report = grader.grade(path, exercises_only=True)
    assert report.ok and report.isolation.startswith("separate process only (weaker"), report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["09_guidance.ipynb"]
