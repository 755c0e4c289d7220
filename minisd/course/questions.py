"""Auto-checked numeric questions, with inputs drawn per student.

    python -m minisd.course questions 07 --student s1234567            # print this student's
    questions
    python -m minisd.course questions 07 --student s1234567 --answers my_answers.json [--json]

Each question's inputs (a timestep, a block's sizes, ...) are drawn from a generator seeded with the
student id and the question's id, so every student gets their own numbers and answers cannot be
passed around; the same id always gets the same questions. The expected value is computed from
minisd when the answers are checked (never stored), and compared with a relative tolerance (answers
are numbers a student reads off a computation, so four significant digits are asked for). Answers
file: {"question id": number, ...}. Exit status: 0 all answers right, 1 otherwise, 2 bad input
(unknown chapter, unreadable answers file).
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass
class Question:
    qid: str
    chapter: str
    text: str  # str.format template over the drawn parameters
    draw: Callable  # random.Random -> dict of parameters
    answer: Callable  # parameters -> the expected number (computed with minisd)
    rtol: float = 5e-4


def _alpha_bar(p):
    from minisd.schedule import NoiseSchedule

    return float(NoiseSchedule().alphas_cumprod[p["t"]])


def _snr(p):
    a = _alpha_bar(p)
    return a / (1 - a)


def _parameters(module) -> int:
    return sum(x.numel() for x in module.parameters())


def _block_parameters(p):
    from minisd.transformer import TransformerBlock

    return _parameters(TransformerBlock(p["dim"], p["heads"], p["head_dim"], p["context_dim"]))


def _resnet_parameters(p):
    from minisd.resnet import ResnetBlock

    return _parameters(ResnetBlock(p["cin"], p["cout"], p["time_dim"], groups=p["groups"]))


def _attention_bytes(p):
    return p["side"] ** 4 * p["heads"] * 4 * p["batch"]  # (side²)² weights per head, float32


def _first_timestep(p):
    from minisd.ddim import DDIMSampler
    from minisd.schedule import NoiseSchedule

    return int(DDIMSampler(NoiseSchedule(), p["steps"]).timesteps[0])


def _receptive_field(p):
    from .checks.ch04_unet import _measured_receptive_field

    return _measured_receptive_field(p["kernels"], p["strides"])


QUESTIONS = [
    Question(
        "attention_bytes",
        "01",
        "How many bytes does the readable attention path need for the weights A of one "
        "self-attention "
        "layer on a {side}×{side} latent with {heads} heads, in float32, for a batch of {batch}?",
        lambda r: {
            "side": r.choice([32, 48, 64, 96]),
            "heads": r.choice([5, 8, 10]),
            "batch": r.choice([1, 2]),
        },
        _attention_bytes,
    ),
    Question(
        "block_parameters",
        "02",
        "How many parameters has minisd's TransformerBlock(dim={dim}, heads={heads}, "
        "head_dim={head_dim}, "
        "context_dim={context_dim})?",
        lambda r: {
            "dim": r.choice([320, 640, 1280]),
            "heads": r.choice([5, 8, 10, 20]),
            "head_dim": r.choice([40, 64, 80]),
            "context_dim": r.choice([768, 1024]),
        },
        _block_parameters,
    ),
    Question(
        "resnet_parameters",
        "03",
        "How many parameters has a ResNet block from {cin} to {cout} channels with a "
        "{time_dim}-wide time "
        "input ({groups} GroupNorm groups)?",
        lambda r: {
            "cin": r.choice([320, 640]),
            "cout": r.choice([320, 640, 1280]),
            "time_dim": 1280,
            "groups": 32,
        },
        _resnet_parameters,
    ),
    Question(
        "receptive_field",
        "04",
        "What is the receptive field (input pixels along one axis) of one output pixel of "
        "convolutions with "
        "kernel sizes {kernels} and strides {strides}, applied in that order?",
        lambda r: (
            lambda n: {
                "kernels": [r.choice([1, 3, 3, 5]) for _ in range(n)],
                "strides": [r.choice([1, 1, 2]) for _ in range(n)],
            }
        )(r.randint(3, 6)),
        _receptive_field,
    ),
    Question(
        "alpha_bar",
        "07",
        "What is ᾱ_t of Stable Diffusion's noise schedule (scaled linear from 0.00085 to 0.012, T "
        "= 1000) at "
        "t = {t}?",
        lambda r: {"t": r.randint(1, 999)},
        _alpha_bar,
    ),
    Question(
        "snr",
        "07",
        "What is the signal-to-noise ratio ᾱ_t/(1 − ᾱ_t) of Stable Diffusion's schedule at t = "
        "{t}?",
        lambda r: {"t": r.randint(1, 999)},
        _snr,
    ),
    Question(
        "first_timestep",
        "08",
        "Which timestep does SD's DDIM (leading spacing, steps_offset 1) visit first with "
        "{steps} steps?",
        lambda r: {"steps": r.choice([7, 12, 15, 25, 30, 40, 60, 75, 90])},
        _first_timestep,
    ),
]


def questions_of(chapter: str) -> list[Question]:
    return [q for q in QUESTIONS if q.chapter == chapter]


def parameters_for(student: str, question: Question) -> dict:
    return question.draw(random.Random(f"{student}/{question.qid}"))


def check(student: str, chapter: str, answers: dict) -> list[dict]:
    """One result per question of the chapter: passed | failed | not answered, with a message."""
    results = []
    for q in questions_of(chapter):
        params = parameters_for(student, q)
        result = {"question": q.qid, "text": q.text.format(**params)}
        given = answers.get(q.qid)
        if given is None:
            result.update(status="not answered", message="no answer for this question")
        elif (
            isinstance(given, bool)
            or not isinstance(given, (int, float))
            or not math.isfinite(given)
        ):
            result.update(status="failed", message=f"the answer must be a number, got {given!r}")
        else:
            expected = q.answer(params)
            ok = math.isclose(given, expected, rel_tol=q.rtol, abs_tol=1e-12)
            result.update(
                status="passed" if ok else "failed",
                message=""
                if ok
                else f"{given!r} is not within {q.rtol:g} (relative) of the answer",
            )
        results.append(result)
    return results


def main(args) -> int:
    chapter = args.chapter
    if not questions_of(chapter):
        chapters = sorted({q.chapter for q in QUESTIONS})
        print(
            f"error: chapter {chapter!r} has no numeric questions (chapters with questions: "
            f"{', '.join(chapters)})",
            file=sys.stderr,
        )
        return 2
    if not args.student.strip():
        print("error: --student must not be empty", file=sys.stderr)
        return 2
    if args.answers is None:
        for q in questions_of(chapter):
            print(f"[{q.qid}] {q.text.format(**parameters_for(args.student, q))}")
        template = {q.qid: None for q in questions_of(chapter)}
        print("\nWrite your answers as JSON, e.g.:\n" + json.dumps(template))
        return 0
    try:
        with open(args.answers, encoding="utf-8") as f:
            answers = json.load(f)
        if not isinstance(answers, dict):
            raise ValueError('the file must hold one JSON object {"question id": number}')
    except (OSError, ValueError) as error:
        print(f"error: cannot read answers from {args.answers}: {error}", file=sys.stderr)
        return 2
    results = check(args.student, chapter, answers)
    if args.json:
        print(
            json.dumps(
                {
                    "student": args.student,
                    "chapter": chapter,
                    "results": results,
                    "passed": sum(r["status"] == "passed" for r in results),
                    "total": len(results),
                },
                ensure_ascii=False,
                indent=1,
            )
        )
    else:
        for r in results:
            print(
                f"{'✔' if r['status'] == 'passed' else '✘'} {r['question']}: {r['status']}"
                + (f" ({r['message']})" if r["message"] else "")
            )
    return 0 if all(r["status"] == "passed" for r in results) else 1
